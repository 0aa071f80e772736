//! A fork-join thread pool tuned for many tiny parallel regions.
//!
//! Decoding one token calls `run` a few hundred times (every matmul and attention), each
//! region lasting only microseconds, so a channel or a `Condvar` per call would cost more than
//! the work. Instead the caller publishes the job in one atomic word that idle workers spin
//! on; tasks are handed out with one atomic `fetch_add` each; the caller works too.
//!
//! Workers *join* a region (a CAS on that word) and the caller *closes* it once every task
//! has been claimed; it then waits only for the workers that joined. A worker that was not
//! running at the time (descheduled on a busy machine, or still waking up) simply misses the
//! region instead of stalling the caller for a scheduler time slice. Workers that see no new
//! region for `SPIN_TIME` go to sleep on a condvar so an idle process does not burn CPU.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker keeps spinning before it sleeps. Between two regions of one token
/// the gap is a few µs; between tokens (sampling, detokenizing) it can be longer, so this is a
/// compromise between wake-up latency and CPU burnt while idle.
const SPIN_TIME: Duration = Duration::from_micros(500);

/// Pure `spin_loop` iterations before a spinner starts also yielding its core (matters only
/// when there are more threads than cores, e.g. tests on a busy machine).
const PURE_SPINS: u32 = 1 << 14;

/// Layout of the region word: generation above, a closed flag, joined-worker count below.
const JOINED_BITS: u32 = 16;
const JOINED_MASK: u64 = (1 << JOINED_BITS) - 1;
const CLOSED: u64 = 1 << JOINED_BITS;
const GEN_SHIFT: u32 = JOINED_BITS + 1;

#[inline]
fn generation(word: u64) -> u64 {
    word >> GEN_SHIFT
}

/// Keeps hot atomics on separate cache lines (128 covers adjacent-line prefetch pairs).
#[repr(align(128))]
struct Padded<T>(T);

/// The current parallel region, lifetime-erased. Valid only while `ThreadPool::run` is on the
/// stack of the caller that stored it.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n_tasks: usize,
}

struct Shared {
    /// `generation << GEN_SHIFT | CLOSED? | joined`. The caller stores a new open generation
    /// to start a region and sets CLOSED when all tasks are claimed; workers CAS the joined
    /// count up while it is open.
    region: Padded<AtomicU64>,
    /// Next task index to hand out.
    next_task: Padded<AtomicUsize>,
    /// Joined workers that have finished the current region.
    done: Padded<AtomicUsize>,
    /// Written by the caller only between regions (after every joined worker is done), read
    /// by a worker only after it joined the region the job belongs to.
    job: UnsafeCell<Job>,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// First panic payload of the current region, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    panicked: AtomicBool,
}

// SAFETY: `job` is the only non-Sync field; the join/close protocol described on it makes its
// accesses race-free, and the closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// Fixed-size pool; the thread calling [`ThreadPool::run`] is one of the `n_threads`.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Set while a region runs; a concurrent or nested `run` then executes serially instead of
    /// corrupting the single job slot.
    busy: AtomicBool,
}

