//! The CUDA backend's shared state ([`Ctx`]): device, compute stream, loaded kernel modules,
//! and the primitives every op is built from (launches, copies, stream-ordered memory).
//!
//! Every driver call goes through cudarc's `result`/`sys` layers (errors as values) inside
//! `catch_unwind` (cudarc panics on a missing library symbol), and every failure becomes
//! `Error::Cuda("<op>: <call> failed: <CUDA error>")`. All work is queued on the one compute
//! stream, so ops are ordered among themselves without any host synchronisation; only reads
//! back to the host wait.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::result::DriverError;
use cudarc::driver::{result, sys};

use super::compat;
use super::device::{panic_message, CudaDevice};
use super::kernels::KERNELS;
use super::memory::Stream;
use super::nvrtc::{self, Compiled};
use super::temps::TempArena;
use crate::backend::offload::ALLOCATOR_MARGIN_BASE;
use crate::error::{Error, Result};

/// An error of a CUDA library as cudarc returns it: the library's name (for a cudarc panic)
/// and its status code (printed as its enum name, e.g. CUDA_ERROR_OUT_OF_MEMORY).
pub(crate) trait LibraryError {
    const LIBRARY: &'static str;
    fn status(&self) -> &dyn std::fmt::Debug;
}

impl LibraryError for DriverError {
    const LIBRARY: &'static str = "CUDA";
    fn status(&self) -> &dyn std::fmt::Debug {
        &self.0
    }
}

/// Runs one call into a CUDA library (driver or cuBLAS) for `op`, turning its error (or a
/// cudarc panic) into `Error::Cuda`.
pub(crate) fn call<T, E: LibraryError>(
    op: &str,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Cuda(format!(
            "{op}: {what} failed: {:?}",
            e.status()
        ))),
        Err(payload) => Err(Error::Cuda(format!(
            "{op}: {what}: the {} library failed: {}",
            E::LIBRARY,
            panic_message(payload.as_ref())
        ))),
    }
}

/// `v` as a kernel's u32 size argument, or an error naming what overflowed.
pub(crate) fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::InvalidArgument(format!(
            "{op}: {what} = {v} is past the CUDA kernels' 32-bit sizes"
        ))
    })
}

/// Every kernel file compiled, per target architecture ("compute_90" for PTX, "sm_90" for a
/// CUBIN), once per process (NVRTC takes seconds; loading code into a context is cheap and
/// is done per backend, since modules belong to a context).
static CODE_CACHE: Mutex<Vec<(String, Arc<Vec<Compiled>>)>> = Mutex::new(Vec::new());

/// The compiled kernels for `device`, from the cache or NVRTC: PTX, or a CUBIN where NVRTC is
/// a newer minor version than the driver ([`compat::code_kind`], which also refuses an NVRTC
/// of a newer major).
pub(crate) fn kernel_code(device: &CudaDevice) -> Result<Arc<Vec<Compiled>>> {
    let why = |what: &str, e: Error| match e {
        Error::Cuda(msg) => Error::Cuda(format!("compiling the CUDA kernels for {what}: {msg}")),
        other => other,
    };
    let (major, minor) = nvrtc::version().map_err(|e| why(&device.name, e))?;
    let nvrtc_version = (major.max(0) as u32, minor.max(0) as u32);
    let kind = compat::code_kind(nvrtc_version, device.driver_version)
        .map_err(|e| why(&device.name, e))?;
    let arch = compat::target_arch(kind, device.compute_capability);
    // Held across the compile, so concurrent first users compile once.
    let mut cache = CODE_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, code)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ok(code.clone());
    }
    let dirs = nvrtc::cuda_include_dirs();
    nvrtc::check_headers(&dirs).map_err(|e| why(&arch, e))?;
    let mut all = Vec::with_capacity(KERNELS.len());
    for k in KERNELS {
        let code = nvrtc::compile_for(k, kind, device.compute_capability, &dirs)
            .map_err(|e| why(&arch, e))?;
        if let Some(missing) = k.functions.iter().find(|f| !code.has_entry(f)) {
            return Err(Error::Cuda(format!(
                "compiling the CUDA kernels for {arch}: {} has no kernel `{missing}`",
                k.file
            )));
        }
        all.push(code);
    }
    let all = Arc::new(all);
    cache.push((arch, all.clone()));
    Ok(all)
}

