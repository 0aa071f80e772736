//! The corrector as the Sirius tests drive it: its settings and a token budget in one
//! struct, and the engine's decode loop over a `SiriusModel` (a scripted fake, or the model).

use sirius_offload::engine::sirius::correct as run_windows;
use sirius_offload::sirius::{CorrectionStats, Corrector, SiriusConfig, SiriusModel};
use sirius_offload::Result;

#[derive(Debug, Clone, Copy)]
pub struct CorrectorOptions {
    pub period: usize,
    pub threshold: f32,
    pub accept_temperature: f32,
    pub width: usize,
    pub max_tokens: usize,
}

impl CorrectorOptions {
    pub fn config(&self) -> SiriusConfig {
        SiriusConfig {
            period: self.period,
            threshold: self.threshold,
            accept_temperature: self.accept_temperature,
            width: self.width,
            adaptive: false,
        }
    }
}

/// Sirius after a prompt already in `m`'s cache: the chain for width 1, the tree for wider.
pub fn correct(
    m: &mut dyn SiriusModel,
    first: u32,
    stop: &[u32],
    o: &CorrectorOptions,
) -> Result<(Vec<u32>, CorrectionStats)> {
    run_windows(m, first, Corrector::new(o.config(), stop)?, o.max_tokens)
}

/// [`correct`] through tree windows whatever the width.
pub fn correct_tree(
    m: &mut dyn SiriusModel,
    first: u32,
    stop: &[u32],
    o: &CorrectorOptions,
) -> Result<(Vec<u32>, CorrectionStats)> {
    let corrector = Corrector::new(o.config(), stop)?.with_tree_windows();
    run_windows(m, first, corrector, o.max_tokens)
}

/// [`correct`] with adaptive windows of at most `o.period` tokens (`--period auto:K`).
#[allow(dead_code)]
pub fn correct_adaptive(
    m: &mut dyn SiriusModel,
    first: u32,
    stop: &[u32],
    o: &CorrectorOptions,
) -> Result<(Vec<u32>, CorrectionStats)> {
    let config = sirius_offload::sirius::Period::Auto(o.period).apply(o.config());
    run_windows(m, first, Corrector::new(config, stop)?, o.max_tokens)
}

/// How far layer `li` of two caches' first `len` rows differ beyond what storing them
/// rounds: rows computed apart differ by float noise, and an f16 cache may round the two to
/// neighbouring values (one f16 step, at most |x| / 1024).
pub fn cache_layer_excess<B: sirius_offload::backend::Backend>(
    backend: &B,
    a: &sirius_offload::model::KvCache<B>,
    b: &sirius_offload::model::KvCache<B>,
    li: usize,
    len: usize,
    kv_dim: usize,
) -> f32 {
    let read = |buf: &B::KvBuf| {
        let mut out = vec![0.0; len * kv_dim];
        backend.read_kv(buf, 0, &mut out).unwrap();
        out
    };
    let step = |y: f32| match b.dtype() {
        sirius_offload::tensor::KvDType::F16 => y.abs() / 1024.0,
        sirius_offload::tensor::KvDType::F32 => 0.0,
    };
    let ((ak, av), (bk, bv)) = (a.layer(li).unwrap(), b.layer(li).unwrap());
    [(ak, bk), (av, bv)]
        .into_iter()
        .flat_map(|(x, y)| {
            let (x, y) = (read(x), read(y));
            x.into_iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs() - step(q))
                .collect::<Vec<_>>()
        })
        .fold(0.0f32, f32::max)
}
