//! `prefloop train sft|rm|dpo`: the trainers of prefloop-train behind flags. Settings come from
//! an optional TOML file (the trainer's config struct, every field defaulted) with flags on top.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use prefloop_core::Problem;
use prefloop_model::{Model, Precision, best_device};
use prefloop_pipeline::{
    ProgramFields, PromptRow, ScoreConfig, Scorer, ScorerKind, ScorerList, Task, read_problems,
    read_prompts, unknown_keys,
};
use prefloop_train::{
    DpoConfig, EncodeConfig, Estimator, GroupConfig, IterationRecord, KL_TO_REFERENCE, LoopConfig,
    LoraConfig, OnlineConfig, POLICY_DIR, PpoConfig, PpoModels, PreferenceLoss, PromptExample,
    REWARD_MODEL_DIR, RewardConfig, RewardModel, Rollout, SftConfig, StepRecord, train_dpo,
    train_group, train_ppo, train_reward_model, train_sft, with_lora,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Trainers: SFT, a reward model, DPO/IPO, PPO and the group estimators; each resumable.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Supervised fine-tuning on the chosen answers of a pairs stage or the reference
    /// solutions of a problems stage; saves OUT/policy.
    Sft {
        /// A pairs or problems stage directory.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        #[command(flatten)]
        common: Common,
    },
    /// A Bradley–Terry reward model on a pairs stage; saves OUT/reward_model and OUT/eval.json.
    Rm {
        /// The pairs stage to train on (`prefloop pairs …`, or TRL data through `import trl`).
        #[arg(long)]
        pairs: PathBuf,
        /// Share of pairs held out for evaluation.
        #[arg(long)]
        eval_fraction: Option<f64>,
        #[command(flatten)]
        lora: LoraRankArgs,
        #[command(flatten)]
        common: Common,
    },
    /// PPO from prompts, scored by a reward model, a reward program, unit tests or a weighted
    /// sum of them (see the scoring flags): actor, critic and reference start from --model;
    /// saves OUT/policy and OUT/critic. The paper's tricks are config switches
    /// (advantage_normalisation, rollout_batch_size, ema_reference, value_normalisation).
    /// With --lora-rank the actor and critic train adapters and the reference is the actor's
    /// base with its adapters off, which cannot move: the EMA reference is off whatever
    /// ema_reference says (as in the library, which warns when it says true). Log-probs,
    /// ratio and KL are of the logits divided by the rollouts' `temperature`; LoRA takes no
    /// dropout here (the on-policy ratio must be 1).
    Ppo {
        #[command(flatten)]
        online: OnlineArgs,
        #[command(flatten)]
        lora: LoraRankArgs,
    },
    /// A group estimator (GRPO, RLOO, REINFORCE++-baseline) from prompts, scored by a reward
    /// model, a reward program, unit tests or a weighted sum of them (see the scoring flags):
    /// group_size completions per prompt, advantages from each group, no critic; saves
    /// OUT/policy. Settings: the GroupConfig fields (see crates/train/src/group.rs, and
    /// OnlineConfig in crates/train/src/online.rs for those every online trainer has). Log-probs,
    /// ratio, KL and entropy are of the logits divided by the rollouts' `temperature`; LoRA
    /// takes no dropout here (the on-policy ratio must be 1).
    Grpo {
        #[command(flatten)]
        online: OnlineArgs,
        /// grpo (Dr. GRPO with `scale_rewards = false`), rloo or reinforce_pp.
        #[arg(long, default_value = "grpo")]
        estimator: Estimator,
        /// Completions sampled per prompt.
        #[arg(long)]
        group_size: Option<usize>,
        #[command(flatten)]
        lora: LoraRankArgs,
    },
    /// DPO or IPO on a pairs stage, the starting policy as reference; saves OUT/policy with
    /// every EOS id of the model. Answers end with the token the chat template ends a turn with
    /// (the tokenizer's eos_token), except sampled answers the policy did not end (the pairs'
    /// chosen_finish / rejected_finish: length, stop_string), trained on as sampled.
    Dpo {
        /// The pairs stage to train on (`prefloop pairs …`, or TRL data through `import trl`).
        #[arg(long)]
        pairs: PathBuf,
        /// β (default 0.1).
        #[arg(long)]
        beta: Option<f64>,
        /// sigmoid (DPO, on summed log-probs) or ipo (on log-probs averaged over each
        /// answer's tokens, as TRL and the IPO authors; not summed).
        #[arg(long, value_parser = parse_loss)]
        loss: Option<PreferenceLoss>,
        /// Weight of an SFT term on the chosen answers.
        #[arg(long)]
        sft_weight: Option<f64>,
        #[command(flatten)]
        lora: LoraArgs,
        #[command(flatten)]
        common: Common,
    },
}

