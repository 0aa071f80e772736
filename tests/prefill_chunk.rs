//! The prefill chunk an offloaded request takes from its budget (`offload::prefill`): spare
//! bytes after placement, and where it pays the FFN complements, buy longer chunks and so
//! fewer prefill passes (each streams every weight not resident); attention and the sparse
//! set never pay for them.
use rand::{rngs::StdRng, Rng, SeedableRng};
mod common;

use common::preset_config as preset;
use sirius_offload::config::ModelConfig;
use sirius_offload::engine::offloaded::request_shape_for;
use sirius_offload::offload::budget::gpu_scratch_bytes;
use sirius_offload::offload::format::WeightFormat;
use sirius_offload::offload::placement::{placed_units, plan, Plan, PlanInput, Sizes};
use sirius_offload::offload::prefill::{
    prefill_chunk, prefill_passes, request_bytes, PrefillChunk, PREFILL_CHUNK_STEP,
};
use sirius_offload::offload::runtime::{
    request_plan_input, scratch_shape, OffloadConfig, PlanTarget,
};
use sirius_offload::sirius::SiriusConfig;

/// The old fixed chunk, and now the floor.
const BASE: usize = 256;
const CONTEXT: usize = 4096;

/// What `plan --gpu-mem` (or `--resident-mem` when `!on_gpu`) books for a request of
/// `prompt` tokens prefilled in chunks of `chunk`: the shapes `run` books.
struct Request {
    config: ModelConfig,
    format: WeightFormat,
    keep: f32,
    budget: u64,
    on_gpu: bool,
    prompt: usize,
}

impl Request {
    fn input(&self, chunk: usize) -> PlanInput {
        let c = &self.config;
        let sirius = SiriusConfig {
            period: 16,
            ..SiriusConfig::default()
        };
        let quantized = self.format.is_quantized();
        let shape = request_shape_for(
            c,
            quantized,
            self.prompt,
            CONTEXT,
            chunk,
            self.keep,
            &sirius,
        );
        let target = PlanTarget {
            on_gpu: self.on_gpu,
            link_gbps: 25.0,
            backend_scratch: match self.on_gpu {
                true => gpu_scratch_bytes(&scratch_shape(c, &shape), true),
                false => 0,
            },
            kv_bytes: 2,
        };
        let sparse_down = quantized.then_some(WeightFormat::Q4_0);
        let formats = (self.format, None, None, sparse_down);
        let cfg = OffloadConfig::new(self.budget);
        request_plan_input(c, formats, &cfg, &shape, &target)
    }

    /// The chunk the policy picks.
    fn chosen_chunk(&self) -> usize {
        prefill_chunk(PrefillChunk::Grow(BASE), self.prompt, &mut |c| {
            Ok(self.input(c))
        })
        .unwrap()
    }

    /// The chunk the policy picks and the plan with it.
    fn chosen(&self) -> (usize, Plan) {
        let chunk = self.chosen_chunk();
        (chunk, plan(&self.input(chunk)).unwrap())
    }
}

fn request(model: &str, format: WeightFormat, keep: f32, budget: u64, prompt: usize) -> Request {
    Request {
        config: preset(model),
        format,
        keep,
        budget,
        on_gpu: true,
        prompt,
    }
}

/// The placement's attention and sparse set, per layer.
fn decode_set(p: &Plan) -> Vec<(bool, bool)> {
    let layers = p.layers.iter();
    layers
        .map(|l| (l.attention_resident, l.sparse_ffn_resident))
        .collect()
}

