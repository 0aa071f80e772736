//! The CPU implementation of [`Backend`]: f32 activations in `Vec<f32>`, weights left in the
//! memory-mapped checkpoint in their stored dtype, SIMD kernels from `backend::cpu`.

use std::sync::Arc;

use super::checks;
use super::cpu::{self as kernels, Isa, ThreadPool};
use super::cpu_kv::CpuKv;
pub use super::cpu_matrix::CpuMatrix;
use super::cpu_matrix::{huge_page_copy, Storage};
use super::{
    AttentionShape, Backend, BundleLayout, BundleSelection, NeuronLists, NeuronRule, RopeTable,
    Rows, SparseOps,
};
use crate::error::{Error, Result};
use crate::tensor::TensorRef;
use crate::tensor::{DType, KvDType};

/// Compute threads per available core that a CPU backend accepts. The workers spin while
/// they wait, so more than one per core already slows every op; a few per core still leave
/// room for machines whose reported parallelism is below what they can run (a CPU quota).
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The most compute threads a CPU backend runs on this machine:
/// [`MAX_THREADS_PER_CORE`] per available core.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_mul(MAX_THREADS_PER_CORE)
}

pub struct CpuBackend {
    pool: ThreadPool,
    /// The SIMD tier every op runs on.
    isa: Isa,
}

impl CpuBackend {
    /// A backend with `threads` compute threads (0 = one per available core), at most
    /// [`max_threads`] (more are clamped: each is a spinning worker with its own stack).
    pub fn new(threads: usize) -> CpuBackend {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let n = if threads == 0 { cores } else { threads };
        if n > max_threads() {
            tracing::warn!(
                "{n} threads asked for, {} used: more than {MAX_THREADS_PER_CORE} per core only contend",
                max_threads()
            );
        }
        let n = n.min(max_threads());
        if n > cores {
            tracing::warn!("{n} threads on {cores} cores: the spinning workers will contend; expect a slowdown");
        }
        CpuBackend {
            pool: ThreadPool::new(n),
            isa: kernels::isa(),
        }
    }

