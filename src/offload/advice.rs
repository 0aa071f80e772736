//! What the planner advises when the sparse set does not fit the budget: the largest keep
//! that fits, the largest format that holds this keep, and what the overflow costs.

use crate::offload::cost::predict;
use crate::offload::format::WeightFormat;
use crate::offload::plan::Plan;
use crate::offload::sizes::{PlanInput, Sizes, STREAM_BUFFERS};
use crate::units::format_bytes;

/// Fills `plan.advice` (and the advised keep and format) when the sparse set does not fit:
/// the largest keep that fits in this format, the largest format that holds this keep, and
/// what streaming the overflow costs per token.
pub fn advise(input: &PlanInput, plan: &mut Plan) {
    let s = &plan.sizes.clone();
    let budget = format_bytes(input.budget);
    if plan.fits {
        plan.advice.push(format!(
            "the sparse set fits: {} of {budget} resident, {} spare; drafting streams nothing",
            format_bytes(plan.resident_bytes),
            format_bytes(input.budget - plan.resident_bytes)
        ));
        return;
    }
    let need = s.resident_with(2 * s.layers);
    plan.advice.push(format!(
        "{} cannot hold the sparse set in {budget}: attention {} + sparse FFN (keep {}) {} \
         + head, norms, KV cache, activations and reserves {} + stream buffers {} = {}",
        input.format,
        format_bytes(s.sum(0..s.layers, |u| u.attention)),
        input.keep,
        format_bytes(s.sum(0..s.layers, |u| u.sparse_ffn)),
        format_bytes(s.fixed_bytes()),
        format_bytes(STREAM_BUFFERS as u64 * s.buffer_bytes(&s.layers_with(2 * s.layers))),
        format_bytes(need),
    ));
    advise_alternatives(input, plan);
    // What the overflow costs: this plan against the same sizes with everything resident.
    let all = s.layers_with(2 * s.layers);
    let ideal = predict(input, s, &all).sirius_offload.ms_per_token;
    let ours = &plan.costs.sirius_offload;
    let overflow = plan
        .layers
        .iter()
        .position(|p| !p.sparse_ffn_resident)
        .unwrap_or(s.layers);
    plan.advice.push(format!(
        "as planned, the overflow ({} every pass: sparse FFN of {}{}) costs {:.1} ms per token: \
         {:.1} ms/token ({:.2} tokens/s) instead of {:.1} if it were resident",
        format_bytes(plan.streamed_bytes_per_draft),
        layer_range(overflow, s.layers),
        if plan.layers.iter().all(|p| p.attention_resident) {
            ""
        } else {
            " and some attention"
        },
        ours.ms_per_token - ideal,
        ours.ms_per_token,
        ours.tokens_per_s,
        ideal,
    ));
}

/// The largest keep that fits in this format, and the largest format that holds this keep
/// (`plan.advised_keep`, `plan.advised_format` and their advice lines).
fn advise_alternatives(input: &PlanInput, plan: &mut Plan) {
    let layers = plan.sizes.layers;
    // Hundredths from the requested keep down; fit is not monotone in keep for 1-2 layer
    // models (the complement buffers grow as keep falls), so every step is checked.
    let start = (input.keep * 100.0).floor() as u32;
    plan.advised_keep = (1..=start)
        .rev()
        .map(|k| k as f64 / 100.0)
        .find(|&k| Sizes::with(input, input.format, k).fits(input.budget));
    match plan.advised_keep {
        Some(k) => plan.advice.push(format!(
            "keep {k:.2} fits in {}: keep at most {k:.2} of the FFN neurons",
            input.format
        )),
        None => plan
            .advice
            .push(format!("no keep of 0.01 or more fits in {}", input.format)),
    }
    let bits = input.format.bits_per_weight();
    // The requested quantized format with a q4_0 compact down, then each smaller format the
    // runtime can use: quantized ones with the requested compact down first, then a q4_0 one
    // (which costs perplexity: it re-quantizes the down columns a second time at 4 bits).
    let default_down = input.sparse_down.unwrap_or(WeightFormat::Q8_0);
    let same = (input.format.is_quantized() && default_down != WeightFormat::Q4_0)
        .then_some((input.format, WeightFormat::Q4_0));
    let found = (same.into_iter().chain(smaller_formats(input)))
        .map(|(w, d)| {
            let with_down = PlanInput {
                sparse_down: Some(d),
                ..input.clone()
            };
            (w, d, Sizes::with(&with_down, w, input.keep))
        })
        .find(|(_, _, s)| s.fits(input.budget));
    plan.advised_format = found.as_ref().map(|(w, _, _)| *w);
    plan.advised_sparse_down = found
        .as_ref()
        .filter(|(w, d, _)| w.is_quantized() && *d != default_down)
        .map(|(_, d, _)| *d);
    match &found {
        Some((w, d, s)) => plan.advice.push(format!(
            "{w} ({} bits per weight) holds keep {}: {} resident{}",
            w.bits_per_weight(),
            input.keep,
            format_bytes(s.resident_with(2 * layers)),
            match plan.advised_sparse_down {
                Some(_) => format!(
                    ", with Griffin's compact down matrices in {d} (--griffin-down {d}; \
                     {default_down} does not fit, and a second 4-bit quantization costs \
                     perplexity)"
                ),
                None => String::new(),
            }
        )),
        None if WeightFormat::ALL
            .iter()
            .any(|&w| w.bits_per_weight() < bits && runnable(input, w)) =>
        {
            plan.advice.push(format!(
                "no smaller weight format holds keep {}",
                input.keep
            ));
            if plan.advised_keep.is_none() {
                advise_format_and_keep(input, plan, same.into_iter().chain(smaller_formats(input)));
            }
        }
        None => {}
    }
}

