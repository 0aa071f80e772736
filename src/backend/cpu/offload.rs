//! The CPU backend under the offloading runtime (`run --resident-mem`): the budget is host
//! memory, the copy engine ([`CpuCopyEngine`]) copies on its own thread (capped to emulate a
//! link when asked), and streamed layers are matrices viewing its staging buffers in place.

use std::borrow::Cow;
use std::ops::Range;

use super::copy_engine::{CpuCopyEngine, Filled};
use crate::backend::offload::{OffloadBackend, ResidentMemory};
use crate::backend::{CpuBackend, CpuMatrix};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::transfer::CopyEngineOptions;

impl OffloadBackend for CpuBackend {
    type Engine = CpuCopyEngine;

    const RESIDENT_MEMORY: ResidentMemory = ResidentMemory::Host;

    fn check_offloadable(&self, _budget: u64) -> Result<()> {
        Ok(())
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
