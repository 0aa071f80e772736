//! Host memory registered with the driver (cuMemHostRegister): page-locked, so copies from
//! it are DMAs straight from the mapping, and device-mapped, so the gather kernel reads it.
//!
//! Only what jobs can read is registered, and before any pass: the runtime hands the engine
//! the host ranges its plan streams when it installs the plan, and a request's own copies
//! (the overflow's compact FFNs) when the request chooses its neurons ([`Registry::pin`]).
//! The ranges are rounded out to whole pages and merged per mapping (`plan::merge_spans`),
//! then registered through the process-wide table of `pins`, which shares pages between
//! engines (two engines may stream the same mapping: a server replacing its engine) and
//! never locks a page twice nor unlocks one another engine still reads. A lease holds each
//! registration for the engine: for its life (the plan's ranges) or until the next `cancel`
//! (a request's). The engine's Drop synchronizes its streams before its leases go.
//!
//! A job's bytes outside this engine's leases (a range the plan does not stream every pass,
//! such as a float FFN's checkpoint matrices that only a prefill reads, or pages the driver
//! refused) are gathered on the host into pinned staging by the copy thread (`stager`), the
//! fallback path; the first refusal is logged as a warning. Nothing is registered during a
//! pass.
//!
//! Flags: PORTABLE (any context), DEVICEMAP where the device can map host memory (the gather
//! kernel's reads), READ_ONLY where the device supports it: every mapping here is read-only
//! (`memmap2::Mmap`), and without PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES the driver
//! needs READ_ONLY to page-lock read-only memory (cuMemHostRegister, CUDA 11.1+; all of this
//! is in the CUDA 12.4 driver API). The device address of a registration is read in the
//! context of the engine that made it; engines of one device share it.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result, sys};
use memmap2::Mmap;

use super::pins::{acquire, process_pins, Lease, Pinner, SharedPins};
use super::plan::{merge_spans, Segment, Source};
use crate::backend::cuda::device::{guarded, CudaDevice};
use crate::error::Result;
use crate::progress::progress_bar;
use crate::transfer::{HostSlice, PinFor, PinReport};
use crate::units::format_bytes;

pub use crate::backend::offload::STAGED_ENV;

/// The driver's side of [`Pinner`]: cuMemHostRegister with the device's flags.
struct DriverPinner {
    device: Arc<CudaDevice>,
    flags: u32,
}

impl Pinner for DriverPinner {
    fn register(&self, span: &Range<usize>) -> Result<std::result::Result<Option<u64>, String>> {
        self.device.bind()?;
        let len = span.end - span.start;
        // SAFETY: `span` is whole pages of a live mapping (`merge_spans` rounds a mapping's
        // ranges out to its own pages, all mapped since mappings are whole pages); the table
        // entry made from it holds the mapping's `Arc<Mmap>` until it unregisters them.
        let got = guarded("cuMemHostRegister", || unsafe {
            sys::cuMemHostRegister_v2(span.start as *mut c_void, len, self.flags).result()
        })?;
        if let Err(e) = got {
            return Ok(Err(format!(
                "cuMemHostRegister of {} failed: {:?}",
                format_bytes(len as u64),
                e.0
            )));
        }
        match self.flags & sys::CU_MEMHOSTREGISTER_DEVICEMAP {
            0 => Ok(Ok(None)),
            _ => match device_address(&self.device, span.start) {
                Ok(ptr) => Ok(Ok(ptr)),
                Err(e) => {
                    // Not in the table: it would stay registered, and refused again, for
                    // good. Undone here; the span is then staged.
                    self.unregister(span.start);
                    Ok(Err(format!("the device address of a registration: {e}")))
                }
            },
        }
    }

    fn unregister(&self, start: usize) {
        if self.device.bind().is_err() {
            return;
        }
        // SAFETY: `start` was registered by `register` and is unregistered once (the table
        // removes its entry under its lock); every engine that copied from it synchronized
        // its streams before dropping its lease, so no transfer reads it any more.
        let _ = guarded("cuMemHostUnregister", || unsafe {
            sys::cuMemHostUnregister(start as *mut c_void).result()
        });
    }
}

/// A lease of this engine, and whether it lasts until the next `cancel` only.
struct Held {
    lease: Lease,
    request: bool,
}

