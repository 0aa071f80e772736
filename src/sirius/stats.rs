//! Correction statistics (AAL, effective density).

use serde::Serialize;

/// AAL and friends (see the module doc of `crate::sirius`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CorrectionStats {
    pub verifications: usize,
    /// Sum over verifications of the accepted drafts plus the full model's token (n + 1).
    pub advanced: usize,
    /// Drafted tokens thrown away by rollbacks.
    pub rollback_tokens: usize,
    pub drafted: usize,
    /// Sum over windows of their K (x0 and the chain's drafts; a tree's depth + 1).
    pub window_tokens: usize,
    /// Seconds in sparse draft steps and in full verification passes.
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

impl CorrectionStats {
    /// Average advance length per verification.
    pub fn aal(&self) -> f64 {
        if self.verifications == 0 {
            0.0
        } else {
            self.advanced as f64 / self.verifications as f64
        }
    }

    /// ((K - 1) * D_sparse + 1) / AAL.
    pub fn effective_density(&self, period: usize, sparse_density: f64) -> f64 {
        effective_density(period as f64, sparse_density, self.aal())
    }

    /// Mean K of the windows (K itself unless windows vary or the budget shortened some).
    pub fn mean_period(&self) -> f64 {
        match self.verifications {
            0 => 0.0,
            v => self.window_tokens as f64 / v as f64,
        }
    }

    /// The K the effective density is taken at: `config`'s, or the windows' mean with
    /// `--period auto`.
    pub fn density_period(&self, config: &crate::sirius::SiriusConfig) -> f64 {
        match config.adaptive {
            true => self.mean_period(),
            false => config.period as f64,
        }
    }
}

/// ((K - 1) * density + 1) / AAL (the Sirius paper's metric): the fraction of the parameters read
/// per produced token; 1 without verifications. K may be a mean (adaptive windows).
pub fn effective_density(period: f64, density: f64, aal: f64) -> f64 {
    if aal > 0.0 {
        ((period - 1.0) * density + 1.0) / aal
    } else {
        1.0
    }
}
