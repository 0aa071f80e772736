//! THE Llama forward pass (Llama 2/3/3.1, Mistral, Qwen2), written once against [`Backend`].
//! Per layer: `x += attention(norm(x))`, then `x += ffn(norm(x))`, where the FFN is the
//! pass's strategy (dense, Griffin, CATS, offloaded split: `crate::sparsity::ffn`) and
//! offloading hands in the weights it streamed for the layer ([`LayerStream`]). Sparsity and
//! offloading plug in here; they never copy it.

use crate::backend::argmax::RowVerdict;
use crate::backend::{AttentionShape, Backend, RopeTable, Rows};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::kv_cache::KvCache;
use crate::model::scratch::Scratch;
use crate::model::streamed::{LayerStream, StreamedAttention, StreamedLayer};
use crate::model::weights::WeightStore;
use crate::sparsity::ffn::{FfnDims, FfnStep, FfnStrategy, FfnWeights};
use crate::tensor::{DType, KvDType, TreeMask};

/// Weights of one decoder layer. Shapes are `[rows, cols]` = `[out, in]`; h = hidden,
/// q = heads*head_dim, kv = kv_heads*head_dim, f = intermediate.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Buf,      // [h]
    pub wq: B::Matrix,          // [q, h]
    pub wk: B::Matrix,          // [kv, h]
    pub wv: B::Matrix,          // [kv, h]
    pub wo: B::Matrix,          // [h, q]
    pub q_bias: Option<B::Buf>, // [q]   (Qwen2, attention_bias)
    pub k_bias: Option<B::Buf>, // [kv]
    pub v_bias: Option<B::Buf>, // [kv]
    pub o_bias: Option<B::Buf>, // [h]   (attention_bias)
    pub ffn_norm: B::Buf,       // [h]
    pub ffn: FfnWeights<B>,     // gate [f, h], up [f, h], down [h, f] and their biases
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    /// Stored dtype of the FFN matrices (of every matrix in a float checkpoint).
    pub dtype: DType,
    /// How new KV caches store their rows (f16 unless the engine asks otherwise).
    pub kv_dtype: KvDType,
    pub(super) embed: B::Matrix, // [vocab, h]
    pub(super) layers: Vec<LayerWeights<B>>,
    pub(super) final_norm: B::Buf, // [h]
    /// `None` when the head is tied to the embedding.
    pub(super) lm_head: Option<B::Matrix>, // [vocab, h]
    pub(super) rope: RopeTable,
    /// Keeps the mapped checkpoint alive and answers size questions.
    pub(super) store: WeightStore,
}

/// The checkpoint's weights [`Llama::make_resident`] replaced by resident copies: the
/// attention projections per layer (`[wq, wk, wv, wo]`) and the LM head as it was (`None`
/// when tied to the embedding). `lm_head` is `None` until the head was replaced.
pub struct ReplacedWeights<B: Backend> {
    attention: Vec<(usize, [B::Matrix; 4])>,
    lm_head: Option<Option<B::Matrix>>,
}

/// Makes a resident copy of a weight (offloading): its label and the matrix to copy.
pub type ResidentCopy<'a, B> =
    dyn FnMut(&str, &<B as Backend>::Matrix) -> Result<<B as Backend>::Matrix> + 'a;

/// Which rows of the batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (verification windows, perplexity, golden tests).
    All,
    /// None (prompt chunks before the last).
    None,
}

/// One forward pass: its tokens and where they sit, which logits come back, the FFN it runs
/// and, for an offloaded model, the runtime that streams the weights not resident.
pub struct Pass<'p, B: Backend> {
    tokens: &'p [u32],
    /// `None`: the tokens follow the cache one after another (prompt, decode, chain
    /// windows); `Some`: they are the last nodes of a token tree (Sirius with width > 1).
    tree: Option<&'p TreeMask>,
    logits: Logits,
    ffn: &'p mut dyn FfnStrategy<B>,
    stream: Option<&'p mut dyn LayerStream<B>>,
}

