//! AVX2 decode kernels of the interleaved layout (`quant_packed.rs`): 8 rows per pass, one
//! lane pair per row.

use std::arch::x86_64::*;

use super::quant::{Q8Row, QK};
use super::quant_packed::{group_block_bytes, GROUP};
use crate::tensor::DType;

/// How far ahead of the cell being read the group stream is prefetched (~2 KB: measured
/// 5-10% faster decode than 4 cells on Zen 1, where the loads are the hot spot).
const PREFETCH_CELLS: usize = 12;

/// `y[8g + r]` = row `8g + r` of the groups in `groups` (`blocks` cells each, `dtype`
/// Q4_0, Q4_1 or Q8_0) dotted with `x`.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_groups(
    dtype: DType,
    groups: &[u8],
    blocks: usize,
    x: &Q8Row,
    y: &mut [f32],
) {
    let cell = group_block_bytes(dtype);
    assert!(
        y.len().is_multiple_of(GROUP)
            && groups.len() >= y.len() / GROUP * blocks * cell
            && x.d.len() >= blocks
            && x.qs.len() >= blocks * QK
    );
    for (g, out) in y.chunks_exact_mut(GROUP).enumerate() {
        // SAFETY: group g's cells are in bounds (asserted); features enabled here.
        unsafe {
            let p = groups.as_ptr().add(g * blocks * cell);
            let cells = |min: bool| Cells { p, cell, min };
            let sums = match dtype {
                DType::Q4_1 => group::<true, _>(&cells(true), blocks, x),
                DType::Q8_0 => group_q8::<false, _>(&Q8Cells(p), blocks, x).0,
                _ => group::<false, _>(&cells(false), blocks, x),
            };
            _mm256_storeu_ps(out.as_mut_ptr(), sums);
        }
    }
}

/// Where a group's blocks come from: the interleaved cells, or 8 rows of the stored layout
/// interleaved in registers. Both feed [`group`]'s one arithmetic, so a matrix gives
/// bit-equal products either way (an offloaded run's views of stored rows and an
/// unconstrained run's packed copy draft the same tokens).
trait GroupSource {
    /// Block `b`'s 8 scales and (Q4_1) 8 minima as f16 bits, and its 4 chunks of quants
    /// (chunk `j`: dword `j` of each row's 16 quant bytes, row `r` at dword `r`).
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 4]);
}

/// Cells of the interleaved layout.
struct Cells {
    p: *const u8,
    cell: usize,
    min: bool,
}

impl GroupSource for Cells {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 4]) {
        // SAFETY: caller: block b's cell is in bounds; features enabled by the kernel.
        unsafe {
            let c = self.p.add(b * self.cell);
            // Prefetches never fault, so the last cells may point past the end.
            let ahead = c.wrapping_add(PREFETCH_CELLS * self.cell);
            for line in 0..self.cell.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
            let quants = c.add(if self.min { 4 * GROUP } else { 2 * GROUP });
            let chunk = |j: usize| _mm256_loadu_si256(quants.add(32 * j) as *const __m256i);
            (
                _mm_loadu_si128(c as *const __m128i),
                _mm_loadu_si128(c.add(2 * GROUP) as *const __m128i),
                [chunk(0), chunk(1), chunk(2), chunk(3)],
            )
        }
    }
}

/// 8 rows of stored Q4_0/Q4_1 blocks (a short group repeats its last row).
struct StoredRows {
    rows: [*const u8; GROUP],
    block_bytes: usize,
    min: bool,
}

/// How far ahead of the block being read each stored row stream is prefetched.
const PREFETCH_BYTES: usize = 512;

