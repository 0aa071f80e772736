//! A borrowed view of one checkpoint tensor: its bytes stay in the memory-mapped file.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use memmap2::Mmap;

use super::DType;

/// One tensor of a memory-mapped checkpoint: name, stored dtype, shape and byte range.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The file it lives in (for error messages).
    pub path: PathBuf,
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl TensorRef {
    /// A view of bytes `range` of `map` (the caller checked that they hold `shape` of `dtype`).
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        path: PathBuf,
        map: Arc<Mmap>,
        range: Range<usize>,
    ) -> Self {
        TensorRef {
            name,
            dtype,
            shape,
            path,
            map,
            range,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// The tensor's values as f32 (small tensors: norms, biases; the conversion is exact, or
    /// the de-quantized values).
    pub fn to_f32(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            DType::F32 => (bytes.chunks_exact(4))
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => (bytes.chunks_exact(2))
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => (bytes.chunks_exact(2))
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            quantized => {
                let n = self.shape.iter().product();
                let mut out = vec![0.0; n];
                // The store checked the byte length against the shape; a mismatch leaves 0s.
                if !super::quant::dequantize(quantized, bytes, &mut out) {
                    out.fill(0.0);
                }
                out
            }
        }
    }

    /// The first value that is NaN or infinite, as (element index, value), reading the
    /// tensor in pieces (a quantized one de-quantized a run of blocks at a time), or `None`.
    /// `on_bytes` is told how many bytes each piece held (a progress bar).
    pub fn first_non_finite(&self, mut on_bytes: impl FnMut(u64)) -> Option<(usize, f32)> {
        const PIECE_BLOCKS: usize = 1 << 14;
        let (block_elems, block_bytes) = self.dtype.block();
        let mut out = vec![0.0f32; PIECE_BLOCKS * block_elems];
        let mut at = 0;
        for piece in self.bytes().chunks(PIECE_BLOCKS * block_bytes) {
            let n = piece.len() / block_bytes * block_elems;
            let values = &mut out[..n];
            // A piece of partial blocks cannot be read: the store checked whole tensors.
            if !super::quant::dequantize(self.dtype, piece, values) {
                return None;
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Some((at + i, values[i]));
            }
            at += n;
            on_bytes(piece.len() as u64);
        }
        None
    }

    /// The shared mapping and byte range, for backends that keep the weight in place.
    pub fn mapping(&self) -> (Arc<Mmap>, Range<usize>) {
        (Arc::clone(&self.map), self.range.clone())
    }
}
