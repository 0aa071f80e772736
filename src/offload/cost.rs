//! Latency model: predicted milliseconds per produced token for three ways of running the same
//! model in the same budget, and the time to first token.
//!
//! - `full`: dense decoding, one token per pass; the dense FFN layers fill what the budget has
//!   left after attention, the rest is streamed every token.
//! - `reference`: the Sirius paper's offloading code: only embedding, head, norms and KV cache
//!   resident; each draft streams attention + sparse FFN of every layer, each verification
//!   attention + whole FFN.
//! - `sirius_offload`: the plan: drafts stream only the overflow, verification the FFN
//!   complement plus the overflow.
//!
//! A pass is simulated as the runtime executes it ([`pipeline_seconds`]): one copy engine
//! feeding double buffers, each layer's compute bound by memory bandwidth (every weight the
//! layer uses is read once per pass, plus its KV rows) or, given `compute_gflops`, by its
//! arithmetic (two FLOP per weight per token of the pass), whichever is slower. Without it
//! arithmetic is ignored, which flatters long prefills on the GPU and, on a CPU, verification
//! windows, whose K tokens cost up to K decode steps of arithmetic there.
//!
//! A copy costs its bytes over the link: the CUDA copy engine DMAs straight from registered
//! host memory (or, for jobs of many short runs, a gather kernel reads them over the bus).
//! Only bytes outside the registered ranges take a host-gather stage first ([`HostGather`]:
//! the copy thread gathers them into pinned staging, pipelined with the link and compute,
//! see [`pipeline_seconds_gathered`]): on a GPU what only the prefill reads
//! (`plan::unpinned_prefill_bytes`, a float model's dense FFN), and whatever the driver
//! refused to register (all of it with `SIRIUS_COPY_STAGED=1`; the runtime sets the share
//! once it has registered its plan). The CPU has no such stage (its copy thread's memcpy is
//! the link). The run's report measures it as `host_gather_s`.

use serde::Serialize;

use crate::offload::format::VECTOR_BYTES;
use crate::offload::plan::unpinned_prefill_bytes;
use crate::offload::prefill::prefill_passes;
use crate::offload::sizes::{LayerPlacement, PlanInput, Sizes, MIN_GBPS, STREAM_BUFFERS};

/// GB/s of the copy thread's host gather: one core's memcpy from mapped (page-cache) memory
/// into write-combined pinned memory, assumed (gpu-check measures `host_gather_s`).
pub const HOST_GATHER_GBPS: f64 = 6.0;

/// The GPU copy engine's host-gather stage: its speed, and the share of the bytes meant to be
/// DMA'd that it gathers anyway (0: everything the plan pins is registered; 1: nothing is).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostGather {
    pub gbps: f64,
    pub unpinned_share: f64,
}

impl Default for HostGather {
    fn default() -> Self {
        HostGather {
            gbps: HOST_GATHER_GBPS,
            unpinned_share: 0.0,
        }
    }
}

impl HostGather {
    /// Bytes of a copy of `pinned` bytes meant for DMA and `unpinned` that are not that
    /// the host gathers.
    fn bytes(&self, pinned: u64, unpinned: u64) -> u64 {
        (pinned as f64 * self.unpinned_share.clamp(0.0, 1.0)).round() as u64 + unpinned
    }
}