/// Fresh LoRA adapters of a rank instead of full fine-tuning.
#[derive(Debug, clap::Args)]
pub struct LoraRankArgs {
    /// Train LoRA adapters of this rank (on every projection unless the config's `[lora]`
    /// table says otherwise) instead of every weight.
    #[arg(long)]
    lora_rank: Option<u32>,
    /// LoRA's α (default 2 × rank); the update is scaled by α / rank.
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f64>,
}

impl LoraRankArgs {
    /// The flags over the config file's `[lora]` table.
    fn apply(&self, lora: &mut Option<LoraConfig>) {
        if let Some(rank) = self.lora_rank {
            let mut config = lora.take().unwrap_or_default();
            config.rank = rank;
            config.alpha = self.lora_alpha.unwrap_or(2.0 * f64::from(rank));
            *lora = Some(config);
        }
    }
}

/// LoRA instead of full fine-tuning: fresh adapters of a rank, or a PEFT adapter to continue.
#[derive(Debug, clap::Args)]
pub struct LoraArgs {
    #[command(flatten)]
    rank: LoraRankArgs,
    /// A PEFT LoRA adapter directory (peft's `save_pretrained`, or a policy's `adapter/`) to
    /// load onto --model and go on training.
    #[arg(long, conflicts_with = "lora_rank")]
    adapter: Option<PathBuf>,
}

impl LoraArgs {
    fn apply(&self, lora: &mut Option<LoraConfig>) {
        self.rank.apply(lora);
    }

    /// `model` with the adapter it is to train: --adapter's, or fresh ones per `lora`.
    fn attach(&self, model: Model, lora: Option<&LoraConfig>, seed: u64) -> Result<Model> {
        Ok(match &self.adapter {
            Some(dir) => model
                .load_adapter(dir)
                .with_context(|| format!("loading the adapter {}", dir.display()))?,
            None => with_lora(model, lora, seed)?,
        })
    }
}

fn parse_loss(s: &str) -> Result<PreferenceLoss, String> {
    match s {
        "sigmoid" | "dpo" => Ok(PreferenceLoss::Sigmoid),
        "ipo" => Ok(PreferenceLoss::Ipo),
        other => Err(format!("unknown loss {other:?} (sigmoid, ipo)")),
    }
}

/// Flags of the online trainers (PPO and the group estimators), which sample from the policy
/// and score what they sample. Each one left out keeps the config file's value.
#[derive(Debug, clap::Args)]
pub struct OnlineArgs {
    /// JSONL or Parquet prompts (a problems shard works); with --problems and no --prompts,
    /// the problems' own prompts.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Score with a reward model `prefloop train rm` saved (its OUT/reward_model).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// Score with a reward program: a Python file defining `reward(prompt, completion,
    /// **fields) -> float`, run in the sandbox with each prompt row's other fields.
    #[arg(long)]
    program: Option<PathBuf>,
    /// Score by running each completion against its problem's unit tests in the sandbox: a
    /// problems stage (`prefloop import`).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// With several scorers, one's weight in the sum, as KIND=W (`--weight tests=1 --weight
    /// program=0.1`; kinds tests, program, rm); 1 when not given.
    #[arg(long = "weight", value_parser = parse_weight)]
    weights: Vec<(ScorerKind, f64)>,
    /// TOML file with the trainer's config fields (see crates/train), plus `dtype` and a
    /// `[score]` table as a run's (its scorer list, weights, limits); the scoring flags
    /// replace its scorers.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Starting policy: a .gguf file or a Hugging Face directory; the embedded default if
    /// omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Precision of every model loaded (overrides the config file's `dtype`).
    #[arg(long)]
    dtype: Option<Precision>,
    /// Output directory: checkpoints, metrics.jsonl, the trained policy. Run the same command
    /// again to resume a killed run.
    #[arg(long)]
    out: PathBuf,
    /// Sample → update iterations.
    #[arg(long)]
    iterations: Option<u64>,
    /// Prompts per iteration (PPO: one rollout each; group estimators: one group each).
    #[arg(long)]
    rollout_batch_size: Option<usize>,
    /// Token budget of each completion.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Seeds prompt order, sampling and minibatch order.
    #[arg(long)]
    seed: Option<u64>,
    /// Use prompts as they are, without the chat template.
    #[arg(long)]
    raw_prompts: bool,
}

