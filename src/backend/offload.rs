//! What an offloading runtime needs from a backend beyond its compute ops: a copy engine that
//! stages streamed weights next to compute, matrices viewing its staging buffers, and
//! resident copies of weights. The one runtime (`crate::offload::runtime`) is written against
//! this trait; the CPU backend implements it in `cpu::offload`, the CUDA backend in
//! `cuda::offload`.

use std::borrow::Cow;
use std::ops::Range;

use crate::backend::temp_stack::TEMP_ALIGN;
use crate::backend::SparseOps;
use crate::error::Result;
use crate::tensor::DType;
use crate::transfer::{CopyEngine, CopyEngineOptions};

/// Where a backend's resident (budgeted) memory is, which decides how the runtime treats the
/// link between it and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidentMemory {
    /// Host RAM (the CPU backend emulating a device budget): the "link" is a memcpy, capped
    /// only when asked, and staging buffers are host memory the runtime can read in place.
    Host,
    /// Device memory behind a real link (PCIe): copies run at the link's speed, and reading
    /// a staging buffer back would cross the link again.
    Device,
}

/// The shapes the backend's own offloading scratch depends on.
#[derive(Debug, Clone, Copy)]
pub struct ScratchShape {
    /// The widest input row a matmul reads (hidden, intermediate or attention width).
    pub widest_cols: usize,
    /// The most rows one matmul multiplies.
    pub gemm_rows: usize,
    /// The most rows a sparse FFN call takes (drafts and verification windows).
    pub sparse_rows: usize,
    /// Rotary head width and the positions the request reaches.
    pub head_dim: usize,
    pub context: usize,
    /// Query heads, the model width and the FFN's neurons: what the per-op temporaries
    /// (attention chunks, neuron lists, partial sums) scale with.
    pub num_heads: usize,
    pub hidden: usize,
    pub ffn_neurons: usize,
}

/// Set to 1 to register no host memory on CUDA: every job is gathered on the host into
/// pinned staging (the copy engine's fallback path), to compare the two on one machine.
pub const STAGED_ENV: &str = "SIRIUS_COPY_STAGED";

/// What a CUDA context with this project's kernels and cuBLAS loaded holds on the device
/// (modules load lazily since CUDA 11.7; contexts measure 300-500 MiB on recent GPUs).
pub const DRIVER_CONTEXT_BYTES: u64 = 512 << 20;

/// The allocator margin's fixed part: what the stream-ordered pool keeps (its release
/// threshold, see `cuda::context`), cuBLAS's handles, temporaries past their region (the
/// region itself is booked with the backend scratch, see [`gpu_temporaries_bytes`]).
pub const ALLOCATOR_MARGIN_BASE: u64 = 256 << 20;

/// cuBLAS's workspace as the budget assumes it (its default on recent GPUs is up to 32 MiB;
/// the library does not report it).
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// The most streaming multiprocessors the temporaries' bound assumes (GPUs today have at
/// most 192): attention splits a few query rows into chunks until every SM has two blocks,
/// so its partial results scale with the SMs, not with the context.
pub const TEMPORARIES_SM_BOUND: usize = 256;

/// The most bytes of partial sums a sparse FFN's down projection keeps (the CUDA op caps its
/// splits to fit): splits only pay when few tokens leave SMs idle, so few rows need them.
pub const DOWN_PARTIALS_MAX_BYTES: usize = 8 << 20;

/// f32 elements of the weight block the f32 GEMM path converts at a time (`GEMM=f32` only).
pub const GEMM_F32_BLOCK_FLOATS: usize = 16 << 20;

/// Rows of the copy engine's gather table are at most this long (a multiple of 16, so a
/// split keeps each part's 16-byte alignment): the kernel gives a block one row at a time,
/// and even rows keep the blocks evenly loaded when a job mixes short and long runs.
pub const GATHER_ROW_BYTES: usize = 256 << 10;

/// One gather table row: source address, destination offset and length, three u64 words.
pub const GATHER_TABLE_ROW_BYTES: u64 = 24;