/// Predicted cost of one way of decoding.
#[derive(Debug, Clone, Serialize)]
pub struct WayCost {
    pub ms_per_token: f64,
    pub tokens_per_s: f64,
    /// One draft pass of the sparse model (none for `full`, which does not draft).
    pub draft_ms: Option<f64>,
    /// One full-model pass: the verification of a K-token window (for `full`, one token).
    pub verify_ms: f64,
    pub streamed_bytes_per_token: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Costs {
    pub full: WayCost,
    pub reference: WayCost,
    pub sirius_offload: WayCost,
    /// The prefill of `prompt_tokens` with the plan's residency, one pass per chunk: the
    /// neuron set is not chosen yet, so each pass streams every layer's whole FFN (plus any
    /// overflow); then the request's resident neurons come in.
    pub ttft_ms: f64,
    /// Prompt tokens per prefill pass (the last pass may be shorter) and the passes.
    pub prefill_chunk: usize,
    pub prefill_passes: usize,
}

/// Wall time of one pass through the layers, given each layer's copy and compute seconds.
///
/// Layers with `copy[l] > 0` are streamed and take the buffers in turn (the i-th streamed layer
/// uses buffer `i % buffers`). One copy engine works in layer order: a layer's copy starts when
/// the previous copy has finished and its buffer has been released by the compute of the layer
/// that used it before (with 2 buffers and contiguous streamed layers, layer l - 2). Compute of
/// layer l starts when compute of l - 1 has finished and, if streamed, its copy has landed.
/// Layers with nothing to copy do not wait for the link. Missing entries count as 0; `buffers`
/// below 1 counts as 1.
pub fn pipeline_seconds(copy: &[f64], compute: &[f64], buffers: usize) -> f64 {
    pipeline_seconds_gathered(copy, &[], compute, buffers)
}

/// [`pipeline_seconds`] with a host-gather stage before the copies: a streamed layer's
/// `gather[l]` seconds run on the copy thread, one job after another, each once its staging
/// buffer's previous upload has finished; its copy starts when its gather has too. Missing
/// entries count as 0 (with no gather it is [`pipeline_seconds`]).
pub fn pipeline_seconds_gathered(
    copy: &[f64],
    gather: &[f64],
    compute: &[f64],
    buffers: usize,
) -> f64 {
    let buffers = buffers.max(1);
    let mut released = vec![0.0f64; buffers];
    let mut uploaded = vec![0.0f64; buffers];
    let (mut copy_free, mut gather_free, mut compute_end) = (0.0f64, 0.0f64, 0.0f64);
    let mut streamed = 0usize;
    let at = |v: &[f64], l: usize| v.get(l).copied().unwrap_or(0.0).max(0.0);
    for l in 0..copy.len().max(compute.len()) {
        let (c, g, work) = (at(copy, l), at(gather, l), at(compute, l));
        if c > 0.0 {
            let slot = streamed % buffers;
            streamed += 1;
            let gathered = gather_free.max(uploaded[slot]) + g;
            gather_free = gathered;
            let landed = copy_free.max(released[slot]).max(gathered) + c;
            copy_free = landed;
            uploaded[slot] = landed;
            compute_end = compute_end.max(landed) + work;
            released[slot] = compute_end;
        } else {
            compute_end += work;
        }
    }
    compute_end
}

/// One layer of a pass: bytes copied in, bytes its compute reads, its arithmetic (FLOP).
type LayerWork = (u64, u64, f64);

/// Per layer the bytes the host gathers of copies of (pinned, unpinned) bytes; none without
/// a gather stage.
fn gathered(input: &PlanInput, copies: impl Iterator<Item = (u64, u64)>) -> Vec<u64> {
    match &input.host_gather {
        Some(g) => copies
            .map(|(pinned, unpinned)| g.bytes(pinned, unpinned))
            .collect(),
        None => Vec::new(),
    }
}

/// Per layer what a pass copies, reads and computes; plus the head after the last layer.
struct Pass {
    layers: Vec<LayerWork>,
    /// Per layer the bytes of its copy gathered on the host first (empty: none).
    gathered: Vec<u64>,
    tail_read: u64,
    tail_flops: f64,
}

impl Pass {
    fn seconds(&self, input: &PlanInput) -> f64 {
        let link = input.link_gbps * 1e9;
        let mem = input.mem_gbps * 1e9;
        // The slower of reading the weights and doing the arithmetic.
        let work = |read: u64, flops: f64| match input.compute_gflops {
            Some(g) => (read as f64 / mem).max(flops / (g * 1e9)),
            None => read as f64 / mem,
        };
        let copy: Vec<f64> = self.layers.iter().map(|l| l.0 as f64 / link).collect();
        let compute: Vec<f64> = self.layers.iter().map(|l| work(l.1, l.2)).collect();
        // Without a stage nothing is gathered (`gathered` is empty).
        let gbps = input.host_gather.map_or(1.0, |g| g.gbps.max(MIN_GBPS));
        let gather: Vec<f64> = (self.gathered.iter())
            .map(|&b| b as f64 / (gbps * 1e9))
            .collect();
        pipeline_seconds_gathered(&copy, &gather, &compute, STREAM_BUFFERS)
            + work(self.tail_read, self.tail_flops)
    }

