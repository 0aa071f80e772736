//! One request's sparse state: Griffin's scores during the prompt, then its compact FFN;
//! CATS's per-token rule; the neurons kept, for the density report.

use crate::backend::{Backend, SparseOps};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::sparsity::cats::CatsFfn;
use crate::sparsity::ffn::{Dense, FfnDims, FfnStrategy};
use crate::sparsity::griffin::{GriffinFfn, GriffinScores, GriffinSelection};
use crate::sparsity::{NeuronCounter, Sparsity, SparsityMode, SparsityReport};

/// Per-request sparse state. Griffin's neurons are either gathered from the model's bundles
/// ([`SparseRequest::finish_prefill`]) or placed by the caller (an offloading runtime keeps
/// its own copy of the FFN: [`SparseRequest::griffin_placed`]).
pub struct SparseRequest<'s, B: Backend> {
    mode: SparsityMode,
    keep: f32,
    /// Griffin's kept count is rounded up to a multiple of this (whole quantized blocks).
    align: usize,
    dense: Dense,
    /// Griffin until its neurons are chosen: the prompt's scores.
    scores: Option<GriffinScores<B>>,
    /// Griffin after the prompt: the request's compact FFN.
    griffin: Option<GriffinFfn<B>>,
    cats: Option<CatsFfn<'s, B>>,
    /// Where Griffin gathers its neurons from (none when the caller places them).
    sparsity: Option<&'s Sparsity<B>>,
    counter: NeuronCounter,
}

impl<'s, B: SparseOps> SparseRequest<'s, B> {
    /// A request of a model that decodes with `sparsity`.
    pub fn new(sparsity: &'s Sparsity<B>, backend: &B, dims: FfnDims) -> Result<Self> {
        let scores = match sparsity {
            Sparsity::Griffin { .. } => Some(GriffinScores::new(backend, dims)?),
            _ => None,
        };
        let cats = match sparsity {
            Sparsity::Cats { bundles, rule, .. } => Some(CatsFfn {
                bundles,
                rule,
                counter: NeuronCounter::new(dims.layers),
                shared: false,
            }),
            _ => None,
        };
        Ok(SparseRequest {
            mode: sparsity.mode(),
            keep: sparsity.keep(),
            align: match sparsity {
                Sparsity::Griffin { source, .. } => source.align(),
                _ => 1,
            },
            dense: Dense,
            scores,
            griffin: None,
            cats,
            sparsity: Some(sparsity),
            counter: NeuronCounter::new(dims.layers),
        })
    }

    /// A request of the dense model.
    pub fn dense(dims: FfnDims) -> Self {
        SparseRequest {
            mode: SparsityMode::None,
            keep: 1.0,
            align: 1,
            dense: Dense,
            scores: None,
            griffin: None,
            cats: None,
            sparsity: None,
            counter: NeuronCounter::new(dims.layers),
        }
    }

    /// A Griffin request keeping `keep` of the neurons (a multiple of `align`), whose compact
    /// FFN the caller places ([`SparseRequest::place`]) after the prompt.
    pub fn griffin_placed(keep: f32, align: usize, backend: &B, dims: FfnDims) -> Result<Self> {
        Ok(SparseRequest {
            mode: SparsityMode::Griffin,
            keep,
            align,
            dense: Dense,
            scores: Some(GriffinScores::new(backend, dims)?),
            griffin: None,
            cats: None,
            sparsity: None,
            counter: NeuronCounter::new(dims.layers),
        })
    }

    /// The FFN of the (dense) prefill: Griffin scores the prompt's neurons there.
    pub fn prefill_ffn(&mut self) -> &mut dyn FfnStrategy<B> {
        match &mut self.scores {
            Some(scores) => scores,
            None => &mut self.dense,
        }
    }

    /// Counts a prompt prefix's Griffin scores (computed once for several requests) as this
    /// request's own; nothing for other modes.
    pub fn add_prompt_scores(&mut self, backend: &B, prefix: &GriffinScores<B>) -> Result<()> {
        match &mut self.scores {
            Some(scores) => scores.add(backend, prefix),
            None => Ok(()),
        }
    }

    /// Griffin's scores of the prompt (None for other modes), taken out: a kept prompt
    /// prefix carries them to the next request that continues it.
    pub fn take_scores(&mut self) -> Option<GriffinScores<B>> {
        self.scores.take()
    }

    /// After the prompt, Griffin's choice: the top neurons of every layer (None for other
    /// modes).
    pub fn selection(&self, backend: &B) -> Result<Option<GriffinSelection>> {
        self.scores
            .as_ref()
            .map(|s| s.select(backend, self.keep, self.align))
            .transpose()
    }

    /// After the prompt: Griffin picks its neurons and gathers them from the bundles.
    pub fn finish_prefill(&mut self, backend: &B) -> Result<()> {
        let Some(selection) = self.selection(backend)? else {
            return Ok(());
        };
        let source = match self.sparsity {
            Some(Sparsity::Griffin { source, .. }) => source,
            _ => {
                return Err(Error::InvalidArgument(
                    "this Griffin request's neurons are placed by its caller, not gathered".into(),
                ))
            }
        };
        self.place(source.gather(backend, selection)?);
        Ok(())
    }

    /// Makes `ffn` the request's Griffin FFN (for the rest of the request).
    pub fn place(&mut self, ffn: GriffinFfn<B>) {
        self.griffin = Some(ffn);
    }

    /// Drops the request's Griffin FFN (an offloading runtime frees its resident copies
    /// before placing new ones, which these would keep alive).
    pub fn drop_placed(&mut self) {
        self.griffin = None;
    }

    /// The request's Griffin FFN, once placed.
    pub fn griffin(&self) -> Option<&GriffinFfn<B>> {
        self.griffin.as_ref()
    }

    /// The FFN of decode steps. Griffin needs its neurons first (running dense instead
    /// would silently report a sparse run).
    pub fn decode_ffn(&mut self) -> Result<&mut dyn FfnStrategy<B>> {
        self.batch_ffn(false)
    }

    /// [`Self::decode_ffn`] for a batch of tree beams: with `shared_cats`, CATS picks one
    /// neuron set for the whole batch.
    pub fn batch_ffn(&mut self, shared_cats: bool) -> Result<&mut dyn FfnStrategy<B>> {
        if let Some(cats) = &mut self.cats {
            cats.shared = shared_cats;
            return Ok(cats);
        }
        match (self.mode, &mut self.griffin) {
            (SparsityMode::Griffin, Some(g)) => Ok(g),
            (SparsityMode::Griffin, None) => Err(Error::InvalidArgument(
                "Griffin decodes only after the prompt chose its neurons (finish_prefill)".into(),
            )),
            _ => Ok(&mut self.dense),
        }
    }

    /// Counts decode tokens that ran a Griffin FFN (CATS counts itself as it runs).
    pub fn count_decode(&mut self, n_tokens: usize) {
        if let Some(g) = &self.griffin {
            for (li, k) in g.kept().into_iter().enumerate() {
                self.counter.add(li, k * n_tokens, n_tokens);
            }
        }
    }

    /// What the request's sparse steps read.
    pub fn report(&self, config: &ModelConfig) -> SparsityReport {
        let counter = self.cats.as_ref().map_or(&self.counter, |c| &c.counter);
        SparsityReport::new(self.mode, self.keep, counter, config)
    }
}