    /// A backend whose ops all run on the ISA tier `isa` instead of the selected one (tier
    /// comparisons, a tier's end-to-end results); an error if this machine cannot run it.
    pub fn with_isa(threads: usize, isa: Isa) -> Result<CpuBackend> {
        if !isa.is_supported() {
            return Err(Error::InvalidArgument(format!(
                "CPU ISA tier {} is not supported on this machine",
                isa.name()
            )));
        }
        Ok(CpuBackend {
            isa,
            ..CpuBackend::new(threads)
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// `m` without decode aids on the scalar tier, which has no kernels for them.
    fn with_aids_for_tier(&self, mut m: CpuMatrix) -> CpuMatrix {
        if self.isa == Isa::Scalar {
            m.aids = None;
        }
        m
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Matrix = CpuMatrix;
    type KvBuf = CpuKv;

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            self.isa.name(),
            self.pool.n_threads()
        )
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn matrix(&self, t: &TensorRef) -> Result<CpuMatrix> {
        let (rows, cols) = checks::matrix_shape(t)?;
        let (map, range) = t.mapping();
        Ok(self.with_aids_for_tier(CpuMatrix::with_aids(
            Storage::Mapped(map, range),
            t.dtype,
            rows,
            cols,
        )))
    }

    /// On the host already: picked in place, without the default's copy.
    fn argmax_rows(&self, x: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<u32>> {
        super::argmax::argmax_of_rows(x, rows, cols)
    }

    fn row_verdicts(
        &self,
        x: &Vec<f32>,
        rows: usize,
        cols: usize,
        next: &[u32],
        temperature: f32,
    ) -> Result<Vec<super::argmax::RowVerdict>> {
        super::argmax::row_verdicts_of(x, rows, cols, next, temperature)
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn embed(&self, table: &CpuMatrix, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let cols = table.cols;
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= table.rows {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: table.rows,
                });
            }
            kernels::row_to_f32_with_isa(
                self.isa,
                table.bytes(),
                table.dtype,
                cols,
                id as usize,
                &mut out[t * cols..(t + 1) * cols],
            );
        }
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        eps: f32,
        n_tokens: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let n = n_tokens * weight.len();
        kernels::rmsnorm(&x[..n], weight, eps, &mut out[..n]);
        Ok(())
    }

    fn matmul(
        &self,
        w: &CpuMatrix,
        x: &Vec<f32>,
        n_tokens: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if n_tokens == 1 {
            if let Some(p) = w.packed(&self.pool) {
                let (x, y) = (&x[..w.cols], &mut out[..w.rows]);
                if kernels::matvec_packed_with_isa(self.isa, &self.pool, p, x, y) {
                    return Ok(());
                }
            }
        }
        kernels::matmul_with_isa(
            self.isa,
            &self.pool,
            w.bytes(),
            w.dtype,
            w.rows,
            w.cols,
            &x[..n_tokens * w.cols],
            n_tokens,
            &mut out[..n_tokens * w.rows],
        );
        Ok(())
    }

    /// One token's logits from a Q8_0 head: for the next token's pick, quantized
    /// activations and the rows that can be the maximum recomputed exactly (see
    /// `cpu::logits_q8`); else f32 activations (8-bit ones flip near-tie picks: "Paris"
    /// becomes "L'Étoile" on SmolLM2's Q4_1 GGUF); several tokens' (up to 16) with the same
    /// exact row products as the rescoring. Anything else is [`Backend::matmul`], whose rows
    /// for several tokens are bit for bit its rows for each token alone. Either way a
    /// verification picks what plain decoding picks.
    fn logits_matmul(
        &self,
        head: &CpuMatrix,
        x: &Vec<f32>,
        n_tokens: usize,
        out: &mut Vec<f32>,
        only_max: bool,
    ) -> Result<()> {
        if n_tokens > 1 && head.dtype == DType::Q8_0 {
            // Several tokens' logits (a verification, a tree) computed as a decode step's
            // pick is: the exact row products for a Q8_0 head; other heads take 8-bit
            // activations at one token and at several alike (`Backend::matmul`).
            kernels::matmul_exact_with_isa(
                self.isa,
                &self.pool,
                head.bytes(),
                head.dtype,
                head.rows,
                head.cols,
                &x[..n_tokens * head.cols],
                n_tokens,
                &mut out[..n_tokens * head.rows],
            );
            return Ok(());
        }
        if head.dtype != DType::Q8_0 {
            return self.matmul(head, x, n_tokens, out);
        }
        let (x, y) = (&x[..head.cols], &mut out[..head.rows]);
        if let Some(aids) = only_max.then(|| head.packed(&self.pool)).flatten() {
            let exact = kernels::logits_q8_with_isa(self.isa, &self.pool, head.bytes(), aids, x, y);
            if let Some(exact) = exact {
                tracing::trace!("logits: {exact} of {} rows recomputed exactly", head.rows);
                return Ok(());
            }
        }
        let (rows, cols) = (head.rows, head.cols);
        kernels::matvec_exact_with_isa(
            self.isa,
            &self.pool,
            head.bytes(),
            head.dtype,
            rows,
            cols,
            x,
            y,
        );
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, n_tokens: usize) -> Result<()> {
        for row in x.chunks_exact_mut(bias.len()).take(n_tokens) {
            kernels::add_inplace(row, bias);
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        num_heads: usize,
        rows: Rows<'_>,
        table: &RopeTable,
    ) -> Result<()> {
        match rows {
            Rows::Causal { start, len } => table.rotate_rows(x, num_heads, start, len),
            Rows::Tree(mask) => table.rotate_at(x, num_heads, mask.positions().iter().copied()),
        }
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &Vec<f32>,
        src_row: usize,
        dst: &mut Vec<f32>,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        let (s, d, n) =
            checks::row_copy_range(src.len(), src_row, dst.len(), dst_row, n_rows, row_len)?;
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &CpuKv,
        v_cache: &CpuKv,
        shape: AttentionShape,
        rows: Rows<'_>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let width = shape.num_heads * shape.head_dim;
        let n = rows.len();
        let (start, mask, cache_rows) = match rows {
            Rows::Causal { start, len } => (start, None, start + len),
            Rows::Tree(mask) => (mask.first_row(), Some(mask), mask.prefix() + mask.span()),
        };
        let kv_rows = cache_rows * shape.num_kv_heads * shape.head_dim;
        if q.len() < n * width
            || out.len() < n * width
            || k_cache.len() < kv_rows
            || v_cache.len() < kv_rows
        {
            return Err(Error::InvalidArgument(format!(
                "attention over {cache_rows} cache rows for {n} tokens does not fit its buffers"
            )));
        }
        kernels::attention_with_isa(
            self.isa,
            &self.pool,
            &q[..n * width],
            k_cache.view(),
            v_cache.view(),
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            start,
            n,
            mask,
            &mut out[..n * width],
        );
        Ok(())
    }

    fn alloc_kv(&self, len: usize, dtype: KvDType) -> Result<CpuKv> {
        Ok(CpuKv::zeroed(len, dtype))
    }

    fn store_kv(
        &self,
        src: &Vec<f32>,
        dst: &mut CpuKv,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        dst.store(src, dst_row, n_rows, row_len)
    }

    fn copy_kv_rows(
        &self,
        src: &CpuKv,
        dst: &mut CpuKv,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        dst.copy_from(src, n_rows, row_len)
    }

    fn read_kv(&self, buf: &CpuKv, offset: usize, out: &mut [f32]) -> Result<()> {
        buf.read(offset, out)
    }

    fn move_kv_rows(
        &self,
        buf: &mut CpuKv,
        src_row: usize,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        buf.move_rows(src_row, dst_row, n_rows, row_len)
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        kernels::silu_mul_with_isa(self.isa, &mut gate[..len], &up[..len]);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        kernels::add_inplace(&mut x[..len], &y[..len]);
        Ok(())
    }

    fn read(&self, buf: &Vec<f32>, offset: usize, out: &mut [f32]) -> Result<()> {
        let src = buf.get(offset..offset + out.len()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "read of {} floats at {offset} past a buffer of {}",
                out.len(),
                buf.len()
            ))
        })?;
        out.copy_from_slice(src);
        Ok(())
    }
}

