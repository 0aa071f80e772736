//! CPU kernel micro-benchmarks: `cargo bench --bench cpu_kernels [-- FILTER]`.
//!
//! Matvec cases come in two flavours: `hot` reuses one matrix (it sits in L2/L3, measuring
//! compute efficiency) and `cold` rotates through copies totalling well over the L3 size,
//! which is what decoding a real model looks like (every weight comes from DRAM once per
//! token). `decode_token_smollm2` runs all matvecs of one SmolLM2-135M token (30 layers +
//! tied LM head, 269 MB of bf16) and is the number to compare against llama.cpp.
//! `ffn_smollm2_*` compare one decode token's FFN, dense against the contextual-sparsity
//! paths (Griffin's kept neurons, CATS's per-token kept bundles), each cycling through at
//! least 30 layers of distinct weights and at least `COLD_BYTES` of reads, as decode does.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use sirius_offload::backend::cpu::{self, Activation, Bundles, Isa, ThreadPool};
use sirius_offload::backend::{BundleLayout, NeuronLists, NeuronRule};
use sirius_offload::tensor::DType;

fn main() {
    eprintln!("selected ISA tier: {}", cpu::isa_name());
    divan::main();
}

/// Bytes of weights a `cold` case cycles through (4x the 32 MiB L3 of the dev machine).
const COLD_BYTES: usize = 128 << 20;

fn pool(n_threads: usize) -> &'static ThreadPool {
    static POOLS: OnceLock<[ThreadPool; 2]> = OnceLock::new();
    &POOLS.get_or_init(|| [ThreadPool::new(1), ThreadPool::new(2)])[n_threads - 1]
}

/// Deterministic pseudo-random bf16 bytes (values in about [-1, 1], no NaN/inf).
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

/// (bytes per copy, copies) -> weight buffer.
type WeightCache = Mutex<HashMap<(usize, usize), Arc<Vec<u8>>>>;

/// Shared copies of weight sets, built once per process.
fn weights(bytes: usize, copies: usize) -> Arc<Vec<u8>> {
    static CACHE: OnceLock<WeightCache> = OnceLock::new();
    let mut map = CACHE.get_or_init(Default::default).lock().unwrap();
    map.entry((bytes, copies))
        .or_insert_with(|| Arc::new(random_bf16(bytes * copies / 2, bytes as u64)))
        .clone()
}

#[derive(Clone, Copy)]
struct MatvecCase {
    isa: Isa,
    threads: usize,
    rows: usize,
    cols: usize,
    cold: bool,
}

impl fmt::Display for MatvecCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let isa = match self.isa {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        };
        let heat = if self.cold { "cold" } else { "hot" };
        write!(
            f,
            "{}x{} {heat} {isa} t{}",
            self.rows, self.cols, self.threads
        )
    }
}

fn matvec_cases() -> Vec<MatvecCase> {
    let shapes = [
        (1536, 576),
        (576, 1536),
        (576, 576),
        (192, 576),
        (49152, 576),
    ];
    let mut out = Vec::new();
    for (rows, cols) in shapes {
        for cold in [false, true] {
            if !cold && rows * cols * 2 > 32 << 20 {
                continue; // bigger than L3: never hot
            }
            for isa in Isa::available() {
                for threads in [1, 2] {
                    out.push(MatvecCase {
                        isa,
                        threads,
                        rows,
                        cols,
                        cold,
                    });
                }
            }
        }
    }
    out
}

/// Decode matvec (n_tokens = 1) on bf16 weights; throughput is weight bytes streamed.
#[divan::bench(args = matvec_cases(), max_time = 1)]
fn matvec_bf16(bencher: Bencher, case: MatvecCase) {
    let MatvecCase {
        isa,
        threads,
        rows,
        cols,
        cold,
    } = case;
    let bytes = rows * cols * 2;
    let copies = if cold {
        COLD_BYTES.div_ceil(bytes).max(2)
    } else {
        1
    };
    let w = weights(bytes, copies);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut y = vec![0f32; rows];
    let pool = pool(threads);
    let mut i = 0;
    bencher.counter(BytesCount::new(bytes)).bench_local(|| {
        i = (i + 1) % copies;
        let wi = &w[i * bytes..(i + 1) * bytes];
        cpu::matmul_with_isa(isa, pool, wi, DType::BF16, rows, cols, &x, 1, &mut y);
        divan::black_box(&y);
    });
}

