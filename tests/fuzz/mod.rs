//! The fuzz loops' driver: each case is a set of files made from `(seed, case number)` alone,
//! so any case can be made again from the two numbers a failure prints. A case fails when the
//! code under test panics, runs past the time bound (a watchdog thread notices while it runs),
//! asks for an absurd allocation (the test binary's allocator, `alloc.rs`), returns an `Ok`
//! that breaks the target's invariants, or an error that is not one line naming the culprit.
//!
//! Environment:
//! - `SIRIUS_FUZZ_CASES=N`: cases per loop (default [`default_cases`]: a few seconds each);
//! - `SIRIUS_FUZZ_SECONDS=S`: stop a loop after S seconds even if cases remain;
//! - `SIRIUS_FUZZ_SEED=S`: the loops' seed (default fixed, so CI runs are reproducible);
//! - `SIRIUS_FUZZ_CASE=I`: run only case I (to reproduce a failure; its files are saved);
//! - `SIRIUS_FUZZ_CASE_SECONDS=S`: the time bound of one case (default 10).
#![allow(dead_code)]

pub mod alloc;
pub mod bytes;
pub mod gguf;
pub mod json;
pub mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cases per loop when `SIRIUS_FUZZ_CASES` is not set: all loops together stay well under two
/// minutes of a test run on a shared 2-core machine (debug builds run ~20x slower).
pub fn default_cases() -> u64 {
    if cfg!(debug_assertions) {
        500
    } else {
        10_000
    }
}
const DEFAULT_SEED: u64 = 0x5151_2024_f022_0001;

/// Small, fast, seedable generator (xorshift64*, seeded through splitmix64).
pub struct Rng(u64);

impl Rng {
    /// The generator of case `case` of a loop seeded with `seed`.
    pub fn for_case(seed: u64, case: u64) -> Rng {
        let mut z = seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The files of one case, by name (a target writes them into its directory or reads them
/// from memory).
#[derive(Clone, Default)]
pub struct Case {
    pub files: Vec<(String, Vec<u8>)>,
    /// Go further with this case (load the whole model, convert it): the costlier checks
    /// run on a share of the cases.
    pub deep: bool,
}

impl Case {
    pub fn one(name: &str, bytes: Vec<u8>) -> Case {
        Case {
            files: vec![(name.to_string(), bytes)],
            deep: false,
        }
    }

    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }

    /// Writes the files into `dir` (emptied first).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        for (name, bytes) in &self.files {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(())
    }
}

/// What the code under test made of a case.
pub enum Verdict {
    Accepted,
    Refused,
}

/// A loop: makes cases, runs the target on each, checks the verdicts.
pub trait Target: Sync + Send {
    const NAME: &'static str;
    /// Case `rng` stands for.
    fn make(&self, rng: &mut Rng) -> Case;
    /// Runs the code under test on `case` (its files also written in `dir`); `Err` says
    /// which property the result broke.
    fn check(&self, case: &Case, dir: &Path) -> Result<Verdict, String>;
    /// The least fraction of cases that should be accepted (mutations too destructive to
    /// reach past the first check would test little).
    fn min_accepted(&self) -> f64 {
        0.01
    }
}

/// An error message's properties: one line, not empty, naming `culprit`.
pub fn one_line(msg: &str, culprit: &str) -> Result<Verdict, String> {
    if msg.trim().is_empty() || msg.contains('\n') {
        return Err(format!("the error is not one line: {msg:?}"));
    }
    if !msg.contains(culprit) {
        return Err(format!("the error does not name {culprit:?}: {msg}"));
    }
    Ok(Verdict::Refused)
}

fn env_u64(key: &str) -> Option<u64> {
    let v = std::env::var(key).ok()?;
    let v = v.trim().replace('_', "");
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn env_secs(key: &str) -> Option<Duration> {
    let v: f64 = std::env::var(key).ok()?.trim().parse().ok()?;
    (v > 0.0 && v.is_finite()).then(|| Duration::from_secs_f64(v))
}

/// Where a loop writes its cases' files: tmpfs when there is one (a million small writes).
fn scratch_dir(name: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("sirius-fuzz-{}-{name}", std::process::id()))
}

/// Where a failing case's files are kept for the report.
fn save_failure(name: &str, seed: u64, case: u64, c: &Case) -> String {
    let dir = std::env::temp_dir().join(format!("sirius-fuzz-failure-{name}-{seed:#x}-{case}"));
    match c.write(&dir) {
        Ok(()) => format!("its files are in {}", dir.display()),
        Err(e) => format!("(could not save its files to {}: {e})", dir.display()),
    }
}

fn reproduce(name: &str, seed: u64, case: u64) -> String {
    format!(
        "reproduce with SIRIUS_FUZZ_SEED={seed:#x} SIRIUS_FUZZ_CASE={case} cargo test --release \
         --test fuzz_loaders {name} -- --nocapture"
    )
}

/// Shared between a loop and its watchdog: which case runs and since when.
struct Progress {
    case: AtomicU64,
    started_ms: AtomicU64,
    done: AtomicBool,
}

/// Aborts the process when one case runs past `limit` (a hang cannot be unwound).
fn watchdog<T: Target + 'static>(
    target: Arc<T>,
    seed: u64,
    limit: Duration,
    progress: Arc<Progress>,
    epoch: Instant,
) {
    std::thread::spawn(move || {
        while !progress.done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            let started = progress.started_ms.load(Ordering::Relaxed);
            let now = epoch.elapsed().as_millis() as u64;
            if now.saturating_sub(started) > limit.as_millis() as u64
                && !progress.done.load(Ordering::Relaxed)
            {
                let case = progress.case.load(Ordering::Relaxed);
                let c = target.make(&mut Rng::for_case(seed, case));
                eprintln!(
                    "FUZZ HANG {}: case {case} ran over {limit:?}; {}; {}",
                    T::NAME,
                    save_failure(T::NAME, seed, case, &c),
                    reproduce(T::NAME, seed, case)
                );
                std::process::exit(3);
            }
        }
    });
}