impl<'p, B: Backend> Pass<'p, B> {
    /// `tokens` after the cache, through `ffn`, returning `logits`.
    pub fn new(tokens: &'p [u32], logits: Logits, ffn: &'p mut dyn FfnStrategy<B>) -> Self {
        Pass {
            tokens,
            tree: None,
            logits,
            ffn,
            stream: None,
        }
    }

    /// The tokens are the last `mask.n_tokens()` nodes of a token tree at cache rows
    /// `cache.len()..`: each attends to the prefix and its own ancestors and sits at the
    /// rotary position of its depth (see [`TreeMask`]).
    pub fn tree(mut self, mask: &'p TreeMask) -> Self {
        self.tree = Some(mask);
        self
    }

    /// The layers read the weights `stream` puts in place instead of resident ones they lack.
    pub fn streamed(mut self, stream: &'p mut dyn LayerStream<B>) -> Self {
        self.stream = Some(stream);
        self
    }
}

impl<B: Backend> Llama<B> {
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        KvCache::new(
            &self.backend,
            self.config.num_layers,
            self.config.kv_dim(),
            capacity,
            self.kv_dtype,
        )
    }

    /// The FFN shape the sparsity strategies work with.
    pub fn ffn_dims(&self) -> FfnDims {
        FfnDims {
            hidden: self.config.hidden_size,
            neurons: self.config.intermediate_size,
            layers: self.config.num_layers,
        }
    }

    /// The checkpoint (for layouts built from it, such as neuron bundles).
    pub fn weights(&self) -> &WeightStore {
        &self.store
    }

    /// Bytes of all weights in the checkpoint.
    pub fn weight_bytes(&self) -> usize {
        self.store.total_bytes()
    }

    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }

    /// Offloading: replaces the attention projections of the layers where `attention[li]` is
    /// set, and the LM head (a separate copy of the embedding when tied: lookups stay on the
    /// host), by copies `copy` makes in the runtime's resident memory. The other weights
    /// stay where they are and are only read through streaming. Returns the weights it
    /// replaced, for [`Llama::restore`] when the runtime goes (a new plan may keep other
    /// layers resident, and must start from the checkpoint's weights).
    pub fn make_resident(
        &mut self,
        attention: &[bool],
        copy: &mut ResidentCopy<'_, B>,
    ) -> Result<ReplacedWeights<B>> {
        let mut replaced = ReplacedWeights {
            attention: Vec::new(),
            lm_head: None,
        };
        match self.replace_weights(attention, copy, &mut replaced) {
            Ok(()) => Ok(replaced),
            Err(e) => {
                // A failed copy (budget, device memory) leaves the checkpoint's weights.
                self.restore(replaced);
                Err(e)
            }
        }
    }

    fn replace_weights(
        &mut self,
        attention: &[bool],
        copy: &mut ResidentCopy<'_, B>,
        replaced: &mut ReplacedWeights<B>,
    ) -> Result<()> {
        for (li, layer) in self.layers.iter_mut().enumerate() {
            if attention.get(li).copied().unwrap_or(false) {
                let wq = copy(&format!("layer {li} wq"), &layer.wq)?;
                let wk = copy(&format!("layer {li} wk"), &layer.wk)?;
                let wv = copy(&format!("layer {li} wv"), &layer.wv)?;
                let wo = copy(&format!("layer {li} wo"), &layer.wo)?;
                let old = [
                    std::mem::replace(&mut layer.wq, wq),
                    std::mem::replace(&mut layer.wk, wk),
                    std::mem::replace(&mut layer.wv, wv),
                    std::mem::replace(&mut layer.wo, wo),
                ];
                replaced.attention.push((li, old));
            }
        }
        let head = copy("LM head", self.lm_head.as_ref().unwrap_or(&self.embed))?;
        replaced.lm_head = Some(self.lm_head.replace(head));
        Ok(())
    }

    /// Puts back the weights [`Llama::make_resident`] replaced, dropping the resident copies.
    pub fn restore(&mut self, replaced: ReplacedWeights<B>) {
        for (li, [wq, wk, wv, wo]) in replaced.attention {
            if let Some(layer) = self.layers.get_mut(li) {
                (layer.wq, layer.wk, layer.wv, layer.wo) = (wq, wk, wv, wo);
            }
        }
        if let Some(head) = replaced.lm_head {
            self.lm_head = head;
        }
    }

    /// Runs `pass` (at most `scratch.max_tokens()` tokens) at positions `cache.len()..`,
    /// appends their K/V to the cache and returns the requested logits, row-major
    /// `[rows, vocab]`.
    pub fn forward(
        &self,
        pass: Pass<'_, B>,
        cache: &mut KvCache<B>,
        s: &mut Scratch<B>,
    ) -> Result<Vec<f32>> {
        let rows = self.forward_to_logits(pass, cache, s)?;
        let mut out = vec![0.0f32; rows * self.config.vocab_size];
        self.backend.read(&s.logits, 0, &mut out)?;
        Ok(out)
    }

    /// As [`Llama::forward`], but returns the greedy token (the argmax) of each requested
    /// row, picked by the backend where the logits are: a GPU sends back one id per row
    /// instead of `vocab` floats. The same tokens as `argmax` over `forward`'s rows.
    pub fn forward_argmax(
        &self,
        pass: Pass<'_, B>,
        cache: &mut KvCache<B>,
        s: &mut Scratch<B>,
    ) -> Result<Vec<u32>> {
        let rows = self.forward_to_logits(pass, cache, s)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.backend
            .argmax_rows(&s.logits, rows, self.config.vocab_size)
    }

    /// As [`Llama::forward`], but returns each requested row's [`RowVerdict`]: its argmax
    /// and the probability of `next[i]` under row `i` at `temperature` (Sirius's acceptance
    /// test), computed by the backend where the logits are.
    pub fn forward_verdicts(
        &self,
        pass: Pass<'_, B>,
        cache: &mut KvCache<B>,
        s: &mut Scratch<B>,
        next: &[u32],
        temperature: f32,
    ) -> Result<Vec<RowVerdict>> {
        let rows = self.forward_to_logits(pass, cache, s)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.backend
            .row_verdicts(&s.logits, rows, self.config.vocab_size, next, temperature)
    }

    /// The forward itself: leaves the requested rows' logits in `s.logits` (rows 0..) and
    /// returns how many rows that is (0 for none).
    fn forward_to_logits(
        &self,
        pass: Pass<'_, B>,
        cache: &mut KvCache<B>,
        s: &mut Scratch<B>,
    ) -> Result<usize> {
        let Pass {
            tokens,
            tree,
            logits,
            ffn,
            mut stream,
        } = pass;
        let n = tokens.len();
        if n == 0 {
            return Ok(0);
        }
        if n > s.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "batch of {n} tokens exceeds the scratch size {}",
                s.max_tokens
            )));
        }
        if let Some(mask) = tree {
            check_tree_batch(tokens, mask, cache)?;
        }
        cache.check_room(n)?;
        let (b, c) = (&self.backend, &self.config);
        let start = cache.len();
        b.embed(&self.embed, tokens, &mut s.x)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let streamed = match stream.as_deref_mut() {
                Some(st) => Some(st.acquire(li)?),
                None => None,
            };
            let attention = streamed.as_ref().and_then(|l| l.attention.as_ref());
            self.attention_block(li, layer, attention, cache, s, start, n, tree)?;
            self.ffn_block(li, layer, streamed.as_ref(), s, n, &mut *ffn)?;
            if let (Some(st), Some(l)) = (stream.as_deref_mut(), streamed) {
                st.release(l)?;
            }
        }
        cache.advance(n);
        let (first_row, rows) = match logits {
            Logits::None => return Ok(0),
            Logits::Last => (n - 1, 1),
            Logits::All => (0, n),
        };
        if rows > s.max_logit_rows {
            return Err(Error::InvalidArgument(format!(
                "logits for {rows} rows requested, the scratch holds {}",
                s.max_logit_rows
            )));
        }
        b.copy_rows(&s.x, first_row, &mut s.picked, 0, rows, c.hidden_size)?;
        b.rmsnorm(&s.picked, &self.final_norm, c.rms_norm_eps, rows, &mut s.xn)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // One token's next pick (decode, a chain's draft) needs only its maximum exact.
        let only_max = matches!(logits, Logits::Last);
        b.logits_matmul(head, &s.xn, rows, &mut s.logits, only_max)?;
        Ok(rows)
    }

    /// x += Wo · attention(rope(Wq·norm(x)), cache ∪ rope(Wk·norm(x)), cache ∪ Wv·norm(x))
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        li: usize,
        w: &LayerWeights<B>,
        streamed: Option<&StreamedAttention<B>>,
        cache: &mut KvCache<B>,
        s: &mut Scratch<B>,
        start: usize,
        n: usize,
        tree: Option<&TreeMask>,
    ) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        let (wq, wk, wv, wo) = match streamed {
            Some(a) => (&a.wq, &a.wk, &a.wv, &a.wo),
            None => (&w.wq, &w.wk, &w.wv, &w.wo),
        };
        b.rmsnorm(&s.x, &w.attn_norm, c.rms_norm_eps, n, &mut s.xn)?;
        b.matmul(wq, &s.xn, n, &mut s.q)?;
        b.matmul(wk, &s.xn, n, &mut s.k)?;
        b.matmul(wv, &s.xn, n, &mut s.v)?;
        self.add_bias(&mut s.q, &w.q_bias, n)?;
        self.add_bias(&mut s.k, &w.k_bias, n)?;
        self.add_bias(&mut s.v, &w.v_bias, n)?;
        let rows = match tree {
            None => Rows::Causal { start, len: n },
            Some(mask) => Rows::Tree(mask),
        };
        b.rope(&mut s.q, c.num_heads, rows, &self.rope)?;
        b.rope(&mut s.k, c.num_kv_heads, rows, &self.rope)?;
        b.store_kv(&s.k, &mut cache.keys[li], start, n, c.kv_dim())?;
        b.store_kv(&s.v, &mut cache.values[li], start, n, c.kv_dim())?;
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let (keys, values) = (&cache.keys[li], &cache.values[li]);
        b.attention(&s.q, keys, values, shape, rows, &mut s.attn)?;
        b.matmul(wo, &s.attn, n, &mut s.proj)?;
        self.add_bias(&mut s.proj, &w.o_bias, n)?;
        b.add(&mut s.x, &s.proj, n * c.hidden_size)
    }

    /// x += ffn(norm(x)) + down bias, the FFN as the pass's strategy computes it.
    fn ffn_block(
        &self,
        li: usize,
        w: &LayerWeights<B>,
        streamed: Option<&StreamedLayer<B>>,
        s: &mut Scratch<B>,
        n: usize,
        ffn: &mut dyn FfnStrategy<B>,
    ) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        b.rmsnorm(&s.x, &w.ffn_norm, c.rms_norm_eps, n, &mut s.xn)?;
        ffn.apply(FfnStep {
            backend: b,
            layer: li,
            n_tokens: n,
            dims: self.ffn_dims(),
            x: &s.xn,
            weights: &w.ffn,
            streamed: streamed.map(|l| &l.ffn),
            scratch: &mut s.ffn,
            out: &mut s.proj,
        })?;
        self.add_bias(&mut s.proj, &w.ffn.down_bias, n)?;
        b.add(&mut s.x, &s.proj, n * c.hidden_size)
    }

    fn add_bias(&self, x: &mut B::Buf, bias: &Option<B::Buf>, n: usize) -> Result<()> {
        match bias {
            Some(bias) => self.backend.add_bias(x, bias, n),
            None => Ok(()),
        }
    }
}

/// A tree batch must match its mask: one token per node, starting at the cache's end.
fn check_tree_batch<B: Backend>(tokens: &[u32], mask: &TreeMask, cache: &KvCache<B>) -> Result<()> {
    if mask.n_tokens() != tokens.len() || mask.first_row() != cache.len() {
        return Err(Error::InvalidArgument(format!(
            "tree batch of {} tokens at cache row {} does not match its mask ({} nodes from row {})",
            tokens.len(),
            cache.len(),
            mask.n_tokens(),
            mask.first_row()
        )));
    }
    Ok(())
}
