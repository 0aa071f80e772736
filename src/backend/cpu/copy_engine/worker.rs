//! The copy thread of [`super::CpuCopyEngine`]: owns the free staging buffers, fills them in job
//! order, and hands each one over read-only.
//!
//! Ownership passing keeps it safe Rust: a buffer is either in the thread's free list (writable),
//! in flight to compute (read-only, in an `Arc`), or on its way back (writable again). The
//! thread never touches a buffer compute can see.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapMut};
use serde_json::json;

use crate::transfer::trace::{Trace, Track};
use crate::transfer::{CopyJob, DelayFn};

/// Bytes copied between checks for cancel/stop and between pacing sleeps: small enough that a
/// capped link looks smooth and a drop is prompt, large enough that checks cost nothing.
const CHUNK: usize = 1 << 20;
/// Longest single sleep, so that stop and cancel are seen within about this long.
const SLEEP_SLICE: Duration = Duration::from_millis(1);

/// State both sides read: stop/cancel flags the thread polls mid-job, and the counters behind
/// `CopyStats`.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub stop: AtomicBool,
    /// Jobs of an older generation than this are cancelled.
    pub generation: AtomicU64,
    pub bytes: AtomicU64,
    pub jobs: AtomicU64,
    pub busy_ns: AtomicU64,
}

/// A job as the thread sees it.
pub(super) struct QueuedJob {
    pub seq: u64,
    pub generation: u64,
    pub job: CopyJob,
}

/// Compute -> thread.
pub(super) enum Command {
    Jobs(Vec<QueuedJob>),
    /// A released buffer, writable again.
    Return {
        index: usize,
        buffer: MmapMut,
    },
    /// Drop every queued job; `replacements` stand in for buffers compute still holds.
    Cancel {
        generation: u64,
        replacements: Vec<(usize, MmapMut)>,
    },
    Stop,
}

/// Thread -> compute.
pub(super) enum Report {
    Filled {
        seq: u64,
        generation: u64,
        layer: usize,
        index: usize,
        buffer: Arc<Mmap>,
        pieces: Vec<Range<usize>>,
    },
    /// Every report of older generations has been sent before this one.
    Cancelled { generation: u64 },
    /// The thread cannot go on (a buffer could not change protection); it has exited.
    Failed(String),
}

/// What the thread does besides copying.
pub(super) struct Pacing {
    /// Bytes per second of the emulated link, if capped.
    pub link_bytes_per_s: Option<f64>,
    pub delay: Option<DelayFn>,
    pub trace: Option<Trace>,
}

pub(super) struct Worker {
    pub commands: Receiver<Command>,
    pub reports: Sender<Report>,
    pub free: Vec<(usize, MmapMut)>,
    pub shared: Arc<Shared>,
    pub pacing: Pacing,
    pub queue: VecDeque<QueuedJob>,
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    Exit,
}

