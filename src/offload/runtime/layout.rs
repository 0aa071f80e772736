//! How one layer's streamed pieces are laid out in its staging buffer for a pass, and the
//! matrices the forward reads over them.

use std::ops::Range;

use crate::backend::offload::{FilledOf, OffloadBackend};
use crate::error::{Error, Result};
use crate::model::{StreamedAttention, StreamedLayer};
use crate::sparsity::ffn::FfnMatrices;
use crate::tensor::DType;
use crate::transfer::StagedJob;

/// What one layer's copy job holds in the current pass.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerJob {
    pub attention: bool,
    pub ffn: FfnPiece,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum FfnPiece {
    None,
    /// Whole FFN, checkpoint layout.
    Dense,
    /// The request's compact Griffin FFN of `k` neurons.
    Sparse {
        k: usize,
    },
    /// Bundles of the `c` non-resident neurons.
    Complement {
        c: usize,
    },
}

/// The model's shapes the views need.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub h: usize,
    pub q: usize,
    pub kv: usize,
    pub f: usize,
    pub dtype: DType,
}

impl LayerJob {
    pub fn describe(&self) -> &'static str {
        match (self.attention, self.ffn) {
            (true, FfnPiece::None) => "attention",
            (false, FfnPiece::Dense) => "FFN",
            (true, FfnPiece::Dense) => "attention + FFN",
            (false, FfnPiece::Sparse { .. }) => "sparse FFN",
            (true, FfnPiece::Sparse { .. }) => "attention + sparse FFN",
            (false, FfnPiece::Complement { .. }) => "FFN complement",
            (true, FfnPiece::Complement { .. }) => "attention + FFN complement",
            (false, FfnPiece::None) => "nothing",
        }
    }

    /// Matrices over the filled buffer of the job's layer, as the job laid them out.
    pub fn views<B: OffloadBackend>(
        &self,
        d: Dims,
        filled: &FilledOf<B>,
    ) -> Result<StreamedLayer<B>> {
        let esz = d.dtype.size();
        let li = filled.layer();
        let all = filled.pieces();
        let view =
            |range: Range<usize>, rows, cols| B::staged_matrix(filled, range, d.dtype, rows, cols);
        let mut pieces = all.iter().cloned();
        let mut next = || {
            pieces.next().ok_or_else(|| {
                Error::CopyEngine(format!(
                    "layer {li}: staging buffer has fewer pieces than its job"
                ))
            })
        };
        let mut layer = StreamedLayer::empty(li);
        if self.attention {
            layer.attention = Some(StreamedAttention {
                wq: view(next()?, d.q, d.h)?,
                wk: view(next()?, d.kv, d.h)?,
                wv: view(next()?, d.kv, d.h)?,
                wo: view(next()?, d.h, d.q)?,
            });
        }
        match self.ffn {
            FfnPiece::None => {}
            FfnPiece::Dense => {
                layer.ffn.dense = Some(FfnMatrices {
                    gate: view(next()?, d.f, d.h)?,
                    up: view(next()?, d.f, d.h)?,
                    down: view(next()?, d.h, d.f)?,
                });
            }
            FfnPiece::Sparse { k } => {
                let all = next()?;
                let part = k * d.h * esz;
                let s = all.start;
                layer.ffn.sparse = Some(FfnMatrices {
                    gate: view(s..s + part, k, d.h)?,
                    up: view(s + part..s + 2 * part, k, d.h)?,
                    down: view(s + 2 * part..s + 3 * part, d.h, k)?,
                });
            }
            FfnPiece::Complement { c } => {
                // The runs landed back to back: one [c, 3h] bundle matrix.
                // After the attention pieces, if any.
                let start = match self.attention {
                    true => all.get(3).map_or(0, |r| r.end),
                    false => all.first().map_or(0, |r| r.start),
                };
                let end = all.last().map_or(start, |r| r.end).max(start);
                layer.ffn.complement = Some(view(start..end, c, 3 * d.h)?);
            }
        }
        Ok(layer)
    }
}