impl SparseOps for CpuBackend {
    fn upload_matrix(
        &self,
        bytes: Vec<u8>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CpuMatrix> {
        checks::check_matrix_bytes(bytes.len(), dtype, rows, cols)?;
        let storage = Storage::Owned(Arc::new(huge_page_copy(&bytes)?));
        Ok(self.with_aids_for_tier(CpuMatrix::with_aids(storage, dtype, rows, cols)))
    }

    fn gather_ffn(&self, bundles: &CpuMatrix, rows: &[u32]) -> Result<[CpuMatrix; 3]> {
        // Bundles of the gate|up|down layout (`NeuronBundles` of Griffin).
        checks::float_neurons(bundles.dtype, "gather_ffn")?;
        let h = super::neurons::gather_hidden(bundles.rows, bundles.cols, rows)?;
        let (gate, up, down) = kernels::gather_ffn(bundles.bytes(), bundles.dtype, h, rows);
        let k = rows.len();
        Ok([
            self.upload_matrix(gate, bundles.dtype, k, h)?,
            self.upload_matrix(up, bundles.dtype, k, h)?,
            self.upload_matrix(down, bundles.dtype, h, k)?,
        ])
    }

    fn gather_quantized_ffn(
        &self,
        [gate, up, down]: [&CpuMatrix; 3],
        rows: &[u32],
        down_dtype: DType,
    ) -> Result<[CpuMatrix; 3]> {
        let shape = |m: &CpuMatrix| (m.dtype, m.rows, m.cols);
        let (h, f) =
            checks::quantized_gather(shape(gate), shape(up), shape(down), rows, down_dtype)?;
        let w = kernels::QuantizedFfn {
            gate: (gate.bytes(), gate.dtype),
            up: (up.bytes(), up.dtype),
            down: (down.bytes(), down.dtype),
            hidden: h,
            neurons: f,
        };
        let (g, u, d) =
            kernels::gather_quantized_ffn_with_isa(self.isa, &self.pool, w, rows, down_dtype);
        let k = rows.len();
        Ok([
            self.upload_matrix(g, gate.dtype, k, h)?,
            self.upload_matrix(u, up.dtype, k, h)?,
            self.upload_matrix(d, down_dtype, h, k)?,
        ])
    }

    fn bundle_ffn(
        &self,
        bundles: &CpuMatrix,
        layout: BundleLayout,
        x: &Vec<f32>,
        n_tokens: usize,
        sel: BundleSelection<'_, Vec<f32>>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        checks::float_neurons(bundles.dtype, "bundle_ffn")?;
        let hidden = checks::bundle_call(bundles.cols, bundles.rows, layout, &sel, n_tokens)?;
        let b = kernels::Bundles {
            bytes: bundles.bytes(),
            dtype: bundles.dtype,
            neurons: bundles.rows,
            hidden,
            layout,
        };
        let act = match sel {
            BundleSelection::All { gate_bias, up_bias } => kernels::Activation::All {
                gate_bias: gate_bias.map(|v| v.as_slice()),
                up_bias: up_bias.map(|v| v.as_slice()),
            },
            BundleSelection::PerToken {
                coeff,
                kept,
                up_bias,
            } => kernels::Activation::PerToken {
                coeff,
                kept,
                up_bias: up_bias.map(|v| v.as_slice()),
            },
        };
        kernels::bundle_ffn_with_isa(self.isa, &self.pool, b, x, n_tokens, act, out);
        Ok(())
    }

    fn accumulate_neuron_scores(
        &self,
        z: &Vec<f32>,
        n_tokens: usize,
        width: usize,
        acc: &mut Vec<f32>,
    ) -> Result<()> {
        kernels::accumulate_neuron_scores(&z[..n_tokens * width], width, &mut acc[..width]);
        Ok(())
    }

    fn select_neurons(
        &self,
        act: &mut Vec<f32>,
        n_tokens: usize,
        width: usize,
        rule: NeuronRule,
        shared: bool,
        kept: &mut NeuronLists,
    ) -> Result<()> {
        let act = &mut act[..n_tokens * width];
        match shared {
            true => kernels::select_neurons_shared(act, width, rule, kept),
            false => kernels::select_neurons(act, width, rule, kept),
        }
        Ok(())
    }

    fn silu(&self, x: &mut Vec<f32>, len: usize) -> Result<()> {
        kernels::silu_with_isa(self.isa, &mut x[..len]);
        Ok(())
    }

    fn scatter_columns(
        &self,
        src: &Vec<f32>,
        n_tokens: usize,
        ids: &[u32],
        dst: &mut Vec<f32>,
        width: usize,
    ) -> Result<()> {
        let k = ids.len();
        checks::scatter_columns(src.len(), n_tokens, ids, dst.len(), width)?;
        if k == 0 {
            return Ok(());
        }
        for (s, d) in src
            .chunks_exact(k)
            .zip(dst.chunks_exact_mut(width))
            .take(n_tokens)
        {
            for (&v, &i) in s.iter().zip(ids) {
                d[i as usize] = v;
            }
        }
        Ok(())
    }
}
