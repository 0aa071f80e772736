//! Issuing one job into a free slot: plan its pieces ([`super::plan`]), gather the staged
//! ones on the host, write the gather table, then queue the transfers on the copy stream
//! (after compute's release of the slot) and record `copied`.

use std::ffi::c_void;
use std::time::Instant;

use cudarc::driver::sys;
use serde_json::json;

use super::plan::{
    gather_grid, plan_job, table_capacity, table_words, JobPlan, PieceIn, GATHER_BLOCK,
    MAX_DMA_COPIES,
};
use super::timing::Span;
use super::{DeviceCopyEngine, GatherTable, Issued, Pending};
use crate::backend::cuda::buffers::DevMem;
use crate::backend::cuda::context::{to_u32, KArgs};
use crate::backend::cuda::device::{driver_error, guarded};
use crate::backend::cuda::memory::{HostAccess, PinnedBuffer};
use crate::error::{Error, Result};
use crate::transfer::trace::Track;
use crate::transfer::CopyJob;

const OP: &str = "copy engine";

impl DeviceCopyEngine {
    /// Issues pending jobs into free buffers, in order.
    pub(super) fn issue_pending(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let in_use = |i: usize| self.slots[i].held || self.issued.iter().any(|j| j.slot == i);
            let Some(slot) = (0..self.slots.len()).find(|&i| !in_use(i)) else {
                return Ok(());
            };
            let Some(pending) = self.pending.pop_front() else {
                return Ok(());
            };
            self.issue(slot, pending)?;
        }
        Ok(())
    }

    fn issue(&mut self, slot: usize, Pending { seq, job }: Pending) -> Result<()> {
        if let Some(delay) = &self.delay {
            std::thread::sleep(delay(seq));
        }
        let t0 = Instant::now();
        let mut pieces = Vec::with_capacity(job.pieces.len());
        for p in &job.pieces {
            let source = self.registry.source(p)?;
            pieces.push(PieceIn {
                source,
                len: p.len(),
            });
        }
        let plan = plan_job(&pieces, MAX_DMA_COPIES);
        self.stage(slot, &job, &plan)?;
        self.write_table(slot, &plan)?;
        // The device buffer's previous user (compute) must be done before it is overwritten.
        self.copy.wait(&self.slots[slot].consumed)?;
        if plan.bytes > 0 {
            let start = self.timings.start(&self.copy)?;
            self.transfer(slot, &plan)?;
            self.timings.stop(Span::Copy, start, &self.copy)?;
        }
        self.slots[slot].copied.record(&self.copy)?;
        self.bytes += plan.bytes as u64;
        self.jobs += 1;
        if let Some(trace) = &self.trace {
            let args = json!({"layer": job.layer, "bytes": plan.bytes, "seq": seq,
                              "path": plan.path(), "host_side": true});
            trace.span(Track::Copy, job.label.as_str(), t0, Instant::now(), args);
        }
        self.issued.push_back(Issued {
            layer: job.layer,
            label: job.label,
            slot,
            pieces: plan.landed,
        });
        Ok(())
    }

    /// The fallback path: copies the pieces of unregistered mappings into the slot's pinned
    /// staging, at the offsets they land at (host-timed as `host_gather_s`).
    fn stage(&mut self, slot: usize, job: &CopyJob, plan: &JobPlan) -> Result<()> {
        if plan.staged.is_empty() {
            return Ok(());
        }
        let s = &mut self.slots[slot];
        // The staging buffer's previous upload must be done before it is overwritten.
        s.copied.synchronize()?;
        let start = Instant::now();
        let host = match &mut s.host {
            Some(h) => h,
            None => s.host.insert(PinnedBuffer::new(
                &self.ctx.device,
                self.buffer_bytes,
                HostAccess::Upload,
            )?),
        };
        let host = host.as_mut_slice();
        for &i in &plan.staged {
            let bad = || Error::CopyEngine(format!("job `{}`: piece {i} out of range", job.label));
            let (p, at) = (
                job.pieces.get(i).ok_or_else(bad)?,
                plan.landed.get(i).ok_or_else(bad)?,
            );
            let src = p.map.get(p.range.clone()).ok_or_else(bad)?;
            host.get_mut(at.clone())
                .ok_or_else(bad)?
                .copy_from_slice(src);
        }
        self.gather_s += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Writes the gather kernel's table into the slot's pinned table buffer (growing it
    /// when too small), once the previous upload from it is done.
    fn write_table(&mut self, slot: usize, plan: &JobPlan) -> Result<()> {
        if plan.gather.is_empty() {
            return Ok(());
        }
        let rows = plan.gather.len();
        let have = self.slots[slot].table.as_ref().map_or(0, |t| t.rows);
        let want = table_capacity(rows, have);
        if want != have {
            // The old table may still be read by a queued upload or kernel (copy stream).
            self.copy.synchronize()?;
            let bytes = want * 3 * 8;
            self.slots[slot].table = Some(GatherTable {
                host: PinnedBuffer::new(&self.ctx.device, bytes, HostAccess::Upload)?,
                device: DevMem::new(&self.ctx, "copy engine gather table", bytes)?,
                rows: want,
            });
            // Stream-ordered allocations are made on the compute stream (see `new`).
            self.ctx.synchronize("copy engine gather table")?;
        }
        let s = &mut self.slots[slot];
        s.table_sent.synchronize()?;
        let table = s.table.as_mut().ok_or_else(|| {
            Error::CopyEngine("copy engine: the gather table was not allocated".into())
        })?;
        let words = table_words(&plan.gather);
        let dst = table.host.as_mut_slice();
        for (d, w) in dst.chunks_exact_mut(8).zip(&words) {
            d.copy_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }

    /// Queues the job's transfers on the copy stream: staged runs, DMAs from registered
    /// memory, then the table's upload and the gather kernel.
    fn transfer(&mut self, slot: usize, plan: &JobPlan) -> Result<()> {
        let s = &self.slots[slot];
        let base = s.device.ptr();
        if let Some(host) = &s.host {
            for run in &plan.staged_runs {
                let src = host.as_slice().get(run.clone()).ok_or_else(|| {
                    Error::CopyEngine("copy engine: a staged run past the buffer".into())
                })?;
                // SAFETY: `src` lies in the slot's pinned staging, not written again before
                // `copied` completes (`stage` waits for it; Drop syncs the copy stream).
                self.htod(
                    base + run.start as u64,
                    src.as_ptr() as *const c_void,
                    src.len(),
                )?;
            }
        }
        for d in &plan.direct {
            // SAFETY: `d.host` .. + `d.len` lies in a mapping the registry keeps mapped and
            // registered (page-locked) until the engine, its copy stream synchronized, drops.
            self.htod(base + d.dst as u64, d.host as *const c_void, d.len)?;
        }
        if plan.gather.is_empty() {
            return Ok(());
        }
        let table = (s.table.as_ref()).ok_or_else(|| {
            Error::CopyEngine("copy engine: the gather table was not allocated".into())
        })?;
        let bytes = plan.gather.len() * 3 * 8;
        let src = table.host.as_slice().get(..bytes).ok_or_else(|| {
            Error::CopyEngine("copy engine: the gather table is too small".into())
        })?;
        // SAFETY: `src` is the slot's pinned table, rewritten only after `table_sent` (recorded
        // next) completes; the device table holds `rows` >= gather.len() rows.
        self.htod(table.device.ptr(), src.as_ptr() as *const c_void, bytes)?;
        s.table_sent.record(&self.copy)?;
        let rows = to_u32(OP, "gather rows", plan.gather.len())?;
        let grid = gather_grid(plan.gather.len(), self.ctx.sms);
        let args = KArgs::new().ptr(table.device.ptr()).u32(rows).ptr(base);
        self.ctx.launch_on(
            &self.copy,
            OP,
            "gather_pieces",
            (grid, 1, 1),
            GATHER_BLOCK,
            args,
        )
    }

    /// One cuMemcpyHtoDAsync of `len` bytes from `src` to `dst` on the copy stream.
    ///
    /// Callers guarantee `src` is page-locked host memory that stays valid and unchanged
    /// until the copy completes, and `dst` has room for `len` bytes (the slot's buffer).
    fn htod(&self, dst: u64, src: *const c_void, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.copy.device.bind()?;
        let stream = self.copy.raw;
        // SAFETY: see the callers: `src` and `dst` hold `len` bytes for the copy's duration.
        guarded("cuMemcpyHtoDAsync", || unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src, len, stream).result()
        })?
        .map_err(|e| driver_error("cuMemcpyHtoDAsync", e))
    }
}
