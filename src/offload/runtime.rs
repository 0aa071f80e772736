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

use std::time::Instant;

use crate::backend::offload::{FilledOf, OffloadBackend, ResidentMemory};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{LayerStream, Llama, ReplacedWeights, StreamedLayer};
use crate::offload::arena::ResidentArena;
use crate::offload::budget::max_job_pieces;
use crate::offload::cost::predict;
use crate::offload::format::WeightFormat;
use crate::offload::host_store::HostStore;
use crate::offload::placement::{plan, Plan, PlanInput};
use crate::sparsity::ffn::Complement;
use crate::transfer::trace::{Trace, Track};
use crate::transfer::{CopyEngine, CopyEngineOptions, CopyJob, HostSlice};
use crate::units::format_bytes;

mod config;
mod formats;
mod layout;
mod neurons;
mod pinning;
mod planning;
mod report;

pub use config::OffloadConfig;
use formats::stored_formats;
use layout::{Dims, FfnPiece, LayerJob};
use planning::planner_link;
pub use planning::{request_plan_input, scratch_shape, PlanFormats, PlanTarget};
pub use report::OffloadReport;

pub use crate::transfer::CopyStats;

/// What the requests a runtime serves need, computed once from the request (the Sirius
/// window, the cache and scratch it allocates): the runtime reserves all of it.
#[derive(Debug, Clone, Copy)]
pub struct RequestShape {
    /// Griffin's keep fraction and the Sirius period K.
    pub keep: f32,
    pub period: usize,
    /// KV cache rows.
    pub context: usize,
    /// Bytes of the request's activation buffers (draft, verification and prefill scratch,
    /// Griffin's scores).
    pub activation_bytes: u64,
    /// The most rows one matmul multiplies (the backend's GEMM scratch is sized for it).
    pub gemm_rows: usize,
    /// The most rows a sparse FFN call takes (a draft or a verification window; prefill
    /// chunks run the dense FFN): what the neuron lists in the backend's temporaries scale
    /// with.
    pub sparse_rows: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens per prefill pass (the longest the spare budget pays for, see
    /// `offload::prefill`).
    pub prefill_chunk: usize,
}

/// A pass either drafts with the sparse model or runs the full one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    Draft,
    Full,
}

pub struct OffloadRuntime<B: OffloadBackend> {
    pub plan: Plan,
    /// What the runtime was planned for.
    shape: RequestShape,
    input: PlanInput,
    link_cap: Option<f64>,
    /// Whether the planner's prediction describes this run (see `planner_link`).
    predicts: bool,
    arena: ResidentArena,
    host: HostStore,
    engine: B::Engine,
    trace: Option<Trace>,
    dims: Dims,
    /// The model's weights the resident copies replaced, restored by [`Self::restore_model`].
    replaced: Option<ReplacedWeights<B>>,
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
    resident_rest: Vec<Option<Complement<B>>>,
    /// Layers whose every neuron is resident (sparse set + rest).
    whole_layer: Vec<bool>,
    moved_neurons: u64,
    /// Bytes uploaded outside the copy engine for this request (device backends, see
    /// `choose_neurons`): reported as streamed.
    uploaded_bytes: u64,
    draft_passes: u64,
    full_passes: u64,
}

