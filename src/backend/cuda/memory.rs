//! Device memory, pinned host staging, streams and events: the device side of the offloading
//! runtime (`crate::offload`), written against cudarc's driver API (`result` layer, errors as
//! values).
//!
//! - [`DeviceArena`] allocates device memory under the `--gpu-mem` budget; the budget is kept
//!   by a [`ResidentArena`], which refuses before anything is allocated.
//! - [`PinnedBuffer`] is page-locked host memory (cuMemHostAlloc), write-combined only for
//!   buffers the CPU fills and never reads (uploads); read-back buffers are plain cached.
//! - [`DeviceCopyEngine`] is the CUDA twin of `offload::stream::CpuCopyEngine` with the same
//!   submit / wait / release / cancel contract over `CopyJob`s: each job lands in a device
//!   staging buffer on the copy stream; `wait` makes the compute stream wait on that copy's
//!   event (the host does not block); `release` records an event on the compute stream, and
//!   the next copy into that buffer waits on it, so a buffer is reused only after its previous
//!   user's kernels finished.
//!
//! Unverified: no GPU was available when this was written, so none of this has run; it
//! compiles against cudarc 0.19 and follows the driver API's documented semantics. Not done
//! yet: the `LayerStream` implementation (it needs the CUDA `Backend`'s matrix type), stall
//! timing (GPU-side, would need timing events), and copying straight from registered host
//! memory instead of through the pinned staging buffers.

use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::device::{driver_error, guarded, CudaDevice};
use crate::error::{Error, Result};
use crate::offload::arena::ResidentArena;
use crate::offload::format_bytes;

mod copy_engine;

pub use copy_engine::{DeviceCopyEngine, DeviceFilled};

/// A block of device memory from a [`DeviceArena`]; freed by [`DeviceArena::free`], or when
/// the arena drops.
#[derive(Debug)]
pub struct DeviceBuffer {
    label: String,
    ptr: sys::CUdeviceptr,
    bytes: u64,
}

impl DeviceBuffer {
    /// The device address (for kernel arguments).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Device memory under a budget: the ResidentArena says yes first, then cuMemAlloc runs.
pub struct DeviceArena {
    device: Arc<CudaDevice>,
    accounting: ResidentArena,
    /// Allocations not yet freed, so that dropping the arena frees them.
    live: Vec<(String, sys::CUdeviceptr)>,
}

impl DeviceArena {
    /// An arena of `budget` bytes on `device`; refuses a budget the device cannot give now.
    pub fn new(device: Arc<CudaDevice>, budget: u64) -> Result<Self> {
        device.check_budget(budget)?;
        Ok(DeviceArena {
            device,
            accounting: ResidentArena::new(budget),
            live: Vec::new(),
        })
    }

    /// Allocates `bytes` under `label` (unique); Error::ArenaFull past the budget, with
    /// nothing allocated.
    pub fn alloc(&mut self, label: &str, bytes: u64) -> Result<DeviceBuffer> {
        if bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "device arena: `{label}` asks for 0 bytes"
            )));
        }
        let size = usize::try_from(bytes)
            .map_err(|_| Error::InvalidArgument(format!("device arena: `{label}` is too large")))?;
        self.accounting.reserve(label, bytes)?;
        let ptr = self
            .device
            .bind()
            // SAFETY: the context is current; the memory is uninitialised, which is fine for
            // raw bytes that are written before they are read.
            .and_then(|()| guarded("cuMemAlloc", || unsafe { result::malloc_sync(size) }))
            .and_then(|r| {
                r.map_err(|e| {
                    Error::Cuda(format!(
                        "cuMemAlloc of {} for `{label}` failed ({:?}) although the --gpu-mem \
                         budget allows it: other processes may hold device memory; lower \
                         --gpu-mem",
                        format_bytes(bytes),
                        e.0
                    ))
                })
            });
        match ptr {
            Ok(ptr) => {
                self.live.push((label.to_string(), ptr));
                Ok(DeviceBuffer {
                    label: label.to_string(),
                    ptr,
                    bytes,
                })
            }
            Err(e) => {
                // Undo the reservation so the arena matches device memory again.
                let _ = self.accounting.release(label);
                Err(e)
            }
        }
    }

    /// Frees a buffer of this arena. No stream may still use it: synchronise the streams
    /// that read or wrote it first.
    pub fn free(&mut self, buffer: DeviceBuffer) -> Result<()> {
        let i = (self.live.iter())
            .position(|(l, p)| *l == buffer.label && *p == buffer.ptr)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "device arena: `{}` was not allocated here",
                    buffer.label
                ))
            })?;
        self.device.bind()?;
        // SAFETY: allocated by cuMemAlloc in `alloc`, freed once (removed from `live` below).
        guarded("cuMemFree", || unsafe { result::free_sync(buffer.ptr) })?
            .map_err(|e| driver_error("cuMemFree", e))?;
        self.live.swap_remove(i);
        self.accounting.release(&buffer.label)?;
        Ok(())
    }

    /// The budget's accounting (used, peak, labels) for reports.
    pub fn accounting(&self) -> &ResidentArena {
        &self.accounting
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        for (_, ptr) in self.live.drain(..) {
            // SAFETY: each pointer came from cuMemAlloc and is freed once. Errors cannot be
            // reported from drop; the context frees everything at exit anyway.
            let _ = guarded("cuMemFree", || unsafe { result::free_sync(ptr) });
        }
    }
}