/// The most pieces one copy job of a runtime can have, for a model of `f` neurons of which a
/// request keeps `kept`: overflowed attention (4), then a complement's runs (at most one per
/// kept neuron and one more; quantized: as many runs of the up rows, then the down matrix)
/// or a new request's moved neurons (fewer runs than that).
pub fn max_job_pieces(f: usize, kept: usize, quantized: bool) -> usize {
    let runs = (kept + 1).min(f);
    4 + match quantized {
        true => 2 * runs + 1,
        false => runs,
    }
}

/// Rows of gather table a copy slot needs for jobs of at most `pieces` pieces in a buffer
/// of `buffer_bytes`: a row per piece, one more per [`GATHER_ROW_BYTES`] a long run is split
/// at, and a few for pieces cut where one registration ends and the next begins.
pub fn gather_table_rows(pieces: usize, buffer_bytes: usize) -> usize {
    const CUT_PIECES: usize = 64;
    pieces + buffer_bytes / GATHER_ROW_BYTES + 1 + CUT_PIECES
}

/// Device bytes of a GPU copy engine's gather tables: one table per stream buffer, sized
/// for the runtime's largest job ([`max_job_pieces`]) in buffers of at most
/// `max_buffer_bytes`. Booked with the backend scratch.
pub fn gather_tables_bytes(buffers: usize, pieces: usize, max_buffer_bytes: u64) -> u64 {
    let buffer = usize::try_from(max_buffer_bytes).unwrap_or(usize::MAX);
    let rows = gather_table_rows(pieces, buffer) as u64;
    buffers as u64 * rows * GATHER_TABLE_ROW_BYTES
}

/// The CUDA backend's per-op temporaries for requests of `shape`, at most: each op's
/// temporaries are taken from one region as a stack and given back when the op returns
/// (`temp_stack`), so the region holds the largest op's, each rounded up to `TEMP_ALIGN`:
/// a sparse FFN's neuron lists, activations and partial sums (`sparse_rows` rows of
/// `ffn_neurons`), attention's tree mask and chunk partials (`gemm_rows` rows), the f32
/// GEMM's weight block.
pub fn gpu_temporaries_bytes(shape: &ScratchShape, act16: bool) -> u64 {
    let align = TEMP_ALIGN as u64;
    let t = shape.gemm_rows.max(1) as u64;
    let sparse = shape.sparse_rows.clamp(1, shape.gemm_rows.max(1)) as u64;
    let neurons = sparse * shape.ffn_neurons as u64 * 4;
    // Neuron ids per row (or selected per row) and the rows' offsets or counts.
    let lists = neurons + (sparse + 1) * 4 + 2 * align;
    let sparse_ffn = lists + neurons + DOWN_PARTIALS_MAX_BYTES as u64 + align;
    let mask = t * (shape.context as u64).div_ceil(64) * 8;
    let slots = 8 * TEMPORARIES_SM_BOUND as u64 + t * shape.num_heads as u64;
    let attention = mask + slots * (shape.head_dim as u64 * 4 + 8) + 3 * align;
    let gemm_f32 = match act16 {
        true => 0,
        false => GEMM_F32_BLOCK_FLOATS as u64 * 4 + align,
    };
    // Token ids, positions, argmax results, inverse norms: a few words a row.
    let rows = t * 8 + align;
    sparse_ffn.max(attention).max(gemm_f32).max(rows)
}

/// The CUDA backend's scratch for requests of `shape`: with the bf16 GEMM (`act16`, the
/// default with cuBLAS) the activations converted to bf16 for `gemm_rows` rows of the widest
/// matrix input (rounded up to a power of two: the buffer grows by doubling), cuBLAS's
/// workspace, the rope table (f32 cos/sin rows of `head_dim` for at least 1024 positions,
/// grown by doubling) and the per-op temporaries ([`gpu_temporaries_bytes`]). The backend
/// books exactly this.
pub fn gpu_scratch_bytes(shape: &ScratchShape, act16: bool) -> u64 {
    let act16_bytes = match act16 {
        true => {
            let bytes = (shape.gemm_rows as u64).saturating_mul(shape.widest_cols as u64 * 2);
            bytes.checked_next_power_of_two().unwrap_or(bytes)
        }
        false => 0,
    };
    let rope = 2 * shape.context.max(1024) as u64 * shape.head_dim as u64 * 4;
    act16_bytes + CUBLAS_WORKSPACE_BYTES + rope + gpu_temporaries_bytes(shape, act16)
}

