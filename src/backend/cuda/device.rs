//! Opening a CUDA device: driver checks, device properties, the primary context, and the
//! memory checks a `--gpu-mem` budget needs.
//!
//! Supported drivers: CUDA 12.4 and newer, 12.x and 13.x ([`MIN_DRIVER_VERSION`]). The kernels
//! need an NVRTC no newer in major version than the driver (`compat`): NVRTC 12 for a 12.x
//! driver, 12 or 13 for a 13.x one.
//!
//! cudarc loads libcuda with dlopen on first use and panics when the library or one of its
//! symbols is missing (`sys::culib`, `sys::load`). So [`open`] first checks that the library
//! loads, then asks its version through the one symbol every driver has (`cuDriverGetVersion`,
//! loaded lazily on its own), then checks that every symbol this module and `memory` call
//! exists, and only then calls anything else. All calls go through cudarc's `result`/`sys`
//! layers, which return errors as values; the safe wrapper (which unwraps) is not used. Calls
//! are also wrapped in `catch_unwind` as a last resort, so a cudarc panic becomes an error.

use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::driver::result::DriverError;
use cudarc::driver::{result, sys};

use crate::backend::offload::DRIVER_CONTEXT_BYTES;
use crate::error::{Error, Result};
use crate::units::format_bytes;

/// Oldest driver this build supports: CUDA 12.4, as `cuDriverGetVersion` reports it
/// (1000 * major + 10 * minor). Every driver call made (see REQUIRED_SYMBOLS) exists from
/// CUDA 12.4 on with the signature cudarc's `cuda-13000` bindings declare; the one whose
/// name those bindings moved to a newer form is called by hand ([`event_elapsed_ms`]). The
/// bindings are `cuda-13000` rather than `cuda-12040` because cudarc only tries the
/// `libnvrtc.so.N`/`libcublas.so.N` of its own major N and of 12 and below: a 13.x build
/// finds the libraries of CUDA 12 and 13, a 12.x build those of 12 only.
pub const MIN_DRIVER_VERSION: i32 = 12040;

/// What `open` says on a machine without the driver library.
pub const NO_DRIVER: &str =
    "no NVIDIA driver found (libcuda.so): this machine has no usable GPU; run with --device cpu";

/// Driver symbols this module and `memory` call (cudarc's names, `_v2` included; `a|b`: either
/// will do). Checked up front because cudarc panics on the first call of a missing one.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventQuery",
    // Either form (see `event_elapsed_ms`).
    "cuEventElapsedTime_v2|cuEventElapsedTime",
    "cuEventDestroy_v2",
];

/// One opened GPU: its properties at open time and its primary context (retained until drop).
#[derive(Debug)]
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    /// Bytes of device memory.
    pub total_memory: u64,
    /// Bytes free when the device was opened (other processes use the rest).
    pub free_memory: u64,
    /// CUDA version the driver supports, e.g. (12, 4) or (13, 0).
    pub driver_version: (u32, u32),
    pub(crate) device: sys::CUdevice,
    pub(crate) context: sys::CUcontext,
}

// SAFETY: a CUcontext is a process-wide handle that the driver API lets any thread use once
// bound (`bind`); the driver API is thread-safe. Nothing here is tied to the opening thread.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// Whether libcuda can be loaded (never panics; nothing else is called).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen cudarc's candidate names for libcuda.
    unsafe { sys::is_culib_present() }
}

/// The message of a caught panic (cudarc's on a missing library or symbol).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs a driver call, turning a cudarc panic (missing symbol or library) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = panic_message(payload.as_ref());
        Error::Cuda(format!("{what}: the CUDA driver library failed: {msg}"))
    })
}

/// A driver error as its enum name (CUDA_ERROR_OUT_OF_MEMORY): formatting it calls nothing
/// in the driver, so it works whatever state the driver is in.
pub(crate) fn driver_error(what: &str, e: DriverError) -> Error {
    Error::Cuda(format!("{what} failed: {:?}", e.0))
}

/// Runs driver call `what` ([`guarded`]), its error reported as [`driver_error`] says.
pub(crate) fn driver_call<T>(
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, DriverError>,
) -> Result<T> {
    guarded(what, f)?.map_err(|e| driver_error(what, e))
}

