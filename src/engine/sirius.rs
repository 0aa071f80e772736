//! Sirius generation: a request whose steps are correction windows ([`Corrector`]) over the
//! Llama forward ([`LlamaSirius`]: in memory, or offloaded), and [`correct`], the same loop
//! over any [`SiriusModel`].

use crate::backend::{DeviceCounts, SparseOps};
use crate::engine::decode::{decode, Decoded, Decoder, Prefilled, Request, RequestReport};
use crate::engine::llama_sirius::{LlamaSirius, Residency};
use crate::engine::output::SiriusReport;
use crate::error::{Error, Result};
use crate::sirius::{effective_density, CorrectionStats, Corrector, SiriusConfig, SiriusModel};

/// Greedy Sirius generation: correction windows over `M` (the Llama forward in
/// [`Engine::generate`](crate::engine::Engine::generate), any [`SiriusModel`] in [`correct`]).
pub struct SiriusRequest<M: SiriusModel> {
    pub model: M,
    corrector: Corrector,
}

impl<M: SiriusModel> SiriusRequest<M> {
    pub fn new(model: M, config: SiriusConfig, stop_ids: &[u32]) -> Result<Self> {
        Ok(SiriusRequest {
            model,
            corrector: Corrector::new(config, stop_ids)?,
        })
    }
}

impl<M: SiriusModel> SiriusRequest<M> {
    /// Adaptive windows start from these predicted seconds per window length.
    pub fn prime_windows(&mut self, predicted: &[(usize, f64)]) {
        self.corrector.prime_windows(predicted);
    }
}

impl<M: SiriusModel> Decoder for SiriusRequest<M> {
    fn room(&self) -> usize {
        self.model.cache_room()
    }

    fn device_counts(&self) -> Option<DeviceCounts> {
        self.model.device_counts()
    }

    fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>> {
        self.corrector.window(&mut self.model, last, budget)
    }
}

impl<B: SparseOps, W: Residency<B>> Request for SiriusRequest<LlamaSirius<'_, B, W>> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        self.model.prefill(prompt, chunk, progress)
    }

    fn report(&mut self, decoded: &Decoded) -> Result<RequestReport> {
        let stats = &self.corrector.stats;
        let config = *self.corrector.config();
        let sparsity = self.model.sparsity_report();
        let report = SiriusReport {
            period: config.period,
            adaptive: config.adaptive,
            mean_period: stats.mean_period(),
            width: config.width,
            verifications: stats.verifications,
            aal: stats.aal(),
            effective_density: effective_density(
                stats.density_period(&config),
                sparsity.density,
                stats.aal(),
            ),
            rollback_tokens: stats.rollback_tokens,
            draft_seconds: stats.draft_seconds,
            verify_seconds: stats.verify_seconds,
            other_seconds: (decoded.step_seconds - stats.draft_seconds - stats.verify_seconds)
                .max(0.0),
        };
        let produced = decoded.ids.len().saturating_sub(1);
        let ms_per_token = match produced {
            0 => 0.0,
            n => 1e3 * decoded.step_seconds / n as f64,
        };
        let mut offload =
            self.model
                .offload_report(report.aal.max(1.0), window_period(&report), ms_per_token)?;
        if let Some(o) = offload.as_mut() {
            o.launches_per_token = decoded.launches_per_token(true);
        }
        Ok(RequestReport {
            offload,
            sparsity,
            sirius: Some(report),
        })
    }
}

/// The K a request's windows had: the configured one, or the mean of adaptive windows
/// (rounded; at least 1).
fn window_period(report: &SiriusReport) -> usize {
    match report.adaptive {
        true => (report.mean_period.round() as usize).clamp(1, report.period.max(1)),
        false => report.period,
    }
}

/// Greedy Sirius generation after a prompt already in `model`'s cache (`first`: the full
/// model's token after it), through the one decode loop: at most `max_tokens` tokens
/// (`first` included), ending at one of the corrector's stop ids (not included) met at a
/// verification boundary or a full cache. Returns the tokens and the corrector's statistics.
pub fn correct(
    model: &mut dyn SiriusModel,
    first: u32,
    corrector: Corrector,
    max_tokens: usize,
) -> Result<(Vec<u32>, CorrectionStats)> {
    let stop_ids = corrector.stop_ids().to_vec();
    let mut request = SiriusRequest { model, corrector };
    let decoded = decode(&mut request, first, max_tokens, &stop_ids, &mut |_| {
        Ok(None)
    })?;
    Ok((decoded.ids, request.corrector.stats))
}

/// Sirius decodes greedily (as the paper does): a sampling temperature is refused.
pub fn check_greedy(temperature: f32) -> Result<()> {
    if temperature != 0.0 {
        return Err(Error::InvalidArgument(
            "--sirius decodes greedily (as the paper does): add --temperature 0".into(),
        ));
    }
    Ok(())
}
