//! `sirius-offload run`: generate text from a prompt and stream it to stdout.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::cli::engine_setup::{EngineSetup, OnDevice};
use crate::cli::output::{check_output_dir, write_json};
use crate::cli::run_args::{PromptArgs, RunArgs};
use crate::cli::wording::word_offload_error;
use crate::engine::{ChatPrompt, Engine, GenerationOutput, RequestOptions};
use crate::error::{Error, Result};
use crate::model::SamplingParams;
use crate::sparsity::SparsityMode;

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
pub(crate) struct RunJob<'a> {
    pub args: &'a RunArgs,
    pub setup: EngineSetup<'a>,
    pub sampling: SamplingParams,
    seed: u64,
}

pub fn run(args: &RunArgs) -> Result<()> {
    // Option errors first: they should not wait for a model load.
    let job = RunJob::new(args)?;
    job.setup.on_device(&job)
}

impl OnDevice for &RunJob<'_> {
    type Output = ();
    fn run<B: OffloadBackend>(self, backend: B, threads: usize) -> Result<()> {
        run_on(self, backend, threads)
    }
}

impl<'a> RunJob<'a> {
    fn new(args: &'a RunArgs) -> Result<Self> {
        let setup = EngineSetup::new(&args.engine, args.sampling.temperature)?;
        let s = &args.sampling;
        let seed = s.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let sampling = SamplingParams {
            temperature: setup.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed,
        };
        sampling.validate()?;
        check_output_dir("--stats-json", args.stats_json.as_deref())?;
        check_output_dir("--trace", args.engine.offload.trace.as_deref())?;
        if s.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument(
                "--stop needs a non-empty text".into(),
            ));
        }
        Ok(RunJob {
            args,
            setup,
            sampling,
            seed,
        })
    }

    /// The options of one request of this run.
    pub fn request_options(&self) -> RequestOptions {
        RequestOptions {
            max_tokens: self.args.sampling.max_tokens,
            sampling: self.sampling,
            stop_strings: self.args.sampling.stop.clone(),
            stop_at_eos: true,
            context: self.args.engine.ctx_size,
            prefill_chunk: self.args.engine.prefill_chunk,
            show_progress: !self.args.quiet,
        }
    }
}

/// Loads the model on `backend` and generates (`threads`: CPU compute threads, for stats):
/// from the prompt given, or read from a pipe, or in a chat on a terminal.
fn run_on<B: OffloadBackend>(job: &RunJob<'_>, backend: B, threads: usize) -> Result<()> {
    let args = job.args;
    let prompt = match read_prompt(&args.prompt)? {
        Some(prompt) => prompt,
        None => {
            let engine = job.setup.load(backend)?;
            return crate::cli::chat::chat(engine, job);
        }
    };
    let mut engine = job.setup.load(backend)?;
    let chat = (args.prompt.chat).then(|| ChatPrompt {
        system: args.prompt.system.clone(),
    });
    let prompt_ids = engine.encode(&prompt, chat.as_ref())?;
    let opts = job.request_options();
    tracing::info!(prompt_tokens = prompt_ids.len(), stop_ids = ?engine.stop_ids, context = ?opts.context, seed = job.seed, "generating");
    let interrupted = stop_on_ctrl_c();
    let (output, write_error) =
        generate_to_stdout(&mut engine, &prompt_ids, &opts, job, &interrupted)?;
    // The trace and the stats are written however the text stopped: a closed pipe, Ctrl-C
    // and the token budget alike.
    if let (Some(path), Some(trace)) = (
        &args.engine.offload.trace,
        engine.offload_runtime().and_then(|r| r.trace()),
    ) {
        trace.write_chrome_json(path)?;
    }
    let backend = engine.model.backend_description();
    if !args.quiet {
        print_summary(&backend, &output, engine.model.config.num_layers);
    }
    if let Some(path) = &args.stats_json {
        let stats = RunStats {
            model: engine.path.display().to_string(),
            backend,
            dtype: engine.model.dtype.to_string(),
            threads,
            output: &output,
        };
        write_json(path, &stats)?;
    }
    match write_error {
        // The reader went away (`| head`): the user stopped reading, no error.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(e) => Err(Error::Write {
            path: "standard output".into(),
            source: e,
        }),
        // The shell's code for a program ended by Ctrl-C.
        None if interrupted.load(Ordering::SeqCst) => std::process::exit(130),
        None => Ok(()),
    }
}

/// A flag Ctrl-C raises: generation stops at the next token, and the run ends as usual (its
/// stats written). A second Ctrl-C ends the program at once.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let raised = Arc::clone(&flag);
    let set = ctrlc::set_handler(move || {
        if raised.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    if let Err(e) = set {
        tracing::warn!("Ctrl-C will end the run without its stats: {e}");
    }
    flag
}

/// Generates, streaming the text to stdout, until the request ends or the text cannot be
/// delivered: the output, and the error that stopped the writing (a reader that went away,
/// a full disk), if one did.
fn generate_to_stdout<B: OffloadBackend>(
    engine: &mut Engine<B>,
    prompt_ids: &[u32],
    opts: &RequestOptions,
    job: &RunJob<'_>,
    interrupted: &AtomicBool,
) -> Result<(GenerationOutput, Option<std::io::Error>)> {
    let mut stdout = std::io::stdout().lock();
    let mut write_error: Option<std::io::Error> = None;
    let mut write_piece = |piece: &str| {
        if interrupted.load(Ordering::SeqCst) {
            return false;
        }
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
    let budget_option = job.setup.offload.as_ref().map(|(_, option)| *option);
    let output = engine
        .generate(prompt_ids, opts, job.setup.decoding, &mut write_piece)
        .map_err(|e| word_offload_error(e, budget_option))?;
    if write_error.is_none() && !output.text.is_empty() {
        let _ = writeln!(stdout);
        let _ = stdout.flush();
    }
    Ok((output, write_error))
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

/// The prompt from --prompt or --prompt-file ("-" = standard input), or from standard input
/// when it is not a terminal; `None` on a terminal without either (a chat).
fn read_prompt(args: &PromptArgs) -> Result<Option<String>> {
    let piped = !std::io::IsTerminal::is_terminal(&std::io::stdin());
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Ok(Some(p.clone())),
        (None, Some(path)) if path.as_os_str() == "-" => read_stdin().map(Some),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| Error::io(path, e)),
        (None, None) if piped => {
            let mut text = read_stdin()?;
            // `echo text |` ends the prompt with a newline the user did not mean to prompt.
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            if text.trim().is_empty() {
                return Err(Error::InvalidArgument(
                    "the prompt read from standard input is empty: give --prompt, or pipe text in"
                        .into(),
                ));
            }
            Ok(Some(text))
        }
        (None, None) => Ok(None),
    }
}

fn read_stdin() -> Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| Error::io("standard input", e))?;
    Ok(text)
}
