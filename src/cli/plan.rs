//! `sirius-offload plan`: what stays resident within a memory budget, what is streamed, and the
//! predicted speed of full decoding, the Sirius paper's offloading and ours, side by side.
//! Needs only the model's shapes (a preset or a config.json), no weights.

use std::fmt::Write as _;
use std::path::Path;

use clap::Args;
use serde::Serialize;

use crate::cli::args::GriffinDownArg;
use crate::cli::eval_args::ReportFormat;
use crate::cli::output::print_stdout;
use crate::cli::run_args::parse_prefill_chunk;
use crate::cli::wording::word_plan_error;
use crate::config::{resolve_model_dir, ModelConfig, Preset};
use crate::engine::offloaded::request_shape_for;
use crate::engine::PrefillChunk;
use crate::error::{Error, Result};
use crate::model::ModelFiles;
use crate::offload::budget::gpu_scratch_bytes;
use crate::offload::cost::WayCost;
use crate::offload::format::WeightFormat;
use crate::offload::placement::{
    self, Every, HostFootprint, LayerFormats, Plan, PlanInput, Residence,
};
use crate::offload::prefill::prefill_chunk;
use crate::offload::runtime::{
    request_plan_input, scratch_shape, OffloadConfig, PlanFormats, PlanTarget,
};
use crate::sirius::SiriusConfig;
use crate::tensor::KvDType;
use crate::units::{format_bytes, parse_size};

/// The planner's input fields and the options that set them.
const PLAN_FIELDS: &[(&str, &str)] = &[
    ("keep", "--keep"),
    ("context", "--context"),
    ("link_gbps", "--link-gbps"),
    ("mem_gbps", "--mem-gbps"),
    ("compute_gflops", "--compute-gflops"),
    ("period", "--period"),
    ("aal", "--aal"),
    ("prompt_tokens", "--prompt-tokens"),
    ("kv_bytes", "the KV cache's element size"),
];

/// The paper's AAL on GSM8K with K = 16 (Llama-3-8B-Instruct, Griffin), as a fraction of K.
const PAPER_AAL_FRACTION: f64 = 15.22 / 16.0;

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Preset name (e.g. llama-3-70b; weights not needed) or a model directory with config.json.
    #[arg(long, short = 'm')]
    pub model: String,
    /// GPU memory budget, e.g. 24G (= 24 GiB), 24GB (= 24e9 bytes), 512M.
    #[arg(
        long,
        required_unless_present = "resident_mem",
        conflicts_with = "resident_mem"
    )]
    pub gpu_mem: Option<String>,
    /// Plan for the CPU runtime instead: resident memory budget.
    #[arg(long)]
    pub resident_mem: Option<String>,
    /// Weight format of the matrices, with its true bytes per block: bf16, f16, q8_0 (8.5 bits
    /// per weight), q6_k (6.56), q5_k (5.5), q4_1 (5), q4_k or q4_0 (4.5). Default: a GGUF
    /// file's own format (and its LM head's), else bf16.
    #[arg(long)]
    pub weights: Option<WeightFormat>,
    /// Quantized weights: the format of the resident compact down matrix (as `run
    /// --griffin-down`): q8_0, q4_0, bf16 or f16.
    #[arg(long, default_value = "q8_0")]
    pub griffin_down: GriffinDownArg,
    /// Griffin FFN keep fraction in (0, 1].
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub keep: f64,
    /// Sirius period K: K - 1 drafted tokens per verification.
    #[arg(long, default_value_t = 16)]
    pub period: usize,
    /// Assumed average advance length per verification (default: the paper's GSM8K
    /// 15.22/16, scaled to K).
    #[arg(long, allow_negative_numbers = true)]
    pub aal: Option<f64>,
    /// Host -> device link in GB/s (PCIe 4.0 x16 moves about 25).
    #[arg(long, default_value_t = GPU_LINK_GBPS, allow_negative_numbers = true)]
    pub link_gbps: f64,
    /// Memory bandwidth compute reads at, in GB/s (default: 1008, an RTX 4090, with
    /// --gpu-mem; 20, a few CPU cores, with --resident-mem, as `run` assumes).
    #[arg(long, allow_negative_numbers = true)]
    pub mem_gbps: Option<f64>,
    /// Arithmetic throughput of compute in GFLOP/s (two per weight per token): a pass takes
    /// the longer of reading its weights and doing its arithmetic, so a verification window
    /// of K tokens can cost up to K decode steps (what a CPU shows). Default: ignored.
    #[arg(long, allow_negative_numbers = true, value_name = "GFLOP/s")]
    pub compute_gflops: Option<f64>,
    /// KV cache rows to hold.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// How the KV cache stores keys and values (as `run --kv-dtype`): f16 or f32.
    #[arg(long, default_value = "f16")]
    pub kv_dtype: KvDType,
    /// Prompt length for the time to first token (and the prefill chunk the budget gives it).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Prompt tokens per prefill pass, as `run --prefill-chunk`: a number, or auto (the
    /// one the budget pays for).
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_prefill_chunk)]
    pub prefill_chunk: PrefillChunk,
    /// Output: a markdown report or one JSON object.
    #[arg(long, default_value = "md")]
    pub format: ReportFormat,
}

