//! What stays resident in fast memory and what is streamed: a pure function of shapes, weight
//! format, Griffin keep fraction, budget and context ([`plan`]).
//!
//! Always resident: norms (f32), the LM head, the KV cache, activations of one verification
//! window and two streaming buffers (double buffering). The embedding table stays on the host
//! (its rows are looked up there). The rest of the budget takes, in this order, the attention
//! of layers 0.., then the sparse FFN subset (Griffin's kept neurons) of layers 0..; what does
//! not fit is the *overflow*, streamed on every pass. Verification (and prefill) additionally
//! streams each layer's FFN complement, or its whole FFN where the sparse subset overflowed.
//!
//! The planner's parts: its input and the byte sizes of what it places (`sizes`), the plan it
//! returns (`plan`), the cost model (`cost`) and the advice when the sparse set does not fit
//! (`advice`); their types are re-exported here, the planner's one entry.

use crate::error::{Error, Result};
use crate::offload::advice::advise;
pub use crate::offload::advice::layer_range;
use crate::offload::budget;
use crate::offload::cost;
use crate::units::format_bytes;

pub use crate::offload::cost::{Costs, WayCost};
pub use crate::offload::plan::{
    budget_lines_of, pinned_host_bytes, unpinned_prefill_bytes, Every, HostFootprint, PinnedUnits,
    Plan, PlanItem, Residence,
};
pub use crate::offload::sizes::{
    LayerFormats, LayerPlacement, LayerSizes, PlanInput, Sizes, CPU_MEM_GBPS, GPU_LINK_GBPS,
    GPU_MEM_GBPS, MAX_GBPS, MIN_GBPS, STREAM_BUFFERS,
};

/// Plans placement, predicts costs and, when the sparse set does not fit, says what would.
pub fn plan(input: &PlanInput) -> Result<Plan> {
    input.validate()?;
    let sizes = Sizes::new(input);
    let units = 3 * sizes.layers;
    // Resident bytes are not monotone in the units placed (buffers shrink once all attention,
    // then all of the sparse set, is resident), so every count is tried; the largest that fits
    // wins. At most 3 * 1024 + 1 counts.
    let minimum = (0..=units)
        .map(|m| sizes.resident_with(m))
        .min()
        .unwrap_or(0);
    if input.budget < minimum {
        return Err(budget_error(input, &sizes, minimum));
    }
    let placed = placed_units(&sizes, input.budget).unwrap_or(0);
    let layers = sizes.layers_with(placed);
    let buffer = sizes.buffer_bytes(&layers);
    let items = items(input, &sizes, &layers, buffer);
    let resident_bytes = items
        .iter()
        .filter(|i| i.residence == Residence::Resident)
        .map(|i| i.bytes)
        .sum();
    let costs = cost::predict(input, &sizes, &layers);
    let mut plan = Plan {
        format: input.format,
        keep: input.keep,
        budget: input.budget,
        context: input.context,
        period: input.period,
        aal: input.aal,
        total_weight_bytes: sizes.total_weight_bytes(input.config.tie_word_embeddings),
        resident_bytes,
        fits: placed >= 2 * sizes.layers,
        stream_buffer_bytes: buffer,
        stream_buffers: STREAM_BUFFERS,
        streamed_bytes_per_verification: layers.iter().map(|p| sizes.verify_stream_bytes(p)).sum(),
        streamed_bytes_per_draft: layers.iter().map(|p| sizes.draft_stream_bytes(p)).sum(),
        streamed_bytes_per_prefill: layers.iter().map(|p| sizes.prefill_stream_bytes(p)).sum(),
        minimum_bytes: minimum,
        costs,
        advice: Vec::new(),
        advised_keep: None,
        advised_format: None,
        advised_sparse_down: None,
        advised_format_keep: None,
        budget_lines: budget_lines_of(&items),
        host: HostFootprint {
            checkpoint_bytes: sizes.total_weight_bytes(input.config.tie_word_embeddings),
            bundle_cache_bytes: match sizes.quantized {
                true => 0,
                false => sizes.sum(0..sizes.layers, |u| u.ffn),
            },
            pinned_bytes: match input.on_gpu {
                true => pinned_host_bytes(&sizes, &layers),
                false => 0,
            },
            // As `DeviceCopyEngine::new` allocates it: a host twin of each stream buffer.
            staging_bytes: match input.on_gpu {
                true => STREAM_BUFFERS as u64 * buffer,
                false => 0,
            },
        },
        sizes,
        items,
        layers,
    };
    advise(input, &mut plan);
    Ok(plan)
}

/// The most units (in [`Sizes::layers_with`]'s order) whose placement fits in `budget`;
/// `None` when not even the smallest does.
pub fn placed_units(sizes: &Sizes, budget: u64) -> Option<usize> {
    (0..=3 * sizes.layers)
        .rev()
        .find(|&m| sizes.resident_with(m) <= budget)
}

