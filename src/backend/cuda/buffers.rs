//! Device memory of the CUDA backend: [`DevMem`] (raw bytes, freed on drop), the backend's
//! f32 buffer [`CudaBuf`] and weight matrix [`CudaMatrix`].

use std::sync::Arc;

use cudarc::driver::result;

use super::context::{call, Ctx};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// `bytes` bytes of device memory, freed on drop (never panicking). With stream-ordered
/// allocation the free is queued on the compute stream, after every kernel queued before
/// it; otherwise the stream is drained first. So dropping a buffer (or a per-call
/// temporary) right after queueing work on it is safe.
pub(crate) struct DevMem {
    ctx: Arc<Ctx>,
    ptr: u64,
    bytes: usize,
}

impl DevMem {
    /// Uninitialised memory (0 bytes: a null pointer, nothing allocated).
    pub fn new(ctx: &Arc<Ctx>, op: &str, bytes: usize) -> Result<DevMem> {
        let mut mem = DevMem {
            ctx: ctx.clone(),
            ptr: 0,
            bytes,
        };
        if bytes == 0 {
            return Ok(mem);
        }
        ctx.bind()?;
        let out_of_memory = |e: Error| match e {
            Error::Cuda(msg) => Error::Cuda(format!(
                "{msg} (allocating {bytes} bytes of device memory: the GPU is full; use a \
                 smaller model, context or batch)"
            )),
            other => other,
        };
        mem.ptr = if ctx.async_alloc {
            let stream = ctx.raw_stream();
            // SAFETY: the stream is live; the memory is used only in stream order.
            call(op, "cuMemAllocAsync", || unsafe {
                result::malloc_async(stream, bytes)
            })
            .map_err(out_of_memory)?
        } else {
            // SAFETY: the context is current; the memory is written before it is read.
            call(op, "cuMemAlloc", || unsafe { result::malloc_sync(bytes) })
                .map_err(out_of_memory)?
        };
        Ok(mem)
    }

    /// Zeroed memory.
    pub fn zeroed(ctx: &Arc<Ctx>, op: &str, bytes: usize) -> Result<DevMem> {
        let mem = DevMem::new(ctx, op, bytes)?;
        ctx.zero(op, mem.ptr, bytes)?;
        Ok(mem)
    }

    /// A device copy of `data` (at least one element's room, so kernels never get a null
    /// pointer for an empty list).
    pub fn upload<T: Copy>(ctx: &Arc<Ctx>, op: &str, data: &[T]) -> Result<DevMem> {
        let bytes = std::mem::size_of_val(data).max(std::mem::size_of::<T>());
        let mem = DevMem::new(ctx, op, bytes)?;
        ctx.htod(op, mem.ptr, data)?;
        Ok(mem)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ptr == 0 || self.ctx.bind().is_err() {
            return;
        }
        let ptr = self.ptr;
        // Errors cannot be reported from drop; the context frees everything at exit anyway.
        if self.ctx.async_alloc {
            let stream = self.ctx.raw_stream();
            // SAFETY: allocated on this stream by cuMemAllocAsync, freed once.
            let _ = call("free", "cuMemFreeAsync", || unsafe {
                result::free_async(ptr, stream)
            });
        } else {
            // Kernels queued on the memory must finish before a synchronous free.
            let _ = self.ctx.synchronize("free");
            // SAFETY: allocated by cuMemAlloc, freed once.
            let _ = call("free", "cuMemFree", || unsafe { result::free_sync(ptr) });
        }
    }
}

/// A device buffer of `len` f32 values (activations, KV cache, norm weights, biases).
pub struct CudaBuf {
    pub(crate) mem: DevMem,
    len: usize,
}

impl CudaBuf {
    pub(crate) fn from_mem(mem: DevMem, len: usize) -> CudaBuf {
        CudaBuf { mem, len }
    }

    /// Floats the buffer holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address (0 for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// Address of element `i` (callers check `i <= len`).
    pub(crate) fn at(&self, i: usize) -> u64 {
        self.mem.ptr() + (i * 4) as u64
    }

    /// The whole buffer copied back to the host (waits for queued work).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.len];
        self.mem.ctx.dtoh("read", &mut out, self.mem.ptr())?;
        Ok(out)
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} f32 at {:#x})", self.len, self.mem.ptr())
    }
}

/// A `[rows, cols]` weight matrix in device memory, in its stored dtype, row-major.
pub struct CudaMatrix {
    pub(crate) mem: DevMem,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl CudaMatrix {
    /// The device address of element (0, 0).
    pub fn device_ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// Bytes the matrix holds.
    pub fn byte_len(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }

    /// The matrix's bytes copied back to the host (waits for queued work).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.byte_len()];
        self.mem.ctx.dtoh("matrix read", &mut out, self.mem.ptr())?;
        Ok(out)
    }
}

impl std::fmt::Debug for CudaMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaMatrix({} x {} {} at {:#x})",
            self.rows,
            self.cols,
            self.dtype,
            self.mem.ptr()
        )
    }
}
