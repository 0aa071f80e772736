//! ggml's block formats: de-quantization to f32, the reference every quantized kernel is
//! checked against.
//!
//! Each format stores fixed-size blocks along a row. The arithmetic is written in the order
//! ggml's reference code (and the `gguf` Python package) uses, `(d * scale) * q - (dmin * m)`,
//! without fused multiply-adds, so the values match theirs bit for bit.

use half::{bf16, f16};

use super::DType;

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// De-quantizes `src` (whole blocks of `kind`) into `out`, which holds exactly the elements
/// those blocks encode. Returns `false` (and writes nothing) when the lengths disagree.
pub fn dequantize(kind: DType, src: &[u8], out: &mut [f32]) -> bool {
    let (block_elems, block_bytes) = kind.block();
    if !src.len().is_multiple_of(block_bytes) || src.len() / block_bytes * block_elems != out.len()
    {
        return false;
    }
    let blocks = src
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block_elems));
    match kind {
        DType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        DType::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        DType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        DType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        DType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        DType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        DType::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
        DType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
    }
    true
}

/// `d: f16, qs: [u8; 16]`: element j is the low nibble of qs[j], element j + 16 the high one,
/// both offset by -8.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * ((q & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// `d: f16, m: f16, qs: [u8; 16]`: nibbles as in Q4_0, unsigned, plus the minimum `m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * (q & 0xF) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// `d: f16, qs: [i8; 32]`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = d * (q as i8) as f32;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (of 8) packed in the 12 bytes of a Q4_K or
/// Q5_K block: the first four in the low 6 bits of bytes 0..4 and 4..8, the last four split
/// between the low/high nibbles of bytes 8..12 and the top 2 bits of bytes 0..8.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = scale_min_k4_int(j, s);
    (sc as f32, m as f32)
}

/// [`scale_min_k4`] as the 6-bit integers (the integer kernels' factors).
#[inline(always)]
fn scale_min_k4_int(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: 8 sub-blocks of 32, each
/// `d * sc * q - dmin * m`; a 64-element chunk takes the low nibbles of 32 bytes, then the high.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for (chunk, (qs, y)) in b[16..144]
        .chunks_exact(32)
        .zip(y.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        for (l, &q) in qs.iter().enumerate() {
            y[l] = d1 * (q & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K with a fifth bit
/// per element, bit `2 * chunk` (low nibbles) and `2 * chunk + 1` (high) of qh[l].
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for (chunk, (qs, y)) in b[48..176]
        .chunks_exact(32)
        .zip(y.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for (l, &q) in qs.iter().enumerate() {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q & 0xF) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q >> 4) + hi2) as f32 - m2;
        }
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: 6-bit values offset by -32, 16
/// sub-blocks of 16 each with a signed 8-bit scale. Each half (128 elements) takes 64 bytes of
/// ql (low nibbles, then high) and 32 of qh (2 bits per element, four groups of 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (g, &q) in q.iter().enumerate() {
                let scale = d * (sc[is + 2 * g] as i8) as f32;
                y[l + 32 * g] = scale * (q as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The byte stream both these tests and `tools/reference/gguf_dequant_reference.py` feed the
    /// de-quantizers: a 64-bit LCG's high bytes, with every block's f16 scales overwritten by
    /// small finite values so no block holds an infinity or NaN.
    pub(crate) fn reference_blocks(kind: DType, n_blocks: usize) -> Vec<u8> {
        let (_, bytes) = kind.block();
        let mut state: u64 = 0x5151_7e5a_u64 ^ ((bytes as u64) << 8);
        let mut data: Vec<u8> = (0..n_blocks * bytes)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        // f16 scale positions per format; 0x2c00 = 0.0625, 0x3800 = 0.5, 0xac00 = -0.0625.
        let scales: &[(usize, [u8; 2])] = match kind {
            DType::Q4_0 | DType::Q8_0 => &[(0, [0x00, 0x2c])],
            DType::Q4_1 => &[(0, [0x00, 0x2c]), (2, [0x00, 0xac])],
            DType::Q4K | DType::Q5K => &[(0, [0x00, 0x2c]), (2, [0x00, 0x38])],
            DType::Q6K => &[(208, [0x00, 0x2c])],
            _ => &[],
        };
        for block in data.chunks_exact_mut(bytes) {
            for &(at, v) in scales {
                block[at..at + 2].copy_from_slice(&v);
            }
        }
        data
    }

    /// Sum, sum of squares and three elements of each format's reference stream (4 blocks),
    /// as printed by `tools/reference/gguf_dequant_reference.py` with gguf 0.19.0.
    const PINNED: [(DType, f64, f64, [f32; 3]); 6] = [
        (DType::Q4_0, -2.5625, 11.08203125, [0.0, -0.0625, -0.125]),
        (DType::Q4_1, 52.625, 31.9453125, [0.125, 0.375, 0.0]),
        (DType::Q8_0, -59.25, 2613.5703125, [2.25, 7.4375, 5.8125]),
        (DType::Q4K, -3010.0, 220687.28125, [-3.625, 4.5, -27.125]),
        (DType::Q5K, 6320.25, 647480.5859375, [1.75, 4.6875, 40.5]),
        (
            DType::Q6K,
            907.4375,
            4825070.78515625,
            [-0.8125, -12.75, -24.75],
        ),
    ];

    #[test]
    fn matches_the_gguf_package_on_the_reference_stream() {
        for (kind, sum, sum_sq, picks) in PINNED {
            let src = reference_blocks(kind, 4);
            let mut out = vec![f32::NAN; 4 * kind.block().0];
            assert!(dequantize(kind, &src, &mut out));
            let got_sum: f64 = out.iter().map(|&v| v as f64).sum();
            let got_sq: f64 = out.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let n = out.len();
            let got_picks = [out[1], out[n / 2 + 3], out[n - 1]];
            assert_eq!(
                (got_sum, got_sq, got_picks),
                (sum, sum_sq, picks),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn refuses_partial_blocks_and_wrong_outputs() {
        let src = reference_blocks(DType::Q4_1, 2);
        let mut out = vec![0.0; 64];
        assert!(!dequantize(DType::Q4_1, &src[..39], &mut out));
        assert!(!dequantize(DType::Q4_1, &src, &mut out[..63]));
        assert!(dequantize(DType::Q4_1, &src, &mut out));
    }

    #[test]
    fn float_formats_are_exact() {
        let vals = [1.5f32, -0.25, 3.0e-5, 65504.0];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut out = [0.0; 4];
        assert!(dequantize(DType::F16, &bytes, &mut out));
        let back: Vec<f32> = vals
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(out.to_vec(), back);
    }
}
