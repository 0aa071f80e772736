//! Transfers: the contract every copy engine keeps (the CPU's in `backend::cpu::copy_engine`,
//! the CUDA one in `backend::cuda::copy_engine`), the jobs they run, their statistics, and
//! the trace recorder that shows copies and compute side by side ([`trace`]).
//!
//! An offloading runtime streams the weights that are not resident: per pass it submits one
//! [`CopyJob`] per layer, the engine fills staging buffers in submission order (at most as
//! many jobs ahead of compute as it has buffers), compute `wait`s for exactly the layer it
//! needs, reads the buffer through views, and `release`s it so the next job can land there.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use memmap2::Mmap;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::units::format_bytes;

pub mod trace;

use trace::Trace;

/// Bytes in host memory a copy reads: the memory-mapped checkpoint or host-built neuron bundles.
#[derive(Debug, Clone)]
pub struct HostSlice {
    /// The mapping the bytes live in (shared, read-only).
    pub map: Arc<Mmap>,
    /// The bytes' offsets within `map`.
    pub range: Range<usize>,
}

impl HostSlice {
    /// The whole mapping.
    pub fn whole(map: Arc<Mmap>) -> Self {
        let range = 0..map.len();
        HostSlice { map, range }
    }

    /// Bytes in the slice.
    pub fn len(&self) -> usize {
        self.range.end.saturating_sub(self.range.start)
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's transfer for one pass: its pieces land back to back in one staging buffer.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// The layer the bytes are for; `wait` checks it.
    pub layer: usize,
    /// Names the job in traces and errors (e.g. "layer 3 ffn complement").
    pub label: String,
    /// What to copy, in order.
    pub pieces: Vec<HostSlice>,
}

impl CopyJob {
    /// Bytes the job copies.
    pub fn bytes(&self) -> usize {
        self.pieces.iter().map(HostSlice::len).sum()
    }
}

/// A staging buffer one job filled, as compute holds it between `wait` and `release`.
pub trait StagedJob {
    /// The job's layer.
    fn layer(&self) -> usize;
    /// Where each of the job's pieces landed in the staging buffer (byte offsets), in order.
    fn pieces(&self) -> &[Range<usize>];
}

/// The submit / wait / release / cancel contract both copy engines keep: jobs are filled in
/// submission order, at most as many ahead of compute as there are staging buffers; `wait`
/// hands out the next one (which must be for the layer asked), `release` gives its buffer
/// back once compute no longer reads it; `cancel` drops everything queued.
///
/// One difference: `release` while a view of the buffer is still alive is an error on both,
/// but the CPU engine parks the buffer and takes it back by itself once the last view is
/// dropped, while the CUDA engine keeps it held by compute until `cancel` (which replaces
/// it with a fresh buffer if the view is still alive). Until then the CUDA engine has one
/// staging buffer fewer, and a `wait` that needs it fails instead of blocking.
pub trait CopyEngine {
    type Filled: StagedJob;

    fn submit(&mut self, jobs: Vec<CopyJob>) -> Result<()>;
    fn wait(&mut self, layer: usize) -> Result<Self::Filled>;
    fn release(&mut self, filled: Self::Filled) -> Result<()>;
    fn cancel(&mut self) -> Result<()>;
    /// Makes host `ranges` ready for jobs to read, before the passes that read them (CUDA:
    /// page-locks their pages for DMA, which takes seconds for many GB; jobs may still read
    /// other host bytes, more slowly). `scope` says how long. The CPU engine reads host
    /// memory in place: nothing to do.
    fn pin(&mut self, ranges: &[HostSlice], scope: PinFor) -> Result<PinReport> {
        let _ = (ranges, scope);
        Ok(PinReport::default())
    }
    /// What the engine did since it was made or `reset_stats` (`&mut`: the CUDA engine
    /// collects its event timings here, waiting for the copies still in flight).
    fn stats(&mut self) -> Result<CopyStats>;
    fn reset_stats(&mut self) -> Result<()>;
}

/// How long [`CopyEngine::pin`] keeps host ranges ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFor {
    /// The engine's life (the ranges an installed plan streams).
    Engine,
    /// Until the next `cancel` (a request's own copies; a new request cancels first).
    Request,
}

/// What [`CopyEngine::pin`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PinReport {
    /// Bytes of the ranges asked for.
    pub streamed_bytes: u64,
    /// Bytes the engine holds registered now (whole pages, every call so far).
    pub registered_bytes: u64,
    /// Bytes the driver would not register: jobs reading them are gathered on the host.
    pub refused_bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
}

impl PinReport {
    /// Nothing registered: all of `bytes` refused.
    pub fn refused(bytes: u64) -> PinReport {
        PinReport {
            streamed_bytes: bytes,
            refused_bytes: bytes,
            ..PinReport::default()
        }
    }
}

/// Extra delay per job, given the job's sequence number (tests use it to shake timing).
pub type DelayFn = Arc<dyn Fn(u64) -> Duration + Send + Sync>;

