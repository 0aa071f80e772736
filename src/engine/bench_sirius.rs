//! `bench --sirius`: decode throughput of Sirius at several windows beside the full and the
//! sparse model, on one real prompt (Sirius's acceptance depends on the text, so no random
//! ids here), in alternated rounds so that the machine's drift hits every row alike; the
//! median of each row and its ratio to the full model's median of the same run.
//!
//! Every generation decodes exactly `gen` tokens (EOS ignored) from the same prompt, whose
//! KV cache (and Griffin scores) is computed once in memory: each run prefills only its last
//! token. An offloaded engine prefills the whole prompt per run (its full passes stream
//! weights); decode time is measured alone either way.

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::prefill::DEFAULT_PREFILL_CHUNK;
use crate::engine::{Decoding, Engine, GenerationOutput, RequestOptions, SiriusReport};
use crate::error::{Error, Result};

/// One row to measure: which of the sweep's engines runs it, and how it decodes. An
/// offloaded comparison needs two engines: one loaded dense (the full model offloaded) and
/// one with Griffin (Sirius's drafts); in memory one engine runs every mode.
#[derive(Debug, Clone, Copy)]
pub struct SweepLane {
    pub engine: usize,
    pub decoding: Decoding,
}

/// The settings a group of rows shares (a point of the swept options), repeated on its rows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SweepPoint {
    /// CPU compute threads (0 on a GPU).
    pub threads: usize,
    /// Griffin's kept fraction of FFN neurons (the sparse and Sirius rows).
    pub keep: f32,
    /// The offloading budget in bytes (`None`: the whole model in memory).
    pub budget_bytes: Option<u64>,
}

/// How long each run is and how often it is repeated.
#[derive(Debug, Clone, Copy)]
pub struct SweepRuns {
    /// Tokens decoded per run.
    pub gen: usize,
    /// Timed rounds (after one warm-up round).
    pub reps: usize,
}

/// One row: a mode (and window) over every round.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    #[serde(flatten)]
    pub point: SweepPoint,
    /// "full", "sparse" or "sirius".
    pub mode: &'static str,
    /// Sirius: K (adaptive: the longest window allowed).
    pub period: Option<usize>,
    /// Sirius with `--period auto`: each window's K chosen from measured costs.
    pub adaptive: bool,
    /// Sirius: mean tokens verified per window (median over rounds).
    pub mean_period: Option<f64>,
    pub tokens: usize,
    pub reps: usize,
    /// Decode tokens per second (after the prompt's token), median over rounds.
    pub median_tokens_per_s: f64,
    pub min_tokens_per_s: f64,
    pub max_tokens_per_s: f64,
    /// Median / the median of the group's full model in the same run.
    pub speedup_vs_full: f64,
    /// Sirius: average advance length per verification (median over rounds).
    pub aal: Option<f64>,
    /// Parameters read per token / all: 1 for full, the density for sparse, Sirius's
    /// ((K - 1) * density + 1) / AAL.
    pub effective_density: f64,
    /// Milliseconds per decoded token in drafts, verifications and the rest (medians).
    pub draft_ms_per_token: f64,
    pub verify_ms_per_token: f64,
    pub other_ms_per_token: f64,
    /// Offloaded rows: the planner's ms per token for the run (its measured AAL), when it
    /// predicts one (on the CPU: with a link cap), and the measured one (medians).
    pub predicted_ms_per_token: Option<f64>,
    pub measured_ms_per_token: Option<f64>,
    /// Offloaded rows: megabytes streamed per decoded token (the prompt's pass included: the
    /// run's bytes over its tokens; median).
    pub streamed_mb_per_token: Option<f64>,
}

/// Runs every lane on `prompt`, alternated, `runs.reps` rounds after a warm-up; rows in
/// lane order, each at `point`, the first `Dense` lane the baseline of `speedup_vs_full`.
/// `on_run` is called after each generation.
pub fn sweep<B: OffloadBackend>(
    engines: &mut [Engine<B>],
    lanes: &[SweepLane],
    prompt: &[u32],
    runs: SweepRuns,
    point: SweepPoint,
    on_run: &mut dyn FnMut(),
) -> Result<Vec<SweepRow>> {
    if runs.reps == 0 || runs.gen < 2 || prompt.len() < 2 {
        return Err(Error::InvalidArgument(
            "bench --sirius needs --reps >= 1, --gen >= 2 and a prompt of 2 tokens or more".into(),
        ));
    }
    check_lanes(engines, lanes, prompt, runs.gen)?;
    // Whatever happens, no engine keeps the prefix (or a runtime) of this sweep.
    let samples = measure(engines, lanes, prompt, runs, on_run);
    for engine in engines.iter_mut() {
        engine.clear_prompt_prefix();
        engine.release_offload_runtime();
    }
    let samples = samples?;
    let mut rows: Vec<SweepRow> = lanes
        .iter()
        .zip(&samples)
        .map(|(lane, o)| row(lane.decoding, o, point))
        .collect();
    let full = rows
        .iter()
        .find(|r| r.mode == "full")
        .map_or(0.0, |r| r.median_tokens_per_s);
    for r in &mut rows {
        r.speedup_vs_full = if full > 0.0 {
            r.median_tokens_per_s / full
        } else {
            0.0
        };
    }
    Ok(rows)
}

