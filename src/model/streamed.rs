//! The forward pass's side of offloading: per layer, the weights a runtime streamed into
//! place for this pass, and the trait through which the forward waits for them and hands
//! their buffer back. What is streamed, and when, is the runtime's business (`crate::offload`);
//! the forward only uses what it is given instead of its resident weights.

use crate::backend::Backend;
use crate::error::Result;
use crate::sparsity::ffn::StreamedFfn;

/// Attention projections streamed for one pass (layers whose attention is not resident).
/// Biases are small and always resident.
pub struct StreamedAttention<B: Backend> {
    pub wq: B::Matrix, // [q, h]
    pub wk: B::Matrix, // [kv, h]
    pub wv: B::Matrix, // [kv, h]
    pub wo: B::Matrix, // [h, q]
}

/// What one layer of one pass reads from streamed memory instead of resident weights.
pub struct StreamedLayer<B: Backend> {
    pub layer: usize,
    pub attention: Option<StreamedAttention<B>>,
    /// The FFN pieces streamed for this pass (the FFN strategy decides how to use them).
    pub ffn: StreamedFfn<B>,
}

impl<B: Backend> StreamedLayer<B> {
    /// A layer that streams nothing in this pass.
    pub fn empty(layer: usize) -> Self {
        StreamedLayer {
            layer,
            attention: None,
            ffn: StreamedFfn::none(),
        }
    }
}

/// Implemented by the offloading runtime of a backend: `acquire` blocks until layer `layer`'s
/// streamed weights are in place (the fence for exactly that buffer), `release` gives the
/// buffer back so the next copy can reuse it. The forward calls them in layer order, once
/// each per pass.
pub trait LayerStream<B: Backend> {
    fn acquire(&mut self, layer: usize) -> Result<StreamedLayer<B>>;
    fn release(&mut self, layer: StreamedLayer<B>) -> Result<()>;
}
