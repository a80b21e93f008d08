//! End-to-end: `prefloop generate` on the embedded default writes a samples stage, and a run
//! killed part-way resumes to exactly the rows of an uninterrupted run; scripts/gpu-check's dry
//! run measures every GPU figure on the CPU; scripts/decode-floor times a decode step's floor.

use std::borrow::Cow;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use prefloop_core::Sample;
use prefloop_data::{Manifest, StageReader};

fn model_installed() -> bool {
    let installed = prefloop_model::default_model_path().exists();
    if !installed {
        eprintln!("skipped: the embedded default model is not installed (run scripts/setup)");
    }
    installed
}

/// A script's standard output, once it has exited 0 (else both its outputs in the panic).
fn stdout_of_success(out: &Output) -> Cow<'_, str> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn generate(prompts: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefloop"));
    cmd.args([
        "generate",
        "--n",
        "2",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
        "--shard-rows",
        "2",
    ])
    .arg("--prompts")
    .arg(prompts)
    .arg("--out")
    .arg(out)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

fn read(dir: &Path) -> Vec<Sample> {
    StageReader::<Sample>::open(dir)
        .unwrap()
        .flat_map(Result::unwrap)
        .collect()
}

#[test]
fn generate_writes_a_samples_stage_and_resumes_after_a_kill() {
    if !model_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = [
        "Name a colour.",
        "What is 2+2?",
        "Say hello.",
        "Name a fruit.",
        "Count to three.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| serde_json::json!({"problem_id": format!("q{i}"), "prompt": p}).to_string())
    .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();

    let whole = dir.path().join("whole");
    let out = generate(&prompts, &whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = read(&whole);
    assert_eq!(expected.len(), 10);
    assert_eq!(expected[3].problem_id, "q1");
    assert_eq!(expected[3].sample_idx, 1);
    assert!(
        expected
            .iter()
            .all(|s| s.num_tokens <= 12 && s.logprob_sum < 0.0)
    );

    // Kill once two shards are durable, then run the same command again.
    let resumed = dir.path().join("resumed");
    let mut child = generate(&prompts, &resumed).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Manifest::load(&resumed)
        .ok()
        .flatten()
        .is_none_or(|m| m.shards.len() < 2)
    {
        assert!(Instant::now() < deadline, "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!Manifest::load(&resumed).unwrap().unwrap().complete);
    let out = generate(&prompts, &resumed).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&resumed), expected);

    // A complete stage is not generated twice.
    let out = generate(&prompts, &resumed).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stage is already complete"));
}

#[test]
fn the_gpu_check_script_runs_every_step_on_the_cpu_in_a_dry_run() {
    if !model_installed() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/gpu-check"))
        .arg("--dry-run")
        .env("PREFLOOP_BIN", env!("CARGO_BIN_EXE_prefloop"))
        .output()
        .unwrap();
    let stdout = stdout_of_success(&out);
    let summary = &stdout[stdout.find("== summary").expect("a summary")..];
    for figure in [
        "sdpa backend, decode step",
        "logits, Cpu BFloat16 against CPU fp32",
        "ema/reference_shift",
        "bench grpo",
        "bench generate",
        "prefloop, ATen ops per decode step",
        "eager PyTorch decoder, ATen ops per decode step",
        "bench train",
    ] {
        assert!(
            summary.contains(figure),
            "{figure} missing from:\n{summary}"
        );
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
    // A baseline that fails leaves its column "failed" and the step still succeeds.
    assert!(!summary.contains("failed"), "{summary}");
}

#[test]
fn the_decode_floor_script_times_prefloop_the_eager_decoder_and_the_floor() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/decode-floor"))
        .args(["--shape", "tiny", "--batch-sizes", "1,2"])
        .args(["--prompt-len", "16", "--new-tokens", "8"])
        .args(["--bin", env!("CARGO_BIN_EXE_prefloop")])
        .output()
        .unwrap();
    let stdout = stdout_of_success(&out);
    for batch in ["1", "2"] {
        let row = stdout
            .lines()
            .find(|line| line.split_whitespace().next() == Some(batch))
            .unwrap_or_else(|| panic!("no row for batch {batch} in:\n{stdout}"));
        // The eager and prefloop columns, then step-floor's five, each with its speed-up.
        assert_eq!(row.matches('x').count(), 6, "{row}");
    }
}

#[test]
fn a_gguf_cut_short_is_an_error_naming_the_file_not_a_panic() {
    if !model_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(prefloop_model::default_model_path()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..3_214_336]).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"problem_id\": \"a\", \"prompt\": \"Hi\"}\n").unwrap();
    let out = generate(&prompts, &dir.path().join("samples"))
        .args(["--model", cut.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cut.gguf") && stderr.contains("cut short"),
        "{stderr}"
    );
}
