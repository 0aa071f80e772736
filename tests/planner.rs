//! The offload planner against hand computation: presets' shapes, byte counts per format,
//! placement within the budget, the minimum-budget error and the pipeline model.

use rand::{rngs::StdRng, Rng, SeedableRng};
mod common;

use common::preset_config as preset;
use sirius_offload::config::{ModelConfig, Preset};
use sirius_offload::offload::budget;
use sirius_offload::offload::cost::pipeline_seconds;
use sirius_offload::offload::format::WeightFormat;
use sirius_offload::offload::placement::{plan, LayerFormats, PlanInput, Residence, Sizes};
use sirius_offload::units::{format_bytes, parse_size};
use sirius_offload::Error;

fn input(model: &str, format: WeightFormat, keep: f64, budget: u64) -> PlanInput {
    PlanInput {
        head_format: None,
        // Quantized formats: the compact down matrix in q4_0 too, so that every matrix of a
        // q4_0 plan is 4.5 bits per weight.
        sparse_down: Some(WeightFormat::Q4_0),
        layer_formats: None,
        config: preset(model),
        format,
        keep,
        budget,
        context: 4096,
        kv_bytes: 2,
        on_gpu: true,
        link_gbps: 25.0,
        mem_gbps: 1008.0,
        compute_gflops: None,
        period: 16,
        aal: 15.22,
        prompt_tokens: 512,
        activation_bytes: None,
        backend_scratch: 0,
        prefill_chunk: None,
        host_gather: None,
    }
}

fn gib(n: u64) -> u64 {
    n << 30
}

/// `bytes` for the plan's items beside what a GPU budget reserves for a `layers`-layer model
/// (the driver's context and the allocator margin): the hand computations below are about
/// the items.
fn beside_reserves(bytes: u64, layers: usize) -> u64 {
    bytes + budget::DRIVER_CONTEXT_BYTES + budget::allocator_margin(layers)
}

