//! A layer's new compact Griffin FFN built on the device (`OffloadBackend::assemble_compact`):
//! only the new neurons' bundles crossed the link (staged by the copy engine); the neurons
//! the layer already held are copied from its old compact matrices by `kernels/assemble.cu`,
//! following a per-neuron source table ([`compact_sources`]) uploaded once (4 bytes a neuron).

use super::buffers::DevMem;
use super::context::{to_u32, KArgs};
use super::ops_basic::launch_grid_stride;
use super::temps::Temp;
use super::{CudaBackend, CudaMatrix};
use crate::backend::compact::compact_sources;
use crate::backend::offload::{CompactUpdate, OffloadBackend};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "assemble_compact";

/// The kernel for elements of `dtype` (bytes are copied unchanged, so only the width counts).
fn kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 | DType::F16 => Ok("assemble_compact_u16"),
        DType::F32 => Ok("assemble_compact_u32"),
        other => Err(Error::InvalidArgument(format!(
            "{OP}: a compact FFN of {other} is regathered on the host (its down matrix is \
             re-encoded), not assembled on the device"
        ))),
    }
}

/// The new compact FFN of `u.new_ids` from `u.old` and the staged bundles, one launch per
/// matrix; each old matrix is dropped once the launch that reads it is queued (device frees
/// are ordered after it), so at most one new matrix is allocated beside the old ones.
pub(crate) fn assemble_compact(
    backend: &CudaBackend,
    u: CompactUpdate<'_, CudaBackend>,
) -> Result<[CudaMatrix; 3]> {
    let ctx = backend.ctx();
    let name = kernel(u.dtype)?;
    let (h, k) = (u.hidden, u.new_ids.len());
    let (old_ids, mut old) = match u.old {
        Some((ids, [g, up, dn])) => (ids, [Some(g), Some(up), Some(dn)]),
        None => (&[][..], [None, None, None]),
    };
    let (src, moved) = compact_sources(old_ids, u.new_ids)?;
    let staged = match &u.staged {
        Some((filled, range)) => Some(CudaBackend::staged_matrix(
            filled,
            range.clone(),
            u.dtype,
            moved,
            3 * h,
        )?),
        None if moved == 0 => None,
        None => {
            return Err(Error::InvalidArgument(format!(
                "{OP}: {moved} neurons to copy in, but nothing staged"
            )))
        }
    };
    let shape = Shape {
        k,
        ko: old_ids.len(),
        moved,
        h,
    };
    shape.check_old(&old, u.dtype)?;
    let table = Temp::upload(ctx, OP, &src)?;
    let mut build = |part: usize| -> Result<CudaMatrix> {
        let (rows, cols) = if part < 2 { (k, h) } else { (h, k) };
        let out = DevMem::new(ctx, OP, u.dtype.bytes_for(k * h))?;
        let old_ptr = old[part].as_ref().map_or(0, CudaMatrix::device_ptr);
        let staged_ptr = staged.as_ref().map_or(0, CudaMatrix::device_ptr);
        let args = KArgs::new()
            .ptr(old_ptr)
            .ptr(staged_ptr)
            .ptr(table.ptr())
            .ptr(out.ptr())
            .u32(to_u32(OP, "new neurons", k)?)
            .u32(to_u32(OP, "old neurons", shape.ko)?)
            .u32(to_u32(OP, "staged neurons", moved)?)
            .u32(to_u32(OP, "hidden", h)?)
            .u32(part as u32);
        launch_grid_stride(ctx, OP, name, shape.elements()?, args)?;
        // Queued: the old matrix's memory goes back after the kernel has read it.
        old[part] = None;
        Ok(CudaMatrix::on_device(out, u.dtype, rows, cols))
    };
    Ok([build(0)?, build(1)?, build(2)?])
}

/// The sizes of one assembly.
struct Shape {
    k: usize,
    ko: usize,
    moved: usize,
    h: usize,
}

impl Shape {
    /// Elements of each new matrix (the kernel indexes them with 64 bits).
    fn elements(&self) -> Result<usize> {
        self.k.checked_mul(self.h).ok_or_else(|| {
            Error::InvalidArgument(format!("{OP}: {} x {} overflows", self.k, self.h))
        })
    }

    /// `Err` unless the old matrices are device matrices of `ko` neurons of `dtype` (the
    /// kernel reads them by those sizes) and the new set keeps only neurons it can source.
    fn check_old(&self, old: &[Option<CudaMatrix>; 3], dtype: DType) -> Result<()> {
        for (part, m) in old.iter().enumerate() {
            let Some(m) = m else { continue };
            let want = if part < 2 {
                (self.ko, self.h)
            } else {
                (self.h, self.ko)
            };
            if (m.rows, m.cols) != want || m.dtype != dtype || !m.is_on_device() {
                return Err(Error::InvalidArgument(format!(
                    "{OP}: old compact matrix {part} is {m:?}, expected {} x {} {dtype} on \
                     the device",
                    want.0, want.1
                )));
            }
        }
        if old.iter().all(Option::is_none) && self.ko > 0 {
            return Err(Error::InvalidArgument(format!(
                "{OP}: {} old neurons but no old matrices",
                self.ko
            )));
        }
        if self.k > self.ko + self.moved {
            return Err(Error::InvalidArgument(format!(
                "{OP}: {} new neurons from {} old and {} staged",
                self.k, self.ko, self.moved
            )));
        }
        Ok(())
    }
}
