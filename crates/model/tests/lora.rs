//! LoRA against `peft` (the independent implementation, from the project venv): an adapter
//! prefloop saved, loaded by peft on the same base, gives prefloop's logits; an adapter peft
//! made (random A and B), loaded by prefloop, gives peft's; the merged directory prefloop saves
//! is the base plus the adapter for transformers and for prefloop; the adapters switched off
//! leave the base; sampling from base + adapter unmerged scores tokens as the adapted forward
//! does. On a small random model with the embedded tokenizer, in fp32. Skipped with
//! a message when the venv (with peft) or the embedded model is not installed.

mod common;

use std::path::Path;
use std::process::Command;

use common::{embedded, random_model_dir, read_tensors, smollm_config, venv_python};
use prefloop_model::{
    ADAPTER_DIR, LoraConfig, Model, Precision, Request, SamplingParams, generate,
};
use tch::{Device, Tensor};

/// The peft side: `ours` (prefloop's adapter) on the base, the merged directory through
/// transformers alone, and an adapter of peft's own (r 4, α 4, on q, v and down, random A and
/// B: `init_lora_weights=False`) saved to `theirs`; the logits of `ids` under each.
const PEFT: &str = r#"
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
base_dir, ours_dir, merged_dir, theirs_dir, ids, out = sys.argv[1:]
ids = torch.tensor([[int(t) for t in ids.split(",")]])
def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
logits = {}
with torch.no_grad():
    logits["ours"] = PeftModel.from_pretrained(load(base_dir), ours_dir).eval()(ids).logits[0]
    logits["merged"] = load(merged_dir)(ids).logits[0]
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = get_peft_model(load(base_dir), config).eval()
    theirs.save_pretrained(theirs_dir)
    logits["theirs"] = theirs(ids).logits[0]
save_file({k: v.contiguous() for k, v in logits.items()}, out)
"#;

fn logits(model: &Model, ids: &[i64]) -> Tensor {
    let input = Tensor::from_slice(ids).unsqueeze(0);
    tch::no_grad(|| model.decoder.forward(&input)).squeeze_dim(0)
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn load(dir: &Path) -> Model {
    Model::load(Some(dir), Device::Cpu, Precision::Fp32).unwrap()
}

/// prefloop's adapters (r 8, α 16) on every projection of `base`, B made non-zero so they
/// change the model.
fn with_random_adapters(base: Model) -> (Model, LoraConfig) {
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let model = base.with_lora(&lora, 7).unwrap();
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (name, mut var) in model.trainable().variables() {
            if name.contains("lora_B") {
                var.copy_(&(var.randn_like() * 0.05));
            }
        }
    });
    (model, lora)
}

