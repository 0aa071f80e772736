//! Executes an offloading plan on any [`OffloadBackend`]: the CPU backend (`run
//! --resident-mem`, which emulates a GPU budget) or the CUDA backend (`run --gpu-mem`).
//!
//! The plan (`placement`) says which layers keep their attention and their sparse FFN subset
//! resident. This runtime makes those copies inside a budgeted [`ResidentArena`], keeps
//! everything else in the [`HostStore`], and for every pass queues one copy job per layer that
//! needs something the resident set lacks:
//! - draft passes (the sparse model): the overflow only (attention or sparse FFN of layers that
//!   did not fit), usually nothing at all;
//! - full passes (verification, prefill): the FFN complement of each layer's resident neurons
//!   (or the whole FFN where none are resident yet), plus the overflow.
//!
//! The forward pass pulls each layer's buffer through [`LayerStream`]: `acquire` waits on the
//! copy of exactly that layer, `release` returns the buffer so the copy of layer l+2 can
//! start while layer l+1 computes. On CUDA "waits" and "returns" are stream-ordered (events
//! between the copy and compute streams); the host does not block.
//!
//! The [`ResidentArena`] is the one budget authority: every resident copy (attention, head,
//! sparse FFN, complement) and every buffer the request allocates (norms, KV cache,
//! activations, staging buffers) is reserved in it before the backend allocates it, and so
//! is the backend's own scratch (`OffloadBackend::scratch_bytes`; on CUDA the bf16 GEMM's
//! activation copy, pre-sized, cuBLAS's workspace, estimated at 32 MiB, and the rope
//! table). Not counted: small per-op temporaries of the backend (token ids, split
//! partials) and, on CUDA, what `backend::cuda::memory` lists (allocation granularity, the
//! staging buffer `cancel` replaces while a view holds the old one, the f32-GEMM path's
//! scratch) and the driver's own context memory. `check_budget` leaves a margin of free
//! memory for these.

use std::borrow::Cow;
use std::time::Instant;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{LayerStream, Llama, StreamedLayer};
use crate::offload::arena::ResidentArena;
use crate::offload::format::WeightFormat;
use crate::offload::host_store::HostStore;
use crate::offload::offload_backend::{CopyEngine, FilledOf, OffloadBackend, StagedJob};
use crate::offload::placement::{plan, Plan, PlanInput};
use crate::offload::resident_set::{assemble, moved_in, CompactFfn};
use crate::offload::stream::{CopyEngineOptions, CopyJob, HostSlice};
use crate::offload::trace::{Trace, Track};
use crate::sparsity::bundles::complement_ids;
use crate::sparsity::griffin::GriffinLayer;
use crate::sparsity::{GriffinFfn, GriffinSelection};

mod layout;
mod report;

use layout::{Dims, FfnPiece, LayerJob};
pub use report::OffloadReport;

pub use crate::offload::stream::CopyStats;

/// What `run --resident-mem` / `run --gpu-mem` asks of the runtime.
#[derive(Clone)]
pub struct OffloadOptions {
    /// The resident budget (bytes).
    pub budget: u64,
    /// Emulated host-to-device link (GB/s) of the CPU copy engine; `None` copies at memory
    /// speed. The CUDA engine uses the real link and refuses a cap.
    pub link_gbps: Option<f64>,
    /// The host-to-device GB/s the planner assumes where the link is real (CUDA; `None`:
    /// `plan --gpu-mem`'s default). Not a cap. The CPU plans with `link_gbps`.
    pub planner_link_gbps: Option<f64>,
    /// Memory bandwidth the planner assumes for compute (GB/s), for the predicted ms/token.
    pub mem_gbps: f64,
    pub keep: f32,
    pub period: usize,
    /// KV cache rows the request needs.
    pub context: usize,
    /// The most rows one matmul of the request multiplies (the backend's GEMM scratch is
    /// sized for it; `offload_plan_input` fills it in).
    pub gemm_rows: usize,
    pub prompt_tokens: usize,
    /// Record a Chrome trace of copy and compute spans.
    pub trace: bool,
    /// Extra delay per copy job (tests: random delays must never change the output; the
    /// CUDA engine sleeps on the host before issuing the copy).
    pub delay: Option<crate::offload::stream::DelayFn>,
}

/// A pass either drafts with the sparse model or runs the full one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    Draft,
    Full,
}

