//! The CPU backend under the offloading runtime (`run --resident-mem`): the budget is host
//! memory, the copy engine ([`CpuCopyEngine`]) copies on its own thread (capped to emulate a
//! link when asked), and streamed layers are matrices viewing its staging buffers in place.

use std::borrow::Cow;
use std::ops::Range;

use super::copy_engine::{CpuCopyEngine, Filled};
use crate::backend::compact::{assemble, CompactFfn};
use crate::backend::offload::{CompactUpdate, OffloadBackend, ResidentMemory};
use crate::backend::{CpuBackend, CpuMatrix, SparseOps};
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

    /// Assembled in host memory from the staging buffer in place (a memcpy), then copied
    /// into resident matrices.
    fn assemble_compact(&self, u: CompactUpdate<'_, Self>) -> Result<[CpuMatrix; 3]> {
        let staged = match &u.staged {
            Some((filled, range)) => Self::staged_bytes(filled, range.clone())?,
            None => Cow::Borrowed(&[][..]),
        };
        let old = u.old.as_ref().map(|(ids, [g, up, dn])| CompactFfn {
            ids,
            gate: g.bytes(),
            up: up.bytes(),
            down: dn.bytes(),
        });
        let (gate, up, down) =
            assemble(old.as_ref(), &staged, u.new_ids, u.hidden, u.dtype.size())?;
        // The old matrices are not needed any more: free them before the copies.
        drop(u.old);
        let (k, h) = (u.new_ids.len(), u.hidden);
        Ok([
            self.upload_matrix(gate, u.dtype, k, h)?,
            self.upload_matrix(up, u.dtype, k, h)?,
            self.upload_matrix(down, u.dtype, h, k)?,
        ])
    }
}
