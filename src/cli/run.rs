//! `sirius-offload run`: generate text from a prompt and stream it to stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::output::{check_output_dir, write_json};
use crate::cli::sparsity_args::SparsityArgs;
use crate::config::generation::stop_token_ids;
use crate::engine::{generate, generate_sirius, GenerateOptions, GenerationOutput, SiriusOptions};
use crate::error::{Error, Result};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::{Llama, SamplingParams, Tokenizer};
use crate::offload::offload_backend::OffloadBackend;
use crate::offload::parse_size;
use crate::offload::placement::{CPU_MEM_GBPS, GPU_MEM_GBPS};
use crate::offload::runtime::OffloadOptions;
use crate::offload::sirius_model::generate_sirius_offloaded;
use crate::sparsity::SparsityMode;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Model directory (HF layout) or preset name (see configs/models), e.g. smollm2-135m.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Don't fetch a preset's weights automatically when they are missing.
    #[arg(long)]
    pub no_fetch: bool,
    /// Prompt text, taken raw: special tokens written in it (<|im_start|>) are recognised.
    #[arg(
        long,
        short = 'p',
        allow_hyphen_values = true,
        required_unless_present = "prompt_file",
        conflicts_with = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file ("-" = standard input), for prompts too long for a command line.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed; the same seed, prompt and options give the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable; taken literally: in bash, $'\n' is a newline).
    #[arg(long = "stop", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Compute threads (0 = one per core).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
    /// Where to compute: cpu, or cuda / cuda:N for GPU N (needs a build with `--features
    /// cuda`; weights, KV cache and activations then live in GPU memory, or within --gpu-mem;
    /// not yet verified on a GPU, see README "GPU").
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Context length cap in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// FFN sparsity of the decode steps: none, griffin (neurons chosen once from the prompt)
    /// or cats (chosen per token from |SiLU(gate)|). The prompt always runs dense.
    // The three sparsity options are spelled out (not a flattened SparsityArgs) because clap
    // never fills the optional top-level `RunArgs` when it contains a nested flatten.
    #[arg(long, default_value = "none")]
    pub sparsity: SparsityMode,
    /// Fraction of FFN neurons kept, in (0, 1].
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub keep: f32,
    /// CATS per-layer thresholds from `sirius-offload calibrate`, instead of per-token top-k.
    #[arg(long)]
    pub cats_thresholds: Option<PathBuf>,
    /// Sirius correction: the sparse model drafts, the full model verifies every --period
    /// tokens in one pass and corrects the first unlikely token (greedy: needs --temperature 0).
    #[arg(long)]
    pub sirius: bool,
    /// Sirius window K: K - 1 drafted tokens per verification.
    #[arg(long, default_value_t = 16, requires = "sirius")]
    pub period: usize,
    /// Sirius acceptance threshold on the full model's probability of a drafted token.
    #[arg(
        long,
        default_value_t = 0.1,
        requires = "sirius",
        allow_negative_numbers = true
    )]
    pub threshold: f32,
    /// Temperature of that probability.
    #[arg(
        long,
        default_value_t = 0.6,
        requires = "sirius",
        allow_negative_numbers = true
    )]
    pub accept_temperature: f32,
    /// Sirius tree width W: 1 is the chain; W > 1 drafts W beams and verifies them as one
    /// tree of (K - 1) * W + 1 tokens.
    #[arg(long, default_value_t = 1, requires = "sirius")]
    pub width: usize,
    /// Offloading on CPU: keep only this much memory resident (e.g. 161MB, 1.5G) for weights,
    /// KV cache and buffers, placed as `sirius-offload plan` decides; the rest stays in host
    /// memory and is streamed: the FFN complement when the full model runs (prompt,
    /// verification), plus whatever of the sparse model did not fit on every pass (needs
    /// --sirius --sparsity griffin). Emulates a GPU budget to test the schedule; tokens equal
    /// an unconstrained run's up to rounding (the split FFN sums in another order).
    #[arg(long, value_name = "SIZE")]
    pub resident_mem: Option<String>,
    /// Offloading on a GPU (with --device cuda): keep weights, KV cache and buffers within
    /// this much GPU memory (e.g. 24G), placed as `sirius-offload plan --gpu-mem` decides;
    /// the rest stays in host memory and is streamed over PCIe as with --resident-mem
    /// (needs --sirius --sparsity griffin).
    #[arg(long, value_name = "SIZE")]
    pub gpu_mem: Option<String>,
    /// With --resident-mem: cap the copy engine at this many GB/s, emulating a PCIe link.
    /// With --gpu-mem: the host-to-GPU GB/s the planner assumes (not a cap: copies use the
    /// real link; default 25, as `plan --gpu-mem`).
    #[arg(long)]
    pub link_gbps: Option<f64>,
    /// Memory bandwidth (GB/s) the planner assumes for compute when it predicts ms/token for
    /// this run (with --resident-mem, default 20: measure yours with `cargo bench --bench
    /// membw`; with --gpu-mem, default 1008, an RTX 4090's).
    #[arg(long)]
    pub mem_gbps: Option<f64>,
    /// Write a Chrome trace (open in Perfetto) of copy and compute spans per layer
    /// (with --resident-mem or --gpu-mem; on a GPU the spans are host-side: when copies and
    /// kernels were issued).
    #[arg(long, value_name = "PATH")]
    pub trace: Option<PathBuf>,
    /// Write run statistics as one JSON object to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Don't print the timing summary on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// What `--stats-json` writes: the generation output plus what produced it.
