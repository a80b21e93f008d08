//! Helpers shared by the end-to-end tests: run the binary, read its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prefloop_model::{Model, Precision};
use tch::Device;

/// Runs the `prefloop` binary built for this test run.
pub fn prefloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prefloop"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs `cmd` with `stdin` as its input; all it printed and its exit status.
#[allow(dead_code)] // only the binaries that feed a program input use it
pub fn output_with_stdin(cmd: &mut Command, stdin: &str) -> Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("the binary reads its input");
    child.wait_with_output().expect("the binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The project venv's python (scripts/setup), if this run has one.
#[allow(dead_code)] // only the binaries that check against pyarrow use it
pub fn venv_python() -> Option<std::path::PathBuf> {
    let python = std::path::PathBuf::from(std::env::var_os("PREFLOOP_PYTHON")?);
    python.exists().then_some(python)
}

/// A 2-layer, 64-wide Llama with random weights and the embedded model's tokenizer, saved as
/// a Hugging Face directory: small enough to train for real in seconds on the CPU.
#[allow(dead_code)] // only the binaries that train build one
pub fn tiny_model(dir: &Path) {
    tiny(dir, false);
}

/// The tiny model with a random reward head: a reward model whose scores differ from one
/// completion to the next (a zero head would score everything 0).
#[allow(dead_code)] // only the binaries that score with a reward model build one
pub fn tiny_reward_model(dir: &Path) {
    tiny(dir, true);
}

fn tiny(dir: &Path, reward_head: bool) {
    let base = Model::load(None, Device::Cpu, Precision::Fp32).unwrap();
    let mut config = base.decoder.config().clone();
    config.hidden_size = 64;
    config.intermediate_size = 128;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 4;
    config.num_key_value_heads = Some(2);
    config.head_dim = None;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let decoder = prefloop_model::Decoder::new(&vs, &config).unwrap();
    if reward_head {
        prefloop_model::ScalarHead::new(vs.root() / "score", config.hidden_size);
    }
    // In name order: the variables come from a hash map, and drawing them in its order
    // would give every test process different weights.
    let mut variables: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::manual_seed(0);
    tch::no_grad(|| {
        for (name, mut var) in variables {
            if name.ends_with("norm.weight") {
                let _ = var.fill_(1.0);
            } else {
                var.copy_(&(var.randn_like() * 0.05));
            }
        }
    });
    let model = Model {
        vs,
        decoder,
        tokenizer: base.tokenizer,
        source: PathBuf::from("tiny"),
        adapters: None,
    };
    model.save(dir).unwrap();
}
