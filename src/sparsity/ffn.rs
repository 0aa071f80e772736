//! The FFN step of the one forward pass, as the strategies see it.
//!
//! The forward (`model::llama`) does, per layer, `norm -> ffn.apply -> down bias -> residual`;
//! what `apply` computes is the strategy's business: the dense FFN ([`Dense`]), a request's
//! Griffin neurons (`griffin`), CATS's per-token neurons (`cats`), resident neurons plus a
//! streamed complement (`split`), or the dense FFN with a tap that records statistics
//! (Griffin's scores, CATS calibration). Each strategy lives beside its policy code.

use crate::backend::{Backend, NeuronLists};
use crate::error::{Error, Result};

/// A layer's FFN weights as the checkpoint stores them; h = hidden, f = intermediate.
pub struct FfnWeights<B: Backend> {
    pub gate: B::Matrix,           // [f, h]
    pub up: B::Matrix,             // [f, h]
    pub down: B::Matrix,           // [h, f]
    pub gate_bias: Option<B::Buf>, // [f] (mlp_bias)
    pub up_bias: Option<B::Buf>,   // [f]
    pub down_bias: Option<B::Buf>, // [h]
}

/// An FFN in checkpoint layout without biases: gate `[n, h]`, up `[n, h]`, down `[h, n]`,
/// where n is every neuron (a streamed dense layer) or a request's Griffin subset.
pub struct FfnMatrices<B: Backend> {
    pub gate: B::Matrix,
    pub up: B::Matrix,
    pub down: B::Matrix,
}

/// What an offloading runtime streamed into place for one layer's FFN in this pass.
pub struct StreamedFfn<B: Backend> {
    /// The whole FFN (full passes over a layer whose sparse set is not resident, and every
    /// full pass before a request has chosen its neurons).
    pub dense: Option<FfnMatrices<B>>,
    /// The request's Griffin FFN of a layer whose sparse set did not fit (draft passes).
    pub sparse: Option<FfnMatrices<B>>,
    /// What the resident sparse set lacks (full passes over a resident sparse set: the dense
    /// FFN is the resident part plus this one).
    pub complement: Option<Complement<B>>,
}

/// The FFN of the neurons a resident sparse set leaves out.
pub enum Complement<B: Backend> {
    /// Float weights: gate|up|down bundles `[f - k, 3h]` of the neurons that are not resident.
    Bundles(B::Matrix),
    /// Quantized weights: gate and up rows `[f - k, h]` of the neurons that are not resident,
    /// as stored (`None` when every neuron is kept), and the layer's whole down matrix
    /// `[h, f]` as stored (its neurons' columns are spread over blocks: see `sparsity::split`).
    Rows {
        rest: Option<[B::Matrix; 2]>,
        down: B::Matrix,
    },
}

impl<B: Backend> Clone for Complement<B>
where
    B::Matrix: Clone,
{
    fn clone(&self) -> Self {
        match self {
            Complement::Bundles(m) => Complement::Bundles(m.clone()),
            Complement::Rows { rest, down } => Complement::Rows {
                rest: rest.clone(),
                down: down.clone(),
            },
        }
    }
}

impl<B: Backend> StreamedFfn<B> {
    /// Nothing streamed.
    pub fn none() -> Self {
        StreamedFfn {
            dense: None,
            sparse: None,
            complement: None,
        }
    }
}

/// The FFN's activation buffers for batches of up to `max_tokens` tokens, reused across
/// layers and calls.
pub struct FfnScratch<B: Backend> {
    pub gate: B::Buf,      // [n, f]
    pub up: B::Buf,        // [n, f]
    pub part: B::Buf,      // [n, h] a second partial output (split: the streamed complement)
    pub kept: NeuronLists, // CATS: kept neurons per token (host)
    /// `[n, f]` every neuron's activation, merged from two neuron sets (split passes over
    /// quantized weights); allocated on first use.
    pub merged: Option<B::Buf>,
    /// Rows the buffers hold.
    pub max_tokens: usize,
}

impl<B: Backend> FfnScratch<B> {
    pub fn new(backend: &B, max_tokens: usize, dims: FfnDims) -> Result<Self> {
        Ok(FfnScratch {
            gate: backend.alloc(max_tokens * dims.neurons)?,
            up: backend.alloc(max_tokens * dims.neurons)?,
            part: backend.alloc(max_tokens * dims.hidden)?,
            kept: NeuronLists::default(),
            merged: None,
            max_tokens,
        })
    }
}

