//! `sirius-offload run`: generate text from a prompt and stream it to stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::backend::CpuBackend;
use crate::config::generation::stop_token_ids;
use crate::cli::fetch::model_dir_or_fetch;
use crate::engine::{generate, GenerateOptions, GenerationOutput};
use crate::error::{Error, Result};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::{Llama, SamplingParams, Tokenizer};

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Model directory (HF layout) or preset name (see configs/models), e.g. smollm2-135m.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Don't fetch a preset's weights automatically when they are missing.
    #[arg(long)]
    pub no_fetch: bool,
    /// Prompt text, taken raw: special tokens written in it (<|im_start|>) are recognised.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Random seed; the same seed, prompt and options give the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Compute threads (0 = one per core).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
    /// Context length cap in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub ctx_size: Option<usize>,
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
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    // Option errors first: they should not wait for a model load.
    let sampling = SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed };
    sampling.validate()?;
    if args.ctx_size == Some(0) {
        return Err(Error::InvalidArgument("--ctx-size must be positive".into()));
    }
    if let Some(parent) = args.stats_json.as_deref().and_then(|p| p.parent()).filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "--stats-json: directory {} does not exist",
                parent.display()
            )));
        }
    }
    let dir = model_dir_or_fetch(&args.model, !args.no_fetch)?;
    let backend = CpuBackend::new(args.threads);
    let threads = backend.threads();
    tracing::info!(dir = %dir.display(), "loading model");
    let model = Llama::load(&dir, backend)?;
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
            Error::config(&cfg_path, "the model has no chat_template: run without --chat")
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage { role: "system".into(), content: system.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: args.prompt.clone() });
        let text = template.render(&messages)?;
        tracing::debug!(%text, "rendered chat prompt");
        // The template writes any BOS itself.
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_token_ids: stop_token_ids(&dir, &model.config.eos_token_ids)?,
        stop_strings: args.stop.clone(),
        context: args.ctx_size.unwrap_or(model.config.max_position_embeddings),
        prefill_chunk: 256,
    };
    let mut stdout = std::io::stdout().lock();
    let output = generate(&model, &tokenizer, &prompt_ids, &opts, &mut |piece| {
        // A closed pipe (e.g. `| head`) must not abort generation with a panic.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    if !args.quiet {
        eprintln!(
            "[{}] prompt {} tok, {:.1} tok/s | generated {} tok, {:.1} tok/s | stop: {:?}",
            model.backend_description(),
            output.prompt_tokens,
            output.prefill_tokens_per_s,
            output.generated_tokens,
            output.decode_tokens_per_s,
            output.stop_reason
        );
    }
    if let Some(path) = &args.stats_json {
        let stats = RunStats {
            model: dir.display().to_string(),
            backend: model.backend_description(),
            dtype: model.dtype.to_string(),
            threads,
            output: &output,
        };
        let json = serde_json::to_string_pretty(&stats).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