pub struct OffloadRuntime<B: OffloadBackend> {
    pub plan: Plan,
    input: PlanInput,
    link_cap: Option<f64>,
    /// Whether the planner's prediction describes this run (see `planner_link`).
    predicts: bool,
    arena: ResidentArena,
    host: HostStore,
    engine: B::Engine,
    trace: Option<Trace>,
    dims: Dims,
    pass: Vec<Option<LayerJob>>,
    in_flight: Vec<Option<FilledOf<B>>>,
    layer_start: Option<Instant>,
    kind: PassKind,
    /// The request's neurons per layer, once chosen.
    kept: Option<Vec<Vec<u32>>>,
    /// Host copies of the compact FFN of layers whose sparse set is not resident.
    overflow: Vec<Option<HostSlice>>,
    /// Neurons resident per layer (kept across requests: only new ones are copied in), and
    /// their compact FFN.
    resident_ids: Vec<Vec<u32>>,
    resident_ffn: Vec<Option<[B::Matrix; 3]>>,
    /// Bundles of the rest of each layer's neurons where the plan keeps them resident too.
    resident_rest: Vec<Option<B::Matrix>>,
    /// Layers whose every neuron is resident (sparse set + rest).
    whole_layer: Vec<bool>,
    moved_neurons: u64,
    /// Bytes of compact FFNs uploaded outside the copy engine for this request (backends
    /// that do not assemble from staging, see `OffloadBackend::assembles_from_staging`):
    /// reported as streamed.
    uploaded_bytes: u64,
    draft_passes: u64,
    full_passes: u64,
}

impl<B: OffloadBackend> OffloadRuntime<B> {
    /// The planner's input for a run of `model` under `opts` whose scratch buffers take
    /// `activation_bytes` (the caller allocates them; they count against the budget). The
    /// planner's activations also hold the backend's own scratch (`scratch_bytes`), which
    /// the runtime reserves as a separate line.
    pub fn plan_input(
        model: &Llama<B>,
        opts: &OffloadOptions,
        activation_bytes: u64,
        prefill_chunk: usize,
    ) -> Result<PlanInput> {
        let c = &model.config;
        if c.mlp_bias || c.qkv_bias || c.o_bias {
            return Err(Error::InvalidArgument(format!(
                "offloading does not handle models with biases (Qwen2's q/k/v, mlp_bias) yet: run without {}",
                B::BUDGET_OPTION
            )));
        }
        let format = match model.dtype {
            DType::BF16 => WeightFormat::Bf16,
            DType::F16 => WeightFormat::F16,
            DType::F32 => {
                return Err(Error::InvalidArgument(
                    "offloading streams bf16 or f16 weights; this checkpoint is f32".into(),
                ))
            }
        };
        Ok(PlanInput {
            config: c.clone(),
            format,
            keep: opts.keep as f64,
            budget: opts.budget,
            budget_option: B::BUDGET_OPTION.into(),
            context: opts.context,
            // Both backends keep the KV cache in f32.
            kv_bytes: 4,
            link_gbps: model.backend.planner_link(opts).0,
            mem_gbps: opts.mem_gbps,
            period: opts.period,
            aal: opts.period as f64,
            prompt_tokens: opts.prompt_tokens.max(1),
            activation_bytes: Some(
                activation_bytes + model.backend.scratch_bytes(c, opts.context, opts.gemm_rows),
            ),
            prefill_chunk: Some(prefill_chunk),
        })
    }

