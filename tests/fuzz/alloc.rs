//! The fuzz binary's allocator: the system's, except that one request above the limit
//! (`SIRIUS_FUZZ_ALLOC_LIMIT` bytes, default 1 GiB: inputs are kilobytes, so such a request is
//! a size read from the input and trusted) stops the process with the case that asked,
//! instead of an out-of-memory abort that names nothing, or swapping for minutes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

const DEFAULT_LIMIT: usize = 1 << 30;
static LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LIMIT);

thread_local! {
    /// The loop and case this thread runs: (loop, seed, case).
    static CONTEXT: Cell<Option<(&'static str, u64, u64)>> = const { Cell::new(None) };
}

/// Runs `f` as case `case` of loop `name` (what an oversized allocation reports).
pub fn during_case<R>(name: &'static str, seed: u64, case: u64, f: impl FnOnce() -> R) -> R {
    if let Some(limit) = std::env::var("SIRIUS_FUZZ_ALLOC_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        LIMIT.store(limit, Ordering::Relaxed);
    }
    CONTEXT.with(|c| c.set(Some((name, seed, case))));
    let out = f();
    CONTEXT.with(|c| c.set(None));
    out
}

/// A message written on the stack: the allocator must not allocate to report.
struct StackText {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cold]
fn oversized(size: usize) -> ! {
    use std::fmt::Write as _;
    let mut text = StackText {
        buf: [0; 512],
        len: 0,
    };
    let context = CONTEXT.try_with(Cell::get).ok().flatten();
    let _ = match context {
        Some((name, seed, case)) => writeln!(
            text,
            "FUZZ ALLOCATION {name}: case {case} asked for {size} bytes at once; reproduce with \
             SIRIUS_FUZZ_SEED={seed:#x} SIRIUS_FUZZ_CASE={case} cargo test --release --test \
             fuzz_loaders {name} -- --nocapture"
        ),
        None => writeln!(
            text,
            "FUZZ ALLOCATION: a helper thread asked for {size} bytes at once during the loops \
             (the last `fuzz NAME: seed` lines above name the loops running)"
        ),
    };
    let _ = std::io::stderr().write_all(&text.buf[..text.len]);
    std::process::abort()
}

pub struct Guard;

// SAFETY: every call is forwarded to the system allocator unchanged; the guard only refuses
// (by ending the process) requests above the limit.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT.load(Ordering::Relaxed) {
            oversized(layout.size());
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT.load(Ordering::Relaxed) {
            oversized(layout.size());
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT.load(Ordering::Relaxed) {
            oversized(new_size);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GUARD: Guard = Guard;
