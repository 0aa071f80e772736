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
        effective_density(period, sparse_density, self.aal())
    }
}

/// ((K - 1) * density + 1) / AAL (the Sirius paper's metric): the fraction of the parameters read
/// per produced token; 1 without verifications.
pub fn effective_density(period: usize, density: f64, aal: f64) -> f64 {
    if aal > 0.0 {
        ((period as f64 - 1.0) * density + 1.0) / aal
    } else {
        1.0
    }
}
