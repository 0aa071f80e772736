//! The planner's input and the byte sizes of every unit it places: pure arithmetic on the
//! model's shapes, the weight format and the Griffin keep fraction.
//!
//! Byte counts are exact (matrices as whole blocks of their format, vectors `4 * len`, KV cache
//! `2 * layers * kv_dim * context * kv_bytes`): the runtime allocates exactly these sizes in an
//! arena checked against the same budget.
//!
//! Float formats move neurons as bundles (gate row, up row, down column, see
//! `crate::sparsity::bundles`). Quantized formats cannot: a neuron's down column is spread
//! over the blocks of `h` rows. There the sparse set is Griffin's compact FFN (gate and up rows
//! as stored, the compact down matrix re-encoded in `sparse_down`, kept counts whole blocks of
//! it), and a full pass streams the complement's gate and up rows plus the layer's whole down
//! matrix as stored, so that verification computes exactly the dense model's FFN.

use std::ops::Range;

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::offload::budget::{gather_tables_bytes, max_job_pieces, Reserves};
use crate::offload::format::{WeightFormat, VECTOR_BYTES};
use crate::sparsity::kept_aligned;
use crate::tensor::DType;

/// Longest context and window the planner accepts: far above any use, low enough that no byte
/// count can overflow.
const MAX_CONTEXT: usize = 1 << 24;
const MAX_PERIOD: usize = 256;

/// Link and memory bandwidths are accepted between these (GB/s).
pub const MIN_GBPS: f64 = 0.001;
pub const MAX_GBPS: f64 = 1.0e6;
/// `plan --gpu-mem`'s defaults, which `run --gpu-mem` plans with too: a PCIe 4.0 x16 link
/// (GB/s) and an RTX 4090's memory bandwidth (GB/s).
pub const GPU_LINK_GBPS: f64 = 25.0;
pub const GPU_MEM_GBPS: f64 = 1008.0;
/// What `run --resident-mem` assumes for compute on a few CPU cores (GB/s).
pub const CPU_MEM_GBPS: f64 = 20.0;
/// Number of streaming buffers: layer l+1 is copied while layer l computes.
pub const STREAM_BUFFERS: usize = 2;

#[derive(Debug, Clone)]
pub struct PlanInput {
    pub config: ModelConfig,
    pub format: WeightFormat,
    /// The LM head's format where it differs from the layers' (a GGUF's head is often
    /// another type); `None`: `format`.
    pub head_format: Option<WeightFormat>,
    /// Quantized formats: the format of the resident compact down matrix (`--griffin-down`;
    /// `None`: q8_0). Ignored for float formats.
    pub sparse_down: Option<WeightFormat>,
    /// Each layer's matrix formats where a file mixes them (a GGUF Q4_K_M keeps some layers'
    /// v and down in Q6_K); `None`: every layer matrix in `format`, which then names the
    /// gate/up format. Sizes in another format (the advice's alternatives) ignore it.
    pub layer_formats: Option<Vec<LayerFormats>>,
    /// Griffin FFN keep fraction in (0, 1]; 1 = dense.
    pub keep: f64,
    /// Bytes of fast memory (GPU memory, or `--resident-mem` on CPU).
    pub budget: u64,
    /// KV cache rows to hold.
    pub context: usize,
    /// Bytes per KV element: 2 (f16, the default) or 4 (f32).
    pub kv_bytes: usize,
    /// A plan for a GPU (any weight format runs there), not for the CPU runtime (which runs
    /// the formats `run --weights` makes from any checkpoint, and a GGUF's own).
    pub on_gpu: bool,
    /// Host -> device link, GB/s (10^9 bytes).
    pub link_gbps: f64,
    /// Device memory bandwidth, GB/s.
    pub mem_gbps: f64,
    /// Arithmetic throughput of compute in GFLOP/s (two per weight per token of a pass);
    /// `None`: every pass is bound by memory alone. On a CPU a verification window of K
    /// tokens costs up to K decode steps of arithmetic, which only this term predicts.
    pub compute_gflops: Option<f64>,
    /// Sirius period K.
    pub period: usize,
    /// Assumed average advance length per verification (1 <= AAL <= K).
    pub aal: f64,
    /// Prompt length for the time to first token.
    pub prompt_tokens: usize,
    /// Bytes of the activation buffers a runtime really allocates (prefill chunk, draft and
    /// verification scratch); `None` estimates one verification window.
    pub activation_bytes: Option<u64>,
    /// Bytes the backend allocates for itself (`offload::budget::gpu_scratch_bytes` on a
    /// GPU; 0 on the CPU, whose scratch is in the activations). With `on_gpu`, the driver's
    /// context and the allocator margin are budget lines too (`offload::budget::Reserves`).
    pub backend_scratch: u64,
    /// Prompt tokens per prefill pass (each pass streams every non-resident weight once);
    /// `None` runs the whole prompt in one pass.
    pub prefill_chunk: Option<usize>,
    /// The GPU copy engine's host-gather stage (`cost::HostGather`); `None`: no such stage.
    pub host_gather: Option<crate::offload::cost::HostGather>,
}

