//! Sustained memory bandwidth of this machine: the ceiling for memory-bound decode.
//!
//! `cargo bench --bench membw [-- --size-mib 1024 --reps 21 --threads 1,2]`
//!
//! * read: sum a buffer of `u64` far larger than L3 (default 1 GiB vs 32 MiB) with
//!   wrapping adds into 32 independent lanes. The loop is plain Rust that LLVM
//!   vectorises; on x86-64 it is compiled a second time inside `#[target_feature]`
//!   functions (AVX2, AVX-512F) picked at run time, so the binary stays portable
//!   (no `target-cpu=native`) and the best width this CPU has is measured. The SSE2
//!   baseline is shown too, since it is what a portable build gets by default.
//! * copy: `copy_from_slice` (libc memcpy) from one half-size buffer to another;
//!   bytes read + bytes written are counted (the STREAM convention).
//!
//! With T threads the buffer is split into T contiguous parts, one per thread; a
//! barrier starts them together and a rep ends when the slowest is done. Each kernel
//! runs one untimed warm-up rep, then `--reps` timed ones; the table shows the median
//! and the min-max spread in GB/s (1 GB = 1e9 bytes).
//! Buffers are filled with non-zero data first, so every page is really backed (reads
//! of never-touched pages would hit the kernel's shared zero page and look too fast).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Parts handed to threads start at multiples of this many words (256 bytes).
const LANES: usize = 32;

/// A plain wrapping-add reduction: integer adds are associative, so LLVM's loop
/// vectoriser turns it into several interleaved vector accumulators of whatever width
/// the enclosing function is compiled for.
#[inline(always)]
fn sum_lanes(xs: &[u64]) -> u64 {
    let mut s = 0u64;
    for &x in xs {
        s = s.wrapping_add(x);
    }
    s
}

#[inline(never)]
fn sum_baseline(xs: &[u64]) -> u64 {
    sum_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline(never)]
fn sum_avx2(xs: &[u64]) -> u64 {
    sum_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
fn sum_avx512(xs: &[u64]) -> u64 {
    sum_lanes(xs)
}

#[derive(Clone, Copy, PartialEq)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn name(self) -> &'static str {
        match self {
            Isa::Baseline if cfg!(target_arch = "x86_64") => "sse2",
            Isa::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Best vector width this CPU supports, detected at run time.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    fn sum(self, xs: &[u64]) -> u64 {
        match self {
            Isa::Baseline => sum_baseline(xs),
            // SAFETY: these variants are only constructed by `best()` after the
            // matching CPU feature was detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { sum_avx2(xs) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { sum_avx512(xs) },
        }
    }
}

struct Args {
    size_mib: usize,
    reps: usize,
    threads: Vec<usize>,
}

fn parse_args() -> Args {
    let mut a = Args {
        size_mib: 1024,
        reps: 21,
        threads: vec![1, 2],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |what: &str| -> String {
            it.next()
                .unwrap_or_else(|| panic!("membw: {what} needs a value"))
        };
        match arg.as_str() {
            "--size-mib" => a.size_mib = val("--size-mib").parse().expect("--size-mib: integer"),
            "--reps" => a.reps = val("--reps").parse().expect("--reps: integer"),
            "--threads" => {
                a.threads = val("--threads")
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse()
                            .expect("--threads: comma-separated integers")
                    })
                    .collect()
            }
            "-h" | "--help" => {
                println!("membw [--size-mib 1024] [--reps 21] [--threads 1,2]");
                std::process::exit(0);
            }
            // cargo bench passes `--bench` (and filters) to harness = false binaries
            _ => {}
        }
    }
    assert!(
        a.size_mib >= 1 && a.reps >= 1,
        "membw: --size-mib and --reps must be >= 1"
    );
    assert!(
        a.threads.iter().all(|&t| t >= 1),
        "membw: thread counts must be >= 1"
    );
    a
}

/// Splits `len` into `parts` contiguous ranges whose starts are multiples of `LANES`
/// (so each part starts on a 256-byte-aligned offset of an aligned buffer).
fn split(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let per = (len / parts) / LANES * LANES;
    (0..parts)
        .map(|i| {
            let start = i * per;
            let end = if i + 1 == parts { len } else { start + per };
            start..end
        })
        .collect()
}