impl GroupSource for StoredRows {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 4]) {
        // SAFETY: caller: block b of every row is in bounds; features enabled by the kernel.
        unsafe {
            let at = b * self.block_bytes;
            let p = |r: usize| self.rows[r].add(at);
            for r in 0..GROUP {
                _mm_prefetch::<_MM_HINT_T0>(p(r).wrapping_add(PREFETCH_BYTES) as *const i8);
            }
            let half = |r: usize, o: usize| i16::from_le_bytes([*p(r).add(o), *p(r).add(o + 1)]);
            let f16s = |o: usize| {
                _mm_set_epi16(
                    half(7, o),
                    half(6, o),
                    half(5, o),
                    half(4, o),
                    half(3, o),
                    half(2, o),
                    half(1, o),
                    half(0, o),
                )
            };
            let quants = if self.min { 4 } else { 2 };
            let q = |r: usize| _mm_loadu_si128(p(r).add(quants) as *const __m128i);
            let pair =
                |a: usize| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q(a)), q(a + 4));
            // An 8 x 4 transpose of dwords: rows (0,4), (1,5), ... share a register.
            let (v04, v15, v26, v37) = (pair(0), pair(1), pair(2), pair(3));
            let (t0, t1) = (
                _mm256_unpacklo_epi32(v04, v15),
                _mm256_unpackhi_epi32(v04, v15),
            );
            let (t2, t3) = (
                _mm256_unpacklo_epi32(v26, v37),
                _mm256_unpackhi_epi32(v26, v37),
            );
            let chunks = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            let mins = if self.min {
                f16s(2)
            } else {
                _mm_setzero_si128()
            };
            (f16s(0), mins, chunks)
        }
    }
}

/// Rows of stored Q4_0, Q4_1 or Q8_0 blocks (`row_bytes` apart) dotted with `x` into `y`, 8
/// at a time with the interleaved kernel's arithmetic.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_stored_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &Q8Row,
    y: &mut [f32],
) {
    let (_, block_bytes) = dtype.block();
    let blocks = x.d.len();
    assert!(
        matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
            && rows.len() >= y.len() * row_bytes
            && row_bytes >= blocks * block_bytes
            && x.qs.len() >= blocks * QK
            && x.s.len() >= blocks
    );
    let min = dtype == DType::Q4_1;
    for (g, out) in y.chunks_mut(GROUP).enumerate() {
        let n = out.len();
        let base = rows.as_ptr().wrapping_add(g * GROUP * row_bytes);
        // SAFETY: rows g * 8..g * 8 + n exist (asserted); a short group repeats its last row.
        let sums = unsafe {
            let rows = std::array::from_fn(|r| base.add(row_bytes * r.min(n - 1)));
            let src = StoredRows {
                rows,
                block_bytes,
                min,
            };
            match dtype {
                DType::Q8_0 => group_q8::<false, _>(&StoredQ8Rows(rows), blocks, x).0,
                DType::Q4_1 => group::<true, _>(&src, blocks, x),
                _ => group::<false, _>(&src, blocks, x),
            }
        };
        let mut all = [0f32; GROUP];
        // SAFETY: `all` holds 8 floats.
        unsafe { _mm256_storeu_ps(all.as_mut_ptr(), sums) };
        out.copy_from_slice(&all[..n]);
    }
}

/// One group's 8 dot products. `MIN`: Q4_1 (a minimum per block); else Q4_0 (values are
/// nibble - 8, the -8 applied through the activation block sums).
#[inline(always)]
unsafe fn group<const MIN: bool, S: GroupSource>(src: &S, blocks: usize, x: &Q8Row) -> __m256 {
    // SAFETY: caller: `src` has `blocks` blocks; x holds `blocks` activation blocks.
    unsafe {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (mut even, mut odd, mut offsets) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let xq = x.qs.as_ptr() as *const u8;
        for b in 0..blocks {
            let (d_bits, m_bits, chunks) = src.block(b);
            let d = _mm256_cvtph_ps(d_bits);
            // Two 16-bit accumulators: the low and the high nibbles' products.
            let (mut lo_sum, mut hi_sum) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let xb = xq.add(b * QK);
            for (j, w) in chunks.into_iter().enumerate() {
                let lo = _mm256_and_si256(w, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), low);
                // The 4 activations of each half broadcast to every row's lanes.
                let xl = _mm256_set1_epi32((xb.add(4 * j) as *const i32).read_unaligned());
                let xh = _mm256_set1_epi32((xb.add(16 + 4 * j) as *const i32).read_unaligned());
                lo_sum = _mm256_add_epi16(lo_sum, _mm256_maddubs_epi16(lo, xl));
                hi_sum = _mm256_add_epi16(hi_sum, _mm256_maddubs_epi16(hi, xh));
            }
            let ints = _mm256_madd_epi16(_mm256_add_epi16(lo_sum, hi_sum), ones);
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x.d.get_unchecked(b)));
            // Two chains, so consecutive blocks do not wait on one FMA's latency.
            if b % 2 == 0 {
                even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, even);
            } else {
                odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, odd);
            }
            let sx = *x.s.get_unchecked(b);
            offsets = if MIN {
                _mm256_fmadd_ps(_mm256_cvtph_ps(m_bits), _mm256_set1_ps(sx), offsets)
            } else {
                _mm256_fmadd_ps(d, _mm256_set1_ps(-8.0 * sx), offsets)
            };
        }
        _mm256_add_ps(_mm256_add_ps(even, odd), offsets)
    }
}

