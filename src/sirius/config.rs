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
    /// Window (kernel) size K: K - 1 drafted tokens per verification.
    pub period: usize,
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
        if !self.threshold.is_finite() || self.threshold < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "--threshold must be finite and >= 0, got {}",
                self.threshold
            )));
        }
        if !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(Error::InvalidArgument(format!(
                "--width must be between 1 and {MAX_WIDTH}, got {}",
                self.width
            )));
        }
        if !(self.accept_temperature.is_finite() && self.accept_temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "--accept-temperature must be positive, got {}",
                self.accept_temperature
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
