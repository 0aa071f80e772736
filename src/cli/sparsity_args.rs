//! The sparsity options shared by `run`, `bench` and `eval`.

use std::path::PathBuf;

use clap::Args;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::sparsity::{validate_keep, CatsThresholds, Sparsity, SparsityMode};

#[derive(Debug, Clone, Args)]
pub struct SparsityArgs {
    /// FFN sparsity of the decode steps: none, griffin (neurons chosen once from the prompt)
    /// or cats (chosen per token from |SiLU(gate)|). The prompt always runs dense.
    #[arg(long, default_value = "none")]
    pub sparsity: SparsityMode,
    /// Fraction of FFN neurons kept, in (0, 1].
    #[arg(long, default_value_t = DEFAULT_KEEP, allow_negative_numbers = true)]
    pub keep: f32,
    /// CATS per-layer thresholds from `sirius-offload calibrate`, instead of per-token top-k.
    #[arg(long)]
    pub cats_thresholds: Option<PathBuf>,
}

/// `--keep`'s default (a warning only fires when the user chose another value).
const DEFAULT_KEEP: f32 = 0.5;

impl SparsityArgs {
    /// Checks the options that need no model.
    pub fn validate(&self) -> Result<()> {
        validate_keep(self.keep)?;
        if let Some(path) = &self.cats_thresholds {
            if self.sparsity != SparsityMode::Cats {
                return Err(Error::InvalidArgument(
                    "--cats-thresholds needs --sparsity cats".into(),
                ));
            }
            if !path.exists() {
                return Err(Error::InvalidArgument(format!(
                    "--cats-thresholds {}: no such file",
                    path.display()
                )));
            }
            if !path.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--cats-thresholds {}: not a file",
                    path.display()
                )));
            }
        }
        if self.sparsity == SparsityMode::None && self.keep != DEFAULT_KEEP {
            tracing::warn!(
                "--keep {} has no effect without --sparsity griffin|cats",
                self.keep
            );
        }
        Ok(())
    }

    /// Builds the sparse FFN for `model` (bundles; thresholds checked against the model).
    pub fn build<B: Backend>(&self, model: &Llama<B>) -> Result<Sparsity<B>> {
        self.validate()?;
        let thresholds = self
            .cats_thresholds
            .as_deref()
            .map(|p| CatsThresholds::load(p, &model.config))
            .transpose()?;
        if let Some(t) = thresholds
            .as_ref()
            .filter(|t| t.keep != self.keep && self.keep != DEFAULT_KEEP)
        {
            tracing::warn!(
                "--keep {} ignored: the thresholds were calibrated for keep {}; what they keep is reported per layer",
                self.keep,
                t.keep
            );
        }
        Sparsity::new(model, self.sparsity, self.keep, thresholds)
    }
}