/// Every lane's generations, alternated, after a warm-up round that is not kept.
fn measure<B: OffloadBackend>(
    engines: &mut [Engine<B>],
    lanes: &[SweepLane],
    prompt: &[u32],
    runs: SweepRuns,
    on_run: &mut dyn FnMut(),
) -> Result<Vec<Vec<GenerationOutput>>> {
    for engine in engines.iter_mut().filter(|e| !e.is_offloaded()) {
        engine.set_prompt_prefix(&prompt[..prompt.len() - 1], DEFAULT_PREFILL_CHUNK, true)?;
    }
    let mut opts = RequestOptions::greedy(runs.gen);
    opts.stop_at_eos = false;
    let mut samples: Vec<Vec<GenerationOutput>> = vec![Vec::new(); lanes.len()];
    // Round 0 warms caches and builds decode copies; it is not kept.
    for round in 0..=runs.reps {
        for (lane, kept) in lanes.iter().zip(samples.iter_mut()) {
            // One offloading budget at a time: the other engines give theirs back first
            // (each run plans its runtime outside the timed prefill and decode).
            for (i, other) in engines.iter_mut().enumerate() {
                if i != lane.engine {
                    other.release_offload_runtime();
                }
            }
            let engine = &mut engines[lane.engine];
            let out = engine.generate(prompt, &opts, lane.decoding, &mut |_| true)?;
            on_run();
            if round > 0 {
                kept.push(out);
            }
        }
    }
    Ok(samples)
}

/// Every lane names an engine, its Sirius settings are valid, and every run can decode all
/// `gen` tokens (a full cache would end some runs early).
fn check_lanes<B: OffloadBackend>(
    engines: &[Engine<B>],
    lanes: &[SweepLane],
    prompt: &[u32],
    gen: usize,
) -> Result<()> {
    let mut extra_rows = 0;
    let mut context = usize::MAX;
    for lane in lanes {
        let engine = engines.get(lane.engine).ok_or_else(|| {
            Error::InvalidArgument(format!("sweep lane names engine {}", lane.engine))
        })?;
        context = context.min(engine.context());
        if let Decoding::Sirius(config) = lane.decoding {
            config.validate()?;
            extra_rows = extra_rows.max(config.extra_cache_rows());
        }
    }
    let needed = prompt.len() + gen - 1 + extra_rows;
    if needed > context {
        return Err(Error::InvalidArgument(format!(
            "the prompt ({} tokens), --gen {gen} and Sirius's extra cache rows need {needed} \
             positions; the model has {context}: shorten the prompt or --gen",
            prompt.len(),
        )));
    }
    Ok(())
}

/// A Sirius statistic of one output (0 for plain decoding).
type Stat = fn(&SiriusReport) -> f64;

fn row(mode: Decoding, outs: &[GenerationOutput], point: SweepPoint) -> SweepRow {
    let med =
        |f: &dyn Fn(&GenerationOutput) -> f64| median(&outs.iter().map(f).collect::<Vec<_>>());
    let sirius = |f: Stat| med(&|o| o.sirius.as_ref().map_or(0.0, f));
    // Milliseconds per decoded token (those after the prompt's).
    let per_token = |o: &GenerationOutput, seconds: f64| {
        1e3 * seconds / o.generated_tokens.saturating_sub(1).max(1) as f64
    };
    let ms = |f: Stat| med(&|o| per_token(o, o.sirius.as_ref().map_or(0.0, f)));
    let rates: Vec<f64> = outs.iter().map(|o| o.decode_tokens_per_s).collect();
    let (name, period, adaptive) = match mode {
        Decoding::Dense => ("full", None, false),
        Decoding::Sparse => ("sparse", None, false),
        Decoding::Sirius(c) => ("sirius", Some(c.period), c.adaptive),
    };
    let is_sirius = period.is_some();
    let offload =
        |f: fn(&crate::offload::runtime::OffloadReport, &GenerationOutput) -> Option<f64>| {
            let values: Vec<f64> = outs
                .iter()
                .filter_map(|o| o.offload.as_ref().and_then(|r| f(r, o)))
                .collect();
            (!values.is_empty()).then(|| median(&values))
        };
    SweepRow {
        point,
        mode: name,
        period,
        adaptive,
        mean_period: is_sirius.then(|| sirius(|r| r.mean_period)),
        tokens: outs.first().map_or(0, |o| o.generated_tokens),
        reps: outs.len(),
        median_tokens_per_s: median(&rates),
        min_tokens_per_s: rates.iter().copied().fold(f64::INFINITY, f64::min),
        max_tokens_per_s: rates.iter().copied().fold(0.0, f64::max),
        speedup_vs_full: 0.0,
        aal: is_sirius.then(|| sirius(|r| r.aal)),
        effective_density: match mode {
            Decoding::Dense => 1.0,
            Decoding::Sparse => med(&|o| o.sparsity.density),
            Decoding::Sirius(_) => sirius(|r| r.effective_density),
        },
        draft_ms_per_token: ms(|r| r.draft_seconds),
        verify_ms_per_token: ms(|r| r.verify_seconds),
        other_ms_per_token: match is_sirius {
            true => ms(|r| r.other_seconds),
            // Plain decoding: all of a step is "other" (no drafts, no verifications).
            false => med(&|o| per_token(o, o.decode_seconds)),
        },
        predicted_ms_per_token: offload(|r, _| r.predicted_ms_per_token),
        measured_ms_per_token: offload(|r, _| Some(r.measured_ms_per_token)),
        streamed_mb_per_token: offload(|r, o| {
            Some(r.streamed_bytes as f64 / 1e6 / o.generated_tokens.max(1) as f64)
        }),
    }
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }
}
