//! Per-op temporaries (neuron lists, partial sums, attention chunks, uploaded ids) out of one
//! device region per context, handed out as a stack ([`TempStack`], which says why stream
//! order makes that safe), so an op's temporaries cost no allocation.
//!
//! Offloaded runs size the region up front from the request's shape
//! (`backend::offload::gpu_temporaries_bytes`, booked in the `--gpu-mem` budget as part of the
//! backend scratch). Without a budget (a model wholly on the GPU) the region starts empty and
//! grows, when no temporary is alive, to the most that was asked of it; until then, and for
//! any request past it, the temporary is allocated on its own and counted
//! (`Ctx::allocations`), so a steady decode loop allocates nothing.

use std::sync::Arc;

use super::buffers::DevMem;
use super::context::Ctx;
use crate::backend::temp_stack::{TempGrant, TempStack};
use crate::error::Result;

/// The region and its bookkeeping (in `Ctx::temps`).
#[derive(Default)]
pub(crate) struct TempArena {
    /// Device address of the region (0: none yet).
    base: u64,
    stack: TempStack,
    /// Sized by a budget (`reserve_temporaries`): never grown past it, so a temporary
    /// beyond the bound stays an allocation of its own (counted) rather than a larger
    /// region kept outside `--gpu-mem` for good.
    budgeted: bool,
}

impl TempArena {
    /// Hands the region's address over (for the context's Drop to free), leaving none.
    pub fn take_region(&mut self) -> u64 {
        self.stack = TempStack::default();
        std::mem::take(&mut self.base)
    }

    /// Replaces the region with one of `bytes` (only while no temporary is alive): the old
    /// one is freed in stream order, after the kernels that used it.
    fn replace(&mut self, ctx: &Ctx, op: &str, bytes: usize) -> Result<()> {
        if !self.stack.is_idle() || bytes <= self.stack.capacity() {
            return Ok(());
        }
        let new = ctx.alloc_raw(op, bytes)?;
        ctx.free_raw(self.base);
        self.base = new;
        self.stack.resize(bytes);
        Ok(())
    }
}

/// Where a temporary's bytes are.
enum Held {
    Region(TempGrant),
    /// The region could not hold it: allocated on its own, freed with the temporary.
    Own {
        _mem: DevMem,
    },
}

/// A temporary of at least one byte, given back on drop (never panicking).
pub(crate) struct Temp {
    ctx: Arc<Ctx>,
    ptr: u64,
    held: Held,
}

impl Temp {
    /// `bytes` uninitialised bytes for `op`.
    pub fn new(ctx: &Arc<Ctx>, op: &str, bytes: usize) -> Result<Temp> {
        let granted = {
            let mut arena = ctx.temps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(want) = arena.stack.wanted_growth().filter(|_| !arena.budgeted) {
                // Best effort: if the bigger region cannot be had, the request below falls
                // back to an allocation of its own (which reports a full GPU itself).
                let _ = arena.replace(ctx, "per-op temporaries", want);
            }
            let base = arena.base;
            arena.stack.take(bytes).map(|g| (base + g.offset as u64, g))
        };
        let (ptr, held) = match granted {
            Some((ptr, grant)) => (ptr, Held::Region(grant)),
            None => {
                let mem = DevMem::new(ctx, op, bytes.max(1))?;
                (mem.ptr(), Held::Own { _mem: mem })
            }
        };
        Ok(Temp {
            ctx: ctx.clone(),
            ptr,
            held,
        })
    }

    /// A temporary holding a copy of `data` (uploaded in stream order: the host bytes are
    /// staged by the driver before this returns).
    pub fn upload<T: Copy>(ctx: &Arc<Ctx>, op: &str, data: &[T]) -> Result<Temp> {
        let t = Temp::new(ctx, op, std::mem::size_of_val(data))?;
        ctx.htod(op, t.ptr, data)?;
        Ok(t)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Held::Region(grant) = self.held {
            let mut arena = self.ctx.temps.lock().unwrap_or_else(|e| e.into_inner());
            arena.stack.release(grant);
        }
    }
}

/// Makes the region hold at least `bytes` before a request starts (offloaded runs: the
/// budgeted size), so the request's temporaries allocate nothing.
pub(crate) fn reserve_temporaries(ctx: &Ctx, bytes: usize) -> Result<()> {
    let mut arena = ctx.temps.lock().unwrap_or_else(|e| e.into_inner());
    arena.budgeted = true;
    arena.replace(ctx, "per-op temporaries", bytes)
}