#[test]
fn sampling_from_base_plus_adapter_unmerged_follows_the_adapted_forward() {
    let Some(embedded) = embedded() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("base");
    random_model_dir(smollm_config(49152), &embedded.tokenizer, 5, &dir);
    let (model, _) = with_random_adapters(load(&dir));
    let requests: Vec<Request> = ["def add(a, b):", "Name a colour.", "1 + 1 ="]
        .iter()
        .enumerate()
        .map(|(seed, text)| Request {
            prompt: model.tokenizer.encode(text).unwrap(),
            seed: seed as u64,
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: 16,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    // The sampler's decode steps (slot cache, folded attention) with the adapters applied
    // give each token the log-prob the training forward gives it.
    for (request, out) in requests
        .iter()
        .zip(generate(&model, &requests, &params).unwrap())
    {
        let ids: Vec<i64> = request
            .prompt
            .iter()
            .chain(&out.tokens)
            .map(|&t| i64::from(t))
            .collect();
        let p = request.prompt.len() as i64;
        let n = out.tokens.len() as i64;
        let log_p = logits(&model, &ids)
            .narrow(0, p - 1, n)
            .log_softmax(-1, tch::Kind::Float);
        let targets = Tensor::from_slice(&ids[p as usize..]).unsqueeze(-1);
        let forward = log_p.gather(-1, &targets, false).squeeze_dim(-1);
        let sampled = Tensor::from_slice(&out.logprobs);
        let diff = max_difference(&forward, &sampled);
        assert!(diff <= 1e-4, "max |Δ log-prob| = {diff}");
    }
}

#[test]
fn adapters_move_between_prefloop_and_peft_and_merge_to_the_same_model() {
    let (Some(python), Some(embedded)) = (venv_python(&["peft", "transformers"]), embedded())
    else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let at = |name: &str| scratch.path().join(name);
    random_model_dir(smollm_config(49152), &embedded.tokenizer, 3, &at("base"));
    let base = load(&at("base"));
    let ids: Vec<i64> = base
        .tokenizer
        .encode("def add(a, b):\n    return a + b\n")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let base_logits = logits(&base, &ids);

    let (ours, lora) = with_random_adapters(base);
    assert_eq!(
        ours.trainable().variables().len(),
        2 * 7 * 2,
        "A and B per projection"
    );
    let declared: usize = ours
        .trainable()
        .variables()
        .values()
        .map(Tensor::numel)
        .sum();
    assert_eq!(declared as u64, lora.parameter_count(ours.decoder.config()));
    let our_logits = logits(&ours, &ids);
    assert!(
        max_difference(&our_logits, &base_logits) > 1e-2,
        "the adapter changes nothing"
    );
    let disabled = ours.decoder.without_adapters(|| logits(&ours, &ids));
    assert!(disabled.equal(&base_logits), "adapters off is not the base");
    ours.save_adapter(&at("ours")).unwrap();
    ours.save(&at("merged")).unwrap();
    assert!(
        at("merged")
            .join(ADAPTER_DIR)
            .join("adapter_config.json")
            .exists()
    );

    let out = at("peft.safetensors");
    let joined: Vec<String> = ids.iter().map(i64::to_string).collect();
    let status = Command::new(&python)
        .args(["-c", PEFT])
        .args([at("base"), at("ours"), at("merged"), at("theirs")])
        .arg(joined.join(","))
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .unwrap();
    assert!(status.success(), "the peft reference failed");
    let peft = read_tensors(&out);

    let check = |ours: &Tensor, theirs: &Tensor, what: &str| {
        let diff = max_difference(ours, theirs);
        eprintln!("{what}: max |Δlogit| = {diff:e}");
        assert!(diff <= 1e-4, "{what}: max |Δlogit| = {diff}");
    };
    check(
        &our_logits,
        &peft["ours"],
        "prefloop's adapter, prefloop vs peft",
    );
    check(
        &our_logits,
        &peft["merged"],
        "the merged directory in transformers",
    );
    check(
        &our_logits,
        &logits(&load(&at("merged")), &ids),
        "the merged directory in prefloop",
    );
    let reloaded = load(&at("base"))
        .load_adapter(&at("merged").join(ADAPTER_DIR))
        .unwrap();
    check(
        &our_logits,
        &logits(&reloaded, &ids),
        "prefloop's adapter reloaded",
    );

    let theirs = load(&at("base")).load_adapter(&at("theirs")).unwrap();
    let config = theirs.decoder.lora().unwrap();
    assert_eq!((config.rank, config.alpha), (4, 4.0));
    let mut targets = config.targets.clone();
    targets.sort();
    assert_eq!(targets, ["down_proj", "q_proj", "v_proj"]);
    assert!(
        max_difference(&peft["theirs"], &base_logits) > 1e-2,
        "peft's adapter is trivial"
    );
    check(
        &logits(&theirs, &ids),
        &peft["theirs"],
        "peft's adapter, prefloop vs peft",
    );
}

#[test]
fn an_adapter_that_does_not_fit_its_base_is_refused_naming_the_file() {
    let Some(embedded) = embedded() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let at = |name: &str| scratch.path().join(name);
    random_model_dir(smollm_config(49152), &embedded.tokenizer, 3, &at("base"));
    let lora = LoraConfig::with_rank(4, None);
    load(&at("base"))
        .with_lora(&lora, 0)
        .unwrap()
        .save_adapter(&at("adapter"))
        .unwrap();

    // A base of another width: the adapter's shapes do not fit.
    let mut wider = smollm_config(49152);
    wider["hidden_size"] = 128.into();
    random_model_dir(wider, &embedded.tokenizer, 3, &at("wider"));
    let err = load(&at("wider"))
        .load_adapter(&at("adapter"))
        .unwrap_err()
        .to_string();
    let file = at("adapter").join("adapter_model.safetensors");
    assert!(
        err.starts_with(&file.display().to_string()) && err.contains("shape"),
        "{err}"
    );

    // Settings prefloop cannot apply exactly, named with their field.
    let config_path = at("adapter").join("adapter_config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    for (field, value, expected) in [
        ("use_dora", serde_json::json!(true), "use_dora"),
        (
            "target_modules",
            serde_json::json!(["lm_head"]),
            "`lm_head`",
        ),
        ("peft_type", serde_json::json!("IA3"), "peft_type"),
    ] {
        let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
        config[field] = value;
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = load(&at("base"))
            .load_adapter(&at("adapter"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&config_path.display().to_string()) && err.contains(expected),
            "{field}: {err}"
        );
    }
}

#[test]
fn adapters_stay_fp32_over_a_bf16_base_and_its_activations_stay_bf16() {
    let Some(embedded) = embedded() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("base");
    random_model_dir(smollm_config(49152), &embedded.tokenizer, 9, &dir);
    let base = Model::load(Some(&dir), Device::Cpu, Precision::Bf16).unwrap();
    let (model, _) = with_random_adapters(base);
    assert!(
        model
            .trainable()
            .variables()
            .values()
            .all(|v| v.kind() == tch::Kind::Float && v.requires_grad())
    );
    let input = Tensor::from_slice(&[5i64, 17, 300, 42]).unsqueeze(0);
    let logits = model.decoder.forward(&input);
    assert_eq!(
        logits.kind(),
        tch::Kind::BFloat16,
        "an adapter promoted the stream"
    );
    logits
        .to_kind(tch::Kind::Float)
        .sum(tch::Kind::Float)
        .backward();
    for (name, v) in model.trainable().variables() {
        let grad = v.grad();
        assert!(grad.defined() && grad.kind() == tch::Kind::Float, "{name}");
        assert!(grad.isfinite().all().int64_value(&[]) == 1, "{name}");
    }
}