impl OnlineArgs {
    /// The config file's settings with the flags on top, and the precision.
    /// `fields` finds the config's shared online settings and its `rollout_batch_size`.
    fn config<C: DeserializeOwned + Serialize + Default>(
        &self,
        fields: impl FnOnce(&mut C) -> (&mut OnlineConfig, &mut usize),
    ) -> Result<(C, Precision)> {
        let mut table = read_table(self.config.as_deref())?;
        table.remove("score");
        let (mut config, file_dtype): (C, _) = from_table(table, self.config.as_deref())?;
        let (online, rollout_batch_size) = fields(&mut config);
        set(&mut online.iterations, self.iterations);
        set(rollout_batch_size, self.rollout_batch_size);
        set(&mut online.max_new_tokens, self.max_new_tokens);
        set(&mut online.seed, self.seed);
        online.encode.raw_prompts |= self.raw_prompts;
        Ok((config, self.dtype.unwrap_or(file_dtype)))
    }

    /// The prompts and how to score what is sampled from them: the config file's `[score]`
    /// with the scoring flags' scorers (in the order tests, program, rm) in place of its own.
    /// The reward model loads in `precision` and encodes prompts as `encode` says.
    fn scoring(&self, precision: Precision, encode: EncodeConfig) -> Result<Scoring> {
        let flags = [
            (ScorerKind::Tests, self.problems.is_some()),
            (ScorerKind::Program, self.program.is_some()),
            (ScorerKind::Rm, self.reward_model.is_some()),
        ];
        let kinds: Vec<ScorerKind> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
        let file = read_table(self.config.as_deref())?.remove("score");
        if kinds.is_empty() && file.is_none() {
            anyhow::bail!(
                "nothing scores the rollouts: give --reward-model, --program or --problems"
            );
        }
        let mut score: ScoreConfig = match file {
            Some(table) => table.try_into().with_context(|| {
                format!("{}: invalid [score] table", display(self.config.as_deref()))
            })?,
            None => ScoreConfig::default(),
        };
        if !kinds.is_empty() {
            score.scorer = ScorerList::Many(kinds);
            score.weights.clear();
        }
        if !self.weights.is_empty() {
            let parts = score.parts();
            if let Some((kind, _)) = self.weights.iter().find(|(k, _)| !score.uses(*k)) {
                anyhow::bail!("--weight {}=…: not one of the scorers", kind.name());
            }
            let given = |kind| self.weights.iter().rev().find(|(k, _)| *k == kind);
            score.weights = parts
                .iter()
                .map(|&(kind, weight)| given(kind).map_or(weight, |w| w.1))
                .collect();
        }
        if self.program.is_some() {
            score.program.clone_from(&self.program);
        }
        if self.reward_model.is_some() {
            score.reward_model.clone_from(&self.reward_model);
        }
        if let Err((field, message)) = score.check() {
            anyhow::bail!("`{field}`: {message}");
        }
        let problems: HashMap<String, Problem> = match &self.problems {
            Some(dir) => read_problems(dir)?
                .into_iter()
                .map(|p| (p.problem_id.clone(), p))
                .collect(),
            None => HashMap::new(),
        };
        let rows = match (&self.prompts, &self.problems) {
            (Some(path), _) => read_prompts(path)?,
            (None, Some(_)) => {
                let mut rows: Vec<PromptRow> = problems
                    .values()
                    .map(|p| PromptRow {
                        problem_id: p.problem_id.clone(),
                        prompt: p.prompt.clone(),
                        ..PromptRow::default()
                    })
                    .collect();
                rows.sort_by(|a, b| a.problem_id.cmp(&b.problem_id));
                rows
            }
            (None, None) => anyhow::bail!("give --prompts (or --problems, whose prompts are used)"),
        };
        let mut scorer = Scorer::new(&score, precision, encode);
        scorer.open()?; // a missing or bad scorer is an error before any sampling

        Ok(Scoring {
            scorer,
            problems,
            fields: rows
                .iter()
                .map(|p| (p.problem_id.clone(), p.fields.clone()))
                .collect(),
            prompts: rows
                .into_iter()
                .map(|p| PromptExample {
                    problem_id: p.problem_id,
                    prompt: p.prompt,
                })
                .collect(),
        })
    }
}

