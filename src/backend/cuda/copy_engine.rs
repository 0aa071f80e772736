//! [`DeviceCopyEngine`]: the CUDA twin of `backend::cpu::copy_engine::CpuCopyEngine`, with the
//! same submit / wait / release / cancel contract over [`CopyJob`]s (`crate::transfer`).
//!
//! Per job, its pieces land packed back to back, in job order, in one device staging buffer
//! (`DeviceFilled::pieces`), moved by one of three paths (`plan::plan_job` decides, per
//! segment, from where its bytes stand):
//!
//! - **DMA.** The host ranges an installed plan streams (and a request's overflow copies)
//!   are registered with the driver before any pass (`pin`, `registry`: page-locked and
//!   device-mapped, the page-aligned ranges merged). Registered bytes, merged where
//!   contiguous, are one cuMemcpyHtoDAsync each straight from the mapping, when a job has at
//!   most `plan::MAX_DMA_COPIES` of them. No host gather, no host wait.
//! - **Gather kernel.** More runs than that (a Griffin complement: thousands of short runs of
//!   bundles) would cost microseconds of CPU per DMA call, so a kernel on the copy stream
//!   (`kernels/gather.cu`) reads them through their device-mapped addresses and writes them
//!   packed. Its table (source address, destination offset, length per run, long runs split)
//!   is written by the host into the slot's pinned table and uploaded just before the launch;
//!   tables are sized for the plan's largest job when the engine is made
//!   (`CopyEngineOptions::max_pieces`), so no pass allocates. It runs on a few blocks, so
//!   compute keeps the rest of the GPU.
//! - **Staged (fallback).** Bytes outside the registered ranges (what only a prefill reads,
//!   pages the driver refused; `SIRIUS_COPY_STAGED=1` stages everything) are gathered by the
//!   copy thread (`stager`) into the slot's pinned staging at the offsets they land at and
//!   uploaded on the thread's own stream, adjacent ones in one copy, pipelined with compute.
//!   The gather is host-timed as `CopyStats::host_gather_s`; its uploads count as copy time.
//!
//! Ordering, per slot (a device buffer with events `copied`, `consumed`, `table_sent`,
//! `staged`; the pinned table; the copy thread's pinned staging):
//! 1. compute thread, issue: waits on the host for `table_sent` before rewriting the pinned
//!    table (gather jobs only); queues on the copy stream: wait `consumed` (compute's release
//!    of the buffer's previous job), the DMAs, the table upload (+ `table_sent`), the kernel,
//!    then records `copied`; then, if the job has staged bytes, sends the copy thread a task.
//! 2. copy thread, per task in order: waits on the host for `staged` (its own last upload
//!    from that staging buffer), gathers, makes its stream wait `consumed` (recorded by the
//!    compute thread before the task was sent), uploads, records `staged`, answers.
//! 3. compute thread, `wait`: for a job with staged bytes takes the copy thread's answer
//!    (blocking only while the gather runs; answers come in task order, and jobs are waited
//!    in issue order), then the compute stream waits on `staged`, which was recorded before
//!    the answer was sent; for every job it waits on `copied`.
//! 4. `release`: records `consumed` on the compute stream, after the kernels that read it.
//!
//! So a buffer is reused only after its previous user is done, staging and tables are
//! rewritten only after their last upload, and copies run ahead by the number of buffers.
//! `cancel` takes every answer still owed first (an answer means the upload is queued, not
//! done: the next job into that slot waits on `staged` as well as `consumed`). Drop stops the copy thread (which
//! synchronizes its stream) and synchronizes both streams before the registrations go.
//!
//! Statistics come from timed events (`timing`): copy time on the copy stream and the copy
//! thread's stream (DMAs, the gather kernel, staged uploads), and the time the compute stream
//! stood waiting for a copy (the stall; the host never waits here, so the CPU engine's
//! host-side wait time has no meaning on a GPU). Trace spans are host-side: planning and the
//! issue, not the DMA itself.
//!
//! Unverified without a GPU (see the parent module): registration of file-backed and
//! anonymous read-only mappings, the gather kernel's reads of mapped host memory and its
//! speed against per-piece DMAs have not run.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::buffers::DevMem;
use super::context::Ctx;
use super::memory::{Event, HostAccess, PinnedBuffer, Stream};
use super::CudaBackend;
use crate::backend::offload::GATHER_TABLE_ROW_BYTES;
use crate::error::{Error, Result};
use crate::transfer::trace::Trace;
use crate::transfer::{
    check_next, validate_jobs, CopyEngine, CopyEngineOptions, CopyJob, CopyStats, DelayFn,
    HostSlice, PinFor, PinReport, StagedJob,
};
use crate::units::format_bytes;

mod issue;
mod pins;
mod plan;
mod registry;
mod stager;
mod timing;

use plan::{table_rows, Segment};
use registry::Registry;
use stager::{StageDone, Stager};
use timing::{Span, Timings};

pub use registry::STAGED_ENV;

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// One staging slot: the device buffer a job lands in, with what moving it there needs.
struct Slot {
    /// Shared with the `DeviceFilled` handed out and the matrices viewing it: a view keeps
    /// the memory allocated even if the engine goes first.
    device: Arc<DevMem>,
    /// Recorded on the copy stream after the host-to-device copy.
    copied: Event,
    /// Recorded on the compute stream when compute releases the buffer (the copy thread's
    /// stream waits on it too).
    consumed: Arc<Event>,
    /// Recorded by the copy thread after a job's staged upload.
    staged: Arc<Event>,
    /// Recorded on the copy stream after the gather table's upload; the host waits on it
    /// before rewriting the pinned table.
    table_sent: Event,
    table: Option<GatherTable>,
    held: bool,
}