#[test]
fn every_preset_parses_with_its_published_shapes() {
    // name, hidden, ffn, layers, heads, kv heads, vocab, tied, qkv bias
    let table = [
        ("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, false, false),
        ("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, false, false),
        ("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, false, false),
        ("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, false, false),
        ("llama-2-13b", 5120, 13824, 40, 40, 40, 32000, false, false),
        ("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, false, false),
        ("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, false, true),
        ("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, false, true),
        ("smollm2-135m", 576, 1536, 30, 9, 3, 49152, true, false),
        (
            "qwen2.5-coder-1.5b",
            1536,
            8960,
            28,
            12,
            2,
            151936,
            false,
            true,
        ),
    ];
    for name in Preset::builtin_names() {
        assert!(table.iter().any(|t| t.0 == name), "{name} not in the table");
    }
    for (name, h, f, l, heads, kv, vocab, tied, bias) in table {
        let c = preset(name);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (h, f, l),
            "{name}"
        );
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.vocab_size),
            (heads, kv, vocab)
        );
        assert_eq!((c.tie_word_embeddings, c.qkv_bias), (tied, bias), "{name}");
    }
    let l31 = preset("llama-3.1-8b");
    assert!(l31.rope_scaling.is_some() && l31.max_position_embeddings == 131072);
    assert_eq!(preset("llama-3-70b").rope_theta, 500000.0);
    assert_eq!(preset("qwen2.5-7b").rms_norm_eps, 1e-6);
}

#[test]
fn smollm2_preset_matches_the_fetched_config() {
    let home = sirius_offload::config::sirius_home();
    let path = home.join("models/smollm2-135m/config.json");
    if !path.is_file() {
        eprintln!(
            "SKIPPED (smollm2 preset vs fetched config.json): {} does not exist; run \
             tools/fetch-model smollm2-135m",
            path.display()
        );
        return;
    }
    let real = ModelConfig::from_file(&path).unwrap();
    let ours = preset("smollm2-135m");
    let shape = |c: &ModelConfig| {
        (
            c.architecture,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.tie_word_embeddings,
            c.max_position_embeddings,
        )
    };
    assert_eq!(shape(&ours), shape(&real));
    assert_eq!(
        (ours.rope_theta, ours.rms_norm_eps, &ours.eos_token_ids),
        (real.rope_theta, real.rms_norm_eps, &real.eos_token_ids)
    );
    assert_eq!(ours.parameter_count(), real.parameter_count());
}

#[test]
fn llama_3_70b_matches_hand_computation() {
    let c = preset("llama-3-70b");
    // embedding + head: 2 * 128256 * 8192; attention: 80 * (2 * 8192^2 + 2 * 8192 * 1024);
    // FFN: 80 * 3 * 8192 * 28672; norms: (2 * 80 + 1) * 8192.
    let embed_head = 2 * 128256 * 8192u64;
    let attention = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024u64);
    let ffn = 80 * 3 * 8192 * 28672u64;
    let norms = 161 * 8192u64;
    assert_eq!(embed_head, 2_101_346_304); // 2.10e9
    assert_eq!(attention, 12_079_595_520); // 12.08e9
    assert_eq!(ffn, 56_371_445_760); // 56.37e9
    let params = embed_head + attention + ffn + norms;
    assert_eq!(c.parameter_count() as u64, params);
    assert_eq!((params as f64 / 1e7).round() / 100.0, 70.55);

    let bf16 = Sizes::new(&input("llama-3-70b", WeightFormat::Bf16, 0.5, gib(24)));
    assert_eq!(bf16.attention_bytes * 80, 2 * attention);
    assert_eq!(bf16.ffn_bytes * 80, 2 * ffn);
    assert_eq!(bf16.head_bytes + bf16.embedding_bytes, 2 * embed_head);
    assert_eq!(bf16.norm_bytes, 4 * norms);
    let total = bf16.total_weight_bytes(false);
    assert_eq!(total, 2 * (params - norms) + 4 * norms);
    assert_eq!((total as f64 / 1e8).round() / 10.0, 141.1);

    // q4: 18 bytes per 32 weights (every dimension is a multiple of 32).
    let q4 = Sizes::new(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, gib(24)));
    assert_eq!(
        q4.total_weight_bytes(false),
        (params - norms) * 18 / 32 + 4 * norms
    );
    assert_eq!(q4.attention_bytes * 80, attention * 9 / 16); // 6.79e9
    assert_eq!(q4.kept_neurons, 14336);
    assert_eq!(q4.sparse_ffn_bytes * 80, ffn / 2 * 9 / 16); // 15.85e9
    assert_eq!(q4.kv_cache_bytes, 2 * 80 * 1024 * 4096 * 2); // 1.34e9
    let q8 = Sizes::new(&input("llama-3-70b", WeightFormat::Q8_0, 0.5, gib(24)));
    assert_eq!(
        q8.total_weight_bytes(false),
        (params - norms) * 34 / 32 + 4 * norms
    );
}

#[test]
fn llama_3_70b_in_24g_needs_q4() {
    let budget = parse_size("24G").unwrap();
    let p = plan(&input("llama-3-70b", WeightFormat::Bf16, 0.5, budget)).unwrap();
    assert!(!p.fits);
    assert!(p.resident_bytes <= budget);
    // The first 4.5-bit format in the planner's order (q4_k, then q4_0).
    assert_eq!(p.advised_format, Some(WeightFormat::Q4K));
    assert_eq!(
        p.advised_keep, None,
        "attention alone overfills 24G in bf16"
    );
    let advice = p.advice.join("\n");
    assert!(
        advice.contains("bf16 cannot hold the sparse set"),
        "{advice}"
    );
    assert!(advice.contains("q4"), "{advice}");
    assert!(p.streamed_bytes_per_draft > 0);

    // With the driver's context and the allocator margin inside the 24 GiB, q4 holds keep
    // 0.45; with 24 GiB beside them, keep 0.5.
    let q4 = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.45, budget)).unwrap();
    assert!(q4.fits && q4.resident_bytes <= budget);
    let at_half = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, budget)).unwrap();
    assert!(!at_half.fits);
    let budget = beside_reserves(budget, 80);
    let q4 = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, budget)).unwrap();
    assert!(q4.fits && q4.resident_bytes <= budget);
    assert!(q4
        .layers
        .iter()
        .all(|l| l.attention_resident && l.sparse_ffn_resident));
    assert_eq!(q4.streamed_bytes_per_draft, 0);
    // ~25.4e9 bytes: attention 6.8 + head 0.59 + sparse FFN 15.85 + KV 1.34 + buffers 0.79
    // (GB; two buffers of one whole FFN layer, which a request's first prefill streams),
    // plus the complements of the first layers that still fit in the rest of the budget.
    let rest = q4.layers.iter().filter(|l| l.complement_resident).count() as u64;
    assert!(rest < 80, "the whole FFN cannot be resident in 24 GiB");
    assert!(q4.layers[..rest as usize]
        .iter()
        .all(|l| l.complement_resident));
    let extra = rest * q4.sizes.complement_bytes;
    let reserves = q4.sizes.reserves.total();
    assert!(
        ((q4.resident_bytes - extra - reserves) as f64 / 1e9 - 25.4).abs() < 0.1,
        "{} with {rest} complements",
        q4.resident_bytes
    );
    assert!(
        budget - q4.resident_bytes < q4.sizes.complement_bytes,
        "one more complement fits"
    );
    assert_eq!(q4.stream_buffers, 2);
    assert_eq!(q4.stream_buffer_bytes, q4.sizes.ffn_bytes);
    assert_eq!(
        q4.streamed_bytes_per_verification,
        (80 - rest) * q4.sizes.complement_bytes
    );
    let c = &q4.costs;
    assert!(c.sirius_offload.ms_per_token < c.full.ms_per_token / 5.0);
    assert!(c.sirius_offload.ms_per_token < c.reference.ms_per_token / 5.0);
    // Per token = ((K - 1) * draft + verify) / AAL, for both windowed ways.
    for w in [&c.sirius_offload, &c.reference] {
        let expect = (15.0 * w.draft_ms.unwrap() + w.verify_ms) / 15.22;
        assert!((w.ms_per_token - expect).abs() < 1e-9);
        assert!((w.tokens_per_s * w.ms_per_token - 1e3).abs() < 1e-6);
    }
    // In q4 at keep 0.5 a 20G card has an overflow, and a smaller keep fits.
    let tight = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, gib(20))).unwrap();
    let keep = tight.advised_keep.unwrap();
    assert!(keep < 0.5 && keep > 0.2, "{keep}");
    assert!(
        plan(&input("llama-3-70b", WeightFormat::Q4_0, keep, gib(20)))
            .unwrap()
            .fits
    );
    let over = plan(&input(
        "llama-3-70b",
        WeightFormat::Q4_0,
        keep + 0.01,
        gib(20),
    ))
    .unwrap();
    assert!(!over.fits);
}

