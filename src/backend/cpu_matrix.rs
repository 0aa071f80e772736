//! The CPU backend's weight matrix: bytes left in the memory-mapped checkpoint (or built at
//! run time) in their stored dtype, and the decode copies built from them on first use.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;

use super::cpu::{PackedRows, ThreadPool};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Where a matrix's bytes live.
#[derive(Clone)]
pub(super) enum Storage {
    /// A range of the memory-mapped checkpoint (never copied).
    Mapped(Arc<Mmap>, Range<usize>),
    /// Bytes built at run time (neuron bundles, a gathered Griffin FFN), in an anonymous
    /// mapping backed by huge pages where the kernel allows.
    Owned(Arc<Mmap>),
}

/// A `[rows, cols]` weight matrix in its stored dtype, left in the checkpoint mapping or
/// owned (built at run time).
#[derive(Clone)]
pub struct CpuMatrix {
    storage: Storage,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// What decode builds from the matrix on first use; `None` for views and resident
    /// copies of the offloading runtime (it refills a view's bytes, and counts a resident
    /// copy's bytes, and only those).
    pub(super) aids: Option<Arc<DecodeAids>>,
}

/// Copies of a matrix's weights that make one-token products faster, built by the first
/// product that wants them: only matrices that decode pay their bytes (not a full model that
/// only verifies Sirius windows, nor the matrices Griffin gathers from).
#[derive(Default)]
pub(super) struct DecodeAids {
    /// Q4_0/Q4_1/Q8_0 in the interleaved layout ([`PackedRows`]; a Q8_0 one carries the
    /// block norms a head's logits bound their error with); `None` inside for other formats
    /// and shapes.
    packed: OnceLock<Option<PackedRows>>,
}

impl CpuMatrix {
    pub(super) fn with_aids(storage: Storage, dtype: DType, rows: usize, cols: usize) -> CpuMatrix {
        CpuMatrix {
            storage,
            dtype,
            rows,
            cols,
            aids: Some(Arc::default()),
        }
    }

    /// The interleaved decode copy, built on first use (on `pool`); `None` where there is
    /// none.
    pub(super) fn packed(&self, pool: &ThreadPool) -> Option<&PackedRows> {
        let aids = self.aids.as_ref()?;
        aids.packed
            .get_or_init(|| {
                PackedRows::pack_on(pool, self.dtype, self.bytes(), self.rows, self.cols)
            })
            .as_ref()
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(map, range) => &map[range.clone()],
            Storage::Owned(map) => &map[..self.dtype.bytes_for(self.rows * self.cols)],
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.dtype.bytes_for(self.cols)
    }

    /// A matrix over `range` of a shared read-only mapping, without copying: the offloading
    /// runtime's view of a filled staging buffer, or of host memory.
    pub fn view(
        map: Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CpuMatrix> {
        if range.end > map.len() || range.len() != dtype.bytes_for(rows * cols) {
            return Err(Error::InvalidArgument(format!(
                "a {rows} x {cols} {dtype} matrix needs {} bytes; got bytes {range:?} of a {}-byte buffer",
                dtype.bytes_for(rows * cols),
                map.len()
            )));
        }
        Ok(CpuMatrix {
            storage: Storage::Mapped(map, range),
            dtype,
            rows,
            cols,
            aids: None,
        })
    }

    /// A private copy of the matrix in fresh (huge-page) memory: offloading's resident copy
    /// of a weight that otherwise stays in the checkpoint mapping.
    pub fn resident_copy(&self) -> Result<CpuMatrix> {
        Ok(CpuMatrix {
            storage: Storage::Owned(Arc::new(huge_page_copy(self.bytes())?)),
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            aids: None,
        })
    }

    /// Bytes the matrix holds.
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.rows * self.cols)
    }
}

/// `bytes` copied into a fresh read-only anonymous mapping advised to use transparent huge
/// pages. Sparse kernels jump between scattered neurons; with 4 KiB pages nearly every jump
/// is a TLB miss, with 2 MiB pages almost none is.
pub(super) fn huge_page_copy(bytes: &[u8]) -> Result<Mmap> {
    let io = |e: std::io::Error| Error::io("anonymous memory for a weight matrix", e);
    let mut map = memmap2::MmapOptions::new()
        .len(bytes.len().max(1))
        .map_anon()
        .map_err(io)?;
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        tracing::debug!("madvise(MADV_HUGEPAGE) refused: {e}");
    }
    map[..bytes.len()].copy_from_slice(bytes);
    map.make_read_only().map_err(io)
}