/// With nothing to trade (keep 1: no complements, every layer resident), only the bytes a
/// budget has beyond the placement buy longer chunks: more of them, fewer passes, each
/// streaming the same bytes, and a shorter predicted time to first token.
#[test]
fn a_bigger_budget_prefills_in_fewer_longer_chunks() {
    let prompt = 2048;
    let at = |budget| request("llama-3-8b", WeightFormat::Bf16, 1.0, budget, prompt);
    // The budget that holds everything at 256-token chunks with nothing to spare.
    let tight = plan(&at(1 << 50).input(BASE)).unwrap();
    assert!(tight.layers.iter().all(|l| l.sparse_ffn_resident));
    let mut last = (BASE, prefill_passes(prompt, BASE), f64::INFINITY);
    let mut grew = 0;
    for extra in [0u64, 64 << 20, 256 << 20, 1 << 30, 4 << 30] {
        let (chunk, p) = at(tight.resident_bytes + extra).chosen();
        let passes = p.costs.prefill_passes;
        assert_eq!(p.costs.prefill_chunk, chunk);
        assert_eq!(passes, prefill_passes(prompt, chunk));
        if extra == 0 {
            assert_eq!(chunk, BASE, "no spare bytes: the old chunk");
        }
        assert!(chunk >= last.0, "+{extra}: chunk {chunk} after {}", last.0);
        assert!(
            passes <= last.1,
            "+{extra}: {passes} passes after {}",
            last.1
        );
        assert_eq!(p.layers, tight.layers, "+{extra}");
        assert_eq!(
            p.streamed_bytes_per_prefill,
            tight.streamed_bytes_per_prefill
        );
        if passes < last.1 {
            assert!(p.costs.ttft_ms < last.2, "+{extra}: {}", p.costs.ttft_ms);
            grew += 1;
        }
        last = (chunk, passes, p.costs.ttft_ms);
    }
    assert!(grew >= 2, "the chunk grew {grew} times");
    assert_eq!(
        last.0, prompt,
        "4 GiB spare holds the whole prompt's activations"
    );
}

/// Llama-3-70B in q4_k within 24 GiB (keep 0.46, the largest that fits, compact down in
/// q4_0): the placement leaves a few MiB, so longer chunks come from the one resident FFN
/// complement. For a 2048-token prompt that pays many times over (a pass streams every
/// layer's FFN, the complement only what one layer's verification reads); for a 300-token
/// prompt (one pass saved) with 3796 tokens to decode it does not (spare budget may still
/// pay for it).
#[test]
fn a_long_prompt_takes_the_complements_and_never_the_sparse_set() {
    let at = |prompt| request("llama-3-70b", WeightFormat::Q4K, 0.46, 24 << 30, prompt);
    let long = at(2048);
    let old = plan(&long.input(BASE)).unwrap();
    assert!(old.fits, "keep 0.46 fits in 24 GiB");
    assert_eq!(old.costs.prefill_passes, 8);
    let (chunk, new) = long.chosen();
    assert!(chunk > BASE, "chunk {chunk}");
    assert!(
        new.costs.prefill_passes < 8,
        "{} passes",
        new.costs.prefill_passes
    );
    assert_eq!(decode_set(&new), decode_set(&old));
    assert_eq!(new.keep, old.keep);
    assert!(new.costs.ttft_ms < 0.6 * old.costs.ttft_ms);
    // Verification streams a little more; drafts nothing more.
    let (a, b) = (&old.costs.sirius_offload, &new.costs.sirius_offload);
    assert!(
        b.ms_per_token < 1.02 * a.ms_per_token,
        "{} vs {}",
        b.ms_per_token,
        a.ms_per_token
    );
    assert_eq!(new.streamed_bytes_per_draft, old.streamed_bytes_per_draft);
    let short = at(300);
    let (chunk, kept) = short.chosen();
    // One pass saved is not worth a resident complement: the placement stays the 256-token
    // plan's; the whole prompt in one chunk only where spare budget pays for it.
    assert!(chunk == BASE || chunk == 300, "chunk {chunk}");
    assert_eq!(kept.layers, plan(&short.input(BASE)).unwrap().layers);
}