#[test]
fn resident_bytes_never_exceed_the_budget() {
    let mut rng = StdRng::seed_from_u64(5);
    let models = ["llama-3-70b", "llama-2-7b", "qwen2.5-7b", "smollm2-135m"];
    let mut planned = 0;
    for _ in 0..300 {
        let model = models[rng.gen_range(0..models.len())];
        let format = WeightFormat::ALL[rng.gen_range(0..WeightFormat::ALL.len())];
        let keep = rng.gen_range(1..=100) as f64 / 100.0;
        let probe = input(model, format, keep, u64::MAX / 4);
        let total = Sizes::new(&probe).total_weight_bytes(false);
        let budget = (total as f64 * rng.gen_range(0.01..1.3)) as u64 + 1;
        let mut inp = PlanInput { budget, ..probe };
        let max_context = inp.config.max_position_embeddings.min(9000);
        inp.context = rng.gen_range(inp.prompt_tokens..=max_context);
        inp.kv_bytes = if rng.gen_bool(0.5) { 2 } else { 4 };
        inp.on_gpu = rng.gen_bool(0.5);
        match plan(&inp) {
            Ok(p) => {
                planned += 1;
                assert!(
                    p.resident_bytes <= budget,
                    "{model} {format} {keep} {budget}"
                );
                assert!(p.minimum_bytes <= budget);
                let s = &p.sizes;
                let att = p.layers.iter().filter(|l| l.attention_resident).count() as u64;
                let ffn = p.layers.iter().filter(|l| l.sparse_ffn_resident).count() as u64;
                let rest = p.layers.iter().filter(|l| l.complement_resident).count() as u64;
                assert!(rest == 0 || ffn == s.layers as u64, "complements come last");
                let expect = s.fixed_bytes()
                    + att * s.attention_bytes
                    + ffn * s.sparse_ffn_bytes
                    + rest * s.complement_bytes
                    + 2 * p.stream_buffer_bytes;
                assert_eq!(p.resident_bytes, expect);
                let resident: u64 = p
                    .items
                    .iter()
                    .filter(|i| i.residence == Residence::Resident)
                    .map(|i| i.bytes)
                    .sum();
                assert_eq!(resident, p.resident_bytes);
                assert_eq!(p.fits, p.streamed_bytes_per_draft == 0);
                // The buffer holds the largest single-layer transfer of any pass (the
                // prefill's whole FFN layer at least).
                let largest = p
                    .layers
                    .iter()
                    .map(|l| s.verify_stream_bytes(l).max(s.prefill_stream_bytes(l)))
                    .max();
                assert_eq!(Some(p.stream_buffer_bytes), largest);
                if !p.fits {
                    assert!(p.advice.len() >= 2);
                }
            }
            Err(Error::BudgetBelowMinimum {
                budget: b, minimum, ..
            }) => assert!(b == budget && minimum > budget),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(planned > 50, "only {planned} plans");
}

#[test]
fn a_budget_below_the_minimum_names_it() {
    let p = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, gib(1000))).unwrap();
    let minimum = p.minimum_bytes;
    assert!(plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, minimum)).is_ok());
    let err = plan(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, minimum - 1)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::BudgetBelowMinimum { minimum: m, .. } if m == minimum),
        "{msg}"
    );
    // The planner names no option (the CLI does): the budget, the minimum, what it holds.
    assert!(
        !msg.contains("--") && msg.contains(&format_bytes(minimum)) && msg.contains("KV cache"),
        "{msg}"
    );
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let err = plan(&input("llama-3-70b", WeightFormat::Q4_0, bad, gib(24))).unwrap_err();
        assert!(
            matches!(err, Error::PlanInput { field: "keep", .. }),
            "{err}"
        );
    }
    let mut inp = input("smollm2-135m", WeightFormat::Bf16, 0.5, gib(1));
    inp.aal = 17.0;
    let err = plan(&inp).unwrap_err();
    assert!(
        matches!(err, Error::PlanInput { field: "aal", .. }),
        "{err}"
    );
}