/// One SmolLM2-135M decode token's matvecs: 30 x (q, k, v, o, gate, up, down) + LM head.
#[divan::bench(args = [1, 2], max_time = 3)]
fn decode_token_smollm2(bencher: Bencher, threads: usize) {
    let (d, kv, ff, vocab) = (576, 192, 1536, 49152);
    let layer: [(usize, usize); 7] = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)];
    let mut mats: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for l in 0..30 {
        for (j, &(r, c)) in layer.iter().enumerate() {
            mats.push((r, c, random_bf16(r * c, (l * 7 + j) as u64 + 1)));
        }
    }
    mats.push((vocab, d, random_bf16(vocab * d, 999)));
    let total: usize = mats.iter().map(|m| m.2.len()).sum();
    let x: Vec<f32> = (0..ff).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut y = vec![0f32; vocab];
    let pool = pool(threads);
    bencher.counter(BytesCount::new(total)).bench_local(|| {
        for (r, c, w) in &mats {
            cpu::matmul(pool, w, DType::BF16, *r, *c, &x[..*c], 1, &mut y[..*r]);
        }
        divan::black_box(&y);
    });
}

#[derive(Clone, Copy)]
struct IsaThreads(Isa, usize);

impl fmt::Display for IsaThreads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} t{}", self.0.name(), self.1)
    }
}

fn isa_threads() -> Vec<IsaThreads> {
    Isa::available()
        .into_iter()
        .flat_map(|i| [IsaThreads(i, 1), IsaThreads(i, 2)])
        .collect()
}

/// Prefill: 128 tokens through a [1536, 576] bf16 matrix; throughput in FLOPs (items).
#[divan::bench(args = isa_threads(), max_time = 2)]
fn prefill_bf16_1536x576_n128(bencher: Bencher, case: IsaThreads) {
    let (rows, cols, n) = (1536, 576, 128);
    let w = random_bf16(rows * cols, 42);
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.001).sin()).collect();
    let mut y = vec![0f32; n * rows];
    let pool = pool(case.1);
    bencher
        .counter(ItemsCount::new(2 * rows * cols * n))
        .bench_local(|| {
            cpu::matmul_with_isa(case.0, pool, &w, DType::BF16, rows, cols, &x, n, &mut y);
            divan::black_box(&y);
        });
}

/// `ThreadPool::run` with empty tasks: the fixed cost every parallel kernel pays.
#[divan::bench(args = [1, 2], max_time = 1)]
fn pool_run_overhead(bencher: Bencher, threads: usize) {
    let pool = pool(threads);
    let f = |i: usize| {
        divan::black_box(i);
    };
    bencher.bench_local(|| pool.run(8, &f));
}

/// Decode attention for SmolLM2 shapes (9 heads, 3 kv heads, head_dim 64) at 512 positions.
#[divan::bench(args = isa_threads(), max_time = 1)]
fn attention_decode_seq512(bencher: Bencher, case: IsaThreads) {
    let (nh, nkv, hd, seq) = (9, 3, 64, 512);
    let q: Vec<f32> = (0..nh * hd).map(|i| (i as f32 * 0.37).sin()).collect();
    let kc: Vec<f32> = (0..seq * nkv * hd)
        .map(|i| (i as f32 * 0.11).cos())
        .collect();
    let vc: Vec<f32> = (0..seq * nkv * hd)
        .map(|i| (i as f32 * 0.07).sin())
        .collect();
    let mut out = vec![0f32; nh * hd];
    let pool = pool(case.1);
    bencher.bench_local(|| {
        cpu::attention_with_isa(
            case.0,
            pool,
            &q,
            cpu::KvSlice::F32(&kc),
            cpu::KvSlice::F32(&vc),
            nh,
            nkv,
            hd,
            seq - 1,
            1,
            None,
            &mut out,
        );
        divan::black_box(&out);
    });
}

/// SmolLM2's attention shape and the context of an 8-shot GSM prompt, over 30 layers' caches
/// (74 MB, more than L3), as a real decode step meets them.
const COLD_ATTN: (usize, usize, usize, usize, usize) = (9, 3, 64, 1600, 30);

