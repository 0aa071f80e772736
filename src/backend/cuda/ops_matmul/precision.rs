//! [`GemmPrecision`]: how batches over 16 tokens multiply bf16/f16 weights, from
//! `SIRIUS_CUDA_GEMM` ([`GEMM_ENV`]) or given to `CudaBackend::with_gemm`.

use crate::error::{Error, Result};

/// The environment variable that picks [`GemmPrecision`] for `CudaBackend::new`.
pub const GEMM_ENV: &str = "SIRIUS_CUDA_GEMM";

/// How batches over 16 tokens are multiplied by bf16/f16 weights (see `gemm`'s module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// Activations rounded to the weights' 16-bit dtype, one cublasGemmEx with f32
    /// accumulation (`SIRIUS_CUDA_GEMM=bf16`, the default).
    #[default]
    Bf16,
    /// Weights converted to f32 block by block, SGEMM: the CPU's arithmetic
    /// (`SIRIUS_CUDA_GEMM=f32`).
    F32,
}

impl GemmPrecision {
    /// `bf16` or `f32`; anything else is an error that names the accepted values.
    pub fn parse(value: &str) -> Result<GemmPrecision> {
        match value {
            "bf16" => Ok(GemmPrecision::Bf16),
            "f32" => Ok(GemmPrecision::F32),
            other => Err(Error::InvalidArgument(format!(
                "{GEMM_ENV}={other:?}: expected `bf16` (16-bit activations, f32 accumulation: \
                 the default) or `f32` (the CPU's arithmetic, slower), or unset"
            ))),
        }
    }

    /// From `SIRIUS_CUDA_GEMM`; unset is the default ([`GemmPrecision::Bf16`]).
    pub fn from_env() -> Result<GemmPrecision> {
        match std::env::var(GEMM_ENV) {
            Ok(v) => GemmPrecision::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(GemmPrecision::default()),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidArgument(format!(
                "{GEMM_ENV}={v:?} is not UTF-8: expected `bf16` or `f32`, or unset"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::Bf16 => "bf16",
            GemmPrecision::F32 => "f32",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_precision_accepts_bf16_and_f32_only() {
        assert_eq!(GemmPrecision::parse("bf16").unwrap(), GemmPrecision::Bf16);
        assert_eq!(GemmPrecision::parse("f32").unwrap(), GemmPrecision::F32);
        assert_eq!(GemmPrecision::default(), GemmPrecision::Bf16);
        for bad in ["", "BF16", "fp32", "f16", " bf16"] {
            match GemmPrecision::parse(bad) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(GEMM_ENV) && msg.contains("`f32`"), "{msg}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
