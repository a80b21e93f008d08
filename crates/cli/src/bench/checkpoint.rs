//! `prefloop bench checkpoint`: peak host memory of saving and of resuming a training
//! checkpoint (the policy's weights and AdamW's moments), each in a fresh process, against the
//! same states written and read whole (every tensor gathered on the host, then one file), as
//! the trainers did before checkpoints streamed tensor by tensor.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use prefloop_model::{Model, best_device};
use prefloop_train::checkpoint::{self, Part, TrainerState};
use prefloop_train::{AdamW, OptimConfig};
use tch::{Device, Kind, Tensor};

use crate::model_args::ModelArgs;

use super::{mib, peak_rss, reset_peak_rss, rss};

/// Peak host memory of saving and of resuming a checkpoint (bf16 adds fp32 master weights to
/// the states), each in a fresh process, against the same states written and read whole.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Internal: run one phase in this process (save-streamed, resume-streamed, save-whole,
    /// resume-whole) on the checkpoint directory given.
    #[arg(long, hide = true, num_args = 2, value_names = ["PHASE", "DIR"])]
    phase: Vec<String>,
}

/// The model and an optimiser whose moments hold values (one step on made-up gradients).
fn states(args: &Args) -> Result<(Model, AdamW)> {
    let model = args.model.load(best_device())?;
    let mut optimizer = AdamW::new(&model.vs, OptimConfig::default())?;
    // A gradient for every parameter, cheaply.
    for (_, var) in model.vs.variables() {
        var.sum(Kind::Float).backward();
    }
    optimizer.step(1e-6);
    Ok((model, optimizer))
}

fn state() -> TrainerState {
    TrainerState {
        step: 1,
        total_steps: 1,
        seed: 0,
        examples: 1,
        extra: serde_json::Value::Null,
    }
}

/// Bytes of the model's weights and the optimiser's states.
fn states_bytes(model: &Model, optimizer: &AdamW) -> u64 {
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let weights: u64 = model.vs.variables().values().map(bytes).sum();
    let moments: u64 = optimizer
        .state_tensors()
        .iter()
        .map(|(_, t)| bytes(t))
        .sum();
    let masters: u64 = optimizer.masters().iter().map(|(_, t)| bytes(t)).sum();
    weights + moments + masters
}

/// Runs one phase; prints `before peak states` in bytes on the last line.
fn phase(args: &Args, name: &str, dir: &Path) -> Result<()> {
    let (model, mut optimizer) = states(args)?;
    let states = states_bytes(&model, &optimizer);
    let whole = dir.join("whole");
    let before = rss().unwrap_or(0);
    reset_peak_rss();
    match name {
        "save-streamed" => {
            checkpoint::save(
                dir,
                &[Part::trained("policy", &model.vs, &mut optimizer)],
                &state(),
            )?;
        }
        "resume-streamed" => {
            let path = checkpoint::latest(dir)?.context("no checkpoint to resume")?;
            checkpoint::load(
                &path,
                &mut [Part::trained("policy", &model.vs, &mut optimizer)],
            )?;
        }
        "save-whole" => {
            std::fs::create_dir_all(&whole)?;
            let host = |named: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
                named
                    .into_iter()
                    .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
                    .collect()
            };
            let weights = host(model.vs.variables().into_iter().collect());
            Tensor::write_safetensors(&weights, whole.join("policy.safetensors"))?;
            let mut moments = host(optimizer.state_tensors());
            moments.extend(host(optimizer.masters()));
            Tensor::write_safetensors(&moments, whole.join("policy.optimizer.safetensors"))?;
        }
        "resume-whole" => {
            for file in ["policy.safetensors", "policy.optimizer.safetensors"] {
                let tensors = Tensor::read_safetensors(whole.join(file))?;
                let mut variables = model.vs.variables();
                tch::no_grad(|| {
                    for (name, t) in &tensors {
                        if let Some(var) = variables.get_mut(name) {
                            var.copy_(t);
                        }
                    }
                });
            }
        }
        other => anyhow::bail!("unknown phase {other}"),
    }
    let peak = peak_rss().unwrap_or(0);
    println!("{before} {peak} {states}");
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    if let [name, dir] = args.phase.as_slice() {
        return phase(args, name, Path::new(dir));
    }
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let measure = |name: &str| -> Result<(u64, u64, u64)> {
        let mut command = Command::new(&exe);
        command.args([
            "bench",
            "checkpoint",
            "--dtype",
            &args.model.dtype.to_string(),
        ]);
        if let Some(model) = &args.model.model {
            command.arg("--model").arg(model);
        }
        command.arg("--phase").arg(name).arg(dir.path());
        let out = command.output()?;
        anyhow::ensure!(
            out.status.success(),
            "phase {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let numbers: Vec<u64> = text
            .lines()
            .last()
            .unwrap_or("")
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("phase {name} printed {text:?}"))?;
        anyhow::ensure!(numbers.len() == 3, "phase {name} printed {text:?}");
        Ok((numbers[0], numbers[1], numbers[2]))
    };
    println!(
        "bench checkpoint: {} in {}, each phase in a fresh process on {:?}",
        args.model
            .model
            .as_deref()
            .map_or("the embedded default".into(), |p| p.display().to_string()),
        args.model.dtype,
        best_device()
    );
    println!(
        "phase                     RSS before MiB  peak MiB  peak above before MiB  states MiB"
    );
    for name in [
        "save-streamed",
        "resume-streamed",
        "save-whole",
        "resume-whole",
    ] {
        let (before, peak, states) = measure(name)?;
        println!(
            "{name:24} {:15.1} {:9.1} {:22.1} {:11.1}",
            mib(before),
            mib(peak),
            mib(peak.saturating_sub(before)),
            mib(states)
        );
    }
    Ok(())
}