impl PlanInput {
    /// Checks every number before any arithmetic depends on it.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, problem: String| Err(Error::PlanInput { field, problem });
        if !(self.keep.is_finite() && self.keep > 0.0 && self.keep <= 1.0) {
            return bad(
                "keep",
                format!(
                    "must be a fraction in (0, 1], got {}",
                    crate::units::format_number(self.keep)
                ),
            );
        }
        if self.budget == 0 {
            return bad("budget", "must be positive".into());
        }
        if self.context == 0 || self.context > MAX_CONTEXT {
            return bad(
                "context",
                format!("must be in 1..={MAX_CONTEXT} tokens, got {}", self.context),
            );
        }
        if !(1..=8).contains(&self.kv_bytes) {
            return bad(
                "kv_bytes",
                format!(
                    "(KV element size) must be 1..=8 bytes, got {}",
                    self.kv_bytes
                ),
            );
        }
        self.validate_rates()?;
        if self.period == 0 || self.period > MAX_PERIOD {
            return bad(
                "period",
                format!("must be in 1..={MAX_PERIOD}, got {}", self.period),
            );
        }
        if !(self.aal.is_finite() && self.aal >= 1.0 && self.aal <= self.period as f64) {
            return bad(
                "aal",
                format!(
                    "must be between 1 and the period ({}), got {}",
                    self.period, self.aal
                ),
            );
        }
        if self.prompt_tokens == 0 || self.prompt_tokens > self.context {
            return bad(
                "prompt_tokens",
                format!(
                    "must be in 1..=the context ({}), got {}",
                    self.context, self.prompt_tokens
                ),
            );
        }
        self.validate_layer_formats()?;
        if self.context > self.config.max_position_embeddings {
            return bad(
                "context",
                format!(
                    "{} is longer than the model's max_position_embeddings ({})",
                    self.context, self.config.max_position_embeddings
                ),
            );
        }
        Ok(())
    }

    /// Link, memory and arithmetic rates bounded so that every time derived from them is a
    /// sane, finite duration.
    fn validate_rates(&self) -> Result<()> {
        let compute = ("compute_gflops", self.compute_gflops.unwrap_or(1.0));
        for (field, v) in [
            ("link_gbps", self.link_gbps),
            ("mem_gbps", self.mem_gbps),
            compute,
        ] {
            if !(v.is_finite() && (MIN_GBPS..=MAX_GBPS).contains(&v)) {
                let unit = if field == "compute_gflops" {
                    "GFLOP/s"
                } else {
                    "GB/s"
                };
                return Err(Error::PlanInput {
                    field,
                    problem: format!(
                        "must be between {MIN_GBPS} and {MAX_GBPS} {unit}, got {}",
                        crate::units::format_number(v)
                    ),
                });
            }
        }
        Ok(())
    }

    /// [`PlanInput::layer_formats`] describes this model's layers in formats that can mix.
    fn validate_layer_formats(&self) -> Result<()> {
        let bad = |field: &'static str, problem: String| Err(Error::PlanInput { field, problem });
        let Some(formats) = &self.layer_formats else {
            return Ok(());
        };
        if formats.len() != self.config.num_layers {
            return bad(
                "layer_formats",
                format!(
                    "{} layers' formats for a {}-layer model",
                    formats.len(),
                    self.config.num_layers
                ),
            );
        }
        // Float FFNs move as bundles of one format; quantized layers may mix block formats.
        let all = formats
            .iter()
            .flat_map(|f| f.attention.iter().chain(&f.ffn));
        let mixed_float = self.format.is_quantized() && all.clone().any(|f| !f.is_quantized())
            || !self.format.is_quantized() && all.clone().any(|&f| f != self.format);
        if mixed_float {
            return bad(
                "layer_formats",
                format!(
                    "layers mix {} with other formats: only block formats mix",
                    self.format
                ),
            );
        }
        Ok(())
    }
}