#[test]
fn pipeline_matches_hand_worked_cases() {
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} != {b}");
    // Nothing streamed: compute back to back.
    close(pipeline_seconds(&[0.0; 3], &[1.0, 2.0, 3.0], 2), 6.0);
    // Copy-bound: copies end at 1, 2, 3; each compute (0.1) follows its copy.
    close(pipeline_seconds(&[1.0; 3], &[0.1; 3], 2), 3.1);
    // Compute-bound: copy 0 ends at 0.1, computes follow one another; copy 2 waits for
    // compute 0 (1.1) to free its buffer but still lands before compute 1 ends.
    close(pipeline_seconds(&[0.1; 3], &[1.0; 3], 2), 3.1);
    // Two buffers force a wait: copy 2 cannot start before compute 0 releases buffer 0 at
    // 4, so it lands at 5; with three buffers it lands at 3 and the pass ends with compute 0.
    close(pipeline_seconds(&[1.0; 3], &[3.0, 0.0, 0.0], 2), 5.0);
    close(pipeline_seconds(&[1.0; 3], &[3.0, 0.0, 0.0], 3), 4.0);
    // Resident layers in front compute while the streamed tail is copied in.
    close(pipeline_seconds(&[0.0, 0.0, 1.0], &[1.0, 1.0, 1.0], 2), 3.0);
    close(pipeline_seconds(&[0.0, 0.0, 3.0], &[1.0, 1.0, 1.0], 2), 4.0);
    // One buffer: no overlap between a copy and the compute of the layer before.
    close(pipeline_seconds(&[1.0; 2], &[1.0; 2], 1), 4.0);
    close(pipeline_seconds(&[1.0; 2], &[1.0; 2], 2), 3.0);
}

