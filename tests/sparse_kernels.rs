//! The neuron-level CPU kernels of contextual sparsity (`bundle_ffn`, `select_neurons`,
//! `accumulate_neuron_scores`) against naive f64 implementations written here.
//!
//! The weights are drawn as f32, rounded to the dtype under test and encoded; the reference
//! uses the rounded values, so the comparison measures the kernels' f32 arithmetic only and a
//! tight tolerance (1e-4 of the output scale) holds for every dtype. The bundle matrix is
//! built from separate gate / up / down matrices with `interleave`, as at load, so a layout
//! mismatch between builder and kernels fails here too.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sirius_offload::backend::cpu::{
    self, accumulate_neuron_scores, bundle_ffn_with_isa, select_neurons, Activation, Bundles, Isa,
    ThreadPool,
};
use sirius_offload::backend::{BundleLayout, NeuronLists, NeuronRule};
use sirius_offload::sparsity::bundles::interleave;
use sirius_offload::tensor::DType;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];
/// Hidden sizes around the SIMD widths (8, 16, 32 lanes, bf16 de-interleave blocks) and SmolLM2's.
const HIDDEN: [usize; 6] = [5, 24, 33, 64, 100, 576];
/// Neuron counts around the kernel's 32-neuron block and 4-row groups.
const NEURONS: [usize; 6] = [1, 3, 31, 32, 33, 200];
const TOKENS: [usize; 3] = [1, 2, 5];
/// Thread counts: 1 takes the single-task path, 2 and 3 split neurons into uneven tasks.
const THREADS: [usize; 3] = [1, 2, 3];
/// Written after the `n_tokens` output rows; must survive the call.
const SENTINEL: f32 = -12345.5;

/// The tiers this machine runs, saying which are skipped (so a green run on an old CPU does
/// not pass for AVX-512 coverage).
fn tiers() -> Vec<Isa> {
    for isa in Isa::ALL {
        if !isa.is_supported() {
            eprintln!(
                "skipping ISA tier {}: this machine cannot run it",
                isa.name()
            );
        }
    }
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

fn pools() -> Vec<ThreadPool> {
    THREADS.iter().map(|&n| ThreadPool::new(n)).collect()
}

/// Rounds `vals` to `dtype` and encodes them: (little-endian bytes, rounded values).
fn encode(vals: &[f32], dtype: DType) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::with_capacity(vals.len() * dtype.size());
    let mut rounded = Vec::with_capacity(vals.len());
    for &v in vals {
        match dtype {
            DType::BF16 => {
                let b = bf16::from_f32(v);
                bytes.extend_from_slice(&b.to_bits().to_le_bytes());
                rounded.push(b.to_f64());
            }
            DType::F16 => {
                let b = f16::from_f32(v);
                bytes.extend_from_slice(&b.to_bits().to_le_bytes());
                rounded.push(b.to_f64());
            }
            DType::F32 => {
                bytes.extend_from_slice(&v.to_le_bytes());
                rounded.push(v as f64);
            }
            q => panic!("encode: {q} is not a float type"),
        }
    }
    (bytes, rounded)
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// One random FFN layer: the rounded separate matrices and their bundle matrix.
struct Ffn {
    h: usize,
    f: usize,
    dtype: DType,
    /// `[f, h]`, `[f, h]`, `[h, f]` as in the checkpoint, rounded to `dtype`.
    gate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
    /// The bundle matrix starts at `store[shift]`: an odd shift checks unaligned loads.
    store: Vec<u8>,
    shift: usize,
    /// The separate matrices' bytes, for the library's dense path.
    raw: [Vec<u8>; 3],
    /// The same FFN as up|down bundles (CATS), also starting at `shift`.
    store_up_down: Vec<u8>,
}

impl Ffn {
    fn random(rng: &mut StdRng, h: usize, f: usize, dtype: DType, shift: usize) -> Ffn {
        // Scaled so gate and up dot products are O(1): silu is exercised on both sides of 0.
        let (gb, gate) = encode(&uniform(rng, f * h, 2.0 / (h as f32).sqrt()), dtype);
        let (ub, up) = encode(&uniform(rng, f * h, 2.0 / (h as f32).sqrt()), dtype);
        let (db, down) = encode(&uniform(rng, h * f, 1.0 / (f as f32).sqrt()), dtype);
        let mut store = vec![0xA5u8; shift];
        store.extend(interleave(Some(&gb), &ub, &db, h, f, dtype.size()));
        let mut store_up_down = vec![0xA5u8; shift];
        store_up_down.extend(interleave(None, &ub, &db, h, f, dtype.size()));
        Ffn {
            h,
            f,
            dtype,
            gate,
            up,
            down,
            store,
            shift,
            raw: [gb, ub, db],
            store_up_down,
        }
    }

    fn bundles(&self) -> Bundles<'_> {
        self.bundles_as(BundleLayout::GateUpDown)
    }

    fn bundles_as(&self, layout: BundleLayout) -> Bundles<'_> {
        let store = if layout == BundleLayout::UpDown {
            &self.store_up_down
        } else {
            &self.store
        };
        Bundles {
            bytes: &store[self.shift..],
            dtype: self.dtype,
            neurons: self.f,
            hidden: self.h,
            layout,
        }
    }

    /// `(gate . x_t, up . x_t)` for every token and neuron, `[n, f]` each.
    fn dots(&self, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
        let (h, f) = (self.h, self.f);
        let dot = |w: &[f64], t: usize, i: usize| -> f64 {
            (0..h).map(|c| w[i * h + c] * x[t * h + c] as f64).sum()
        };
        let all = |w: &[f64]| (0..n * f).map(|ti| dot(w, ti / f, ti % f)).collect();
        (all(&self.gate), all(&self.up))
    }

    /// `out[t, r] = sum_i act[t, i] * down[r, i]`.
    fn down_times(&self, act: &[f64], n: usize) -> Vec<f64> {
        let (h, f) = (self.h, self.f);
        (0..n * h)
            .map(|tr| {
                (0..f)
                    .map(|i| act[tr / h * f + i] * self.down[tr % h * f + i])
                    .sum()
            })
            .collect()
    }
}

