//! [`DeviceCopyEngine`]: the CUDA twin of `backend::cpu::copy_engine::CpuCopyEngine`, with the
//! same submit / wait / release / cancel contract over [`CopyJob`]s (`crate::transfer`).
//!
//! Per job: the host pieces are gathered into a pinned (write-combined) staging buffer, copied
//! to the device on the engine's copy stream, and an event (`copied`) is recorded. `wait`
//! makes the compute stream (the backend's own, on which every kernel runs) wait on that
//! event: the host does not block. `release` records `consumed` on the compute stream; the
//! next copy into that device buffer waits on it on the copy stream, and the host waits on
//! `copied` before overwriting the pinned buffer. So a buffer is reused only after its
//! previous user is done, and copies run ahead by the number of buffers.
//!
//! Statistics come from timed events (`timing`): copy time on the copy stream, and the time
//! the compute stream stood waiting for a copy (the stall; the host never waits here, so the
//! CPU engine's host-side wait time has no meaning on a GPU). Trace spans are host-side: the
//! gather into pinned memory and the issue of the copy, not the DMA itself.
//!
//! Unverified without a GPU (see the parent module). The gather into pinned memory runs on the
//! thread that calls submit/release (release -> pump -> gather), so the GPU may idle while
//! it runs, which is neither copy time nor a stall: it is reported apart, host-timed, as
//! `CopyStats::host_gather_s`. A copy thread (as the CPU engine has) or registered host
//! memory would take it off the compute thread.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::result;
use serde_json::json;

use super::buffers::DevMem;
use super::context::Ctx;
use super::device::{driver_error, guarded};
use super::memory::{Event, HostAccess, PinnedBuffer, Stream};
use super::CudaBackend;
use crate::error::{Error, Result};
use crate::transfer::trace::{Trace, Track};
use crate::transfer::{
    check_next, validate_jobs, CopyEngine, CopyEngineOptions, CopyJob, CopyStats, DelayFn,
    StagedJob,
};
use crate::units::format_bytes;

mod timing;

use timing::{Span, Timings};

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// One staging pair: pinned host bytes and the device buffer they are copied to.
struct Slot {
    host: PinnedBuffer,
    /// Shared with the `DeviceFilled` handed out and the matrices viewing it: a view keeps
    /// the memory allocated even if the engine goes first.
    device: Arc<DevMem>,
    /// Recorded on the copy stream after the host-to-device copy.
    copied: Event,
    /// Recorded on the compute stream when compute releases the buffer.
    consumed: Event,
    held: bool,
}

/// A job submitted and not yet issued, with its sequence number (for `delay`).
struct Pending {
    seq: u64,
    job: CopyJob,
}

/// A job whose copy has been issued and that `wait` has not handed out yet.
struct Issued {
    layer: usize,
    label: String,
    slot: usize,
    pieces: Vec<Range<usize>>,
}

/// A device staging buffer holding one job's pieces; compute reads it on the compute stream
/// (through `CudaMatrix` views, see `backend::cuda::offload`) until it is released.
pub struct DeviceFilled {
    pub layer: usize,
    /// Where each of the job's pieces landed, as byte offsets into the staging buffer.
    pub pieces: Vec<Range<usize>>,
    pub(crate) mem: Arc<DevMem>,
    engine: u64,
    slot: usize,
    generation: u64,
}

impl std::fmt::Debug for DeviceFilled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceFilled(layer {}, {} pieces, slot {})",
            self.layer,
            self.pieces.len(),
            self.slot
        )
    }
}

/// The copy engine on a GPU: its copy stream, the backend's compute stream, double (or more)
/// buffered staging.
pub struct DeviceCopyEngine {
    id: u64,
    /// The backend's context: `ctx.stream` is the compute stream every kernel runs on.
    ctx: Arc<Ctx>,
    copy: Stream,
    slots: Vec<Slot>,
    buffer_bytes: usize,
    generation: u64,
    next_seq: u64,
    pending: VecDeque<Pending>,
    issued: VecDeque<Issued>,
    bytes: u64,
    jobs: u64,
    /// Host seconds spent gathering pieces into pinned memory (`CopyStats::host_gather_s`).
    gather_s: f64,
    timings: Timings,
    delay: Option<DelayFn>,
    trace: Option<Trace>,
    /// Why the engine stopped (a driver call failed mid-job), once it has.
    broken: Option<String>,
}