/// A backend the offloading runtime can drive. Matrices must be cheap to clone (shared
/// bytes): the runtime hands the same resident matrices to every request's Griffin FFN.
pub trait OffloadBackend: SparseOps<Matrix: Clone> + Sized {
    type Engine: CopyEngine;

    /// Where the budgeted memory is.
    const RESIDENT_MEMORY: ResidentMemory;

    /// Refuses to offload a model with `budget` bytes resident on this backend when it
    /// cannot (CUDA: weights already uploaded, or not that much device memory free); called
    /// before anything is uploaded or the host store is built.
    fn check_offloadable(&self, budget: u64) -> Result<()>;

    /// The budget `--gpu-mem auto` stands for on this backend (a GPU: its free memory now
    /// plus the driver context the budget counts); backends in host memory have none.
    fn auto_budget(&self) -> Result<u64> {
        Err(crate::error::Error::InvalidArgument(
            "an automatic budget reads a GPU's free memory: on the CPU give --resident-mem a \
             size (e.g. 4G)"
                .into(),
        ))
    }

    /// Scratch the backend allocates for itself during an offloaded request of `shape`:
    /// reserved in the budget as "backend scratch" (the CPU's is counted in the
    /// activations: 0).
    fn scratch_bytes(&self, _shape: &ScratchShape) -> u64 {
        0
    }

    /// Allocates now the scratch `scratch_bytes` reserved that would otherwise grow on
    /// demand, so that it never grows past the reservation.
    fn reserve_scratch(&self, _shape: &ScratchShape) -> Result<()> {
        Ok(())
    }

    /// The copy engine, its staging buffers as `opts` says.
    fn copy_engine(&self, opts: CopyEngineOptions) -> Result<Self::Engine>;

    /// A `rows x cols` matrix over bytes `range` of a filled staging buffer, without copying.
    fn staged_matrix(
        filled: &FilledOf<Self>,
        range: Range<usize>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Matrix>;

    /// Bytes `range` of a filled staging buffer, on the host.
    fn staged_bytes(filled: &FilledOf<Self>, range: Range<usize>) -> Result<Cow<'_, [u8]>>;

    /// A copy of `m` in the backend's resident memory (the caller has reserved it in the
    /// budget).
    fn resident_copy(m: &Self::Matrix) -> Result<Self::Matrix>;

    /// `m`'s bytes on the host.
    fn matrix_bytes(m: &Self::Matrix) -> Result<Cow<'_, [u8]>>;

    /// Bytes `m` holds.
    fn matrix_byte_len(m: &Self::Matrix) -> usize;

    /// A layer's new compact FFN (gate `[k, h]`, up `[k, h]`, down `[h, k]` of a float
    /// dtype) in resident memory: the neurons the old one holds copied within resident
    /// memory, the others from their staged bundles; byte for byte a fresh gather of the new
    /// set (see [`crate::backend::compact`]). The caller has reserved the new bytes.
    fn assemble_compact(&self, update: CompactUpdate<'_, Self>) -> Result<[Self::Matrix; 3]>;
}

/// What [`OffloadBackend::assemble_compact`] builds a layer's new compact FFN from.
pub struct CompactUpdate<'a, B: OffloadBackend> {
    /// The resident compact FFN (its neuron ids ascending; gate, up, down), or None when
    /// the layer holds none: handed over, so that each old matrix can be freed as soon as
    /// its replacement is built (device memory never holds two whole FFNs of the layer).
    pub old: Option<(&'a [u32], [B::Matrix; 3])>,
    /// The bundles (gate row | up row | down column) of the neurons of `new_ids` that `old`
    /// lacks, back to back in ascending id order: bytes `range` of a filled staging buffer.
    pub staged: Option<(&'a FilledOf<B>, Range<usize>)>,
    /// The new set, ascending.
    pub new_ids: &'a [u32],
    /// Hidden size and the FFN's (float) dtype.
    pub hidden: usize,
    pub dtype: DType,
}

/// The engine's filled job type of backend `B`.
pub type FilledOf<B> = <<B as OffloadBackend>::Engine as CopyEngine>::Filled;