/// How the CPU uses a pinned buffer, which decides whether it may be write-combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAccess {
    /// The CPU only writes it (host-to-device staging): write-combined, faster over PCIe.
    Upload,
    /// The CPU reads it back (device-to-host results): cached, since reading write-combined
    /// memory from the CPU is uncached and very slow.
    ReadBack,
}

/// Page-locked host memory, zeroed at allocation.
pub struct PinnedBuffer {
    device: Arc<CudaDevice>,
    ptr: *mut u8,
    bytes: usize,
    access: HostAccess,
}

// SAFETY: the memory is owned by this value alone; the driver lets any thread use it.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(device: &Arc<CudaDevice>, bytes: usize, access: HostAccess) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::InvalidArgument(
                "a pinned buffer must hold at least one byte".into(),
            ));
        }
        // PORTABLE: usable from any context, should more than one exist.
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE
            | match access {
                HostAccess::Upload => sys::CU_MEMHOSTALLOC_WRITECOMBINED,
                HostAccess::ReadBack => 0,
            };
        device.bind()?;
        // SAFETY: the context is current; the result is checked before use.
        let ptr = guarded("cuMemHostAlloc", || unsafe {
            result::malloc_host(bytes, flags)
        })?
        .map_err(|e| {
            Error::Cuda(format!(
                "cannot pin {} of host memory ({:?}): lower the staging size or raise the \
                 locked-memory limit (ulimit -l)",
                format_bytes(bytes as u64),
                e.0
            ))
        })? as *mut u8;
        // SAFETY: `ptr` points to `bytes` writable bytes; zeroing makes them initialised, so
        // the slices below never expose uninitialised memory.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(PinnedBuffer {
            device: device.clone(),
            ptr,
            bytes,
            access,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    pub fn access(&self) -> HostAccess {
        self.access
    }

    /// The bytes. Asynchronous copies from or into this memory are issued only inside this
    /// module, which waits for them before handing out a slice again.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `bytes` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc, freed once.
            let _ = guarded("cuMemFreeHost", || unsafe {
                result::free_host(self.ptr as *mut std::ffi::c_void)
            });
        }
    }
}

/// A non-blocking stream (no implicit synchronisation with the legacy default stream).
pub struct Stream {
    device: Arc<CudaDevice>,
    raw: sys::CUstream,
}

// SAFETY: stream handles may be used from any thread with the context bound.
unsafe impl Send for Stream {}

impl Stream {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        device.bind()?;
        let raw = guarded("cuStreamCreate", || {
            result::stream::create(result::stream::StreamKind::NonBlocking)
        })?
        .map_err(|e| driver_error("cuStreamCreate", e))?;
        Ok(Stream {
            device: device.clone(),
            raw,
        })
    }

    /// The raw handle, for kernel launches and cuBLAS.
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Blocks the host until everything queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the stream lives until drop.
        guarded("cuStreamSynchronize", || unsafe {
            result::stream::synchronize(self.raw)
        })?
        .map_err(|e| driver_error("cuStreamSynchronize", e))
    }

    /// Work queued on this stream after this call waits for the event's last recording
    /// (the host does not block; an event never recorded is no wait at all).
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles live until their drop.
        guarded("cuStreamWaitEvent", || unsafe {
            result::stream::wait_event(
                self.raw,
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        })?
        .map_err(|e| driver_error("cuStreamWaitEvent", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once; queued work still completes.
            let _ = guarded("cuStreamDestroy", || unsafe {
                result::stream::destroy(self.raw)
            });
        }
    }
}

/// An event without timing (cheaper to record and wait on).
pub struct Event {
    device: Arc<CudaDevice>,
    raw: sys::CUevent,
}

// SAFETY: event handles may be used from any thread with the context bound.
unsafe impl Send for Event {}

impl Event {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        device.bind()?;
        let raw = guarded("cuEventCreate", || {
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        })?
        .map_err(|e| driver_error("cuEventCreate", e))?;
        Ok(Event {
            device: device.clone(),
            raw,
        })
    }

    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles live until their drop.
        guarded("cuEventRecord", || unsafe {
            result::event::record(self.raw, stream.raw)
        })?
        .map_err(|e| driver_error("cuEventRecord", e))
    }

    /// Blocks the host until the captured work has finished (at once if never recorded).
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the event lives until drop.
        guarded("cuEventSynchronize", || unsafe {
            result::event::synchronize(self.raw)
        })?
        .map_err(|e| driver_error("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once.
            let _ = guarded("cuEventDestroy", || unsafe {
                result::event::destroy(self.raw)
            });
        }
    }
}
