//! `sirius-offload run`: generate text from a prompt and stream it to stdout.

use std::io::Write;

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::backend::CpuBackend;
use crate::cli::args::check_gbps;
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::output::{check_output_dir, write_json};
use crate::cli::run_args::{budget_option, Device, PromptArgs, RunArgs};
use crate::cli::wording::word_offload_error;
use crate::engine::{ChatPrompt, Decoding, Engine, EngineConfig, GenerationOutput, RequestOptions};
use crate::error::{Error, Result};
use crate::model::ModelFiles;
use crate::model::SamplingParams;
use crate::offload::runtime::OffloadConfig;
use crate::sparsity::{SparsityConfig, SparsityMode};
use crate::units::parse_size;

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

/// What `run` checked and computed before a backend exists: the options as typed
/// configurations.
struct RunJob<'a> {
    args: &'a RunArgs,
    sampling: SamplingParams,
    sparsity: SparsityConfig,
    decoding: Decoding,
    /// The offloading budget (--resident-mem on CPU, --gpu-mem on CUDA) and its option.
    offload: Option<(OffloadConfig, &'static str)>,
    seed: u64,
}

pub fn run(args: &RunArgs) -> Result<()> {
    // Option errors first: they should not wait for a model load.
    let job = RunJob::new(args)?;
    match args.device {
        Device::Cpu => {
            let backend = CpuBackend::new(args.model.threads()?);
            let threads = backend.threads();
            run_on(&job, backend, threads)
        }
        // The device comes first (before the prompt and the model): a machine without a
        // usable GPU fails at once with the probe's one-line reason.
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let mut backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
            if job.offload.is_some() {
                // Only what the plan keeps resident goes to the GPU.
                backend = backend.with_host_weights();
            }
            // No CPU compute threads: every op runs on the GPU.
            run_on(&job, backend, 0)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(crate::cli::run_args::built_without_cuda("run")),
    }
}

impl<'a> RunJob<'a> {
    fn new(args: &'a RunArgs) -> Result<Self> {
        let s = &args.sampling;
        let seed = s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let sampling = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed,
        };
        sampling.validate()?;
        if args.ctx_size == Some(0) {
            return Err(Error::InvalidArgument("--ctx-size must be positive".into()));
        }
        check_output_dir("--stats-json", args.stats_json.as_deref())?;
        let sparsity = args.sparsity.config()?;
        let decoding = match (args.sirius, args.corrector.first_given()) {
            (true, _) => {
                let config = args.corrector.config()?;
                crate::engine::sirius::check_greedy(s.temperature)?;
                Decoding::Sirius(config)
            }
            (false, Some(option)) => {
                return Err(Error::InvalidArgument(format!(
                    "{option} sets up Sirius correction: add --sirius"
                )))
            }
            (false, None) if sparsity.mode == SparsityMode::None => Decoding::Dense,
            (false, None) => Decoding::Sparse,
        };
        let offload = offload_config(args)?;
        check_output_dir("--trace", args.offload.trace.as_deref())?;
        if s.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument(
                "--stop needs a non-empty text".into(),
            ));
        }
        Ok(RunJob {
            args,
            sampling,
            sparsity,
            decoding,
            offload,
            seed,
        })
    }
}

/// Loads the model on `backend` and generates (`threads`: CPU compute threads, for stats).
fn run_on<B: OffloadBackend>(job: &RunJob<'_>, backend: B, threads: usize) -> Result<()> {
    let args = job.args;
    let prompt = read_prompt(&args.prompt)?;
    let dir = model_dir_or_fetch(&args.model.model, !args.model.no_fetch)?;
    let config = EngineConfig {
        sparsity: job.sparsity.clone(),
        offload: job.offload.as_ref().map(|(o, _)| o.clone()),
        weights: args.model.weights(),
        kv_dtype: args.model.kv_dtype,
    };
    // Checked against the model's config before the (long) load.
    let max_pos = ModelFiles::read_config(&dir)?.max_position_embeddings;
    if let Some(ctx) = args.ctx_size.filter(|&c| c > max_pos) {
        return Err(Error::InvalidArgument(format!(
            "--ctx-size {ctx} is larger than the model's max_position_embeddings ({max_pos})"
        )));
    }
    let mut engine = Engine::load(&dir, backend, &config)?;
    let chat = (args.prompt.chat).then(|| ChatPrompt {
        system: args.prompt.system.clone(),
    });
    let prompt_ids = engine.encode(&prompt, chat.as_ref())?;
    let opts = RequestOptions {
        max_tokens: args.sampling.max_tokens,
        sampling: job.sampling,
        stop_strings: args.sampling.stop.clone(),
        stop_at_eos: true,
        context: args.ctx_size,
        prefill_chunk: crate::engine::prefill::DEFAULT_PREFILL_CHUNK,
        show_progress: !args.quiet,
    };
    tracing::info!(prompt_tokens = prompt_ids.len(), stop_ids = ?engine.stop_ids, context = ?opts.context, seed = job.seed, "generating");
    let Some(output) = generate_to_stdout(&mut engine, &prompt_ids, &opts, job)? else {
        // The reader went away (`| head`): nothing more to say.
        return Ok(());
    };
    let backend = engine.model.backend_description();
    if !args.quiet {
        print_summary(&backend, &output, engine.model.config.num_layers);
    }
    if let Some(path) = &args.stats_json {
        let stats = RunStats {
            model: dir.display().to_string(),
            backend,
            dtype: engine.model.dtype.to_string(),
            threads,
            output: &output,
        };
        write_json(path, &stats)?;
    }
    Ok(())
}