/// Runs `target`'s loop as the environment says and asserts every case passed.
pub fn run<T: Target + 'static>(target: T) {
    let name = T::NAME;
    let seed = env_u64("SIRIUS_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let only = env_u64("SIRIUS_FUZZ_CASE");
    let cases = env_u64("SIRIUS_FUZZ_CASES").unwrap_or_else(default_cases);
    let seconds = env_secs("SIRIUS_FUZZ_SECONDS");
    let limit = env_secs("SIRIUS_FUZZ_CASE_SECONDS").unwrap_or(Duration::from_secs(10));
    let range = match only {
        Some(i) => i..i + 1,
        None => 0..cases,
    };
    eprintln!("fuzz {name}: seed {seed:#x}, cases {range:?}");
    let dir = scratch_dir(name);
    let target = Arc::new(target);
    let epoch = Instant::now();
    let progress = Arc::new(Progress {
        case: AtomicU64::new(range.start),
        started_ms: AtomicU64::new(0),
        done: AtomicBool::new(false),
    });
    watchdog(
        Arc::clone(&target),
        seed,
        limit,
        Arc::clone(&progress),
        epoch,
    );
    let (mut accepted, mut refused, mut slowest) = (0u64, 0u64, (Duration::ZERO, 0));
    for case in range.clone() {
        if seconds.is_some_and(|s| epoch.elapsed() > s) {
            break;
        }
        progress.case.store(case, Ordering::Relaxed);
        progress
            .started_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let t0 = Instant::now();
        let c = target.make(&mut Rng::for_case(seed, case));
        let outcome = alloc::during_case(name, seed, case, || {
            catch_unwind(AssertUnwindSafe(|| {
                c.write(&dir)
                    .map_err(|e| format!("writing the case: {e}"))?;
                target.check(&c, &dir)
            }))
        });
        let failure = match outcome {
            Ok(Ok(Verdict::Accepted)) => {
                accepted += 1;
                None
            }
            Ok(Ok(Verdict::Refused)) => {
                refused += 1;
                None
            }
            Ok(Err(broken)) => Some(broken),
            Err(panic) => Some(format!("PANIC: {}", panic_text(&*panic))),
        };
        if let Some(why) = failure {
            progress.done.store(true, Ordering::Relaxed);
            let _ = std::fs::remove_dir_all(&dir);
            panic!(
                "fuzz {name}: case {case} failed: {why}; {}; {}",
                save_failure(name, seed, case, &c),
                reproduce(name, seed, case)
            );
        }
        slowest = slowest.max((t0.elapsed(), case));
    }
    progress.done.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&dir);
    let run = accepted + refused;
    let secs = epoch.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name}: {run} cases in {secs:.1} s ({:.0}/s), {accepted} accepted, {refused} \
         refused, 0 panics, 0 hangs, 0 broken properties; slowest case {} ({:.1} ms)",
        run as f64 / secs.max(1e-9),
        slowest.1,
        slowest.0.as_secs_f64() * 1e3
    );
    if only.is_none() && run >= 1000 {
        let share = accepted as f64 / run as f64;
        assert!(
            share >= target.min_accepted(),
            "fuzz {name}: only {accepted} of {run} cases were accepted: the mutations rarely \
             reach past the first check"
        );
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
