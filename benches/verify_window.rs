//! Cost of a Sirius verification window: one full-model forward over n tokens, relative to a
//! single-token decode step, in the same process, interleaved, medians.
//!
//! ```sh
//! cargo bench --bench verify_window [-- --threads 2 --ctx 0,1000 --n 1,2,3,4,8,16 --reps 15]
//! cargo bench --bench verify_window -- --what matmul     # the weight matmuls alone
//! cargo bench --bench verify_window -- --clock cpu       # CPU time instead of wall time
//! cargo bench --bench verify_window -- --kv f16,f32      # KV cache element types (f16 default)
//! cargo bench --bench verify_window -- --model M --ctx 0 --n 4   # GFLOP/s for --compute-gflops
//! ```
//!
//! * `forward`: `Llama::forward` of SmolLM2-135M (fetched preset, or `--model DIR`) over n
//!   tokens with `Logits::All` (what verification asks for), after a context of `ctx`
//!   positions prefilled once; before each timed call the cache is truncated back to `ctx`.
//! * `matmul`: every weight matmul of one SmolLM2 forward (30 layers of q, k, v, o, gate, up,
//!   down, then the 49152 x 576 tied head over all n rows) on random bf16 weights of the same
//!   shapes, 269 MB in all, so every weight comes from DRAM as in a real forward. The
//!   difference to `forward` is attention, norms, RoPE and the rest. `--what hot` runs the
//!   layer matmuls on one layer's weights (in L3), for the kernels' compute efficiency.
//!
//! Each rep runs every n once, in a rotating order (so drifts in machine load hit every n
//! alike); rep 0 is a warm-up. The table shows the median time per n and its ratio to the
//! median of n = 1 (ratios of medians; per-rep ratios are noisier on a shared machine).

use std::time::Instant;

use sirius_offload::backend::cpu::{self, ThreadPool};
use sirius_offload::backend::CpuBackend;
use sirius_offload::model::Pass;
use sirius_offload::model::{Llama, Logits, Scratch};
use sirius_offload::sparsity::Dense;
use sirius_offload::tensor::{DType, KvDType};

struct Opts {
    threads: usize,
    ctx: Vec<usize>,
    n: Vec<usize>,
    reps: usize,
    what: Vec<String>,
    model: String,
    cpu_clock: bool,
    kv: Vec<KvDType>,
}

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("a comma-separated list of integers")
        })
        .collect()
}

fn opts() -> Opts {
    let mut o = Opts {
        threads: 2,
        ctx: vec![0, 1000],
        n: vec![1, 2, 3, 4, 8, 16],
        reps: 15,
        what: vec!["forward".into()],
        model: "smollm2-135m".into(),
        cpu_clock: false,
        kv: vec![KvDType::default()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => o.threads = val().parse().expect("--threads N"),
            "--ctx" => o.ctx = parse_list(&val()),
            "--n" => o.n = parse_list(&val()),
            "--reps" => o.reps = val().parse().expect("--reps N"),
            "--what" => o.what = val().split(',').map(String::from).collect(),
            "--model" => o.model = val(),
            "--clock" => o.cpu_clock = val() == "cpu",
            "--kv" => {
                o.kv = val()
                    .split(',')
                    .map(|v| v.parse().expect("--kv f16,f32"))
                    .collect()
            }
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    o
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    }
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of this process's threads in ns, divided by `threads` (`--clock cpu`, Linux): on
/// a machine shared with other jobs this leaves out the time our threads waited for a core,
/// though not what they lose to others' memory traffic. Idle pool workers spin, so with
/// several threads it approximates the wall time on an idle machine.
fn cpu_ns(threads: usize) -> u64 {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: plain libc call writing into a local struct of the C layout.
    if unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.sec as u64 * 1_000_000_000 + ts.nsec as u64) / threads.max(1) as u64
}

/// Runs `f(n)` for every n of `ns`, `reps + 1` times in rotating order (the first round
/// untimed) and prints one table row per n: median ms, ratio to n = 1, ms per token, and
/// with `flops_per_token` the arithmetic rate (what `--compute-gflops` of `run` and `plan`
/// asks for).
/// `cpu_threads`: measure with [`cpu_ns`] over that many threads instead of the wall clock.
fn interleaved(
    label: &str,
    ns: &[usize],
    reps: usize,
    cpu_threads: Option<usize>,
    flops_per_token: Option<f64>,
    mut f: impl FnMut(usize),
) {
    let mut samples = vec![Vec::new(); ns.len()];
    for rep in 0..=reps {
        for i in 0..ns.len() {
            let j = (i + rep) % ns.len();
            let (t, c0) = (Instant::now(), cpu_threads.map(cpu_ns));
            f(ns[j]);
            let ms = match (cpu_threads, c0) {
                (Some(th), Some(c0)) => (cpu_ns(th) - c0) as f64 / 1e6,
                _ => t.elapsed().as_secs_f64() * 1e3,
            };
            if rep > 0 {
                samples[j].push(ms);
            }
        }
    }
    let meds: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    // Without n = 1 in the list (e.g. for profiling one n), ratios are to the first n.
    let one = meds[ns.iter().position(|&n| n == 1).unwrap_or(0)];
    for (&n, &m) in ns.iter().zip(&meds) {
        let gflops =
            flops_per_token.map_or("-".into(), |f| format!("{:.1}", f * n as f64 / m / 1e6));
        println!(
            "| {label} | {n} | {m:.2} | {:.2} | {:.2} | {gflops} |",
            m / one,
            m / n as f64
        );
    }
}

fn clock(o: &Opts) -> Option<usize> {
    o.cpu_clock.then_some(o.threads)
}

fn header() {
    println!("| case | n | median ms | x n=1 | ms / token | GFLOP/s |");
    println!("|---|---|---|---|---|---|");
}

fn forward(o: &Opts) {
    let dir = match sirius_offload::config::resolve_model_dir(&o.model) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED forward: {e}");
            return;
        }
    };
    let mut model = Llama::load(&dir, CpuBackend::new(o.threads)).expect("model loads");
    let vocab = model.config.vocab_size as u32;
    let ids = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(salt).wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect()
    };
    let max_n = *o.n.iter().max().expect("some n");
    for (&ctx, &kv) in o.ctx.iter().flat_map(|c| o.kv.iter().map(move |k| (c, k))) {
        model.kv_dtype = kv;
        let mut cache = model.new_cache(ctx + max_n).expect("cache");
        if ctx > 0 {
            let mut s = Scratch::with_logit_rows(&model, ctx, 1).expect("scratch");
            model
                .forward(
                    Pass::new(&ids(ctx, 0), Logits::None, &mut Dense),
                    &mut cache,
                    &mut s,
                )
                .expect("prefill");
        }
        let mut scratch = Scratch::new(&model, max_n).expect("scratch");
        let label = format!("forward ctx {ctx} kv {kv} t{}", o.threads);
        let flops = matmul_flops_per_token(&model.config);
        interleaved(&label, &o.n, o.reps, clock(o), Some(flops), |n| {
            cache.truncate(ctx);
            let logits = model
                .forward(
                    Pass::new(&ids(n, 7), Logits::All, &mut Dense),
                    &mut cache,
                    &mut scratch,
                )
                .expect("forward");
            std::hint::black_box(logits);
        });
    }
}

