//! Pinned host memory, streams and events (cudarc's driver API, `result` layer, errors as
//! values): what the copy engine (`copy_engine`) and the compute stream are built from.
//!
//! - [`PinnedBuffer`] is page-locked host memory (cuMemHostAlloc), write-combined only for
//!   buffers the CPU fills and never reads (uploads); read-back buffers are plain cached.
//! - [`Stream`] and [`Event`] order the copy stream against the compute stream: a copy's
//!   event makes compute wait for it (the host does not block), and compute's release event
//!   makes the next copy into that buffer wait.
//!
//! The `--gpu-mem` budget has one authority, the runtime's `ResidentArena`: every device
//! allocation the runtime makes (resident weights, KV cache, activations, these staging
//! buffers) is reserved there first, and so is the backend's own scratch ("backend scratch":
//! the bf16 GEMM's activation copy, pre-sized so it never grows past it, cuBLAS's workspace
//! at an assumed 32 MiB, the rope table, and the per-op temporaries' region, pre-sized to
//! the request's bound: see `temps`); `CudaDevice::check_budget` checks the budget against
//! the device's free memory once.
//!
//! Covered by the budget's allocator margin rather than a line of their own: the
//! allocator's granularity (every allocation is rounded up; pools keep freed memory), the
//! fresh staging buffer `cancel` makes while a view still holds the old one (one buffer,
//! briefly), the f32-GEMM path's row ids (`GEMM=f32` only) and any temporary past the
//! region (counted as an allocation in the stats). The driver's context has a line of its
//! own.
//!
//! Also outside the budget: the copy engine's gather tables (24 bytes per run of the plan's
//! largest job, per staging slot, made with the engine). Host memory the copy engine
//! registers (cuMemHostRegister of the page-aligned ranges the installed plan streams, and
//! of a request's overflow copies, see `copy_engine::registry`) is page-locked from when the
//! plan is installed, or the request chooses its neurons, until the engine drops, or the
//! next request; the copy thread's pinned staging (one buffer per slot) holds what a job
//! reads outside those ranges.
//!
//! Unverified: no GPU was available when this was written, so none of this has run; it
//! compiles against cudarc 0.19 and follows the driver API's documented semantics.

use std::sync::Arc;

use cudarc::driver::result::DriverError;
use cudarc::driver::{result, sys};

use super::device::{driver_call, driver_error, event_elapsed_ms, guarded, CudaDevice};
use crate::error::{Error, Result};
use crate::units::format_bytes;

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
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        let _ = bound(&self.device, "cuMemFreeHost", || unsafe {
            result::free_host(self.ptr as *mut std::ffi::c_void)
        });
    }
}

/// Binds `device`'s context, then runs driver call `what` ([`driver_call`]).
fn bound<T>(
    device: &CudaDevice,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, DriverError>,
) -> Result<T> {
    device.bind()?;
    driver_call(what, f)
}

/// A non-blocking stream (no implicit synchronisation with the legacy default stream).
pub struct Stream {
    pub(super) device: Arc<CudaDevice>,
    pub(super) raw: sys::CUstream,
}

// SAFETY: stream handles may be used from any thread with the context bound.
unsafe impl Send for Stream {}