#[test]
fn smollm2_bf16_bytes_are_exact() {
    let inp = input(
        "smollm2-135m",
        WeightFormat::Bf16,
        0.5,
        beside_reserves(gib(1), 30),
    );
    let s = Sizes::new(&inp);
    assert_eq!(s.attention_bytes, (576 * 576 * 2 + 576 * 192 * 2) * 2);
    assert_eq!(s.neuron_bytes, 3 * 576 * 2);
    assert_eq!(s.kept_neurons, 768);
    assert_eq!(s.sparse_ffn_bytes, 768 * 3 * 576 * 2);
    assert_eq!(s.complement_bytes, 768 * 3 * 576 * 2);
    assert_eq!(s.ffn_bytes, 1536 * 3 * 576 * 2);
    assert_eq!(s.head_bytes, 49152 * 576 * 2);
    assert_eq!(s.norm_bytes, (2 * 30 + 1) * 576 * 4);
    assert_eq!(s.kv_cache_bytes, 2 * 30 * 192 * 4096 * 2);
    let window = 5 * 576 + 2 * 576 + 2 * 192 + 2 * 1536 + 49152;
    assert_eq!(s.activation_bytes, 4 * 16 * window);
    // Tied: the embedding is the head, counted once.
    let norms = 61 * 576;
    assert_eq!(
        s.total_weight_bytes(true),
        2 * (134_515_008 - norms) + 4 * norms
    );
    let p = plan(&inp).unwrap();
    assert!(p.fits);
    assert_eq!(p.stream_buffer_bytes, s.ffn_bytes);
    let host = p
        .items
        .iter()
        .find(|i| i.residence == Residence::Host)
        .unwrap();
    assert_eq!(host.bytes, s.head_bytes);
}

#[test]
fn qwen_biases_are_counted_and_dense_keep_streams_nothing() {
    let s = Sizes::new(&input("qwen2.5-7b", WeightFormat::Bf16, 0.5, gib(24)));
    let (h, q, kv, l) = (3584u64, 3584u64, 512u64, 28u64);
    // The matrices stream with the attention; the q/k/v biases stay resident with the norms.
    assert_eq!(s.attention_bytes, (2 * h * q + 2 * h * kv) * 2);
    assert_eq!(s.norm_bytes, ((2 * l + 1) * h + l * (q + 2 * kv)) * 4);
    // keep 1 = dense: no complement, so a fitting plan streams nothing after the prefill
    // (which still streams whole FFN layers: no neurons are resident before it).
    let p = plan(&input(
        "smollm2-135m",
        WeightFormat::Bf16,
        1.0,
        beside_reserves(gib(1), 30),
    ))
    .unwrap();
    assert!(p.fits);
    assert_eq!(
        (p.stream_buffer_bytes, p.streamed_bytes_per_verification),
        (p.sizes.ffn_bytes, 0)
    );
    assert!(p.costs.sirius_offload.streamed_bytes_per_token == 0);
}

#[test]
fn a_model_that_fits_whole_streams_nothing_after_its_prompt() {
    // Llama-3-8B in bf16 (16 GB) fits in 24 GiB with its KV cache: every complement is
    // resident too, verification streams nothing, and Sirius is no slower than full.
    let p = plan(&input("llama-3-8b", WeightFormat::Bf16, 0.5, gib(24))).unwrap();
    assert!(p.layers.iter().all(|l| l.complement_resident));
    assert_eq!(p.streamed_bytes_per_verification, 0);
    assert_eq!(p.streamed_bytes_per_draft, 0);
    let c = &p.costs;
    assert!(
        c.sirius_offload.ms_per_token <= c.full.ms_per_token,
        "sirius {} vs full {}",
        c.sirius_offload.ms_per_token,
        c.full.ms_per_token
    );
}