#[derive(Serialize)]
struct RunStats<'a> {
    model: String,
    backend: String,
    dtype: String,
    threads: usize,
    #[serde(flatten)]
    output: &'a GenerationOutput,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    // Option errors first: they should not wait for a model load.
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed,
    };
    sampling.validate()?;
    if args.ctx_size == Some(0) {
        return Err(Error::InvalidArgument("--ctx-size must be positive".into()));
    }
    check_output_dir("--stats-json", args.stats_json.as_deref())?;
    let sparsity_args = SparsityArgs {
        sparsity: args.sparsity,
        keep: args.keep,
        cats_thresholds: args.cats_thresholds.clone(),
    };
    sparsity_args.validate()?;
    let sirius = SiriusOptions {
        period: args.period,
        threshold: args.threshold,
        accept_temperature: args.accept_temperature,
        width: args.width,
    };
    if args.sirius {
        crate::sirius::CorrectorOptions {
            period: args.period,
            threshold: args.threshold,
            accept_temperature: args.accept_temperature,
            width: args.width,
            max_tokens: args.max_tokens,
        }
        .validate()?;
        if args.temperature != 0.0 {
            return Err(Error::InvalidArgument(
                "--sirius decodes greedily (as the paper does): add --temperature 0".into(),
            ));
        }
    }
    let offload_budget = offload_budget(args)?;
    check_output_dir("--trace", args.trace.as_deref())?;
    if args.stop.iter().any(String::is_empty) {
        return Err(Error::InvalidArgument(
            "--stop needs a non-empty text".into(),
        ));
    }
    let job = RunJob {
        args,
        sampling,
        sparsity_args,
        sirius,
        offload_budget,
        seed,
    };
    match args.device {
        Device::Cpu => {
            let backend = CpuBackend::new(args.threads);
            let threads = backend.threads();
            run_on(job, backend, threads)
        }
        // The device comes first (before the prompt and the model): a machine without a
        // usable GPU fails at once with the probe's one-line reason.
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let mut backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
            if offload_budget.is_some() {
                // Only what the plan keeps resident goes to the GPU.
                backend = backend.with_host_weights();
            }
            // No CPU compute threads: every op runs on the GPU.
            run_on(job, backend, 0)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(ordinal) => Err(cuda_unavailable(ordinal)),
    }
}

/// What `run` checked and computed before a backend exists.
struct RunJob<'a> {
    args: &'a RunArgs,
    sampling: SamplingParams,
    sparsity_args: SparsityArgs,
    sirius: SiriusOptions,
    /// The offloading budget (--resident-mem on CPU, --gpu-mem on CUDA), if any.
    offload_budget: Option<u64>,
    seed: u64,
}

