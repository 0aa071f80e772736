//! The CPU backend's KV cache buffers: one layer's keys or values in host memory, as f32 or
//! as f16 bits (half the bytes attention reads per step; see `tensor::KvDType`).

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::checks;
use super::cpu::KvSlice;
use crate::error::{Error, Result};
use crate::tensor::KvDType;

/// One layer's keys or values.
#[derive(Debug, Clone)]
pub enum CpuKv {
    F32(Vec<f32>),
    /// IEEE half floats as their bits.
    F16(Vec<u16>),
}

impl CpuKv {
    /// `len` zeroed elements of `dtype`.
    pub fn zeroed(len: usize, dtype: KvDType) -> CpuKv {
        match dtype {
            KvDType::F32 => CpuKv::F32(vec![0.0; len]),
            KvDType::F16 => CpuKv::F16(vec![0; len]),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> KvDType {
        match self {
            CpuKv::F32(_) => KvDType::F32,
            CpuKv::F16(_) => KvDType::F16,
        }
    }

    /// The elements as the attention kernels read them.
    pub fn view(&self) -> KvSlice<'_> {
        match self {
            CpuKv::F32(d) => KvSlice::F32(d),
            CpuKv::F16(d) => KvSlice::F16(d),
        }
    }

    /// Elements `start..start + out.len()` as f32 (tests, inspection).
    pub fn read(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let end = start
            .checked_add(out.len())
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "read of {} elements from {start} past a KV buffer of {}",
                    out.len(),
                    self.len()
                ))
            })?;
        match self {
            CpuKv::F32(d) => out.copy_from_slice(&d[start..end]),
            CpuKv::F16(d) => {
                for (o, &b) in out.iter_mut().zip(&d[start..end]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
        }
        Ok(())
    }

    /// `Backend::store_kv`: f32 rows of `src` into rows `dst_row..` of this buffer.
    pub fn store(
        &mut self,
        src: &[f32],
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        let (s, d, n) = checks::row_copy_range(src.len(), 0, self.len(), dst_row, n_rows, row_len)?;
        match self {
            CpuKv::F32(dst) => dst[d..d + n].copy_from_slice(&src[s..s + n]),
            // half converts with F16C where the CPU has it (rounding to nearest even either way).
            CpuKv::F16(dst) => dst[d..d + n]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(&src[s..s + n]),
        }
        Ok(())
    }

    /// `Backend::copy_kv_rows`: this buffer's first rows from `src`'s.
    pub fn copy_from(&mut self, src: &CpuKv, n_rows: usize, row_len: usize) -> Result<()> {
        let (s, d, n) = checks::row_copy_range(src.len(), 0, self.len(), 0, n_rows, row_len)?;
        match (self, src) {
            (CpuKv::F32(dst), CpuKv::F32(src)) => dst[d..d + n].copy_from_slice(&src[s..s + n]),
            (CpuKv::F16(dst), CpuKv::F16(src)) => dst[d..d + n].copy_from_slice(&src[s..s + n]),
            (dst, src) => {
                return Err(Error::InvalidArgument(format!(
                    "cannot copy {} KV rows into a {} KV buffer",
                    src.dtype(),
                    dst.dtype()
                )))
            }
        }
        Ok(())
    }

    /// `Backend::move_kv_rows`: rows `src_row..` moved down to `dst_row..`.
    pub fn move_rows(
        &mut self,
        src_row: usize,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        let (s, n) = (src_row * row_len, n_rows * row_len);
        if dst_row > src_row || s + n > self.len() {
            return Err(Error::InvalidArgument(format!(
                "move of {n_rows} rows of {row_len} from row {src_row} to row {dst_row} in a KV \
                 buffer of {} elements",
                self.len()
            )));
        }
        match self {
            CpuKv::F32(d) => d.copy_within(s..s + n, dst_row * row_len),
            CpuKv::F16(d) => d.copy_within(s..s + n, dst_row * row_len),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rows_round_to_nearest_and_move_and_copy_as_stored() {
        let src: Vec<f32> = (0..12).map(|i| 1.0 + i as f32 / 3.0).collect();
        let mut kv = CpuKv::zeroed(4 * 3, KvDType::F16);
        kv.store(&src, 1, 3, 3).unwrap();
        let mut got = vec![0.0; 12];
        kv.read(0, &mut got).unwrap();
        assert_eq!(&got[..3], &[0.0; 3]);
        for (g, s) in got[3..].iter().zip(&src) {
            assert_eq!(*g, f16::from_f32(*s).to_f32());
            assert!((g - s).abs() <= s.abs() / 1024.0, "{g} vs {s}");
        }
        kv.move_rows(2, 0, 2, 3).unwrap();
        let mut moved = vec![0.0; 6];
        kv.read(0, &mut moved).unwrap();
        assert_eq!(moved, got[6..12]);
        let mut copy = CpuKv::zeroed(12, KvDType::F16);
        copy.copy_from(&kv, 4, 3).unwrap();
        assert_eq!(copy.view().bytes(), kv.view().bytes());
        assert!(copy
            .copy_from(&CpuKv::zeroed(12, KvDType::F32), 1, 3)
            .is_err());
        assert!(kv.move_rows(0, 1, 1, 3).is_err(), "moves only go down");
        assert!(kv.store(&src, 3, 2, 3).is_err(), "past the end");
    }
}