/// The model's FFN shape.
#[derive(Debug, Clone, Copy)]
pub struct FfnDims {
    pub hidden: usize,
    /// Neurons per layer (intermediate size).
    pub neurons: usize,
    pub layers: usize,
}

/// One layer's FFN step of one pass.
pub struct FfnStep<'a, B: Backend> {
    pub backend: &'a B,
    pub layer: usize,
    pub n_tokens: usize,
    pub dims: FfnDims,
    /// The normed input rows `[n, h]`.
    pub x: &'a B::Buf,
    pub weights: &'a FfnWeights<B>,
    /// What the runtime streamed for this layer; `None` when nothing is offloaded.
    pub streamed: Option<&'a StreamedFfn<B>>,
    pub scratch: &'a mut FfnScratch<B>,
    /// The output rows `[n, h]`, overwritten (the forward adds the down bias and the residual).
    pub out: &'a mut B::Buf,
}

/// How a forward pass computes the FFN of each layer.
pub trait FfnStrategy<B: Backend> {
    /// Writes the FFN of `step.x` into `step.out`.
    fn apply(&mut self, step: FfnStep<'_, B>) -> Result<()>;
}

/// The dense FFN: `out = W_down · (silu(W_gate·x) ⊙ W_up·x)` over every neuron.
pub struct Dense;

impl<B: Backend> FfnStrategy<B> for Dense {
    fn apply(&mut self, mut step: FfnStep<'_, B>) -> Result<()> {
        step.dense(&mut NoTap)
    }
}

/// Looks at the dense FFN's intermediate values of a layer (statistics over a prompt).
pub trait DenseTap<B: Backend> {
    /// `gate` holds `W_gate·x + bias` of the step's rows (`[n, f]`), before the activation.
    fn gate(&mut self, _step: &FfnStep<'_, B>) -> Result<()> {
        Ok(())
    }
    /// `scratch.gate` holds `silu(gate) ⊙ up` (`[n, f]`), before the down projection.
    fn activation(&mut self, _step: &FfnStep<'_, B>) -> Result<()> {
        Ok(())
    }
}

struct NoTap;
impl<B: Backend> DenseTap<B> for NoTap {}

impl<B: Backend> FfnStep<'_, B> {
    /// The dense FFN, showing `tap` its intermediate values. Reads the streamed whole FFN
    /// when the runtime streamed one, else the layer's own weights (never in an offloaded
    /// pass: the checkpoint's FFN is host memory there, not read in place).
    pub fn dense(&mut self, tap: &mut dyn DenseTap<B>) -> Result<()> {
        let (w, streamed) = (self.weights, self.streamed);
        let (gate, up, down) = match streamed {
            Some(StreamedFfn { dense: Some(d), .. }) => (&d.gate, &d.up, &d.down),
            None => (&w.gate, &w.up, &w.down),
            Some(_) => {
                return Err(Error::InvalidArgument(format!(
                    "layer {}: an offloaded dense pass needs the layer's FFN streamed",
                    self.layer
                )))
            }
        };
        self.gate_up(gate, up, w.gate_bias.as_ref(), w.up_bias.as_ref())?;
        tap.gate(self)?;
        let f = self.dims.neurons;
        self.activate(f)?;
        tap.activation(self)?;
        self.down(down)
    }

    /// `scratch.gate = W_gate·x (+ bias)`, `scratch.up = W_up·x (+ bias)`.
    pub fn gate_up(
        &mut self,
        gate: &B::Matrix,
        up: &B::Matrix,
        gate_bias: Option<&B::Buf>,
        up_bias: Option<&B::Buf>,
    ) -> Result<()> {
        let (b, n, s) = (self.backend, self.n_tokens, &mut *self.scratch);
        b.matmul(gate, self.x, n, &mut s.gate)?;
        b.matmul(up, self.x, n, &mut s.up)?;
        if let Some(bias) = gate_bias {
            b.add_bias(&mut s.gate, bias, n)?;
        }
        if let Some(bias) = up_bias {
            b.add_bias(&mut s.up, bias, n)?;
        }
        Ok(())
    }

    /// `scratch.gate = silu(scratch.gate) ⊙ scratch.up` over `width` neurons per row.
    pub fn activate(&mut self, width: usize) -> Result<()> {
        let s = &mut *self.scratch;
        self.backend
            .silu_mul(&mut s.gate, &s.up, self.n_tokens * width)
    }

    /// `out = W_down · scratch.gate`.
    pub fn down(&mut self, down: &B::Matrix) -> Result<()> {
        (self.backend).matmul(down, &self.scratch.gate, self.n_tokens, self.out)
    }
}
