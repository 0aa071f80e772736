//! The corrector's settings and what they imply for a request's buffers.

use crate::error::{Error, Result};

/// Widest tree accepted: the paper tunes W in {1, 2, 4, 6, 8}; wider trees make the
/// verification pass ((K - 1) * W + 1 tokens) cost more than they gain.
pub const MAX_WIDTH: usize = 16;
/// Longest window accepted (the paper uses K = 16): the verification pass holds logits for
/// every window token, so an absurd K would only ask for absurd memory.
pub const MAX_PERIOD: usize = 256;

/// The corrector's settings (`--period --threshold --accept-temperature --width`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiriusConfig {
    /// Window (kernel) size K: K - 1 drafted tokens per verification (with `adaptive`, the
    /// longest window).
    pub period: usize,
    /// Each window's K chosen in `1..=period` from measured acceptance and costs
    /// (`--period auto`, [`crate::sirius::adaptive`]); the chain only.
    pub adaptive: bool,
    /// Acceptance threshold on the full model's probability of a drafted token.
    pub threshold: f32,
    /// Temperature of that probability (T = 0.6 in the paper).
    pub accept_temperature: f32,
    /// Tree width W: 1 is the chain; W > 1 drafts W beams verified as one tree of
    /// (K - 1) * W + 1 tokens.
    pub width: usize,
}

impl Default for SiriusConfig {
    /// The paper's accuracy settings: K = 16, threshold 0.1, T = 0.6, the chain.
    fn default() -> Self {
        SiriusConfig {
            period: 16,
            threshold: 0.1,
            accept_temperature: 0.6,
            width: 1,
            adaptive: false,
        }
    }
}

impl SiriusConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PERIOD).contains(&self.period) {
            return Err(Error::InvalidArgument(format!(
                "--period must be between 1 and {MAX_PERIOD}, got {}",
                self.period
            )));
        }
        // Above 1 no draft is ever accepted: the full model alone, which tests and
        // comparisons use.
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "--threshold must be finite and >= 0, got {}",
                crate::units::format_number(self.threshold)
            )));
        }
        if !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(Error::InvalidArgument(format!(
                "--width must be between 1 and {MAX_WIDTH}, got {}",
                self.width
            )));
        }
        if self.adaptive && self.width > 1 {
            return Err(Error::InvalidArgument(
                "--period auto chooses the windows of the chain: use it with --width 1, or give \
                 a tree a fixed --period"
                    .into(),
            ));
        }
        if !(self.accept_temperature.is_finite() && self.accept_temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "--accept-temperature must be positive, got {}",
                crate::units::format_number(self.accept_temperature)
            )));
        }
        Ok(())
    }

    /// Cache rows a request needs beyond plain decoding's: the last window's full-model
    /// token (plain decoding never feeds its final token back), plus a tree's pruned
    /// branches until the verification compacts them away (their positions are depths, so
    /// they never pass the context). Without these the last windows would shrink.
    pub fn extra_cache_rows(&self) -> usize {
        1 + (self.period - 1) * (self.width - 1)
    }

    /// Rows of the draft batch (one per beam) and of the verification window, for a cache
    /// of `capacity` rows (a window never holds more tokens than the cache has rows).
    pub fn batch_rows(&self, capacity: usize) -> (usize, usize) {
        let width = self.width.clamp(1, capacity.max(1));
        let window = ((self.period.max(1) - 1) * width + 1).min(capacity.max(1));
        (width, window)
    }
}

/// A window setting as given on the command line: a fixed K (`16`), or adaptive windows of
/// at most the default K (`auto`) or of at most N (`auto:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Fixed(usize),
    Auto(usize),
}

impl Period {
    /// `config` with this window setting.
    pub fn apply(self, config: SiriusConfig) -> SiriusConfig {
        match self {
            Period::Fixed(period) => SiriusConfig {
                period,
                adaptive: false,
                ..config
            },
            Period::Auto(period) => SiriusConfig {
                period,
                adaptive: true,
                ..config
            },
        }
    }

    /// The setting of `config`.
    pub fn of(config: &SiriusConfig) -> Period {
        match config.adaptive {
            true => Period::Auto(config.period),
            false => Period::Fixed(config.period),
        }
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let count = |text: &str| {
            text.trim().parse::<usize>().map_err(|_| {
                format!("a window is a count of tokens (e.g. 16), auto or auto:MAX; got {s:?}")
            })
        };
        match s.trim().strip_prefix("auto") {
            Some("") => Ok(Period::Auto(SiriusConfig::default().period)),
            Some(rest) => match rest.strip_prefix(':') {
                Some(max) => count(max).map(Period::Auto),
                None => count(s).map(Period::Fixed),
            },
            None => count(s).map(Period::Fixed),
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Period::Fixed(k) => write!(f, "{k}"),
            Period::Auto(k) if k == SiriusConfig::default().period => write!(f, "auto"),
            Period::Auto(k) => write!(f, "auto:{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_print_back() {
        for (text, period) in [
            ("16", Period::Fixed(16)),
            ("auto", Period::Auto(16)),
            ("auto:32", Period::Auto(32)),
        ] {
            assert_eq!(text.parse::<Period>(), Ok(period));
            assert_eq!(period.to_string(), text);
        }
        for bad in ["", "auto:", "autox", "-1", "auto:x", "4.5"] {
            assert!(bad.parse::<Period>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn an_adaptive_tree_is_refused() {
        let config = Period::Auto(8).apply(SiriusConfig {
            width: 2,
            ..SiriusConfig::default()
        });
        let err = config.validate().map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("--period auto"), "{err}");
    }
}