/// Runs `call` on every tier and pool into an output poisoned with NaN (plus one sentinel row
/// past the `n` rows it may write) and compares with `want` to 1e-4 of its largest magnitude.
fn check_all(
    tiers: &[Isa],
    pools: &[ThreadPool],
    want: &[f64],
    h: usize,
    ctx: &str,
    call: impl Fn(Isa, &ThreadPool, &mut [f32]),
) {
    let rows = want.len();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = 1e-4 * scale;
    for &isa in tiers {
        for pool in pools {
            let mut out = vec![f32::NAN; rows + h];
            out[rows..].fill(SENTINEL);
            call(isa, pool, &mut out);
            let where_ = || format!("{ctx} isa={} threads={}", isa.name(), pool.n_threads());
            for (j, (&g, &w)) in out.iter().zip(want).enumerate() {
                let err = (g as f64 - w).abs();
                assert!(
                    err <= tol,
                    "{}: out[{j}] = {g}, want {w} (err {err:e}, tol {tol:e})",
                    where_()
                );
            }
            assert!(
                out[rows..].iter().all(|&v| v == SENTINEL),
                "{}: wrote past n_tokens rows",
                where_()
            );
        }
    }
}

/// Token t's kept neurons for pattern `kind`: empty, all, the last one only (the bundle that
/// ends the buffer), about half, or sparse runs.
fn kept_list(rng: &mut StdRng, kind: usize, f: usize) -> Vec<u32> {
    match kind % 5 {
        0 => vec![],
        1 => (0..f as u32).collect(),
        2 => vec![f as u32 - 1],
        3 => (0..f as u32).filter(|_| rng.gen_bool(0.5)).collect(),
        _ => (0..f as u32)
            .filter(|i| (i / 3) % 4 == 0 && rng.gen_bool(0.8))
            .collect(),
    }
}

