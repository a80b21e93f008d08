//! The sampler's batching (generate.rs) on the embedded default in fp32: shared prefills,
//! slots refilled from the queue, compaction and readbacks change how rows are computed,
//! never what a row samples. Skipped with a message when scripts/setup has not installed the
//! model.

mod common;

use common::{embedded, request};

use prefloop_core::Finish;
use prefloop_model::{
    Batching, Generation, Generator, InProcess, Model, Request, SamplingParams, collect, generate,
    generate_each,
};

/// Prompts of different lengths whose completions end at different steps (EOS on), each
/// sampled `n` times with its own seed.
fn requests(model: &Model, n: u64) -> Vec<Request> {
    let users = [
        "What is the capital of France?",
        "Name a colour.",
        "Write a haiku about the sea, then explain each of its lines.",
        "Say yes.",
        "List three prime numbers.",
    ];
    users
        .iter()
        .enumerate()
        .flat_map(|(i, user)| (0..n).map(move |k| (i as u64 * 100 + k, *user)))
        .map(|(seed, user)| request(model, user, seed))
        .collect()
}

fn tokens(out: &[Generation]) -> Vec<(Vec<u32>, Finish, Option<u32>)> {
    out.iter()
        .map(|g| (g.tokens.clone(), g.finish, g.eos))
        .collect()
}

#[test]
fn the_samples_of_a_prompt_share_one_prefill_and_equal_separate_prefills() {
    let Some(model) = embedded() else { return };
    let batch = requests(&model, 4);
    for params in [
        SamplingParams::greedy(10),
        SamplingParams {
            max_new_tokens: 10,
            ..SamplingParams::default()
        },
    ] {
        let mut shared = vec![None; batch.len()];
        let stats = generate_each(
            &model,
            &batch,
            &params,
            Batching::new(batch.len()),
            |i, g| {
                shared[i] = Some(g);
                Ok::<(), prefloop_model::ModelError>(())
            },
        )
        .unwrap();
        assert_eq!(stats.prefills, 1, "one prefill for the whole batch");
        assert_eq!(stats.prefilled_prompts, 5, "of the five distinct prompts");
        let shared: Vec<Generation> = shared.into_iter().map(Option::unwrap).collect();
        // Each request alone: its own prefill.
        let separate: Vec<Generation> = batch
            .iter()
            .map(|r| {
                generate(&model, std::slice::from_ref(r), &params)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        assert_eq!(tokens(&shared), tokens(&separate), "{params:?}");
    }
}

#[test]
fn a_rows_sample_does_not_depend_on_the_batch_size_or_when_it_joined() {
    let Some(model) = embedded() else { return };
    let batch = requests(&model, 4);
    let params = SamplingParams {
        max_new_tokens: 40,
        ..SamplingParams::default()
    };
    let finishes = |out: &[Generation]| out.iter().map(|g| g.tokens.len()).collect::<Vec<_>>();
    let whole = collect(&model, &batch, &params, Batching::new(32)).unwrap();
    let lengths = finishes(&whole);
    assert!(
        lengths.iter().any(|&l| l < 40) && lengths.contains(&40),
        "some rows end early, some run the whole budget: {lengths:?}"
    );
    // 7 slots: rows join as others finish, and the tail is compacted; 1 slot: one at a time.
    // Through the Generator seam, told between calls that the policy is its model (as an
    // online trainer's actor after an update), as `collect` samples.
    for slots in [7, 1] {
        let mut generator = InProcess::new(&model, Batching::new(slots));
        generator.sync_policy(&model).unwrap();
        let refilled = generator.collect(&batch, &params).unwrap();
        assert_eq!(tokens(&refilled), tokens(&whole), "{slots} slots");
        for (a, b) in refilled.iter().zip(&whole) {
            assert_eq!(a.text, b.text);
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(
                    (x - y).abs() < 1e-3,
                    "{slots} slots: log-prob {x} against {y}"
                );
            }
        }
    }
}

#[test]
fn a_rows_completion_does_not_depend_on_how_often_tokens_are_read_back() {
    let Some(model) = embedded() else { return };
    let batch = requests(&model, 2);
    let params = SamplingParams {
        max_new_tokens: 30,
        stop: vec![".".into()],
        ..SamplingParams::default()
    };
    let every = |k: usize| Batching::new(4).with_readback_every(k);
    let mut stats = None;
    let reference = collect(&model, &batch, &params, every(1)).unwrap();
    assert!(
        reference
            .iter()
            .any(|g| g.finish == Finish::StopString && g.eos.is_none()),
        "a stop string ends some row"
    );
    for k in [5, 16] {
        let mut out = vec![None; batch.len()];
        let counted = generate_each(&model, &batch, &params, every(k), |i, g| {
            out[i] = Some(g);
            Ok::<(), prefloop_model::ModelError>(())
        })
        .unwrap();
        let out: Vec<Generation> = out.into_iter().map(Option::unwrap).collect();
        assert_eq!(tokens(&out), tokens(&reference), "read back every {k}");
        assert!(out.iter().zip(&reference).all(|(a, b)| a.text == b.text));
        stats = Some(counted);
    }
    // Every 16 steps (or sooner when every row's budget ends sooner): far fewer host syncs
    // than steps.
    let stats = stats.unwrap();
    assert!(
        stats.readbacks * 4 <= stats.decode_steps,
        "{} readbacks for {} steps",
        stats.readbacks,
        stats.decode_steps
    );
}

#[test]
fn decode_attention_takes_a_fused_kernel_on_the_cpu() {
    let Some(model) = embedded() else { return };
    let decoder = &model.decoder;
    assert_eq!(decoder.decode_attention_backend(32, 300), "flash_attention");
    assert_eq!(decoder.causal_attention_backend(4, 256), "flash_attention");
}
