//! `prefloop bench …`: the speed and memory targets of the issues, measured by the binary
//! itself so the same command runs here, in CI and on a GPU machine.

mod checkpoint;
mod device;
mod generate;
mod jobs;
mod sandbox;
mod shards;
mod train;

use anyhow::Result;
use clap::Subcommand;
use prefloop_core::{Finish, Sample};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Benchmarks. Record what they print, with the machine, in docs/BENCHMARKS.md.
#[derive(Debug, Subcommand)]
pub enum Command {
    Shards(shards::Args),
    Generate(generate::Args),
    RoundGenerate(generate::RoundArgs),
    Jobs(jobs::Args),
    Sandbox(sandbox::Args),
    Train(train::Args),
    Ppo(train::PpoArgs),
    Grpo(train::GroupArgs),
    Checkpoint(checkpoint::Args),
    Device(device::DeviceArgs),
    RandomModel(device::RandomModelArgs),
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Shards(args) => shards::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::RoundGenerate(args) => generate::run_round(&args),
        Command::Jobs(args) => jobs::run(&args),
        Command::Sandbox(args) => sandbox::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Ppo(args) => train::run_ppo(&args),
        Command::Grpo(args) => train::run_group(&args),
        Command::Checkpoint(args) => checkpoint::run(&args),
        Command::Device(args) => device::device(&args),
        Command::RandomModel(args) => device::random_model(&args),
    }
}

/// A `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak resident set size of this process since the last [`reset_peak_rss`] (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident set size now (VmRSS), in bytes.
fn rss() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Starts a new peak-RSS window, so one phase's peak is not hidden by an earlier one.
fn reset_peak_rss() {
    // "5" resets VmHWM (Linux ≥ 4.0); where it is not allowed the peak covers the whole run.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Deterministic English-looking text, so zstd sees something like real prompts.
struct TextGen {
    rng: SmallRng,
    words: Vec<String>,
}

impl TextGen {
    /// A synthetic sample of `prompt`: a completion of about `completion_bytes` (½× to 1½×),
    /// with token count and log-prob in proportion.
    fn sample(
        &mut self,
        problem: u64,
        prompt: &str,
        sample_idx: u32,
        round: u32,
        seed: u64,
        completion_bytes: usize,
    ) -> Sample {
        let completion_len = self
            .rng
            .random_range(completion_bytes / 2..=completion_bytes * 3 / 2);
        Sample {
            problem_id: format!("bench/{problem}"),
            prompt: prompt.to_owned(),
            completion: self.text(completion_len),
            sample_idx,
            round,
            policy: format!("round-{round:04}"),
            seed,
            num_tokens: (completion_len / 4) as u32,
            logprob_sum: -(completion_len as f32) / 8.0,
            finish: Finish::Stop,
        }
    }

    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let syllables = [
            "an", "re", "to", "pro", "gram", "in", "put", "out", "sum", "val", "de", "x",
        ];
        let words = (0..4000)
            .map(|_| {
                let n = rng.random_range(1..4);
                (0..n)
                    .map(|_| syllables[rng.random_range(0..syllables.len())])
                    .collect()
            })
            .collect();
        Self { rng, words }
    }

    fn text(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes + 16);
        while s.len() < bytes {
            s.push_str(&self.words[self.rng.random_range(0..self.words.len())]);
            s.push(if self.rng.random_ratio(1, 12) {
                '\n'
            } else {
                ' '
            });
        }
        s
    }
}

/// Runs a Python baseline `script` (the venv's python) on the model saved at `dir` with
/// `args`; returns the number it prints last (tokens/s).
/// The peak memory column: this process's peak RSS on the CPU; on a GPU, the device memory
/// nvidia-smi says it holds (the caching allocator keeps its peak).
fn memory_mib(device: tch::Device) -> f64 {
    match device {
        tch::Device::Cuda(_) => gpu_memory_mib().unwrap_or(f64::NAN),
        _ => mib(peak_rss().unwrap_or(0)),
    }
}

/// What [`memory_mib`] measures on `device`, for the table's legend.
fn memory_meaning(device: tch::Device) -> &'static str {
    match device {
        tch::Device::Cuda(_) => "GPU memory held, from nvidia-smi",
        _ => "peak RSS of this process",
    }
}

/// GPU memory this process holds, from nvidia-smi.
fn gpu_memory_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (pid, used) = line.split_once(',')?;
            (pid.trim() == me).then(|| used.trim().parse().ok())?
        })
}

/// The baseline's tokens/s and our speed-up over it, as table cells. A baseline that failed
/// (out of memory at a large shape, say) is reported on stderr and as "failed", so the rows
/// already measured are not lost.
fn baseline_columns(baseline: Option<Result<f64>>, ours: f64) -> (String, String) {
    match baseline {
        Some(Ok(b)) => (format!("{b:.1}"), format!("{:.2}x", ours / b)),
        Some(Err(e)) => {
            eprintln!("{e:#}");
            ("failed".into(), "-".into())
        }
        None => ("-".into(), "-".into()),
    }
}

fn python_baseline(
    python: &std::path::Path,
    script: &str,
    dir: &std::path::Path,
    args: &[String],
    what: &str,
) -> Result<f64> {
    use anyhow::Context;
    let output = std::process::Command::new(python)
        .args(["-c", script])
        .arg(dir)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} baseline failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .lines()
        .last()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("{what} baseline printed {text:?}"))
}