/// The formats of one layer's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerFormats {
    /// wq, wk, wv, wo.
    pub attention: [WeightFormat; 4],
    /// gate, up, down.
    pub ffn: [WeightFormat; 3],
}

impl LayerFormats {
    pub fn uniform(format: WeightFormat) -> LayerFormats {
        LayerFormats {
            attention: [format; 4],
            ffn: [format; 3],
        }
    }

    /// The planner's view of the stored types of every layer's wq, wk, wv, wo, gate, up and
    /// down: the format that names the model (layer 0's gate) and, where the layers mix
    /// formats, each layer's; `Err` names the first matrix in a format the planner lacks.
    pub fn of_stored(layers: &[[DType; 7]]) -> std::result::Result<StoredFormats, UnplannedMatrix> {
        let mut out = Vec::with_capacity(layers.len());
        for (li, dtypes) in layers.iter().enumerate() {
            let mut f = [WeightFormat::Bf16; 7];
            for (j, (&dtype, slot)) in dtypes.iter().zip(&mut f).enumerate() {
                *slot = WeightFormat::of(dtype).ok_or((li, j, dtype))?;
            }
            out.push(LayerFormats {
                attention: [f[0], f[1], f[2], f[3]],
                ffn: [f[4], f[5], f[6]],
            });
        }
        let format = out.first().map_or(WeightFormat::Bf16, |l| l.ffn[0]);
        let uniform = out.iter().all(|l| *l == LayerFormats::uniform(format));
        Ok((format, (!uniform).then_some(out)))
    }

    /// Names of the matrices in [`LayerFormats::of_stored`]'s order.
    pub const MATRICES: [&'static str; 7] = ["wq", "wk", "wv", "wo", "gate", "up", "down"];
}

/// The format that names a model and, where its layers mix formats, each layer's.
pub type StoredFormats = (WeightFormat, Option<Vec<LayerFormats>>);
/// A matrix in a format the planner lacks: layer, index in [`LayerFormats::MATRICES`], type.
pub type UnplannedMatrix = (usize, usize, DType);

/// What sizing one layer needs besides its formats.
struct Unit {
    h: usize,
    f: usize,
    q: usize,
    kv: usize,
    /// Neurons of the sparse set, and the format of its compact down matrix.
    kept: usize,
    sparse_down: WeightFormat,
    /// Bytes of one neuron's gate and up biases.
    bias: u64,
}

impl Unit {
    /// A layer's units in formats `lf`, and one neuron's bytes as the sparse set holds it.
    fn layer(&self, lf: &LayerFormats) -> (LayerSizes, u64) {
        let Unit {
            h,
            f,
            q,
            kv,
            kept,
            sparse_down,
            bias,
        } = *self;
        let [wq, wk, wv, wo] = lf.attention;
        let [gate, up, down] = lf.ffn;
        let attention = wq.matrix_bytes(q, h)
            + wk.matrix_bytes(kv, h)
            + wv.matrix_bytes(kv, h)
            + wo.matrix_bytes(h, q);
        // Gate and up rows of `n` neurons (+ biases).
        let rows = |n: usize| n as u64 * (gate.row_bytes(h) + up.row_bytes(h) + bias);
        let down_matrix = down.matrix_bytes(h, f);
        let (sparse_ffn, complement) = match gate.is_quantized() {
            // The compact down is [h, kept] (whole blocks of `sparse_down` along a row).
            true => (
                rows(kept) + sparse_down.matrix_bytes(h, kept),
                rows(f - kept) + down_matrix,
            ),
            // Bundles: gate row, up row and down column of one format.
            false => {
                let neuron = rows(1) + down.row_bytes(h);
                (kept as u64 * neuron, (f - kept) as u64 * neuron)
            }
        };
        let sizes = LayerSizes {
            attention,
            sparse_ffn,
            ffn: rows(f) + down_matrix,
            complement,
        };
        (sizes, rows(1) + sparse_down.row_bytes(h))
    }
}

/// One layer's units in bytes (see the fields of [`Sizes`] of the same names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LayerSizes {
    pub attention: u64,
    pub sparse_ffn: u64,
    pub ffn: u64,
    pub complement: u64,
}

