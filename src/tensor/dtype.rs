//! Element types of stored weights. Activations are always f32 on the CPU backend.

use std::fmt;

/// Storage type of a weight tensor as it sits in the checkpoint (and in memory: we keep the
/// checkpoint's type and convert or de-quantize on the fly inside the kernels).
///
/// The quantized types are ggml's block formats: a row is a sequence of fixed-size blocks,
/// each holding its scale(s) and packed integers (see `tensor::quant` for the layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 elements in 18 bytes: f16 scale, 4-bit values offset by -8.
    Q4_0,
    /// 32 elements in 20 bytes: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 elements in 34 bytes: f16 scale, 8-bit signed values.
    Q8_0,
    /// 256 elements in 144 bytes: 8 sub-blocks of 32 with 6-bit scales and minimums, 4-bit values.
    Q4K,
    /// 256 elements in 176 bytes: Q4K with a fifth bit per value.
    Q5K,
    /// 256 elements in 210 bytes: 16 sub-blocks of 16 with 8-bit scales, 6-bit values.
    Q6K,
}

impl DType {
    /// `(elements, bytes)` of one block (1 element for the float types).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q8_0 => (32, 34),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
        }
    }

    /// Whether values are stored in quantized blocks.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes of `elements` values; for a quantized type `elements` is a whole number of
    /// blocks (a row's length: [`DType::fits_row`] checked it).
    pub fn bytes_for(self, elements: usize) -> usize {
        let (n, bytes) = self.block();
        elements / n * bytes
    }

    /// Bytes per element of a float type. The float kernels use it; quantized matrices never
    /// reach them (the backends route those to their quantized kernels), and for a quantized
    /// type it is 0.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            _ => 0,
        }
    }

    /// Whether a row of `cols` values is a whole number of blocks.
    pub fn fits_row(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block().0)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
        })
    }
}

/// How a KV cache stores its rows. f16 halves the bytes every attention step reads (and the
/// cache's memory) at a rounding of each key and value to 11 significant bits; f32 keeps
/// them as computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDType {
    F32,
    #[default]
    F16,
}

impl KvDType {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }

    /// The element type as a tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            KvDType::F32 => DType::F32,
            KvDType::F16 => DType::F16,
        }
    }
}

impl fmt::Display for KvDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.dtype(), f)
    }
}

impl std::str::FromStr for KvDType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvDType::F16),
            "f32" => Ok(KvDType::F32),
            _ => Err(format!("'{s}' is not a KV cache type: use f16 or f32")),
        }
    }
}