impl ThreadPool {
    /// Starts `n_threads - 1` workers (`n_threads` is clamped to 1..=65536).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.clamp(1, JOINED_MASK as usize + 1);
        let noop: &(dyn Fn(usize) + Sync) = &|_| {};
        let shared = Arc::new(Shared {
            region: Padded(AtomicU64::new(CLOSED)),
            next_task: Padded(AtomicUsize::new(0)),
            done: Padded(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                f: erase(noop),
                n_tasks: 0,
            }),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
            panicked: AtomicBool::new(false),
        });
        // A failed spawn (thread or memory limits) leaves a smaller pool rather than a panic:
        // n_threads() reports what we got.
        let mut workers = Vec::with_capacity(n_threads - 1);
        for i in 1..n_threads {
            let worker_shared = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("sirius-cpu-{i}"))
                .spawn(move || worker_loop(&worker_shared))
            {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    tracing::warn!("could only start {i} of {n_threads} CPU threads: {e}");
                    break;
                }
            }
        }
        ThreadPool {
            shared,
            workers,
            busy: AtomicBool::new(false),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i in 0..n_tasks` spread over the threads and returns when all
    /// are done. A panic in any task is re-raised here after every thread has stopped using `f`.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        if self.busy.swap(true, Ordering::Acquire) {
            // Nested (from inside a task) or concurrent use: stay correct, lose parallelism.
            (0..n_tasks).for_each(f);
            return;
        }
        let _busy = BusyGuard(&self.busy);
        let sh = &*self.shared;
        // SAFETY: the previous region is closed and all its joined workers are done, and no
        // worker reads `job` before joining the region published below.
        unsafe {
            *sh.job.get() = Job {
                f: erase(f),
                n_tasks,
            }
        };
        sh.next_task.0.store(0, Ordering::Relaxed);
        sh.done.0.store(0, Ordering::Relaxed);
        let gen = generation(sh.region.0.load(Ordering::Relaxed)) + 1;
        // SeqCst pairs with the sleepers check below (see `wait_for_region`); it also releases
        // the job slot and counters written above to the workers' joining CAS.
        sh.region.0.store(gen << GEN_SHIFT, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.sleep_lock.lock().unwrap_or_else(PoisonError::into_inner);
            sh.wake.notify_all();
        }

        let own = catch_unwind(AssertUnwindSafe(|| run_tasks(sh, f, n_tasks)));

        // Every task is claimed (or we panicked): late workers must not join any more.
        let joined = (sh.region.0.fetch_or(CLOSED, Ordering::AcqRel) & JOINED_MASK) as usize;
        // `f` lives on our stack: the joined workers must stop touching it before we return.
        let mut spins = 0u32;
        while sh.done.0.load(Ordering::Acquire) != joined {
            backoff(&mut spins);
        }
        if let Err(payload) = own {
            sh.panicked.store(false, Ordering::Relaxed);
            sh.panic
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            resume_unwind(payload);
        }
        if sh.panicked.swap(false, Ordering::Relaxed) {
            let payload = sh
                .panic
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            resume_unwind(payload.unwrap_or_else(|| Box::new("a CPU worker task panicked")));
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        let gen = generation(sh.region.0.load(Ordering::Relaxed)) + 1;
        sh.region
            .0
            .store(gen << GEN_SHIFT | CLOSED, Ordering::SeqCst);
        {
            let _g = sh.sleep_lock.lock().unwrap_or_else(PoisonError::into_inner);
            sh.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            // Tasks run under catch_unwind, so a worker thread itself never panics.
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .finish()
    }
}

struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Forgets the borrow's lifetime so the pointer can sit in the shared job slot.
fn erase<'a>(f: &'a (dyn Fn(usize) + Sync + 'a)) -> *const (dyn Fn(usize) + Sync) {
    let p: *const (dyn Fn(usize) + Sync + 'a) = f;
    // SAFETY: only the lifetime bound of the trait object changes (same layout); `run` keeps
    // the pointee alive until no thread can dereference the pointer any more.
    unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + 'a), *const (dyn Fn(usize) + Sync)>(p)
    }
}

fn run_tasks(sh: &Shared, f: &(dyn Fn(usize) + Sync), n_tasks: usize) {
    loop {
        let i = sh.next_task.0.fetch_add(1, Ordering::Relaxed);
        if i >= n_tasks {
            return;
        }
        f(i);
    }
}

fn worker_loop(sh: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut word = wait_for_region(sh, seen);
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = generation(word);
        // Join unless the caller already closed this region.
        let joined = loop {
            if word & CLOSED != 0 || generation(word) != seen {
                break false;
            }
            match sh.region.0.compare_exchange_weak(
                word,
                word + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break true,
                Err(now) => word = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: we joined, so the job slot holds this region's job, whose closure stays
        // alive until the caller sees our `done` increment.
        let job = unsafe { *sh.job.get() };
        let f = unsafe { &*job.f };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run_tasks(sh, f, job.n_tasks))) {
            let mut slot = sh.panic.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(payload);
            }
            sh.panicked.store(true, Ordering::Relaxed);
        }
        sh.done.0.fetch_add(1, Ordering::Release);
    }
}

/// Returns the region word once its generation differs from `seen`: spin first (fast
/// hand-off), then sleep on the condvar.
fn wait_for_region(sh: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let w = sh.region.0.load(Ordering::Acquire);
        if generation(w) != seen {
            return w;
        }
        backoff(&mut spins);
        if spins.is_multiple_of(256) && start.elapsed() > SPIN_TIME {
            break;
        }
    }
    let mut guard = sh.sleep_lock.lock().unwrap_or_else(PoisonError::into_inner);
    // Dekker-style pairing with `run`: either it sees our increment and notifies (it must take
    // the lock, which we hold until `wait` releases it), or we see its new region here.
    sh.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let w = sh.region.0.load(Ordering::SeqCst);
        if generation(w) != seen {
            sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            return w;
        }
        guard = sh.wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
    }
}

#[inline]
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < PURE_SPINS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn runs_every_task_once() {
        for n_threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n_threads);
            assert_eq!(pool.n_threads(), n_threads);
            for n_tasks in [0, 1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n_tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn workers_take_part() {
        let pool = ThreadPool::new(3);
        let ids = Mutex::new(std::collections::HashSet::new());
        pool.run(60, &|_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_millis(2));
        });
        assert!(ids.lock().unwrap().len() >= 2, "only the caller ran tasks");
    }

    #[test]
    fn many_small_regions_and_sleep_wakeup() {
        let pool = ThreadPool::new(3);
        let sum = AtomicUsize::new(0);
        for round in 0..20_000 {
            pool.run(4, &|i| {
                sum.fetch_add(i + 1, Ordering::Relaxed);
            });
            if round % 5000 == 0 {
                // Long enough for the workers to fall asleep.
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        assert_eq!(sum.load(Ordering::Relaxed), 20_000 * 10);
    }

    #[test]
    fn worker_panic_is_reraised_and_pool_survives() {
        let pool = ThreadPool::new(2);
        for _ in 0..20 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(8, &|i| {
                    if i == 5 {
                        panic!("boom {i}");
                    }
                })
            }));
            let payload = r.expect_err("panic must propagate");
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or("");
            assert_eq!(msg, "boom 5");
        }
        let count = AtomicUsize::new(0);
        pool.run(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_and_concurrent_runs_fall_back_to_serial() {
        let pool = Arc::new(ThreadPool::new(2));
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let c = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run(5, &|_| {
                            c.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                    c.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 1000);
        }
    }
}
