//! Host mappings registered with the driver (cuMemHostRegister): page-locked, so copies from
//! them are DMAs straight from the mapping, and device-mapped, so the gather kernel reads
//! them. Each mapping a job reads is registered once, whole (page-aligned), the first time a
//! job names it, and stays registered until the last engine using it is dropped.
//!
//! Registrations are shared process-wide by mapping address: the driver refuses to register
//! a page twice, and two engines may stream the same mapping (a runtime making a new engine
//! while the old one lives). A registration holds the mapping's `Arc<Mmap>`, so its pages
//! stay mapped while registered; it unregisters in Drop, which runs when the last engine's
//! reference goes, after that engine (like every other that held it) has synchronized its
//! copy stream, the only one reading host memory.
//!
//! Flags: PORTABLE (any context), DEVICEMAP where the device can map host memory (the gather
//! kernel's reads), READ_ONLY where the device supports it: every mapping here is read-only
//! (`memmap2::Mmap`), and without PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES the driver
//! needs READ_ONLY to page-lock read-only memory (cuMemHostRegister, CUDA 11.1+; all of this
//! is in the CUDA 12.4 driver API). A mapping that cannot be registered is gathered on the
//! host into pinned staging (the fallback path); the first failure is logged as a warning.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{result, sys};
use memmap2::Mmap;

use super::plan::{page_span, Source};
use crate::backend::cuda::device::{guarded, CudaDevice};
use crate::error::Result;
use crate::transfer::HostSlice;
use crate::units::format_bytes;

/// Set to 1 to skip registration: every job is gathered on the host into pinned staging (the
/// fallback path), to compare the two on one machine.
pub const STAGED_ENV: &str = "SIRIUS_COPY_STAGED";

/// Registrations alive in the process, by mapping address.
static SHARED: Mutex<Vec<(usize, Weak<Registration>)>> = Mutex::new(Vec::new());

/// One registered mapping; unregistered when dropped.
struct Registration {
    device: Arc<CudaDevice>,
    /// Held so the pages stay mapped while the driver has them locked.
    _map: Arc<Mmap>,
    /// The registered (page-aligned) start and length.
    base: usize,
    len: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        // SAFETY: `base` was registered by cuMemHostRegister and is unregistered once; every
        // engine that copied from it synchronized its copy stream before dropping its
        // reference (the engine's Drop), so no transfer reads it any more.
        let _ = guarded("cuMemHostUnregister", || unsafe {
            sys::cuMemHostUnregister(self.base as *mut c_void).result()
        });
    }
}

/// What an engine knows of one mapping.
enum Known {
    /// Registered: DMA'd from `host`'s pages; `device` is the device address of the
    /// registered start, for the gather kernel (None when the device cannot map host memory).
    Registered {
        reg: Arc<Registration>,
        device: Option<u64>,
    },
    /// Could not be registered: staged.
    Staged,
}

/// One engine's view of the host mappings its jobs read.
pub(super) struct Registry {
    device: Arc<CudaDevice>,
    /// cuMemHostRegister flags, or why registration is off for this device.
    flags: std::result::Result<u32, String>,
    page: usize,
    known: HashMap<usize, Known>,
    warned: bool,
}

impl Registry {
    /// Reads the device's capabilities (a failed query counts as "not supported").
    pub fn new(device: &Arc<CudaDevice>) -> Registry {
        let attr = |a: sys::CUdevice_attribute| {
            // SAFETY: `device.device` came from cuDeviceGet; the result is checked.
            let got = guarded("cuDeviceGetAttribute", || unsafe {
                result::device::get_attribute(device.device, a)
            });
            matches!(got, Ok(Ok(v)) if v != 0)
        };
        use sys::CUdevice_attribute as A;
        let flags = if std::env::var(STAGED_ENV).is_ok_and(|v| v == "1") {
            Err(format!("{STAGED_ENV}=1"))
        } else if !attr(A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED) {
            Err("the device does not support registering host memory".into())
        } else {
            let mut f = sys::CU_MEMHOSTREGISTER_PORTABLE;
            if attr(A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY) {
                f |= sys::CU_MEMHOSTREGISTER_DEVICEMAP;
            }
            if attr(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED) {
                f |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
            }
            Ok(f)
        };
        Registry {
            device: device.clone(),
            flags,
            page: page_size(),
            known: HashMap::new(),
            warned: false,
        }
    }

    /// Forgets the mappings nothing but their registration holds any more (their pages are
    /// unregistered when no other engine shares them), and the mappings that were staged (a
    /// new mapping may reuse a freed one's address, and may register). The caller has
    /// synchronized its copy stream: no transfer of this engine reads them.
    pub fn forget_unused(&mut self) {
        self.known.retain(|_, known| match known {
            Known::Registered { reg, .. } => Arc::strong_count(&reg._map) > 1,
            Known::Staged => false,
        });
    }