#[test]
fn bundle_ffn_matches_naive_reference() {
    let (tiers, pools) = (tiers(), pools());
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let mut case = 0usize;
    for h in HIDDEN {
        for f in NEURONS {
            for n in TOKENS {
                for dtype in DTYPES {
                    case += 1;
                    let w = Ffn::random(&mut rng, h, f, dtype, case % 3);
                    // One extra row of NaN: reading x past n tokens poisons the result.
                    let mut x = uniform(&mut rng, (n + 1) * h, 1.0);
                    x[n * h..].fill(f32::NAN);
                    let (g, u) = w.dots(&x, n);
                    let shape = format!("h={h} f={f} n={n} {dtype}");

                    for biased in [false, true] {
                        let gb = biased.then(|| uniform(&mut rng, f, 1.0));
                        let ub = biased.then(|| uniform(&mut rng, f, 1.0));
                        let bias = |b: &Option<Vec<f32>>, i: usize| {
                            b.as_ref().map_or(0.0, |v| v[i] as f64)
                        };
                        let act: Vec<f64> = (0..n * f)
                            .map(|ti| silu(g[ti] + bias(&gb, ti % f)) * (u[ti] + bias(&ub, ti % f)))
                            .collect();
                        let want = w.down_times(&act, n);
                        check_all(
                            &tiers,
                            &pools,
                            &want,
                            h,
                            &format!("All {shape} biased={biased}"),
                            |isa, pool, out| {
                                let a = Activation::All {
                                    gate_bias: gb.as_deref(),
                                    up_bias: ub.as_deref(),
                                };
                                bundle_ffn_with_isa(isa, pool, w.bundles(), &x, n, a, out);
                            },
                        );
                    }

                    for pattern in 0..5 {
                        let mut kept = NeuronLists::default();
                        for t in 0..n {
                            kept.push_token(kept_list(&mut rng, pattern + t, f));
                        }
                        let ub = (pattern % 2 == 1).then(|| uniform(&mut rng, f, 1.0));
                        // silu(gate) for every neuron, kept or not: using an unkept neuron shows.
                        let coeff: Vec<f32> = g.iter().map(|&v| silu(v) as f32).collect();
                        let mut act = vec![0f64; n * f];
                        for t in 0..n {
                            for &i in kept.token(t) {
                                let i = i as usize;
                                act[t * f + i] = coeff[t * f + i] as f64
                                    * (u[t * f + i] + ub.as_ref().map_or(0.0, |v| v[i] as f64));
                            }
                        }
                        let want = w.down_times(&act, n);
                        for layout in [BundleLayout::GateUpDown, BundleLayout::UpDown] {
                            let ctx = format!(
                                "PerToken {layout:?} {shape} pattern={pattern} up_bias={}",
                                ub.is_some()
                            );
                            check_all(&tiers, &pools, &want, h, &ctx, |isa, pool, out| {
                                let a = Activation::PerToken {
                                    coeff: &coeff,
                                    kept: &kept,
                                    up_bias: ub.as_deref(),
                                };
                                bundle_ffn_with_isa(isa, pool, w.bundles_as(layout), &x, n, a, out);
                            });
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bundle_ffn_all_is_the_dense_ffn() {
    let (tiers, pools) = (tiers(), pools());
    let mut rng = StdRng::seed_from_u64(42);
    // SmolLM2-135M's FFN shape, plus an odd one.
    for (h, f) in [(576, 1536), (100, 333)] {
        for dtype in DTYPES {
            let w = Ffn::random(&mut rng, h, f, dtype, 0);
            for n in [1, 3] {
                let x = uniform(&mut rng, n * h, 1.0);
                // The textbook formula, straight from the separate matrices.
                let mut want = vec![0f64; n * h];
                for t in 0..n {
                    for i in 0..f {
                        let dot = |m: &[f64]| -> f64 {
                            (0..h).map(|c| m[i * h + c] * x[t * h + c] as f64).sum()
                        };
                        let a = silu(dot(&w.gate)) * dot(&w.up);
                        for r in 0..h {
                            want[t * h + r] += w.down[r * f + i] * a;
                        }
                    }
                }
                let ctx = format!("dense h={h} f={f} n={n} {dtype}");
                check_all(&tiers, &pools, &want, h, &ctx, |isa, pool, out| {
                    bundle_ffn_with_isa(
                        isa,
                        pool,
                        w.bundles(),
                        &x,
                        n,
                        Activation::All {
                            gate_bias: None,
                            up_bias: None,
                        },
                        out,
                    );
                });
                // And the library's own dense path (gate and up matmuls, silu_mul, down matmul).
                check_all(
                    &tiers,
                    &pools,
                    &want,
                    h,
                    &format!("{ctx} via matmul"),
                    |isa, pool, out| {
                        let (mut gv, mut uv) = (vec![0f32; n * f], vec![0f32; n * f]);
                        cpu::matmul_with_isa(isa, pool, &w.raw[0], dtype, f, h, &x, n, &mut gv);
                        cpu::matmul_with_isa(isa, pool, &w.raw[1], dtype, f, h, &x, n, &mut uv);
                        cpu::silu_mul(&mut gv, &uv);
                        cpu::matmul_with_isa(
                            isa,
                            pool,
                            &w.raw[2],
                            dtype,
                            h,
                            f,
                            &gv,
                            n,
                            &mut out[..n * h],
                        );
                    },
                );
            }
        }
    }
}

#[test]
fn griffin_compact_matrix_equals_per_token_over_the_same_neurons() {
    // A compact matrix gathered from the full one (what Griffin builds) run with `All` must
    // agree with `PerToken` over the full matrix keeping those neurons with coeff = silu(gate).
    let (tiers, pools) = (tiers(), pools());
    let mut rng = StdRng::seed_from_u64(3);
    let (h, f, n) = (64, 96, 2);
    for dtype in DTYPES {
        let w = Ffn::random(&mut rng, h, f, dtype, 0);
        let x = uniform(&mut rng, n * h, 1.0);
        let ids: Vec<u32> = (0..f as u32).filter(|_| rng.gen_bool(0.4)).collect();
        let bb = 3 * h * dtype.size();
        let full = w.bundles();
        let compact: Vec<u8> = ids
            .iter()
            .flat_map(|&i| &full.bytes[i as usize * bb..(i as usize + 1) * bb])
            .copied()
            .collect();
        let cb = Bundles {
            bytes: &compact,
            dtype,
            neurons: ids.len(),
            hidden: h,
            layout: BundleLayout::GateUpDown,
        };
        let (g, u) = w.dots(&x, n);
        let mut act = vec![0f64; n * f];
        for t in 0..n {
            for &i in &ids {
                act[t * f + i as usize] = silu(g[t * f + i as usize]) * u[t * f + i as usize];
            }
        }
        let want = w.down_times(&act, n);
        let ctx = format!("griffin-vs-cats {dtype} kept={}", ids.len());
        check_all(
            &tiers,
            &pools,
            &want,
            h,
            &format!("{ctx} compact All"),
            |isa, pool, out| {
                bundle_ffn_with_isa(
                    isa,
                    pool,
                    cb,
                    &x,
                    n,
                    Activation::All {
                        gate_bias: None,
                        up_bias: None,
                    },
                    out,
                );
            },
        );
        let coeff: Vec<f32> = g.iter().map(|&v| silu(v) as f32).collect();
        let mut kept = NeuronLists::default();
        (0..n).for_each(|_| kept.push_token(ids.iter().copied()));
        check_all(
            &tiers,
            &pools,
            &want,
            h,
            &format!("{ctx} PerToken"),
            |isa, pool, out| {
                let a = Activation::PerToken {
                    coeff: &coeff,
                    kept: &kept,
                    up_bias: None,
                };
                bundle_ffn_with_isa(isa, pool, full, &x, n, a, out);
            },
        );
    }
}

/// `select_neurons` on a copy of `act`; `kept` starts with stale content that must go.
fn select(act: &[f32], width: usize, rule: NeuronRule) -> (Vec<f32>, NeuronLists) {
    let mut act = act.to_vec();
    let mut kept = NeuronLists {
        ids: vec![7, 7, 7],
        offsets: vec![0, 3],
    };
    select_neurons(&mut act, width, rule, &mut kept);
    (act, kept)
}

fn lists(kept: &NeuronLists) -> Vec<Vec<u32>> {
    (0..kept.n_tokens())
        .map(|t| kept.token(t).to_vec())
        .collect()
}

/// Kept elements unchanged (bitwise), the rest +0.0, lists ascending.
fn assert_selected(
    orig: &[f32],
    after: &[f32],
    width: usize,
    kept: &NeuronLists,
    want: &[Vec<u32>],
    ctx: &str,
) {
    assert_eq!(lists(kept), want, "{ctx}: kept lists");
    for (t, (o, a)) in orig.chunks(width).zip(after.chunks(width)).enumerate() {
        let ids = kept.token(t);
        assert!(
            ids.windows(2).all(|p| p[0] < p[1]),
            "{ctx}: token {t} list not ascending: {ids:?}"
        );
        for j in 0..width {
            if ids.contains(&(j as u32)) {
                assert_eq!(
                    a[j].to_bits(),
                    o[j].to_bits(),
                    "{ctx}: kept act[{t}, {j}] changed"
                );
            } else {
                assert_eq!(
                    a[j].to_bits(),
                    0f32.to_bits(),
                    "{ctx}: unkept act[{t}, {j}] = {} not zeroed",
                    a[j]
                );
            }
        }
    }
}

#[test]
fn select_neurons_handpicked_cases() {
    let row = [1.0, -2.0, 2.0, 0.5, -2.0, 3.0];
    let cases: [(NeuronRule, Vec<u32>); 7] = [
        // Three neurons tie at |2|: the lower ids win.
        (NeuronRule::TopK(3), vec![1, 2, 5]),
        (NeuronRule::TopK(2), vec![1, 5]),
        (NeuronRule::TopK(0), vec![]),
        (NeuronRule::TopK(6), vec![0, 1, 2, 3, 4, 5]),
        (NeuronRule::TopK(100), vec![0, 1, 2, 3, 4, 5]),
        // Equality keeps: |-2| and |2| are at the threshold.
        (NeuronRule::Threshold(2.0), vec![1, 2, 4, 5]),
        (NeuronRule::Threshold(3.5), vec![]),
    ];
    for (rule, want) in cases {
        let (after, kept) = select(&row, 6, rule);
        assert_selected(&row, &after, 6, &kept, &[want], &format!("{rule:?}"));
    }

    // NaN ranks as 0: any non-zero magnitude, however small, beats it, and thresholds above 0
    // never keep it.
    let nan_row = [f32::NAN, 0.1, f32::NAN, -0.2, 1e-30, f32::NAN];
    for (rule, want) in [
        (NeuronRule::TopK(2), vec![1, 3]),
        (NeuronRule::TopK(3), vec![1, 3, 4]),
        (NeuronRule::Threshold(1e-30), vec![1, 3, 4]),
        (NeuronRule::Threshold(0.15), vec![3]),
    ] {
        let (after, kept) = select(&nan_row, 6, rule);
        assert_selected(
            &nan_row,
            &after,
            6,
            &kept,
            &[want],
            &format!("NaN row {rule:?}"),
        );
    }

    // Infinities are the largest magnitudes.
    let inf_row = [1.0, f32::NEG_INFINITY, 5.0, f32::INFINITY];
    let (after, kept) = select(&inf_row, 4, NeuronRule::TopK(2));
    assert_selected(&inf_row, &after, 4, &kept, &[vec![1, 3]], "inf row");

    // Several tokens: one list each, each token ranked on its own.
    let rows = [
        3.0, 1.0, 2.0, 0.0, /**/ 0.0, 0.0, 0.0, 0.0, /**/ -1.0, 4.0, 4.0, -9.0,
    ];
    let (after, kept) = select(&rows, 4, NeuronRule::TopK(2));
    assert_eq!(kept.offsets, vec![0, 2, 4, 6]);
    assert_selected(
        &rows,
        &after,
        4,
        &kept,
        &[vec![0, 2], vec![0, 1], vec![1, 3]],
        "3 tokens TopK(2)",
    );
    let (after, kept) = select(&rows, 4, NeuronRule::TopK(0));
    assert_selected(
        &rows,
        &after,
        4,
        &kept,
        &[vec![], vec![], vec![]],
        "3 tokens TopK(0)",
    );
    let (after, kept) = select(&rows, 4, NeuronRule::Threshold(2.0));
    assert_selected(
        &rows,
        &after,
        4,
        &kept,
        &[vec![0, 2], vec![], vec![1, 2, 3]],
        "3 tokens threshold",
    );
}

#[test]
fn select_neurons_matches_sort_oracle() {
    let mut rng = StdRng::seed_from_u64(11);
    // Magnitude used for ranking: NaN as 0.
    let mag = |v: f32| if v.is_nan() { 0.0 } else { v.abs() };
    for width in [1usize, 2, 7, 64, 1536] {
        for n in [1, 3] {
            // Values on a coarse grid so ties are common, with NaN, infinities and -0.0.
            let act: Vec<f32> = (0..n * width)
                .map(|_| match rng.gen_range(0..40) {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    3 => -0.0,
                    _ => rng.gen_range(-4..=4) as f32 * 0.5,
                })
                .collect();
            let ks = [
                0,
                1,
                2,
                width / 2,
                width.saturating_sub(1),
                width,
                width + 3,
            ];
            for k in ks {
                let want: Vec<Vec<u32>> = act
                    .chunks(width)
                    .map(|row| {
                        let mut order: Vec<usize> = (0..width).collect();
                        // Stable sort: equal magnitudes stay in id order, so lower ids win.
                        order.sort_by(|&a, &b| mag(row[b]).total_cmp(&mag(row[a])));
                        let mut top: Vec<u32> =
                            order[..k.min(width)].iter().map(|&i| i as u32).collect();
                        top.sort_unstable();
                        top
                    })
                    .collect();
                let (after, kept) = select(&act, width, NeuronRule::TopK(k));
                assert_selected(
                    &act,
                    &after,
                    width,
                    &kept,
                    &want,
                    &format!("width={width} n={n} TopK({k})"),
                );
            }
            for thr in [0.25, 0.5, 1.0, 1.75, 2.0, f32::INFINITY] {
                let want: Vec<Vec<u32>> = act
                    .chunks(width)
                    .map(|row| {
                        (0..width as u32)
                            .filter(|&i| mag(row[i as usize]) >= thr)
                            .collect()
                    })
                    .collect();
                let (after, kept) = select(&act, width, NeuronRule::Threshold(thr));
                assert_selected(
                    &act,
                    &after,
                    width,
                    &kept,
                    &want,
                    &format!("width={width} n={n} Threshold({thr})"),
                );
            }
        }
    }
}

/// `acc[j] + sum_t z[t, j]^2 / |z_t|^2` in f64, rows with a zero norm adding nothing.
fn naive_scores(z: &[f32], width: usize, acc: &[f32]) -> Vec<f64> {
    let mut out: Vec<f64> = acc.iter().map(|&v| v as f64).collect();
    for row in z.chunks(width) {
        let norm2: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum();
        if norm2 > 0.0 {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += (v as f64).powi(2) / norm2;
            }
        }
    }
    out
}

fn assert_scores(got: &[f32], want: &[f64], ctx: &str) {
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= 1e-5 * (1.0 + w.abs()),
            "{ctx}: acc[{j}] = {g}, want {w}"
        );
    }
}

#[test]
fn accumulate_neuron_scores_matches_naive() {
    let mut rng = StdRng::seed_from_u64(5);
    for width in [1, 5, 64, 1536] {
        let n = 4;
        let mut z = uniform(&mut rng, n * width, 3.0);
        z[width..2 * width].fill(0.0); // token 1: all-zero activations
        let mut acc: Vec<f32> = uniform(&mut rng, width, 1.0)
            .iter()
            .map(|v| v.abs())
            .collect();
        let before: f64 = acc.iter().map(|&v| v as f64).sum();
        let want = naive_scores(&z, width, &acc);
        accumulate_neuron_scores(&z, width, &mut acc);
        assert_scores(&acc, &want, &format!("width={width}"));
        // Each non-zero row's normalised squares sum to 1: the total grows by n - 1 rows.
        let grew = acc.iter().map(|&v| v as f64).sum::<f64>() - before;
        assert!(
            (grew - (n - 1) as f64).abs() < 1e-4 * width as f64,
            "width={width}: total grew by {grew}"
        );
    }

    // An all-zero row adds nothing at all (no 0/0 NaN).
    let mut acc = vec![0.25f32, 0.5, 1.0];
    accumulate_neuron_scores(&[0.0, 0.0, 0.0, -0.0, 0.0, 0.0], 3, &mut acc);
    assert_eq!(acc, vec![0.25, 0.5, 1.0]);
}

/// Regression: the kernel once formed `v * v * (1 / norm2)` in f32, where `v * v` or
/// `1 / norm2` overflowed for rows below ~1e-19 or above ~1.8e19, giving inf.
#[test]
fn accumulate_neuron_scores_at_extreme_magnitudes() {
    // (z / |z|)^2 lies in [0, 1] whatever the scale of z. Tiny and huge rows are far outside
    // what an FFN produces, but the score must not turn into inf or NaN.
    for row in [[1e-20f32, 2e-20], [3e19, 4e19]] {
        let mut acc = vec![0f32; 2];
        accumulate_neuron_scores(&row, 2, &mut acc);
        assert_scores(
            &acc,
            &naive_scores(&row, 2, &[0.0, 0.0]),
            &format!("row {row:?}"),
        );
    }
}

/// CATS over tree beams: one set for every row, the top-k of the column sums of |act| (ties:
/// lower id), or the columns whose mean |act| reaches the threshold.
#[test]
fn shared_selection_picks_one_set_from_column_sums() {
    use sirius_offload::backend::cpu::select_neurons_shared;
    let mut rng = StdRng::seed_from_u64(77);
    for (n, width) in [(1, 7), (3, 33), (4, 200), (2, 1)] {
        let act = uniform(&mut rng, n * width, 2.0);
        let sums: Vec<f64> = (0..width)
            .map(|j| (0..n).map(|t| act[t * width + j].abs() as f64).sum())
            .collect();
        for rule in [
            NeuronRule::TopK(width / 2),
            NeuronRule::TopK(width),
            NeuronRule::TopK(0),
            NeuronRule::Threshold(0.5),
        ] {
            let mut order: Vec<usize> = (0..width).collect();
            order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
            let mut want: Vec<u32> = match rule {
                NeuronRule::TopK(k) => order[..k.min(width)].iter().map(|&j| j as u32).collect(),
                NeuronRule::Threshold(t) => (0..width)
                    .filter(|&j| sums[j] / n as f64 > t as f64 + 1e-6)
                    .map(|j| j as u32)
                    .collect(),
            };
            want.sort_unstable();
            let mut got_act = act.clone();
            let mut kept = NeuronLists::default();
            kept.push_token([9, 9, 9]); // stale content must go
            select_neurons_shared(&mut got_act, width, rule, &mut kept);
            assert_eq!(kept.n_tokens(), n, "{rule:?}");
            for t in 0..n {
                assert_eq!(
                    kept.token(t),
                    &want[..],
                    "{rule:?} n {n} width {width} row {t}"
                );
                for j in 0..width {
                    let v = got_act[t * width + j];
                    let expect = if want.contains(&(j as u32)) {
                        act[t * width + j]
                    } else {
                        0.0
                    };
                    assert_eq!(v, expect, "{rule:?} row {t} col {j}");
                }
            }
        }
    }
}