#[test]
fn a_quantized_plan_counts_the_compact_down_format() {
    let q8_down = Sizes::new(&PlanInput {
        sparse_down: None,
        ..input("llama-3-70b", WeightFormat::Q4K, 0.5, gib(24))
    });
    let q4_down = Sizes::new(&input("llama-3-70b", WeightFormat::Q4K, 0.5, gib(24)));
    let (h, kept) = (8192u64, 14336u64);
    assert_eq!(q8_down.kept_neurons as u64, kept);
    // Gate and up rows in q4_k either way; the compact down [h, kept] in q8_0 by default.
    assert_eq!(
        q8_down.sparse_ffn_bytes - q4_down.sparse_ffn_bytes,
        h * kept / 32 * (34 - 18)
    );
    // A full pass streams the rest's gate and up rows and the whole down matrix as stored.
    assert_eq!(
        q8_down.complement_bytes,
        2 * (28672 - kept) * (h / 256 * 144) + h * (28672 / 256 * 144)
    );
    assert_eq!(q8_down.complement_bytes, q4_down.complement_bytes);
    // In 24 GiB the q8_0 compact down does not fit at keep 0.5; the advice names the q4_0 one
    // in the same format, and says it costs quality.
    let p = plan(&PlanInput {
        sparse_down: None,
        ..input(
            "llama-3-70b",
            WeightFormat::Q4_0,
            0.5,
            beside_reserves(gib(24), 80),
        )
    })
    .unwrap();
    assert!(!p.fits);
    assert_eq!(
        (p.advised_format, p.advised_sparse_down),
        (Some(WeightFormat::Q4_0), Some(WeightFormat::Q4_0))
    );
    let advice = p.advice.join("\n");
    assert!(
        advice.contains("--griffin-down q4_0") && advice.contains("perplexity"),
        "{advice}"
    );
    // The CPU runtime is advised only formats `run --weights` makes.
    let cpu = plan(&PlanInput {
        on_gpu: false,
        context: 512,
        ..input("llama-3-70b", WeightFormat::Bf16, 0.5, gib(30))
    })
    .unwrap();
    assert!(
        matches!(
            cpu.advised_format,
            Some(WeightFormat::Q8_0 | WeightFormat::Q4_0)
        ),
        "{:?}",
        cpu.advised_format
    );
}

/// A Q4_K_M-style file: Q4_K layers whose v and down are Q6_K in some layers. Each layer is
/// sized in its own formats, the totals are their sums, and inputs that cannot be a model's
/// are refused by field.
#[test]
fn layers_that_mix_block_formats_are_sized_one_by_one() {
    let base = input("qwen2.5-7b", WeightFormat::Q4K, 0.5, gib(8));
    let l = base.config.num_layers;
    let wide = |i: usize| i.is_multiple_of(3);
    let formats: Vec<LayerFormats> = (0..l)
        .map(|i| {
            let mut f = LayerFormats::uniform(WeightFormat::Q4K);
            if wide(i) {
                (f.attention[2], f.ffn[2]) = (WeightFormat::Q6K, WeightFormat::Q6K);
            }
            f
        })
        .collect();
    let mixed = PlanInput {
        layer_formats: Some(formats.clone()),
        ..base.clone()
    };
    let (s, uniform) = (Sizes::new(&mixed), Sizes::new(&base));
    let (h, f, kv) = (3584, 18944, 512);
    let v_more = WeightFormat::Q6K.matrix_bytes(kv, h) - WeightFormat::Q4K.matrix_bytes(kv, h);
    let down_more = WeightFormat::Q6K.matrix_bytes(h, f) - WeightFormat::Q4K.matrix_bytes(h, f);
    for i in 0..l {
        let (a, b) = (s.layer(i), uniform.layer(i));
        let extra = u64::from(wide(i));
        assert_eq!(a.attention, b.attention + extra * v_more, "layer {i}");
        assert_eq!(a.ffn, b.ffn + extra * down_more, "layer {i}");
        // The sparse set's down matrix is re-encoded (sparse_down): the same in every layer.
        assert_eq!(a.sparse_ffn, b.sparse_ffn, "layer {i}");
        assert_eq!(a.complement, b.complement + extra * down_more, "layer {i}");
    }
    let wide_layers = (0..l).filter(|&i| wide(i)).count() as u64;
    assert_eq!(
        s.sum(0..l, |u| u.ffn),
        uniform.sum(0..l, |u| u.ffn) + wide_layers * down_more
    );
    assert_eq!(
        s.ffn_bytes,
        uniform.ffn_bytes + down_more,
        "the largest layer's"
    );
    // A prefill streams every layer's whole FFN (and attention that is not resident), each
    // in its own formats.
    let p = plan(&mixed).unwrap();
    let expected: u64 = (p.layers.iter())
        .map(|q| {
            let u = uniform.layer(q.layer);
            let wide = u64::from(wide(q.layer));
            let attention = match q.attention_resident {
                true => 0,
                false => u.attention + wide * v_more,
            };
            attention + u.ffn + wide * down_more
        })
        .sum();
    assert_eq!(p.streamed_bytes_per_prefill, expected);
    // Wrong layer count; float formats mixed into block formats.
    let short = PlanInput {
        layer_formats: Some(formats[1..].to_vec()),
        ..base.clone()
    };
    let mut with_float = formats;
    with_float[3].ffn[2] = WeightFormat::Bf16;
    let float = PlanInput {
        layer_formats: Some(with_float),
        ..base
    };
    for bad in [short, float] {
        let err = plan(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::PlanInput {
                    field: "layer_formats",
                    ..
                }
            ),
            "{err}"
        );
    }
}

