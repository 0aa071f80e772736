//! Device memory of the CUDA backend: [`DevMem`] (raw bytes, freed on drop), the backend's
//! f32 buffer [`CudaBuf`] and weight matrix [`CudaMatrix`] (in device memory, or for
//! offloading in host memory or a copy engine's staging buffer).

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use super::context::Ctx;
use crate::error::{Error, Result};
use crate::tensor::DType;

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
        mem.ptr = ctx.alloc_raw(op, bytes)?;
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

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.ctx.free_raw(self.ptr);
    }
}

/// A device buffer of `len` f32 values (activations, norm weights, biases).
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

/// Where a [`CudaMatrix`]'s bytes live.
#[derive(Clone)]
pub(crate) enum MatrixData {
    /// Device memory the matrix owns (shared by its clones).
    Device(Arc<DevMem>),
    /// Left in host memory, in the checkpoint mapping: the offloading runtime's weights that
    /// are not resident (streamed, or copied to the device when the plan keeps them). No
    /// kernel may read it; the backend's ops refuse it, except `embed`, which looks rows up
    /// on the host (the planner keeps the embedding table there).
    Host {
        ctx: Arc<Ctx>,
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    /// A window of a copy engine's device staging buffer (a streamed layer's weights): the
    /// `Arc` keeps the buffer allocated while the view lives; the engine refuses to take the
    /// buffer back for the next copy while a view of it is alive.
    Staged { mem: Arc<DevMem>, offset: usize },
}

/// A `[rows, cols]` weight matrix in its stored dtype, row-major: in device memory, or
/// (offloading) in host memory or a staging buffer, see [`MatrixData`]. Clones share the
/// bytes.
#[derive(Clone)]
pub struct CudaMatrix {
    pub(crate) data: MatrixData,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl CudaMatrix {
    /// A matrix owning `mem`.
    pub(crate) fn on_device(mem: DevMem, dtype: DType, rows: usize, cols: usize) -> CudaMatrix {
        CudaMatrix {
            data: MatrixData::Device(Arc::new(mem)),
            dtype,
            rows,
            cols,
        }
    }

    /// A matrix left in host memory at `range` of `map` (checked to hold it).
    pub(crate) fn in_host(
        ctx: &Arc<Ctx>,
        map: Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CudaMatrix> {
        check_len(rows, cols, dtype, range.len(), "host")?;
        if range.end > map.len() {
            return Err(Error::InvalidArgument(format!(
                "host matrix: bytes {range:?} of a {}-byte mapping",
                map.len()
            )));
        }
        Ok(CudaMatrix {
            data: MatrixData::Host {
                ctx: ctx.clone(),
                map,
                range,
            },
            dtype,
            rows,
            cols,
        })
    }

    /// A view of `rows x cols` elements at byte `offset` of a staging buffer (checked to fit).
    pub(crate) fn staged(
        mem: Arc<DevMem>,
        offset: usize,
        len: usize,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CudaMatrix> {
        check_len(rows, cols, dtype, len, "staged")?;
        if offset.checked_add(len).is_none_or(|end| end > mem.bytes()) {
            return Err(Error::InvalidArgument(format!(
                "staged matrix: {len} bytes at offset {offset} of a {}-byte staging buffer",
                mem.bytes()
            )));
        }
        Ok(CudaMatrix {
            data: MatrixData::Staged { mem, offset },
            dtype,
            rows,
            cols,
        })
    }

    /// The device address of element (0, 0); 0 for a matrix in host memory (which the ops
    /// refuse before launching anything, see [`CudaMatrix::check_on_device`]).
    pub fn device_ptr(&self) -> u64 {
        match &self.data {
            MatrixData::Device(mem) => mem.ptr(),
            MatrixData::Host { .. } => 0,
            MatrixData::Staged { mem, offset } => mem.ptr() + *offset as u64,
        }
    }

    /// Whether kernels can read the matrix (device memory or a staging buffer).
    pub fn is_on_device(&self) -> bool {
        !matches!(self.data, MatrixData::Host { .. })
    }

    /// `Err` for a matrix left in host memory: a kernel would read address 0.
    pub(crate) fn check_on_device(&self, op: &str) -> Result<()> {
        match self.is_on_device() {
            true => Ok(()),
            false => Err(Error::InvalidArgument(format!(
                "{op}: a {} x {} weight is in host memory (offloaded and not streamed for this \
                 pass): the offloading runtime must stream or upload it first",
                self.rows, self.cols
            ))),
        }
    }

    /// The bytes, when the matrix is in host memory.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.data {
            MatrixData::Host { map, range, .. } => map.get(range.clone()),
            _ => None,
        }
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        match &self.data {
            MatrixData::Device(mem) | MatrixData::Staged { mem, .. } => &mem.ctx,
            MatrixData::Host { ctx, .. } => ctx,
        }
    }

    /// Bytes the matrix holds.
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.rows * self.cols)
    }

    /// The matrix's bytes on the host (a device or staged matrix is read back, which waits
    /// for queued work).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        if let Some(bytes) = self.host_bytes() {
            return Ok(bytes.to_vec());
        }
        let mut out = vec![0u8; self.byte_len()];
        self.ctx()
            .dtoh("matrix read", &mut out, self.device_ptr())?;
        Ok(out)
    }
}

/// `Err` unless `len` bytes hold `rows x cols` elements of `dtype`.
/// `Err` for a dtype no CUDA kernel computes on: every new CUDA matrix passes here (host and
/// staged views through `check_len`, uploads in `ops_ffn::upload_matrix`), so the kernels
/// see f32, f16, bf16 and the GGUF block formats of `kernels/quant.cu` only.
pub(crate) fn cuda_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => Ok(()),
        DType::Q5K => Err(Error::InvalidArgument(format!(
            "the CUDA backend computes on f32, f16, bf16, q4_0, q4_1, q8_0, q4_k and q6_k \
             matrices, not {dtype} yet: load the model with --weights bf16"
        ))),
    }
}

fn check_len(rows: usize, cols: usize, dtype: DType, len: usize, what: &str) -> Result<()> {
    cuda_dtype(dtype)?;
    let (block, _) = dtype.block();
    let need = rows
        .checked_mul(cols)
        .filter(|_| cols.is_multiple_of(block))
        .map(|n| dtype.bytes_for(n));
    match need {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{what} matrix of {rows} x {cols} {dtype} over {len} bytes"
        ))),
    }
}

impl std::fmt::Debug for CudaMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.data {
            MatrixData::Device(_) => "device",
            MatrixData::Host { .. } => "host",
            MatrixData::Staged { .. } => "staged",
        };
        write!(
            f,
            "CudaMatrix({} x {} {} {place} at {:#x})",
            self.rows,
            self.cols,
            self.dtype,
            self.device_ptr()
        )
    }
}
