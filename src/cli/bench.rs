//! `sirius-offload bench`: llama-bench-style throughput of prefill (pp) and decode (tg), so the
//! two can be compared in one run. pp: a batch of N prompt tokens from an empty cache; tg: N
//! single-token forwards starting from an empty cache. Token ids are fixed pseudo-random ids
//! (speed does not depend on them).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::output::{check_output_dir, write_json};
use crate::cli::sparsity_args::SparsityArgs;
use crate::error::{Error, Result};
use crate::model::{Llama, Logits, Scratch};
use crate::progress::progress_bar;
use crate::sparsity::{SparsityMode, SparsityReport};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model directory or preset name.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Don't fetch a preset's weights automatically when they are missing.
    #[arg(long)]
    pub no_fetch: bool,
    /// Compute threads (0 = one per core).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
    /// Prompt tokens of the prefill test (0 = skip).
    #[arg(long, short = 'p', default_value_t = 128)]
    pub prompt: usize,
    /// Tokens of the decode test (0 = skip). With --sparsity griffin the neurons are chosen
    /// from a dense prefill of the pp test's tokens (128 if --prompt is 0); the reported
    /// kept fractions cover every rep, warm-up included.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub gen: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, short = 'r', default_value_t = 5)]
    pub reps: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sparsity of the decode (tg) test. Griffin picks its neurons from a prefill of the pp
    /// test's tokens (128 if --prompt is 0); pp always runs dense.
    #[command(flatten)]
    pub sparsity: SparsityArgs,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub tokens: usize,
    pub reps: usize,
    pub median_tokens_per_s: f64,
    pub min_tokens_per_s: f64,
    pub max_tokens_per_s: f64,
    pub samples_tokens_per_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    backend: String,
    dtype: String,
    weight_bytes: usize,
    /// Weight bytes a decode step reads: the dense figure minus the FFN bytes sparsity skips
    /// (an untied embedding table is not counted: a step reads one row of it).
    decode_weight_bytes_per_token: f64,
    #[serde(flatten)]
    sparsity: SparsityReport,
    results: Vec<BenchResult>,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.reps == 0 {
        return Err(Error::InvalidArgument("--reps must be at least 1".into()));
    }
    if args.prompt == 0 && args.gen == 0 {
        return Err(Error::InvalidArgument(
            "nothing to measure: --prompt and --gen are both 0".into(),
        ));
    }
    check_output_dir("--json", args.json.as_deref())?;
    args.sparsity.validate()?;
    let dir = model_dir_or_fetch(&args.model, !args.no_fetch)?;
    let model = Llama::load(&dir, CpuBackend::new(args.threads))?;
    let sparsity = args.sparsity.build(&model)?;
    let max_pos = model.config.max_position_embeddings;
    if args.prompt > max_pos || args.gen > max_pos {
        return Err(Error::InvalidArgument(format!(
            "--prompt {} / --gen {}: each must fit the model's context of {max_pos} tokens",
            args.prompt, args.gen
        )));
    }
    let vocab = model.config.vocab_size as u32;
    let ids = |n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect()
    };
    let mut results = Vec::new();
    let tests = usize::from(args.prompt > 0) + usize::from(args.gen > 0);
    let bar = progress_bar((tests * (args.reps + 1)) as u64, "bench");
    if args.prompt > 0 {
        let tokens = ids(args.prompt);
        let mut scratch = Scratch::with_logit_rows(&model, args.prompt, 1)?;
        let mut samples = Vec::new();
        for rep in 0..=args.reps {
            let mut cache = model.new_cache(args.prompt)?;
            let t = Instant::now();
            model.forward(&tokens, &mut cache, &mut scratch, Logits::Last)?;
            bar.inc(1);
            // Rep 0 warms caches and page-ins; it is not counted.
            if rep > 0 {
                samples.push(args.prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        results.push(summarise(
            format!("pp{}", args.prompt),
            args.prompt,
            samples,
        ));
    }
    // Griffin needs a prompt to choose its neurons; the same request state serves every rep.
    let mut request = sparsity.request(&model)?;
    if args.gen > 0 && sparsity.mode() == SparsityMode::Griffin {
        let prompt = ids(if args.prompt > 0 { args.prompt } else { 128 }.min(max_pos));
        let mut scratch = Scratch::with_logit_rows(&model, prompt.len(), 1)?;
        let mut cache = model.new_cache(prompt.len())?;
        model.forward_with(
            &prompt,
            &mut cache,
            &mut scratch,
            Logits::Last,
            &mut request.prefill_ffn(),
        )?;
        request.finish_prefill(&model)?;
    }
    if args.gen > 0 {
        let tokens = ids(args.gen);
        let mut scratch = Scratch::new(&model, 1)?;
        let mut samples = Vec::new();
        for rep in 0..=args.reps {
            let mut cache = model.new_cache(args.gen)?;
            let t = Instant::now();
            for &tok in &tokens {
                model.forward_with(
                    &[tok],
                    &mut cache,
                    &mut scratch,
                    Logits::Last,
                    &mut request.decode_ffn()?,
                )?;
                request.count_decode(1);
            }
            bar.inc(1);
            if rep > 0 {
                samples.push(args.gen as f64 / t.elapsed().as_secs_f64());
            }
        }
        results.push(summarise(format!("tg{}", args.gen), args.gen, samples));
    }
    bar.finish_and_clear();
    let sparsity_report = request.report(&model.config);
    let report = BenchReport {
        decode_weight_bytes_per_token: decode_bytes_per_token(&model, &sparsity_report),
        sparsity: sparsity_report,
        model: dir.display().to_string(),
        backend: model.backend_description(),
        dtype: model.dtype.to_string(),
        weight_bytes: model.weight_bytes(),
        results,
    };
    let mut table = String::from("| model | backend | dtype | sparsity | test | t/s (median) | min | max |\n|---|---|---|---|---|---|---|---|\n");
    for r in &report.results {
        let sparse = match (&report.sparsity.sparsity, r.test.starts_with("tg")) {
            (SparsityMode::None, _) | (_, false) => "none".to_string(),
            (mode, true) => format!(
                "{mode} {} (density {:.3})",
                report.sparsity.keep, report.sparsity.density
            ),
        };
        table += &format!(
            "| {} | {} | {} | {sparse} | {} | {:.2} | {:.2} | {:.2} |\n",
            args.model,
            report.backend,
            report.dtype,
            r.test,
            r.median_tokens_per_s,
            r.min_tokens_per_s,
            r.max_tokens_per_s
        );
    }
    match std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(Error::Write {
                path: "standard output".into(),
                source: e,
            })
        }
        _ => {}
    }
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// Weight bytes one decode step reads: everything but an untied embedding table (one row of
/// it is read), minus the FFN bytes the sparse steps skipped on average.
fn decode_bytes_per_token(model: &Llama<CpuBackend>, report: &SparsityReport) -> f64 {
    let c = &model.config;
    let esz = model.dtype.size() as f64;
    let embed = if c.tie_word_embeddings {
        0.0
    } else {
        (c.vocab_size * c.hidden_size) as f64 * esz
    };
    let skipped_params = (1.0 - report.density) * c.parameter_count() as f64;
    model.weight_bytes() as f64 - embed - skipped_params * esz
}

fn summarise(test: String, tokens: usize, mut samples: Vec<f64>) -> BenchResult {
    let unsorted = samples.clone();
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    BenchResult {
        test,
        tokens,
        reps: n,
        median_tokens_per_s: median,
        min_tokens_per_s: samples[0],
        max_tokens_per_s: samples[n - 1],
        samples_tokens_per_s: unsorted,
    }
}
