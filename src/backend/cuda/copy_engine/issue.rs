//! Issuing one job into a free slot: plan its bytes ([`super::plan`]), write the gather
//! table, queue the DMAs and the gather kernel on the copy stream (after compute's release
//! of the slot) and record `copied`; bytes outside the registered ranges go to the copy
//! thread (`stager`).

use std::ffi::c_void;
use std::time::Instant;

use serde_json::json;

use super::plan::{
    gather_grid, plan_job, table_capacity, table_words, JobPlan, GATHER_BLOCK, MAX_DMA_COPIES,
};
use super::stager::StageTask;
use super::timing::Span;
use super::{DeviceCopyEngine, GatherTable, Issued, Pending};
use crate::backend::cuda::context::{to_u32, KArgs};
use crate::error::{Error, Result};
use crate::transfer::trace::Track;

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
        let lens: Vec<usize> = job.pieces.iter().map(|p| p.len()).collect();
        self.segments.clear();
        for p in job.pieces.iter().filter(|p| !p.is_empty()) {
            let addr = p.map.as_ptr() as usize + p.range.start;
            self.registry.segments(addr, p.len(), &mut self.segments);
        }
        let plan = plan_job(&lens, &self.segments, MAX_DMA_COPIES);
        self.write_table(slot, &plan)?;
        // The device buffer's previous user (compute) must be done before it is overwritten,
        // and so must the copy thread's last upload into it: after a cancel that upload may
        // still run (its answer only says it was queued), and this job's copies could land
        // under it. Nothing records `staged` for a free slot meanwhile (its last task was
        // answered), so this waits on that upload and no later one.
        self.copy.wait(&self.slots[slot].consumed)?;
        self.copy.wait(&self.slots[slot].staged)?;
        let on_stream = plan.bytes - plan.staged_runs.iter().map(|r| r.len()).sum::<usize>();
        if on_stream > 0 {
            let start = self.timings.start(&self.copy)?;
            self.transfer(slot, &plan)?;
            self.timings.stop(Span::Copy, start, &self.copy)?;
        }
        self.slots[slot].copied.record(&self.copy)?;
        let staged = !plan.staged.is_empty();
        if staged {
            let s = &self.slots[slot];
            let task = StageTask {
                slot,
                copies: plan.staged.clone(),
                runs: plan.staged_runs.clone(),
                _keep: job.pieces,
                device: s.device.clone(),
                consumed: s.consumed.clone(),
                staged: s.staged.clone(),
                timing: self.timings.pair()?,
            };
            self.stager.send(task)?;
        }
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
            staged,
        });
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
            // Tables are sized for the plan's largest job when the engine is made; a job
            // beyond it (a plan that did not say) grows the table here, mid-pass.
            tracing::debug!(
                "CUDA copy engine: a job of {rows} gather rows outgrew its slot's table of \
                 {have}; allocating {want}"
            );
            // The old table may still be read by a queued upload or kernel (copy stream).
            self.copy.synchronize()?;
            self.slots[slot].table = Some(GatherTable::new(&self.ctx, want)?);
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

    /// Queues the job's transfers on the copy stream: DMAs from registered memory, then the
    /// table's upload and the gather kernel (staged bytes are the copy thread's).
    fn transfer(&mut self, slot: usize, plan: &JobPlan) -> Result<()> {
        let s = &self.slots[slot];
        let base = s.device.ptr();
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
        // SAFETY: see the callers: `src` and `dst` hold `len` bytes for the copy's duration.
        unsafe { self.copy.copy_to_device(dst, src as *const u8, len) }
    }
}
