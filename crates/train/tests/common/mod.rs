//! What the train crate's reference tests share: reading PyTorch's tensors as prefloop lays
//! them out, the reference's two preference pairs as a batch, and their DPO loss.

#![allow(dead_code)] // each test binary uses its own share of these

use std::collections::HashMap;

use prefloop_model::Decoder;
use prefloop_train::{
    PreferenceLoss, PreferenceOutput, TokenBatch, TokenLogprobs, preference_loss, sequence_sum,
};
use tch::{Device, Tensor};

/// PyTorch's value under `prefix` ("before", "after", …) of one of our parameters: the
/// decoder's fused q/k/v (weights and biases) and gate/up are PyTorch's parts stacked along the
/// output rows (where PyTorch holds them apart).
pub fn parameter(expected: &HashMap<String, Tensor>, prefix: &str, name: &str) -> Tensor {
    // Phi-3's checkpoints hold them fused already.
    if let Some(whole) = expected.get(&format!("{prefix}.{name}")) {
        return whole.shallow_clone();
    }
    let fused: [(&str, &[&str]); 3] = [
        (
            "qkv_proj.weight",
            &["q_proj.weight", "k_proj.weight", "v_proj.weight"],
        ),
        (
            "qkv_proj.bias",
            &["q_proj.bias", "k_proj.bias", "v_proj.bias"],
        ),
        (
            "gate_up_proj.weight",
            &["gate_proj.weight", "up_proj.weight"],
        ),
    ];
    let parts: Vec<String> = fused
        .iter()
        .find_map(|(suffix, parts)| {
            let layer = name.strip_suffix(suffix)?;
            Some(parts.iter().map(|part| format!("{layer}{part}")).collect())
        })
        .unwrap_or_else(|| vec![name.to_owned()]);
    let parts: Vec<&Tensor> = parts
        .iter()
        .map(|part| {
            expected
                .get(&format!("{prefix}.{part}"))
                .unwrap_or_else(|| panic!("{prefix}.{part} missing"))
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// The reference's sequences `prompt{i}` + `answer{i}`, i = 0..4 (chosen 0, chosen 1, rejected
/// 0, rejected 1), as one right-padded batch.
pub fn pair_batch(expected: &HashMap<String, Tensor>) -> TokenBatch {
    let ids = |name: String| -> Vec<u32> {
        Vec::<i64>::try_from(&expected[&name])
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let owned: Vec<(Vec<u32>, Vec<u32>)> = (0..4)
        .map(|i| (ids(format!("prompt{i}")), ids(format!("answer{i}"))))
        .collect();
    let sequences: Vec<(&[u32], &[u32])> = owned
        .iter()
        .map(|(p, a)| (p.as_slice(), a.as_slice()))
        .collect();
    TokenBatch::new(&sequences, 0, Device::Cpu)
}

/// The DPO loss (sigmoid, β 0.1) of the two pairs of `batch` under `decoder` against the
/// reference's sequence log-probs `reference` (4,), with the log-probs to back-propagate
/// through.
pub fn dpo_loss(
    decoder: &Decoder,
    batch: &TokenBatch,
    reference: &Tensor,
) -> (TokenLogprobs, PreferenceOutput) {
    let logprobs = TokenLogprobs::forward(decoder, batch);
    let sums = sequence_sum(&logprobs.values, &batch.loss_mask);
    let out = preference_loss(
        PreferenceLoss::Sigmoid,
        0.1,
        &sums.narrow(0, 0, 2),
        &sums.narrow(0, 2, 2),
        &reference.narrow(0, 0, 2),
        &reference.narrow(0, 2, 2),
    );
    (logprobs, out)
}
