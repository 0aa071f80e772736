//! The options of `sirius-offload run`, in groups.

use std::path::PathBuf;

use clap::Args;

use crate::cli::args::{ModelArgs, SiriusArgs, SparsityArgs};
use crate::engine::prefill::DEFAULT_PREFILL_CHUNK;
use crate::engine::PrefillChunk;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Write run statistics as one JSON object to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Don't print the timing summary on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// What an engine is loaded with (`run` and `serve`): the model, where it computes, its
/// sparsity, Sirius, and an offloading budget.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to compute: cpu, or cuda / cuda:N for GPU N (needs a build with `--features
    /// cuda`; weights, KV cache and activations then live in GPU memory, or within --gpu-mem;
    /// not yet verified on a GPU, see README "GPU") [default: cpu; cuda with --gpu-mem].
    #[arg(long, value_parser = parse_device)]
    pub device: Option<Device>,
    /// Context length cap in tokens (default: the model's max_position_embeddings).
    #[arg(long)]
    pub ctx_size: Option<usize>,
    /// Prompt tokens per prefill pass: a number, or auto (256; an offloaded run takes
    /// longer passes where its budget pays for them in fewer streamed bytes, as `plan`
    /// shows). Longer passes use more activation memory.
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_prefill_chunk)]
    pub prefill_chunk: PrefillChunk,
    #[command(flatten)]
    pub sparsity: SparsityArgs,
    /// Sirius correction: the sparse model drafts, the full model verifies every --period
    /// tokens in one pass and corrects the first unlikely token (greedy). On by default for
    /// an offloaded run with Griffin (--resident-mem / --gpu-mem without --sparsity none).
    #[arg(long)]
    pub sirius: bool,
    #[command(flatten)]
    pub corrector: SiriusArgs,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// Prompt text, taken raw: special tokens written in it (<|im_start|>) are recognised.
    /// Without --prompt or --prompt-file: on a terminal, an interactive chat; otherwise the
    /// prompt is read from standard input.
    #[arg(
        long,
        short = 'p',
        allow_hyphen_values = true,
        conflicts_with = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file ("-" = standard input), for prompts too long for a command line.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat, and in the interactive chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy [default: 0.7; 0 with Sirius or offloading, which
    /// decode greedily].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
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
}

#[derive(Debug, Clone, Args)]
pub struct OffloadArgs {
    /// Offloading on CPU: keep only this much memory resident (e.g. 161MB, 1.5G) for weights,
    /// KV cache and buffers, placed as `sirius-offload plan` decides; the rest stays in host
    /// memory and is streamed: the FFN complement when the full model runs (prompt,
    /// verification), plus whatever of the sparse model did not fit on every pass. Runs
    /// Sirius with Griffin by default (--sparsity none: the dense model, one full pass per
    /// token). Greedy only (temperature 0, the default here). Emulates a GPU budget to test the schedule;
    /// tokens equal an unconstrained run's up to rounding (the split FFN sums in another
    /// order).
    #[arg(long, value_name = "SIZE")]
    pub resident_mem: Option<String>,
    /// Offloading on a GPU (implies --device cuda): keep weights, KV cache and buffers within
    /// this much GPU memory (e.g. 24G), placed as `sirius-offload plan --gpu-mem` decides;
    /// the rest stays in host memory and is streamed over PCIe as with --resident-mem
    /// (Sirius with Griffin by default, the dense model with --sparsity none). The budget
    /// holds everything the run uses on the GPU, the driver's context included; `auto`
    /// takes the GPU's free memory.
    #[arg(long, value_name = "SIZE|auto")]
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
    /// Arithmetic throughput (GFLOP/s) the planner assumes for compute when it predicts
    /// ms/token (as `plan --compute-gflops`; default: passes bound by memory alone). On a
    /// CPU, where a verification window's arithmetic grows with K, measure it with `cargo
    /// bench --bench verify_window -- --model M --ctx 128 --n 4,16` (its GFLOP/s column, at
    /// the larger n: a short pass may still be bound by memory). With --resident-mem it
    /// needs --link-gbps (uncapped CPU runs make no prediction).
    #[arg(long, value_name = "GFLOP/s")]
    pub compute_gflops: Option<f64>,
    /// Write a Chrome trace (open in Perfetto) of copy and compute spans per layer
    /// (with --resident-mem or --gpu-mem; on a GPU the spans are host-side: when copies and
    /// kernels were issued).
    #[arg(long, value_name = "PATH")]
    pub trace: Option<PathBuf>,
}

/// The offloading budget option given for `device`: `--resident-mem` on the CPU,
/// `--gpu-mem` on CUDA, `None` without either; both, or one on the other device, is refused
/// with the option to use instead.
pub fn budget_option(device: Device, resident: bool, gpu: bool) -> Result<Option<&'static str>> {
    let refuse = |why: &str| Err(Error::InvalidArgument(why.into()));
    match (resident, gpu, device) {
        (true, true, _) => {
            refuse("give one offloading budget: --resident-mem (CPU) or --gpu-mem (CUDA)")
        }
        (true, false, Device::Cuda(_)) => refuse(
            "--resident-mem emulates offloading on the CPU and runs with --device cpu only: on \
             --device cuda give the GPU memory budget as --gpu-mem SIZE",
        ),
        (false, true, Device::Cpu) => refuse(
            "--gpu-mem is the GPU memory budget of an offloaded run on --device cuda: on the \
             CPU emulate a budget with --resident-mem SIZE",
        ),
        (true, false, Device::Cpu) => Ok(Some("--resident-mem")),
        (false, true, Device::Cuda(_)) => Ok(Some("--gpu-mem")),
        (false, false, _) => Ok(None),
    }
}

/// The error of `--device cuda` in a build without CUDA, for `command` (run, bench).
#[cfg(not(feature = "cuda"))]
pub fn built_without_cuda(command: &str) -> Error {
    Error::Cuda(format!(
        "this binary was built without CUDA support: rebuild with `cargo build --release \
         --features cuda`, or {command} with --device cpu"
    ))
}

/// What `--device` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// `auto` (the default 256, grown by an offloaded run's budget) or a positive count.
pub(crate) fn parse_prefill_chunk(s: &str) -> std::result::Result<PrefillChunk, String> {
    match s {
        "auto" => Ok(PrefillChunk::Grow(DEFAULT_PREFILL_CHUNK)),
        _ => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(PrefillChunk::Fixed(n)),
            _ => Err(format!("expected auto or a token count above 0, got {s:?}")),
        },
    }
}

pub(crate) fn parse_device(s: &str) -> std::result::Result<Device, String> {
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
