//! Instruction-set tiers and their one-time selection.
//!
//! Release builds target the baseline x86-64 ISA, so every SIMD kernel is compiled with
//! `#[target_feature]` and reached only through the tier picked here at run time.

use std::sync::OnceLock;

/// A kernel tier. Ordered: a higher tier needs every feature of the lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust; also what non-x86 targets use.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell / Zen1 and later).
    Avx2,
    /// AVX-512 F/BW/VL on top of the AVX2 tier (Skylake-X / Zen4 and later).
    Avx512,
}

/// Environment variable that forces a lower tier (`scalar`, `avx2`, `avx512`).
pub const ISA_ENV: &str = "SIRIUS_CPU_ISA";

impl Isa {
    /// Every tier, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this machine can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => has_avx2(),
            Isa::Avx512 => has_avx512(),
        }
    }

    /// Tiers this machine can run, lowest first (tests and benches loop over these).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// Best tier of this machine.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2-fma-f16c",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" | "avx2-fma-f16c" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// The tier every dispatching kernel uses: the best supported one, lowered by `SIRIUS_CPU_ISA`.
/// Decided once per process; feature detection is not free and the answer never changes.
pub fn isa() -> Isa {
    static SELECTED: OnceLock<Isa> = OnceLock::new();
    *SELECTED.get_or_init(|| select(Isa::best(), std::env::var(ISA_ENV).ok().as_deref()))
}

/// `best` lowered to the tier named by `request` (the env var's value), if that is lower.
fn select(best: Isa, request: Option<&str>) -> Isa {
    let Some(req) = request else { return best };
    match Isa::parse(req) {
        Some(want) if want <= best => want,
        Some(want) => {
            tracing::warn!(
                "{ISA_ENV}={req}: {} is not supported here, using {}",
                want.name(),
                best.name()
            );
            best
        }
        None => {
            tracing::warn!(
                "{ISA_ENV}={req}: expected scalar|avx2|avx512, using {}",
                best.name()
            );
            best
        }
    }
}

/// Name of the selected tier, e.g. "avx512", "avx2-fma-f16c", "scalar".
pub fn isa_name() -> &'static str {
    isa().name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_request_only_lowers_the_tier() {
        assert_eq!(select(Isa::Avx512, None), Isa::Avx512);
        assert_eq!(select(Isa::Avx512, Some("scalar")), Isa::Scalar);
        assert_eq!(select(Isa::Avx512, Some(" AVX2 ")), Isa::Avx2);
        assert_eq!(select(Isa::Avx2, Some("avx512")), Isa::Avx2);
        assert_eq!(select(Isa::Avx2, Some("sse9")), Isa::Avx2);
    }

    #[test]
    fn selected_tier_is_supported() {
        assert!(isa().is_supported());
        assert!(Isa::available().contains(&isa()));
        assert_eq!(isa_name(), isa().name());
    }
}
