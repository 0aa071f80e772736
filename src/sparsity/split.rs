//! The dense FFN of an offloaded full pass (verification, after the prompt chose its
//! neurons): the request's resident Griffin neurons plus the rest, which the runtime streamed
//! for this pass.
//!
//! Float weights: the rest comes as bundles and its partial FFN is added to the resident
//! one's; the sum runs in another order than one dense matmul, so results agree with the
//! dense FFN to rounding. Quantized weights: the resident compact down matrix was re-encoded
//! (see `crate::offload::sizes`), so it is not used here; the activations of both neuron sets
//! (gate and up rows as stored) are merged into one row of every neuron and multiplied by
//! the layer's whole down matrix as stored, which is exactly the dense model's FFN.

use crate::backend::{Backend, BundleLayout, BundleSelection, SparseOps};
use crate::error::{Error, Result};
use crate::sparsity::bundles::complement_ids;
use crate::sparsity::ffn::{Complement, Dense, FfnStep, FfnStrategy};
use crate::sparsity::griffin::GriffinFfn;

/// Resident Griffin neurons + streamed complement; layers whose sparse set is not resident
/// get their whole FFN streamed and run it densely.
pub struct SplitDense<'a, B: Backend>(pub &'a GriffinFfn<B>);

impl<B: SparseOps> FfnStrategy<B> for SplitDense<'_, B> {
    fn apply(&mut self, mut step: FfnStep<'_, B>) -> Result<()> {
        let streamed = step.streamed;
        if streamed.is_some_and(|s| s.dense.is_some()) {
            return Dense.apply(step);
        }
        let griffin = self.0;
        let complement = streamed.and_then(|s| s.complement.as_ref());
        if let Some(Complement::Rows { rest, down }) = complement {
            return merged_dense(griffin, step, rest.as_ref(), down);
        }
        griffin.compact_ffn(&mut step)?;
        let (li, n) = (step.layer, step.n_tokens);
        let whole =
            (griffin.selection.layers.get(li)).is_some_and(|k| k.len() >= step.dims.neurons);
        match complement {
            Some(Complement::Rows { .. }) => Ok(()),
            Some(Complement::Bundles(complement)) => {
                let all = BundleSelection::All {
                    gate_bias: None,
                    up_bias: None,
                };
                let b = step.backend;
                let part = &mut step.scratch.part;
                b.bundle_ffn(complement, BundleLayout::GateUpDown, step.x, n, all, part)?;
                b.add(step.out, part, n * step.dims.hidden)
            }
            // Every neuron is resident (keep 1): nothing to add.
            None if whole => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "layer {li}: an offloaded full pass needs the streamed FFN complement"
            ))),
        }
    }
}

/// The dense FFN from the resident neurons' activations and the streamed rows of the rest,
/// merged into `[n, f]`, times the layer's whole down matrix `[h, f]` (`rest`: gate and up
/// rows of the neurons not kept; `None` when every neuron is kept).
fn merged_dense<B: SparseOps>(
    griffin: &GriffinFfn<B>,
    mut step: FfnStep<'_, B>,
    rest_rows: Option<&[B::Matrix; 2]>,
    down: &B::Matrix,
) -> Result<()> {
    let (li, n, f) = (step.layer, step.n_tokens, step.dims.neurons);
    let b = step.backend;
    let kept = griffin
        .selection
        .layers
        .get(li)
        .ok_or_else(|| Error::InvalidArgument(format!("no Griffin neurons for layer {li}")))?;
    let rest = complement_ids(kept, f)?;
    // Taken out of the scratch while the FFN steps borrow it, put back for the next pass.
    let mut merged = match step.scratch.merged.take() {
        Some(m) => m,
        None => b.alloc(step.scratch.max_tokens * f)?,
    };
    let out = (|| {
        griffin.compact_activations(&mut step)?;
        b.scatter_columns(&step.scratch.gate, n, kept, &mut merged, f)?;
        match rest_rows {
            Some([gate, up]) => {
                step.gate_up(gate, up, None, None)?;
                step.activate(rest.len())?;
                b.scatter_columns(&step.scratch.gate, n, &rest, &mut merged, f)?;
            }
            None if rest.is_empty() => {}
            None => {
                return Err(Error::InvalidArgument(format!(
                    "layer {li}: {} neurons are not resident, but no rows of them were streamed",
                    rest.len()
                )))
            }
        }
        b.matmul(down, &merged, n, step.out)
    })();
    step.scratch.merged = Some(merged);
    out
}