    /// Plans `model` as `input` says (see [`OffloadRuntime::plan_input`]), moves the resident
    /// attention and head into the arena, builds the host store and starts the copy engine.
    pub fn new(model: &mut Llama<B>, input: PlanInput, opts: &OffloadOptions) -> Result<Self> {
        model.backend.check_offloadable(opts)?;
        let c = model.config.clone();
        let context = input.context;
        let scratch = (model.backend).scratch_bytes(&c, context, opts.gemm_rows);
        let activation_bytes = input.activation_bytes.unwrap_or(0).saturating_sub(scratch);
        let plan = plan(&input)?;
        let mut arena = ResidentArena::new(opts.budget);
        let (h, l) = (c.hidden_size, c.num_layers);
        arena.reserve("norms", ((2 * l + 1) * h * 4) as u64)?;
        arena.reserve("KV cache", (2 * l * c.kv_dim() * context * 4) as u64)?;
        arena.reserve("activations", activation_bytes)?;
        if scratch > 0 {
            arena.reserve("backend scratch", scratch)?;
        }
        model.backend.reserve_scratch(&c, opts.gemm_rows)?;
        arena.reserve(
            "stream buffers",
            plan.stream_buffer_bytes * plan.stream_buffers as u64,
        )?;
        let attention: Vec<bool> = plan.layers.iter().map(|l| l.attention_resident).collect();
        model.make_resident(&attention, &mut |label, m: &B::Matrix| {
            arena.reserve(label, B::matrix_byte_len(m) as u64)?;
            B::resident_copy(m)
        })?;
        let host = HostStore::build(model)?;
        let trace = opts.trace.then(Trace::new);
        let engine = model.backend.copy_engine(CopyEngineOptions {
            buffers: plan.stream_buffers,
            buffer_bytes: plan.stream_buffer_bytes as usize,
            link_gbps: opts.link_gbps,
            delay: opts.delay.clone(),
            trace: trace.clone(),
        })?;
        tracing::info!(
            "offloading: {} of {} resident, stream buffers 2 x {}",
            crate::offload::format_bytes(arena.used()),
            crate::offload::format_bytes(opts.budget),
            crate::offload::format_bytes(plan.stream_buffer_bytes)
        );
        Ok(OffloadRuntime {
            predicts: model.backend.planner_link(opts).1,
            input,
            link_cap: opts.link_gbps,
            arena,
            host,
            engine,
            trace,
            dims: Dims {
                h,
                q: c.q_dim(),
                kv: c.kv_dim(),
                f: c.intermediate_size,
                dtype: model.dtype,
            },
            pass: vec![None; l],
            in_flight: (0..l).map(|_| None).collect(),
            layer_start: None,
            kind: PassKind::Full,
            kept: None,
            overflow: vec![None; l],
            resident_ids: vec![Vec::new(); l],
            resident_ffn: vec![None; l],
            resident_rest: vec![None; l],
            whole_layer: vec![false; l],
            moved_neurons: 0,
            uploaded_bytes: 0,
            draft_passes: 0,
            full_passes: 0,
            plan,
        })
    }

    /// Makes `selection` the request's sparse set. Resident layers keep the neurons they
    /// already hold (from an earlier request on this runtime) and copy in only the others
    /// through the copy engine, as bundles; their compact FFN is reassembled in resident
    /// memory, in the arena. Layers whose sparse set does not fit get a host copy that every
    /// draft pass streams.
    pub fn choose_neurons(
        &mut self,
        backend: &B,
        selection: GriffinSelection,
    ) -> Result<GriffinFfn<B>> {
        let out = self.choose_neurons_now(backend, selection);
        if out.is_err() {
            if let Err(e) = self.cancel() {
                tracing::warn!("cancelling the copy engine after a failed neuron copy: {e}");
            }
        }
        out
    }

    fn choose_neurons_now(
        &mut self,
        backend: &B,
        selection: GriffinSelection,
    ) -> Result<GriffinFfn<B>> {
        let n_layers = self.plan.layers.len();
        if selection.layers.len() != n_layers {
            return Err(Error::InvalidArgument(format!(
                "a selection for {} layers, the model has {n_layers}",
                selection.layers.len()
            )));
        }
        let resident: Vec<bool> = self
            .plan
            .layers
            .iter()
            .map(|l| l.sparse_ffn_resident)
            .collect();
        // One job per resident layer with neurons to copy in, all queued at once so the
        // copies of later layers overlap the assembly of earlier ones.
        let mut jobs = Vec::new();
        let mut moved: Vec<Vec<u32>> = vec![Vec::new(); n_layers];
        let staging = B::assembles_from_staging();
        for (li, ids) in selection.layers.iter().enumerate() {
            // With the whole layer resident, a new split moves nothing over the link.
            if !resident[li] || self.whole_layer[li] {
                continue;
            }
            moved[li] = moved_in(&self.resident_ids[li], ids);
            if staging && !moved[li].is_empty() {
                jobs.push(CopyJob {
                    layer: li,
                    label: format!("L{li} neurons in"),
                    pieces: self.host.neuron_runs(li, &moved[li])?,
                });
            }
        }
        self.engine.submit(jobs)?;
        let mut layers = Vec::with_capacity(n_layers);
        for (li, ids) in selection.layers.iter().enumerate() {
            if !resident[li] {
                self.overflow[li] = Some(self.host.gather_sparse(li, ids)?);
                layers.push(None);
                continue;
            }
            let unchanged = self.resident_ids[li] == *ids;
            // Cloned only when kept: a clone alive across the upload below would keep the
            // old device matrices allocated next to the new ones.
            let kept = match &self.resident_ffn[li] {
                Some(m) if unchanged => Some(m.clone()),
                _ => None,
            };
            let matrices = match kept {
                Some(m) => m,
                // Every neuron is resident: the new split is a move within resident memory
                // (here: regathered from the host copy, nothing counted as moved).
                None if self.whole_layer[li] => self.regather(backend, li, ids)?,
                // Gathered on the host and uploaded once: that upload is what crossed the link.
                None if !staging => {
                    let m = self.regather(backend, li, ids)?;
                    self.uploaded_bytes +=
                        (ids.len() * 3 * self.dims.h * self.dims.dtype.size()) as u64;
                    m
                }
                None => self.copy_in(backend, li, ids, !moved[li].is_empty())?,
            };
            self.moved_neurons += moved[li].len() as u64;
            if self.plan.layers[li].complement_resident {
                self.make_rest_resident(backend, li, ids)?;
            }
            let [gate, up, down] = &matrices;
            layers.push(Some(GriffinLayer {
                gate: gate.clone(),
                up: up.clone(),
                down: down.clone(),
                gate_bias: None,
                up_bias: None,
            }));
            self.resident_ffn[li] = Some(matrices);
            self.resident_ids[li] = ids.clone();
        }
        self.kept = Some(selection.layers.clone());
        Ok(GriffinFfn { layers, selection })
    }

