//! Compute backends.
//!
//! [`Backend`] is the small set of core ops the one Llama forward pass (`model::llama`) is
//! written against; [`SparseOps`] adds the neuron-level ops of contextual sparsity, and
//! [`offload::OffloadBackend`] what an offloading runtime needs (a copy engine, views of its
//! staging buffers, resident copies). The CPU backend is the reference; the CUDA backend
//! (feature `cuda`) must match it op by op. Buffers are opaque to the model: a backend keeps
//! them wherever its compute happens (host memory, device memory). Backends know tensors
//! only: no model, config, request or placement.

pub mod argmax;
pub(crate) mod checks;
pub mod compact;
pub mod cpu;
mod cpu_backend;
mod cpu_kv;
mod cpu_matrix;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod neurons;
pub mod offload;
pub mod rope;
pub mod temp_stack;

pub use argmax::argmax;
pub use cpu_backend::{max_threads, CpuBackend, CpuMatrix, MAX_THREADS_PER_CORE};
pub use cpu_kv::CpuKv;
pub use neurons::{BundleLayout, BundleSelection, NeuronLists, NeuronRule};
pub use rope::RopeTable;

use crate::error::Result;
use crate::tensor::{DType, KvDType, TensorRef, TreeMask};

/// What a device backend counts of its own work so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Kernels queued (a cuBLAS call counts as one).
    pub launches: u64,
    /// Device allocations made (each a trip through the driver or its pool).
    pub allocations: u64,
}

impl DeviceCounts {
    /// The work done since `before` was read.
    pub fn since(self, before: DeviceCounts) -> DeviceCounts {
        DeviceCounts {
            launches: self.launches.saturating_sub(before.launches),
            allocations: self.allocations.saturating_sub(before.allocations),
        }
    }

    pub fn add(&mut self, other: DeviceCounts) {
        self.launches += other.launches;
        self.allocations += other.allocations;
    }
}

/// Shape of one attention call: heads, kv heads (GQA) and head width.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Where the rows of a batch sit in the sequence (rotary positions, what attention sees).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// `len` tokens one after another from position `start`, after the cache's `start`
    /// rows: each sees the cache and the batch rows up to itself (prompt, decode, chain
    /// windows).
    Causal { start: usize, len: usize },
    /// The last `mask.n_tokens()` nodes of a token tree (cache rows `mask.first_row()..`):
    /// each sits at the rotary position of its depth and sees the prefix and its own
    /// ancestors (Sirius with width > 1).
    Tree(&'a TreeMask),
}