/// A slot's gather-kernel table: written by the host into pinned memory, uploaded before
/// each launch (`rows` rows of three u64 fit in both).
struct GatherTable {
    host: PinnedBuffer,
    device: DevMem,
    rows: usize,
}

impl GatherTable {
    /// A table of `rows` rows (the caller synchronizes the compute stream, where the device
    /// half is allocated, before the copy stream uses it).
    fn new(ctx: &Arc<Ctx>, rows: usize) -> Result<GatherTable> {
        let bytes = rows.max(1) * GATHER_TABLE_ROW_BYTES as usize;
        Ok(GatherTable {
            host: PinnedBuffer::new(&ctx.device, bytes, HostAccess::Upload)?,
            device: DevMem::new(ctx, "copy engine gather table", bytes)?,
            rows: rows.max(1),
        })
    }
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
    /// Part of it goes through the copy thread.
    staged: bool,
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
    /// Host seconds the copy thread spent gathering into pinned memory
    /// (`CopyStats::host_gather_s`).
    gather_s: f64,
    /// The copy thread of the fallback path.
    stager: Stager,
    /// The job being issued, cut into segments (kept to reuse its allocation).
    segments: Vec<Segment>,
    timings: Timings,
    delay: Option<DelayFn>,
    trace: Option<Trace>,
    /// Why the engine stopped (a driver call failed mid-job), once it has.
    broken: Option<String>,
    /// The host memory registered for DMA (dropped after the streams sync).
    registry: Registry,
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
        let copy = Stream::high_priority(&device)?;
        let registry = Registry::new(&device);
        // Sized now for the plan's largest job, so that no pass allocates a table (none
        // when nothing is registered: every job is staged).
        let rows = match (registry.enabled(), opts.max_pieces) {
            (true, n) if n > 0 => Some(table_rows(n, buffer_bytes)),
            _ => None,
        };
        let mut slots = Vec::with_capacity(buffers);
        for _ in 0..buffers {
            slots.push(Slot {
                device: Arc::new(DevMem::new(&ctx, "copy engine staging", buffer_bytes)?),
                // The host waits on `copied`, `table_sent` and `staged`.
                copied: Event::blocking(&device)?,
                consumed: Arc::new(Event::new(&device)?),
                staged: Arc::new(Event::blocking(&device)?),
                table_sent: Event::blocking(&device)?,
                table: rows.map(|r| GatherTable::new(&ctx, r)).transpose()?,
                held: false,
            });
        }
        // Stream-ordered allocations are made on the compute stream; the copy streams may
        // touch them only once they exist.
        ctx.synchronize("copy engine staging")?;
        tracing::debug!(
            "CUDA copy engine: {buffers} staging buffers of {}, gather tables of {} rows ({})",
            format_bytes(buffer_bytes as u64),
            rows.unwrap_or(0),
            match registry.enabled() {
                true => "copies straight from registered host memory",
                false => "host gather into pinned staging",
            }
        );
        Ok(DeviceCopyEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            timings: Timings::new(&device),
            stager: Stager::new(&device, buffers, buffer_bytes)?,
            segments: Vec::new(),
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
            registry,
        })
    }

    /// Registers the pages of host `ranges` for DMA now, before the passes that read them
    /// (see `registry`); `scope` says until when.
    pub fn pin(&mut self, ranges: &[HostSlice], scope: PinFor) -> Result<PinReport> {
        self.check_alive()?;
        self.registry.pin(ranges, scope)
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
        if let Err(e) = self.order_after_copy(job.slot, job.staged) {
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

    /// Makes the compute stream wait for the copy into `slot` (and, when `staged`, for the
    /// copy thread's upload, whose answer it takes first), timing the wait.
    fn order_after_copy(&mut self, slot: usize, staged: bool) -> Result<()> {
        // Measurements of earlier passes that have finished by now (no blocking).
        self.timings.collect()?;
        let ctx = self.ctx.clone();
        let compute = &ctx.stream;
        // Started before any host wait: GPU time lost while the copy thread gathers counts
        // as a stall.
        let start = self.timings.start(compute)?;
        if staged {
            let done = self.stager.receive()?;
            if done.slot != slot {
                return Err(Error::CopyEngine(format!(
                    "the copy thread answered for staging slot {}, expected {slot}",
                    done.slot
                )));
            }
            self.took(done);
            compute.wait(&self.slots[slot].staged)?;
        }
        compute.wait(&self.slots[slot].copied)?;
        self.timings.stop(Span::Stall, start, compute)
    }

    /// Counts a copy thread's answer: its gather time and its upload's measurement.
    fn took(&mut self, done: StageDone) {
        self.gather_s += done.gather_s;
        self.timings.push(Span::Copy, done.timing);
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
        // The copy thread's tasks for issued jobs finish first: they write staging buffers.
        for done in self.stager.drain()? {
            self.took(done);
        }
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
        // The last request's registrations (its overflow copies) go, once no copy reads
        // them: else every request would pin more host memory for the engine's life.
        self.copy.synchronize()?;
        self.registry.forget_request();
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
        // Pinned memory must not be freed (nor host mappings unregistered, when `registry`
        // drops after this) while a copy still reads it, nor a staging buffer while a copy
        // or the gather kernel writes it (its free is ordered on the compute stream only).
        // The copy thread first: it synchronizes its stream before it ends.
        self.stager.stop();
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

    fn pin(&mut self, ranges: &[HostSlice], scope: PinFor) -> Result<PinReport> {
        DeviceCopyEngine::pin(self, ranges, scope)
    }

    fn stats(&mut self) -> Result<CopyStats> {
        DeviceCopyEngine::stats(self)
    }

    fn reset_stats(&mut self) -> Result<()> {
        DeviceCopyEngine::reset_stats(self)
    }
}