impl Worker {
    pub fn run(mut self) {
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            // Take in everything already sent, so cancels and returns are seen before the next
            // job starts.
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => {
                        if let Flow::Exit = self.handle(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let current = self.shared.generation.load(Ordering::SeqCst);
            while self.queue.front().is_some_and(|q| q.generation < current) {
                self.queue.pop_front();
            }
            if !self.queue.is_empty() && !self.free.is_empty() {
                if let (Some(job), Some((index, buffer))) =
                    (self.queue.pop_front(), self.free.pop())
                {
                    if let Flow::Exit = self.run_job(job, index, buffer) {
                        return;
                    }
                }
                continue;
            }
            // Nothing to do until compute sends a job or a buffer.
            match self.commands.recv() {
                Ok(cmd) => {
                    if let Flow::Exit = self.handle(cmd) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn handle(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Jobs(jobs) => self.queue.extend(jobs),
            Command::Return { index, buffer } => self.free.push((index, buffer)),
            Command::Cancel {
                generation,
                replacements,
            } => {
                // Jobs sent after the cancel arrive after it, so all queued ones are stale.
                self.queue.clear();
                self.free.extend(replacements);
                if self.reports.send(Report::Cancelled { generation }).is_err() {
                    return Flow::Exit;
                }
            }
            Command::Stop => return Flow::Exit,
        }
        Flow::Continue
    }

    /// Whether the job of `generation` should stop now (engine dropped or pass cancelled).
    fn aborted(&self, generation: u64) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
            || self.shared.generation.load(Ordering::SeqCst) > generation
    }

    /// Sleeps until `until` in short slices; true if the job was aborted meanwhile.
    fn pause_until(&self, until: Instant, generation: u64) -> bool {
        loop {
            if self.aborted(generation) {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            thread::sleep((until - now).min(SLEEP_SLICE));
        }
    }

    fn run_job(&mut self, q: QueuedJob, index: usize, mut buffer: MmapMut) -> Flow {
        let t0 = Instant::now();
        let generation = q.generation;
        let mut done = 0usize;
        let mut pieces = Vec::with_capacity(q.job.pieces.len());
        let completed = 'copy: {
            if let Some(delay) = &self.pacing.delay {
                if self.pause_until(t0 + delay(q.seq), generation) {
                    break 'copy false;
                }
            }
            let t1 = Instant::now();
            let mut next_mark = CHUNK;
            for piece in &q.job.pieces {
                let start = done;
                // Ranges and sizes were checked at submit; `get` keeps a slip an error, not a
                // panic.
                let Some(src) = piece.map.get(piece.range.clone()) else {
                    return self.fail(format!("job {} piece out of range", q.job.label));
                };
                for chunk in src.chunks(CHUNK) {
                    let Some(dst) = buffer.get_mut(done..done + chunk.len()) else {
                        return self.fail(format!("job {} overflows its buffer", q.job.label));
                    };
                    dst.copy_from_slice(chunk);
                    done += chunk.len();
                    if done >= next_mark {
                        next_mark = done + CHUNK;
                        if self.pace(t1, done, generation) {
                            break 'copy false;
                        }
                    }
                }
                pieces.push(start..done);
            }
            // The final pace makes every job take at least bytes / rate.
            !self.pace(t1, done, generation)
        };
        let end = Instant::now();
        let shared = &self.shared;
        shared.bytes.fetch_add(done as u64, Ordering::Relaxed);
        let busy = (end - t0).as_nanos().min(u64::MAX as u128) as u64;
        shared.busy_ns.fetch_add(busy, Ordering::Relaxed);
        if let Some(trace) = &self.pacing.trace {
            let args =
                json!({"layer": q.job.layer, "bytes": done, "seq": q.seq, "completed": completed});
            trace.span(Track::Copy, q.job.label.as_str(), t0, end, args);
        }
        if !completed {
            self.free.push((index, buffer));
            return Flow::Continue;
        }
        shared.jobs.fetch_add(1, Ordering::Relaxed);
        let buffer = match buffer.make_read_only() {
            Ok(b) => Arc::new(b),
            Err(e) => {
                return self.fail(format!("cannot make staging buffer {index} read-only: {e}"))
            }
        };
        let report = Report::Filled {
            seq: q.seq,
            generation,
            layer: q.job.layer,
            index,
            buffer,
            pieces,
        };
        match self.reports.send(report) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Exit,
        }
    }

    /// Holds the copy to the link rate after `done` bytes since `start`; true if aborted.
    fn pace(&self, start: Instant, done: usize, generation: u64) -> bool {
        match self.pacing.link_bytes_per_s {
            Some(rate) => {
                // A rate too small to express as a Duration paces "forever" (until aborted).
                let wait = Duration::try_from_secs_f64(done as f64 / rate)
                    .unwrap_or(Duration::from_secs(86_400));
                let target = start
                    .checked_add(wait)
                    .unwrap_or(start + Duration::from_secs(86_400));
                self.pause_until(target, generation)
            }
            None => self.aborted(generation),
        }
    }

    fn fail(&self, msg: String) -> Flow {
        // If compute is gone there is nobody to tell.
        let _ = self.reports.send(Report::Failed(msg));
        Flow::Exit
    }
}
