//! `prefloop run | resume | status`: rounds over a run directory (crates/pipeline).

use std::path::PathBuf;

use anyhow::Result;
use prefloop_pipeline::{
    CONFIG_FILE, KL_TO_PREVIOUS, METRICS_FILE, POLICY_LINK, RoundMetrics, Rounds, RunConfig,
    RunDir, Stage, TENSORBOARD_DIR, merge_shards, read_state, run_rounds, write_events,
    write_report,
};
use prefloop_train::KL_TO_REFERENCE;

/// Start a run from a config, or continue it: the same command again after a kill (or
/// nightly) carries on where the run stands, with no duplicated or missing rows.
///
/// Exit codes: 0 done, 1 a stage failed (fix it and resume), 3 another process holds the
/// run, 4 the config is bad or differs from the one the run was started with.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The run config (TOML; see configs/).
    #[arg(long)]
    config: PathBuf,
    /// The run directory. Default: runs/<config file name without .toml>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Change one setting of the config: `--set generate.seed=1` (a dotted key and a TOML
    /// value; a bare word is a string). Repeatable; the run freezes the result, so `prefloop
    /// resume RUN` continues it without them.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The problems the config names, replaced by this path (a problems stage, or the
    /// dataset file `data.import` reads).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// Continue a run whose frozen config differs from this one; later stages follow this.
    #[arg(long)]
    allow_config_change: bool,
    /// Rounds to run: N, or +N for N more than the run has trained (a finished run extended
    /// by a nightly job); the one change to a frozen config allowed without
    /// --allow-config-change, recorded in it and in state.json.
    #[arg(long, allow_hyphen_values = true)]
    rounds: Option<Rounds>,
}

/// Continue a run with the config it was started with.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The run directory.
    run: PathBuf,
    /// Rounds to run: N, or +N for N more than the run has trained.
    #[arg(long, allow_hyphen_values = true)]
    rounds: Option<Rounds>,
}

/// Write RUN/report.html (charts of reward, pass@k, KL, verdicts and loss; every round's
/// metrics; example pairs and samples; the config) and RUN/tensorboard/ (the same metrics as
/// TensorBoard event files). `prefloop run` writes both as it goes.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run directory.
    run: PathBuf,
}

/// Join the slices a stage was written in (`--shard i/n` of generate or score-tests) into one
/// stage: every slice present and complete, checksums verified, no row twice. The slices'
/// files stay where they are; the stage's MANIFEST.json lists them.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The stage directory that holds shard-IIIII-of-NNNNN/ slices.
    stage: PathBuf,
}

pub fn merge(args: &MergeArgs) -> Result<()> {
    let manifest = merge_shards(&args.stage)?;
    println!(
        "merged {} {} rows from {} files into {}",
        manifest.rows(),
        manifest.kind,
        manifest.shards.len(),
        args.stage.display()
    );
    Ok(())
}

/// Where a run stands: each round's stages, its metrics, whether it is finished.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The run directory.
    run: PathBuf,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let mut config = RunConfig::load_with(&args.config, &args.set)?;
    if let Some(problems) = &args.problems {
        config.data.problems = std::path::absolute(problems)?;
    }
    let out = match &args.out {
        Some(out) => out.clone(),
        None => {
            let name = args.config.file_stem().unwrap_or_default();
            PathBuf::from("runs").join(name)
        }
    };
    let (dir, config) = RunDir::start(&out, &config, args.allow_config_change, args.rounds)?;
    rounds(&dir, &config)
}

pub fn resume(args: &ResumeArgs) -> Result<()> {
    let (dir, config) = RunDir::resume(&args.run, args.rounds)?;
    rounds(&dir, &config)
}

fn rounds(dir: &RunDir, config: &RunConfig) -> Result<()> {
    println!("run {} ({} rounds)", dir.root().display(), config.rounds);
    let state = run_rounds(dir, config, |round, metrics| {
        println!("round {round}: {}", summary(metrics));
    })?;
    if let Some(round) = state.waiting_for_prompts {
        println!(
            "no new prompts for round {round}: every file of {} was sampled by an earlier round \
             (data.when_exhausted = \"stop\"); the same command continues once a new file is there",
            config
                .data
                .prompts
                .as_deref()
                .unwrap_or(std::path::Path::new("data.prompts"))
                .display()
        );
    }
    if let Some(policy) = newest_policy(dir.root()) {
        println!("newest policy: {}", policy.display());
    }
    println!(
        "done: metrics per round in {}, report in {}, TensorBoard logs in {}",
        dir.root().join(METRICS_FILE).display(),
        write_report(dir.root())?.display(),
        dir.root().join(TENSORBOARD_DIR).display()
    );
    Ok(())
}

