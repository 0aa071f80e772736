//! The CUDA backend under the offloading runtime (`run --device cuda --gpu-mem SIZE`):
//! [`DeviceCopyEngine`] as its copy engine, streamed layers as `CudaMatrix` views of the
//! device staging buffers, resident weights uploaded from the host mapping the model was
//! loaded into (`CudaBackend::with_host_weights`).

use std::borrow::Cow;
use std::ops::Range;

use super::memory::{DeviceCopyEngine, DeviceFilled};
use super::{CudaBackend, CudaMatrix};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::offload::offload_backend::{CopyEngine, OffloadBackend, StagedJob};
use crate::offload::placement::GPU_LINK_GBPS;
use crate::offload::runtime::OffloadOptions;
use crate::offload::stream::{CopyEngineOptions, CopyJob, CopyStats};

/// What cuBLAS allocates for its own workspace, as the budget assumes it (its default on
/// recent GPUs is up to 32 MiB; the library does not report it).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The widest input a matmul of `config` reads (the down projection, the attention output
/// or the hidden state): the bf16 GEMM's activation copy is rows x this.
fn widest_cols(config: &ModelConfig) -> usize {
    (config.hidden_size)
        .max(config.intermediate_size)
        .max(config.q_dim())
}

/// The device rope table for `context` positions: f32 cos/sin rows of `head_dim`, grown by
/// doubling from 1024 positions (so at most twice the positions needed).
fn rope_bytes(config: &ModelConfig, context: usize) -> usize {
    2 * context.max(1024) * config.head_dim * 4
}

impl StagedJob for DeviceFilled {
    fn layer(&self) -> usize {
        self.layer
    }

    fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }
}

impl CopyEngine for DeviceCopyEngine {
    type Filled = DeviceFilled;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        DeviceCopyEngine::submit(self, jobs)
    }

    fn wait(&mut self, layer: usize) -> Result<DeviceFilled> {
        DeviceCopyEngine::wait(self, layer)
    }

    fn release(&mut self, filled: DeviceFilled) -> Result<()> {
        DeviceCopyEngine::release(self, filled)
    }

    fn cancel(&mut self) -> Result<()> {
        DeviceCopyEngine::cancel(self)
    }

    fn stats(&mut self) -> Result<CopyStats> {
        DeviceCopyEngine::stats(self)
    }

    fn reset_stats(&mut self) -> Result<()> {
        DeviceCopyEngine::reset_stats(self)
    }
}

impl OffloadBackend for CudaBackend {
    type Engine = DeviceCopyEngine;

    const BUDGET_OPTION: &'static str = "--gpu-mem";

    /// The model must have been loaded with its weights in host memory (else every weight
    /// is already on the device, outside the budget), the device must have the budget free
    /// now, and no link cap may be asked: only the CPU engine emulates one, the CUDA engine
    /// copies over the real link.
    fn check_offloadable(&self, opts: &OffloadOptions) -> Result<()> {
        if let Some(g) = opts.link_gbps {
            return Err(Error::InvalidArgument(format!(
                "a {g} GB/s link cap is emulated by the CPU copy engine only: the CUDA engine \
                 copies over the real link (drop the cap)"
            )));
        }
        if !self.host_weights() {
            return Err(Error::InvalidArgument(
                "offloading on CUDA needs the model loaded on a backend made with \
                 CudaBackend::with_host_weights (this one uploaded every weight to the GPU)"
                    .into(),
            ));
        }
        self.device().check_budget(opts.budget)
    }

    /// The real link is not capped; the planner assumes `planner_link_gbps` (`run --gpu-mem
    /// --link-gbps`) or `plan --gpu-mem`'s default PCIe link, and its prediction is reported
    /// for every run.
    fn planner_link(&self, opts: &OffloadOptions) -> (f64, bool) {
        (opts.planner_link_gbps.unwrap_or(GPU_LINK_GBPS), true)
    }

    /// The new compact FFN is gathered on the host and uploaded once (see the trait).
    fn assembles_from_staging() -> bool {
        false
    }

    /// The bf16 GEMM's activation copy for `gemm_rows` rows through the widest matrix,
    /// cuBLAS's workspace and the rope table (see `CUBLAS_WORKSPACE_BYTES`, `rope_bytes`).
    fn scratch_bytes(&self, config: &ModelConfig, context: usize, gemm_rows: usize) -> u64 {
        let act16 = self
            .matmul_state()
            .act16_bytes(gemm_rows, widest_cols(config));
        (act16 + CUBLAS_WORKSPACE_BYTES + rope_bytes(config, context)) as u64
    }

    fn reserve_scratch(&self, config: &ModelConfig, gemm_rows: usize) -> Result<()> {
        let bytes = self
            .matmul_state()
            .act16_bytes(gemm_rows, widest_cols(config));
        self.matmul_state().presize_act16(self.ctx(), bytes)
    }

    fn copy_engine(&self, opts: CopyEngineOptions) -> Result<DeviceCopyEngine> {
        DeviceCopyEngine::new(self, opts)
    }

    fn staged_matrix(
        filled: &DeviceFilled,
        range: Range<usize>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CudaMatrix> {
        if range.start > range.end {
            return Err(Error::CopyEngine(format!(
                "layer {}: staged range {range:?}",
                filled.layer
            )));
        }
        CudaMatrix::staged(
            filled.mem.clone(),
            range.start,
            range.len(),
            dtype,
            rows,
            cols,
        )
    }

    /// Read back from the staging buffer, after the copy (the compute stream waited for it
    /// in `wait`, and the read-back is queued on that stream).
    fn staged_bytes(filled: &DeviceFilled, range: Range<usize>) -> Result<Cow<'_, [u8]>> {
        if range.start > range.end || range.end > filled.mem.bytes() {
            return Err(Error::CopyEngine(format!(
                "layer {}: bytes {range:?} of a {}-byte staging buffer",
                filled.layer,
                filled.mem.bytes()
            )));
        }
        let mut out = vec![0u8; range.len()];
        let ptr = filled.mem.ptr() + range.start as u64;
        filled.mem.ctx().dtoh("staged read", &mut out, ptr)?;
        Ok(Cow::Owned(out))
    }

    fn resident_copy(m: &CudaMatrix) -> Result<CudaMatrix> {
        let upload =
            |bytes: &[u8]| super::ops_ffn::upload_matrix(m.ctx(), bytes, m.dtype, m.rows, m.cols);
        // Host weights upload straight from their mapping.
        match m.host_bytes() {
            Some(b) => upload(b),
            None => upload(&m.to_host()?),
        }
    }

    fn matrix_bytes(m: &CudaMatrix) -> Result<Cow<'_, [u8]>> {
        match m.host_bytes() {
            Some(b) => Ok(Cow::Borrowed(b)),
            None => Ok(Cow::Owned(m.to_host()?)),
        }
    }

    fn matrix_byte_len(m: &CudaMatrix) -> usize {
        m.byte_len()
    }
}
