//! The CPU copy engine: streams weights that are not resident from host memory into staging
//! buffers on its own thread, at least one layer ahead of compute (double buffering), with an
//! optional cap that emulates a PCIe link so a schedule can be tested without a GPU.
//!
//! Compute submits one job per layer for a pass, `wait`s for exactly the layer it needs (the
//! time blocked there is the stall the planner tries to hide), reads the buffer, and `release`s
//! it so the next job can land. See `worker` for the thread's side.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use memmap2::{Mmap, MmapMut};
use serde_json::json;

use crate::error::{Error, Result};
use crate::transfer::trace::{Trace, Track};
use crate::transfer::{
    check_next, validate_jobs, CopyEngine, CopyEngineOptions, CopyJob, CopyStats, StagedJob,
};
use crate::units::format_bytes;

mod worker;

use worker::{Command, Pacing, QueuedJob, Report, Shared, Worker};

/// Gives each engine an id so a `Filled` cannot be released to the wrong one.
static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// A job submitted and not yet handed out by `wait`.
struct Expected {
    seq: u64,
    layer: usize,
    label: String,
}

/// Copies host bytes into staging buffers on thread "copy-engine", in submission order.
pub struct CpuCopyEngine {
    id: u64,
    commands: Sender<Command>,
    reports: Receiver<Report>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    buffers: usize,
    buffer_bytes: usize,
    trace: Option<Trace>,
    generation: u64,
    next_seq: u64,
    expected: VecDeque<Expected>,
    /// Buffer indices handed out by `wait` and not yet released.
    held: HashSet<usize>,
    /// Released while views were still alive: reclaimed once they are dropped, or replaced
    /// at `cancel`.
    stuck: Vec<(usize, Arc<Mmap>)>,
    wait_ns: u64,
    /// Why the engine stopped, once it has.
    broken: Option<String>,
}

/// A staging buffer filled with one job's pieces; read-only while compute holds it.
#[derive(Debug)]
pub struct Filled {
    /// The job's layer.
    pub layer: usize,
    /// The whole staging buffer (its capacity is `buffer_bytes`; the job's bytes are at the
    /// start). Clones made from it must be dropped before `release`.
    pub buffer: Arc<Mmap>,
    /// Where each of the job's pieces landed in `buffer`, in the job's order.
    pub pieces: Vec<Range<usize>>,
    engine: u64,
    index: usize,
    seq: u64,
    generation: u64,
}

impl Filled {
    /// The bytes of piece `i`, if there is one.
    pub fn piece(&self, i: usize) -> Option<&[u8]> {
        self.pieces.get(i).and_then(|r| self.buffer.get(r.clone()))
    }

    /// Bytes of the job (all pieces).
    pub fn bytes(&self) -> usize {
        self.pieces.last().map_or(0, |r| r.end)
    }

