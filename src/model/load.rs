//! Building a [`Llama`] from a checkpoint: every tensor checked for its shape and the one
//! dtype all matrices share, then handed to the backend.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;

use crate::backend::{Backend, RopeTable, SparseOps};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::{LayerWeights, Llama};
use crate::model::rope::rope_frequencies;
use crate::model::source::{ModelFiles, WeightsChoice};
use crate::model::weight_checks::{check_all_used, check_finite};
use crate::model::weights::WeightStore;
use crate::sparsity::bundles::FfnTensors;
use crate::sparsity::ffn::FfnWeights;
use crate::sparsity::{Sparsity, SparsityConfig};
use crate::tensor::{DType, KvDType, TensorRef};

impl<B: Backend> Llama<B> {
    /// Loads the model of an HF-layout directory or a GGUF file, weights as stored (the
    /// tokenizer and chat template are [`ModelFiles`]'s).
    pub fn load(path: &Path, backend: B) -> Result<Self> {
        let (config, store) = ModelFiles::open_model(path, WeightsChoice::AsStored)?;
        Self::from_store(config, store, backend)
    }

    /// Builds the model from `store`: every tensor the config names, with its shape; the
    /// matrices of a float checkpoint in one dtype; norms and biases finite; and no tensor
    /// the config leaves unused.
    pub fn from_store(config: ModelConfig, store: WeightStore, backend: B) -> Result<Self> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let load = Loader {
            store: &store,
            backend: &backend,
            config: c,
            used: RefCell::new(HashSet::new()),
            float_dtype: store.common_float_dtype(),
        };
        let embed_t = load.float_matrix("model.embed_tokens.weight", [v, h])?;
        // The FFN's type names the model's (most of its bytes; what sparsity and offloading
        // work on). In a float checkpoint every matrix has it.
        let dtype = match c.num_layers {
            0 => embed_t.dtype,
            _ => {
                load.get(
                    "model.layers.0.mlp.gate_proj.weight",
                    &[c.intermediate_size, h],
                )?
                .dtype
            }
        };
        let layers = (0..c.num_layers)
            .map(|li| load.layer(li))
            .collect::<Result<Vec<_>>>()?;
        // Some checkpoints store lm_head even when tied; the config decides.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(load.matrix("lm_head.weight", [v, h])?)
        };
        let final_norm = load.vector("model.norm.weight", h)?;
        check_all_used(&store, &load.used.into_inner(), c)?;
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
                    norm: get(
                        format!("model.layers.{li}.post_attention_layernorm.weight"),
                        &[h],
                    )?,
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

/// Reads tensors of one checkpoint onto one backend, noting which it read.
struct Loader<'a, B: Backend> {
    store: &'a WeightStore,
    backend: &'a B,
    config: &'a ModelConfig,
    /// Names of the tensors read so far (what is left over is unused).
    used: RefCell<HashSet<String>>,
    /// The dtype most float matrices share: the matrices of a float checkpoint share one
    /// dtype (sparsity's bundles and offloading's byte accounting assume it); a quantized
    /// checkpoint (GGUF) mixes block formats per tensor, as llama.cpp's quantization mixes do.
    float_dtype: Option<DType>,
}

impl<B: Backend> Loader<'_, B> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        self.used.borrow_mut().insert(name.to_string());
        self.store.get(name, shape)
    }

    /// A matrix's tensor, refused when it is a float type other than the checkpoint's.
    fn float_matrix(&self, name: &str, shape: [usize; 2]) -> Result<TensorRef> {
        let t = self.get(name, &shape)?;
        match self.float_dtype {
            Some(common) if !t.dtype.is_quantized() && t.dtype != common => {
                Err(Error::MixedDType {
                    path: t.path.clone(),
                    name: name.into(),
                    actual: t.dtype.to_string(),
                    expected: common.to_string(),
                })
            }
            _ => Ok(t),
        }
    }

    fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<B::Matrix> {
        self.backend.matrix(&self.float_matrix(name, shape)?)
    }

    /// A norm or bias, refused when a value is NaN or infinite (one such value turns every
    /// output into garbage, e.g. a run that stops at its first token).
    fn vector(&self, name: &str, len: usize) -> Result<B::Buf> {
        let t = self.get(name, &[len])?;
        let values = t.to_f32();
        check_finite(&t, &values)?;
        self.backend.upload(&values)
    }

    /// `name.bias` of length `len` when the config says the model has it.
    fn bias(&self, present: bool, name: &str, len: usize) -> Result<Option<B::Buf>> {
        present
            .then(|| self.vector(&format!("{name}.bias"), len))
            .transpose()
    }

    fn layer(&self, li: usize) -> Result<LayerWeights<B>> {
        let c = self.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let p = format!("model.layers.{li}");
        let (a, m) = (format!("{p}.self_attn"), format!("{p}.mlp"));
        Ok(LayerWeights {
            attn_norm: self.vector(&format!("{p}.input_layernorm.weight"), h)?,
            wq: self.matrix(&format!("{a}.q_proj.weight"), [qd, h])?,
            wk: self.matrix(&format!("{a}.k_proj.weight"), [kvd, h])?,
            wv: self.matrix(&format!("{a}.v_proj.weight"), [kvd, h])?,
            wo: self.matrix(&format!("{a}.o_proj.weight"), [h, qd])?,
            q_bias: self.bias(c.qkv_bias, &format!("{a}.q_proj"), qd)?,
            k_bias: self.bias(c.qkv_bias, &format!("{a}.k_proj"), kvd)?,
            v_bias: self.bias(c.qkv_bias, &format!("{a}.v_proj"), kvd)?,
            o_bias: self.bias(c.o_bias, &format!("{a}.o_proj"), h)?,
            ffn_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn: FfnWeights {
                gate: self.matrix(&format!("{m}.gate_proj.weight"), [f, h])?,
                up: self.matrix(&format!("{m}.up_proj.weight"), [f, h])?,
                down: self.matrix(&format!("{m}.down_proj.weight"), [h, f])?,
                gate_bias: self.bias(c.mlp_bias, &format!("{m}.gate_proj"), f)?,
                up_bias: self.bias(c.mlp_bias, &format!("{m}.up_proj"), f)?,
                down_bias: self.bias(c.mlp_bias, &format!("{m}.down_proj"), h)?,
            },
        })
    }
}