/// Loads the model on `backend` and generates (`threads`: CPU compute threads, for stats).
fn run_on<B: OffloadBackend>(job: RunJob<'_>, backend: B, threads: usize) -> Result<()> {
    let RunJob {
        args,
        sampling,
        sparsity_args,
        sirius,
        offload_budget,
        seed,
    } = job;
    let prompt = read_prompt(args)?;
    let dir = model_dir_or_fetch(&args.model, !args.no_fetch)?;
    let loaded = std::time::Instant::now();
    let mut model = Llama::load(&dir, backend)?;
    tracing::info!(dir = %dir.display(), backend = %model.backend_description(), dtype = %model.dtype,
        weight_bytes = model.weight_bytes(), seconds = loaded.elapsed().as_secs_f64(), "model loaded");
    if let Some(ctx) = args
        .ctx_size
        .filter(|&c| c > model.config.max_position_embeddings)
    {
        return Err(Error::InvalidArgument(format!(
            "--ctx-size {ctx} is larger than the model's max_position_embeddings ({})",
            model.config.max_position_embeddings
        )));
    }
    // Offloading keeps its own host copy of the FFN (bundles) and builds the sparse set itself.
    let sparsity = match offload_budget {
        Some(_) => crate::sparsity::Sparsity::None,
        None => sparsity_args.build(&model)?,
    };
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(Error::Tokenizer {
            path: dir.join("tokenizer.json"),
            msg: format!(
                "{} tokens, more than the model's vocab_size {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            ),
        });
    }
    let prompt_ids = if args.chat {
        let cfg_path = dir.join("tokenizer_config.json");
        let template = ChatTemplate::from_tokenizer_config(&cfg_path)?.ok_or_else(|| {
            Error::config(
                &cfg_path,
                "the model has no chat_template: run without --chat",
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt,
        });
        let text = template.render(&messages)?;
        tracing::debug!(%text, "rendered chat prompt");
        // The template writes any BOS itself.
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&prompt, true)?
    };
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_token_ids: stop_token_ids(&dir, &model.config.eos_token_ids)?,
        stop_strings: args.stop.clone(),
        context: args
            .ctx_size
            .unwrap_or(model.config.max_position_embeddings),
        prefill_chunk: 256,
        show_progress: !args.quiet,
    };
    tracing::info!(prompt_tokens = prompt_ids.len(), stop_ids = ?opts.stop_token_ids, context = opts.context, seed, "generating");
    let mut stdout = std::io::stdout().lock();
    let mut write_error: Option<std::io::Error> = None;
    let mut write_piece = |piece: &str| {
        // A reader that went away (`| head`) or a full disk stops generation: no point
        // computing text nobody receives.
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    };
    let output = if let Some(budget) = offload_budget {
        let default_mem_gbps = match args.device {
            Device::Cpu => CPU_MEM_GBPS,
            Device::Cuda(_) => GPU_MEM_GBPS,
        };
        // On a GPU the link is real: --link-gbps is what the planner assumes of it.
        let (link_gbps, planner_link_gbps) = match args.device {
            Device::Cpu => (args.link_gbps, None),
            Device::Cuda(_) => (None, args.link_gbps),
        };
        let offload = OffloadOptions {
            budget,
            link_gbps,
            planner_link_gbps,
            mem_gbps: args.mem_gbps.unwrap_or(default_mem_gbps),
            keep: args.keep,
            period: args.period,
            context: 0,
            gemm_rows: 0,
            prompt_tokens: 0,
            trace: args.trace.is_some(),
            delay: None,
        };
        generate_sirius_offloaded(
            &mut model,
            &tokenizer,
            &prompt_ids,
            &opts,
            sirius,
            offload,
            args.trace.as_deref(),
            &mut write_piece,
        )?
    } else if args.sirius {
        generate_sirius(
            &model,
            &sparsity,
            &tokenizer,
            &prompt_ids,
            &opts,
            sirius,
            &mut write_piece,
        )?
    } else {
        generate(
            &model,
            &sparsity,
            &tokenizer,
            &prompt_ids,
            &opts,
            &mut write_piece,
        )?
    };
    if let Some(e) = write_error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(Error::Write {
            path: "standard output".into(),
            source: e,
        });
    }
    if !output.text.is_empty() {
        let _ = writeln!(stdout);
        let _ = stdout.flush();
    }
    if !args.quiet {
        let rate = |r: f64, n: usize| {
            if n > 0 && r > 0.0 {
                format!("{r:.1} tok/s")
            } else {
                "n/a".to_string()
            }
        };
        let sparse = match output.sparsity.sparsity {
            crate::sparsity::SparsityMode::None => String::new(),
            mode => format!(
                " | {mode} keep {} density {:.3}",
                output.sparsity.keep, output.sparsity.density
            ),
        };
        // A closed stderr must not turn into a panic either.
        let _ = writeln!(
            std::io::stderr(),
            "[{}] prompt {} tok, {} | generated {} tok, {}{sparse} | stop: {}",
            model.backend_description(),
            output.prompt_tokens,
            rate(output.prefill_tokens_per_s, output.prompt_tokens),
            output.generated_tokens,
            rate(
                output.decode_tokens_per_s,
                output.generated_tokens.saturating_sub(1)
            ),
            output.stop_reason
        );
        if let Some(o) = &output.offload {
            let _ = writeln!(std::io::stderr(), "{}", o.summary(model.config.num_layers));
        }
    }
    if let Some(path) = &args.stats_json {
        let stats = RunStats {
            model: dir.display().to_string(),
            backend: model.backend_description(),
            dtype: model.dtype.to_string(),
            threads,
            output: &output,
        };
        write_json(path, &stats)?;
    }
    Ok(())
}

