//! `CpuBackend::with_isa`: a backend pinned to one ISA tier runs every op on it (its results
//! are bit for bit those of the `*_with_isa` kernels of that tier), and asking for a tier this
//! machine lacks is an error, not a panic.

use sirius_offload::backend::cpu::{self, Isa, ThreadPool};
use sirius_offload::backend::{AttentionShape, Backend, CpuBackend, CpuKv, Rows, SparseOps};
use sirius_offload::tensor::DType;

/// Deterministic values in [-1, 1) (xorshift).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn pinned_backend_runs_its_tier() {
    let pool = ThreadPool::new(2);
    let (rows, cols, n) = (37, 77, 3);
    let w: Vec<u8> = values(rows * cols, 1)
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    let x = values(n * cols, 2);
    let gate = values(300, 3).iter().map(|v| v * 20.0).collect::<Vec<_>>();
    let up = values(300, 4);
    for isa in Isa::available() {
        let b = CpuBackend::with_isa(2, isa).expect("a supported tier");
        assert!(b.describe().contains(isa.name()), "{}", b.describe());

        let m = b.upload_matrix(w.clone(), DType::BF16, rows, cols).unwrap();
        let mut got = vec![0.0; n * rows];
        b.matmul(&m, &x, n, &mut got).unwrap();
        let mut want = vec![0.0; n * rows];
        cpu::matmul_with_isa(isa, &pool, &w, DType::BF16, rows, cols, &x, n, &mut want);
        assert_eq!(bits(&got), bits(&want), "{isa:?} matmul");

        let (mut g, mut want) = (gate.clone(), gate.clone());
        b.silu_mul(&mut g, &up, up.len()).unwrap();
        cpu::silu_mul_with_isa(isa, &mut want, &up);
        assert_eq!(bits(&g), bits(&want), "{isa:?} silu_mul");

        let (mut g, mut want) = (gate.clone(), gate.clone());
        b.silu(&mut g, gate.len()).unwrap();
        cpu::silu_with_isa(isa, &mut want);
        assert_eq!(bits(&g), bits(&want), "{isa:?} silu");

        let shape = AttentionShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 24,
        };
        let (start, n) = (40, 2);
        let q = values(n * 4 * 24, 5);
        let kv = values((start + n) * 2 * 24, 6);
        let kv_f16 = CpuKv::F16(
            kv.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect(),
        );
        let mut got = vec![0.0; q.len()];
        b.attention(
            &q,
            &kv_f16,
            &kv_f16,
            shape,
            Rows::Causal { start, len: n },
            &mut got,
        )
        .unwrap();
        let mut want = vec![0.0; q.len()];
        cpu::attention_with_isa(
            isa,
            &pool,
            &q,
            kv_f16.view(),
            kv_f16.view(),
            4,
            2,
            24,
            start,
            n,
            None,
            &mut want,
        );
        assert_eq!(bits(&got), bits(&want), "{isa:?} attention");
    }
}

#[test]
fn unsupported_tier_is_an_error() {
    for isa in Isa::ALL {
        assert_eq!(
            CpuBackend::with_isa(1, isa).is_ok(),
            isa.is_supported(),
            "{isa:?}"
        );
    }
}