    /// The job's sequence number (what `CopyEngineOptions::delay` was given).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

fn map_buffer(bytes: usize) -> Result<MmapMut> {
    let buffer = MmapMut::map_anon(bytes).map_err(|e| {
        Error::CopyEngine(format!(
            "cannot map a {} staging buffer: {e}",
            format_bytes(bytes as u64)
        ))
    })?;
    // Huge pages cut TLB misses on large copies; where the kernel says no, plain pages do.
    #[cfg(target_os = "linux")]
    let _ = buffer.advise(memmap2::Advice::HugePage);
    Ok(buffer)
}

impl CpuCopyEngine {
    /// Allocates the staging buffers and starts thread "copy-engine".
    pub fn new(opts: CopyEngineOptions) -> Result<Self> {
        if opts.buffers < 2 {
            return Err(Error::InvalidArgument(format!(
                "the copy engine needs at least 2 staging buffers (double buffering), got {}",
                opts.buffers
            )));
        }
        if opts.buffer_bytes == 0 {
            return Err(Error::InvalidArgument(
                "copy engine staging buffers must hold at least one byte".into(),
            ));
        }
        let link_bytes_per_s = match opts.link_gbps {
            Some(g) if g.is_finite() && g > 0.0 => Some(g * 1e9),
            Some(g) => {
                return Err(Error::InvalidArgument(format!(
                    "link speed must be a positive number of GB/s, got {g}"
                )))
            }
            None => None,
        };
        let free = (0..opts.buffers)
            .map(|i| Ok((i, map_buffer(opts.buffer_bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        let (commands, command_rx) = mpsc::channel();
        let (report_tx, reports) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            commands: command_rx,
            reports: report_tx,
            free,
            shared: shared.clone(),
            pacing: Pacing {
                link_bytes_per_s,
                delay: opts.delay,
                trace: opts.trace.clone(),
            },
            queue: VecDeque::new(),
        };
        let thread = thread::Builder::new()
            .name("copy-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::CopyEngine(format!("cannot start the copy thread: {e}")))?;
        Ok(CpuCopyEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            commands,
            reports,
            thread: Some(thread),
            shared,
            buffers: opts.buffers,
            buffer_bytes: opts.buffer_bytes,
            trace: opts.trace,
            generation: 0,
            next_seq: 0,
            expected: VecDeque::new(),
            held: HashSet::new(),
            stuck: Vec::new(),
            wait_ns: 0,
            broken: None,
        })
    }

    /// Queues jobs, copied in order as buffers come free (at most `buffers` jobs filled ahead
    /// of compute). Nothing is queued if any job is larger than `buffer_bytes` or reads outside
    /// its mapping, or if the engine stopped.
    pub fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        self.check_alive()?;
        self.reclaim_stuck()?;
        validate_jobs(&jobs, self.buffer_bytes)?;
        let mut queued = Vec::with_capacity(jobs.len());
        for job in jobs {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.expected.push_back(Expected {
                seq,
                layer: job.layer,
                label: job.label.clone(),
            });
            queued.push(QueuedJob {
                seq,
                generation: self.generation,
                job,
            });
        }
        self.send(Command::Jobs(queued))
    }

    /// Blocks until the next queued job is filled; it must be for `layer` (jobs are consumed in
    /// submission order; anything else is an "out of order" error and consumes nothing). Time
    /// blocked here is the stall.
    pub fn wait(&mut self, layer: usize) -> Result<Filled> {
        self.check_alive()?;
        self.reclaim_stuck()?;
        check_next(
            layer,
            (self.expected.front()).map(|e| (e.layer, e.label.as_str())),
        )?;
        let (seq, label) = match self.expected.front() {
            Some(e) => (e.seq, e.label.clone()),
            None => return Err(Error::CopyEngine("no copy job is queued".into())),
        };
        let start = Instant::now();
        let (filled, blocked) = self.next_filled(layer, seq)?;
        let end = Instant::now();
        self.wait_ns += (end - start).as_nanos().min(u64::MAX as u128) as u64;
        if let (true, Some(trace)) = (blocked, &self.trace) {
            trace.span(
                Track::Compute,
                format!("stall: {label}"),
                start,
                end,
                json!({"layer": layer}),
            );
        }
        self.expected.pop_front();
        self.held.insert(filled.index);
        Ok(filled)
    }

    /// Receives reports until job `seq` (for `layer`) is filled, giving back the buffers of
    /// cancelled passes; also says whether it had to block.
    fn next_filled(&mut self, layer: usize, seq: u64) -> Result<(Filled, bool)> {
        let mut blocked = false;
        let filled = loop {
            let report = match self.reports.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => {
                    // Without a buffer the thread can never fill the job: say so, not hang.
                    if self.held.len() + self.stuck.len() >= self.buffers {
                        return Err(Error::CopyEngine(format!(
                            "waited for layer {layer} but all {} staging buffers are held by \
                             compute ({} not released, {} released with live views): release \
                             one before waiting for the next",
                            self.buffers,
                            self.held.len(),
                            self.stuck.len()
                        )));
                    }
                    blocked = true;
                    match self.reports.recv() {
                        Ok(r) => r,
                        Err(_) => return Err(self.thread_gone()),
                    }
                }
                Err(TryRecvError::Disconnected) => return Err(self.thread_gone()),
            };
            match report {
                Report::Filled {
                    seq: got,
                    generation,
                    layer: got_layer,
                    index,
                    buffer,
                    pieces,
                } if generation == self.generation => {
                    if got != seq {
                        return Err(self.stop(format!(
                            "internal: expected job {seq} but job {got} was filled"
                        )));
                    }
                    break Filled {
                        layer: got_layer,
                        buffer,
                        pieces,
                        engine: self.id,
                        index,
                        seq,
                        generation,
                    };
                }
                // A leftover of a cancelled pass: give its buffer back.
                Report::Filled { index, buffer, .. } => self.give_back(index, buffer)?,
                Report::Cancelled { .. } => {}
                Report::Failed(msg) => return Err(self.stop(msg)),
            }
        };
        Ok((filled, blocked))
    }

    /// Hands the buffer back for the next job. Every clone of `filled.buffer` must have been
    /// dropped; if one is still alive this is an error, and the buffer comes back to the engine
    /// by itself once the last clone is dropped (or at `cancel`).
    pub fn release(&mut self, filled: Filled) -> Result<()> {
        self.check_alive()?;
        if filled.engine != self.id {
            return Err(Error::CopyEngine(
                "released a buffer that another copy engine filled".into(),
            ));
        }
        if filled.generation != self.generation {
            // Its pass was cancelled and the buffer already replaced: just unmap it.
            return Ok(());
        }
        self.held.remove(&filled.index);
        let views = Arc::strong_count(&filled.buffer) - 1;
        if views > 0 {
            self.stuck.push((filled.index, filled.buffer));
            return Err(Error::CopyEngine(format!(
                "released the staging buffer of layer {} while {views} view(s) of it are alive: \
                 drop every clone of Filled::buffer first",
                filled.layer
            )));
        }
        let result = self.give_back(filled.index, filled.buffer);
        self.reclaim_stuck()?;
        result
    }

    /// Drops queued and filled-but-unconsumed jobs (a pass that ended early, an error) and
    /// returns all buffers (those compute still holds are replaced, and releasing them later is
    /// a no-op); after it the engine is ready for new submits.
    pub fn cancel(&mut self) -> Result<()> {
        self.check_alive()?;
        self.reclaim_stuck()?;
        // Map the replacements before forgetting anything, so a failure leaves state as it was.
        let lost: Vec<usize> = (self.held.iter().copied())
            .chain(self.stuck.iter().map(|(i, _)| *i))
            .collect();
        let replacements = lost
            .into_iter()
            .map(|index| Ok((index, map_buffer(self.buffer_bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        self.held.clear();
        self.stuck.clear();
        self.generation += 1;
        // The thread polls this mid-job, so a long copy stops within a chunk.
        self.shared
            .generation
            .store(self.generation, Ordering::SeqCst);
        self.send(Command::Cancel {
            generation: self.generation,
            replacements,
        })?;
        self.expected.clear();
        // Reports are in order: everything before the acknowledgement is stale.
        loop {
            match self.reports.recv() {
                Ok(Report::Cancelled { generation }) if generation == self.generation => {
                    return Ok(())
                }
                Ok(Report::Cancelled { .. }) => {}
                Ok(Report::Filled { index, buffer, .. }) => self.give_back(index, buffer)?,
                Ok(Report::Failed(msg)) => return Err(self.stop(msg)),
                Err(_) => return Err(self.thread_gone()),
            }
        }
    }

    /// Jobs submitted and not yet handed out by `wait`.
    pub fn queued(&self) -> usize {
        self.expected.len()
    }

    /// What the engine did since it was made or `reset_stats`.
    pub fn stats(&self) -> CopyStats {
        CopyStats::from_times(
            self.shared.bytes.load(Ordering::Relaxed),
            self.shared.jobs.load(Ordering::Relaxed),
            self.shared.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.wait_ns as f64 / 1e9,
            // The copy thread gathers; its time is in busy_s.
            0.0,
        )
    }

    /// Zeroes the stats (e.g. after warm-up).
    pub fn reset_stats(&mut self) {
        self.shared.bytes.store(0, Ordering::Relaxed);
        self.shared.jobs.store(0, Ordering::Relaxed);
        self.shared.busy_ns.store(0, Ordering::Relaxed);
        self.wait_ns = 0;
    }

    /// Makes a buffer compute no longer uses writable and sends it to the thread.
    fn give_back(&mut self, index: usize, buffer: Arc<Mmap>) -> Result<()> {
        let buffer = match Arc::try_unwrap(buffer) {
            Ok(b) => b,
            // Only reachable if a view was made concurrently from a Weak; keep it for later.
            Err(shared) => {
                self.stuck.push((index, shared));
                return Ok(());
            }
        };
        let buffer = match buffer.make_mut() {
            Ok(b) => b,
            // The old mapping is gone with the failed call; a fresh one takes its place.
            Err(_) => map_buffer(self.buffer_bytes)?,
        };
        self.send(Command::Return { index, buffer })
    }

    /// Returns buffers whose last view has been dropped since a failed `release`.
    fn reclaim_stuck(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.stuck.len() {
            if Arc::strong_count(&self.stuck[i].1) == 1 {
                let (index, buffer) = self.stuck.swap_remove(i);
                self.give_back(index, buffer)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn send(&mut self, cmd: Command) -> Result<()> {
        self.commands.send(cmd).map_err(|_| self.thread_gone())
    }

    fn check_alive(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::CopyEngine(format!(
                "{why}; the engine has stopped, make a new one"
            ))),
            None => Ok(()),
        }
    }

    /// Records why the engine stopped and returns the error.
    fn stop(&mut self, why: String) -> Error {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.broken = Some(why.clone());
        Error::CopyEngine(why)
    }

    /// The thread hung up: find out why (a panic's message) and stop.
    fn thread_gone(&mut self) -> Error {
        let why = match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                format!("the copy thread panicked: {msg}")
            }
            _ => "the copy thread stopped".to_string(),
        };
        self.stop(why)
    }
}

impl Drop for CpuCopyEngine {
    fn drop(&mut self) {
        // The flag stops a job mid-copy; the command wakes a thread waiting for work.
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was reported (or would have been) through the channel.
            let _ = thread.join();
        }
    }
}

impl StagedJob for Filled {
    fn layer(&self) -> usize {
        self.layer
    }

    fn pieces(&self) -> &[Range<usize>] {
        &self.pieces
    }
}

impl CopyEngine for CpuCopyEngine {
    type Filled = Filled;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()> {
        CpuCopyEngine::submit(self, jobs)
    }

    fn wait(&mut self, layer: usize) -> Result<Filled> {
        CpuCopyEngine::wait(self, layer)
    }

    fn release(&mut self, filled: Filled) -> Result<()> {
        CpuCopyEngine::release(self, filled)
    }

    fn cancel(&mut self) -> Result<()> {
        CpuCopyEngine::cancel(self)
    }

    fn stats(&mut self) -> Result<CopyStats> {
        Ok(CpuCopyEngine::stats(self))
    }

    fn reset_stats(&mut self) -> Result<()> {
        CpuCopyEngine::reset_stats(self);
        Ok(())
    }
}