    /// Keeps the neurons of layer `li` not in `ids` resident too, as bundles `[f - k, 3h]`:
    /// verification then streams nothing for the layer. Neurons that were not resident
    /// before count as moved.
    fn make_rest_resident(&mut self, backend: &B, li: usize, ids: &[u32]) -> Result<()> {
        let d = self.dims;
        let rest = complement_ids(ids, d.f)?;
        if !self.whole_layer[li] {
            // Before, only the previous request's sparse set (if any) was resident; it is
            // still in `resident_ids` (updated after this call).
            self.moved_neurons += moved_in(&self.resident_ids[li], &rest).len() as u64;
        }
        let label = format!("FFN complement layer {li}");
        let mut bytes = Vec::with_capacity(rest.len() * self.host.bundle_bytes());
        for piece in self.host.neuron_runs(li, &rest)? {
            bytes.extend_from_slice(&piece.map[piece.range.clone()]);
        }
        self.arena.set(&label, bytes.len() as u64)?;
        // Free the old rest before uploading the new one (see `upload_compact`).
        self.resident_rest[li] = None;
        self.resident_rest[li] = match rest.len() {
            0 => None,
            c => Some(backend.upload_matrix(bytes, d.dtype, c, 3 * d.h)?),
        };
        self.whole_layer[li] = true;
        Ok(())
    }

    /// Layer `li`'s compact FFN of `ids` rebuilt within resident memory (the whole layer is
    /// resident), in the arena.
    fn regather(&mut self, backend: &B, li: usize, ids: &[u32]) -> Result<[B::Matrix; 3]> {
        let parts = self.host.gather_parts(li, ids)?;
        self.upload_compact(backend, li, ids.len(), parts)
    }

    /// Layer `li`'s compact FFN of `k` neurons (gate, up, down bytes) into resident memory,
    /// accounted in the arena as the layer's sparse FFN.
    fn upload_compact(
        &mut self,
        backend: &B,
        li: usize,
        k: usize,
        (gate, up, down): (Vec<u8>, Vec<u8>, Vec<u8>),
    ) -> Result<[B::Matrix; 3]> {
        let d = self.dims;
        let bytes = (gate.len() + up.len() + down.len()) as u64;
        self.arena.set(&format!("sparse FFN layer {li}"), bytes)?;
        // The old compact FFN's bytes have been used (or are not needed): free it before the
        // upload so the device never holds old and new at once (the arena counts one).
        self.resident_ffn[li] = None;
        let uploaded = (|| {
            Ok([
                backend.upload_matrix(gate, d.dtype, k, d.h)?,
                backend.upload_matrix(up, d.dtype, k, d.h)?,
                backend.upload_matrix(down, d.dtype, d.h, k)?,
            ])
        })();
        if uploaded.is_err() {
            // Nothing of the layer's sparse set is resident any more: the next request
            // copies in all of it.
            self.resident_ids[li].clear();
        }
        uploaded
    }