    /// Whether mappings are registered at all (else every job is staged).
    pub fn enabled(&self) -> bool {
        self.flags.is_ok()
    }

    /// Where `slice`'s bytes come from, registering its mapping the first time it is seen.
    /// Registration failures are not errors: the mapping is staged instead.
    pub fn source(&mut self, slice: &HostSlice) -> Result<Source> {
        if slice.is_empty() {
            return Ok(Source::Staged);
        }
        let key = slice.map.as_ptr() as usize;
        if !self.known.contains_key(&key) {
            let known = self.register(&slice.map)?;
            self.known.insert(key, known);
        }
        Ok(match self.known.get(&key) {
            Some(Known::Registered { reg, device }) => {
                let host = key + slice.range.start;
                Source::Registered {
                    region: reg.base,
                    host,
                    device: device.map(|d| d + (host - reg.base) as u64),
                }
            }
            _ => Source::Staged,
        })
    }

    fn register(&mut self, map: &Arc<Mmap>) -> Result<Known> {
        let key = map.as_ptr() as usize;
        let flags = match &self.flags {
            Ok(f) => *f,
            Err(why) => {
                let why = why.clone();
                self.fall_back(map.len(), key, &why);
                return Ok(Known::Staged);
            }
        };
        let reg = match shared_registration(&self.device, map, flags, self.page)? {
            Ok(reg) => reg,
            Err(why) => {
                self.fall_back(map.len(), key, &why);
                return Ok(Known::Staged);
            }
        };
        let device = match flags & sys::CU_MEMHOSTREGISTER_DEVICEMAP {
            0 => None,
            _ => device_address(&self.device, reg.base)?,
        };
        Ok(Known::Registered { reg, device })
    }

    fn fall_back(&mut self, len: usize, addr: usize, why: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                "CUDA copy engine: not copying the {} host mapping at {addr:#x} straight from \
                 host memory ({why}): it, and any other mapping that fails, is gathered on \
                 the host into pinned staging (slower, on the compute thread)",
                format_bytes(len as u64)
            );
        } else {
            tracing::debug!("CUDA copy engine: mapping at {addr:#x} staged ({why})");
        }
    }
}

/// The process's registration of `map`, made now if there is none; the inner error says why
/// the driver refused (the mapping is then staged).
fn shared_registration(
    device: &Arc<CudaDevice>,
    map: &Arc<Mmap>,
    flags: u32,
    page: usize,
) -> Result<std::result::Result<Arc<Registration>, String>> {
    let key = map.as_ptr() as usize;
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    shared.retain(|(_, w)| w.strong_count() > 0);
    if let Some(reg) = (shared.iter())
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(Ok(reg));
    }
    let Some(span) = page_span(key, map.len(), page) else {
        return Ok(Err("an empty mapping or an unknown page size".into()));
    };
    device.bind()?;
    let len = span.end - span.start;
    // SAFETY: `span` covers whole pages of `map`'s mapping (it starts at or before the
    // mapping's first byte on its page and ends at the end of the page holding its last, all
    // mapped since mappings are whole pages); the `Arc<Mmap>` kept in the registration keeps
    // them mapped until it unregisters them.
    let got = guarded("cuMemHostRegister", || unsafe {
        sys::cuMemHostRegister_v2(span.start as *mut c_void, len, flags).result()
    })?;
    if let Err(e) = got {
        return Ok(Err(format!(
            "cuMemHostRegister of {} failed: {:?}",
            format_bytes(len as u64),
            e.0
        )));
    }
    let reg = Arc::new(Registration {
        device: device.clone(),
        _map: map.clone(),
        base: span.start,
        len,
    });
    tracing::debug!(
        "CUDA copy engine: registered {} of host memory at {:#x}",
        format_bytes(reg.len as u64),
        reg.base
    );
    shared.push((key, Arc::downgrade(&reg)));
    Ok(Ok(reg))
}

/// The device address of registered host memory at `base`, in this device's context (None,
/// logged, when the driver gives none: its pieces are then DMA'd, never read by a kernel).
fn device_address(device: &CudaDevice, base: usize) -> Result<Option<u64>> {
    device.bind()?;
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: `base` is the start of a registration made with DEVICEMAP; `ptr` is valid for
    // the write.
    let got = guarded("cuMemHostGetDevicePointer", || unsafe {
        sys::cuMemHostGetDevicePointer_v2(&mut ptr, base as *mut c_void, 0).result()
    })?;
    Ok(match got {
        Ok(()) => Some(ptr),
        Err(e) => {
            tracing::debug!(
                "CUDA copy engine: no device address for registered memory at {base:#x} \
                 ({:?}); copied by DMA only",
                e.0
            );
            None
        }
    })
}

/// The host's page size (4 KiB where it cannot be read).
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}
