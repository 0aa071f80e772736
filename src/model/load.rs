//! Building a [`Llama`] from a checkpoint: every tensor checked for its shape and the one
//! dtype all matrices share, then handed to the backend.

use std::path::Path;

use crate::backend::{Backend, RopeTable, SparseOps};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::{LayerWeights, Llama};
use crate::model::rope::rope_frequencies;
use crate::model::source::{ModelFiles, WeightsChoice};
use crate::model::weights::WeightStore;
use crate::sparsity::bundles::FfnTensors;
use crate::sparsity::ffn::FfnWeights;
use crate::sparsity::{Sparsity, SparsityConfig};
use crate::tensor::{KvDType, TensorRef};

impl<B: Backend> Llama<B> {
    /// Loads the model of an HF-layout directory or a GGUF file, weights as stored (the
    /// tokenizer and chat template are [`ModelFiles`]'s).
    pub fn load(path: &Path, backend: B) -> Result<Self> {
        let (config, store) = ModelFiles::open_model(path, WeightsChoice::AsStored)?;
        Self::from_store(config, store, backend)
    }

    pub fn from_store(config: ModelConfig, store: WeightStore, backend: B) -> Result<Self> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed_t = store.get("model.embed_tokens.weight", &[v, h])?;
        // The FFN's type names the model's (most of its bytes; what sparsity and offloading
        // work on). In a float checkpoint every matrix has it.
        let dtype = match c.num_layers {
            0 => embed_t.dtype,
            _ => {
                store
                    .get(
                        "model.layers.0.mlp.gate_proj.weight",
                        &[c.intermediate_size, h],
                    )?
                    .dtype
            }
        };
        let load = Loader {
            store: &store,
            backend: &backend,
            config: c,
        };
        let layers = (0..c.num_layers)
            .map(|li| load.layer(li, &embed_t))
            .collect::<Result<Vec<_>>>()?;
        // Some checkpoints store lm_head even when tied; the config decides.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(load.matrix("lm_head.weight", [v, h], &embed_t)?)
        };
        let final_norm = load.vector("model.norm.weight", h)?;
        let embed = backend.matrix(&embed_t)?;
        let rope = RopeTable::new(c.head_dim, rope_frequencies(c));
        Ok(Llama {
            config,
            backend,
            dtype,
            kv_dtype: KvDType::default(),
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            store,
        })
    }

    /// Every layer's FFN tensors in the checkpoint (what sparsity rearranges into bundles).
    pub fn ffn_tensors(&self) -> Result<Vec<FfnTensors>> {
        let c = &self.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let get = |name: String, shape: &[usize]| self.store.get(&name, shape);
        (0..c.num_layers)
            .map(|li| {
                let p = format!("model.layers.{li}.mlp");
                let bias = |name: &str| -> Result<Option<TensorRef>> {
                    c.mlp_bias
                        .then(|| get(format!("{p}.{name}.bias"), &[f]))
                        .transpose()
                };
                Ok(FfnTensors {
                    gate: get(format!("{p}.gate_proj.weight"), &[f, h])?,
                    up: get(format!("{p}.up_proj.weight"), &[f, h])?,
                    down: get(format!("{p}.down_proj.weight"), &[h, f])?,
                    gate_bias: bias("gate_proj")?,
                    up_bias: bias("up_proj")?,
                })
            })
            .collect()
    }
}

impl<B: SparseOps> Llama<B> {
    /// The sparse FFN `config` asks for, built for this model (bundles, thresholds).
    pub fn sparsity(&self, config: &SparsityConfig) -> Result<Sparsity<B>> {
        let ffn = self.ffn_tensors()?;
        Sparsity::new(&self.backend, &self.config, &ffn, config)
    }
}

/// Reads tensors of one checkpoint onto one backend.
struct Loader<'a, B: Backend> {
    store: &'a WeightStore,
    backend: &'a B,
    config: &'a ModelConfig,
}

impl<B: Backend> Loader<'_, B> {
    /// A matrix of `shape`, in the dtype of `like`: the matrices of a float checkpoint share
    /// one dtype (sparsity's bundles and offloading's byte accounting assume it); a quantized
    /// checkpoint (GGUF) mixes block formats per tensor, as llama.cpp's quantization mixes do.
    fn matrix(&self, name: &str, shape: [usize; 2], like: &TensorRef) -> Result<B::Matrix> {
        let t = self.store.get(name, &shape)?;
        if t.dtype != like.dtype && !t.dtype.is_quantized() && !like.dtype.is_quantized() {
            return Err(Error::MixedDType {
                path: t.path.clone(),
                name: name.into(),
                actual: t.dtype.to_string(),
                expected: like.dtype.to_string(),
            });
        }
        self.backend.matrix(&t)
    }

    fn vector(&self, name: &str, len: usize) -> Result<B::Buf> {
        self.backend.upload(&self.store.get(name, &[len])?.to_f32())
    }

    /// `name.bias` of length `len` when the config says the model has it.
    fn bias(&self, present: bool, name: &str, len: usize) -> Result<Option<B::Buf>> {
        present
            .then(|| self.vector(&format!("{name}.bias"), len))
            .transpose()
    }

    fn layer(&self, li: usize, like: &TensorRef) -> Result<LayerWeights<B>> {
        let c = self.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let p = format!("model.layers.{li}");
        let (a, m) = (format!("{p}.self_attn"), format!("{p}.mlp"));
        Ok(LayerWeights {
            attn_norm: self.vector(&format!("{p}.input_layernorm.weight"), h)?,
            wq: self.matrix(&format!("{a}.q_proj.weight"), [qd, h], like)?,
            wk: self.matrix(&format!("{a}.k_proj.weight"), [kvd, h], like)?,
            wv: self.matrix(&format!("{a}.v_proj.weight"), [kvd, h], like)?,
            wo: self.matrix(&format!("{a}.o_proj.weight"), [h, qd], like)?,
            q_bias: self.bias(c.qkv_bias, &format!("{a}.q_proj"), qd)?,
            k_bias: self.bias(c.qkv_bias, &format!("{a}.k_proj"), kvd)?,
            v_bias: self.bias(c.qkv_bias, &format!("{a}.v_proj"), kvd)?,
            o_bias: self.bias(c.o_bias, &format!("{a}.o_proj"), h)?,
            ffn_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn: FfnWeights {
                gate: self.matrix(&format!("{m}.gate_proj.weight"), [f, h], like)?,
                up: self.matrix(&format!("{m}.up_proj.weight"), [f, h], like)?,
                down: self.matrix(&format!("{m}.down_proj.weight"), [h, f], like)?,
                gate_bias: self.bias(c.mlp_bias, &format!("{m}.gate_proj"), f)?,
                up_bias: self.bias(c.mlp_bias, &format!("{m}.up_proj"), f)?,
                down_bias: self.bias(c.mlp_bias, &format!("{m}.down_proj"), h)?,
            },
        })
    }
}