/// Byte sizes of every unit the planner moves, in the chosen format.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub layers: usize,
    pub hidden: usize,
    /// Each layer's units (they differ where the layers' formats do, see
    /// [`PlanInput::layer_formats`]); the scalar fields below are the largest layer's.
    pub per_layer: Vec<LayerSizes>,
    /// One layer's attention: wq, wk, wv, wo (their biases stay resident: `norm_bytes`).
    pub attention_bytes: u64,
    /// One neuron of the sparse set: gate row + up row + down column (3 * hidden weights;
    /// quantized formats: the down column in `sparse_down`), plus its gate/up biases (f32) on
    /// `mlp_bias` models.
    pub neuron_bytes: u64,
    /// Whether neurons move as quantized rows (see the module doc), not bundles.
    pub quantized: bool,
    /// Quantized formats: the format of the resident compact down matrix.
    pub sparse_down: Option<WeightFormat>,
    pub neurons: usize,
    pub kept_neurons: usize,
    /// One layer's sparse FFN subset: kept_neurons bundles.
    pub sparse_ffn_bytes: u64,
    /// One layer's whole FFN: all bundles.
    pub ffn_bytes: u64,
    /// One layer's FFN complement: the bundles the sparse subset leaves out (quantized: their
    /// gate and up rows plus the whole down matrix).
    pub complement_bytes: u64,
    /// vocab x hidden: the LM head (the embedding matrix itself on tied models).
    pub head_bytes: u64,
    /// vocab x hidden, on the host.
    pub embedding_bytes: u64,
    /// The vectors that stay resident whatever the placement ([`resident_vector_count`]), f32.
    pub norm_bytes: u64,
    /// 2 (K and V) * layers * kv_dim * context * kv_bytes.
    pub kv_cache_bytes: u64,
    /// One layer's KV rows at full context: what attention reads per pass.
    pub kv_layer_bytes: u64,
    /// 4 * period * (5h + 2q + 2kv + 2f + vocab): f32 activations of one verification window.
    pub activation_bytes: u64,
    /// Backend scratch and, on a GPU, the driver's context and the allocator margin.
    pub reserves: Reserves,
}

/// Elements of the vectors that stay resident: every norm (2 per layer + final), the
/// attention biases (q/k/v, o) and an FFN's down bias. Only gate/up biases move, with their
/// neurons (`Sizes::neuron_bytes`).
pub fn resident_vector_count(c: &ModelConfig) -> usize {
    let (h, l) = (c.hidden_size, c.num_layers);
    let qkv = if c.qkv_bias {
        c.q_dim() + 2 * c.kv_dim()
    } else {
        0
    };
    let per_layer = qkv + if c.o_bias { h } else { 0 } + if c.mlp_bias { h } else { 0 };
    (2 * l + 1) * h + l * per_layer
}

