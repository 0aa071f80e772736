//! f32 to a stored format: the float types by rounding, and the two block formats the
//! runtime writes itself (Q8_0 for Griffin's re-laid-out down matrix, Q4_0/Q8_0 for
//! quantizing a float checkpoint at load). The block rules are ggml's reference ones (a block's
//! scale from its largest magnitude, round to nearest), so a file ggml wrote and a row we
//! re-quantize hold the same kind of values.

use half::{bf16, f16};

use super::DType;

/// Encodes `src` as `kind` into `out`, which holds exactly the bytes those elements take.
/// Returns `false` (and writes nothing) for a format this module does not write, or when
/// the lengths disagree (a block format needs whole blocks).
pub fn quantize(kind: DType, src: &[f32], out: &mut [u8]) -> bool {
    let (block_elems, block_bytes) = kind.block();
    if !src.len().is_multiple_of(block_elems) || src.len() / block_elems * block_bytes != out.len()
    {
        return false;
    }
    let blocks = src
        .chunks_exact(block_elems)
        .zip(out.chunks_exact_mut(block_bytes));
    match kind {
        DType::F32 => blocks.for_each(|(x, b)| b.copy_from_slice(&x[0].to_le_bytes())),
        DType::F16 => {
            blocks.for_each(|(x, b)| b.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()))
        }
        DType::BF16 => {
            blocks.for_each(|(x, b)| b.copy_from_slice(&bf16::from_f32(x[0]).to_le_bytes()))
        }
        DType::Q8_0 => blocks.for_each(|(x, b)| q8_0(x, b)),
        DType::Q4_0 => blocks.for_each(|(x, b)| q4_0(x, b)),
        DType::Q4_1 | DType::Q4K | DType::Q5K | DType::Q6K => return false,
    }
    true
}

/// Whether [`quantize`] writes `kind`.
pub fn writes(kind: DType) -> bool {
    !matches!(kind, DType::Q4_1 | DType::Q4K | DType::Q5K | DType::Q6K)
}

/// `d = max|x| / 127`, `q = round(x / d)`: every element within `d / 2` (plus the f16
/// rounding of `d`).
fn q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, v) in b[2..34].iter_mut().zip(x) {
        *q = (v * inv).round() as i8 as u8;
    }
}

/// The element of largest magnitude maps to -8 (so its sign decides the scale's), the others
/// to the nearest of the 16 levels `d * (q - 8)`.
fn q4_0(x: &[f32], b: &mut [u8]) {
    let extreme = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = extreme / -8.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let level = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
    for j in 0..16 {
        b[2 + j] = level(x[j]) | (level(x[j + 16]) << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::quant::dequantize;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Blocks of very different scales, one all-zero block.
                if i / 32 == 3 {
                    0.0
                } else {
                    u * (1 + i / 32) as f32
                }
            })
            .collect()
    }

    /// Each block round-trips within half a step of its scale (plus the f16 rounding of the
    /// scale), the all-zero block stays zero, and re-quantizing de-quantized values is exact.
    #[test]
    fn block_formats_round_trip_within_half_a_step() {
        for (kind, levels) in [(DType::Q8_0, 127.0), (DType::Q4_0, 8.0)] {
            let x = sample(256, 7);
            let mut q = vec![0u8; kind.bytes_for(x.len())];
            assert!(quantize(kind, &x, &mut q), "{kind:?}");
            let mut y = vec![f32::NAN; x.len()];
            assert!(dequantize(kind, &q, &mut y));
            for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = amax / levels;
                for (a, c) in xs.iter().zip(ys) {
                    // Q4_0's positive extreme has no level (+8): it rounds down to +7 steps.
                    // The scale is stored as f16: up to `levels` steps of 2^-11 more.
                    let bound = if kind == DType::Q4_0 {
                        step
                    } else {
                        step * 0.5
                    };
                    assert!(
                        (a - c).abs() <= bound + step * levels / 2048.0 + 1e-7,
                        "{kind:?} block {b}: {a} -> {c} (step {step})"
                    );
                }
                if b == 3 {
                    assert!(ys.iter().all(|&v| v == 0.0), "{kind:?} zero block");
                }
            }
            let mut again = vec![0u8; q.len()];
            assert!(quantize(kind, &y, &mut again));
            let mut z = vec![0f32; y.len()];
            assert!(dequantize(kind, &again, &mut z));
            assert_eq!(z, y, "{kind:?} is not idempotent");
        }
    }

    #[test]
    fn float_formats_round_to_nearest() {
        let x = [1.0f32, -2.5, 1.0e-3, 3.0e38];
        for kind in [DType::F32, DType::F16, DType::BF16] {
            let mut b = vec![0u8; kind.bytes_for(4)];
            assert!(quantize(kind, &x, &mut b));
            let mut y = [0f32; 4];
            assert!(dequantize(kind, &b, &mut y));
            let expect: Vec<f32> = match kind {
                DType::F32 => x.to_vec(),
                DType::F16 => x.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
                _ => x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
            };
            assert_eq!(y.to_vec(), expect, "{kind:?}");
        }
    }

    #[test]
    fn refuses_formats_it_does_not_write_and_bad_lengths() {
        let x = sample(64, 1);
        for kind in [DType::Q4_1, DType::Q4K, DType::Q5K, DType::Q6K] {
            let mut out = vec![0u8; kind.bytes_for(256)];
            assert!(!quantize(kind, &sample(256, 2), &mut out), "{kind:?}");
            assert!(!writes(kind));
        }
        let mut out = vec![0u8; DType::Q8_0.bytes_for(64)];
        assert!(!quantize(DType::Q8_0, &x[..63], &mut out));
        assert!(!quantize(DType::Q8_0, &x, &mut out[..60]));
        assert!(quantize(DType::Q8_0, &x, &mut out));
    }
}
