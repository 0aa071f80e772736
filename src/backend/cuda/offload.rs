//! The CUDA backend under the offloading runtime (`run --device cuda --gpu-mem SIZE`):
//! [`DeviceCopyEngine`] as its copy engine, streamed layers as `CudaMatrix` views of the
//! device staging buffers, resident weights uploaded from the host mapping the model was
//! loaded into (`CudaBackend::with_host_weights`).

use std::borrow::Cow;
use std::ops::Range;

use super::copy_engine::{DeviceCopyEngine, DeviceFilled};
use super::temps::reserve_temporaries;
use super::{CudaBackend, CudaMatrix};
use crate::backend::offload::{gpu_scratch_bytes, gpu_temporaries_bytes};
use crate::backend::offload::{CompactUpdate, OffloadBackend, ResidentMemory, ScratchShape};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::transfer::CopyEngineOptions;

impl OffloadBackend for CudaBackend {
    type Engine = DeviceCopyEngine;

    const RESIDENT_MEMORY: ResidentMemory = ResidentMemory::Device;

    /// The model must have been loaded with its weights in host memory (else every weight
    /// is already on the device, outside the budget), and the device must have the budget
    /// free now.
    fn check_offloadable(&self, budget: u64) -> Result<()> {
        if !self.host_weights() {
            return Err(Error::InvalidArgument(
                "offloading on CUDA needs the model loaded on a backend made with \
                 CudaBackend::with_host_weights (this one uploaded every weight to the GPU)"
                    .into(),
            ));
        }
        self.device().check_budget(budget)
    }

    /// The bf16 GEMM's activation copy for `gemm_rows` rows through the widest matrix,
    /// cuBLAS's workspace and the rope table: `offload::budget::gpu_scratch_bytes`, which
    /// `plan --gpu-mem` books too.
    fn scratch_bytes(&self, shape: &ScratchShape) -> u64 {
        let act16 = self.matmul_state().act16_bytes(1, 1) > 0;
        gpu_scratch_bytes(shape, act16)
    }

    fn reserve_scratch(&self, shape: &ScratchShape) -> Result<()> {
        let bytes = self
            .matmul_state()
            .act16_bytes(shape.gemm_rows, shape.widest_cols);
        self.matmul_state().presize_act16(self.ctx(), bytes)?;
        let act16 = bytes > 0;
        let temps = usize::try_from(gpu_temporaries_bytes(shape, act16)).unwrap_or(usize::MAX);
        reserve_temporaries(self.ctx(), temps)
    }

    fn auto_budget(&self) -> Result<u64> {
        self.device().auto_budget()
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

    /// On the device from the staged bundles and the old matrices (`kernels/assemble.cu`):
    /// nothing but the new neurons and a 4-byte-a-neuron table crosses the link.
    fn assemble_compact(&self, u: CompactUpdate<'_, Self>) -> Result<[CudaMatrix; 3]> {
        super::assemble::assemble_compact(self, u)
    }
}