impl Sizes {
    pub fn new(input: &PlanInput) -> Sizes {
        Self::with(input, input.format, input.keep)
    }

    /// Sizes of the same model and context in another format or at another keep.
    pub fn with(input: &PlanInput, format: WeightFormat, keep: f64) -> Sizes {
        let c = &input.config;
        let (h, f, v, l) = (
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
            c.num_layers,
        );
        let (q, kv) = (c.q_dim(), c.kv_dim());
        let vec = |len: usize| len as u64 * VECTOR_BYTES;
        let quantized = format.is_quantized();
        let bias = if c.mlp_bias { vec(2) } else { 0 };
        let sparse_down = match quantized {
            true => input.sparse_down.unwrap_or(WeightFormat::Q8_0),
            false => format,
        };
        let kept = kept_aligned(keep as f32, f, sparse_down.dtype().block().0);
        let formats = match (&input.layer_formats, format == input.format) {
            (Some(formats), true) => formats.clone(),
            _ => vec![LayerFormats::uniform(format); l],
        };
        let unit = Unit {
            h,
            f,
            q,
            kv,
            kept,
            bias,
            sparse_down,
        };
        let (per_layer, neurons): (Vec<LayerSizes>, Vec<u64>) =
            formats.iter().map(|lf| unit.layer(lf)).unzip();
        let largest = |unit: fn(&LayerSizes) -> u64| per_layer.iter().map(unit).max().unwrap_or(0);
        let neuron_bytes = neurons.into_iter().max().unwrap_or(0);
        let head_format = match format == input.format {
            true => input.head_format.unwrap_or(format),
            false => format,
        };
        let norm_count = resident_vector_count(c);
        let kv_layer_bytes = 2 * (kv as u64) * input.context as u64 * input.kv_bytes as u64;
        let window = (5 * h + 2 * q + 2 * kv + 2 * f + v) as u64;
        let mut sizes = Sizes {
            layers: l,
            hidden: h,
            attention_bytes: largest(|s| s.attention),
            neuron_bytes,
            quantized,
            sparse_down: quantized.then_some(sparse_down),
            neurons: f,
            kept_neurons: kept,
            sparse_ffn_bytes: largest(|s| s.sparse_ffn),
            ffn_bytes: largest(|s| s.ffn),
            complement_bytes: largest(|s| s.complement),
            per_layer,
            head_bytes: head_format.matrix_bytes(v, h),
            embedding_bytes: head_format.matrix_bytes(v, h),
            norm_bytes: vec(norm_count),
            kv_cache_bytes: kv_layer_bytes * l as u64,
            kv_layer_bytes,
            activation_bytes: input
                .activation_bytes
                .unwrap_or(VECTOR_BYTES * input.period as u64 * window),
            reserves: Reserves::new(input.on_gpu, l, input.backend_scratch),
        };
        // A GPU copy engine's gather tables are the backend's too: for the largest job in
        // the largest buffer of any placement (nothing resident).
        if input.on_gpu {
            let largest = sizes.buffer_bytes(&sizes.layers_with(0));
            let pieces = max_job_pieces(f, kept, quantized);
            sizes.reserves.backend_scratch += gather_tables_bytes(STREAM_BUFFERS, pieces, largest);
        }
        sizes
    }

    /// Resident whatever the placement: norms, head, KV cache, activations and the reserves.
    pub fn fixed_bytes(&self) -> u64 {
        self.norm_bytes
            + self.head_bytes
            + self.kv_cache_bytes
            + self.activation_bytes
            + self.reserves.total()
    }

    /// Every weight once (a tied embedding counted once, as the head).
    pub fn total_weight_bytes(&self, tied: bool) -> u64 {
        let layers = self.sum(0..self.layers, |u| u.attention + u.ffn);
        let embedding = if tied { 0 } else { self.embedding_bytes };
        layers + self.head_bytes + embedding + self.norm_bytes
    }