/// Times one decode token's attention per call, cycling through the layers' `(keys, values)`
/// so they come from DRAM. Throughput is cache bytes read per layer.
fn bench_cold_attention(bencher: Bencher, threads: usize, caches: &[(cpu::KvSlice, cpu::KvSlice)]) {
    let (nh, nkv, hd, seq, _) = COLD_ATTN;
    let q: Vec<f32> = (0..nh * hd).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0f32; nh * hd];
    let pool = pool(threads);
    let mut layer = 0;
    let elem = if matches!(caches[0].0, cpu::KvSlice::F16(_)) {
        2
    } else {
        4
    };
    bencher
        .counter(BytesCount::new(2 * seq * nkv * hd * elem))
        .bench_local(|| {
            let (kc, vc) = caches[layer];
            layer = (layer + 1) % caches.len();
            cpu::attention_with_isa(
                cpu::Isa::best(),
                pool,
                &q,
                kc,
                vc,
                nh,
                nkv,
                hd,
                seq - 1,
                1,
                None,
                &mut out,
            );
            divan::black_box(&out);
        });
}

/// Decode attention at 1,600 positions, cold (see [`COLD_ATTN`]), caches in plain `Vec`s as
/// the KV cache keeps them (4 KiB pages).
#[divan::bench(args = [1, 2], max_time = 2)]
fn attention_decode_cold_ctx1600(bencher: Bencher, threads: usize) {
    let (_, nkv, hd, seq, layers) = COLD_ATTN;
    let fill = |l: usize, f: f32| -> Vec<f32> {
        (0..seq * nkv * hd)
            .map(|i| ((i + l) as f32 * f).cos())
            .collect()
    };
    let owned: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
        .map(|l| (fill(l, 0.11), fill(l, 0.07)))
        .collect();
    let caches: Vec<_> = owned
        .iter()
        .map(|(k, v)| (cpu::KvSlice::F32(k), cpu::KvSlice::F32(v)))
        .collect();
    bench_cold_attention(bencher, threads, &caches);
}

/// The same over an f16 cache (`--kv-dtype f16`, the default): half the bytes to read, each
/// row widened once per KV head.
#[divan::bench(args = [1, 2], max_time = 2)]
fn attention_decode_cold_ctx1600_f16(bencher: Bencher, threads: usize) {
    let (_, nkv, hd, seq, layers) = COLD_ATTN;
    let fill = |l: usize, f: f32| -> Vec<u16> {
        (0..seq * nkv * hd)
            .map(|i| half::f16::from_f32(((i + l) as f32 * f).cos()).to_bits())
            .collect()
    };
    let owned: Vec<(Vec<u16>, Vec<u16>)> = (0..layers)
        .map(|l| (fill(l, 0.11), fill(l, 0.07)))
        .collect();
    let caches: Vec<_> = owned
        .iter()
        .map(|(k, v)| (cpu::KvSlice::F16(k), cpu::KvSlice::F16(v)))
        .collect();
    bench_cold_attention(bencher, threads, &caches);
}

/// The same with the caches in one anonymous mapping advised to use transparent huge pages:
/// how much of the cold cost is TLB misses and hardware prefetchers stopping at 4 KiB page
/// boundaries.
#[divan::bench(args = [1, 2], max_time = 2)]
fn attention_decode_cold_ctx1600_huge(bencher: Bencher, threads: usize) {
    let (_, nkv, hd, seq, layers) = COLD_ATTN;
    let per = seq * nkv * hd;
    let mut map = memmap2::MmapOptions::new()
        .len(2 * layers * per * 4)
        .map_anon()
        .expect("anonymous memory for the caches");
    map.advise(memmap2::Advice::HugePage)
        .expect("madvise(MADV_HUGEPAGE)");
    // SAFETY: the mapping is page-aligned, 2 * layers * per floats long, and outlives `all`.
    let all: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut f32, 2 * layers * per) };
    for (i, v) in all.iter_mut().enumerate() {
        *v = (i as f32 * 0.11).cos();
    }
    let caches: Vec<_> = all
        .chunks_exact(2 * per)
        .map(|kv| kv.split_at(per))
        .map(|(k, v)| (cpu::KvSlice::F32(k), cpu::KvSlice::F32(v)))
        .collect();
    bench_cold_attention(bencher, threads, &caches);
}

