//! THE Llama forward pass (Llama 2/3/3.1, Mistral, Qwen2), written once against [`Backend`].
//! Sparsity and offloading plug into it (FFN selection, weight residency); they never copy it.

use std::path::Path;

use crate::backend::{
    AttentionShape, Backend, BundleLayout, BundleSelection, NeuronLists, RopeTable, TreeMask,
};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::kv_cache::KvCache;
use crate::model::streamed::{LayerStream, StreamedAttention, StreamedLayer};
use crate::model::weights::WeightStore;
use crate::sparsity::calibrate::GateRecorder;
use crate::sparsity::{CatsRule, GriffinFfn, GriffinScores, NeuronBundles, NeuronCounter};

/// Weights of one decoder layer. Shapes are `[rows, cols]` = `[out, in]`; h = hidden,
/// q = heads*head_dim, kv = kv_heads*head_dim, f = intermediate.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Buf,         // [h]
    pub wq: B::Matrix,             // [q, h]
    pub wk: B::Matrix,             // [kv, h]
    pub wv: B::Matrix,             // [kv, h]
    pub wo: B::Matrix,             // [h, q]
    pub q_bias: Option<B::Buf>,    // [q]   (Qwen2, attention_bias)
    pub k_bias: Option<B::Buf>,    // [kv]
    pub v_bias: Option<B::Buf>,    // [kv]
    pub o_bias: Option<B::Buf>,    // [h]   (attention_bias)
    pub ffn_norm: B::Buf,          // [h]
    pub w_gate: B::Matrix,         // [f, h]
    pub w_up: B::Matrix,           // [f, h]
    pub w_down: B::Matrix,         // [h, f]
    pub gate_bias: Option<B::Buf>, // [f] (mlp_bias)
    pub up_bias: Option<B::Buf>,   // [f]
    pub down_bias: Option<B::Buf>, // [h]
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    /// Stored dtype of the matrices.
    pub dtype: DType,
    embed: B::Matrix, // [vocab, h]
    layers: Vec<LayerWeights<B>>,
    final_norm: B::Buf, // [h]
    /// `None` when the head is tied to the embedding.
    lm_head: Option<B::Matrix>, // [vocab, h]
    rope: RopeTable,
    /// Keeps the mapped checkpoint alive and answers size questions.
    store: WeightStore,
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

