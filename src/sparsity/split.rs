//! The dense FFN of an offloaded full pass (verification, after the prompt chose its
//! neurons): the request's resident Griffin neurons plus the bundles of the rest, which the
//! runtime streamed for this pass. The sum runs in another order than one dense matmul, so
//! results agree with the dense FFN to rounding.

use crate::backend::{Backend, BundleLayout, BundleSelection, SparseOps};
use crate::error::{Error, Result};
use crate::sparsity::ffn::{Dense, FfnStep, FfnStrategy};
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
        griffin.compact_ffn(&mut step)?;
        let (li, n) = (step.layer, step.n_tokens);
        let whole =
            (griffin.selection.layers.get(li)).is_some_and(|k| k.len() >= step.dims.neurons);
        match streamed.and_then(|s| s.complement.as_ref()) {
            Some(complement) => {
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
