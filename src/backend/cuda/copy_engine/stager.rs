//! The copy thread of the fallback path: bytes of a job that lie outside the registered
//! host memory are gathered on the host into the slot's pinned staging and uploaded from
//! there, off the compute thread and pipelined with it.
//!
//! The thread owns the pinned staging buffers (one per slot, made when it starts, before
//! the engine is ready) and a stream of its own. Per task (one job's staged bytes):
//! 1. it waits on the host for the slot's `staged` event, its own last upload from that
//!    staging buffer, before rewriting the buffer;
//! 2. gathers the bytes (host-timed: `host_gather_s`);
//! 3. makes its stream wait for the slot's `consumed` (compute's release of the device
//!    buffer, recorded before the task was sent), uploads, and records `staged`;
//! 4. answers, in task order.
//!
//! The compute thread's `wait` for the job takes that answer (blocking only while the
//! gather is still running), then makes the compute stream wait on `staged`: the event was
//! recorded before the answer was sent, so the wait is on this job's upload.

use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::plan::DirectCopy;
use crate::backend::cuda::buffers::DevMem;
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::memory::{Event, HostAccess, PinnedBuffer, Stream};
use crate::error::{Error, Result};
use crate::transfer::HostSlice;

/// One job's staged bytes.
pub(super) struct StageTask {
    pub slot: usize,
    /// Host bytes to copy into staging at the offsets they land at.
    pub copies: Vec<DirectCopy>,
    /// Staging ranges then uploaded to the same offsets of `device`.
    pub runs: Vec<Range<usize>>,
    /// The job's pieces: they keep every mapping `copies` reads alive until the task ends.
    pub _keep: Vec<HostSlice>,
    pub device: Arc<DevMem>,
    pub consumed: Arc<Event>,
    pub staged: Arc<Event>,
    /// Timed events around the upload (a `Span::Copy` measurement).
    pub timing: (Event, Event),
}

/// The answer to a task.
pub(super) struct StageDone {
    pub slot: usize,
    pub gather_s: f64,
    pub timing: (Event, Event),
}

pub(super) struct Stager {
    tasks: Option<Sender<StageTask>>,
    done: Receiver<Result<StageDone>>,
    thread: Option<JoinHandle<()>>,
    /// Tasks sent and not answered yet.
    in_flight: usize,
}

impl Stager {
    /// Starts the thread, which makes `slots` pinned buffers of `buffer_bytes` first, and
    /// waits for them: a host that cannot pin them fails here, not at the first staged job.
    pub fn new(device: &Arc<CudaDevice>, slots: usize, buffer_bytes: usize) -> Result<Stager> {
        let stream = Stream::new(device)?;
        let (tasks, task_rx) = unbounded::<StageTask>();
        let (done_tx, done) = unbounded();
        let (ready_tx, ready) = bounded::<Result<()>>(1);
        let device = device.clone();
        let thread = std::thread::Builder::new()
            .name("copy-engine-stager".into())
            .spawn(move || {
                let staging = (0..slots)
                    .map(|_| PinnedBuffer::new(&device, buffer_bytes, HostAccess::Upload))
                    .collect::<Result<Vec<_>>>();
                let staging = match staging {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                let mut worker = Worker { stream, staging };
                for task in task_rx {
                    if done_tx.send(worker.run(task)).is_err() {
                        break;
                    }
                }
                // The staging buffers may be freed only once their uploads are done.
                let _ = worker.stream.synchronize();
            })
            .map_err(|e| Error::CopyEngine(format!("cannot start the copy thread: {e}")))?;
        let started = ready.recv().unwrap_or_else(|_| {
            Err(Error::CopyEngine(
                "the copy thread stopped while pinning its staging buffers".into(),
            ))
        });
        if let Err(e) = started {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Stager {
            tasks: Some(tasks),
            done,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    pub fn send(&mut self, task: StageTask) -> Result<()> {
        let tasks = self.tasks.as_ref().ok_or_else(gone)?;
        if tasks.send(task).is_err() {
            return Err(gone());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The oldest task's answer, waiting for it.
    pub fn receive(&mut self) -> Result<StageDone> {
        let done = self.done.recv().map_err(|_| gone())?;
        self.in_flight = self.in_flight.saturating_sub(1);
        done
    }

    /// Every answer still owed, waiting for them (the first error is returned after all
    /// were received).
    pub fn drain(&mut self) -> Result<Vec<StageDone>> {
        let mut out = Vec::with_capacity(self.in_flight);
        let mut first_error = None;
        while self.in_flight > 0 {
            match self.receive() {
                Ok(d) => out.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                    if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                        break;
                    }
                }
            }
        }
        first_error.map_or(Ok(out), Err)
    }
}

impl Stager {
    /// Ends the thread's loop and waits for it; it synchronizes its stream before its
    /// buffers go. Idempotent.
    pub fn stop(&mut self) {
        self.tasks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        self.stop();
    }
}

fn gone() -> Error {
    Error::CopyEngine("the copy thread has stopped (see the earlier error)".into())
}

struct Worker {
    stream: Stream,
    staging: Vec<PinnedBuffer>,
}

impl Worker {
    fn run(&mut self, task: StageTask) -> Result<StageDone> {
        let bad = |what: &str| Error::CopyEngine(format!("copy thread: {what}"));
        let staging = (self.staging.get_mut(task.slot)).ok_or_else(|| bad("no such slot"))?;
        // The buffer's previous upload (recorded by this thread) must be done first.
        task.staged.synchronize()?;
        let start = Instant::now();
        let host = staging.as_mut_slice();
        for c in &task.copies {
            let dst = (host.get_mut(c.dst..c.dst + c.len)).ok_or_else(|| bad("past staging"))?;
            // SAFETY: `c.host .. + c.len` lies in a mapping of `task.keep` (the registry cut
            // it out of a piece `validate_jobs` checked against its mapping), which the task
            // keeps mapped; mappings are read-only, so nothing writes it meanwhile.
            let src = unsafe { std::slice::from_raw_parts(c.host as *const u8, c.len) };
            dst.copy_from_slice(src);
        }
        let gather_s = start.elapsed().as_secs_f64();
        // The device buffer's previous user (compute) must be done before it is overwritten.
        self.stream.wait(&task.consumed)?;
        task.timing.0.record(&self.stream)?;
        let base = task.device.ptr();
        for run in &task.runs {
            let src = staging
                .as_slice()
                .get(run.clone())
                .ok_or_else(|| bad("past staging"))?;
            // SAFETY: `src` is pinned staging this thread rewrites only after `staged`
            // (recorded below) completes; the device buffer holds the job's bytes
            // (`validate_jobs`) and `task.device` keeps it allocated until the upload is
            // queued, after which frees are ordered behind compute's wait on `staged`.
            unsafe {
                self.stream
                    .copy_to_device(base + run.start as u64, src.as_ptr(), src.len())?
            };
        }
        task.timing.1.record(&self.stream)?;
        task.staged.record(&self.stream)?;
        Ok(StageDone {
            slot: task.slot,
            gather_s,
            timing: task.timing,
        })
    }
}