/// `compute_gflops` bounds each pass by its arithmetic too: a verification of K tokens at a
/// low rate costs K times the arithmetic of one token (what a CPU shows), a draft one token's,
/// and a rate high enough leaves every memory-bound figure as it was.
#[test]
fn an_arithmetic_rate_makes_verification_windows_cost_their_tokens() {
    // Llama-3-8B in bf16 in 16 GiB: nothing streams but the complement.
    let base = PlanInput {
        on_gpu: false,
        mem_gbps: 20.0,
        link_gbps: 4.0,
        ..input("llama-3-8b", WeightFormat::Bf16, 0.5, gib(16))
    };
    let memory_bound = plan(&base).unwrap().costs;
    let fast = PlanInput {
        compute_gflops: Some(1e6),
        ..base.clone()
    };
    let c = plan(&fast).unwrap().costs;
    assert_eq!(
        c.sirius_offload.verify_ms,
        memory_bound.sirius_offload.verify_ms
    );
    assert_eq!(c.full.ms_per_token, memory_bound.full.ms_per_token);

    // 8B parameters at 20 GFLOP/s: 2 * 8e9 / 20e9 = 0.8 s of arithmetic per token.
    let slow = |period: usize| {
        let input = PlanInput {
            compute_gflops: Some(20.0),
            period,
            aal: period as f64,
            ..base.clone()
        };
        plan(&input).unwrap().costs
    };
    let (k4, k16) = (slow(4), slow(16));
    let per_row = |c: &sirius_offload::offload::cost::Costs, k: f64| c.sirius_offload.verify_ms / k;
    // Arithmetic-bound: the window's cost grows with its tokens (the link hides under it).
    let (a, b) = (per_row(&k4, 4.0), per_row(&k16, 16.0));
    assert!((a - b).abs() / b < 0.05, "per verified token {a} vs {b} ms");
    assert!(b > 700.0 && b < 900.0, "{b} ms per token of arithmetic");
    assert!(k16.sirius_offload.verify_ms > 10.0 * memory_bound.sirius_offload.verify_ms);
    // A draft is one token through the sparse FFN: cheaper than a full step.
    let draft = k16.sirius_offload.draft_ms.unwrap();
    assert!(
        draft < k16.full.ms_per_token,
        "{draft} vs {}",
        k16.full.ms_per_token
    );
    assert!(draft > 0.25 * k16.full.ms_per_token, "{draft}");
    let bad = PlanInput {
        compute_gflops: Some(0.0),
        ..base
    };
    assert!(matches!(
        plan(&bad),
        Err(Error::PlanInput {
            field: "compute_gflops",
            ..
        })
    ));
}

