//! Rotary position embedding frequencies of a model: the base frequencies of `rope_theta`,
//! with Llama 3.1 "llama3" or linear scaling applied (the backend turns them into cos/sin
//! tables and rotates with them).

use crate::config::{ModelConfig, RopeScaling};

/// Per-pair inverse frequencies of one head (`head_dim / 2` of them): pair i rotates
/// elements (i, i + head_dim/2), the Hugging Face "rotate_half" convention.
pub fn rope_frequencies(config: &ModelConfig) -> Vec<f32> {
    let hd = config.head_dim;
    let base = config.rope_theta as f64;
    let mut inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / hd as f64))
        .collect();
    match &config.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            for f in &mut inv_freq {
                *f /= *factor as f64;
            }
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // Wavelengths longer than original_ctx / low_freq_factor are slowed by `factor`;
            // shorter than original_ctx / high_freq_factor are kept; in between, blended.
            let (factor, low, high) = (
                *factor as f64,
                *low_freq_factor as f64,
                *high_freq_factor as f64,
            );
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
    inv_freq.into_iter().map(|f| f as f32).collect()
}