/// One engine's registered host memory.
pub(super) struct Registry {
    table: SharedPins,
    /// The driver's side, or why registration is off for this device.
    pinner: std::result::Result<Arc<dyn Pinner>, String>,
    page: usize,
    /// Sorted by start, never overlapping.
    held: Vec<Held>,
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
        let pinner = if std::env::var(STAGED_ENV).is_ok_and(|v| v == "1") {
            Err(format!("{STAGED_ENV}=1"))
        } else if !attr(A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED) {
            Err("the device does not support registering host memory".into())
        } else {
            let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
            if attr(A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY) {
                flags |= sys::CU_MEMHOSTREGISTER_DEVICEMAP;
            }
            if attr(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED) {
                flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
            }
            let device = device.clone();
            Ok(Arc::new(DriverPinner { device, flags }) as Arc<dyn Pinner>)
        };
        Registry {
            table: process_pins(),
            pinner,
            page: page_size(),
            held: Vec::new(),
            warned: false,
        }
    }

    /// Whether host memory is registered at all (else every job is staged).
    pub fn enabled(&self) -> bool {
        self.pinner.is_ok()
    }

    /// Registers the pages of `ranges` (progress bar, then one line: bytes and time).
    /// Refusals are not errors: those pages are staged.
    pub fn pin(&mut self, ranges: &[HostSlice], scope: PinFor) -> Result<PinReport> {
        let start = Instant::now();
        let streamed: u64 = ranges.iter().map(|r| r.len() as u64).sum();
        let pinner = match &self.pinner {
            Ok(p) => p.clone(),
            Err(why) => {
                let why = why.clone();
                self.fall_back(streamed, &why);
                return Ok(PinReport::refused(streamed));
            }
        };
        let mut maps: Vec<&Arc<Mmap>> = Vec::new();
        let mut keyed = Vec::with_capacity(ranges.len());
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            let key = match maps.iter().position(|m| Arc::ptr_eq(m, &r.map)) {
                Some(k) => k,
                None => {
                    maps.push(&r.map);
                    maps.len() - 1
                }
            };
            keyed.push((key, r.map.as_ptr() as usize + r.range.start, r.len()));
        }
        let spans = merge_spans(&keyed, self.page);
        let total: u64 = spans.iter().map(|(_, s)| s.len() as u64).sum();
        let bar = progress_bar(total, "pinning");
        let mut report = PinReport::default();
        for (key, span) in spans {
            let len = span.len() as u64;
            let held = |at: usize| self.held.iter().any(|h| h.lease.span.start == at);
            let got = acquire(&self.table, span, maps[key], &pinner, &held)?;
            for (gap, why) in &got.refused {
                report.refused_bytes += gap.len() as u64;
                self.fall_back(gap.len() as u64, why);
            }
            let request = scope == PinFor::Request;
            (self.held).extend(got.leases.into_iter().map(|lease| Held { lease, request }));
            bar.inc(len);
        }
        bar.finish_and_clear();
        self.held.sort_by_key(|h| h.lease.span.start);
        report.registered_bytes = self.held.iter().map(|h| h.lease.span.len() as u64).sum();
        report.streamed_bytes = streamed;
        report.seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            "CUDA copy engine: {} of host memory registered for DMA ({} of ranges jobs read) \
             in {:.2} s{}",
            format_bytes(report.registered_bytes),
            format_bytes(streamed),
            report.seconds,
            match report.refused_bytes {
                0 => String::new(),
                b => format!(", {} refused (staged)", format_bytes(b)),
            }
        );
        Ok(report)
    }

    /// Drops the leases of the last request (`PinFor::Request`); their pages are unlocked
    /// unless another engine shares them. The caller has synchronized its streams.
    pub fn forget_request(&mut self) {
        self.held.retain(|h| !h.request);
    }

    /// Appends the segments of `len` bytes at host address `addr`: registered where a lease
    /// of this engine covers them (cut where one lease ends), staged elsewhere.
    pub fn segments(&self, addr: usize, len: usize, out: &mut Vec<Segment>) {
        let end = addr + len;
        let mut at = addr;
        let mut i = self.held.partition_point(|h| h.lease.span.end <= addr);
        while at < end {
            let lease = self.held.get(i).map(|h| &h.lease);
            match lease {
                Some(l) if l.span.start <= at => {
                    let stop = end.min(l.span.end);
                    out.push(Segment {
                        source: Source::Registered {
                            region: l.span.start,
                            host: at,
                            device: l.device.map(|d| d + (at - l.span.start) as u64),
                        },
                        len: stop - at,
                    });
                    at = stop;
                    i += 1;
                }
                _ => {
                    let stop = lease.map_or(end, |l| end.min(l.span.start));
                    out.push(Segment {
                        source: Source::Staged { host: at },
                        len: stop - at,
                    });
                    at = stop;
                }
            }
        }
    }

    fn fall_back(&mut self, bytes: u64, why: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                "CUDA copy engine: {} of host memory not registered for DMA ({why}): jobs \
                 reading it are gathered on the host into pinned staging by the copy thread \
                 (slower)",
                format_bytes(bytes)
            );
        } else {
            tracing::debug!("CUDA copy engine: {} staged ({why})", format_bytes(bytes));
        }
    }
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