/// Whatever the budget, the chunk leaves attention and the sparse set (and the keep) as the
/// 256-token plan has them, stays in the budget, is a multiple of the step (or the whole
/// prompt), and its request streams no more bytes than at 256 tokens.
#[test]
fn the_chunk_never_takes_bytes_from_the_decode_set() {
    let mut rng = StdRng::seed_from_u64(17);
    let models = [
        ("llama-3-8b", WeightFormat::Bf16, true),
        ("llama-3-70b", WeightFormat::Q4K, true),
        ("smollm2-135m", WeightFormat::Bf16, false),
    ];
    for (model, format, on_gpu) in models {
        let config = preset(model);
        let request = |budget, prompt| Request {
            config: config.clone(),
            format,
            keep: 0.5,
            budget,
            on_gpu,
            prompt,
        };
        let all = plan(&request(1 << 50, 4096).input(BASE)).unwrap();
        for _ in 0..24 {
            let budget = rng.gen_range(all.minimum_bytes..all.resident_bytes + (2 << 30));
            let prompt = rng.gen_range(1..=CONTEXT);
            let r = request(budget, prompt);
            let base_input = r.input(BASE);
            let Ok(base) = plan(&base_input) else {
                // The minimum grows with the prompt's activations: the policy keeps the
                // old chunk, and the planner says why it does not fit.
                assert_eq!(r.chosen_chunk(), BASE.min(prompt));
                continue;
            };
            let (chunk, p) = r.chosen();
            let what = format!("{model} budget {budget} prompt {prompt}: chunk {chunk}");
            assert!(chunk >= BASE.min(prompt) && chunk <= prompt, "{what}");
            assert!(
                chunk.is_multiple_of(PREFILL_CHUNK_STEP) || chunk == prompt,
                "{what}"
            );
            assert_eq!(p.keep, base.keep, "{what}");
            assert_eq!(decode_set(&p), decode_set(&base), "{what}");
            assert_eq!(p.sizes.kept_neurons, base.sizes.kept_neurons, "{what}");
            assert!(p.resident_bytes <= budget, "{what}");
            let bytes = |input: &PlanInput, chunk| {
                let sizes = Sizes::new(input);
                let placed = placed_units(&sizes, budget).unwrap();
                request_bytes(input, &sizes, placed, chunk)
            };
            let (new, old) = (bytes(&r.input(chunk), chunk), bytes(&base_input, BASE));
            assert!(new <= old, "{what}: {new} bytes streamed, {old} at {BASE}");
            if chunk > BASE {
                assert!(new < old, "{what}: a longer chunk that saves nothing");
            }
        }
    }
}

/// `--prefill-chunk N` is taken as asked where the budget would grow it, and a chunk longer
/// than the prompt is the prompt.
#[test]
fn a_fixed_chunk_is_taken_as_asked() {
    let r = request("llama-3-8b", WeightFormat::Bf16, 1.0, 1 << 50, 2048);
    assert!(r.chosen_chunk() > BASE, "a roomy budget grows the chunk");
    let fixed = |n| prefill_chunk(PrefillChunk::Fixed(n), 2048, &mut |c| Ok(r.input(c)));
    assert_eq!(fixed(128).unwrap(), 128);
    assert_eq!(fixed(5000).unwrap(), 2048);
    assert_eq!(fixed(0).unwrap(), 1);
}

/// A fixed chunk whose activations the budget cannot hold is refused naming the option and
/// the longest chunk that fits, which is then accepted (one token more is not).
#[test]
fn a_fixed_chunk_the_budget_cannot_hold_names_the_longest_that_fits() {
    let mut r = request("llama-3-8b", WeightFormat::Bf16, 1.0, 1 << 50, 2048);
    r.budget = plan(&r.input(BASE)).unwrap().minimum_bytes;
    let fixed = |n| prefill_chunk(PrefillChunk::Fixed(n), 2048, &mut |c| Ok(r.input(c)));
    assert_eq!(fixed(BASE).unwrap(), BASE);
    let e = fixed(2048).unwrap_err().to_string();
    assert!(e.contains("--prefill-chunk 2048"), "{e}");
    let longest: usize = (e.split("at most ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no longest chunk in: {e}"));
    assert!((BASE..2048).contains(&longest), "{e}");
    assert_eq!(fixed(longest).unwrap(), longest);
    assert!(fixed(longest + 1).is_err());
}
