//! [`DeviceCopyEngine`]: the CUDA twin of `offload::stream::CpuCopyEngine`, with the same
//! submit / wait / release / cancel contract over [`CopyJob`]s.
//!
//! Per job: the host pieces are gathered into a pinned (write-combined) staging buffer, copied
//! to the device on the copy stream, and an event (`copied`) is recorded. `wait` makes the
//! compute stream wait on that event (the host does not block). `release` records `consumed`
//! on the compute stream; the next copy into that device buffer waits on it on the copy
//! stream, and the host waits on `copied` before overwriting the pinned buffer. So a buffer is
//! reused only after its previous user is done, and copies run ahead by the number of buffers.
//!
//! Unverified without a GPU (see the parent module). The gather into pinned memory runs on the
//! thread that calls submit/release; a copy thread (as the CPU engine has) or registered host
//! memory would take it off the compute thread.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{result, sys};

use super::{DeviceArena, DeviceBuffer, Event, HostAccess, PinnedBuffer, Stream};
use crate::backend::cuda::device::{driver_error, guarded};
use crate::error::{Error, Result};
use crate::offload::format_bytes;
use crate::offload::stream::CopyJob;

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// One staging pair: pinned host bytes and the device buffer they are copied to.
struct Slot {
    host: PinnedBuffer,
    device: DeviceBuffer,
    /// Recorded on the copy stream after the host-to-device copy.
    copied: Event,
    /// Recorded on the compute stream when compute releases the buffer.
    consumed: Event,
    held: bool,
}

/// A job whose copy has been issued and that `wait` has not handed out yet.
struct Issued {
    layer: usize,
    label: String,
    slot: usize,
    pieces: Vec<Range<usize>>,
}

/// A device staging buffer holding one job's pieces; compute reads it on the compute stream.
#[derive(Debug)]
pub struct DeviceFilled {
    pub layer: usize,
    /// Where each of the job's pieces landed, as byte offsets into the staging buffer.
    pub pieces: Vec<Range<usize>>,
    base: sys::CUdeviceptr,
    engine: u64,
    slot: usize,
    generation: u64,
}

impl DeviceFilled {
    /// The device address of piece `i`, if there is one.
    pub fn piece_ptr(&self, i: usize) -> Option<sys::CUdeviceptr> {
        (self.pieces.get(i)).map(|r| self.base + r.start as sys::CUdeviceptr)
    }
}

/// The copy engine on a GPU: copy and compute streams, double (or more) buffered staging.
pub struct DeviceCopyEngine {
    id: u64,
    copy: Stream,
    compute: Stream,
    slots: Vec<Slot>,
    buffer_bytes: usize,
    generation: u64,
    pending: VecDeque<CopyJob>,
    issued: VecDeque<Issued>,
    bytes: u64,
    jobs: u64,
    /// Why the engine stopped (a driver call failed mid-job), once it has.
    broken: Option<String>,
}