/// The driver's CUDA version as (major, minor); errors when libcuda is absent.
pub fn driver_version() -> Result<(u32, u32)> {
    if !driver_present() {
        return Err(Error::Cuda(NO_DRIVER.into()));
    }
    let mut v: c_int = 0;
    // SAFETY: libcuda loads (checked above); `v` is valid for a write.
    driver_call("cuDriverGetVersion", || unsafe {
        sys::cuDriverGetVersion(&mut v).result()
    })?;
    Ok(split_version(v))
}

/// 13000 -> (13, 0); 12040 -> (12, 4).
fn split_version(v: c_int) -> (u32, u32) {
    let v = v.max(0) as u32;
    (v / 1000, (v % 1000) / 10)
}

/// The one-line refusal of a driver older than CUDA 12.4, if `version` is one.
fn check_driver_version(version: (u32, u32)) -> Result<()> {
    let min = split_version(MIN_DRIVER_VERSION);
    if version >= min {
        return Ok(());
    }
    Err(Error::Cuda(format!(
        "the NVIDIA driver supports CUDA {}.{}, but this build needs CUDA {}.{} or newer: update \
         the driver (R550 or newer) or run with --device cpu",
        version.0, version.1, min.0, min.1
    )))
}

/// cuEventElapsedTime's signature, the same in its first form (every driver) and its `_v2`
/// (CUDA 12.8 on).
type ElapsedFn = unsafe extern "C" fn(*mut f32, sys::CUevent, sys::CUevent) -> sys::CUresult;

/// Milliseconds between two recorded events. cudarc's `cuda-13000` bindings call only
/// cuEventElapsedTime_v2, which drivers before 12.8 lack, so the symbol is looked up here:
/// `_v2` where the driver has it, else the first form.
///
/// # Safety
/// Both events must be live, made in the current context.
pub(crate) unsafe fn event_elapsed_ms(
    start: sys::CUevent,
    end: sys::CUevent,
) -> std::result::Result<f32, DriverError> {
    static ELAPSED: OnceLock<Option<ElapsedFn>> = OnceLock::new();
    let f = ELAPSED.get_or_init(|| {
        // SAFETY: a device is open, so libcuda loads (`culib` does not panic); `get` only
        // looks names up, and both names have the signature of ElapsedFn.
        let lib = unsafe { sys::culib() };
        ["cuEventElapsedTime_v2", "cuEventElapsedTime"]
            .iter()
            .find_map(|name| {
                unsafe { lib.get::<ElapsedFn>(name.as_bytes()) }
                    .ok()
                    .map(|s| *s)
            })
    });
    let Some(f) = f else {
        return Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_FOUND));
    };
    let mut ms = 0.0f32;
    // SAFETY: the caller's contract; `ms` is valid for a write.
    unsafe { f(&mut ms, start, end) }.result()?;
    Ok(ms)
}