/// Short multi-token batches (Sirius verification windows) through cold [1536, 576] bf16
/// weights; throughput is weight bytes, to compare with the n = 1 decode matvec.
#[divan::bench(args = [1, 2, 4, 8, 16, 32, 64], max_time = 1)]
fn matmul_bf16_1536x576_cold_tokens(bencher: Bencher, n: usize) {
    let (rows, cols) = (1536, 576);
    let bytes = rows * cols * 2;
    let copies = COLD_BYTES.div_ceil(bytes);
    let w = weights(bytes, copies);
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut y = vec![0f32; n * rows];
    let pool = pool(2);
    let mut i = 0;
    bencher.counter(BytesCount::new(bytes)).bench_local(|| {
        i = (i + 1) % copies;
        cpu::matmul(
            pool,
            &w[i * bytes..(i + 1) * bytes],
            DType::BF16,
            rows,
            cols,
            &x,
            n,
            &mut y,
        );
        divan::black_box(&y);
    });
}

/// SmolLM2-135M's FFN (hidden 576, d_ff 1536, bf16) and its layer count: every `ffn_smollm2_*`
/// iteration runs the next layer's distinct weights, as decode does. They run at least 1 s
/// (`min_time`): divan's default 100 one-call samples of ~200 us end after 20 ms, a pass or
/// two over the layers, too few to average out a shared machine's noise.
const FFN_H: usize = 576;
const FFN_F: usize = 1536;
const FFN_LAYERS: usize = 30;
/// Neurons a sparse FFN keeps: Griffin keep = 0.5, CATS at 50% density.
const FFN_KEPT: usize = FFN_F / 2;
/// Bytes of one neuron bundle (gate row, up row, down column).
const FFN_BUNDLE: usize = 3 * FFN_H * 2;

/// Distinct layers a case cycles through: 30, or more until the bytes it reads per cycle reach
/// `COLD_BYTES`. With only 30 layers the half-size Griffin weights (80 MB) partly stay in the
/// L3 and beat the DRAM bandwidth, which would flatter the sparse paths against dense (159 MB).
fn ffn_layers(bytes_read_per_layer: usize) -> usize {
    FFN_LAYERS.max(COLD_BYTES.div_ceil(bytes_read_per_layer))
}

/// Three decode matmuls (gate, up, down) and silu_mul, as the model's dense FFN runs them,
/// over `f` neurons in checkpoint layout; `w` holds `layers` x (gate | up | down).
fn bench_ffn_matmuls(bencher: Bencher, threads: usize, f: usize) {
    let h = FFN_H;
    let mat = f * h * 2;
    let layers = ffn_layers(3 * mat);
    let w = weights(3 * mat, layers);
    let x: Vec<f32> = (0..h).map(|i| (i as f32 * 0.01).sin()).collect();
    let (mut g, mut u, mut y) = (vec![0f32; f], vec![0f32; f], vec![0f32; h]);
    let pool = pool(threads);
    let mut l = 0;
    bencher.counter(BytesCount::new(3 * mat)).bench_local(|| {
        l = (l + 1) % layers;
        let lw = &w[l * 3 * mat..(l + 1) * 3 * mat];
        cpu::matmul(pool, &lw[..mat], DType::BF16, f, h, &x, 1, &mut g);
        cpu::matmul(pool, &lw[mat..2 * mat], DType::BF16, f, h, &x, 1, &mut u);
        cpu::silu_mul(&mut g, &u);
        cpu::matmul(pool, &lw[2 * mat..], DType::BF16, h, f, &g, 1, &mut y);
        divan::black_box(&y);
    });
}

/// Dense FFN of one decode token: 3 x 576 x 1536 bf16 = 5.3 MB per layer.
#[divan::bench(args = [1, 2], min_time = 1, max_time = 2)]
fn ffn_smollm2_dense(bencher: Bencher, threads: usize) {
    bench_ffn_matmuls(bencher, threads, FFN_F);
}

/// Griffin keep 0.5 in bundle form: `bundle_ffn` All over a compact 768-bundle matrix (half
/// the dense bytes). Kept next to [`ffn_smollm2_griffin_matmuls`] because `All` is also the
/// bundle kernel's dense mode.
#[divan::bench(args = [1, 2], min_time = 1, max_time = 2)]
fn ffn_smollm2_griffin(bencher: Bencher, threads: usize) {
    let bytes = FFN_KEPT * FFN_BUNDLE;
    let layers = ffn_layers(bytes);
    let w = weights(bytes, layers);
    let x: Vec<f32> = (0..FFN_H).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut y = vec![0f32; FFN_H];
    let pool = pool(threads);
    let mut l = 0;
    bencher.counter(BytesCount::new(bytes)).bench_local(|| {
        l = (l + 1) % layers;
        let b = Bundles {
            bytes: &w[l * bytes..(l + 1) * bytes],
            dtype: DType::BF16,
            neurons: FFN_KEPT,
            hidden: FFN_H,
            layout: BundleLayout::GateUpDown,
        };
        cpu::bundle_ffn(
            pool,
            b,
            &x,
            1,
            Activation::All {
                gate_bias: None,
                up_bias: None,
            },
            &mut y,
        );
        divan::black_box(&y);
    });
}