/// FLOP of one token's weight products (two per weight: every layer's q, k, v, o, gate, up and
/// down, and the head), as the planner counts them.
fn matmul_flops_per_token(c: &sirius_offload::config::ModelConfig) -> f64 {
    let h = c.hidden_size;
    let layer = 2 * h * c.q_dim() + 2 * h * c.kv_dim() + 3 * h * c.intermediate_size;
    2.0 * (c.num_layers * layer + c.vocab_size * h) as f64
}

/// Deterministic pseudo-random bf16 bytes in about [-1, 1].
fn random_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
    out
}

/// `hot`: one layer's weights (3.5 MB, in L3) for all 30 layers, so the kernels' compute
/// efficiency shows without DRAM in the way.
fn matmuls(o: &Opts, hot: bool) {
    // SmolLM2-135M: hidden 576, 9 heads x 64, 3 kv heads, ffn 1536, 30 layers, vocab 49152.
    let (h, kv, f, vocab, layers) = (576, 192, 1536, 49152, 30);
    let shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)];
    let distinct = if hot { 1 } else { layers };
    let mats: Vec<Vec<(usize, usize, Vec<u8>)>> = (0..distinct)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| (r, c, random_bf16(r * c, (l * 7 + i) as u64 + 1)))
                .collect()
        })
        .collect();
    let head = random_bf16(vocab * h, 999);
    let max_n = *o.n.iter().max().expect("some n");
    let x: Vec<f32> = (0..max_n * f)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let mut y = vec![0f32; max_n * vocab];
    let pool = ThreadPool::new(o.threads);
    let heat = if hot { "hot" } else { "cold" };
    let label = format!("matmuls {heat} t{} {}", o.threads, cpu::isa_name());
    interleaved(
        &format!("{label} layers"),
        &o.n,
        o.reps,
        clock(o),
        None,
        |n| {
            for l in 0..layers {
                for (r, c, w) in &mats[l % distinct] {
                    cpu::matmul(
                        &pool,
                        w,
                        DType::BF16,
                        *r,
                        *c,
                        &x[..n * c],
                        n,
                        &mut y[..n * r],
                    );
                }
            }
        },
    );
    if hot {
        return;
    }
    interleaved(
        &format!("{label} head"),
        &o.n,
        o.reps,
        clock(o),
        None,
        |n| {
            cpu::matmul(
                &pool,
                &head,
                DType::BF16,
                vocab,
                h,
                &x[..n * h],
                n,
                &mut y[..n * vocab],
            );
        },
    );
}

fn main() {
    let o = opts();
    eprintln!("ISA tier: {}", cpu::isa_name());
    header();
    for w in &o.what {
        match w.as_str() {
            "forward" => forward(&o),
            "matmul" => matmuls(&o, false),
            "hot" => matmuls(&o, true),
            other => panic!("unknown --what {other} (forward, matmul, hot)"),
        }
    }
}
