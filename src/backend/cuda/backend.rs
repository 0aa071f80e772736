//! [`CudaBackend`]: the [`Backend`] ops on one GPU, every one queued on one compute stream
//! (so they run in call order without host waits; `read` waits). Weights live in device
//! memory in their checkpoint dtype; activations are f32 device buffers. The kernels come
//! from kernels/*.cu, compiled by NVRTC for the device's architecture on first use (once
//! per process; PTX, or a CUBIN where NVRTC is newer than the driver, see `compat`) and
//! loaded into the device's context per backend.
//!
//! Unverified: written on a machine without a GPU; it compiles against cudarc 0.19 and
//! follows each kernel's launch contract (the comment at the top of its file). The GPU
//! parity tests check it op by op against the CPU backend.

use std::sync::{Arc, Mutex};

use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{kernel_code, Ctx};
use super::ops_basic::{self as basic, RopeCache};
use super::ops_kv::{self as kv, CudaKv};
use super::ops_matmul::{GemmPrecision, Matmul};
use super::{device, ops_attention as attn, ops_ffn as ffn, ops_sampling};
use crate::backend::checks;
use crate::backend::{
    AttentionShape, Backend, BundleLayout, BundleSelection, DeviceCounts, NeuronLists, NeuronRule,
    RopeTable, Rows, SparseOps,
};
use crate::error::Result;
use crate::tensor::TensorRef;
use crate::tensor::{DType, KvDType};