    /// Layer `li`'s new compact FFN of `ids`: the resident neurons it keeps plus the staged
    /// bundles of the moved ones (when `staged`, waited for here), in the arena.
    fn copy_in(
        &mut self,
        backend: &B,
        li: usize,
        ids: &[u32],
        staged: bool,
    ) -> Result<[B::Matrix; 3]> {
        let d = self.dims;
        let filled = if staged {
            Some(self.engine.wait(li)?)
        } else {
            None
        };
        // The bundles of the moved neurons landed back to back; only backends that assemble
        // from staging come here (the CPU: the staging buffer is host memory).
        let assembled = (|| {
            let staged_bytes = match &filled {
                Some(f) => match (f.pieces().first(), f.pieces().last()) {
                    (Some(a), Some(b)) => B::staged_bytes(f, a.start..b.end)?,
                    _ => Cow::Borrowed(&[][..]),
                },
                None => Cow::Borrowed(&[][..]),
            };
            let old_bytes = match &self.resident_ffn[li] {
                Some([g, u, dn]) => Some([
                    B::matrix_bytes(g)?,
                    B::matrix_bytes(u)?,
                    B::matrix_bytes(dn)?,
                ]),
                None => None,
            };
            let old = old_bytes.as_ref().map(|[g, u, dn]| CompactFfn {
                ids: &self.resident_ids[li],
                gate: g,
                up: u,
                down: dn,
            });
            assemble(old.as_ref(), &staged_bytes, ids, d.h, d.dtype.size())
        })();
        if let Some(f) = filled {
            self.engine.release(f)?;
        }
        self.upload_compact(backend, li, ids.len(), assembled?)
    }

    /// Queues the copies of one pass; the forward then pulls them layer by layer.
    pub fn begin_pass(&mut self, kind: PassKind) -> Result<()> {
        self.kind = kind;
        let mut jobs = Vec::new();
        for li in 0..self.pass.len() {
            let job = self.layer_job(li, kind);
            self.pass[li] = None;
            let Some(job) = job else { continue };
            let mut pieces = Vec::new();
            if job.attention {
                pieces.extend(self.host.layers[li].attention.iter().cloned());
            }
            match job.ffn {
                FfnPiece::None => {}
                FfnPiece::Dense => pieces.extend(self.host.layers[li].dense_ffn.iter().cloned()),
                FfnPiece::Sparse { .. } => pieces.extend(self.overflow[li].clone()),
                FfnPiece::Complement { .. } => {
                    let kept = self.kept.as_ref().map(|k| &k[li]);
                    pieces.extend(self.host.complement(li, kept.map_or(&[][..], |k| k))?);
                }
            }
            self.pass[li] = Some(job);
            jobs.push(CopyJob {
                layer: li,
                label: format!("L{li} {}", job.describe()),
                pieces,
            });
        }
        match kind {
            PassKind::Draft => self.draft_passes += 1,
            PassKind::Full => self.full_passes += 1,
        }
        self.engine.submit(jobs)
    }

    /// Drops what a failed pass left queued or in flight.
    pub fn cancel(&mut self) -> Result<()> {
        self.in_flight.iter_mut().for_each(|f| *f = None);
        self.pass.iter_mut().for_each(|p| *p = None);
        self.engine.cancel()
    }

    fn layer_job(&self, li: usize, kind: PassKind) -> Option<LayerJob> {
        let place = self.plan.layers.get(li)?;
        let ffn = match (kind, place.sparse_ffn_resident, &self.kept) {
            (PassKind::Draft, true, _) => FfnPiece::None,
            (PassKind::Draft, false, Some(kept)) => FfnPiece::Sparse { k: kept[li].len() },
            // Drafting before the request chose neurons is a caller bug; forward reports it.
            (PassKind::Draft, false, None) => FfnPiece::None,
            (PassKind::Full, true, Some(kept)) if kept[li].len() >= self.dims.f => FfnPiece::None,
            (PassKind::Full, true, Some(_)) if place.complement_resident => FfnPiece::None,
            (PassKind::Full, true, Some(kept)) => FfnPiece::Complement {
                c: self.dims.f - kept[li].len(),
            },
            (PassKind::Full, _, _) => FfnPiece::Dense,
        };
        let attention = !place.attention_resident;
        (attention || !matches!(ffn, FfnPiece::None)).then_some(LayerJob { attention, ffn })
    }