/// What `--device` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N, got {s:?}")),
    }
}

/// Why `--device cuda` cannot run in this build.
#[cfg(not(feature = "cuda"))]
fn cuda_unavailable(_ordinal: usize) -> Error {
    Error::Cuda(
        "this binary was built without CUDA support: rebuild with `cargo build --release \
         --features cuda`, or run with --device cpu"
            .into(),
    )
}

/// The offloading budget: `--resident-mem` on the CPU, `--gpu-mem` on CUDA, each refused on
/// the other device with the option to use instead; options that only mean something for an
/// offloaded run are refused without one.
fn offload_budget(args: &RunArgs) -> Result<Option<u64>> {
    let (option, size) =
        match (&args.resident_mem, &args.gpu_mem, args.device) {
            (Some(_), Some(_), _) => {
                return Err(Error::InvalidArgument(
                    "give one offloading budget: --resident-mem (CPU) or --gpu-mem (CUDA)".into(),
                ))
            }
            (Some(_), None, Device::Cuda(_)) => return Err(Error::InvalidArgument(
                "--resident-mem emulates offloading on the CPU and runs with --device cpu only: \
                 on --device cuda give the GPU memory budget as --gpu-mem SIZE"
                    .into(),
            )),
            (None, Some(_), Device::Cpu) => return Err(Error::InvalidArgument(
                "--gpu-mem is the GPU memory budget of an offloaded run on --device cuda: on the \
                 CPU emulate a budget with --resident-mem SIZE"
                    .into(),
            )),
            (Some(size), None, Device::Cpu) => ("--resident-mem", size),
            (None, Some(size), Device::Cuda(_)) => ("--gpu-mem", size),
            (None, None, _) => {
                let needs = [
                    ("--trace", args.trace.is_some()),
                    ("--link-gbps", args.link_gbps.is_some()),
                    ("--mem-gbps", args.mem_gbps.is_some()),
                ];
                if let Some((name, _)) = needs.iter().find(|(_, given)| *given) {
                    return Err(Error::InvalidArgument(format!(
                        "{name} describes an offloaded run: add --resident-mem SIZE (CPU) or \
                     --gpu-mem SIZE (--device cuda), with --sirius --sparsity griffin"
                    )));
                }
                return Ok(None);
            }
        };
    check_offload_args(args, option, parse_size(size)?).map(Some)
}

/// `--resident-mem` / `--gpu-mem` run the offloading runtime, which executes Griffin +
/// Sirius plans.
fn check_offload_args(args: &RunArgs, option: &str, budget: u64) -> Result<u64> {
    if !args.sirius || args.sparsity != SparsityMode::Griffin || args.cats_thresholds.is_some() {
        return Err(Error::InvalidArgument(format!(
            "{option} offloads a Sirius run with Griffin sparsity: add --sirius --sparsity griffin --temperature 0"
        )));
    }
    use crate::offload::placement::{MAX_GBPS, MIN_GBPS};
    for (name, v) in [
        ("--link-gbps", args.link_gbps),
        ("--mem-gbps", args.mem_gbps),
    ] {
        if let Some(v) = v.filter(|v| !(v.is_finite() && (MIN_GBPS..=MAX_GBPS).contains(v))) {
            return Err(Error::InvalidArgument(format!(
                "{name} must be between {MIN_GBPS} and {MAX_GBPS} GB/s, got {v}"
            )));
        }
    }
    Ok(budget)
}

/// The prompt from --prompt or --prompt-file ("-" = standard input).
fn read_prompt(args: &RunArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| Error::io("standard input", e))?;
            Ok(text)
        }
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e)),
        (None, None) => Err(Error::InvalidArgument(
            "give --prompt or --prompt-file".into(),
        )),
    }
}