/// One kernel argument, kept by value until the launch reads it.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

/// A kernel's argument list in declaration order (device pointers as u64; 0 = null).
#[derive(Default)]
pub(crate) struct KArgs(Vec<Arg>);

impl KArgs {
    pub fn new() -> Self {
        KArgs(Vec::with_capacity(16))
    }
    pub fn ptr(mut self, p: u64) -> Self {
        self.0.push(Arg::Ptr(p));
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.push(Arg::U32(v));
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.0.push(Arg::F32(v));
        self
    }
}

/// The state every buffer and op shares. Buffers hold an `Arc` of it, so the stream, the
/// modules and the context outlive every allocation made on them.
pub(crate) struct Ctx {
    pub device: Arc<CudaDevice>,
    pub stream: Stream,
    modules: Vec<sys::CUmodule>,
    functions: HashMap<&'static str, sys::CUfunction>,
    /// Stream-ordered allocation (cuMemAllocAsync/cuMemFreeAsync on the compute stream):
    /// freeing a buffer is then ordered after the kernels queued before, without a sync.
    pub async_alloc: bool,
    /// Streaming multiprocessors: sizes the grid splits (attention chunks, FFN splits).
    pub sms: u32,
    /// Kernels queued on the compute stream so far (cuBLAS calls count as one each): the
    /// launch overhead a decoded token pays, reported per token in the stats.
    launches: AtomicU64,
    /// Device allocations made so far (each a trip through the driver or its pool): the
    /// decode steps should make none once warm, which the stats report.
    allocations: AtomicU64,
    /// The per-op temporaries' region (`temps`).
    pub(crate) temps: Mutex<TempArena>,
}

// SAFETY: the raw handles (stream, modules, functions) are process-wide driver objects that
// any thread may use once the context is bound, which every primitive here does first; the
// driver API is thread-safe. Nothing is tied to the creating thread.
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

impl Ctx {
    /// A context on `device` with its own non-blocking compute stream, the modules of `code`
    /// (PTX or CUBINs, see [`kernel_code`]) loaded.
    pub fn new(device: Arc<CudaDevice>, code: &[Compiled]) -> Result<Ctx> {
        const OP: &str = "CUDA backend";
        device.bind()?;
        let stream = Stream::new(&device)?;
        let attr = |a: sys::CUdevice_attribute| {
            // SAFETY: `device.device` came from cuDeviceGet.
            call(OP, "cuDeviceGetAttribute", || unsafe {
                result::device::get_attribute(device.device, a)
            })
        };
        let sms =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let pools = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
            .unwrap_or(0)
            != 0;
        let async_alloc = pools && has_symbols(&["cuMemAllocAsync", "cuMemFreeAsync"]);
        if async_alloc {
            keep_pool_memory(&device);
        }
        let mut ctx = Ctx {
            device,
            stream,
            modules: Vec::new(),
            functions: HashMap::new(),
            async_alloc,
            sms,
            launches: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            temps: Mutex::new(TempArena::default()),
        };
        // Loaded into `ctx` one by one, so that its Drop unloads them should a later one fail.
        for (src, c) in KERNELS.iter().zip(code) {
            let image = c.image()?;
            // SAFETY: `image` is a NUL-terminated PTX string or a whole CUBIN, alive for the
            // call.
            let module = call(OP, &format!("cuModuleLoadData({})", src.file), || unsafe {
                result::module::load_data(image.as_ptr() as *const c_void)
            })?;
            ctx.modules.push(module);
            for &name in src.functions {
                let cname = CString::new(name)
                    .map_err(|_| Error::Cuda(format!("{OP}: kernel name {name:?}")))?;
                // SAFETY: `module` was just loaded and is unloaded only in Drop.
                let f = call(OP, &format!("cuModuleGetFunction({name})"), || unsafe {
                    result::module::get_function(module, cname)
                })?;
                ctx.functions.insert(name, f);
            }
        }
        Ok(ctx)
    }