/// Griffin keep 0.5 as the model decodes it (selection gathered by `gather_ffn` into
/// checkpoint-layout gate/up/down): the dense matmuls over 768 neurons, same bytes as
/// [`ffn_smollm2_griffin`].
#[divan::bench(args = [1, 2], min_time = 1, max_time = 2)]
fn ffn_smollm2_griffin_matmuls(bencher: Bencher, threads: usize) {
    bench_ffn_matmuls(bencher, threads, FFN_KEPT);
}

/// CATS at 50%: the dense gate matvec and SiLU (CATS needs every neuron's gate), then
/// `bundle_ffn` PerToken reading up + down of 768 random kept neurons of the full 1536-bundle
/// matrix. Bytes read: gate (1.8 MB) + half the up/down (1.8 MB) = 2/3 of dense.
#[divan::bench(args = [1, 2], min_time = 1, max_time = 2)]
fn ffn_smollm2_cats(bencher: Bencher, threads: usize) {
    let (h, f) = (FFN_H, FFN_F);
    let gate_bytes = f * h * 2;
    let bundle_bytes = f * FFN_BUNDLE;
    let layers = ffn_layers(2 * gate_bytes);
    let gates = weights(gate_bytes, layers);
    let bundles = weights(bundle_bytes, layers);
    // A fixed random half of the neurons per layer (decode sees a new set every layer).
    let kept: Vec<NeuronLists> = (0..layers)
        .map(|l| {
            let mut s = (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut ids: Vec<u32> = (0..f as u32).collect();
            for i in (1..f).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ids.swap(i, (s % (i as u64 + 1)) as usize);
            }
            ids.truncate(FFN_KEPT);
            ids.sort_unstable();
            let mut lists = NeuronLists::default();
            lists.push_token(ids);
            lists
        })
        .collect();
    let x: Vec<f32> = (0..h).map(|i| (i as f32 * 0.01).sin()).collect();
    let (mut g, mut y) = (vec![0f32; f], vec![0f32; h]);
    let pool = pool(threads);
    let mut l = 0;
    bencher
        .counter(BytesCount::new(2 * gate_bytes))
        .bench_local(|| {
            l = (l + 1) % layers;
            cpu::matmul(
                pool,
                &gates[l * gate_bytes..(l + 1) * gate_bytes],
                DType::BF16,
                f,
                h,
                &x,
                1,
                &mut g,
            );
            cpu::silu(&mut g);
            let b = Bundles {
                bytes: &bundles[l * bundle_bytes..(l + 1) * bundle_bytes],
                dtype: DType::BF16,
                neurons: f,
                hidden: h,
                layout: BundleLayout::GateUpDown,
            };
            cpu::bundle_ffn(
                pool,
                b,
                &x,
                1,
                Activation::PerToken {
                    coeff: &g,
                    kept: &kept[l],
                    up_bias: None,
                },
                &mut y,
            );
            divan::black_box(&y);
        });
}

/// CATS's per-token selection (top 768 of 1536 by |act|), which the model runs between the
/// gate matvec and `bundle_ffn` and [`ffn_smollm2_cats`] leaves out.
#[divan::bench(max_time = 1)]
fn select_neurons_top768_of_1536(bencher: Bencher) {
    let act: Vec<f32> = (0..FFN_F)
        .map(|i| (i as f32 * 0.37).sin() * (i as f32 * 0.011).cos())
        .collect();
    let mut work = act.clone();
    let mut kept = NeuronLists::default();
    bencher.bench_local(|| {
        work.copy_from_slice(&act);
        cpu::select_neurons(&mut work, FFN_F, NeuronRule::TopK(FFN_KEPT), &mut kept);
        divan::black_box(&kept);
    });
}