impl Rows<'_> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        match self {
            Rows::Causal { len, .. } => *len,
            Rows::Tree(mask) => mask.n_tokens(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The core ops of a Llama forward pass. Activation buffers hold `n_tokens` rows of f32
/// laid out row-major; a buffer may be larger than what one call uses (scratch is sized for
/// the longest batch), so every op takes the number of rows it works on.
pub trait Backend {
    /// An f32 buffer: activations, norm weights, biases.
    type Buf;
    /// A weight matrix `[rows, cols]` kept in its stored dtype.
    type Matrix;
    /// One layer's keys or values: rows of `n_kv_heads * head_dim` elements of a [`KvDType`].
    type KvBuf;

    /// Short description for logs and stats, e.g. "cpu (avx512, 2 threads)".
    fn describe(&self) -> String;
    /// Kernels (and library calls such as GEMMs) queued and device allocations made so far,
    /// where each costs something of its own (a GPU); None for a backend that computes in
    /// place (the CPU).
    fn device_counts(&self) -> Option<DeviceCounts> {
        None
    }
    /// A zeroed buffer of `len` floats.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer holding `data` (norm weights, biases).
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Reads `out.len()` floats starting at `offset` back to the host.
    fn read(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()>;
    /// The greedy token of each of the first `rows` rows of `cols` logits in `x`, by the one
    /// rule of [`argmax()`] (first maximum, NaN never wins, 0 with nothing above -inf). A
    /// backend whose buffers are on a device picks them there, so only `rows` ids come back
    /// instead of `rows * cols` floats; this default reads the rows back and picks on the host.
    fn argmax_rows(&self, x: &Self::Buf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        let len = rows.checked_mul(cols).ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!(
                "argmax_rows: {rows} rows of {cols} values overflow"
            ))
        })?;
        let mut host = vec![0.0f32; len];
        self.read(x, 0, &mut host)?;
        argmax::argmax_of_rows(&host, rows, cols)
    }
    /// Each of the first `rows` rows' argmax and the probability (softmax at `temperature`)
    /// of `next[i]` under row `i` (`next` may be shorter: the rows after it get none), by
    /// the rules of [`argmax::row_verdicts_of`]: what Sirius's acceptance test reads. A
    /// device backend computes them where the logits are; this default reads the rows back.
    fn row_verdicts(
        &self,
        x: &Self::Buf,
        rows: usize,
        cols: usize,
        next: &[u32],
        temperature: f32,
    ) -> Result<Vec<argmax::RowVerdict>> {
        let len = rows.checked_mul(cols).ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!(
                "row_verdicts: {rows} rows of {cols} values overflow"
            ))
        })?;
        let mut host = vec![0.0f32; len];
        self.read(x, 0, &mut host)?;
        argmax::row_verdicts_of(&host, rows, cols, next, temperature)
    }
    /// Makes a 2-D checkpoint tensor usable as a matrix.
    fn matrix(&self, tensor: &TensorRef) -> Result<Self::Matrix>;

    /// out[t] = table[tokens[t]] (as f32).
    fn embed(&self, table: &Self::Matrix, tokens: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// out[t] = rmsnorm(x[t]) * weight for the first `n_tokens` rows.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        weight: &Self::Buf,
        eps: f32,
        n_tokens: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// out[t] = w · x[t] for the first `n_tokens` rows.
    fn matmul(
        &self,
        w: &Self::Matrix,
        x: &Self::Buf,
        n_tokens: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// The LM head's product, `out[t] = head · x[t]`. With `only_max` (the next token's
    /// pick) a backend may compute it more cheaply as long as the maximum (greedy decoding's
    /// pick), its row and value stay exact; without, every logit is (trees rank several
    /// candidates, verification reads probabilities), where [`Backend::matmul`] may quantize
    /// a decode step's activations.
    fn logits_matmul(
        &self,
        head: &Self::Matrix,
        x: &Self::Buf,
        n_tokens: usize,
        out: &mut Self::Buf,
        only_max: bool,
    ) -> Result<()> {
        let _ = only_max;
        self.matmul(head, x, n_tokens, out)
    }
    /// x[t] += bias for the first `n_tokens` rows.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, n_tokens: usize) -> Result<()>;
    /// Rotates each of the `num_heads` heads of the batch's rows to their positions.
    fn rope(
        &self,
        x: &mut Self::Buf,
        num_heads: usize,
        rows: Rows<'_>,
        table: &RopeTable,
    ) -> Result<()>;
    /// Attention of the batch's rows of q over the cache rows each sees (see [`Rows`]);
    /// the cache already holds the batch's own K/V.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::KvBuf,
        v_cache: &Self::KvBuf,
        shape: AttentionShape,
        rows: Rows<'_>,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// A zeroed KV buffer of `len` elements stored as `dtype`.
    fn alloc_kv(&self, len: usize, dtype: KvDType) -> Result<Self::KvBuf>;
    /// Writes rows `0..n_rows` of `src` (f32, `row_len` each) into `dst` from row `dst_row`,
    /// rounded to `dst`'s dtype (to nearest, ties to even).
    fn store_kv(
        &self,
        src: &Self::Buf,
        dst: &mut Self::KvBuf,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()>;
    /// Copies `n_rows` rows of `row_len` elements from `src` (from row 0) into `dst` (from
    /// row 0), both of one dtype: a shared prompt prefix computed once.
    fn copy_kv_rows(
        &self,
        src: &Self::KvBuf,
        dst: &mut Self::KvBuf,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()>;
    /// Reads `out.len()` elements starting at `offset` back to the host as f32.
    fn read_kv(&self, buf: &Self::KvBuf, offset: usize, out: &mut [f32]) -> Result<()>;
    /// Moves `n_rows` rows of `row_len` elements within `buf` from row `src_row` to `dst_row`
    /// (`dst_row <= src_row`; the ranges may overlap): compacts an accepted tree path.
    fn move_kv_rows(
        &self,
        buf: &mut Self::KvBuf,
        src_row: usize,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()>;
    /// gate[i] = silu(gate[i]) * up[i] for i < len.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// x[i] += y[i] for i < len.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// Copies `n_rows` rows of `row_len` floats from src (starting at row src_row) to dst (at dst_row).
    fn copy_rows(
        &self,
        src: &Self::Buf,
        src_row: usize,
        dst: &mut Self::Buf,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()>;
}

/// The neuron-level ops contextual sparsity (`crate::sparsity`) and offloading need beyond
/// the core ones.
pub trait SparseOps: Backend {
    /// Makes a matrix of `rows x cols` elements of `dtype` from bytes built on the host
    /// (the neuron-bundle layout, a gathered FFN).
    fn upload_matrix(
        &self,
        bytes: Vec<u8>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Matrix>;
    /// Gathers the neurons `rows` (ascending) of a gate|up|down bundle matrix (`[f, 3h]`) into a compact
    /// dense FFN in checkpoint layout: gate `[k, h]`, up `[k, h]`, down `[h, k]`. Griffin
    /// decodes with it through the ordinary (fastest) matmul.
    fn gather_ffn(&self, bundles: &Self::Matrix, rows: &[u32]) -> Result<[Self::Matrix; 3]>;
    /// Griffin's compact FFN straight out of a layer's quantized matrices (gate and up
    /// `[f, h]`, down `[h, f]`): gate and up rows `[k, h]` as stored, down `[h, k]`
    /// de-quantized and re-encoded as `down_dtype` (ggml formats keep a neuron's down column
    /// in blocks along the neuron axis, so it cannot be copied). `rows` ascending, `k` whole
    /// blocks of `down_dtype`.
    fn gather_quantized_ffn(
        &self,
        ffn: [&Self::Matrix; 3],
        rows: &[u32],
        down_dtype: DType,
    ) -> Result<[Self::Matrix; 3]>;
    /// The FFN over neuron bundles (`bundles`: `[neurons, parts * h]` laid out as `layout`
    /// says): `out[t] = sum_i act(t, i) * down_i` for the neurons `sel` names, where `act` is
    /// computed from `x[t]` as [`BundleSelection`] says (`All` needs the gate rows).
    /// Overwrites rows 0..n_tokens of `out` (`[n, h]`).
    fn bundle_ffn(
        &self,
        bundles: &Self::Matrix,
        layout: BundleLayout,
        x: &Self::Buf,
        n_tokens: usize,
        sel: BundleSelection<'_, Self::Buf>,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Griffin statistics: `acc[j] += sum_t (z[t, j] / |z[t]|)^2` over rows 0..n_tokens of
    /// `z` (`[n, width]`); all-zero rows add nothing.
    fn accumulate_neuron_scores(
        &self,
        z: &Self::Buf,
        n_tokens: usize,
        width: usize,
        acc: &mut Self::Buf,
    ) -> Result<()>;
    /// CATS: for each row t < n_tokens of `act` (`[n, width]`, SiLU(gate)), keeps the neurons
    /// `rule` selects by |act|, zeroes the others in place and lists the kept ones, ascending,
    /// in `kept` (which it overwrites). With `shared` (the beams of a tree) one set serves
    /// every row, chosen by `rule` from `sum_t |act[t, j]|` (a threshold applies to the mean
    /// over rows), and is listed once per row.
    fn select_neurons(
        &self,
        act: &mut Self::Buf,
        n_tokens: usize,
        width: usize,
        rule: NeuronRule,
        shared: bool,
        kept: &mut NeuronLists,
    ) -> Result<()>;
    /// `x[i] = silu(x[i])` for i < len.
    fn silu(&self, x: &mut Self::Buf, len: usize) -> Result<()>;
    /// `dst[t, ids[j]] = src[t, j]` for rows t < n_tokens: `src` is `[n, ids.len()]`, `dst`
    /// `[n, width]`; columns of `dst` that `ids` does not name are left as they are. Merges
    /// the activations of two neuron sets into one row of every neuron.
    fn scatter_columns(
        &self,
        src: &Self::Buf,
        n_tokens: usize,
        ids: &[u32],
        dst: &mut Self::Buf,
        width: usize,
    ) -> Result<()>;
}