#[derive(Serialize)]
struct Predicted<T> {
    full: T,
    reference: T,
    sirius_offload: T,
}

/// The JSON report: the contract's summary fields, then the whole plan.
#[derive(Serialize)]
struct Report {
    model: String,
    /// The option the budget came from: `--gpu-mem` (a GPU's memory) or `--resident-mem`
    /// (the CPU runtime's resident set).
    budget_option: &'static str,
    format: WeightFormat,
    keep: f64,
    total_weight_bytes: u64,
    resident_bytes: u64,
    fits: bool,
    streamed_bytes_per_verification: u64,
    predicted_ms_per_token: Predicted<f64>,
    predicted_tokens_per_s: Predicted<f64>,
    ttft_ms: f64,
    /// Prompt tokens per prefill pass (the last may be shorter) and the passes for
    /// `--prompt-tokens`: what `ttft_ms` follows.
    prefill_chunk: usize,
    prefill_passes: usize,
    plan: Plan,
    /// When the requested plan does not fit: the largest format that holds the sparse set,
    /// or else the largest keep that fits in the requested format.
    alternative: Option<Box<Report>>,
}

impl Report {
    fn new(model: &str, budget_option: &'static str, plan: Plan) -> Report {
        let c = &plan.costs;
        Report {
            model: model.to_string(),
            budget_option,
            format: plan.format,
            keep: plan.keep,
            total_weight_bytes: plan.total_weight_bytes,
            resident_bytes: plan.resident_bytes,
            fits: plan.fits,
            streamed_bytes_per_verification: plan.streamed_bytes_per_verification,
            predicted_ms_per_token: Predicted {
                full: c.full.ms_per_token,
                reference: c.reference.ms_per_token,
                sirius_offload: c.sirius_offload.ms_per_token,
            },
            predicted_tokens_per_s: Predicted {
                full: c.full.tokens_per_s,
                reference: c.reference.tokens_per_s,
                sirius_offload: c.sirius_offload.tokens_per_s,
            },
            ttft_ms: c.ttft_ms,
            prefill_chunk: c.prefill_chunk,
            prefill_passes: c.prefill_passes,
            plan,
            alternative: None,
        }
    }
}

// The default link: PCIe 4.0 x16, as `run --gpu-mem` assumes.
use crate::offload::placement::GPU_LINK_GBPS;

/// The planner's input `run` would build for this request: the same activations, prefill
/// chunks (the longest the budget's spare bytes pay for, as `run` picks them) and backend
/// scratch, with the paper's AAL unless given; `change` says what an alternative plan
/// changes (its chunk is picked for it).
fn run_plan_input(
    args: &PlanArgs,
    config: &ModelConfig,
    budget: u64,
    on_gpu: bool,
    change: Change,
) -> Result<PlanInput> {
    // The default prompt (512) shrinks to a shorter --context rather than failing.
    let prompt_tokens = args.prompt_tokens.min(args.context.max(1));
    let (format, layer_formats, head_format) = formats(args)?;
    let formats = (format, layer_formats, head_format, sparse_down(args)?);
    let mut input_for = |chunk| {
        let input = chunked_plan_input(args, config, &formats, budget, on_gpu, chunk);
        Ok(change.apply(input))
    };
    let chunk = prefill_chunk(args.prefill_chunk, prompt_tokens, &mut input_for)?;
    input_for(chunk)
}

