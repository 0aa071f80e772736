//! Rotary position embedding frequencies, including Llama 3.1 "llama3" and linear scaling.

use crate::config::{ModelConfig, RopeScaling};

/// Per-pair inverse frequencies of one head (head_dim / 2 of them). Pair i rotates elements
/// (i, i + head_dim/2): the Hugging Face "rotate_half" convention.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
}

impl RopeTable {
    pub fn new(config: &ModelConfig) -> RopeTable {
        let hd = config.head_dim;
        let base = config.rope_theta as f64;
        let mut inv_freq: Vec<f64> = (0..hd / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / hd as f64)).collect();
        match &config.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for f in &mut inv_freq {
                    *f /= *factor as f64;
                }
            }
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                // Wavelengths longer than original_ctx / low_freq_factor are slowed by `factor`;
                // shorter than original_ctx / high_freq_factor are kept; in between, blended.
                let (factor, low, high) = (*factor as f64, *low_freq_factor as f64, *high_freq_factor as f64);
                let old_ctx = *original_max_position_embeddings as f64;
                let low_wavelen = old_ctx / low;
                let high_wavelen = old_ctx / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        RopeTable { head_dim: hd, inv_freq: inv_freq.into_iter().map(|f| f as f32).collect() }
    }

    /// Rotates `n_heads` heads of one row in place, at position `pos`. `cos_sin` is scratch of
    /// head_dim floats (cos then sin of each pair).
    pub fn rotate_row(&self, row: &mut [f32], n_heads: usize, pos: usize, cos_sin: &mut [f32]) {
        let half = self.head_dim / 2;
        let (cos, sin) = cos_sin.split_at_mut(half);
        for i in 0..half {
            // f64 angle: positions reach 10^5 and f32 products lose the low bits there.
            let angle = pos as f64 * self.inv_freq[i] as f64;
            cos[i] = angle.cos() as f32;
            sin[i] = angle.sin() as f32;
        }
        for h in 0..n_heads {
            let head = &mut row[h * self.head_dim..(h + 1) * self.head_dim];
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
