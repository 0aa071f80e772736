//! The forward pass's side of offloading: per layer, the weights a runtime streamed into
//! place for this pass, and the trait through which the forward waits for them and hands
//! their buffer back. What is streamed, and when, is the runtime's business (`crate::offload`);
//! the forward only uses what it is given instead of its resident weights.

use crate::backend::Backend;
use crate::error::Result;

/// Attention projections streamed for one pass (layers whose attention is not resident).
/// Biases are small and always resident.
pub struct StreamedAttention<B: Backend> {
    pub wq: B::Matrix, // [q, h]
    pub wk: B::Matrix, // [kv, h]
    pub wv: B::Matrix, // [kv, h]
    pub wo: B::Matrix, // [h, q]
}

/// An FFN in checkpoint layout: gate `[n, h]`, up `[n, h]`, down `[h, n]`, where n is all
/// neurons (a dense layer) or a request's Griffin subset.
pub struct StreamedFfn<B: Backend> {
    pub gate: B::Matrix,
    pub up: B::Matrix,
    pub down: B::Matrix,
}

/// What one layer of one pass reads from streamed memory instead of resident weights.
pub struct StreamedLayer<B: Backend> {
    pub layer: usize,
    pub attention: Option<StreamedAttention<B>>,
    /// The whole FFN (full passes over a layer whose sparse set is not resident, and every
    /// full pass before a request has chosen its neurons).
    pub dense_ffn: Option<StreamedFfn<B>>,
    /// The request's Griffin FFN of a layer whose sparse set did not fit (draft passes).
    pub sparse_ffn: Option<StreamedFfn<B>>,
    /// Gate|up|down bundles `[f - k, 3h]` of the neurons that are not resident (full passes
    /// over a resident sparse set: the dense FFN is the resident part plus this one).
    pub complement: Option<B::Matrix>,
}

impl<B: Backend> StreamedLayer<B> {
    /// A layer that streams nothing in this pass.
    pub fn empty(layer: usize) -> Self {
        StreamedLayer {
            layer,
            attention: None,
            dense_ffn: None,
            sparse_ffn: None,
            complement: None,
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