/// What an online trainer's rollouts are scored by, and the prompts it samples from.
struct Scoring {
    scorer: Scorer,
    problems: HashMap<String, Problem>,
    fields: ProgramFields,
    prompts: Vec<PromptExample>,
}

impl Scoring {
    /// The rewards of an iteration's rollouts; with several scorers, each one's mean is
    /// logged.
    fn reward(&mut self, iteration: u64, rollouts: &[Rollout]) -> Result<Vec<f32>> {
        let task = Task {
            problems: &self.problems,
            fields: &self.fields,
        };
        let rewards = self
            .scorer
            .score_rollouts(rollouts, iteration as u32, task)?;
        for (name, mean) in self.scorer.part_means() {
            tracing::info!(iteration, scorer = name, mean, "scored");
        }
        Ok(rewards)
    }
}

/// `KIND=W`: a scorer's weight.
fn parse_weight(s: &str) -> Result<(ScorerKind, f64), String> {
    let (kind, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=WEIGHT, e.g. program=0.1"))?;
    let kind = match kind {
        "tests" => ScorerKind::Tests,
        "program" => ScorerKind::Program,
        "rm" => ScorerKind::Rm,
        other => return Err(format!("unknown scorer {other:?} (tests, program, rm)")),
    };
    let weight: f64 = weight
        .parse()
        .map_err(|e| format!("{weight:?}: not a number ({e})"))?;
    Ok((kind, weight))
}

/// A progress bar over iterations showing the reward and KL.
fn iteration_progress(iterations: u64) -> (ProgressBar, impl FnMut(&IterationRecord, u64)) {
    let bar = ProgressBar::new(iterations);
    let handle = bar.clone();
    let on_iteration = move |r: &IterationRecord, _: u64| {
        handle.set_position(r.step);
        handle.set_message(r.summary());
    };
    (bar, on_iteration)
}

/// The last iteration's figures, for the terminal.
fn summarise_iterations(records: &[IterationRecord], keys: &[&str], saved: &Path) {
    match records.last() {
        Some(last) => {
            let figures: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "{k} {:.4}",
                        last.metrics.get(*k).copied().unwrap_or(f64::NAN)
                    )
                })
                .collect();
            println!("iteration {}: {}", last.step, figures.join(", "));
        }
        None => println!("nothing to do: already trained"),
    }
    println!("saved {}", saved.display());
}

/// Flags every trainer takes. Each one left out keeps the config file's value, or the default.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Starting model: a .gguf file or a Hugging Face directory; the embedded default if omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, the trained model. Run the same command
    /// again to resume a killed run.
    #[arg(long)]
    out: PathBuf,
    /// TOML file with the trainer's settings (see configs/), plus `dtype` for the model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Precision of the model: auto (bf16 on a CUDA GPU, fp32 on the CPU), bf16 or fp32;
    /// overrides the config file's `dtype`. Under bf16 the optimiser keeps fp32 master weights
    /// and gradient sums.
    #[arg(long)]
    dtype: Option<Precision>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<u32>,
    /// Examples (pairs) per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches whose gradients make one optimiser step.
    #[arg(long)]
    accumulation_steps: Option<usize>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Seeds the order of the examples.
    #[arg(long)]
    seed: Option<u64>,
    /// Optimiser steps between checkpoints (a killed run resumes from the last).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Prompt plus answer tokens kept.
    #[arg(long)]
    max_length: Option<usize>,
    /// Prompt tokens kept (the prompt's start is cut beyond).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Use prompts as they are, without the chat template.
    #[arg(long)]
    raw_prompts: bool,
}