/// The FFN a forward pass runs: dense, or one of the sparse forms (see `crate::sparsity`).
/// Attention is always dense.
pub enum Ffn<'a, B: Backend> {
    Dense,
    /// Dense, accumulating Griffin's neuron scores (the prefill of a Griffin request).
    DenseScoring(&'a mut GriffinScores<B>),
    /// Dense, handing every layer's SiLU(gate) to a recorder (CATS calibration).
    DenseRecording(&'a mut dyn GateRecorder),
    /// Griffin: the request's compact FFN of gathered bundles.
    Griffin(&'a GriffinFfn<B>),
    /// CATS: dense gate, then up/down over the bundles of the neurons `rule` keeps per token
    /// (with `shared`, one set for the whole batch: the beams of a Sirius tree).
    Cats {
        bundles: &'a NeuronBundles<B>,
        rule: &'a CatsRule,
        counter: &'a mut NeuronCounter,
        shared: bool,
    },
    /// The dense FFN of an offloaded full pass: the request's resident Griffin neurons plus
    /// the streamed bundles of the rest (`StreamedLayer::complement`); layers whose sparse
    /// set is not resident get their whole FFN streamed (`StreamedLayer::dense_ffn`).
    SplitDense(&'a GriffinFfn<B>),
}

/// Where the tokens of a batch sit: after the cache, one after another (prompt, decode,
/// chain windows), or as nodes of a token tree (Sirius with width > 1).
#[derive(Clone, Copy)]
enum Layout<'a> {
    Causal,
    Tree(&'a TreeMask),
}

/// Activation buffers for batches of up to `max_tokens` tokens (of which at most
/// `max_logit_rows` want logits), reused across calls.
pub struct Scratch<B: Backend> {
    max_tokens: usize,
    max_logit_rows: usize,
    x: B::Buf,         // [n, h] residual stream
    xn: B::Buf,        // [n, h] normed
    q: B::Buf,         // [n, q]
    k: B::Buf,         // [n, kv]
    v: B::Buf,         // [n, kv]
    attn: B::Buf,      // [n, q]
    proj: B::Buf,      // [n, h] output of wo / w_down
    part: B::Buf,      // [n, h] second FFN part (offloading: the streamed complement)
    gate: B::Buf,      // [n, f]
    up: B::Buf,        // [n, f]
    picked: B::Buf,    // [r, h] rows selected for the head
    logits: B::Buf,    // [r, vocab]
    kept: NeuronLists, // CATS: kept neurons per token (host)
}

impl<B: Backend> Scratch<B> {
    /// Scratch for batches of `max_tokens` that may all want logits.
    pub fn new(model: &Llama<B>, max_tokens: usize) -> Result<Self> {
        Self::with_logit_rows(model, max_tokens, max_tokens)
    }

    /// Scratch whose batches want logits for at most `max_logit_rows` rows (1 for plain
    /// generation): the logits buffer is rows x vocab, the largest one here.
    pub fn with_logit_rows(
        model: &Llama<B>,
        max_tokens: usize,
        max_logit_rows: usize,
    ) -> Result<Self> {
        let c = &model.config;
        let b = &model.backend;
        let n = max_tokens.max(1);
        let r = max_logit_rows.clamp(1, n);
        Ok(Scratch {
            max_tokens: n,
            max_logit_rows: r,
            x: b.alloc(n * c.hidden_size)?,
            xn: b.alloc(n * c.hidden_size)?,
            q: b.alloc(n * c.q_dim())?,
            k: b.alloc(n * c.kv_dim())?,
            v: b.alloc(n * c.kv_dim())?,
            attn: b.alloc(n * c.q_dim())?,
            proj: b.alloc(n * c.hidden_size)?,
            part: b.alloc(n * c.hidden_size)?,
            gate: b.alloc(n * c.intermediate_size)?,
            up: b.alloc(n * c.intermediate_size)?,
            picked: b.alloc(r * c.hidden_size)?,
            logits: b.alloc(r * c.vocab_size)?,
            kept: NeuronLists::default(),
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes of the f32 buffers [`Scratch::with_logit_rows`] allocates (an offloading
    /// runtime reserves them in its budget before allocating).
    pub fn byte_size(c: &ModelConfig, max_tokens: usize, max_logit_rows: usize) -> u64 {
        let n = max_tokens.max(1);
        let r = max_logit_rows.clamp(1, n);
        let per_token =
            5 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.intermediate_size;
        (4 * (n * per_token + r * (c.hidden_size + c.vocab_size))) as u64
    }
}

impl<B: Backend> Llama<B> {
    /// Loads config.json and the safetensors weights of an HF-layout directory.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir)?;
        Self::from_store(config, store, backend)
    }

    pub fn from_store(config: ModelConfig, store: WeightStore, backend: B) -> Result<Self> {
        let c = &config;
        let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let embed_t = store.get("model.embed_tokens.weight", &[v, h])?;
        let dtype = embed_t.dtype;
        // All matrices must share one dtype: the kernels and byte accounting assume it.
        let matrix = |name: &str, shape: [usize; 2]| -> Result<B::Matrix> {
            let t = store.get(name, &shape)?;
            if t.dtype != dtype {
                return Err(Error::MixedDType {
                    path: t.path.clone(),
                    name: name.into(),
                    actual: t.dtype,
                    expected: dtype,
                });
            }
            backend.matrix(&t)
        };
        let vector = |name: &str, len: usize| -> Result<B::Buf> {
            backend.vector(&store.get(name, &[len])?)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let bias = |present: bool, name: &str, len: usize| -> Result<Option<B::Buf>> {
                if present {
                    vector(&format!("{p}.{name}.bias"), len).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                wq: matrix(&format!("{p}.self_attn.q_proj.weight"), [qd, h])?,
                wk: matrix(&format!("{p}.self_attn.k_proj.weight"), [kvd, h])?,
                wv: matrix(&format!("{p}.self_attn.v_proj.weight"), [kvd, h])?,
                wo: matrix(&format!("{p}.self_attn.o_proj.weight"), [h, qd])?,
                q_bias: bias(c.qkv_bias, "self_attn.q_proj", qd)?,
                k_bias: bias(c.qkv_bias, "self_attn.k_proj", kvd)?,
                v_bias: bias(c.qkv_bias, "self_attn.v_proj", kvd)?,
                o_bias: bias(c.o_bias, "self_attn.o_proj", h)?,
                ffn_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                w_gate: matrix(&format!("{p}.mlp.gate_proj.weight"), [f, h])?,
                w_up: matrix(&format!("{p}.mlp.up_proj.weight"), [f, h])?,
                w_down: matrix(&format!("{p}.mlp.down_proj.weight"), [h, f])?,
                gate_bias: bias(c.mlp_bias, "mlp.gate_proj", f)?,
                up_bias: bias(c.mlp_bias, "mlp.up_proj", f)?,
                down_bias: bias(c.mlp_bias, "mlp.down_proj", h)?,
            });
        }
        // Some checkpoints store lm_head even when tied; the config decides.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(matrix("lm_head.weight", [v, h])?)
        };
        let final_norm = vector("model.norm.weight", h)?;
        let embed = backend.matrix(&embed_t)?;
        let rope = RopeTable::new(c);
        Ok(Llama {
            config,
            backend,
            dtype,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            store,
        })
    }

    pub fn new_cache(&self, capacity: usize) -> Result<KvCache<B>> {
        KvCache::new(
            &self.backend,
            self.config.num_layers,
            self.config.kv_dim(),
            capacity,
        )
    }

    /// The checkpoint (for layouts built from it, such as neuron bundles).
    pub fn weights(&self) -> &WeightStore {
        &self.store
    }

    /// Offloading: replaces the attention projections of the layers where `attention[li]` is
    /// set, and the LM head (a separate copy of the embedding when tied: lookups stay on the
    /// host), by copies `copy` makes in the runtime's resident memory. Returns the bytes
    /// copied. The other weights stay where they are and are only read through streaming.
    pub fn make_resident(
        &mut self,
        attention: &[bool],
        copy: &mut ResidentCopy<'_, B>,
    ) -> Result<()> {
        for (li, layer) in self.layers.iter_mut().enumerate() {
            if attention.get(li).copied().unwrap_or(false) {
                layer.wq = copy(&format!("layer {li} wq"), &layer.wq)?;
                layer.wk = copy(&format!("layer {li} wk"), &layer.wk)?;
                layer.wv = copy(&format!("layer {li} wv"), &layer.wv)?;
                layer.wo = copy(&format!("layer {li} wo"), &layer.wo)?;
            }
        }
        let head = copy("LM head", self.lm_head.as_ref().unwrap_or(&self.embed))?;
        self.lm_head = Some(head);
        Ok(())
    }

    /// Bytes of all weights in the checkpoint.
    pub fn weight_bytes(&self) -> usize {
        self.store.total_bytes()
    }

    /// Runs `tokens` (at most `scratch.max_tokens()`) at positions cache.len().., appends their
    /// K/V to the cache and returns the requested logits, row-major `[rows, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        scratch: &mut Scratch<B>,
        want: Logits,
    ) -> Result<Vec<f32>> {
        self.forward_with(tokens, cache, scratch, want, &mut Ffn::Dense)
    }

    /// [`Llama::forward`] with the FFN `ffn` (dense, or sparse).
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        scratch: &mut Scratch<B>,
        want: Logits,
        ffn: &mut Ffn<B>,
    ) -> Result<Vec<f32>> {
        self.forward_layout(tokens, Layout::Causal, cache, scratch, want, ffn, None)
    }

    /// [`Llama::forward_with`] (or [`Llama::forward_tree`] with a `mask`) where the layers
    /// read the weights `stream` puts in place instead of resident ones they lack
    /// (offloading, see `crate::offload`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_streamed(
        &self,
        tokens: &[u32],
        mask: Option<&TreeMask>,
        cache: &mut KvCache<B>,
        scratch: &mut Scratch<B>,
        want: Logits,
        ffn: &mut Ffn<B>,
        stream: &mut dyn LayerStream<B>,
    ) -> Result<Vec<f32>> {
        let layout = match mask {
            Some(mask) => {
                check_tree_batch(tokens, mask, cache)?;
                Layout::Tree(mask)
            }
            None => Layout::Causal,
        };
        self.forward_layout(tokens, layout, cache, scratch, want, ffn, Some(stream))
    }

    /// Runs the last `mask.n_tokens()` nodes of a token tree (`tokens`, one per node) at cache
    /// rows `cache.len()..`: each node attends to the prefix and its own ancestors and sits at
    /// the rotary position of its depth (see [`TreeMask`]).
    pub fn forward_tree(
        &self,
        tokens: &[u32],
        mask: &TreeMask,
        cache: &mut KvCache<B>,
        scratch: &mut Scratch<B>,
        want: Logits,
        ffn: &mut Ffn<B>,
    ) -> Result<Vec<f32>> {
        check_tree_batch(tokens, mask, cache)?;
        self.forward_layout(tokens, Layout::Tree(mask), cache, scratch, want, ffn, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_layout(
        &self,
        tokens: &[u32],
        layout: Layout<'_>,
        cache: &mut KvCache<B>,
        scratch: &mut Scratch<B>,
        want: Logits,
        ffn: &mut Ffn<B>,
        mut stream: Option<&mut dyn LayerStream<B>>,
    ) -> Result<Vec<f32>> {
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > scratch.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "batch of {n} tokens exceeds the scratch size {}",
                scratch.max_tokens
            )));
        }
        cache.check_room(n)?;
        let b = &self.backend;
        let c = &self.config;
        let s = scratch;
        let start = cache.len();
        b.embed(&self.embed, tokens, &mut s.x)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let streamed = match stream.as_deref_mut() {
                Some(st) => Some(st.acquire(li)?),
                None => None,
            };
            let attention = streamed.as_ref().and_then(|l| l.attention.as_ref());
            self.attention_block(li, layer, attention, cache, s, start, n, layout)?;
            self.ffn_block(li, layer, streamed.as_ref(), s, n, ffn)?;
            if let (Some(st), Some(l)) = (stream.as_deref_mut(), streamed) {
                st.release(l)?;
            }
        }
        cache.advance(n);
        let (first_row, rows) = match want {
            Logits::None => return Ok(Vec::new()),
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
        b.matmul(
            self.lm_head.as_ref().unwrap_or(&self.embed),
            &s.xn,
            rows,
            &mut s.logits,
        )?;
        let mut out = vec![0.0f32; rows * c.vocab_size];
        b.read(&s.logits, 0, &mut out)?;
        Ok(out)
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
        layout: Layout<'_>,
    ) -> Result<()> {
        let b = &self.backend;
        let c = &self.config;
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
        match layout {
            Layout::Causal => {
                b.rope(&mut s.q, c.num_heads, start, n, &self.rope)?;
                b.rope(&mut s.k, c.num_kv_heads, start, n, &self.rope)?;
            }
            Layout::Tree(mask) => {
                b.rope_at(&mut s.q, c.num_heads, mask.positions(), &self.rope)?;
                b.rope_at(&mut s.k, c.num_kv_heads, mask.positions(), &self.rope)?;
            }
        }
        b.copy_rows(&s.k, 0, &mut cache.keys[li], start, n, c.kv_dim())?;
        b.copy_rows(&s.v, 0, &mut cache.values[li], start, n, c.kv_dim())?;
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let (keys, values) = (&cache.keys[li], &cache.values[li]);
        match layout {
            Layout::Causal => b.attention(&s.q, keys, values, shape, start, n, &mut s.attn)?,
            Layout::Tree(mask) => b.tree_attention(&s.q, keys, values, shape, mask, &mut s.attn)?,
        }
        b.matmul(wo, &s.attn, n, &mut s.proj)?;
        self.add_bias(&mut s.proj, &w.o_bias, n)?;
        b.add(&mut s.x, &s.proj, n * c.hidden_size)
    }

    /// x += W_down · (silu(W_gate·norm(x)) ⊙ W_up·norm(x)), over the neurons `ffn` keeps.
    fn ffn_block(
        &self,
        li: usize,
        w: &LayerWeights<B>,
        streamed: Option<&StreamedLayer<B>>,
        s: &mut Scratch<B>,
        n: usize,
        ffn: &mut Ffn<B>,
    ) -> Result<()> {
        let b = &self.backend;
        let c = &self.config;
        let f = c.intermediate_size;
        b.rmsnorm(&s.x, &w.ffn_norm, c.rms_norm_eps, n, &mut s.xn)?;
        // A full pass over a layer whose sparse set is not resident streams its whole FFN.
        let streamed_dense = streamed.and_then(|l| l.dense_ffn.as_ref());
        match ffn {
            Ffn::Griffin(g) => self.griffin_part(g, li, streamed, s, n)?,
            Ffn::SplitDense(g) if streamed_dense.is_none() => {
                // Dense = resident neurons + the rest, streamed as bundles. The sum runs in
                // another order than one dense matmul, so results agree to rounding.
                self.griffin_part(g, li, streamed, s, n)?;
                let complement = streamed.and_then(|l| l.complement.as_ref());
                let whole = g.selection.layers.get(li).is_some_and(|k| k.len() >= f);
                match complement {
                    Some(complement) => {
                        let all = BundleSelection::All {
                            gate_bias: None,
                            up_bias: None,
                        };
                        let layout = BundleLayout::GateUpDown;
                        b.bundle_ffn(complement, layout, &s.xn, n, all, &mut s.part)?;
                        b.add(&mut s.proj, &s.part, n * c.hidden_size)?;
                    }
                    // Every neuron is resident (keep 1): nothing to add.
                    None if whole => {}
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "layer {li}: an offloaded full pass needs the streamed FFN complement"
                        )))
                    }
                }
            }
            Ffn::Cats {
                bundles,
                rule,
                counter,
                shared,
            } => {
                let l = bundles
                    .layers
                    .get(li)
                    .ok_or_else(|| Error::InvalidArgument(format!("no bundles for layer {li}")))?;
                b.matmul(&w.w_gate, &s.xn, n, &mut s.gate)?;
                self.add_bias(&mut s.gate, &w.gate_bias, n)?;
                b.silu(&mut s.gate, n * f)?;
                if *shared {
                    b.select_neurons_shared(&mut s.gate, n, f, rule.for_layer(li), &mut s.kept)?;
                } else {
                    b.select_neurons(&mut s.gate, n, f, rule.for_layer(li), &mut s.kept)?;
                }
                counter.add(li, s.kept.total(), n);
                let sel = BundleSelection::PerToken {
                    coeff: &s.gate,
                    kept: &s.kept,
                    up_bias: w.up_bias.as_ref(),
                };
                b.bundle_ffn(&l.matrix, bundles.layout, &s.xn, n, sel, &mut s.proj)?;
            }
            Ffn::Dense | Ffn::DenseScoring(_) | Ffn::DenseRecording(_) | Ffn::SplitDense(_) => {
                let (w_gate, w_up, w_down) = match (streamed_dense, streamed) {
                    (Some(d), _) => (&d.gate, &d.up, &d.down),
                    (None, None) => (&w.w_gate, &w.w_up, &w.w_down),
                    // Offloaded: the checkpoint's FFN is host memory, never read in place.
                    (None, Some(_)) => {
                        return Err(Error::InvalidArgument(format!(
                            "layer {li}: an offloaded dense pass needs the layer's FFN streamed"
                        )))
                    }
                };
                b.matmul(w_gate, &s.xn, n, &mut s.gate)?;
                b.matmul(w_up, &s.xn, n, &mut s.up)?;
                self.add_bias(&mut s.gate, &w.gate_bias, n)?;
                self.add_bias(&mut s.up, &w.up_bias, n)?;
                if let Ffn::DenseRecording(recorder) = ffn {
                    let mut act = vec![0f32; n * f];
                    b.read(&s.gate, 0, &mut act)?;
                    // Host memory: the CPU kernels' SIMD silu (a scalar exp per value made
                    // calibration twice as slow as the forward pass).
                    crate::backend::cpu::silu(&mut act);
                    recorder.record(li, &act);
                }
                b.silu_mul(&mut s.gate, &s.up, n * f)?;
                if let Ffn::DenseScoring(scores) = ffn {
                    let acc = scores.layers.get_mut(li).ok_or_else(|| {
                        Error::InvalidArgument(format!("no Griffin scores for layer {li}"))
                    })?;
                    b.accumulate_neuron_scores(&s.gate, n, f, acc)?;
                    if li + 1 == c.num_layers {
                        scores.tokens += n;
                    }
                }
                b.matmul(w_down, &s.gate, n, &mut s.proj)?;
            }
        }
        self.add_bias(&mut s.proj, &w.down_bias, n)?;
        b.add(&mut s.x, &s.proj, n * c.hidden_size)
    }

    /// proj = the request's Griffin FFN of layer `li` (resident, or streamed for this pass when
    /// it did not fit): the dense FFN over k gathered neurons, s.gate and s.up holding [n, k].
    fn griffin_part(
        &self,
        g: &GriffinFfn<B>,
        li: usize,
        streamed: Option<&StreamedLayer<B>>,
        s: &mut Scratch<B>,
        n: usize,
    ) -> Result<()> {
        let b = &self.backend;
        let resident = g
            .layers
            .get(li)
            .ok_or_else(|| Error::InvalidArgument(format!("no Griffin FFN for layer {li}")))?;
        let (gate, up, down) = match (resident, streamed.and_then(|l| l.sparse_ffn.as_ref())) {
            (Some(l), _) => (&l.gate, &l.up, &l.down),
            (None, Some(st)) => (&st.gate, &st.up, &st.down),
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "layer {li}'s Griffin FFN is neither resident nor streamed"
                )))
            }
        };
        let k = g.selection.layers[li].len();
        b.matmul(gate, &s.xn, n, &mut s.gate)?;
        b.matmul(up, &s.xn, n, &mut s.up)?;
        if let Some(l) = resident {
            self.add_bias(&mut s.gate, &l.gate_bias, n)?;
            self.add_bias(&mut s.up, &l.up_bias, n)?;
        }
        b.silu_mul(&mut s.gate, &s.up, n * k)?;
        b.matmul(down, &s.gate, n, &mut s.proj)
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

impl<B: Backend> Llama<B> {
    pub fn backend_description(&self) -> String {
        self.backend.describe()
    }
}