#[test]
fn a_gpu_plan_pins_what_decode_steps_stream_and_gathers_the_prefill_rest() {
    use sirius_offload::offload::cost::HostGather;
    use sirius_offload::offload::placement::PinnedUnits;
    for (format, budgets) in [
        (WeightFormat::Bf16, [gib(24), gib(60), gib(100), gib(400)]),
        (WeightFormat::Q4_0, [gib(24), gib(30), gib(40), gib(400)]),
    ] {
        for budget in budgets {
            let p = plan(&input("llama-3-70b", format, 0.5, budget)).unwrap();
            let (s, quantized) = (&p.sizes, format.is_quantized());
            let mut want = 0;
            for l in &p.layers {
                let (u, b) = (PinnedUnits::of(l, quantized), s.layer(l.layer));
                // Whatever a draft or a verification streams is pinned.
                assert!(l.attention_resident || u.attention);
                assert!(l.sparse_ffn_resident || (u.dense_ffn && u.overflow));
                let complement_streams = l.sparse_ffn_resident && !l.complement_resident;
                assert!(!complement_streams || u.bundles || (quantized && u.dense_ffn));
                // A float layer's FFN is never pinned twice.
                assert!(!(u.bundles && u.dense_ffn));
                want += [
                    (u.attention, b.attention),
                    (u.dense_ffn, b.ffn),
                    (u.bundles, b.ffn),
                    (u.overflow, b.sparse_ffn),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, bytes)| bytes)
                .sum::<u64>();
            }
            assert_eq!(p.host.pinned_bytes, want, "{format} {budget}");
            let everything = p.host.checkpoint_bytes + p.host.bundle_cache_bytes;
            assert!(p.host.pinned_bytes < everything, "{format} {budget}");
            // The CPU pins nothing.
            let cpu = PlanInput {
                on_gpu: false,
                host_gather: None,
                ..input("llama-3-70b", format, 0.5, budget)
            };
            assert_eq!(plan(&cpu).unwrap().host.pinned_bytes, 0);
        }
    }
    // With the sparse set resident a float model pins its bundle rows, not its checkpoint
    // FFN: the prefill gathers that on the host, which the time to first token counts.
    let gpu = PlanInput {
        host_gather: Some(HostGather::default()),
        ..input("llama-3-70b", WeightFormat::Bf16, 0.5, gib(100))
    };
    let p = plan(&gpu).unwrap();
    assert!(p.layers.iter().all(|l| l.sparse_ffn_resident));
    assert!(p.host.pinned_bytes < p.host.bundle_cache_bytes);
    let dma_only = plan(&PlanInput {
        host_gather: None,
        ..gpu.clone()
    })
    .unwrap();
    assert!(p.costs.ttft_ms > dma_only.costs.ttft_ms);
    assert_eq!(
        p.costs.sirius_offload.ms_per_token,
        dma_only.costs.sirius_offload.ms_per_token
    );
    // Nothing registered (SIRIUS_COPY_STAGED=1): every copy is gathered first.
    let staged = plan(&PlanInput {
        host_gather: Some(HostGather {
            gbps: 6.0,
            unpinned_share: 1.0,
        }),
        ..gpu
    })
    .unwrap();
    assert!(staged.costs.sirius_offload.ms_per_token > p.costs.sirius_offload.ms_per_token);
}

/// A GPU budget books the copy engine's gather tables with the backend scratch: one table
/// per stream buffer, a 24-byte row per piece of the largest job (a quantized complement:
/// two runs per streamed neuron) and per 256 KiB of the largest buffer, 65 rows spare.
#[test]
fn a_gpu_budget_books_the_copy_engines_gather_tables() {
    let gpu = Sizes::new(&input("llama-3-70b", WeightFormat::Q4_0, 0.5, gib(24)));
    let largest = gpu.buffer_bytes(&gpu.layers_with(0));
    assert!(largest >= gpu.ffn_bytes + gpu.attention_bytes, "{largest}");
    let pieces = 4 + 2 * (14336 + 1) + 1;
    let rows = pieces + largest / (256 << 10) + 1 + 64;
    assert_eq!(gpu.reserves.backend_scratch, 2 * 24 * rows);
    // About 2.9 MiB for Llama-3-70B: rows for the pieces, not the bytes, dominate.
    assert!(gpu.reserves.backend_scratch < 4 << 20);
    let cpu = Sizes::new(&PlanInput {
        on_gpu: false,
        ..input("llama-3-70b", WeightFormat::Q4_0, 0.5, gib(24))
    });
    assert_eq!(cpu.reserves.backend_scratch, 0);
}
