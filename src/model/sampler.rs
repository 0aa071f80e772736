//! Next-token choice: greedy, or temperature with top-k / top-p, reproducible with a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The greedy rule lives with the backends, which pick greedy tokens where the logits are
/// (`Backend::argmax_rows`); this is the same function.
pub use crate::backend::argmax::argmax;
/// Acceptance's probability rule and per-row verdicts, which a backend may compute where
/// the logits are (`Backend::row_verdicts`).
pub use crate::backend::argmax::{token_probability, RowVerdict};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "--temperature must be >= 0, got {}",
                crate::units::format_number(self.temperature)
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--top-p must be in (0, 1], got {}",
                crate::units::format_number(self.top_p)
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// (logit, id) scratch reused across calls.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            candidates: Vec::new(),
        })
    }

    /// Whether every pick is the argmax of the logits (temperature 0, or a top-k of 1): the
    /// caller may then ask the backend for the argmax instead of reading the logits.
    pub fn is_greedy(&self) -> bool {
        let p = self.params;
        // Below ~1e-6 dividing by T overflows to inf; such a temperature means greedy anyway.
        p.temperature < 1e-6 || p.top_k == 1
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if self.is_greedy() {
            return argmax(logits);
        }
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        // Shift by the max before scaling so nothing overflows; NaN counts as impossible.
        c.extend(logits.iter().enumerate().map(|(i, &l)| {
            let scaled = if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                (l - max) / p.temperature
            };
            (scaled, i as u32)
        }));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        let mut total = 0.0f32;
        for cand in c.iter_mut() {
            cand.0 = cand.0.exp();
            total += cand.0;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, cand) in c.iter().enumerate() {
                cum += cand.0 / total;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|x| x.0).sum();
        }
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits);
        }
        let mut r = self.rng.gen::<f32>() * total;
        for cand in c.iter() {
            r -= cand.0;
            if r <= 0.0 {
                return cand.1;
            }
        }
        // Rounding left a sliver of r: the most likely candidate is the safe answer.
        c[0].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert!(s.is_greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
        assert!(Sampler::new(params(1e-7, 0, 1.0, 0)).unwrap().is_greedy());
        assert!(Sampler::new(params(0.8, 1, 1.0, 0)).unwrap().is_greedy());
        assert!(!Sampler::new(params(0.8, 0, 1.0, 0)).unwrap().is_greedy());
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = params(1.0, 0, 1.0, 7);
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(
            run().iter().any(|&t| t != run()[0]),
            "sampling at T=1 should vary"
        );
    }

    #[test]
    fn top_k_limits_choices() {
        let params = params(5.0, 2, 1.0, 1);
        let mut s = Sampler::new(params).unwrap();
        let logits = [0.0, 5.0, 4.9, 0.1, 0.2];
        for _ in 0..200 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 2, "{t}");
        }
    }

    #[test]
    fn top_p_keeps_nucleus() {
        let params = params(1.0, 0, 0.5, 3);
        let mut s = Sampler::new(params).unwrap();
        let logits = [10.0, 0.0, 0.0, 0.0];
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn nan_logits_and_tiny_temperatures_pick_the_likely_token() {
        let mut logits = vec![0.0f32; 64];
        logits[5] = 20.0;
        logits[9] = f32::NAN;
        logits[11] = -f32::NAN;
        for (temperature, top_k) in [(1.0, 0), (1.0, 40), (1e-39, 0), (1e-7, 0)] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                top_k,
                top_p: 1.0,
                seed: 2,
            })
            .unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits), 5, "T={temperature} top_k={top_k}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
    }

    #[test]
    fn bad_params_are_errors() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::greedy()
        })
        .is_err());
    }

    /// Rows of logits with ties, NaN, -inf and all-NaN / all -inf rows (`[rows, vocab]`).
    fn awkward_rows(vocab: usize) -> Vec<f32> {
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let ramp = |i: usize| ((i * 37) % 101) as f32 * 0.25 - 9.0;
        let mut tie = (0..vocab).map(ramp).collect::<Vec<_>>();
        (tie[3], tie[vocab - 2]) = (1e3, 1e3);
        rows.push(tie);
        let mut nan = (0..vocab).map(ramp).collect::<Vec<_>>();
        (nan[0], nan[7], nan[vocab - 1]) = (f32::NAN, f32::NAN, 2e3);
        rows.push(nan);
        rows.push(vec![f32::NEG_INFINITY; vocab]);
        rows.push(vec![f32::NAN; vocab]);
        let mut one = vec![f32::NEG_INFINITY; vocab];
        one[vocab / 2] = -1e30;
        rows.push(one);
        let mut inf = (0..vocab).map(ramp).collect::<Vec<_>>();
        (inf[5], inf[9]) = (f32::INFINITY, f32::INFINITY);
        rows.push(inf);
        rows.concat()
    }

    /// The backend's greedy pick (what the engine's greedy path uses) is the sampler's.
    #[test]
    fn backend_argmax_rows_equal_the_samplers_argmax() {
        use crate::backend::{Backend, CpuBackend};
        let b = CpuBackend::new(1);
        let vocab = 50;
        let x = awkward_rows(vocab);
        let rows = x.len() / vocab;
        let want: Vec<u32> = x.chunks_exact(vocab).map(argmax).collect();
        assert_eq!(want, vec![3, 49, 0, 0, 25, 5]);
        // A buffer larger than the rows asked for (scratch is): the rest is not read.
        let mut buf = x.clone();
        buf.extend([f32::NAN; 50]);
        assert_eq!(b.argmax_rows(&buf, rows, vocab).unwrap(), want);
        let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
        for (row, &id) in x.chunks_exact(vocab).zip(&want) {
            assert_eq!(greedy.sample(row), id);
        }
        assert!(b.argmax_rows(&x, rows + 2, vocab).is_err());
        assert_eq!(b.argmax_rows(&x, 0, vocab).unwrap(), Vec::<u32>::new());
    }
}