    pub fn bind(&self) -> Result<()> {
        self.device.bind()
    }

    pub fn raw_stream(&self) -> sys::CUstream {
        self.stream.raw()
    }

    /// Counts one launch queued outside [`Ctx::launch`] (a cuBLAS call).
    pub fn count_launch(&self) {
        // A statistic, ordered with nothing.
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    /// Launches queued on this context so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Device allocations made on this context so far.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// `bytes` (> 0) bytes of uninitialised device memory, in stream order where the device
    /// has pools; counted. [`Ctx::free_raw`] gives it back.
    pub(crate) fn alloc_raw(&self, op: &str, bytes: usize) -> Result<u64> {
        self.bind()?;
        let out_of_memory = |e: Error| match e {
            Error::Cuda(msg) => Error::Cuda(format!(
                "{msg} (allocating {bytes} bytes of device memory: the GPU is full; use a \
                 smaller model, context or batch, or, when offloading, a lower --gpu-mem)"
            )),
            other => other,
        };
        let ptr = if self.async_alloc {
            let stream = self.raw_stream();
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
        // A statistic, ordered with nothing.
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(ptr)
    }

    /// Frees memory from [`Ctx::alloc_raw`] after every kernel queued before (stream-ordered,
    /// or by draining the stream first). Errors cannot be reported (drops call this); the
    /// context frees everything at exit anyway.
    pub(crate) fn free_raw(&self, ptr: u64) {
        if ptr == 0 || self.bind().is_err() {
            return;
        }
        if self.async_alloc {
            let stream = self.raw_stream();
            // SAFETY: allocated on this stream by cuMemAllocAsync, freed once.
            let _ = call("free", "cuMemFreeAsync", || unsafe {
                result::free_async(ptr, stream)
            });
        } else {
            // Kernels queued on the memory must finish before a synchronous free.
            let _ = self.synchronize("free");
            // SAFETY: allocated by cuMemAlloc, freed once.
            let _ = call("free", "cuMemFree", || unsafe { result::free_sync(ptr) });
        }
    }

    /// Queues kernel `name` on the compute stream. A grid with a zero dimension launches
    /// nothing (there is no work), which the driver would otherwise refuse.
    pub fn launch(
        &self,
        op: &str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: KArgs,
    ) -> Result<()> {
        self.launch_on(&self.stream, op, name, grid, block, args)
    }

    /// [`Ctx::launch`] on another stream of this context (the copy engine's gather kernel
    /// runs on the copy stream).
    pub fn launch_on(
        &self,
        stream: &Stream,
        op: &str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: KArgs,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = *self.functions.get(name).ok_or_else(|| {
            Error::Cuda(format!(
                "{op}: kernel `{name}` is not in the loaded modules"
            ))
        })?;
        let mut values = args.0;
        // Pointers into `values`, which is neither moved nor resized until the launch
        // returns (the driver copies the arguments during cuLaunchKernel).
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(p) => p as *mut u64 as *mut c_void,
                Arg::U32(v) => v as *mut u32 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
            })
            .collect();
        let stream = stream.raw();
        self.bind()?;
        // SAFETY: `f` comes from a module loaded in this context (`stream` belongs to it);
        // the arguments match the kernel's parameter list (each op builds them from the
        // kernel's header comment), and the device pointers are live allocations checked
        // against the sizes passed.
        call(op, name, || unsafe {
            result::launch_kernel(f, grid, (block, 1, 1), 0, stream, &mut params)
        })?;
        self.count_launch();
        Ok(())
    }