/// `y` as [`dot_groups`] gives it for Q8_0 groups but for activations within +-63 (see
/// [`group_q8`]), and `bounds[r]` = `sum_b norm_rb * d_b / 2`:
/// how far each product can be from the one with exact activations (`quant_logits`).
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn head_groups(
    groups: &[u8],
    blocks: usize,
    x: &Q8Row,
    y: &mut [f32],
    bounds: &mut [f32],
) {
    let cell = group_block_bytes(DType::Q8_0);
    assert!(
        y.len().is_multiple_of(GROUP)
            && bounds.len() == y.len()
            && groups.len() >= y.len() / GROUP * blocks * cell
            && x.d.len() >= blocks
            && x.qs.len() >= blocks * QK
    );
    for (g, (out, bound)) in y
        .chunks_exact_mut(GROUP)
        .zip(bounds.chunks_exact_mut(GROUP))
        .enumerate()
    {
        // SAFETY: group g's cells are in bounds (asserted); features enabled here.
        unsafe {
            let cells = Q8Cells(groups.as_ptr().add(g * blocks * cell));
            let (sums, err) = group_q8::<true, _>(&cells, blocks, x);
            _mm256_storeu_ps(out.as_mut_ptr(), sums);
            _mm256_storeu_ps(bound.as_mut_ptr(), err);
        }
    }
}

/// Where a Q8_0 group's blocks come from (as [`GroupSource`] for Q4): block `b`'s 8 scales
/// and 8 norms as f16 bits (zeros where the source has none) and its 8 chunks of quants.
trait Q8Source {
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 8]);
}

/// Cells of the interleaved Q8_0 layout (with norms).
struct Q8Cells(*const u8);

const Q8_CELL: usize = 288;

impl Q8Source for Q8Cells {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 8]) {
        // SAFETY: caller: block b's cell is in bounds; features enabled by the kernel.
        unsafe {
            let c = self.0.add(b * Q8_CELL);
            let ahead = c.wrapping_add(PREFETCH_CELLS * Q8_CELL);
            for line in 0..Q8_CELL.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
            let chunks = std::array::from_fn(|j| {
                _mm256_loadu_si256(c.add(4 * GROUP + 32 * j) as *const __m256i)
            });
            (
                _mm_loadu_si128(c as *const __m128i),
                _mm_loadu_si128(c.add(2 * GROUP) as *const __m128i),
                chunks,
            )
        }
    }
}

/// 8 rows of stored Q8_0 blocks (a short group repeats its last row), transposed in
/// registers (8 x 8 dwords) into the interleaved chunks.
struct StoredQ8Rows([*const u8; GROUP]);

