//! What the offloading runtime needs from a backend beyond [`Backend`]: a copy engine that
//! stages streamed weights next to compute, matrices viewing its staging buffers, and
//! resident copies of weights. One runtime (`runtime`) is written against these traits; the
//! CPU backend implements them here, the CUDA backend in `backend::cuda::offload`.

use std::borrow::Cow;
use std::ops::Range;

use crate::backend::{Backend, CpuBackend, CpuMatrix};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::offload::runtime::OffloadOptions;
use crate::offload::stream::{CopyEngineOptions, CopyJob, CopyStats, CpuCopyEngine, Filled};

/// A staging buffer one job filled, as compute holds it between `wait` and `release`.
pub trait StagedJob {
    /// The job's layer.
    fn layer(&self) -> usize;
    /// Where each of the job's pieces landed in the staging buffer (byte offsets), in order.
    fn pieces(&self) -> &[Range<usize>];
}

/// The submit / wait / release / cancel contract both copy engines keep: jobs are filled in
/// submission order, at most as many ahead of compute as there are staging buffers; `wait`
/// hands out the next one (which must be for the layer asked), `release` gives its buffer
/// back once compute no longer reads it; `cancel` drops everything queued.
///
/// One difference: `release` while a view of the buffer is still alive is an error on both,
/// but the CPU engine parks the buffer and takes it back by itself once the last view is
/// dropped, while the CUDA engine keeps it held by compute until `cancel` (which replaces
/// it with a fresh buffer if the view is still alive). Until then the CUDA engine has one
/// staging buffer fewer, and a `wait` that needs it fails instead of blocking.
pub trait CopyEngine {
    type Filled: StagedJob;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()>;
    fn wait(&mut self, layer: usize) -> Result<Self::Filled>;
    fn release(&mut self, filled: Self::Filled) -> Result<()>;
    fn cancel(&mut self) -> Result<()>;
    /// What the engine did since it was made or `reset_stats` (`&mut`: the CUDA engine
    /// collects its event timings here, waiting for the copies still in flight).
    fn stats(&mut self) -> Result<CopyStats>;
    fn reset_stats(&mut self) -> Result<()>;
}

/// The engine's filled job type of backend `B`.
pub type FilledOf<B> = <<B as OffloadBackend>::Engine as CopyEngine>::Filled;

/// A backend the offloading runtime can drive. Matrices must be cheap to clone (shared
/// bytes): the runtime hands the same resident matrices to every request's Griffin FFN.
pub trait OffloadBackend: Backend<Matrix: Clone> + Sized {
    type Engine: CopyEngine;

    /// The option that sets the budget ("--resident-mem", "--gpu-mem"): plans and errors
    /// name it.
    const BUDGET_OPTION: &'static str;

    /// Refuses to offload a model on this backend as `opts` asks (its budget, its link cap),
    /// when it cannot; called before anything is uploaded or the host store is built.
    fn check_offloadable(&self, opts: &OffloadOptions) -> Result<()>;

    /// The host-to-device GB/s the planner assumes for `opts` (CPU: the emulated cap, if
    /// any; CUDA: `planner_link_gbps` or the default), and whether its predictions describe
    /// this run (the CPU's uncapped "link" is memcpy, which the planner does not model).
    fn planner_link(&self, opts: &OffloadOptions) -> (f64, bool);

    /// Whether neurons a request moves into a resident layer are assembled from the copy
    /// engine's staging buffer (CPU: it is host memory, assembly is a memcpy). When not
    /// (CUDA: reading the staging buffer and the old compact FFN back would cross the link
    /// twice more), the runtime gathers the layer's new compact FFN on the host and uploads
    /// it once, counting the upload as streamed bytes.
    fn assembles_from_staging() -> bool;

    /// Device scratch the backend allocates for itself during an offloaded request of
    /// `context` cache rows whose largest matmul multiplies `gemm_rows` rows: reserved in
    /// the budget as "backend scratch" (the CPU's is counted in the activations: 0).
    fn scratch_bytes(&self, _config: &ModelConfig, _context: usize, _gemm_rows: usize) -> u64 {
        0
    }

    /// Allocates now the scratch `scratch_bytes` reserved that would otherwise grow on
    /// demand, so that it never grows past the reservation.
    fn reserve_scratch(&self, _config: &ModelConfig, _gemm_rows: usize) -> Result<()> {
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
}

/// The planner needs a link speed; uncapped CPU copies run at memory speed, far above any
/// PCIe link, so this stands for "not the bottleneck".
const UNCAPPED_LINK_GBPS: f64 = 1000.0;

impl StagedJob for Filled {
    fn layer(&self) -> usize {
        self.layer
    }

    fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }
}

impl CopyEngine for CpuCopyEngine {
    type Filled = Filled;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        CpuCopyEngine::submit(self, jobs)
    }

    fn wait(&mut self, layer: usize) -> Result<Filled> {
        CpuCopyEngine::wait(self, layer)
    }

    fn release(&mut self, filled: Filled) -> Result<()> {
        CpuCopyEngine::release(self, filled)
    }

    fn cancel(&mut self) -> Result<()> {
        CpuCopyEngine::cancel(self)
    }

    fn stats(&mut self) -> Result<CopyStats> {
        Ok(CpuCopyEngine::stats(self))
    }

    fn reset_stats(&mut self) -> Result<()> {
        CpuCopyEngine::reset_stats(self);
        Ok(())
    }
}

impl OffloadBackend for CpuBackend {
    type Engine = CpuCopyEngine;

    const BUDGET_OPTION: &'static str = "--resident-mem";

    fn check_offloadable(&self, _opts: &OffloadOptions) -> Result<()> {
        Ok(())
    }

    fn planner_link(&self, opts: &OffloadOptions) -> (f64, bool) {
        let cap = opts.link_gbps;
        (cap.unwrap_or(UNCAPPED_LINK_GBPS), cap.is_some())
    }

    fn assembles_from_staging() -> bool {
        true
    }

    fn copy_engine(&self, opts: CopyEngineOptions) -> Result<CpuCopyEngine> {
        CpuCopyEngine::new(opts)
    }

    fn staged_matrix(
        filled: &Filled,
        range: Range<usize>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CpuMatrix> {
        CpuMatrix::view(filled.buffer.clone(), range, dtype, rows, cols)
    }

    fn staged_bytes(filled: &Filled, range: Range<usize>) -> Result<Cow<'_, [u8]>> {
        match filled.buffer.get(range.clone()) {
            Some(bytes) => Ok(Cow::Borrowed(bytes)),
            None => Err(Error::CopyEngine(format!(
                "layer {}: bytes {range:?} of a {}-byte staging buffer",
                filled.layer,
                filled.buffer.len()
            ))),
        }
    }

    fn resident_copy(m: &CpuMatrix) -> Result<CpuMatrix> {
        m.resident_copy()
    }

    fn matrix_bytes(m: &CpuMatrix) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(m.bytes()))
    }

    fn matrix_byte_len(m: &CpuMatrix) -> usize {
        m.byte_len()
    }
}