/// Checks every symbol in REQUIRED_SYMBOLS before the first call that would load it.
fn check_symbols() -> Result<()> {
    // SAFETY: the library loads (checked by the caller), so `culib` does not panic; `get`
    // only looks a name up.
    let lib = guarded("loading libcuda", || unsafe { sys::culib() })?;
    let missing: Vec<&str> = REQUIRED_SYMBOLS
        .iter()
        .copied()
        .filter(|names| {
            !names
                .split('|')
                .any(|name| unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_ok())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Cuda(format!(
        "the NVIDIA driver library lacks {}: update the driver (R550 or newer) or run with \
         --device cpu",
        missing.join(", ")
    )))
}

/// Number of CUDA devices (0 when the driver finds none).
pub fn device_count() -> Result<usize> {
    init_driver()?;
    let n = driver_call("cuDeviceGetCount", result::device::get_count)?;
    Ok(n.max(0) as usize)
}

/// Library, version and symbol checks, then cuInit.
fn init_driver() -> Result<()> {
    check_driver_version(driver_version()?)?;
    check_symbols()?;
    match guarded("cuInit", result::init)? {
        Ok(()) => Ok(()),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Err(no_device()),
        // The user-space library and the kernel module are of different versions.
        Err(DriverError(sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH)) => Err(Error::Cuda(
            "the NVIDIA driver library and kernel module versions differ (a driver update \
             without a reboot?): reboot or reinstall the driver, or run with --device cpu"
                .into(),
        )),
        Err(e) => Err(Error::Cuda(format!(
            "cuInit failed ({:?}): the driver is installed but unusable (is the kernel module \
             loaded? check nvidia-smi); run with --device cpu",
            e.0
        ))),
    }
}

fn no_device() -> Error {
    Error::Cuda(
        "the NVIDIA driver is installed but sees no CUDA device (check nvidia-smi and \
         CUDA_VISIBLE_DEVICES); run with --device cpu"
            .into(),
    )
}

/// Opens device `ordinal`: checks the driver, reads the device's properties, retains its
/// primary context and binds it to the calling thread. Every failure is a one-line
/// [`Error::Cuda`] that says what to do; nothing panics.
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    let driver_version = driver_version()?;
    let count = device_count()?;
    if count == 0 {
        return Err(no_device());
    }
    if ordinal >= count {
        return Err(Error::Cuda(format!(
            "CUDA device {ordinal} does not exist: this machine has {count} (0 to {}); pick one \
             with --device cuda:N",
            count - 1
        )));
    }
    let ord = c_int::try_from(ordinal)
        .map_err(|_| Error::Cuda(format!("CUDA device {ordinal} does not exist")))?;
    let device = driver_call("cuDeviceGet", || result::device::get(ord))?;
    let name = device_name(device)?;
    let attribute = |a: sys::CUdevice_attribute| -> Result<u32> {
        // SAFETY: `device` came from cuDeviceGet.
        let v = driver_call("cuDeviceGetAttribute", || unsafe {
            result::device::get_attribute(device, a)
        })?;
        Ok(v.max(0) as u32)
    };
    use sys::CUdevice_attribute::*;
    let compute_capability = (
        attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    // SAFETY: `device` came from cuDeviceGet.
    let total_memory = driver_call("cuDeviceTotalMem", || unsafe {
        result::device::total_mem(device)
    })? as u64;
    // SAFETY: as above; released in Drop.
    let context = guarded("cuDevicePrimaryCtxRetain", || unsafe {
        result::primary_ctx::retain(device)
    })?
    .map_err(|e| {
        Error::Cuda(format!(
            "cannot create a context on CUDA device {ordinal} ({name}): {:?} (is it in \
             exclusive-process mode and used by another process?)",
            e.0
        ))
    })?;
    let mut opened = CudaDevice {
        ordinal,
        name,
        compute_capability,
        total_memory,
        free_memory: 0,
        driver_version,
        device,
        context,
    };
    opened.free_memory = opened.memory_info()?.0;
    Ok(opened)
}

/// The device's name; the driver's buffer is read up to its first NUL (or whole).
fn device_name(device: sys::CUdevice) -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; `device` came from cuDeviceGet.
    driver_call("cuDeviceGetName", || unsafe {
        sys::cuDeviceGetName(buf.as_mut_ptr() as *mut c_char, buf.len() as c_int, device).result()
    })?;
    let name = match CStr::from_bytes_until_nul(&buf) {
        Ok(s) => String::from_utf8_lossy(s.to_bytes()).into_owned(),
        Err(_) => String::from_utf8_lossy(&buf).into_owned(),
    };
    Ok(name)
}