impl DeviceCopyEngine {
    /// Makes the streams and `buffers` staging pairs of `buffer_bytes`, the device halves
    /// allocated in `arena` (so they count against --gpu-mem; give them back with `close`).
    pub fn new(arena: &mut DeviceArena, buffers: usize, buffer_bytes: usize) -> Result<Self> {
        if buffers < 2 || buffer_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "the copy engine needs at least 2 non-empty staging buffers (double \
                 buffering), got {buffers} of {buffer_bytes} bytes"
            )));
        }
        let id = NEXT_ENGINE.fetch_add(1, Ordering::Relaxed);
        let device = arena.device().clone();
        let (copy, compute) = (Stream::new(&device)?, Stream::new(&device)?);
        let mut slots = Vec::with_capacity(buffers);
        for i in 0..buffers {
            let label = format!("copy engine {id} staging {i}");
            let buffer = arena.alloc(&label, buffer_bytes as u64)?;
            let pinned = (PinnedBuffer::new(&device, buffer_bytes, HostAccess::Upload))
                .and_then(|host| Ok((host, Event::new(&device)?, Event::new(&device)?)));
            match pinned {
                Ok((host, copied, consumed)) => slots.push(Slot {
                    host,
                    device: buffer,
                    copied,
                    consumed,
                    held: false,
                }),
                Err(e) => {
                    let _ = arena.free(buffer);
                    for slot in slots {
                        let _ = arena.free(slot.device);
                    }
                    return Err(e);
                }
            }
        }
        Ok(DeviceCopyEngine {
            id,
            copy,
            compute,
            slots,
            buffer_bytes,
            generation: 0,
            pending: VecDeque::new(),
            issued: VecDeque::new(),
            bytes: 0,
            jobs: 0,
            broken: None,
        })
    }

    /// The stream the forward's kernels must run on (the events order them after the copies).
    pub fn compute_stream(&self) -> &Stream {
        &self.compute
    }

    /// Queues jobs and issues as many copies as there are free buffers. Nothing is queued
    /// if a job is larger than a buffer or reads outside its mapping.
    pub fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        self.check_alive()?;
        for job in &jobs {
            if let Some(p) = (job.pieces.iter())
                .find(|p| p.range.start > p.range.end || p.range.end > p.map.len())
            {
                return Err(Error::CopyEngine(format!(
                    "job `{}` (layer {}) reads bytes {:?} of a {}-byte mapping",
                    job.label,
                    job.layer,
                    p.range,
                    p.map.len()
                )));
            }
            if job.bytes() > self.buffer_bytes {
                return Err(Error::CopyEngine(format!(
                    "job `{}` (layer {}) is {}, larger than a staging buffer of {}: give the \
                     engine larger buffers or split the job",
                    job.label,
                    job.layer,
                    format_bytes(job.bytes() as u64),
                    format_bytes(self.buffer_bytes as u64)
                )));
            }
        }
        self.pending.extend(jobs);
        self.pump()
    }

    /// Issues pending jobs into free buffers; a failure leaves a job half issued, so it
    /// stops the engine.
    fn pump(&mut self) -> Result<()> {
        let result = self.issue_pending();
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
        }
        result
    }

    fn check_alive(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::CopyEngine(format!(
                "{why}; the engine has stopped, make a new one"
            ))),
            None => Ok(()),
        }
    }

    /// Issues pending jobs into free buffers, in order.
    fn issue_pending(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let in_use = |i: usize| self.slots[i].held || self.issued.iter().any(|j| j.slot == i);
            let Some(slot) = (0..self.slots.len()).find(|&i| !in_use(i)) else {
                return Ok(());
            };
            let Some(job) = self.pending.pop_front() else {
                return Ok(());
            };
            let s = &mut self.slots[slot];
            // The host buffer's previous upload must be done before it is overwritten.
            s.copied.synchronize()?;
            let host = s.host.as_mut_slice();
            let mut pieces = Vec::with_capacity(job.pieces.len());
            let mut at = 0;
            for p in &job.pieces {
                let src = p.map.get(p.range.clone()).ok_or_else(|| {
                    Error::CopyEngine(format!("job `{}`: piece outside its mapping", job.label))
                })?;
                host[at..at + src.len()].copy_from_slice(src);
                pieces.push(at..at + src.len());
                at += src.len();
            }
            // The device buffer's previous user (compute) must be done before it is overwritten.
            self.copy.wait(&s.consumed)?;
            if at > 0 {
                self.copy.device.bind()?;
                let (dst, src, stream) = (s.device.ptr(), &s.host.as_slice()[..at], self.copy.raw);
                // SAFETY: `dst` holds buffer_bytes >= at bytes; `src` is pinned memory that
                // lives in the slot and is not written again before `copied` completes.
                guarded("cuMemcpyHtoDAsync", || unsafe {
                    result::memcpy_htod_async(dst, src, stream)
                })?
                .map_err(|e| driver_error("cuMemcpyHtoDAsync", e))?;
            }
            s.copied.record(&self.copy)?;
            self.bytes += at as u64;
            self.jobs += 1;
            self.issued.push_back(Issued {
                layer: job.layer,
                label: job.label,
                slot,
                pieces,
            });
        }
        Ok(())
    }

    /// Hands out the next job, which must be for `layer`; the compute stream waits for its
    /// copy (the host does not block).
    pub fn wait(&mut self, layer: usize) -> Result<DeviceFilled> {
        self.check_alive()?;
        let next = (self.issued.front().map(|j| (j.layer, j.label.clone())))
            .or_else(|| self.pending.front().map(|j| (j.layer, j.label.clone())));
        match next {
            None => {
                return Err(Error::CopyEngine(format!(
                    "out of order: waited for layer {layer} but no copy job is queued"
                )))
            }
            Some((l, label)) if l != layer => {
                return Err(Error::CopyEngine(format!(
                    "out of order: waited for layer {layer} but the next queued job is \
                     `{label}` for layer {l}"
                )))
            }
            Some(_) => {}
        }
        let Some(job) = self.issued.pop_front() else {
            // Queued but not issued: every buffer is held by compute.
            return Err(Error::CopyEngine(format!(
                "waited for layer {layer} but all {} staging buffers are held by compute: \
                 release one before waiting for the next",
                self.slots.len()
            )));
        };
        let slot = &mut self.slots[job.slot];
        if let Err(e) = self.compute.wait(&slot.copied) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        slot.held = true;
        Ok(DeviceFilled {
            layer: job.layer,
            pieces: job.pieces,
            base: slot.device.ptr(),
            engine: self.id,
            slot: job.slot,
            generation: self.generation,
        })
    }

    /// Gives a buffer back once the kernels queued on the compute stream so far have read it,
    /// and issues the next pending copy into it.
    pub fn release(&mut self, filled: DeviceFilled) -> Result<()> {
        self.check_alive()?;
        if filled.engine != self.id {
            return Err(Error::CopyEngine(
                "released a buffer that another copy engine filled".into(),
            ));
        }
        if filled.generation != self.generation {
            return Ok(()); // freed by `cancel` already
        }
        let slot = &mut self.slots[filled.slot];
        if let Err(e) = slot.consumed.record(&self.compute) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        slot.held = false;
        self.pump()
    }

    /// Drops every queued job and takes back every buffer (held ones after the compute work
    /// queued so far; releasing them later is a no-op, using them is a bug).
    pub fn cancel(&mut self) -> Result<()> {
        self.check_alive()?;
        self.pending.clear();
        self.issued.clear();
        for slot in &mut self.slots {
            if slot.held {
                slot.consumed.record(&self.compute)?;
                slot.held = false;
            }
        }
        self.generation += 1;
        Ok(())
    }

    /// Jobs submitted and not yet handed out by `wait`.
    pub fn queued(&self) -> usize {
        self.pending.len() + self.issued.len()
    }

    /// (bytes, jobs) whose copies were issued.
    pub fn issued_totals(&self) -> (u64, u64) {
        (self.bytes, self.jobs)
    }

    /// Waits for both streams and gives the device staging buffers back to `arena`.
    pub fn close(mut self, arena: &mut DeviceArena) -> Result<()> {
        self.copy.synchronize()?;
        self.compute.synchronize()?;
        for slot in std::mem::take(&mut self.slots) {
            arena.free(slot.device)?;
        }
        Ok(())
    }
}

impl Drop for DeviceCopyEngine {
    fn drop(&mut self) {
        // Pinned memory must not be freed while a copy still reads it.
        let _ = self.copy.synchronize();
        let _ = self.compute.synchronize();
    }
}