/// Generates, streaming the text to stdout; writes the trace of an offloaded run. `None`
/// when stdout's reader went away (a broken pipe is no error: the user stopped reading).
fn generate_to_stdout<B: OffloadBackend>(
    engine: &mut Engine<B>,
    prompt_ids: &[u32],
    opts: &RequestOptions,
    job: &RunJob<'_>,
) -> Result<Option<GenerationOutput>> {
    let mut stdout = std::io::stdout().lock();
    let mut write_error: Option<std::io::Error> = None;
    let mut write_piece = |piece: &str| {
        // A reader that went away or a full disk stops generation: no point computing text
        // nobody receives.
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
    let budget_option = job.offload.as_ref().map(|(_, option)| *option);
    let output = engine
        .generate(prompt_ids, opts, job.decoding, &mut write_piece)
        .map_err(|e| word_offload_error(e, budget_option))?;
    if let (Some(path), Some(trace)) = (
        &job.args.offload.trace,
        engine.offload_runtime().and_then(|r| r.trace()),
    ) {
        trace.write_chrome_json(path)?;
    }
    match write_error {
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(None),
        Some(e) => {
            return Err(Error::Write {
                path: "standard output".into(),
                source: e,
            })
        }
        None => {}
    }
    if !output.text.is_empty() {
        let _ = writeln!(stdout);
        let _ = stdout.flush();
    }
    Ok(Some(output))
}

/// The one-line timing summary on stderr (and the offloading line of an offloaded run).
fn print_summary(backend: &str, output: &GenerationOutput, layers: usize) {
    let rate = |r: f64, n: usize| {
        if n > 0 && r > 0.0 {
            format!("{r:.1} tok/s")
        } else {
            "n/a".to_string()
        }
    };
    let sparse = match output.sparsity.sparsity {
        SparsityMode::None => String::new(),
        mode => format!(
            " | {mode} keep {} density {:.3}",
            output.sparsity.keep, output.sparsity.density
        ),
    };
    let sirius = match &output.sirius {
        Some(r) if r.adaptive => format!(
            " | Sirius K auto (<= {}, mean {:.1}) AAL {:.2}",
            r.period, r.mean_period, r.aal
        ),
        Some(r) => format!(" | Sirius K {} AAL {:.2}", r.period, r.aal),
        None => String::new(),
    };
    // A closed stderr must not turn into a panic either.
    let _ = writeln!(
        std::io::stderr(),
        "[{backend}] prompt {} tok, {} | generated {} tok, {}{sparse}{sirius} | stop: {}",
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
        let _ = writeln!(std::io::stderr(), "{}", o.summary(layers));
    }
}

/// The offloading configuration: `--resident-mem` on the CPU, `--gpu-mem` on CUDA, each
/// refused on the other device with the option to use instead; options that only mean
/// something for an offloaded run are refused without one.
fn offload_config(args: &RunArgs) -> Result<Option<(OffloadConfig, &'static str)>> {
    let o = &args.offload;
    let option = budget_option(args.device, o.resident_mem.is_some(), o.gpu_mem.is_some())?;
    let (Some(option), Some(size)) = (option, o.resident_mem.as_ref().or(o.gpu_mem.as_ref()))
    else {
        let needs = [
            ("--trace", o.trace.is_some()),
            ("--link-gbps", o.link_gbps.is_some()),
            ("--mem-gbps", o.mem_gbps.is_some()),
            ("--compute-gflops", o.compute_gflops.is_some()),
        ];
        if let Some((name, _)) = needs.iter().find(|(_, given)| *given) {
            return Err(Error::InvalidArgument(format!(
                "{name} describes an offloaded run: add --resident-mem SIZE (CPU) or \
                 --gpu-mem SIZE (--device cuda), with --sirius --sparsity griffin"
            )));
        }
        return Ok(None);
    };
    let budget = parse_size(size)?;
    let s = &args.sparsity;
    // The dense model offloaded (every token a full pass), or Sirius drafting with Griffin.
    let dense = !args.sirius && s.sparsity == SparsityMode::None;
    if !dense
        && (!args.sirius || s.sparsity != SparsityMode::Griffin || s.cats_thresholds.is_some())
    {
        return Err(Error::InvalidArgument(format!(
            "{option} offloads a Sirius run with Griffin sparsity (add --sirius --sparsity \
             griffin --temperature 0) or the dense model (no --sirius, no --sparsity)"
        )));
    }
    if args.sampling.temperature != 0.0 {
        return Err(Error::InvalidArgument(format!(
            "{option}: an offloaded run decodes greedily for now: add --temperature 0"
        )));
    }
    check_gbps("--link-gbps", o.link_gbps)?;
    check_gbps("--mem-gbps", o.mem_gbps)?;
    check_gbps("--compute-gflops", o.compute_gflops)?;
    if option == "--resident-mem" && o.link_gbps.is_none() {
        for (name, given) in [
            ("--mem-gbps", o.mem_gbps),
            ("--compute-gflops", o.compute_gflops),
        ] {
            if given.is_some() {
                tracing::warn!("{name} shapes the planner's prediction, which an uncapped CPU run does not make (its copies are memcpy): add --link-gbps G to predict");
            }
        }
    }
    let config = OffloadConfig {
        budget,
        link_gbps: o.link_gbps,
        mem_gbps: o.mem_gbps,
        compute_gflops: o.compute_gflops,
        trace: o.trace.is_some(),
        delay: None,
        griffin_down: s.griffin_down.dtype(),
    };
    Ok(Some((config, option)))
}

/// The prompt from --prompt or --prompt-file ("-" = standard input).
fn read_prompt(args: &PromptArgs) -> Result<String> {
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