    fn streamed(&self) -> u64 {
        self.layers.iter().map(|l| l.0).sum()
    }
}

/// What runs after the last layer for one row of logits: the bytes the final norm and the
/// head read, and the head's FLOP.
fn head_work(input: &PlanInput, s: &Sizes) -> (u64, f64) {
    let read = s.head_bytes + s.hidden as u64 * VECTOR_BYTES;
    (read, 2.0 * (input.config.vocab_size * s.hidden) as f64)
}

/// FLOP of one layer for `rows` tokens with `neurons` FFN neurons: two per weight per token
/// (attention's products over the cache are left out: small next to the weights' here).
fn layer_flops(input: &PlanInput, neurons: usize, rows: usize) -> f64 {
    let c = &input.config;
    let h = c.hidden_size;
    let attention = 2 * h * c.q_dim() + 2 * h * c.kv_dim();
    2.0 * (attention + 3 * h * neurons) as f64 * rows as f64
}

fn way(ms_per_token: f64, draft_ms: Option<f64>, verify_ms: f64, bytes: f64) -> WayCost {
    WayCost {
        ms_per_token,
        tokens_per_s: if ms_per_token > 0.0 {
            1e3 / ms_per_token
        } else {
            f64::INFINITY
        },
        draft_ms,
        verify_ms,
        streamed_bytes_per_token: bytes.round() as u64,
    }
}

/// A Sirius-style way: K - 1 drafts and one verification every AAL produced tokens.
fn windowed(input: &PlanInput, draft: &Pass, verify: &Pass) -> WayCost {
    let drafts = (input.period - 1) as f64;
    let (d, v) = (draft.seconds(input), verify.seconds(input));
    let ms = (drafts * d + v) / input.aal * 1e3;
    let bytes = (drafts * draft.streamed() as f64 + verify.streamed() as f64) / input.aal;
    way(ms, Some(d * 1e3), v * 1e3, bytes)
}

/// The three ways and the time to first token for the plan's `layers`.
pub fn predict(input: &PlanInput, s: &Sizes, layers: &[LayerPlacement]) -> Costs {
    let kv = s.kv_layer_bytes;
    // The head and the final norm run after the last layer.
    let (tail, head_flops) = head_work(input, s);
    // What layer `i`'s compute reads: its attention, its sparse or whole FFN, its KV rows.
    let sparse_read = |i: usize| s.layer(i).attention + s.layer(i).sparse_ffn + kv;
    let dense_read = |i: usize| s.layer(i).attention + s.layer(i).ffn + kv;
    // A draft is one token through the sparse FFN; a verification K tokens (each with its
    // logits) through the whole one.
    let (draft_flops, verify_flops) = (
        layer_flops(input, s.kept_neurons, 1),
        layer_flops(input, s.neurons, input.period),
    );
    // Decode steps stream only pinned ranges: gathered only where the driver refused them.
    let pass = |rows: usize, f: &dyn Fn(&LayerPlacement) -> LayerWork| {
        let layers: Vec<LayerWork> = layers.iter().map(f).collect();
        Pass {
            gathered: gathered(input, layers.iter().map(|l| (l.0, 0))),
            layers,
            tail_read: tail,
            tail_flops: head_flops * rows as f64,
        }
    };
    let draft = pass(1, &|p| {
        (s.draft_stream_bytes(p), sparse_read(p.layer), draft_flops)
    });
    let verify = pass(input.period, &|p| {
        (s.verify_stream_bytes(p), dense_read(p.layer), verify_flops)
    });
    let sirius_offload = windowed(input, &draft, &verify);

    // The paper's code streams every layer's weights on every pass.
    let everything = |rows: usize, flops: f64, read: &dyn Fn(usize) -> u64| Pass {
        layers: (0..s.layers)
            .map(|i| (read(i) - kv, read(i), flops))
            .collect(),
        gathered: Vec::new(),
        tail_read: tail,
        tail_flops: head_flops * rows as f64,
    };
    let reference = windowed(
        input,
        &everything(1, draft_flops, &sparse_read),
        &everything(input.period, verify_flops, &dense_read),
    );

    let dense = Pass {
        layers: full_placement(input, s)
            .iter()
            .enumerate()
            .map(|(i, &(att, ffn))| {
                let u = s.layer(i);
                let copy = if att { 0 } else { u.attention } + if ffn { 0 } else { u.ffn };
                (copy, dense_read(i), layer_flops(input, s.neurons, 1))
            })
            .collect(),
        gathered: Vec::new(),
        tail_read: tail,
        tail_flops: head_flops,
    };
    let dense_s = dense.seconds(input);
    let full = way(dense_s * 1e3, None, dense_s * 1e3, dense.streamed() as f64);

    let chunk = prefill_chunk_of(input);
    Costs {
        full,
        reference,
        sirius_offload,
        ttft_ms: ttft_seconds(input, s, layers) * 1e3,
        prefill_chunk: chunk,
        prefill_passes: prefill_passes(input.prompt_tokens, chunk),
    }
}

/// The prefill's chunk: the input's (the whole prompt without one), within the prompt.
fn prefill_chunk_of(input: &PlanInput) -> usize {
    input
        .prefill_chunk
        .unwrap_or(input.prompt_tokens)
        .clamp(1, input.prompt_tokens.max(1))
}

/// Time to first token: each prefill chunk is one pass that streams every non-resident
/// weight (the neuron set is not chosen yet); then the request's resident neurons come in
/// over the link.
fn ttft_seconds(input: &PlanInput, s: &Sizes, layers: &[LayerPlacement]) -> f64 {
    let prompt_kv = s.kv_layer_bytes / input.context as u64 * input.prompt_tokens as u64;
    let chunk = prefill_chunk_of(input);
    // A pass over `rows` prompt tokens; only the last one computes the head (logits for the
    // prompt's last token).
    let head = head_work(input, s);
    let prefill = |rows: usize, last: bool| {
        let flops = layer_flops(input, s.neurons, rows);
        let unpinned = |p: &LayerPlacement| unpinned_prefill_bytes(s, p);
        let copied = |p: &LayerPlacement| s.prefill_stream_bytes(p);
        Pass {
            gathered: gathered(
                input,
                layers
                    .iter()
                    .map(|p| (copied(p) - unpinned(p), unpinned(p))),
            ),
            layers: (layers.iter())
                .map(|p| {
                    let read = s.layer(p.layer).attention + s.layer(p.layer).ffn + prompt_kv;
                    (s.prefill_stream_bytes(p), read, flops)
                })
                .collect(),
            tail_read: if last { head.0 } else { 0 },
            tail_flops: if last { head.1 } else { 0.0 },
        }
        .seconds(input)
    };
    // Whole chunks, then the last one (a whole chunk or what is left).
    let rest = input.prompt_tokens - (input.prompt_tokens - 1) / chunk * chunk;
    let whole = ((input.prompt_tokens - rest) / chunk) as f64;
    let passes_seconds = match whole > 0.0 {
        true => whole * prefill(chunk, false),
        false => 0.0,
    } + prefill(rest, true);
    let resident_sparse: u64 = (layers.iter().filter(|p| p.sparse_ffn_resident))
        .map(|p| s.layer(p.layer).sparse_ffn)
        .sum();
    let resident_rest: u64 = (layers.iter().filter(|p| p.complement_resident))
        .map(|p| s.layer(p.layer).complement)
        .sum();
    let copy_in = (resident_sparse + resident_rest) as f64 / (input.link_gbps * 1e9);
    passes_seconds + copy_in
}

/// Dense decoding's placement: (attention resident, whole FFN resident) per layer. Attention of
/// layers 0.. first, then whole FFN layers 0.., while fixed bytes + placed + 2 buffers (sized
/// for the largest per-layer transfer left) fit; the smallest placement when nothing does.
fn full_placement(input: &PlanInput, s: &Sizes) -> Vec<(bool, bool)> {
    let l = s.layers;
    let layout = |m: usize| -> Vec<(bool, bool)> { (0..l).map(|i| (i < m, l + i < m)).collect() };
    let resident = |m: usize| -> u64 {
        let placed = s.sum(0..m.min(l), |u| u.attention) + s.sum(0..m.saturating_sub(l), |u| u.ffn);
        let buffer = (layout(m).iter().enumerate())
            .map(|(i, &(a, f))| {
                let u = s.layer(i);
                (if a { 0 } else { u.attention }) + if f { 0 } else { u.ffn }
            })
            .max()
            .unwrap_or(0);
        s.fixed_bytes() + placed + STREAM_BUFFERS as u64 * buffer
    };
    let m = (0..=2 * l)
        .rev()
        .find(|&m| resident(m) <= input.budget)
        .unwrap_or(0);
    layout(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gather_stage_pipelines_ahead_of_the_link() {
        let (copy, compute) = ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]);
        let plain = pipeline_seconds(&copy, &compute, 2);
        assert_eq!(plain, 1.0 + 3.0 * 2.0);
        // No gather: the same pipeline.
        assert_eq!(
            pipeline_seconds_gathered(&copy, &[0.0; 3], &compute, 2),
            plain
        );
        // A short gather only delays the first copy: the rest hide behind compute.
        assert_eq!(
            pipeline_seconds_gathered(&copy, &[0.5; 3], &compute, 2),
            plain + 0.5
        );
        // A gather slower than compute bounds the pass: 3 s each, one after another.
        let slow = pipeline_seconds_gathered(&copy, &[3.0; 3], &compute, 2);
        assert_eq!(slow, 3.0 * 3.0 + 1.0 + 2.0);
        // Layers with nothing to copy gather nothing.
        assert_eq!(
            pipeline_seconds_gathered(&[0.0, 1.0], &[5.0, 0.0], &[1.0, 1.0], 2),
            pipeline_seconds(&[0.0, 1.0], &[1.0, 1.0], 2)
        );
    }

    #[test]
    fn the_gathered_share_takes_refused_bytes_and_all_unpinned_ones() {
        let g = HostGather {
            gbps: 6.0,
            unpinned_share: 0.25,
        };
        assert_eq!(g.bytes(400, 0), 100);
        assert_eq!(g.bytes(400, 30), 130);
        assert_eq!(HostGather::default().bytes(400, 30), 30);
    }
}