fn budget_error(input: &PlanInput, s: &Sizes, minimum: u64) -> Error {
    let worst = (s.per_layer.iter())
        .map(|u| u.attention + u.ffn)
        .max()
        .unwrap_or(0);
    let needs = format!(
        "KV cache {} ({} tokens), head {}, norms {}, activations {}, {}{} stream buffers of {} \
         (one layer's attention + whole FFN)",
        format_bytes(s.kv_cache_bytes),
        input.context,
        format_bytes(s.head_bytes),
        format_bytes(s.norm_bytes),
        format_bytes(s.activation_bytes),
        match s.reserves.total() {
            0 => String::new(),
            r => format!("reserves {} (scratch, driver, margin), ", format_bytes(r)),
        },
        STREAM_BUFFERS,
        format_bytes(worst),
    );
    Error::BudgetBelowMinimum {
        budget: input.budget,
        minimum,
        needs,
    }
}

/// The aggregated, readable list: every weight once (a tied embedding appears as the resident
/// head and as the host table it is looked up in), then KV cache, activations, buffers.
fn items(input: &PlanInput, s: &Sizes, layers: &[LayerPlacement], buffer: u64) -> Vec<PlanItem> {
    let l = s.layers;
    let att_res = layers.iter().filter(|p| p.attention_resident).count();
    let ffn_res = layers.iter().filter(|p| p.sparse_ffn_resident).count();
    let resident = Residence::Resident;
    let every_pass = Residence::Streamed { every: Every::Pass };
    let mut out = Vec::new();
    let mut push = |name: String, bytes: u64, residence| {
        out.push(PlanItem {
            name,
            bytes,
            residence,
        })
    };
    let embedding = if input.config.tie_word_embeddings {
        "embedding table (tied to the head; rows looked up on the host)"
    } else {
        "embedding table (rows looked up on the host)"
    };
    push(embedding.into(), s.embedding_bytes, Residence::Host);
    push("LM head".into(), s.head_bytes, resident);
    push("norms and biases (f32)".into(), s.norm_bytes, resident);
    if att_res > 0 {
        let name = format!("attention, {}", layer_range(0, att_res));
        push(name, s.sum(0..att_res, |u| u.attention), resident);
    }
    if att_res < l {
        let name = format!("attention overflow, {}", layer_range(att_res, l));
        push(name, s.sum(att_res..l, |u| u.attention), every_pass);
    }
    let keep = format!("{}", input.keep);
    if ffn_res > 0 {
        let name = format!("sparse FFN (keep {keep}), {}", layer_range(0, ffn_res));
        push(name, s.sum(0..ffn_res, |u| u.sparse_ffn), resident);
    }
    if ffn_res < l {
        let name = format!(
            "sparse FFN overflow (keep {keep}), {}",
            layer_range(ffn_res, l)
        );
        push(name, s.sum(ffn_res..l, |u| u.sparse_ffn), every_pass);
    }
    let rest_res = layers.iter().filter(|p| p.complement_resident).count();
    if s.complement_bytes > 0 && rest_res > 0 {
        let name = format!("FFN complement, {}", layer_range(0, rest_res));
        push(name, s.sum(0..rest_res, |u| u.complement), resident);
    }
    if s.complement_bytes > 0 && rest_res < l {
        let name = format!("FFN complement, {}", layer_range(rest_res, l));
        let residence = Residence::Streamed {
            every: Every::Verification,
        };
        push(name, s.sum(rest_res..l, |u| u.complement), residence);
    }
    let kv_name = format!(
        "KV cache ({} tokens, {}-byte elements)",
        input.context, input.kv_bytes
    );
    push(kv_name, s.kv_cache_bytes, resident);
    let act = match input.prefill_chunk {
        Some(chunk) => format!(
            "activations (prefill chunks of {chunk}, {}-token window, f32)",
            input.period
        ),
        None => format!("activations ({}-token window, f32)", input.period),
    };
    push(act, s.activation_bytes, resident);
    let bufs = format!(
        "stream buffers ({STREAM_BUFFERS} x {})",
        format_bytes(buffer)
    );
    push(bufs, STREAM_BUFFERS as u64 * buffer, resident);
    for (line, bytes) in s.reserves.lines() {
        push(reserve_item(line), bytes, resident);
    }
    out
}

/// The plan's name of a reserve line (its budget line first, then what it holds).
fn reserve_item(line: &str) -> String {
    let holds = match line {
        budget::BACKEND_SCRATCH => {
            "GEMM input copy, cuBLAS workspace, rope table, per-op temporaries, copy tables"
        }
        budget::DRIVER_CONTEXT => "the CUDA context and its modules, assumed",
        _ => "allocation rounding, pools, assumed",
    };
    format!("{line} ({holds})")
}
