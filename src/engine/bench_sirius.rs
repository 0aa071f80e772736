//! `bench --sirius`: decode throughput of Sirius at several windows beside the full and the
//! sparse model, on one real prompt (Sirius's acceptance depends on the text, so no random
//! ids here), in alternated rounds so that the machine's drift hits every row alike; the
//! median of each row and its ratio to the full model's median of the same run.
//!
//! Every generation decodes exactly `gen` tokens (EOS ignored) from the same prompt, whose
//! KV cache (and Griffin scores) is computed once: each run prefills only its last token.

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::prefill::DEFAULT_PREFILL_CHUNK;
use crate::engine::{Decoding, Engine, GenerationOutput, RequestOptions, SiriusReport};
use crate::error::{Error, Result};
use crate::sirius::{Period, SiriusConfig};

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SiriusSweep {
    /// Windows to measure (a K, or adaptive windows), each a row.
    pub periods: Vec<Period>,
    /// Threshold, acceptance temperature and width shared by every row.
    pub base: SiriusConfig,
    /// Tokens decoded per run.
    pub gen: usize,
    /// Timed rounds (after one warm-up round).
    pub reps: usize,
}

/// One row: a mode (and window) over every round.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
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
    /// Median / the full model's median in the same run.
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
}

/// Runs the sweep on `prompt`; `on_run` is called after each generation.
pub fn sweep<B: OffloadBackend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    s: &SiriusSweep,
    on_run: &mut dyn FnMut(),
) -> Result<Vec<SweepRow>> {
    if s.reps == 0 || s.gen < 2 || prompt.len() < 2 {
        return Err(Error::InvalidArgument(
            "bench --sirius needs --reps >= 1, --gen >= 2 and a prompt of 2 tokens or more".into(),
        ));
    }
    let mut modes = vec![Decoding::Dense, Decoding::Sparse];
    let mut extra_rows = 0;
    for &period in &s.periods {
        let config = period.apply(s.base);
        config.validate()?;
        extra_rows = extra_rows.max(config.extra_cache_rows());
        modes.push(Decoding::Sirius(config));
    }
    // Every run must decode all `gen` tokens: a full cache would end some runs early.
    let needed = prompt.len() + s.gen - 1 + extra_rows;
    if needed > engine.context() {
        return Err(Error::InvalidArgument(format!(
            "the prompt ({} tokens), --gen {} and Sirius's extra cache rows need {needed} \
             positions; the model has {}: shorten the prompt or --gen",
            prompt.len(),
            s.gen,
            engine.context()
        )));
    }
    engine.set_prompt_prefix(&prompt[..prompt.len() - 1], DEFAULT_PREFILL_CHUNK, true)?;
    let mut opts = RequestOptions::greedy(s.gen);
    opts.stop_at_eos = false;
    let mut samples: Vec<Vec<GenerationOutput>> = vec![Vec::new(); modes.len()];
    // Round 0 warms caches and builds decode copies; it is not kept.
    for round in 0..=s.reps {
        for (mode, kept) in modes.iter().zip(samples.iter_mut()) {
            let out = engine.generate(prompt, &opts, *mode, &mut |_| true)?;
            on_run();
            if round > 0 {
                kept.push(out);
            }
        }
    }
    engine.clear_prompt_prefix();
    let mut rows: Vec<SweepRow> = modes
        .iter()
        .zip(&samples)
        .map(|(m, o)| row(*m, o))
        .collect();
    let full = rows[0].median_tokens_per_s;
    for r in &mut rows {
        r.speedup_vs_full = if full > 0.0 {
            r.median_tokens_per_s / full
        } else {
            0.0
        };
    }
    Ok(rows)
}

/// A Sirius statistic of one output (0 for plain decoding).
type Stat = fn(&SiriusReport) -> f64;

fn row(mode: Decoding, outs: &[GenerationOutput]) -> SweepRow {
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
    SweepRow {
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