impl Common {
    fn apply(&self, train: &mut LoopConfig, encode: &mut prefloop_train::EncodeConfig) {
        set(&mut train.optim.lr, self.lr);
        set(&mut train.epochs, self.epochs);
        set(&mut train.batch_size, self.batch_size);
        set(&mut train.accumulation_steps, self.accumulation_steps);
        set(&mut train.seed, self.seed);
        set(&mut train.checkpoint_every, self.checkpoint_every);
        if self.max_steps.is_some() {
            train.max_steps = self.max_steps;
        }
        set(&mut encode.max_length, self.max_length);
        set(&mut encode.max_prompt_tokens, self.max_prompt_tokens);
        encode.raw_prompts |= self.raw_prompts;
    }

    /// Loads the starting model in the flag's dtype, else the config file's.
    fn load_model(&self, file_dtype: Precision) -> Result<Model> {
        let precision = self.dtype.unwrap_or(file_dtype);
        let model = Model::load(self.model.as_deref(), best_device(), precision)?;
        tracing::info!(model = %model.source.display(), device = ?model.vs.device(), kind = ?model.kind(), "training");
        Ok(model)
    }
}

fn set<T: Copy>(target: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *target = v;
    }
}

/// The trainer's config from a TOML file (its defaults without one), and the file's `dtype`:
/// the precision the command loads the model in, which is the command's business, not the
/// trainer's.
fn read_config<C: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
) -> Result<(C, Precision)> {
    from_table(read_table(path)?, path)
}

/// The TOML table of a config file (empty without one).
fn read_table(path: Option<&Path>) -> Result<toml::Table> {
    let Some(path) = path else {
        return Ok(toml::Table::new());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: invalid trainer config", path.display()))
}

/// A trainer's config and `dtype` from a config file's `table` (the defaults where empty).
fn from_table<C: DeserializeOwned + Serialize + Default>(
    mut table: toml::Table,
    path: Option<&Path>,
) -> Result<(C, Precision)> {
    if table.is_empty() {
        return Ok((C::default(), Precision::Auto));
    }
    let invalid = || format!("{}: invalid trainer config", display(path));
    let dtype = match table.remove("dtype") {
        Some(value) => value.try_into().with_context(invalid)?,
        None => Precision::Auto,
    };
    let given = table.clone();
    let config: C = table.try_into().with_context(invalid)?;
    let unknown = unknown_keys(&given, &toml::Table::try_from(&config)?);
    if !unknown.is_empty() {
        anyhow::bail!("{}: unknown field(s) {}", invalid(), unknown.join(", "));
    }
    Ok((config, dtype))
}

/// A config file's path as shown in errors.
fn display(path: Option<&Path>) -> String {
    path.map_or_else(String::new, |p| p.display().to_string())
}

/// A progress bar over optimiser steps showing the loss and throughput.
fn progress() -> (ProgressBar, impl FnMut(&StepRecord, u64)) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let handle = bar.clone();
    let on_step = move |record: &StepRecord, total: u64| {
        handle.set_length(total);
        handle.set_position(record.step);
        let loss = record.metrics.get("loss").copied().unwrap_or(f64::NAN);
        handle.set_message(format!("loss {loss:.4} · {:.0} tok/s", record.tokens_per_s));
    };
    (bar, on_step)
}

/// One line per metric of the last step, for the terminal.
fn summarise(records: &[StepRecord], saved: &Path) {
    if let Some(last) = records.last() {
        let metrics: Vec<String> = last
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        println!("step {}: {}", last.step, metrics.join(", "));
    } else {
        println!("nothing to do: already trained");
    }
    println!("saved {}", saved.display());
}

pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Sft { data, lora, common } => {
            let (mut config, dtype): (SftConfig, _) = read_config(common.config.as_deref())?;
            common.apply(&mut config.train, &mut config.encode);
            lora.apply(&mut config.lora);
            let model = common.load_model(dtype)?;
            let model = lora.attach(model, config.lora.as_ref(), config.train.seed)?;
            let (bar, on_step) = progress();
            let records = train_sft(&model, data, &config, &common.out, on_step)?;
            bar.finish();
            summarise(&records, &common.out.join(POLICY_DIR));
        }
        Command::Rm {
            pairs,
            eval_fraction,
            lora,
            common,
        } => {
            let (mut config, dtype): (RewardConfig, _) = read_config(common.config.as_deref())?;
            common.apply(&mut config.train, &mut config.encode);
            if let Some(f) = eval_fraction {
                config.eval_fraction = *f;
            }
            lora.apply(&mut config.lora);
            let model = with_lora(
                common.load_model(dtype)?,
                config.lora.as_ref(),
                config.train.seed,
            )?;
            let rm = RewardModel::new(model)?;
            let (bar, on_step) = progress();
            let (records, report) = train_reward_model(&rm, pairs, &config, &common.out, on_step)?;
            bar.finish();
            if let Some(report) = report {
                println!(
                    "held-out pairs: {}; accuracy {:.3} → {:.3}, margin {:.3} → {:.3}",
                    report.after.pairs,
                    report.before.accuracy,
                    report.after.accuracy,
                    report.before.margin,
                    report.after.margin
                );
            }
            summarise(&records, &common.out.join(REWARD_MODEL_DIR));
        }
        Command::Dpo {
            pairs,
            beta,
            loss,
            sft_weight,
            lora,
            common,
        } => {
            let (mut config, dtype): (DpoConfig, _) = read_config(common.config.as_deref())?;
            common.apply(&mut config.train, &mut config.encode);
            lora.apply(&mut config.lora);
            if let Some(b) = beta {
                config.beta = *b;
            }
            if let Some(l) = loss {
                config.loss = *l;
            }
            if let Some(w) = sft_weight {
                config.sft_weight = *w;
            }
            let model = common.load_model(dtype)?;
            let model = lora.attach(model, config.lora.as_ref(), config.train.seed)?;
            let (bar, on_step) = progress();
            let records = train_dpo(&model, pairs, &config, &common.out, on_step)?;
            bar.finish();
            summarise(&records, &common.out.join(POLICY_DIR));
        }
        Command::Ppo { online, lora } => {
            let (mut config, precision) =
                online.config(|c: &mut PpoConfig| (&mut c.online, &mut c.rollout_batch_size))?;
            lora.apply(&mut config.online.lora);
            let mut scoring = online.scoring(precision, config.online.encode.clone())?;
            let prompts = std::mem::take(&mut scoring.prompts);
            let models =
                PpoModels::load(online.model.as_deref(), best_device(), precision, &config)?;
            let mut reward = |iteration: u64, r: &[Rollout]| scoring.reward(iteration, r);
            let (bar, on_iteration) = iteration_progress(config.online.iterations);
            let records = train_ppo(
                &models,
                &prompts,
                &mut reward,
                &config,
                &online.out,
                on_iteration,
            )?;
            bar.finish();
            let keys = ["reward/mean", KL_TO_REFERENCE, "policy_loss", "value_loss"];
            summarise_iterations(&records, &keys, &online.out.join(POLICY_DIR));
        }
        Command::Grpo {
            online,
            estimator,
            group_size,
            lora,
        } => {
            let (mut config, precision) =
                online.config(|c: &mut GroupConfig| (&mut c.online, &mut c.rollout_batch_size))?;
            set(&mut config.group_size, *group_size);
            lora.apply(&mut config.online.lora);
            let mut scoring = online.scoring(precision, config.online.encode.clone())?;
            let prompts = std::mem::take(&mut scoring.prompts);
            let policy = config.load_policy(online.model.as_deref(), best_device(), precision)?;
            let mut reward = |iteration: u64, r: &[Rollout]| scoring.reward(iteration, r);
            let (bar, on_iteration) = iteration_progress(config.online.iterations);
            let records = train_group(
                &policy,
                &prompts,
                *estimator,
                &mut reward,
                &mut |_, _, _| Ok(()),
                &config,
                &online.out,
                on_iteration,
            )?;
            bar.finish();
            let keys = [
                "reward/mean",
                KL_TO_REFERENCE,
                "policy_loss",
                "groups/dropped_fraction",
            ];
            summarise_iterations(&records, &keys, &online.out.join(POLICY_DIR));
        }
    }
    Ok(())
}