impl CudaDevice {
    /// Makes this device's context current on the calling thread (every driver call that
    /// allocates, copies or launches needs it; the context is per thread).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained until drop.
        driver_call("cuCtxSetCurrent", || unsafe {
            result::ctx::set_current(self.context)
        })
    }

    /// (free, total) device memory now, in bytes.
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (free, total) = driver_call("cuMemGetInfo", result::mem_get_info)?;
        Ok((free as u64, total as u64))
    }

    /// Refuses a `--gpu-mem` budget of `bytes` that the device cannot give now. The budget
    /// holds the driver's context (`offload::budget`), which exists by now: free memory must
    /// cover the rest of it.
    pub fn check_budget(&self, bytes: u64) -> Result<()> {
        let (free, total) = self.memory_info()?;
        budget_error(&self.describe(), bytes, free, total).map_or(Ok(()), Err)
    }

    /// `--gpu-mem auto`: the free device memory now plus the driver's context the budget
    /// counts (already made), so that the budget's other lines fill what is free.
    pub fn auto_budget(&self) -> Result<u64> {
        let (free, _) = self.memory_info()?;
        Ok(free + DRIVER_CONTEXT_BYTES)
    }

    /// "CUDA device 0 (NVIDIA H200, 139.8 GiB)".
    pub fn describe(&self) -> String {
        format!(
            "CUDA device {} ({}, {})",
            self.ordinal,
            self.name,
            format_bytes(self.total_memory)
        )
    }

    /// The virtual architecture NVRTC compiles for, e.g. "compute_90".
    pub fn arch(&self) -> String {
        format!(
            "compute_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Why a budget of `bytes` does not fit a device with `free` of `total` bytes, if it doesn't
/// (the budget's driver-context line is already spent: the context exists).
fn budget_error(device: &str, bytes: u64, free: u64, total: u64) -> Option<Error> {
    if bytes > total {
        return Some(Error::Cuda(format!(
            "--gpu-mem {} is more than {device} has: give at most {}, or --gpu-mem auto",
            format_bytes(bytes),
            format_bytes(total)
        )));
    }
    let most = free + DRIVER_CONTEXT_BYTES;
    if bytes > most {
        return Some(Error::Cuda(format!(
            "--gpu-mem {} is more than {device} can give now: {} free plus the {} driver \
             context the budget counts (other processes hold the rest, see nvidia-smi): lower \
             --gpu-mem to at most {}, use --gpu-mem auto, or free the memory",
            format_bytes(bytes),
            format_bytes(free),
            format_bytes(DRIVER_CONTEXT_BYTES),
            format_bytes(most)
        )));
    }
    None
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: retained in `open`, released once here. An error cannot be reported from
        // drop; the driver frees the context at process exit anyway.
        let _ = guarded("cuDevicePrimaryCtxRelease", || unsafe {
            result::primary_ctx::release(self.device)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_split_and_old_drivers_are_refused() {
        assert_eq!(split_version(13000), (13, 0));
        assert_eq!(split_version(12040), (12, 4));
        for ok in [(12, 4), (12, 8), (13, 0), (13, 1)] {
            assert!(check_driver_version(ok).is_ok(), "{ok:?}");
        }
        for old in [(12, 3), (12, 0), (11, 8)] {
            let msg = check_driver_version(old).unwrap_err().to_string();
            let found = format!("supports CUDA {}.{},", old.0, old.1);
            assert!(
                msg.contains(&found) && msg.contains("CUDA 12.4 or newer"),
                "{msg}"
            );
            assert!(msg.contains("--device cpu"), "{msg}");
        }
    }

    #[test]
    fn budgets_beyond_free_or_total_memory_are_refused() {
        let gib = 1u64 << 30;
        assert!(budget_error("dev", 8 * gib, 20 * gib, 24 * gib).is_none());
        // Free memory plus the driver context the budget counts, and not a byte more.
        let most = 20 * gib + DRIVER_CONTEXT_BYTES;
        assert!(budget_error("dev", most, 20 * gib, 24 * gib).is_none());
        assert!(budget_error("dev", most + 1, 20 * gib, 24 * gib).is_some());
        let msg = budget_error("dev", 22 * gib, 20 * gib, 24 * gib)
            .unwrap()
            .to_string();
        assert!(
            msg.contains("free") && msg.contains("lower --gpu-mem") && msg.contains("auto"),
            "{msg}"
        );
        let msg = budget_error("dev", 30 * gib, 20 * gib, 24 * gib)
            .unwrap()
            .to_string();
        assert!(msg.contains("give at most"), "{msg}");
    }

    /// On a machine without a driver, `open` must return the driver error, not panic.
    #[test]
    fn open_without_a_driver_says_so() {
        if driver_present() {
            eprintln!(
                "SKIPPED (open without a driver): libcuda loads on this machine, so open() \
                 would find the driver; this test checks the error path of driverless machines"
            );
            return;
        }
        let err = open(0).unwrap_err().to_string();
        assert_eq!(err, format!("CUDA: {NO_DRIVER}"));
        assert!(device_count().is_err());
    }
}