/// What an alternative plan changes in the requested one's input (nothing: the request).
#[derive(Debug, Clone, Copy, Default)]
struct Change {
    format: Option<WeightFormat>,
    sparse_down: Option<WeightFormat>,
    keep: Option<f64>,
}

impl Change {
    fn apply(&self, input: PlanInput) -> PlanInput {
        PlanInput {
            format: self.format.unwrap_or(input.format),
            sparse_down: self.sparse_down.or(input.sparse_down),
            keep: self.keep.unwrap_or(input.keep),
            ..input
        }
    }
}

/// [`run_plan_input`] for prefill chunks of `chunk` tokens.
fn chunked_plan_input(
    args: &PlanArgs,
    config: &ModelConfig,
    formats: &PlanFormats,
    budget: u64,
    on_gpu: bool,
    chunk: usize,
) -> PlanInput {
    let format = formats.0;
    let prompt_tokens = args.prompt_tokens.min(args.context.max(1));
    let sirius = SiriusConfig {
        period: args.period,
        ..SiriusConfig::default()
    };
    // The keep is checked by the planner (an f32 rounding of a bad one would hide it).
    let keep = args.keep as f32;
    let shape = request_shape_for(
        config,
        format.is_quantized(),
        prompt_tokens,
        args.context,
        chunk,
        keep,
        &sirius,
    );
    let backend_scratch = match on_gpu {
        // cuBLAS's bf16 GEMM, the CUDA backend's default.
        true => gpu_scratch_bytes(&scratch_shape(config, &shape), true),
        false => 0,
    };
    let cfg = OffloadConfig {
        mem_gbps: args.mem_gbps,
        compute_gflops: args.compute_gflops,
        ..OffloadConfig::new(budget)
    };
    let target = PlanTarget {
        on_gpu,
        link_gbps: args.link_gbps,
        backend_scratch,
        kv_bytes: args.kv_dtype.size(),
    };
    PlanInput {
        keep: args.keep,
        // A window always advances at least one token, hence the floor of 1 for tiny K.
        aal: args
            .aal
            .unwrap_or_else(|| (PAPER_AAL_FRACTION * args.period as f64).max(1.0)),
        ..request_plan_input(config, formats.clone(), &cfg, &shape, &target)
    }
}

/// The host's share: the mapped checkpoint, the bundle cache, what a GPU run pins.
fn host_line(h: &HostFootprint) -> String {
    let cache = match h.bundle_cache_bytes {
        0 => String::new(),
        b => format!(
            " + FFN bundle cache {} (a file beside the model)",
            format_bytes(b)
        ),
    };
    let pinned = match (h.pinned_bytes, h.staging_bytes) {
        (0, 0) => "nothing pinned (the CPU reads the mappings in place)".to_string(),
        (0, s) => format!(
            "nothing pinned for DMA (every layer resident), {} of pinned staging",
            format_bytes(s)
        ),
        (b, s) => format!(
            "{} pinned for DMA (what decode steps stream) and {} of pinned staging, which \
             must stay in RAM",
            format_bytes(b),
            format_bytes(s)
        ),
    };
    format!(
        "Host memory: checkpoint {} (memory-mapped){cache}; {pinned}.",
        format_bytes(h.checkpoint_bytes)
    )
}

