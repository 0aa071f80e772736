//! Configuration: the model's own config.json, and named presets from configs/models.

pub mod generation;
pub mod model_config;
pub mod preset;
pub mod rope_scaling;

pub use model_config::{Architecture, ModelConfig, RopeScaling};
pub use preset::{is_gguf, resolve_model_dir, sirius_home, Preset};