    /// Runs driver call `what` for `op` with the context bound, given the compute stream.
    fn on_stream<T>(
        &self,
        op: &str,
        what: &str,
        f: impl FnOnce(sys::CUstream) -> std::result::Result<T, DriverError>,
    ) -> Result<T> {
        self.bind()?;
        let stream = self.raw_stream();
        call(op, what, || f(stream))
    }

    /// Copies `src` to device memory at `dst` in stream order. The host data is staged by
    /// the driver before the call returns (pageable memory), so `src` may go right after.
    pub fn htod<T: Copy>(&self, op: &str, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: the caller passes `dst` with room for `src` (checked by every op).
        self.on_stream(op, "cuMemcpyHtoDAsync", |stream| unsafe {
            result::memcpy_htod_async(dst, src, stream)
        })
    }

    /// Copies device memory at `src` into `dst` after everything queued before, and waits.
    pub fn dtoh<T: Copy>(&self, op: &str, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: the caller passes `src` holding `dst.len()` elements; the copy finishes
        // before `dst` is released (synchronize below).
        self.on_stream(op, "cuMemcpyDtoHAsync", |stream| unsafe {
            result::memcpy_dtoh_async(dst, src, stream)
        })?;
        self.synchronize(op)
    }

    /// Zeroes `bytes` bytes at `dst` in stream order.
    pub fn zero(&self, op: &str, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `dst` holds `bytes` bytes (the caller's allocation).
        self.on_stream(op, "cuMemsetD8Async", |stream| unsafe {
            result::memset_d8_async(dst, 0, bytes, stream)
        })
    }

    /// Blocks until the compute stream is idle.
    pub fn synchronize(&self, op: &str) -> Result<()> {
        // SAFETY: the stream lives as long as `self`.
        self.on_stream(op, "cuStreamSynchronize", |stream| unsafe {
            result::stream::synchronize(stream)
        })
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        let temps = self.temps.get_mut().map_or(0, |t| t.take_region());
        self.free_raw(temps);
        // Kernels still queued may use the modules (and the temporaries' region).
        let _ = self.synchronize("CUDA backend drop");
        for m in self.modules.drain(..) {
            // SAFETY: loaded in `new`, unloaded once; errors cannot be reported from drop.
            let _ = call("CUDA backend drop", "cuModuleUnload", || unsafe {
                result::module::unload(m)
            });
        }
    }
}

/// Lets the device's default memory pool keep up to the allocator margin's fixed part
/// (`ALLOCATOR_MARGIN_BASE`, inside every `--gpu-mem` budget) of freed memory instead of
/// returning it to the system at every synchronisation (its default): what is freed and
/// allocated again (a replaced staging buffer, a temporary past its region) is then reused
/// without a trip through the driver, and what the pool keeps stays within the budget (an unbounded threshold would keep every freed
/// resident matrix too). Best effort: a failure only costs speed.
fn keep_pool_memory(device: &CudaDevice) {
    let _ = call("CUDA backend", "cuMemPoolSetAttribute", || {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is valid for the write; `device.device` came from cuDeviceGet.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, device.device) }.result()?;
        let mut threshold = ALLOCATOR_MARGIN_BASE;
        // SAFETY: the attribute takes a cuuint64_t, which `threshold` is, alive for the call.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
        }
        .result()
    });
}

/// Whether libcuda exports every name in `names` (cudarc panics on calling a missing one).
fn has_symbols(names: &[&str]) -> bool {
    // SAFETY: the driver loaded (a device is open), so `culib` does not panic; `get` only
    // looks names up. A panic anyway counts as "missing".
    catch_unwind(|| {
        let lib = unsafe { sys::culib() };
        names
            .iter()
            .all(|n| unsafe { lib.get::<*const ()>(n.as_bytes()) }.is_ok())
    })
    .unwrap_or(false)
}