pub fn report(args: &ReportArgs) -> Result<()> {
    println!("{}", write_report(&args.run)?.display());
    println!("{}", write_events(&args.run)?.display());
    Ok(())
}

/// One line of what a round measured.
fn summary(metrics: &RoundMetrics) -> String {
    let mut parts = Vec::new();
    let get = |key: &str| metrics.get(key).copied();
    if let (Some(mean), Some(std)) = (get("reward/mean"), get("reward/std")) {
        parts.push(format!("reward {mean:.2} ± {std:.2}"));
    }
    if let (Some(mean), Some(std)) = (get("eval/reward/mean"), get("eval/reward/std")) {
        parts.push(format!("held-out reward {mean:.3} ± {std:.2}"));
    }
    for (key, value) in metrics.iter().filter(|(k, _)| k.starts_with("pass@")) {
        parts.push(format!("{key} {value:.3}"));
    }
    if let Some(pairs) = get("pairs") {
        parts.push(format!("{pairs} pairs"));
    }
    if let Some(kl) = get(KL_TO_PREVIOUS) {
        parts.push(format!("KL to the previous policy {kl:.3}"));
    }
    if let Some(kl) = get(KL_TO_REFERENCE) {
        parts.push(format!("KL to the reference {kl:.4}"));
    }
    if let Some(loss) = get("policy_loss") {
        parts.push(format!("policy loss {loss:.4}"));
    }
    if let Some(loss) = get("train/loss") {
        parts.push(format!("DPO loss {loss:.4}"));
    }
    if let Some(accuracy) = get("train/rewards/accuracies") {
        parts.push(format!("rewards/accuracies {accuracy:.2}"));
    }
    let stages = [Stage::Generate, Stage::Score, Stage::Pairs, Stage::Train].map(Stage::name);
    let times: Vec<String> = stages
        .into_iter()
        .chain(["eval"])
        .filter_map(|s| get(&format!("time/{s}")).map(|t| format!("{s} {t:.0}s")))
        .collect();
    if !times.is_empty() {
        parts.push(format!("({})", times.join(", ")));
    }
    parts.join(", ")
}

/// `<run>/policy` and where it points, if a round has trained one.
fn newest_policy(run: &std::path::Path) -> Option<PathBuf> {
    let link = run.join(POLICY_LINK);
    let target = std::fs::read_link(&link).ok()?;
    Some(PathBuf::from(format!(
        "{} -> {}",
        link.display(),
        target.display()
    )))
}

pub fn status(args: &StatusArgs) -> Result<()> {
    anyhow::ensure!(
        args.run.join(CONFIG_FILE).exists(),
        "{}: not a run directory (no {CONFIG_FILE})",
        args.run.display()
    );
    let config = RunConfig::load(&args.run.join(CONFIG_FILE))?;
    let state = read_state(&args.run)?;
    println!(
        "{}: {}",
        args.run.display(),
        if state.finished {
            "finished"
        } else {
            "not finished (prefloop resume continues it)"
        }
    );
    let last = config.rounds + u32::from(config.final_generation);
    for round in 0..last {
        let stages: &[Stage] = if round < config.rounds {
            &[Stage::Generate, Stage::Score, Stage::Pairs, Stage::Train]
        } else {
            &[Stage::Generate, Stage::Score]
        };
        let done = |stage: &Stage| state.is_complete(round, *stage);
        let marks: Vec<String> = stages
            .iter()
            .map(|s| format!("{} {}", s.name(), if done(s) { "✓" } else { "·" }))
            .collect();
        let metrics = state
            .round(round)
            .filter(|r| !r.metrics.is_empty())
            .map(|r| format!(" — {}", summary(&r.metrics)))
            .unwrap_or_default();
        println!("round {round}: {}{metrics}", marks.join("  "));
        if let Some(prompts) = state.round(round).and_then(|r| r.prompts.as_ref()) {
            let files: Vec<String> = prompts
                .files
                .iter()
                .map(|f| format!("{} ({})", f.path.display(), &f.sha256[..12]))
                .collect();
            println!(
                "  prompts: {} ({}){}",
                prompts.problem_ids.len(),
                &prompts.hash[..12],
                if files.is_empty() {
                    String::new()
                } else {
                    format!(" from {}", files.join(", "))
                }
            );
        }
    }
    if let Some(round) = state.waiting_for_prompts {
        println!("waiting for new prompts before round {round}");
    }
    for change in &state.extensions {
        println!("rounds extended: {} → {}", change.from, change.to);
    }
    match newest_policy(&args.run) {
        Some(policy) => println!("newest policy: {}", policy.display()),
        None => println!("newest policy: none trained yet"),
    }
    Ok(())
}