impl DeviceCopyEngine {
    /// Makes the copy stream and `opts.buffers` staging pairs of `opts.buffer_bytes` on
    /// `backend`'s device; kernels of `backend` are ordered after the copies they read. The
    /// device buffers are not budgeted here: the offloading runtime reserves them ("stream
    /// buffers") before it makes the engine. A link cap cannot be emulated on a GPU (the real
    /// link is used; `check_offloadable` refuses one); `opts.delay` sleeps on the host before
    /// each copy.
    pub fn new(backend: &CudaBackend, opts: CopyEngineOptions) -> Result<Self> {
        let (buffers, buffer_bytes) = (opts.buffers, opts.buffer_bytes);
        if buffers < 2 || buffer_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "the copy engine needs at least 2 non-empty staging buffers (double \
                 buffering), got {buffers} of {buffer_bytes} bytes"
            )));
        }
        // `opts.link_gbps` is not read: a cap is refused by `check_offloadable` before the
        // runtime uploads anything (the real link is used).
        let ctx = backend.ctx().clone();
        let device = ctx.device.clone();
        let copy = Stream::new(&device)?;
        let mut slots = Vec::with_capacity(buffers);
        for _ in 0..buffers {
            slots.push(Slot {
                host: PinnedBuffer::new(&device, buffer_bytes, HostAccess::Upload)?,
                device: Arc::new(DevMem::new(&ctx, "copy engine staging", buffer_bytes)?),
                // The host waits on `copied` before refilling the pinned buffer.
                copied: Event::blocking(&device)?,
                consumed: Event::new(&device)?,
                held: false,
            });
        }
        // Stream-ordered allocations are made on the compute stream; the copy stream may
        // touch them only once they exist.
        ctx.synchronize("copy engine staging")?;
        tracing::debug!(
            "CUDA copy engine: {buffers} staging buffers of {} (device + pinned host)",
            format_bytes(buffer_bytes as u64)
        );
        Ok(DeviceCopyEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            timings: Timings::new(&device),
            ctx,
            copy,
            slots,
            buffer_bytes,
            generation: 0,
            next_seq: 0,
            pending: VecDeque::new(),
            issued: VecDeque::new(),
            bytes: 0,
            jobs: 0,
            gather_s: 0.0,
            delay: opts.delay,
            trace: opts.trace,
            broken: None,
        })
    }

    /// Queues jobs and issues as many copies as there are free buffers. Nothing is queued
    /// if a job is larger than a buffer or reads outside its mapping.
    pub fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        self.check_alive()?;
        validate_jobs(&jobs, self.buffer_bytes)?;
        for job in jobs {
            self.pending.push_back(Pending {
                seq: self.next_seq,
                job,
            });
            self.next_seq += 1;
        }
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
            let Some(Pending { seq, job }) = self.pending.pop_front() else {
                return Ok(());
            };
            if let Some(delay) = &self.delay {
                std::thread::sleep(delay(seq));
            }
            let t0 = Instant::now();
            let s = &mut self.slots[slot];
            // The host buffer's previous upload must be done before it is overwritten.
            s.copied.synchronize()?;
            let gather_start = Instant::now();
            let host = s.host.as_mut_slice();
            let mut pieces = Vec::with_capacity(job.pieces.len());
            let mut at = 0;
            for p in &job.pieces {
                let src = p.map.get(p.range.clone()).ok_or_else(|| {
                    Error::CopyEngine(format!("job `{}`: piece outside its mapping", job.label))
                })?;
                let dst = host.get_mut(at..at + src.len()).ok_or_else(|| {
                    Error::CopyEngine(format!("job `{}` overflows its buffer", job.label))
                })?;
                dst.copy_from_slice(src);
                pieces.push(at..at + src.len());
                at += src.len();
            }
            self.gather_s += gather_start.elapsed().as_secs_f64();
            // The device buffer's previous user (compute) must be done before it is overwritten.
            self.copy.wait(&s.consumed)?;
            if at > 0 {
                let start = self.timings.start(&self.copy)?;
                self.copy.device.bind()?;
                let (dst, src, stream) = (s.device.ptr(), &s.host.as_slice()[..at], self.copy.raw);
                // SAFETY: `dst` holds buffer_bytes >= at bytes; `src` is pinned memory that
                // lives in the slot and is not written again before `copied` completes (the
                // engine's Drop waits for the copy stream before the slot is freed).
                guarded("cuMemcpyHtoDAsync", || unsafe {
                    result::memcpy_htod_async(dst, src, stream)
                })?
                .map_err(|e| driver_error("cuMemcpyHtoDAsync", e))?;
                self.timings.stop(Span::Copy, start, &self.copy)?;
            }
            s.copied.record(&self.copy)?;
            self.bytes += at as u64;
            self.jobs += 1;
            if let Some(trace) = &self.trace {
                let args = json!({"layer": job.layer, "bytes": at, "seq": seq, "host_side": true});
                trace.span(Track::Copy, job.label.as_str(), t0, Instant::now(), args);
            }
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
        let next = (self.issued.front().map(|j| (j.layer, j.label.as_str())))
            .or_else(|| (self.pending.front()).map(|p| (p.job.layer, p.job.label.as_str())));
        check_next(layer, next)?;
        let Some(job) = self.issued.pop_front() else {
            // Queued but not issued: every buffer is held by compute.
            return Err(Error::CopyEngine(format!(
                "waited for layer {layer} but all {} staging buffers are held by compute: \
                 release one before waiting for the next",
                self.slots.len()
            )));
        };
        if let Err(e) = self.order_after_copy(job.slot) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        let slot = &mut self.slots[job.slot];
        slot.held = true;
        Ok(DeviceFilled {
            layer: job.layer,
            pieces: job.pieces,
            mem: slot.device.clone(),
            engine: self.id,
            slot: job.slot,
            generation: self.generation,
        })
    }

    /// Makes the compute stream wait for the copy into `slot`, timing the wait.
    fn order_after_copy(&mut self, slot: usize) -> Result<()> {
        // Measurements of earlier passes that have finished by now (no blocking).
        self.timings.collect()?;
        let compute = &self.ctx.stream;
        let start = self.timings.start(compute)?;
        compute.wait(&self.slots[slot].copied)?;
        self.timings.stop(Span::Stall, start, compute)
    }

    /// Gives a buffer back once the kernels queued on the compute stream so far have read it,
    /// and issues the next pending copy into it. Every view of it must have been dropped: a
    /// view used later would read the next layer's bytes. If one is alive this is an error,
    /// and the buffer stays with compute until `cancel`.
    pub fn release(&mut self, filled: DeviceFilled) -> Result<()> {
        self.check_alive()?;
        if filled.engine != self.id {
            return Err(Error::CopyEngine(
                "released a buffer that another copy engine filled".into(),
            ));
        }
        if filled.generation != self.generation {
            return Ok(()); // taken back by `cancel` already
        }
        // The slot's and `filled`'s own references; anything beyond is a live view.
        let views = Arc::strong_count(&filled.mem).saturating_sub(2);
        if views > 0 {
            return Err(Error::CopyEngine(format!(
                "released the staging buffer of layer {} while {views} view(s) of it are \
                 alive: drop them first",
                filled.layer
            )));
        }
        let slot = &mut self.slots[filled.slot];
        if let Err(e) = slot.consumed.record(&self.ctx.stream) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        slot.held = false;
        self.pump()
    }

    /// Drops every queued job and takes back every buffer (held ones after the compute work
    /// queued so far; releasing them later is a no-op). A buffer a view still reads is
    /// replaced by a fresh one, so the view keeps its bytes.
    pub fn cancel(&mut self) -> Result<()> {
        self.check_alive()?;
        let result = self.cancel_now();
        if let Err(e) = &result {
            // Some buffers may be taken back and others not: the engine's state is unknown.
            self.broken = Some(e.to_string());
        }
        result
    }

    fn cancel_now(&mut self) -> Result<()> {
        self.pending.clear();
        self.issued.clear();
        let mut replaced = false;
        for slot in &mut self.slots {
            if !slot.held {
                continue;
            }
            slot.consumed.record(&self.ctx.stream)?;
            slot.held = false;
            if Arc::strong_count(&slot.device) > 1 {
                slot.device = Arc::new(DevMem::new(
                    &self.ctx,
                    "copy engine staging",
                    self.buffer_bytes,
                )?);
                replaced = true;
            }
        }
        if replaced {
            // As in `new`: the copy stream may use the new buffer once it exists.
            self.ctx.synchronize("copy engine staging")?;
        }
        self.generation += 1;
        Ok(())
    }

    /// Jobs submitted and not yet handed out by `wait`.
    pub fn queued(&self) -> usize {
        self.pending.len() + self.issued.len()
    }

    /// What the engine did since it was made or `reset_stats`: bytes and jobs issued, copy
    /// time on the copy stream, stall time of the compute stream. Waits for the copies and
    /// the compute work queued so far (their events are read).
    pub fn stats(&mut self) -> Result<CopyStats> {
        self.timings.finish()?;
        let (busy_s, wait_s) = self.timings.totals();
        Ok(CopyStats::from_times(
            self.bytes,
            self.jobs,
            busy_s,
            wait_s,
            self.gather_s,
        ))
    }

    /// Zeroes the stats (measurements still in flight are waited for and dropped).
    pub fn reset_stats(&mut self) -> Result<()> {
        self.timings.finish()?;
        self.timings.reset();
        self.bytes = 0;
        self.jobs = 0;
        self.gather_s = 0.0;
        Ok(())
    }
}

impl Drop for DeviceCopyEngine {
    fn drop(&mut self) {
        // Pinned memory must not be freed while a copy still reads it, nor a staging buffer
        // while a copy writes it (its free is ordered on the compute stream only).
        let _ = self.copy.synchronize();
        let _ = self.ctx.stream.synchronize();
    }
}

impl StagedJob for DeviceFilled {
    fn layer(&self) -> usize {
        self.layer
    }

    fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }
}

impl CopyEngine for DeviceCopyEngine {
    type Filled = DeviceFilled;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        DeviceCopyEngine::submit(self, jobs)
    }

    fn wait(&mut self, layer: usize) -> Result<DeviceFilled> {
        DeviceCopyEngine::wait(self, layer)
    }

    fn release(&mut self, filled: DeviceFilled) -> Result<()> {
        DeviceCopyEngine::release(self, filled)
    }

    fn cancel(&mut self) -> Result<()> {
        DeviceCopyEngine::cancel(self)
    }

    fn stats(&mut self) -> Result<CopyStats> {
        DeviceCopyEngine::stats(self)
    }

    fn reset_stats(&mut self) -> Result<()> {
        DeviceCopyEngine::reset_stats(self)
    }
}