pub fn plan(args: &PlanArgs) -> Result<()> {
    let (option, size, on_gpu) = match (&args.gpu_mem, &args.resident_mem) {
        (Some(s), _) => ("--gpu-mem", s, true),
        (None, Some(s)) => ("--resident-mem", s, false),
        (None, None) => {
            return Err(Error::InvalidArgument(
                "give a budget: --gpu-mem SIZE or --resident-mem SIZE".into(),
            ))
        }
    };
    if size.eq_ignore_ascii_case("auto") {
        return Err(Error::InvalidArgument(format!(
            "{option} auto reads a GPU's free memory when `run` starts; plan needs a size \
             (e.g. {option} 24G; nvidia-smi shows the GPU's free memory)"
        )));
    }
    let budget = parse_size(size).map_err(|e| Error::InvalidArgument(format!("{option}: {e}")))?;
    let config = model_config(&args.model)?;
    let input = run_plan_input(args, &config, budget, on_gpu, Change::default())?;
    let word = |e: Error| word_plan_error(e, option, PLAN_FIELDS);
    let first = placement::plan(&input).map_err(word)?;
    // For --resident-mem, only formats `run --weights` can make from any checkpoint: an
    // advice `run` could not follow is no advice (K-quants come only as GGUF files).
    let cpu_format = |f: WeightFormat| {
        on_gpu
            || matches!(
                f,
                WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::Q8_0 | WeightFormat::Q4_0
            )
    };
    let alternative = match (first.fits, first.advised_format, first.advised_keep) {
        (true, _, _) => None,
        (false, Some(format), _) if cpu_format(format) => Some(Change {
            format: Some(format),
            sparse_down: first.advised_sparse_down,
            keep: first.advised_format_keep,
        }),
        (false, _, Some(keep)) => Some(Change {
            keep: Some(keep),
            ..Change::default()
        }),
        (false, _, None) => None,
    };
    let mut report = Report::new(&args.model, option, first);
    if let Some(change) = alternative {
        let alt = run_plan_input(args, &config, budget, on_gpu, change)?;
        let alt = placement::plan(&alt).map_err(word)?;
        report.alternative = Some(Box::new(Report::new(&args.model, option, alt)));
    }
    match args.format {
        ReportFormat::Json => {
            let json = serde_json::to_string_pretty(&report)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            print_stdout(&(json + "\n"))
        }
        ReportFormat::Md => print_stdout(&markdown(args, option, &input, &report)),
    }
}

/// `--griffin-down` as a planner format: ignored for float `--weights` (the advice tries it
/// for quantized ones); f32 cannot be offloaded.
fn sparse_down(args: &PlanArgs) -> Result<Option<WeightFormat>> {
    match WeightFormat::of(args.griffin_down.dtype()) {
        Some(down) => Ok(Some(down)),
        None if args.weights.is_some_and(|w| w.is_quantized()) => Err(Error::InvalidArgument(
            "--griffin-down f32 cannot be offloaded: plan with q8_0, q4_0, bf16 or f16".into(),
        )),
        None => Ok(None),
    }
}

/// `--weights`, else a GGUF file's own format (each layer's where they mix, as Q4_K_M
/// files do), else bf16; and the LM head's format where the file stores it in another type
/// (SmolLM2's Q4_1 file: a Q8_0 head).
fn formats(args: &PlanArgs) -> Result<StoredFormats> {
    // A GGUF file, named or a preset's fetched one.
    let file = resolve_model_dir(&args.model).ok().filter(|p| p.is_file());
    let stored = match file {
        Some(path) => ModelFiles::stored_types(&path)?,
        None => None,
    };
    // A file whose formats the planner lacks (f32 matrices) plans as --weights or bf16.
    let stored = stored.and_then(|(layers, head)| {
        let (format, layer_formats) = LayerFormats::of_stored(&layers).ok()?;
        Some((format, layer_formats, WeightFormat::of(head)))
    });
    let format = (args.weights)
        .or(stored.as_ref().map(|(ffn, _, _)| *ffn))
        .unwrap_or(WeightFormat::Bf16);
    match stored {
        // `--weights` re-encodes every matrix (run's `Convert`): the file's mix is gone.
        Some((ffn, layers, head)) if ffn == format => {
            Ok((format, layers.filter(|_| args.weights.is_none()), head))
        }
        _ => Ok((format, None, None)),
    }
}

/// The format that names the model, each layer's where they mix, the LM head's.
type StoredFormats = (
    WeightFormat,
    Option<Vec<LayerFormats>>,
    Option<WeightFormat>,
);

/// `--model` as shapes: a directory's config.json, else a preset's `[config]`, else the
/// config.json of a preset's fetched weights.
fn model_config(model: &str) -> Result<ModelConfig> {
    if !Path::new(model).exists() {
        if let Some(config) = Preset::find(model)?
            .map(|p| p.model_config())
            .transpose()?
            .flatten()
        {
            return Ok(config);
        }
    }
    ModelFiles::read_config(&resolve_model_dir(model)?)
}