/// How to build a copy engine.
#[derive(Clone)]
pub struct CopyEngineOptions {
    /// Staging buffers, at least 2 (double buffering): how many jobs may be filled ahead.
    pub buffers: usize,
    /// Capacity of each staging buffer; no job may be larger.
    pub buffer_bytes: usize,
    /// The most pieces one job will have (0: unknown). The CUDA engine sizes its gather
    /// tables for it when it is made, so that no pass allocates.
    pub max_pieces: usize,
    /// Emulate a link of this many GB/s (10^9 bytes): a job of b bytes takes at least
    /// b / (link * 1e9) seconds, paced in ~1 MiB chunks so the rate is smooth.
    pub link_gbps: Option<f64>,
    /// Extra delay per job before it copies (counted as busy time).
    pub delay: Option<DelayFn>,
    /// Record each job as a `Track::Copy` span named by its label, args {layer, bytes}, and
    /// each blocking `wait` as a `Track::Compute` "stall" span.
    pub trace: Option<Trace>,
}

impl CopyEngineOptions {
    /// `buffers` buffers of `buffer_bytes` each, no link cap, no delay, no trace.
    pub fn new(buffers: usize, buffer_bytes: usize) -> Self {
        CopyEngineOptions {
            buffers,
            buffer_bytes,
            max_pieces: 0,
            link_gbps: None,
            delay: None,
            trace: None,
        }
    }
}

/// What the copy engine did since it was made or its stats were reset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CopyStats {
    /// Bytes copied (cancelled jobs included, as far as they got).
    pub bytes: u64,
    /// Jobs filled.
    pub jobs: u64,
    /// Seconds the copy thread spent on jobs, pacing and delays included.
    pub busy_s: f64,
    /// Seconds compute was blocked in `wait`.
    pub wait_s: f64,
    /// Fraction of copy time hidden behind compute: 1 - wait_s / busy_s in [0, 1]; 1 when
    /// nothing was copied.
    pub overlap: f64,
    /// bytes / busy_s / 1e9 (0 when nothing was copied).
    pub achieved_gbps: f64,
    /// Seconds the CUDA engine's copy thread spent gathering jobs' bytes into pinned staging
    /// memory (only bytes outside the registered ranges, which the engine cannot DMA straight
    /// from; pipelined with compute, and its uploads count in `busy_s`; host-timed; 0 when
    /// everything is DMA'd). 0 on the CPU, whose copy thread gathers as part of `busy_s`.
    pub host_gather_s: f64,
}

impl CopyStats {
    /// The stats of `bytes` in `jobs` that kept the link busy `busy_s` seconds while compute
    /// waited `wait_s`: overlap and GB/s as both engines define them.
    pub fn from_times(bytes: u64, jobs: u64, busy_s: f64, wait_s: f64, host_gather_s: f64) -> Self {
        let (overlap, achieved_gbps) = if busy_s > 0.0 {
            (
                (1.0 - wait_s / busy_s).clamp(0.0, 1.0),
                bytes as f64 / busy_s / 1e9,
            )
        } else {
            (1.0, 0.0)
        };
        CopyStats {
            bytes,
            jobs,
            busy_s,
            wait_s,
            overlap,
            achieved_gbps,
            host_gather_s,
        }
    }
}

/// Refuses `jobs` (both engines, before queuing any) if one reads outside its mapping or is
/// larger than a staging buffer of `buffer_bytes`.
pub fn validate_jobs(jobs: &[CopyJob], buffer_bytes: usize) -> Result<()> {
    for job in jobs {
        if let Some(p) =
            (job.pieces.iter()).find(|p| p.range.start > p.range.end || p.range.end > p.map.len())
        {
            return Err(Error::CopyEngine(format!(
                "job `{}` (layer {}) reads bytes {:?} of a {}-byte mapping",
                job.label,
                job.layer,
                p.range,
                p.map.len()
            )));
        }
        let bytes = job.bytes();
        if bytes > buffer_bytes {
            return Err(Error::CopyEngine(format!(
                "job `{}` (layer {}) is {} ({bytes} bytes), larger than a staging buffer of {} \
                 ({buffer_bytes} bytes): give the engine larger buffers or split the job",
                job.label,
                job.layer,
                format_bytes(bytes as u64),
                format_bytes(buffer_bytes as u64),
            )));
        }
    }
    Ok(())
}

/// `wait(layer)`'s order check (both engines): `next` is the next queued job's layer and
/// label, if any; jobs are handed out in submission order only.
pub fn check_next(layer: usize, next: Option<(usize, &str)>) -> Result<()> {
    match next {
        None => Err(Error::CopyEngine(format!(
            "out of order: waited for layer {layer} but no copy job is queued"
        ))),
        Some((l, label)) if l != layer => Err(Error::CopyEngine(format!(
            "out of order: waited for layer {layer} but the next queued job is `{label}` for \
             layer {l}"
        ))),
        Some(_) => Ok(()),
    }
}
