//! Compute backends.
//!
//! The [`Backend`] trait is the small set of inference ops the one Llama forward pass
//! (`model::llama`) is written against. The CPU backend is the reference; the CUDA backend
//! (feature `cuda`) must match it op by op. Buffers are opaque to the model: a backend keeps
//! them wherever its compute happens (host memory, device memory).

mod checks;
pub mod cpu;
mod cpu_backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod neurons;
pub mod rope;
mod tree_mask;

pub use cpu_backend::{CpuBackend, CpuMatrix};
pub use neurons::{BundleLayout, BundleSelection, NeuronLists, NeuronRule};
pub use rope::RopeTable;
pub use tree_mask::TreeMask;

use crate::dtype::DType;
use crate::error::Result;
use crate::model::weights::TensorRef;

/// Shape of one attention call: heads, kv heads (GQA) and head width.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The ops of a Llama forward pass. Activation buffers hold `n_tokens` rows of f32 laid out
/// row-major; a buffer may be larger than what one call uses (scratch is sized for the longest
/// batch), so every op takes the number of rows it works on.
pub trait Backend {
    /// An f32 buffer: activations, KV cache, norm weights, biases.
    type Buf;
    /// A weight matrix `[rows, cols]` kept in its stored dtype.
    type Matrix;

    /// Short description for logs and stats, e.g. "cpu (avx512, 2 threads)".
    fn describe(&self) -> String;
    /// A zeroed buffer of `len` floats.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Makes a 2-D checkpoint tensor usable as a matrix.
    fn matrix(&self, tensor: &TensorRef) -> Result<Self::Matrix>;
    /// A buffer holding `data` (small host-built vectors: gathered biases).
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Copies a (small) tensor, any dtype, into an f32 buffer.
    fn vector(&self, tensor: &TensorRef) -> Result<Self::Buf>;

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
    /// x[t] += bias for the first `n_tokens` rows.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, n_tokens: usize) -> Result<()>;
    /// Rotates each head of rows 0..n_tokens, row t sitting at position start_pos + t.
    fn rope(
        &self,
        x: &mut Self::Buf,
        num_heads: usize,
        start_pos: usize,
        n_tokens: usize,
        table: &RopeTable,
    ) -> Result<()>;
    /// Rotates each head of rows 0..positions.len(), row t sitting at `positions[t]` (tree
    /// nodes: the position is the depth, not the row).
    fn rope_at(
        &self,
        x: &mut Self::Buf,
        num_heads: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()>;
    /// Moves `n_rows` rows of `row_len` floats within `buf` from row `src_row` to `dst_row`
    /// (`dst_row <= src_row`; the ranges may overlap): compacts an accepted tree path.
    fn move_rows(
        &self,
        buf: &mut Self::Buf,
        src_row: usize,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()>;
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
    /// Causal attention of rows 0..n_tokens of q (positions start_pos..) over cache rows
    /// 0..start_pos+n_tokens.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        shape: AttentionShape,
        start_pos: usize,
        n_tokens: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Attention of the `mask.n_tokens()` rows of q, the last nodes of a token tree (cache
    /// rows `mask.first_row()..`), each over the cache rows `mask` lets it see.
    fn tree_attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        shape: AttentionShape,
        mask: &TreeMask,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// gate[i] = silu(gate[i]) * up[i] for i < len.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// x[i] += y[i] for i < len.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// Reads `out.len()` floats starting at `offset` back to the host.
    fn read(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()>;

    // ---- Contextual sparsity (see `crate::sparsity`) ----

    /// Makes a matrix of `rows x cols` elements of `dtype` from bytes built on the host
    /// (the neuron-bundle layout).
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
    /// in `kept` (which it overwrites).
    fn select_neurons(
        &self,
        act: &mut Self::Buf,
        n_tokens: usize,
        width: usize,
        rule: NeuronRule,
        kept: &mut NeuronLists,
    ) -> Result<()>;
    /// CATS over the beams of a tree: one neuron set for all rows t < n_tokens of `act`,
    /// chosen by `rule` from `sum_t |act[t, j]|` (a threshold applies to the mean over rows);
    /// zeroes the others in every row and lists the set once per row in `kept`.
    fn select_neurons_shared(
        &self,
        act: &mut Self::Buf,
        n_tokens: usize,
        width: usize,
        rule: NeuronRule,
        kept: &mut NeuronLists,
    ) -> Result<()>;
    /// `x[i] = silu(x[i])` for i < len.
    fn silu(&self, x: &mut Self::Buf, len: usize) -> Result<()>;
}