impl Stream {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        let raw = bound(device, "cuStreamCreate", || {
            result::stream::create(result::stream::StreamKind::NonBlocking)
        })?;
        Ok(Stream {
            device: device.clone(),
            raw,
        })
    }

    /// A stream at the device's greatest priority: the copy engine's, so that its gather
    /// kernel's blocks are scheduled ahead of compute kernels waiting for free SMs (else the
    /// gather would run only between compute kernels and hide little behind them).
    pub fn high_priority(device: &Arc<CudaDevice>) -> Result<Self> {
        let (_, greatest) = bound(device, "cuCtxGetStreamPriorityRange", || {
            result::stream::get_priority_range()
        })?;
        let raw = bound(device, "cuStreamCreateWithPriority", || {
            result::stream::create_with_priority(result::stream::StreamKind::NonBlocking, greatest)
        })?;
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
        // SAFETY: the stream lives until drop.
        bound(&self.device, "cuStreamSynchronize", || unsafe {
            result::stream::synchronize(self.raw)
        })
    }

    /// Queues a copy of `len` bytes from host `src` to device `dst` (cuMemcpyHtoDAsync).
    ///
    /// # Safety
    /// `src` must be page-locked host memory (pinned or registered) holding `len` bytes that
    /// stay valid and unchanged until the copy completes, and `dst` must have room for them
    /// for as long.
    pub unsafe fn copy_to_device(&self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let stream = self.raw;
        // SAFETY: the caller's contract above.
        bound(&self.device, "cuMemcpyHtoDAsync", || unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src as *const std::ffi::c_void, len, stream).result()
        })
    }

    /// Work queued on this stream after this call waits for the event's last recording
    /// (the host does not block; an event never recorded is no wait at all).
    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: both handles live until their drop.
        bound(&self.device, "cuStreamWaitEvent", || unsafe {
            result::stream::wait_event(
                self.raw,
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; queued work still completes.
        let _ = bound(&self.device, "cuStreamDestroy", || unsafe {
            result::stream::destroy(self.raw)
        });
    }
}

/// A stream event: without timing (cheaper to record and wait on) unless made by
/// [`Event::timed`].
pub struct Event {
    device: Arc<CudaDevice>,
    raw: sys::CUevent,
}

// SAFETY: event handles may be used from any thread with the context bound.
unsafe impl Send for Event {}
// SAFETY: every method is one driver call on the handle (binding the context first), and
// the driver API is thread-safe; which recording a wait sees is the callers' ordering (the
// copy engine's threads hand events over through channels), not a data race. The handle
// is destroyed only in Drop, which needs the last owner.
unsafe impl Sync for Event {}

impl Event {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        Self::with_flags(device, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
    }

    /// An untimed event the host synchronizes on: the host thread sleeps until it completes
    /// instead of spinning a core.
    pub fn blocking(device: &Arc<CudaDevice>) -> Result<Self> {
        Self::with_flags(
            device,
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
                | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32,
        )
    }

    /// An event that records a GPU timestamp, for [`Event::elapsed_ms`]. Blocking sync as
    /// [`Event::blocking`]: the host waits on the ends of measurements (`Timings::finish`),
    /// and the timings pool reuses start and end events alike.
    pub fn timed(device: &Arc<CudaDevice>) -> Result<Self> {
        Self::with_flags(device, sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32)
    }

    /// `flags`: CUevent_flags bits, or-ed (cudarc's `event::create` takes one variant).
    fn with_flags(device: &Arc<CudaDevice>, flags: u32) -> Result<Self> {
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer for the created handle.
        bound(device, "cuEventCreate", || unsafe {
            sys::cuEventCreate(&mut raw, flags).result()
        })?;
        Ok(Event {
            device: device.clone(),
            raw,
        })
    }

    /// Whether the captured work has finished (true if never recorded), without blocking.
    pub fn is_complete(&self) -> Result<bool> {
        self.device.bind()?;
        // SAFETY: the event lives until drop.
        match guarded("cuEventQuery", || unsafe { result::event::query(self.raw) })? {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver_error("cuEventQuery", e)),
        }
    }

    /// Milliseconds between two completed recordings of timed events (both made by
    /// [`Event::timed`]; the driver refuses events still pending with NOT_READY).
    pub fn elapsed_ms(start: &Event, end: &Event) -> Result<f32> {
        // SAFETY: both events live until their drop.
        bound(&start.device, "cuEventElapsedTime", || unsafe {
            event_elapsed_ms(start.raw, end.raw)
        })
    }

    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: both handles live until their drop.
        bound(&self.device, "cuEventRecord", || unsafe {
            result::event::record(self.raw, stream.raw)
        })
    }

    /// Blocks the host until the captured work has finished (at once if never recorded).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: the event lives until drop.
        bound(&self.device, "cuEventSynchronize", || unsafe {
            result::event::synchronize(self.raw)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = bound(&self.device, "cuEventDestroy", || unsafe {
            result::event::destroy(self.raw)
        });
    }
}
