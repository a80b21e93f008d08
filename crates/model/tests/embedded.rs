//! The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end on the CPU.
//! Skipped with a message when scripts/setup has not installed it.

use prefloop_model::{Model, SamplingParams, default_model_path, generate};
use tch::Device;

fn embedded() -> Option<Model> {
    let path = default_model_path();
    if !path.exists() {
        eprintln!(
            "skipped: {} is not installed (run scripts/setup)",
            path.display()
        );
        return None;
    }
    Some(Model::load(None, Device::Cpu).expect("the embedded default loads"))
}

#[test]
fn greedy_capital_of_france_is_paris() {
    let Some(model) = embedded() else { return };
    let prompt = model
        .tokenizer
        .apply_chat_template("What is the capital of France?")
        .unwrap();
    assert!(
        prompt.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{prompt:?}"
    );
    let ids = model.tokenizer.encode(&prompt).unwrap();
    let out = generate(&model, &[ids], &SamplingParams::greedy(32)).unwrap();
    assert_eq!(out[0].text, "The capital of France is Paris.");
    assert_eq!(out[0].finish, prefloop_core::Finish::Stop);
    assert_eq!(out[0].tokens.len(), out[0].logprobs.len());
    assert!(
        out[0]
            .logprobs
            .iter()
            .all(|&lp| lp <= 0.0 && lp.is_finite())
    );
}