/// Where neither a smaller keep in this format nor a smaller format at this keep fits: the
/// (format, compact down) of `candidates` that holds the largest keep, the larger format on a
/// tie (`plan.advised_format` with `plan.advised_format_keep`).
fn advise_format_and_keep(
    input: &PlanInput,
    plan: &mut Plan,
    candidates: impl Iterator<Item = (WeightFormat, WeightFormat)>,
) {
    let start = (input.keep * 100.0).floor() as u32;
    let mut best: Option<(WeightFormat, WeightFormat, u32)> = None;
    for (w, d) in candidates {
        let with_down = PlanInput {
            sparse_down: Some(d),
            ..input.clone()
        };
        let floor = best.map_or(0, |(_, _, k)| k);
        let keep = ((floor + 1)..=start)
            .rev()
            .find(|&k| Sizes::with(&with_down, w, k as f64 / 100.0).fits(input.budget));
        if let Some(k) = keep {
            best = Some((w, d, k));
        }
    }
    let Some((w, d, k)) = best else { return };
    let keep = k as f64 / 100.0;
    let default_down = input.sparse_down.unwrap_or(WeightFormat::Q8_0);
    plan.advised_format = Some(w);
    plan.advised_format_keep = Some(keep);
    plan.advised_sparse_down = (w.is_quantized() && d != default_down).then_some(d);
    plan.advice.push(format!(
        "{w} ({} bits per weight) holds keep {keep:.2}{}",
        w.bits_per_weight(),
        match plan.advised_sparse_down {
            Some(d) => format!(" with Griffin's compact down matrices in {d} (--griffin-down {d})"),
            None => String::new(),
        }
    ));
}

/// Each format smaller than the requested one that the runtime can use, with its compact down
/// formats: the requested one first, then q4_0 (which costs perplexity: it re-quantizes the
/// down columns a second time at 4 bits).
fn smaller_formats(input: &PlanInput) -> impl Iterator<Item = (WeightFormat, WeightFormat)> + '_ {
    let bits = input.format.bits_per_weight();
    let default_down = input.sparse_down.unwrap_or(WeightFormat::Q8_0);
    (WeightFormat::ALL.into_iter())
        .filter(move |w| w.bits_per_weight() < bits && runnable(input, *w))
        .flat_map(move |w| {
            let downs = match w.is_quantized() {
                true => vec![default_down, WeightFormat::Q4_0],
                false => vec![default_down],
            };
            downs.into_iter().map(move |d| (w, d))
        })
}

/// Whether the runtime the plan is for can run `w`: a GPU plan any format; the CPU runtime
/// (`run --resident-mem`) the ones `run --weights` makes from any checkpoint (K-quants and
/// Q4_1 come only as GGUF files).
fn runnable(input: &PlanInput, w: WeightFormat) -> bool {
    input.on_gpu
        || matches!(
            w,
            WeightFormat::Bf16 | WeightFormat::F16 | WeightFormat::Q8_0 | WeightFormat::Q4_0
        )
}

/// "layers 3-9", "layer 3".
pub fn layer_range(first: usize, end: usize) -> String {
    if end == first + 1 {
        format!("layer {first}")
    } else {
        format!("layers {first}-{}", end - 1)
    }
}