/// Runs `work(thread_index)` on `threads` threads, `reps + 1` times in lock step
/// (the first round is an untimed warm-up). Returns the wall time of each timed
/// round, measured by thread 0 from the start barrier to the end barrier.
fn run_reps<F>(threads: usize, reps: usize, work: F) -> Vec<Duration>
where
    F: Fn(usize) + Sync,
{
    let start = Barrier::new(threads);
    let end = Barrier::new(threads);
    let mut times = Vec::with_capacity(reps);
    std::thread::scope(|s| {
        let (start, end, work) = (&start, &end, &work);
        for t in 1..threads {
            s.spawn(move || {
                for _ in 0..=reps {
                    start.wait();
                    work(t);
                    end.wait();
                }
            });
        }
        for r in 0..=reps {
            start.wait();
            let t0 = Instant::now();
            work(0);
            end.wait();
            if r > 0 {
                times.push(t0.elapsed());
            }
        }
    });
    times
}

struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn gbps(bytes: usize, times: &[Duration]) -> Stat {
    let mut r: Vec<f64> = times
        .iter()
        .map(|d| bytes as f64 / d.as_secs_f64() / 1e9)
        .collect();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = r.len();
    let median = if n % 2 == 1 {
        r[n / 2]
    } else {
        0.5 * (r[n / 2 - 1] + r[n / 2])
    };
    Stat {
        median,
        min: r[0],
        max: r[n - 1],
    }
}

/// A buffer of non-zero, non-constant words (so no page stays the shared zero page).
fn filled(len: usize, seed: u64) -> Vec<u64> {
    (0..len as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed | 1)
        .collect()
}

fn bench_read(buf: &[u64], isa: Isa, threads: usize, reps: usize) -> (Stat, u64) {
    let parts = split(buf.len(), threads);
    let expect = isa.sum(buf); // also checks the kernels agree with each other
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..threads)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let times = run_reps(threads, reps, |t| {
        let s = isa.sum(black_box(&buf[parts[t].clone()]));
        sums[t].store(black_box(s), std::sync::atomic::Ordering::Relaxed);
    });
    let total = sums.iter().fold(0u64, |a, s| {
        a.wrapping_add(s.load(std::sync::atomic::Ordering::Relaxed))
    });
    assert_eq!(
        total,
        expect,
        "membw: {} sum over {threads} threads disagrees",
        isa.name()
    );
    (gbps(std::mem::size_of_val(buf), &times), total)
}

fn bench_copy(src: &[u64], dst: &mut [u64], threads: usize, reps: usize) -> Stat {
    let parts = split(src.len(), threads);
    // Hand each thread its own disjoint &mut part of dst.
    let mut dst_parts: Vec<std::sync::Mutex<&mut [u64]>> = Vec::with_capacity(threads);
    let mut rest = dst;
    for p in &parts {
        let (head, tail) = rest.split_at_mut(p.len());
        dst_parts.push(std::sync::Mutex::new(head));
        rest = tail;
    }
    let times = run_reps(threads, reps, |t| {
        let mut d = dst_parts[t].lock().unwrap();
        d.copy_from_slice(black_box(&src[parts[t].clone()]));
        black_box(&mut **d);
    });
    drop(dst_parts);
    gbps(2 * std::mem::size_of_val(src), &times)
}

fn main() {
    let args = parse_args();
    let words = args.size_mib * (1 << 20) / 8;
    let best = Isa::best();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    println!(
        "membw: read buffer {} MiB, copy {} MiB -> {} MiB; {} timed reps after 1 warm-up; \
         {cpus} CPUs available; GB = 1e9 bytes",
        args.size_mib,
        args.size_mib / 2,
        args.size_mib / 2,
        args.reps
    );
    let t_fill = Instant::now();
    let buf = filled(words, 0x5151);
    let fill_s = t_fill.elapsed().as_secs_f64();
    println!(
        "(first-touch fill of {} MiB took {:.2} s)",
        args.size_mib, fill_s
    );

    let mut isas = vec![best];
    if best != Isa::Baseline {
        isas.push(Isa::Baseline);
    }

    println!();
    println!("| kernel              | threads | median GB/s |   min |   max |");
    println!("|---------------------|--------:|------------:|------:|------:|");
    let mut checksum = 0u64;
    for &isa in &isas {
        for &t in &args.threads {
            let (st, sum) = bench_read(&buf, isa, t, args.reps);
            checksum ^= sum;
            println!(
                "| {:<19} | {t:>7} | {:>11.1} | {:>5.1} | {:>5.1} |",
                format!("read ({})", isa.name()),
                st.median,
                st.min,
                st.max
            );
        }
    }
    drop(buf);

    let half = words / 2;
    let src = filled(half, 0xA5A5);
    let mut dst = filled(half, 0x0F0F);
    for &t in &args.threads {
        let st = bench_copy(&src, &mut dst, t, args.reps);
        println!(
            "| {:<19} | {t:>7} | {:>11.1} | {:>5.1} | {:>5.1} |",
            "copy (memcpy, r+w)", st.median, st.min, st.max
        );
    }
    assert!(dst == src, "membw: copy produced wrong data");
    black_box(checksum);
}