impl Q8Source for StoredQ8Rows {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m128i, __m128i, [__m256i; 8]) {
        // SAFETY: caller: block b of every row is in bounds; features enabled by the kernel.
        unsafe {
            let p = |r: usize| self.0[r].add(b * 34);
            for r in 0..GROUP {
                _mm_prefetch::<_MM_HINT_T0>(p(r).wrapping_add(PREFETCH_BYTES) as *const i8);
            }
            let half = |r: usize| i16::from_le_bytes([*p(r), *p(r).add(1)]);
            let d = _mm_set_epi16(
                half(7),
                half(6),
                half(5),
                half(4),
                half(3),
                half(2),
                half(1),
                half(0),
            );
            let a: [__m256i; GROUP] =
                std::array::from_fn(|r| _mm256_loadu_si256(p(r).add(2) as *const __m256i));
            // Dwords 0..4 of rows 0..4 and 4..8 per 128-bit lane, then the lanes swapped in.
            let lo32 = |x, y| _mm256_unpacklo_epi32(x, y);
            let hi32 = |x, y| _mm256_unpackhi_epi32(x, y);
            let t = [
                lo32(a[0], a[1]),
                hi32(a[0], a[1]),
                lo32(a[2], a[3]),
                hi32(a[2], a[3]),
                lo32(a[4], a[5]),
                hi32(a[4], a[5]),
                lo32(a[6], a[7]),
                hi32(a[6], a[7]),
            ];
            let u = [
                _mm256_unpacklo_epi64(t[0], t[2]),
                _mm256_unpackhi_epi64(t[0], t[2]),
                _mm256_unpacklo_epi64(t[1], t[3]),
                _mm256_unpackhi_epi64(t[1], t[3]),
                _mm256_unpacklo_epi64(t[4], t[6]),
                _mm256_unpackhi_epi64(t[4], t[6]),
                _mm256_unpacklo_epi64(t[5], t[7]),
                _mm256_unpackhi_epi64(t[5], t[7]),
            ];
            let chunks = [
                _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
                _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
                _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
                _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
                _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
                _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
                _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
                _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
            ];
            (d, _mm_setzero_si128(), chunks)
        }
    }
}

/// One Q8_0 group's 8 dot products and error bounds (`sum_b norm_rb * d_b / 2`, zero for a
/// source without norms). `PAIRED`: activations within +-63, so the 16-bit sums of two
/// chunks stay below 2 x 2 x 128 x 63 = 32256 and one `madd` serves two `maddubs` (the
/// integer multiplier is Zen 1's bottleneck; the LM head, which recomputes its maximum
/// exactly); else full 8-bit activations and a `madd` per `maddubs`.
#[inline(always)]
unsafe fn group_q8<const PAIRED: bool, S: Q8Source>(
    src: &S,
    blocks: usize,
    x: &Q8Row,
) -> (__m256, __m256) {
    // SAFETY: caller: `src` has `blocks` blocks; x holds `blocks` activation blocks.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let (mut even, mut odd, mut err) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let xq = x.qs.as_ptr() as *const u8;
        for b in 0..blocks {
            let (d_bits, norm_bits, chunks) = src.block(b);
            let xb = xq.add(b * QK);
            let mut ints = _mm256_setzero_si256();
            let mut sum16 = _mm256_setzero_si256();
            for (j, w) in chunks.into_iter().enumerate() {
                let xv = _mm256_set1_epi32((xb.add(4 * j) as *const i32).read_unaligned());
                // maddubs wants one unsigned side: |w|, with w's sign moved onto x.
                let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                if PAIRED {
                    sum16 = _mm256_add_epi16(sum16, prod);
                    if j % 2 == 1 {
                        ints = _mm256_add_epi32(ints, _mm256_madd_epi16(sum16, ones));
                        sum16 = _mm256_setzero_si256();
                    }
                } else {
                    ints = _mm256_add_epi32(ints, _mm256_madd_epi16(prod, ones));
                }
            }
            let dx = *x.d.get_unchecked(b);
            let scale = _mm256_mul_ps(_mm256_cvtph_ps(d_bits), _mm256_set1_ps(dx));
            if b % 2 == 0 {
                even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, even);
            } else {
                odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, odd);
            }
            err = _mm256_fmadd_ps(_mm256_cvtph_ps(norm_bits), _mm256_set1_ps(0.5 * dx), err);
        }
        (_mm256_add_ps(even, odd), err)
    }
}
