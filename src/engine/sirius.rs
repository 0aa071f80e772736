//! Sirius generation: a request whose steps are correction windows ([`Corrector`]) over the
//! Llama forward ([`LlamaSirius`]: in memory, or offloaded), and [`correct`], the same loop
//! over any [`SiriusModel`].

use crate::backend::SparseOps;
use crate::engine::decode::{decode, Decoded, Decoder, Prefilled, Request, RequestReport};
use crate::engine::llama_sirius::{LlamaSirius, Weights};
use crate::engine::output::SiriusReport;
use crate::error::{Error, Result};
use crate::sirius::{Corrector, SiriusConfig, SiriusModel};

/// Greedy Sirius generation over the Llama forward (weights where `W` says).
pub struct SiriusRequest<'m, B: SparseOps, W: Weights<B>> {
    pub model: LlamaSirius<'m, B, W>,
    corrector: Corrector,
}

impl<'m, B: SparseOps, W: Weights<B>> SiriusRequest<'m, B, W> {
    pub fn new(
        model: LlamaSirius<'m, B, W>,
        config: SiriusConfig,
        stop_ids: &[u32],
    ) -> Result<Self> {
        Ok(SiriusRequest {
            model,
            corrector: Corrector::new(config, stop_ids)?,
        })
    }
}

impl<B: SparseOps, W: Weights<B>> Decoder for SiriusRequest<'_, B, W> {
    fn room(&self) -> usize {
        self.model.cache_room()
    }

    fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>> {
        self.corrector.window(&mut self.model, last, budget)
    }
}

impl<B: SparseOps, W: Weights<B>> Request for SiriusRequest<'_, B, W> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        self.model.prefill(prompt, chunk, progress)
    }

    fn report(&mut self, decoded: &Decoded) -> Result<RequestReport> {
        let stats = &self.corrector.stats;
        let config = *self.corrector.config();
        let sparsity = self.model.sparsity_report();
        let report = SiriusReport {
            period: config.period,
            width: config.width,
            verifications: stats.verifications,
            aal: stats.aal(),
            effective_density: stats.effective_density(config.period, sparsity.density),
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
        Ok(RequestReport {
            offload: self
                .model
                .offload_report(report.aal.max(1.0), ms_per_token)?,
            sparsity,
            sirius: Some(report),
        })
    }
}

/// Greedy Sirius generation after a prompt already in `model`'s cache (`first`: the full
/// model's token after it), through the one decode loop: at most `max_tokens` tokens
/// (`first` included), ending at a stop id (not included) met at a verification boundary or
/// a full cache. Returns the tokens and the corrector's statistics.
pub fn correct(
    model: &mut dyn SiriusModel,
    first: u32,
    stop_ids: &[u32],
    corrector: Corrector,
    max_tokens: usize,
) -> Result<(Vec<u32>, crate::sirius::CorrectionStats)> {
    struct Windows<'a> {
        model: &'a mut dyn SiriusModel,
        corrector: Corrector,
    }
    impl Decoder for Windows<'_> {
        fn room(&self) -> usize {
            self.model.cache_room()
        }
        fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>> {
            self.corrector.window(&mut *self.model, last, budget)
        }
    }
    let mut windows = Windows { model, corrector };
    let decoded = decode(&mut windows, first, max_tokens, stop_ids, &mut |_| Ok(None))?;
    Ok((decoded.ids, windows.corrector.stats))
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