fn markdown(args: &PlanArgs, option: &str, input: &PlanInput, report: &Report) -> String {
    let p = &report.plan;
    let mut out = format!(
        "# Offload plan: {} in {} ({})\n\nK = {}, AAL = {:.2}, link {} GB/s, memory {} GB/s, \
         {}context {} tokens, prompt {} tokens. Whole model: {} GB ({}) in {}.\n\n",
        args.model,
        format_bytes(input.budget),
        option,
        input.period,
        input.aal,
        input.link_gbps,
        input.mem_gbps,
        input
            .compute_gflops
            .map_or(String::new(), |g| format!("compute {g} GFLOP/s, ")),
        input.context,
        input.prompt_tokens,
        gigabytes(p.total_weight_bytes),
        format_bytes(p.total_weight_bytes),
        p.format,
    );
    if !p.fits {
        if let Some(first) = p.advice.first() {
            let _ = writeln!(out, "**{first}**\n");
        }
    }
    plan_section(&mut out, p);
    if let Some(alt) = &report.alternative {
        let why = if alt.plan.format != p.format && alt.plan.keep != p.keep {
            format!(
                "no format holds keep {}; the largest keep any format holds",
                p.keep
            )
        } else if alt.plan.format != p.format {
            format!("the largest format that holds keep {}", p.keep)
        } else if alt.plan.sizes.sparse_down != p.sizes.sparse_down {
            format!("a smaller compact down matrix holds keep {}", p.keep)
        } else {
            format!("the largest keep that fits in {}", p.format)
        };
        let down = match alt.plan.sizes.sparse_down {
            Some(d) => format!(", compact down in {d}"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "\n# Alternative: {} at keep {}{down} ({why})\n",
            alt.plan.format, alt.plan.keep
        );
        plan_section(&mut out, &alt.plan);
    }
    out
}

/// Decimal gigabytes, as model sizes are usually quoted: `141.1`, `0.269`.
fn gigabytes(bytes: u64) -> String {
    let gb = bytes as f64 / 1e9;
    if gb >= 10.0 {
        format!("{gb:.1}")
    } else {
        format!("{gb:.3}")
    }
}

fn plan_section(out: &mut String, p: &Plan) {
    let verdict = if p.fits {
        "the sparse set fits: drafting streams nothing"
    } else {
        "the sparse set does not fit: the overflow is streamed on every pass"
    };
    let down = match p.sizes.sparse_down {
        Some(d) => format!(" (compact down in {d})"),
        None => String::new(),
    };
    let _ = writeln!(out, "## {} at keep {}{down}: {verdict}\n", p.format, p.keep);
    out.push_str("| what | size | where |\n|---|---:|---|\n");
    for item in &p.items {
        let place = match item.residence {
            Residence::Resident => "resident",
            Residence::Host => "host",
            Residence::Streamed { every: Every::Pass } => "streamed every pass",
            Residence::Streamed {
                every: Every::Verification,
            } => "streamed at verification",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {place} |",
            item.name,
            format_bytes(item.bytes)
        );
    }
    let _ = writeln!(
        out,
        "| **resident total** | {} of {} | |\n\nStreamed: {} per draft pass, {} per \
         verification, {} at the first prefill.\n",
        format_bytes(p.resident_bytes),
        format_bytes(p.budget),
        format_bytes(p.streamed_bytes_per_draft),
        format_bytes(p.streamed_bytes_per_verification),
        format_bytes(p.streamed_bytes_per_prefill),
    );
    let _ = writeln!(out, "{}\n", host_line(&p.host));
    out.push_str(
        "| way | ms/token | tokens/s | streamed/token | draft pass ms | full pass ms |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let c = &p.costs;
    for (name, way) in [
        ("full (dense, rest streamed every token)", &c.full),
        (
            "reference (paper: all layers streamed every token)",
            &c.reference,
        ),
        ("sirius-offload (this plan)", &c.sirius_offload),
    ] {
        way_row(out, name, way);
    }
    let passes = match c.prefill_passes {
        1 => "one prefill pass".to_string(),
        n => format!("{n} prefill passes of up to {} tokens", c.prefill_chunk),
    };
    let _ = writeln!(
        out,
        "\nTime to first token: {:.0} ms ({passes}, each streaming every weight not resident).\n",
        c.ttft_ms
    );
    for line in &p.advice {
        let _ = writeln!(out, "- {line}");
    }
}

fn way_row(out: &mut String, name: &str, w: &WayCost) {
    let draft = w
        .draft_ms
        .map_or_else(|| "-".to_string(), |d| format!("{d:.1}"));
    let _ = writeln!(
        out,
        "| {name} | {:.1} | {:.2} | {} | {draft} | {:.1} |",
        w.ms_per_token,
        w.tokens_per_s,
        format_bytes(w.streamed_bytes_per_token),
        w.verify_ms,
    );
}