    /// Starts a request: forgets the previous request's neuron choice (its neurons stay
    /// resident, so the next choice copies in only new ones) and its statistics.
    pub fn begin_request(&mut self) -> Result<()> {
        self.cancel()?;
        self.kept = None;
        self.overflow.iter_mut().for_each(|o| *o = None);
        self.engine.reset_stats()?;
        self.moved_neurons = 0;
        self.uploaded_bytes = 0;
        self.draft_passes = 0;
        self.full_passes = 0;
        Ok(())
    }

    /// KV cache rows and activation bytes the plan reserved: a request must fit in them.
    pub fn reserved(&self) -> (usize, u64) {
        let scratch = self.arena.get("backend scratch").unwrap_or(0);
        let activations = self.input.activation_bytes.unwrap_or(0);
        (self.input.context, activations.saturating_sub(scratch))
    }

    /// Statistics so far, with the planner's prediction for `aal` (measured) where it
    /// models the run: on CUDA always, on CPU with a link cap (uncapped, the CPU "link" is
    /// memcpy, which the planner does not model). On CUDA this waits for copies in flight.
    pub fn report(&mut self, aal: f64) -> Result<OffloadReport> {
        let stats = self.engine.stats()?;
        let predicted = match self.predicts {
            true => Some(plan(&PlanInput {
                aal: aal.clamp(1.0, self.input.period as f64),
                ..self.input.clone()
            })?),
            false => None,
        };
        Ok(OffloadReport {
            resident_budget_bytes: self.arena.budget(),
            resident_bytes: self.arena.peak(),
            streamed_bytes: stats.bytes + self.uploaded_bytes,
            link_busy_s: stats.busy_s,
            achieved_link_gbps: stats.achieved_gbps,
            overlap: stats.overlap,
            copy_wait_s: stats.wait_s,
            link_gbps_cap: self.link_cap,
            host_gather_s: stats.host_gather_s,
            moved_neurons: self.moved_neurons,
            draft_passes: self.draft_passes,
            full_passes: self.full_passes,
            overflow_attention_layers: self
                .plan
                .layers
                .iter()
                .filter(|l| !l.attention_resident)
                .count(),
            overflow_ffn_layers: self
                .plan
                .layers
                .iter()
                .filter(|l| !l.sparse_ffn_resident)
                .count(),
            predicted_ms_per_token: predicted
                .as_ref()
                .map(|p| p.costs.sirius_offload.ms_per_token),
            measured_ms_per_token: 0.0,
            predicted_ttft_ms: predicted.as_ref().map(|p| p.costs.ttft_ms),
        })
    }

    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    pub fn arena(&self) -> &ResidentArena {
        &self.arena
    }

    /// Neurons copied in by `choose_neurons` so far (all requests on this runtime).
    pub fn moved_neurons(&self) -> u64 {
        self.moved_neurons
    }
}

impl<B: OffloadBackend> LayerStream<B> for OffloadRuntime<B> {
    fn acquire(&mut self, layer: usize) -> Result<StreamedLayer<B>> {
        let Some(job) = self.pass.get(layer).copied().flatten() else {
            self.layer_start = Some(Instant::now());
            let mut resident = StreamedLayer::empty(layer);
            // A full pass over a layer kept whole reads its resident rest in place.
            if self.kind == PassKind::Full && self.kept.is_some() {
                resident.complement = self.resident_rest.get(layer).cloned().flatten();
            }
            return Ok(resident);
        };
        let filled = self.engine.wait(layer)?;
        let streamed = match job.views::<B>(self.dims, &filled) {
            Ok(s) => s,
            Err(e) => {
                // Hand the buffer back so the engine is not left waiting on it.
                let _ = self.engine.release(filled);
                return Err(e);
            }
        };
        self.in_flight[layer] = Some(filled);
        self.layer_start = Some(Instant::now());
        Ok(streamed)
    }

    fn release(&mut self, layer: StreamedLayer<B>) -> Result<()> {
        let li = layer.layer;
        drop(layer);
        if let (Some(trace), Some(start)) = (&self.trace, self.layer_start.take()) {
            let kind = match self.kind {
                PassKind::Draft => "draft",
                PassKind::Full => "full",
            };
            trace.span(
                Track::Compute,
                format!("L{li} {kind}"),
                start,
                Instant::now(),
                serde_json::json!({ "layer": li }),
            );
        }
        match self.in_flight.get_mut(li).and_then(Option::take) {
            Some(filled) => self.engine.release(filled),
            None => Ok(()),
        }
    }
}