pub struct CudaBackend {
    ctx: Arc<Ctx>,
    /// cuBLAS (None without libcublas: long batches then use the small-batch kernel), the
    /// GEMM precision and the GEMM scratch buffers.
    matmul: Matmul,
    /// Device copy of the rope cos/sin table.
    rope: Mutex<Option<RopeCache>>,
    /// Offloading: `matrix` leaves weights in the host mapping (see `with_host_weights`).
    host_weights: bool,
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` (see [`device::open`]: driver, device and memory checks
    /// with one-line errors), compiles the kernels for its architecture (cached per
    /// process; a missing libnvrtc or CUDA headers is an `Error::Cuda` that says what to
    /// install or set: CUDA_INCLUDE_DIR) and loads them. The GEMM precision of batches
    /// over 16 tokens comes from `SIRIUS_CUDA_GEMM` (`bf16` when unset, or `f32`), read
    /// here, before the device opens: any other value is an `InvalidArgument` error.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        CudaBackend::with_gemm(ordinal, GemmPrecision::from_env()?)
    }

    /// As [`CudaBackend::new`] with an explicit GEMM precision (no environment read).
    pub fn with_gemm(ordinal: usize, precision: GemmPrecision) -> Result<CudaBackend> {
        let device = Arc::new(device::open(ordinal)?);
        let code = kernel_code(&device)?;
        let ctx = Arc::new(Ctx::new(device, &code)?);
        let matmul = Matmul::new(&ctx, precision);
        Ok(CudaBackend {
            ctx,
            matmul,
            rope: Mutex::new(None),
            host_weights: false,
        })
    }

    /// For the offloading runtime (`run --gpu-mem`): a model loaded on this backend leaves
    /// its weight matrices in the host mapping instead of uploading them all (they would not
    /// fit the budget); the runtime copies to the device what its plan keeps resident and
    /// streams the rest. Norms and biases are still uploaded (the plan counts them).
    pub fn with_host_weights(mut self) -> CudaBackend {
        self.host_weights = true;
        self
    }

    /// Whether `matrix` leaves weights in host memory (see `with_host_weights`).
    pub fn host_weights(&self) -> bool {
        self.host_weights
    }

    pub(crate) fn matmul_state(&self) -> &Matmul {
        &self.matmul
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The opened device (name, compute capability, memory).
    pub fn device(&self) -> &device::CudaDevice {
        &self.ctx.device
    }

    /// Whether batches over 16 tokens run on cuBLAS (false: libcublas was not found).
    pub fn has_cublas(&self) -> bool {
        self.matmul.has_cublas()
    }

    /// How batches over 16 tokens multiply bf16/f16 weights.
    pub fn gemm_precision(&self) -> GemmPrecision {
        self.matmul.precision()
    }

    /// Waits until every queued op has finished (timing, tests).
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize("synchronize")
    }

    /// A matrix's bytes copied back to the host (parity tests).
    pub fn read_matrix(&self, m: &CudaMatrix) -> Result<Vec<u8>> {
        m.to_host()
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Matrix = CudaMatrix;
    type KvBuf = CudaKv;

    fn describe(&self) -> String {
        let d = &self.ctx.device;
        format!(
            "cuda ({}, sm_{}{})",
            d.name, d.compute_capability.0, d.compute_capability.1
        )
    }

    fn device_counts(&self) -> Option<DeviceCounts> {
        Some(DeviceCounts {
            launches: self.ctx.launches(),
            allocations: self.ctx.allocations(),
        })
    }

    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        let mem = DevMem::zeroed(&self.ctx, "alloc", len * 4)?;
        Ok(CudaBuf::from_mem(mem, len))
    }

    fn matrix(&self, t: &TensorRef) -> Result<CudaMatrix> {
        let (rows, cols) = checks::matrix_shape(t)?;
        if self.host_weights {
            let (map, range) = t.mapping();
            return CudaMatrix::in_host(&self.ctx, map, range, t.dtype, rows, cols);
        }
        ffn::upload_matrix(&self.ctx, t.bytes(), t.dtype, rows, cols)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let mem = DevMem::new(&self.ctx, "upload", std::mem::size_of_val(data))?;
        self.ctx.htod("upload", mem.ptr(), data)?;
        Ok(CudaBuf::from_mem(mem, data.len()))
    }

    fn embed(&self, table: &CudaMatrix, tokens: &[u32], out: &mut CudaBuf) -> Result<()> {
        basic::embed(&self.ctx, table, tokens, out)
    }

    fn rmsnorm(
        &self,
        x: &CudaBuf,
        weight: &CudaBuf,
        eps: f32,
        n_tokens: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        basic::rmsnorm(&self.ctx, x, weight, eps, n_tokens, out)
    }

    fn matmul(
        &self,
        w: &CudaMatrix,
        x: &CudaBuf,
        n_tokens: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        self.matmul.matmul(&self.ctx, w, x, n_tokens, out)
    }

    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaBuf, n_tokens: usize) -> Result<()> {
        basic::add_bias(&self.ctx, x, bias, n_tokens)
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        num_heads: usize,
        rows: Rows<'_>,
        table: &RopeTable,
    ) -> Result<()> {
        match rows {
            Rows::Causal { start, len } => {
                basic::rope(&self.ctx, &self.rope, x, num_heads, start, len, table)
            }
            Rows::Tree(mask) => {
                let positions = mask.positions();
                basic::rope_at(&self.ctx, &self.rope, x, num_heads, positions, table)
            }
        }
    }

    fn copy_rows(
        &self,
        src: &CudaBuf,
        src_row: usize,
        dst: &mut CudaBuf,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        basic::copy_rows(&self.ctx, src, src_row, dst, dst_row, n_rows, row_len)
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k_cache: &CudaKv,
        v_cache: &CudaKv,
        shape: AttentionShape,
        rows: Rows<'_>,
        out: &mut CudaBuf,
    ) -> Result<()> {
        match rows {
            Rows::Causal { start, len } => {
                attn::attention(&self.ctx, q, k_cache, v_cache, shape, start, len, None, out)
            }
            Rows::Tree(mask) => {
                attn::tree_attention(&self.ctx, q, k_cache, v_cache, shape, mask, out)
            }
        }
    }

    fn alloc_kv(&self, len: usize, dtype: KvDType) -> Result<CudaKv> {
        CudaKv::zeroed(&self.ctx, len, dtype)
    }

    fn store_kv(
        &self,
        src: &CudaBuf,
        dst: &mut CudaKv,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        kv::store(&self.ctx, src, dst, dst_row, n_rows, row_len)
    }

    fn copy_kv_rows(
        &self,
        src: &CudaKv,
        dst: &mut CudaKv,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        kv::copy(&self.ctx, src, dst, n_rows, row_len)
    }

    fn read_kv(&self, buf: &CudaKv, offset: usize, out: &mut [f32]) -> Result<()> {
        buf.read(offset, out)
    }

    fn move_kv_rows(
        &self,
        buf: &mut CudaKv,
        src_row: usize,
        dst_row: usize,
        n_rows: usize,
        row_len: usize,
    ) -> Result<()> {
        kv::move_rows(&self.ctx, buf, src_row, dst_row, n_rows, row_len)
    }

    fn silu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) -> Result<()> {
        basic::binary(&self.ctx, "silu_mul", "silu_mul_f32", gate, up, len)
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        basic::binary(&self.ctx, "add", "add_f32", x, y, len)
    }

    fn read(&self, buf: &CudaBuf, offset: usize, out: &mut [f32]) -> Result<()> {
        basic::read(&self.ctx, buf, offset, out)
    }

    /// On the device (kernels/sampling.cu): `rows` ids come back, not `rows * cols` logits.
    fn argmax_rows(&self, x: &CudaBuf, rows: usize, cols: usize) -> Result<Vec<u32>> {
        ops_sampling::argmax_rows(&self.ctx, x, rows, cols)
    }

    fn row_verdicts(
        &self,
        x: &CudaBuf,
        rows: usize,
        cols: usize,
        next: &[u32],
        temperature: f32,
    ) -> Result<Vec<crate::backend::argmax::RowVerdict>> {
        ops_sampling::row_verdicts(&self.ctx, x, rows, cols, next, temperature)
    }
}

impl SparseOps for CudaBackend {
    fn upload_matrix(
        &self,
        bytes: Vec<u8>,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<CudaMatrix> {
        ffn::upload_matrix(&self.ctx, &bytes, dtype, rows, cols)
    }

    fn gather_ffn(&self, bundles: &CudaMatrix, rows: &[u32]) -> Result<[CudaMatrix; 3]> {
        ffn::gather_ffn(&self.ctx, bundles, rows)
    }

    fn gather_quantized_ffn(
        &self,
        _ffn: [&CudaMatrix; 3],
        _rows: &[u32],
        _down_dtype: DType,
    ) -> Result<[CudaMatrix; 3]> {
        // A quantized model with Griffin on CUDA: the compact down matrix is re-encoded on the
        // CPU only so far.
        Err(crate::error::Error::Cuda(
            "Griffin on quantized weights runs on the CPU only; load the model with --weights bf16 for CUDA".into(),
        ))
    }

    fn bundle_ffn(
        &self,
        bundles: &CudaMatrix,
        layout: BundleLayout,
        x: &CudaBuf,
        n_tokens: usize,
        sel: BundleSelection<'_, CudaBuf>,
        out: &mut CudaBuf,
    ) -> Result<()> {
        ffn::bundle_ffn(&self.ctx, bundles, layout, x, n_tokens, sel, out)
    }

    fn accumulate_neuron_scores(
        &self,
        z: &CudaBuf,
        n_tokens: usize,
        width: usize,
        acc: &mut CudaBuf,
    ) -> Result<()> {
        ffn::accumulate_neuron_scores(&self.ctx, z, n_tokens, width, acc)
    }

    fn select_neurons(
        &self,
        act: &mut CudaBuf,
        n_tokens: usize,
        width: usize,
        rule: NeuronRule,
        shared: bool,
        kept: &mut NeuronLists,
    ) -> Result<()> {
        ffn::select_neurons(&self.ctx, act, n_tokens, width, rule, shared, kept)
    }

    fn silu(&self, x: &mut CudaBuf, len: usize) -> Result<()> {
        basic::silu(&self.ctx, x, len)
    }

    fn scatter_columns(
        &self,
        _src: &CudaBuf,
        _n_tokens: usize,
        _ids: &[u32],
        _dst: &mut CudaBuf,
        _width: usize,
    ) -> Result<()> {
        // Unreachable through the engine: only offloaded quantized FFNs merge neuron sets, and
        // offloading to a device de-quantizes a GGUF to bf16 (`engine::weights_for`).
        Err(crate::error::Error::Cuda(
            "offloading quantized weights runs on the CPU only; load the model with --weights bf16 for CUDA".into(),
        ))
    }
}