    /// Layer `i`'s units.
    pub fn layer(&self, i: usize) -> LayerSizes {
        self.per_layer.get(i).copied().unwrap_or_default()
    }

    /// `unit` summed over layers `range`.
    pub fn sum(&self, range: Range<usize>, unit: fn(&LayerSizes) -> u64) -> u64 {
        let end = range.end.min(self.per_layer.len());
        self.per_layer[range.start.min(end)..end]
            .iter()
            .map(unit)
            .sum()
    }

    /// Bytes a draft pass copies into layer `p`'s buffer: whatever of the sparse model overflowed.
    pub fn draft_stream_bytes(&self, p: &LayerPlacement) -> u64 {
        self.streamed_attention(p)
            + if p.sparse_ffn_resident {
                0
            } else {
                self.layer(p.layer).sparse_ffn
            }
    }

    /// Bytes a verification pass copies for layer `p`: the complement of a resident sparse
    /// subset (or the whole FFN), plus attention if it overflowed.
    pub fn verify_stream_bytes(&self, p: &LayerPlacement) -> u64 {
        let sizes = self.layer(p.layer);
        self.streamed_attention(p)
            + match (p.sparse_ffn_resident, p.complement_resident) {
                (true, true) => 0,
                (true, false) => sizes.complement,
                (false, _) => sizes.ffn,
            }
    }

    /// Bytes the first prefill copies for layer `p`: no neuron set is chosen yet, so the
    /// whole FFN, plus attention if it overflowed.
    pub fn prefill_stream_bytes(&self, p: &LayerPlacement) -> u64 {
        self.streamed_attention(p) + self.layer(p.layer).ffn
    }

    fn streamed_attention(&self, p: &LayerPlacement) -> u64 {
        if p.attention_resident {
            0
        } else {
            self.layer(p.layer).attention
        }
    }

    /// One streaming buffer: the largest per-layer transfer of any pass, the prefill's
    /// included (a request's first pass streams whole FFN layers: no neurons are chosen yet).
    pub fn buffer_bytes(&self, layers: &[LayerPlacement]) -> u64 {
        layers
            .iter()
            .map(|p| {
                self.verify_stream_bytes(p)
                    .max(self.draft_stream_bytes(p))
                    .max(self.prefill_stream_bytes(p))
            })
            .max()
            .unwrap_or(0)
    }

    /// Layers placed when the first `units` of (attention 0..L, sparse FFN 0..L, FFN
    /// complement 0..L) are resident. Complements come last: they are read only at
    /// verification, once per window, where the rest is read on every token.
    pub fn layers_with(&self, units: usize) -> Vec<LayerPlacement> {
        let l = self.layers;
        (0..l)
            .map(|i| LayerPlacement {
                layer: i,
                attention_resident: i < units,
                sparse_ffn_resident: l + i < units,
                complement_resident: 2 * l + i < units,
            })
            .collect()
    }

    /// Resident bytes with the first `units` placed, buffers included.
    pub fn resident_with(&self, units: usize) -> u64 {
        let l = self.layers;
        let att = self.sum(0..units.min(l), |s| s.attention);
        let ffn = self.sum(0..units.saturating_sub(l).min(l), |s| s.sparse_ffn);
        let rest = self.sum(0..units.saturating_sub(2 * l).min(l), |s| s.complement);
        let buffers = STREAM_BUFFERS as u64 * self.buffer_bytes(&self.layers_with(units));
        self.fixed_bytes() + att + ffn + rest + buffers
    }

    /// Whether all attention and the whole sparse set fit in `budget`.
    pub fn fits(&self, budget: u64) -> bool {
        self.resident_with(2 * self.layers) <= budget
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerPlacement {
    pub layer: usize,
    pub attention_resident: bool,
    pub sparse_ffn_resident: bool,
    /// The rest of the layer's FFN too (then verification streams nothing for it).
    pub complement_resident: bool,
}