impl<B: OffloadBackend> OffloadRuntime<B> {
    /// The planner's input for requests of `shape` on `model` under `cfg` (the backend's own
    /// scratch is a line of its own, `OffloadBackend::scratch_bytes`).
    pub fn plan_input(
        model: &Llama<B>,
        cfg: &OffloadConfig,
        shape: &RequestShape,
    ) -> Result<PlanInput> {
        let c = &model.config;
        // Attention biases stay resident with the norms; an FFN's gate and up biases would
        // have to follow its neurons through every sparse kernel.
        if c.mlp_bias {
            return Err(Error::InvalidArgument(
                "offloading does not handle FFN biases (mlp_bias) yet: run this model without \
                 an offloading budget"
                    .into(),
            ));
        }
        let (format, layer_formats, head_format) = stored_formats(model)?;
        // Only quantized FFNs re-encode their compact down matrices (float ones use bundles).
        let sparse_down = match format.is_quantized() {
            true => Some(WeightFormat::of(cfg.griffin_down).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "offloading keeps Griffin's compact down matrices in q8_0, q4_0, bf16 or \
                     f16, not {}",
                    cfg.griffin_down
                ))
            })?),
            false => None,
        };
        let scratch = model.backend.scratch_bytes(&scratch_shape(c, shape));
        let formats = (format, layer_formats, Some(head_format), sparse_down);
        let target = PlanTarget {
            on_gpu: B::RESIDENT_MEMORY == ResidentMemory::Device,
            link_gbps: planner_link::<B>(cfg).0,
            backend_scratch: scratch,
            kv_bytes: model.kv_dtype.size(),
        };
        Ok(request_plan_input(c, formats, cfg, shape, &target))
    }

    /// Plans `model` for requests of `shape` under `cfg`, moves the resident attention and
    /// head into the arena, builds the host store and starts the copy engine.
    pub fn new(model: &mut Llama<B>, cfg: &OffloadConfig, shape: RequestShape) -> Result<Self> {
        if let (ResidentMemory::Device, Some(g)) = (B::RESIDENT_MEMORY, cfg.link_gbps) {
            tracing::info!("planning with a {g} GB/s link; copies run at the real link's speed");
        }
        let input = Self::plan_input(model, cfg, &shape)?;
        model.backend.check_offloadable(cfg.budget)?;
        let c = model.config.clone();
        let scratch_shape = scratch_shape(&c, &shape);
        let plan = plan(&input)?;
        let mut arena = ResidentArena::new(cfg.budget);
        reserve_buffers(&mut arena, &c, &shape, &plan)?;
        model.backend.reserve_scratch(&scratch_shape)?;
        let (h, l) = (c.hidden_size, c.num_layers);
        let attention: Vec<bool> = plan.layers.iter().map(|l| l.attention_resident).collect();
        let replaced = model.make_resident(&attention, &mut |label, m: &B::Matrix| {
            arena.reserve(label, B::matrix_byte_len(m) as u64)?;
            B::resident_copy(m)
        })?;
        let trace = cfg.trace.then(Trace::new);
        let link_cap = match B::RESIDENT_MEMORY {
            ResidentMemory::Host => cfg.link_gbps,
            ResidentMemory::Device => None,
        };
        let (host, engine) = match Self::start_streaming(model, cfg, &plan, link_cap, &trace) {
            Ok(parts) => parts,
            Err(e) => {
                model.restore(replaced);
                return Err(e);
            }
        };
        let layers = (0..l)
            .map(|li| host.dtypes(li))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(
            "offloading: {} of {} resident, stream buffers {} x {}",
            format_bytes(arena.used()),
            format_bytes(cfg.budget),
            plan.stream_buffers,
            format_bytes(plan.stream_buffer_bytes)
        );
        let runtime = OffloadRuntime {
            predicts: planner_link::<B>(cfg).1,
            shape,
            input,
            link_cap,
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
                layers: layers.into(),
                griffin_down: cfg.griffin_down,
            },
            replaced: Some(replaced),
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
        };
        runtime.with_plan_pinned(model)
    }

    /// The host copy of what is streamed, and the copy engine that streams it.
    fn start_streaming(
        model: &Llama<B>,
        cfg: &OffloadConfig,
        plan: &Plan,
        link_cap: Option<f64>,
        trace: &Option<Trace>,
    ) -> Result<(HostStore, B::Engine)> {
        let host = HostStore::build(model, cfg.griffin_down, cfg.bundle_cache.as_deref())?;
        let s = &plan.sizes;
        let engine = model.backend.copy_engine(CopyEngineOptions {
            buffers: plan.stream_buffers,
            buffer_bytes: plan.stream_buffer_bytes as usize,
            max_pieces: max_job_pieces(s.neurons, s.kept_neurons, s.quantized),
            link_gbps: link_cap,
            delay: cfg.delay.clone(),
            trace: trace.clone(),
        })?;
        Ok((host, engine))
    }

    /// Ends the runtime: stops its copy engine and gives `model` back the weights the
    /// resident copies replaced, so a new runtime plans from the checkpoint again.
    pub fn restore_model(mut self, model: &mut Llama<B>) {
        if let Some(replaced) = self.replaced.take() {
            model.restore(replaced);
        }
    }

    /// Whether requests of `shape` fit what this runtime reserved (else plan a new one).
    pub fn holds(&self, shape: &RequestShape) -> bool {
        self.mismatch(shape).is_none()
    }

    /// What of `shape` this runtime does not hold, with both numbers (`None`: it holds it).
    pub fn mismatch(&self, shape: &RequestShape) -> Option<String> {
        let s = &self.shape;
        if shape.context > s.context {
            Some(format!(
                "{} cache rows, planned for {}",
                shape.context, s.context
            ))
        } else if shape.activation_bytes > s.activation_bytes {
            Some(format!(
                "{} of activations, planned for {}",
                format_bytes(shape.activation_bytes),
                format_bytes(s.activation_bytes)
            ))
        } else if shape.gemm_rows > s.gemm_rows || shape.sparse_rows > s.sparse_rows {
            Some(format!(
                "{} rows per pass, planned for {}",
                shape.gemm_rows, s.gemm_rows
            ))
        } else if shape.keep != s.keep {
            Some(format!("keep {}, planned for {}", shape.keep, s.keep))
        } else if shape.period != s.period {
            Some(format!("period {}, planned for {}", shape.period, s.period))
        } else {
            None
        }
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
            (PassKind::Full, true, Some(_)) if place.complement_resident => FfnPiece::None,
            // Every neuron resident: nothing to add (quantized weights still stream the
            // stored down matrix, which the compact one only approximates).
            (PassKind::Full, true, Some(kept))
                if kept[li].len() >= self.dims.f && !self.dims.dtype.is_quantized() =>
            {
                FfnPiece::None
            }
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
        // The last request's overflow copies go first, so that cancelling lets the copy
        // engine unpin them (CUDA registers every mapping it copies from).
        self.kept = None;
        self.overflow.iter_mut().for_each(|o| *o = None);
        self.cancel()?;
        self.engine.reset_stats()?;
        self.moved_neurons = 0;
        self.uploaded_bytes = 0;
        self.draft_passes = 0;
        self.full_passes = 0;
        Ok(())
    }

    /// The planner's seconds of one chain window (K - 1 drafts and the verification) of each
    /// length in `1..=max` on this runtime's placement, where it models the run (as
    /// [`OffloadRuntime::report`]); empty where it does not, and for `max` 0.
    pub fn predicted_windows(&self, max: usize) -> Vec<(usize, f64)> {
        let window = |k: usize| {
            let input = PlanInput {
                period: k,
                aal: 1.0,
                ..self.input.clone()
            };
            let c = predict(&input, &self.plan.sizes, &self.plan.layers).sirius_offload;
            (
                k,
                ((k - 1) as f64 * c.draft_ms.unwrap_or(0.0) + c.verify_ms) / 1e3,
            )
        };
        match self.predicts {
            true => (1..=max.min(self.input.period)).map(window).collect(),
            false => Vec::new(),
        }
    }

    /// Statistics so far, with the planner's prediction for the measured `aal` and `period`
    /// (adaptive: mean K) where it models the run: on CUDA always, on CPU with a link cap
    /// (uncapped, the CPU "link" is memcpy). On CUDA this waits for copies in flight.
    pub fn report(&mut self, aal: f64, period: usize) -> Result<OffloadReport> {
        let stats = self.engine.stats()?;
        let period = period.clamp(1, self.input.period);
        let aal = aal.clamp(1.0, period as f64);
        let input = PlanInput {
            aal,
            period,
            ..self.input.clone()
        };
        let predicted = self.predicts.then(|| plan(&input)).transpose()?;
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
            launches_per_token: None,
            predicted_ttft_ms: predicted.as_ref().map(|p| p.costs.ttft_ms),
            budget_lines: self.arena.budget_lines(),
            kv_cache_rows: self.shape.context,
        })
    }

    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    pub fn arena(&self) -> &ResidentArena {
        &self.arena
    }

    /// Kept neurons per layer are a multiple of this (whole blocks of a quantized compact down
    /// matrix; 1 for float weights), as the plan counted them.
    pub fn neuron_align(&self) -> usize {
        self.dims.compact_down().block().0
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
                resident.ffn.complement = self.resident_rest.get(layer).cloned().flatten();
            }
            return Ok(resident);
        };
        let filled = self.engine.wait(layer)?;
        let streamed = match job.views::<B>(&self.dims, &filled) {
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

/// Reserves in `arena` what every request allocates besides weights: norms, KV cache,
/// activations, the staging buffers and the reserves (backend scratch; on a GPU the driver's
/// context and the allocator margin), at the plan's sizes and under its labels.
fn reserve_buffers(
    arena: &mut ResidentArena,
    c: &ModelConfig,
    shape: &RequestShape,
    plan: &Plan,
) -> Result<()> {
    let vectors = crate::offload::sizes::resident_vector_count(c);
    arena.reserve("norms and biases", (vectors * 4) as u64)?;
    // The planner's count, in the cache's element size.
    arena.reserve("KV cache", plan.sizes.kv_cache_bytes)?;
    arena.reserve("activations", shape.activation_bytes)?;
    for (line, bytes) in plan.sizes.reserves.lines() {
        arena.reserve(line, bytes)?;
    }
    arena.reserve(
        "stream buffers",
        plan.stream_buffer_bytes * plan.stream_buffers as u64,
    )?;
    Ok(())
}
