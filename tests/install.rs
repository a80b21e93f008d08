//! End-to-end: the binary as a user on another shell meets it. It runs from any directory in a
//! clean environment (libtorch through the rpath the build recorded, the model and the
//! sandbox's runners through the cache directory recorded at build time), and `prefloop
//! doctor` says what this installation has and what is missing, with the fix.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn installed() -> bool {
    let model = prefloop_model::default_model_path();
    let runner = prefloop_sandbox::default_runtime_dir().join(prefloop_sandbox::PYTHON_RUNNER);
    let missing: Vec<String> = [model, runner]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped: {} not installed (run scripts/setup)",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// The binary run in `dir` with nothing in its environment but a minimal PATH (as
/// `env -i PATH=/usr/bin:/bin` would): no LD_LIBRARY_PATH, no PREFLOOP_* variables, no venv.
fn clean(dir: &Path) -> Command {
    clean_run(Path::new(env!("CARGO_BIN_EXE_prefloop")), dir)
}

/// `binary` run in `dir` that way.
fn clean_run(binary: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir);
    cmd
}

fn output(cmd: &mut Command, stdin: &str) -> Output {
    common::output_with_stdin(cmd, stdin)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        common::text(&output.stdout),
        common::text(&output.stderr)
    )
}

#[test]
fn the_binary_runs_from_any_directory_in_a_clean_environment() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "{\"prompt\": \"Say hello.\", \"problem_id\": \"hello\"}\n",
    )
    .unwrap();
    let generated = output(
        clean(dir.path()).args([
            "generate",
            "--prompts",
            "p.jsonl",
            "--n",
            "1",
            "--max-new-tokens",
            "4",
            "--out",
            "s",
        ]),
        "",
    );
    assert!(generated.status.success(), "{}", text(&generated));
    assert!(dir.path().join("s/MANIFEST.json").is_file());

    std::fs::write(dir.path().join("prog.py"), "print(int(input()) * 2)\n").unwrap();
    let ran = output(
        clean(dir.path()).args(["sandbox", "run", "prog.py"]),
        "21\n",
    );
    assert!(ran.status.success(), "{}", text(&ran));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "42\n");
    assert!(String::from_utf8_lossy(&ran.stderr).contains("[sandbox] OK"));

    let doctor = output(clean(dir.path()).arg("doctor"), "");
    assert!(doctor.status.success(), "{}", text(&doctor));
}

#[test]
fn doctor_reports_everything_a_default_run_needs() {
    if !installed() {
        return;
    }
    let doctor = common::prefloop(&["doctor"]);
    let report = text(&doctor);
    assert!(doctor.status.success(), "{report}");
    for what in [
        "ok  libtorch           2.11.0",
        "ok  embedded model",
        "sha256 ok",
        "ok  SDPA backends",
        "ok  sandbox (python)",
        "ok  compile cache",
        "everything a default run needs is here",
    ] {
        assert!(report.contains(what), "{what:?} in\n{report}");
    }
    // C++ and CUDA are optional: present or said to be missing, with a fix.
    assert!(report.contains("sandbox (C++)") && report.contains("CUDA"));
}

/// `doctor --model DIR` says which family a model loads as, its windows and whether its chat
/// template renders; a family prefloop does not run makes it exit 1, naming the file.
#[test]
fn doctor_names_the_family_a_model_loads_as_and_refuses_an_unknown_one() {
    if !installed() {
        return;
    }
    use prefloop_model::{Decoder, Model, Precision};
    let base = Model::load(None, tch::Device::Cpu, Precision::Fp32).unwrap();
    let mut config = base.decoder.config().clone();
    config.model_type = "qwen3".into();
    config.hidden_size = 64;
    config.intermediate_size = 128;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 4;
    config.num_key_value_heads = Some(2);
    config.head_dim = Some(32);
    config.sliding_window = Some(8);
    config.use_sliding_window = Some(true);
    config.max_window_layers = Some(1);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("qwen3");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let decoder = Decoder::new(&vs, &config).unwrap();
    let model = Model {
        vs,
        decoder,
        tokenizer: base.tokenizer.clone(),
        source: dir.clone(),
        adapters: None,
    };
    model.save(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap();
    let doctor = common::prefloop(&["doctor", "--model", dir_arg]);
    let report = text(&doctor);
    assert!(doctor.status.success(), "{report}");
    for what in [
        "qwen3 (Qwen3ForCausalLM), 2 layers, hidden 64, 4 query heads and 2 key/value heads of 32",
        "sliding windows (layer: keys) 1: 8",
        "its chat template renders",
    ] {
        assert!(report.contains(what), "{what:?} in\n{report}");
    }

    let config_file = dir.join("config.json");
    let edited = std::fs::read_to_string(&config_file)
        .unwrap()
        .replace("\"qwen3\"", "\"qwen3_next\"");
    std::fs::write(&config_file, edited).unwrap();
    let doctor = common::prefloop(&["doctor", "--model", dir_arg]);
    let report = text(&doctor);
    assert!(!doctor.status.success(), "{report}");
    assert!(
        report.contains("config.json: unknown architecture `qwen3_next`"),
        "{report}"
    );
}

#[test]
fn doctor_without_the_sandbox_runner_exits_non_zero_and_names_the_fix() {
    if !installed() {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let doctor = output(
        Command::new(env!("CARGO_BIN_EXE_prefloop"))
            .arg("doctor")
            .env("PREFLOOP_SANDBOX_DIR", empty.path()),
        "",
    );
    let report = text(&doctor);
    assert_eq!(doctor.status.code(), Some(1), "{report}");
    assert!(
        report.contains("MISSING  sandbox (python)") && report.contains("python-runner.wasm"),
        "{report}"
    );
    assert!(report.contains("fix: run scripts/setup"), "{report}");
    assert!(report.contains("a default run needs what is missing: sandbox (python)"));
}

#[test]
fn scripts_install_lays_out_a_binary_that_finds_its_files_beside_it() {
    if !installed() {
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install");
    let install = output(
        Command::new(&script)
            .arg("--no-build")
            .arg(prefix.path())
            .env("HOME", prefix.path()),
        "",
    );
    let report = text(&install);
    // It ends with the installed binary's doctor, run in a clean environment.
    assert!(install.status.success(), "{report}");
    assert!(
        report.contains("share/prefloop beside the installed binary"),
        "{report}"
    );
    let share = prefix.path().join("share/prefloop");
    assert!(
        share
            .join("models")
            .join(prefloop_model::DEFAULT_MODEL_FILE)
            .is_file()
    );
    assert!(
        share
            .join("sandbox")
            .join(prefloop_sandbox::PYTHON_RUNNER)
            .is_file()
    );

    // Installed again over itself: the same layout, nothing left beside it.
    let again = output(
        Command::new(&script)
            .arg("--no-build")
            .arg(prefix.path())
            .env("HOME", prefix.path()),
        "",
    );
    assert!(again.status.success(), "{}", text(&again));
    let mut entries: Vec<String> = std::fs::read_dir(prefix.path().join("share"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["prefloop"]);

    // From anywhere, with nothing in its environment.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("prog.py"), "print('hi')\n").unwrap();
    let ran = output(
        clean_run(&prefix.path().join("bin/prefloop"), elsewhere.path())
            .env("HOME", prefix.path())
            .arg("sandbox")
            .arg("run")
            .arg("prog.py"),
        "",
    );
    assert!(ran.status.success(), "{}", text(&ran));
}
