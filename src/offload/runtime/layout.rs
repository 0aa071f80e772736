//! How one layer's streamed pieces are laid out in its staging buffer for a pass, and the
//! matrices the forward reads over them.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::offload::{FilledOf, OffloadBackend};
use crate::error::{Error, Result};
use crate::model::{StreamedAttention, StreamedLayer};
use crate::sparsity::ffn::{Complement, FfnMatrices};
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
    /// The `c` non-resident neurons: their bundles (float), or their gate rows, up rows and
    /// the whole down matrix (quantized).
    Complement {
        c: usize,
    },
}

/// The model's shapes and formats the views need.
#[derive(Debug, Clone)]
pub(super) struct Dims {
    pub h: usize,
    pub q: usize,
    pub kv: usize,
    pub f: usize,
    /// The format that names the model (its FFN bundles' where they are float).
    pub dtype: DType,
    /// Each layer's wq, wk, wv, wo, gate, up and down types (block formats may mix).
    pub layers: Arc<[[DType; 7]]>,
    /// Quantized weights: the format of Griffin's compact down matrices.
    pub griffin_down: DType,
}

impl Dims {
    /// Layer `li`'s matrix types.
    pub fn types(&self, li: usize) -> Result<[DType; 7]> {
        self.layers.get(li).copied().ok_or_else(|| {
            Error::CopyEngine(format!("layer {li}: the model has {}", self.layers.len()))
        })
    }

    /// The format of a compact (Griffin) down matrix.
    pub fn compact_down(&self) -> DType {
        match self.dtype.is_quantized() {
            true => self.griffin_down,
            false => self.dtype,
        }
    }
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
        d: &Dims,
        filled: &FilledOf<B>,
    ) -> Result<StreamedLayer<B>> {
        let li = filled.layer();
        let all = filled.pieces();
        let [tq, tk, tv, to, tg, tu, td] = d.types(li)?;
        let view = |range: Range<usize>, dtype, rows, cols| {
            B::staged_matrix(filled, range, dtype, rows, cols)
        };
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
                wq: view(next()?, tq, d.q, d.h)?,
                wk: view(next()?, tk, d.kv, d.h)?,
                wv: view(next()?, tv, d.kv, d.h)?,
                wo: view(next()?, to, d.h, d.q)?,
            });
        }
        match self.ffn {
            FfnPiece::None => {}
            FfnPiece::Dense => {
                layer.ffn.dense = Some(FfnMatrices {
                    gate: view(next()?, tg, d.f, d.h)?,
                    up: view(next()?, tu, d.f, d.h)?,
                    down: view(next()?, td, d.h, d.f)?,
                });
            }
            FfnPiece::Sparse { k } => {
                let all = next()?;
                let (gate, up) = (k * tg.bytes_for(d.h), k * tu.bytes_for(d.h));
                let down = d.h * d.compact_down().bytes_for(k);
                let s = all.start;
                let u = s + gate;
                let dn = u + up;
                layer.ffn.sparse = Some(FfnMatrices {
                    gate: view(s..u, tg, k, d.h)?,
                    up: view(u..dn, tu, k, d.h)?,
                    down: view(dn..dn + down, d.compact_down(), d.h, k)?,
                });
            }
            FfnPiece::Complement { c } if d.dtype.is_quantized() => {
                let ffn = &all[if self.attention { 4 } else { 0 }..];
                let types = [tg, tu, td];
                layer.ffn.complement = Some(quantized_complement::<B>(d, types, filled, ffn, c)?);
            }
            FfnPiece::Complement { c } => {
                // The runs landed back to back: one [c, 3h] bundle matrix.
                // After the attention pieces, if any.
                let start = match self.attention {
                    true => all.get(3).map_or(0, |r| r.end),
                    false => all.first().map_or(0, |r| r.start),
                };
                let end = all.last().map_or(start, |r| r.end).max(start);
                let bundles = view(start..end, d.dtype, c, 3 * d.h)?;
                layer.ffn.complement = Some(Complement::Bundles(bundles));
            }
        }
        Ok(layer)
    }
}

/// The views of a quantized complement in `ffn` (its staged pieces): the `c` neurons' gate
/// runs, the same runs of their up rows, then the whole down matrix, back to back (only the
/// down matrix when `c` is 0: every neuron is kept).
fn quantized_complement<B: OffloadBackend>(
    d: &Dims,
    [tg, tu, td]: [DType; 3],
    filled: &FilledOf<B>,
    ffn: &[Range<usize>],
    c: usize,
) -> Result<Complement<B>> {
    let runs = ffn.len().saturating_sub(1) / 2;
    if ffn.len() != 2 * runs + 1 || (runs == 0) != (c == 0) {
        return Err(Error::CopyEngine(format!(
            "layer {}: {} FFN pieces staged, expected gate and up runs and a down matrix",
            filled.layer(),
            ffn.len()
        )));
    }
    let view =
        |range: Range<usize>, dtype, rows, cols| B::staged_matrix(filled, range, dtype, rows, cols);
    let rest = match runs {
        0 => None,
        _ => Some([
            view(ffn[0].start..ffn[runs - 1].end, tg, c, d.h)?,
            view(ffn[runs].start..ffn[2 * runs - 1].end, tu, c, d.h)?,
        ]),
    };
    Ok(Complement::Rows {
        rest,
        down: view(ffn[2 * runs].clone(), td, d.h, d.f)?,
    })
}
