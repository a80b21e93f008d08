//! The run config (TOML): every field has a documented default, unknown fields are errors,
//! and relative paths are taken from the config file's directory, so a config works from any
//! working directory and its frozen copy in the run directory stands on its own.

use std::path::{Path, PathBuf};

use prefloop_model::Precision;
use prefloop_train::{DpoConfig, EncodeConfig, Estimator, GroupConfig, OnlineConfig, PpoConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// How the next policy is trained. Default `dpo_iter`.
    pub algorithm: Algorithm,
    /// Training rounds; for PPO, iterations (one rollout batch and its update each).
    /// Default 2.
    pub rounds: u32,
    /// After the last round, generate and score once more with the final policy, so its
    /// reward and pass@k are measured like every earlier policy's. Default true.
    pub final_generation: bool,
    /// DPO-Iter: measure KL(π_k ‖ π_{k-1}) on each round's samples (the metric
    /// `kl_to_previous`), which loads the previous round's policy and runs it over every sample
    /// of the round. Turn it off where `eval.kl_to_start` on held-out prompts is the KL wanted.
    /// Default true.
    pub kl_to_previous: bool,
    /// The starting policy: a GGUF file or a Hugging Face directory. Default: the embedded
    /// SmolLM2-135M-Instruct.
    pub model: Option<PathBuf>,
    /// Precision of every model the run loads (policy, reference, critic, reward model):
    /// `auto` (bf16 on a CUDA GPU, fp32 on the CPU), `bf16` or `fp32`. Trainers keep fp32
    /// master weights and gradient sums under bf16. Default auto.
    pub dtype: Precision,
    pub data: DataConfig,
    pub generate: GenerateConfig,
    pub score: ScoreConfig,
    /// Held-out prompts the rounds' policies are measured on (not trained on).
    pub eval: EvalConfig,
    pub pairs: PairsConfig,
    /// The DPO update of each round (β, loss, optimiser, epochs…), as `prefloop train dpo`
    /// takes it. Defaults: the paper's (β 0.1, lr 1e-6, 1 epoch).
    pub dpo: DpoConfig,
    /// PPO (`algorithm = "ppo"`), as `prefloop train ppo` takes it, with the paper's tricks
    /// as switches. `rounds` sets the iterations; rollouts are sampled with `ppo`'s own
    /// settings (rollout_batch_size, max_new_tokens, top_k…), not `generate`'s, which only
    /// the final generation uses.
    pub ppo: PpoConfig,
    /// The group estimators (`algorithm = "grpo" | "rloo" | "reinforce_pp"`), as `prefloop
    /// train grpo` takes them. `rounds` sets the iterations; each round's samples are the
    /// iteration's rollouts (`group_size` per problem, more where dynamic sampling drew
    /// further problems) and its scores theirs.
    pub group: GroupConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::DpoIter,
            rounds: 2,
            final_generation: true,
            kl_to_previous: true,
            model: None,
            dtype: Precision::Auto,
            data: DataConfig::default(),
            generate: GenerateConfig::default(),
            score: ScoreConfig::default(),
            eval: EvalConfig::default(),
            pairs: PairsConfig::default(),
            dpo: DpoConfig::default(),
            ppo: PpoConfig::default(),
            group: GroupConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// DPO-Iter (DESIGN §4): each round samples from the current policy, scores, pairs best
    /// against worst, and trains with DPO against the policy the round started from.
    DpoIter,
    /// PPO (DESIGN §4): each round is one PPO iteration — rollouts from the actor, written
    /// as the round's samples and scored into its scores, then the PPO epochs over them.
    Ppo,
    /// GRPO (DESIGN §4): each round is one iteration of the group estimator — `group_size`
    /// samples per problem, advantages from each group, no critic. Dr. GRPO is this with
    /// `group.scale_rewards = false` and `group.loss_aggregation = "seq_mean_token_sum_norm"`.
    Grpo,
    /// RLOO: as GRPO, with the leave-one-out baseline.
    Rloo,
    /// REINFORCE++-baseline: as GRPO, with the group mean subtracted and the batch whitened.
    ReinforcePp,
}

impl Algorithm {
    /// The group estimator this algorithm runs, if it is one.
    pub fn estimator(self) -> Option<Estimator> {
        match self {
            Self::DpoIter | Self::Ppo => None,
            Self::Grpo => Some(Estimator::Grpo),
            Self::Rloo => Some(Estimator::Rloo),
            Self::ReinforcePp => Some(Estimator::ReinforcePp),
        }
    }
}

/// The problems (or prompts) every round samples from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A problems stage (`prefloop import …`), or with `import` a dataset file. Required
    /// unless `prompts` is given.
    pub problems: PathBuf,
    /// Prompts without tests, for reward-model scoring: a JSONL or Parquet file, or any
    /// stage with a `prompt` column (a pairs stage: HH-RLHF's prompts). Prompts sharing a
    /// `problem_id` are sampled once. A directory of such files (not itself a stage) or a glob
    /// (`drops/*.jsonl`) is a source that grows: each round samples the files no earlier
    /// round used (by content), in name order (DPO-Iter). Default: none, the problems'
    /// prompts.
    pub prompts: Option<PathBuf>,
    /// Import `problems` first, as this dataset kind (`apps`, `codecontests`, `humaneval`,
    /// `mbpp`), into `<run>/problems`. Default: none, `problems` is a stage.
    pub import: Option<String>,
    /// Only the first this many problems. Default: all.
    pub limit: Option<usize>,
    /// Each round samples this many of the prompts, disjoint across rounds until the set is
    /// used up, then from a new shuffle (seeded by `generate.seed`), recorded per round
    /// (DPO-Iter). Default: every prompt every round.
    pub prompts_per_round: Option<usize>,
    /// What a round does when a growing source holds no file an earlier round has not used:
    /// `reuse` samples every file again, `stop` ends the run there (exit 0) until a new file
    /// arrives. Default reuse.
    pub when_exhausted: WhenExhausted,
}

/// Held-out evaluation (eval.rs): every `every`-th round's policy (DPO-Iter: the policy the
/// round samples from; PPO and the group estimators: the actor before the round's update), and
/// the final generation's, also samples these prompts and scores them with the run's scorer,
/// into `round-NNNN/eval/{samples,scores}`; the round's metrics gain `eval/reward/mean`,
/// `eval/reward/std` and `eval/kl_to_start`. Nothing sampled here is paired or trained on.
/// Sampled with `generate`'s settings, whatever the algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// A JSONL or Parquet prompts file (its rows' other fields go to a reward program).
    /// Default: none, no evaluation.
    pub prompts: Option<PathBuf>,
    /// Samples per prompt. Default: `generate.n`.
    pub n: Option<u32>,
    /// Rounds 0, every, 2 × every… are evaluated (and the final generation). Default 1.
    pub every: u32,
    /// Also measure KL(π_round ‖ π_start) on the held-out samples (the k1 estimate, summed
    /// over a completion's tokens, averaged over samples): loads the starting policy for each
    /// evaluation. Default true.
    pub kl_to_start: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            prompts: None,
            n: None,
            every: 1,
            kl_to_start: true,
        }
    }
}

/// See [`DataConfig::when_exhausted`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenExhausted {
    #[default]
    Reuse,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Samples per problem and round. Default 4.
    pub n: u32,
    /// Default 256.
    pub max_new_tokens: usize,
    /// Default 1.0 (the paper's).
    pub temperature: f64,
    /// 0 for no limit. Default 200 (the paper's).
    pub top_k: i64,
    /// Default 1.0.
    pub top_p: f64,
    /// The completion is cut before the first of these. Default none.
    pub stop: Vec<String>,
    /// Rows generated together. Default 32.
    pub batch_size: usize,
    /// Rows per shard: a killed run loses at most one shard's worth of samples. Default 4096.
    pub shard_rows: u64,
    /// Mixed with the round number into every sample's seed. Default 0.
    pub seed: u64,
    /// Feed prompts as they are, without the chat template. Must equal the trainer's
    /// `encode.raw_prompts` (`dpo`, `ppo` or `group`): a run samples and trains on prompts in
    /// one form, cut to the trainer's `encode.max_prompt_tokens`. Default false.
    pub raw_prompts: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            n: 4,
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: 200,
            top_p: 1.0,
            stop: Vec::new(),
            batch_size: 32,
            shard_rows: 4096,
            seed: 0,
            raw_prompts: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// `tests` runs each completion against its problem's unit tests in the sandbox; `rm`
    /// scores it with `reward_model`; `program` runs the reward program `program` on it in
    /// the sandbox. A list (`["tests", "program"]`) scores with the weighted sum of each
    /// (TRL's `reward_funcs`), e.g. tests plus a length penalty program. Default tests.
    pub scorer: ScorerList,
    /// The weight of each scorer of the list, in its order (TRL's `reward_weights`). Default:
    /// 1 each.
    pub weights: Vec<f64>,
    /// A reward model directory (`prefloop train rm`), for `scorer = "rm"`.
    pub reward_model: Option<PathBuf>,
    /// A Python file defining `reward(prompt, completion, **fields) -> float`, for `scorer =
    /// "program"`: run in the sandbox, one fresh instance per sample, with the prompt row's
    /// other fields (JSONL keys, Parquet columns) by name. Read once per process; its SHA-256
    /// is recorded in the run (a resumed run refuses a changed program) and its metrics.
    pub program: Option<PathBuf>,
    /// Program: the time limit per sample, in milliseconds. Default 10000.
    pub program_time_limit_ms: u64,
    /// Program: the reward of a sample whose program raised, ran out of time or memory, or
    /// returned something other than a finite number (its verdict says which). Default 0.
    pub failure_reward: f32,
    /// Sequences per reward-model forward pass. Default 16.
    pub rm_batch_size: usize,
    /// Tests: reward 10 × passed / total instead of 10 only when all pass. Default false.
    pub partial_credit: bool,
    /// Tests: no test gets less time than this. Default 2000.
    pub time_floor_ms: u64,
    /// Tests: multiplies a problem's own time limit. Default 6.
    pub time_scale: f64,
    /// Tests: time problems without a limit from their reference solution. Default false.
    pub calibrate: bool,
    /// Tests: each test of a reference solution being timed gets this long (a ceiling of its
    /// own, so a slow reference is still measured). Default 120000.
    pub calibration_ceiling_ms: u64,
    /// Tests and programs: fuel per test or sample (about one unit per wasm instruction). A run that uses it up is
    /// TLE however loaded the machine is, so a round's scores are reproducible; the time
    /// limit stays as a backstop. `prefloop sandbox run --fuel` prints what a program uses.
    /// Default none (time limits alone).
    pub fuel: Option<u64>,
    /// Tests: samples scored per batch (written together). Default 256.
    pub batch_size: usize,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        let time = prefloop_sandbox::TimePolicy::default();
        Self {
            scorer: ScorerList::One(ScorerKind::Tests),
            weights: Vec::new(),
            reward_model: None,
            program: None,
            program_time_limit_ms: prefloop_sandbox::Limits::default().time.as_millis() as u64,
            failure_reward: 0.0,
            rm_batch_size: 16,
            partial_credit: false,
            time_floor_ms: time.floor.as_millis() as u64,
            time_scale: time.problem_scale,
            calibrate: false,
            calibration_ceiling_ms: time.calibration_ceiling.as_millis() as u64,
            fuel: None,
            batch_size: 256,
        }
    }
}

/// The dataset kinds `data.import` takes: those that import to a problems stage.
const PROBLEM_DATASETS: &[&str] = &["apps", "codecontests", "humaneval", "mbpp"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerKind {
    Tests,
    Rm,
    Program,
}

impl ScorerKind {
    /// Its name in configs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tests => "tests",
            Self::Rm => "rm",
            Self::Program => "program",
        }
    }
}

/// `scorer`: one scorer, or several whose rewards are summed with `weights`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScorerList {
    One(ScorerKind),
    Many(Vec<ScorerKind>),
}

impl ScoreConfig {
    /// Each scorer with its weight, in the config's order.
    pub fn parts(&self) -> Vec<(ScorerKind, f64)> {
        let kinds = match &self.scorer {
            ScorerList::One(kind) => vec![*kind],
            ScorerList::Many(kinds) => kinds.clone(),
        };
        let weight = |i: usize| self.weights.get(i).copied().unwrap_or(1.0);
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, weight(i)))
            .collect()
    }

    /// Whether `kind` is one of the scorers.
    pub fn uses(&self, kind: ScorerKind) -> bool {
        self.parts().iter().any(|(k, _)| *k == kind)
    }

    /// Every setting checked; an error names the field.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        self.check_parts()?;
        let required = [
            (
                ScorerKind::Rm,
                self.reward_model.is_none(),
                "score.reward_model",
            ),
            (ScorerKind::Program, self.program.is_none(), "score.program"),
        ];
        for (kind, missing, field) in required {
            if self.uses(kind) && missing {
                let message = format!("required when scorer = \"{}\"", kind.name());
                return Err((field, message));
            }
        }
        if self.batch_size == 0 || self.rm_batch_size == 0 {
            return Err(("score", "batch sizes must be at least 1".into()));
        }
        if self.fuel == Some(0) {
            return Err(("score.fuel", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The list and its weights checked.
    fn check_parts(&self) -> std::result::Result<(), (&'static str, String)> {
        let parts = self.parts();
        if parts.is_empty() {
            return Err(("score.scorer", "names no scorer".into()));
        }
        let mut kinds: Vec<ScorerKind> = parts.iter().map(|(k, _)| *k).collect();
        kinds.sort();
        kinds.dedup();
        if kinds.len() < parts.len() {
            return Err(("score.scorer", "names a scorer twice".into()));
        }
        if !self.weights.is_empty() && self.weights.len() != parts.len() {
            let message = format!(
                "{} weights for {} scorers: give one per scorer, or none",
                self.weights.len(),
                parts.len()
            );
            return Err(("score.weights", message));
        }
        if self.weights.iter().any(|w| !w.is_finite()) {
            return Err(("score.weights", "must be finite numbers".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsConfig {
    /// Keep a pair only if its margin is at least this (ties are always dropped). Default 0.
    pub min_margin: f32,
    /// Where tests scored every sample of a problem and none passed, its reference solution
    /// is the chosen answer (the paper's fix for code). Default true.
    pub reference_fallback: bool,
    /// Each DPO update trains on its round's pairs and those of this many rounds before it
    /// (a stabiliser for nightly rounds). Default 0.
    pub replay_rounds: u32,
    /// Drop a pair either of whose answers was cut at `generate.max_new_tokens`. Kept (the
    /// default), a cut answer is trained on as it was sampled, without an end-of-sequence
    /// token, so DPO never teaches stopping mid-sentence. Default false.
    pub drop_truncated: bool,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            min_margin: 0.0,
            reference_fallback: true,
            replay_rounds: 0,
            drop_truncated: false,
        }
    }
}

/// Sets `key=value` (a dotted key, a TOML value or a bare string) in `table`, making the
/// tables on the way.
fn set_dotted(table: &mut toml::Table, item: &str) -> std::result::Result<(), String> {
    let (key, value) = item
        .split_once('=')
        .ok_or("expected KEY=VALUE, e.g. generate.seed=1")?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut parsed) => parsed.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(value.to_owned()),
    };
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or("empty key")?;
    let mut at = table;
    for part in parts {
        let next = at
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    at.insert(last.to_owned(), value);
    Ok(())
}

/// The dotted paths of the keys of `given` (a config file's table) that `read` (the config as
/// read, written back out) lacks: keys nothing took. PPO's and the group estimators' configs
/// share their settings through `#[serde(flatten)]`, which serde's `deny_unknown_fields` does
/// not take; this is what refuses a misspelt key there, as everywhere else.
pub fn unknown_keys(given: &toml::Table, read: &toml::Table) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut pending = vec![(String::new(), given, read)];
    while let Some((prefix, given, read)) = pending.pop() {
        for (key, value) in given {
            let path = match prefix.is_empty() {
                true => key.clone(),
                false => format!("{prefix}.{key}"),
            };
            match (value, read.get(key)) {
                (_, None) => unknown.push(path),
                (toml::Value::Table(given), Some(toml::Value::Table(read))) => {
                    pending.push((path, given, read));
                }
                _ => {}
            }
        }
    }
    unknown.sort();
    unknown
}

/// The directory a config's relative paths start from: the file's own (`.` for a bare file
/// name, whose parent is the empty path).
fn config_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

impl RunConfig {
    /// Reads `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Reads `path` with `overrides` applied, each `dotted.key=VALUE` (a TOML value; a bare
    /// word is a string), as `prefloop run --set` takes them: one config file, many variants
    /// (seeds, learning rates), each frozen in full into its run directory.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let fail = |message: String| PipelineError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(PipelineError::io(path))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        for item in overrides {
            set_dotted(&mut table, item).map_err(|e| fail(format!("--set {item}: {e}")))?;
        }
        let given = table.clone();
        let mut config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| fail(e.to_string()))?;
        let read = toml::Table::try_from(&config).expect("a config serialises");
        let unknown = unknown_keys(&given, &read);
        if !unknown.is_empty() {
            return Err(fail(format!("unknown field(s) {}", unknown.join(", "))));
        }
        let base = config_dir(path);
        let base = std::path::absolute(base).map_err(PipelineError::io(base))?;
        config.resolve_paths(&base);
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data.problems);
        if let Some(prompts) = &mut self.data.prompts {
            resolve(prompts);
        }
        if let Some(model) = &mut self.model {
            resolve(model);
        }
        if let Some(rm) = &mut self.score.reward_model {
            resolve(rm);
        }
        if let Some(program) = &mut self.score.program {
            resolve(program);
        }
        if let Some(prompts) = &mut self.eval.prompts {
            resolve(prompts);
        }
    }

    /// Checks what serde cannot: required fields and ranges. Errors name the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |field: &str, message: &str| PipelineError::Config {
            path: path.to_owned(),
            message: format!("`{field}`: {message}"),
        };
        match (
            &self.data.prompts,
            self.data.problems.as_os_str().is_empty(),
        ) {
            (None, true) => {
                return Err(fail(
                    "data.problems",
                    "required: a problems stage or dataset (or data.prompts)",
                ));
            }
            (Some(_), false) => {
                return Err(fail("data.prompts", "give either problems or prompts"));
            }
            (Some(_), true) if self.score.uses(ScorerKind::Tests) => {
                return Err(fail(
                    "data.prompts",
                    "prompts have no tests: score them with scorer = \"rm\" or \"program\"",
                ));
            }
            _ => {}
        }
        if let Some(kind) = &self.data.import
            && !PROBLEM_DATASETS.contains(&kind.as_str())
        {
            let message = format!("unknown; one of {}", PROBLEM_DATASETS.join(", "));
            return Err(fail("data.import", &message));
        }
        if self.data.limit == Some(0) {
            return Err(fail("data.limit", "must be at least 1"));
        }
        if self.data.prompts_per_round == Some(0) {
            return Err(fail("data.prompts_per_round", "must be at least 1"));
        }
        if crate::prompt_source::per_round(self) && self.algorithm != Algorithm::DpoIter {
            return Err(fail(
                "data",
                "prompts chosen round by round (prompts_per_round, a growing prompts source) \
                 are for DPO-Iter; the online algorithms draw their own prompts each iteration",
            ));
        }
        if self.generate.n == 0 || self.generate.batch_size == 0 || self.generate.shard_rows == 0 {
            return Err(fail(
                "generate",
                "n, batch_size and shard_rows must be at least 1",
            ));
        }
        if let Err((field, message)) = self.score.check() {
            return Err(fail(field, &message));
        }
        if self.eval.prompts.is_some() && self.score.uses(ScorerKind::Tests) {
            return Err(fail(
                "eval.prompts",
                "held-out prompts carry no tests: evaluate with scorer = \"program\" or \"rm\"",
            ));
        }
        if self.eval.n == Some(0) {
            return Err(fail("eval.n", "must be at least 1"));
        }
        if self.eval.every == 0 {
            return Err(fail("eval.every", "must be at least 1"));
        }
        let trainer = match self.algorithm {
            Algorithm::DpoIter => "dpo",
            Algorithm::Ppo => "ppo",
            _ => "group",
        };
        if self.generate.raw_prompts != self.score_encoding().raw_prompts {
            return Err(fail(
                "generate.raw_prompts",
                &format!(
                    "is {} but `{trainer}.encode.raw_prompts` is {}: prompts would be sampled \
                     and trained on in different forms; set both alike",
                    self.generate.raw_prompts,
                    self.score_encoding().raw_prompts
                ),
            ));
        }
        // Checked now, not after hours of generation and scoring.
        match self.algorithm {
            Algorithm::DpoIter => self.dpo.validate().map_err(|e| fail("dpo", &e.to_string())),
            Algorithm::Ppo => {
                let validated = self.ppo_config().validate();
                self.one_iteration_a_round("ppo", &self.ppo.online, validated)
                    .map_err(|(field, e)| fail(field, &e))
            }
            Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp => {
                let validated = self.group_config().validate();
                self.one_iteration_a_round("group", &self.group.online, validated)
                    .map_err(|(field, e)| fail(field, &e))
            }
        }
    }

    /// An online trainer's `section` runs one iteration per round: its own `iterations` is
    /// refused unless it says so; then its config's own checks (`validated`).
    fn one_iteration_a_round(
        &self,
        section: &'static str,
        online: &OnlineConfig,
        validated: prefloop_train::Result<()>,
    ) -> std::result::Result<(), (&'static str, String)> {
        let iterations = online.iterations;
        if iterations != u64::from(self.rounds) && iterations != OnlineConfig::default().iterations
        {
            let field = match section {
                "ppo" => "ppo.iterations",
                _ => "group.iterations",
            };
            let message = "an online run does one iteration per round: set `rounds` instead";
            return Err((field, message.into()));
        }
        validated.map_err(|e| (section, e.to_string()))
    }

    /// The group estimator's settings with `rounds` as the iterations.
    pub fn group_config(&self) -> GroupConfig {
        let mut config = self.group.clone();
        config.online.iterations = u64::from(self.rounds);
        config
    }

    /// The PPO settings with `rounds` as the iterations.
    pub fn ppo_config(&self) -> PpoConfig {
        let mut config = self.ppo.clone();
        config.online.iterations = u64::from(self.rounds);
        config
    }

    /// How the run encodes prompts and answers: as the trainer does. Generation encodes its
    /// prompts with it (so a policy trains on the prompt tokens it sampled from), and a reward
    /// model sees prompts and answers through it.
    pub fn score_encoding(&self) -> EncodeConfig {
        match self.algorithm {
            Algorithm::DpoIter => self.dpo.encode.clone(),
            Algorithm::Ppo => self.ppo.online.encode.clone(),
            Algorithm::Grpo | Algorithm::Rloo | Algorithm::ReinforcePp => {
                self.group.online.encode.clone()
            }
        }
    }

    /// The config as frozen into a run directory: TOML with every field spelled out.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config serialises")
    }

    /// Hex SHA-256 of the frozen TOML: what a resumed run must still match.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.to_toml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_scorer_list_takes_one_weight_each_and_names_each_scorer_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("r.py"),
            "def reward(prompt, completion): return 0\n",
        )
        .unwrap();
        let load = |score: &str| {
            let text = format!(
                "rounds = 1\n[data]\nproblems = \"p\"\n[score]\nprogram = \"r.py\"\n{score}\n"
            );
            RunConfig::load(&write(dir.path(), &text)).map_err(|e| e.to_string())
        };
        let config = load("scorer = [\"tests\", \"program\"]\nweights = [1.0, 0.1]").unwrap();
        let parts = config.score.parts();
        assert_eq!(
            parts,
            [(ScorerKind::Tests, 1.0), (ScorerKind::Program, 0.1)]
        );
        assert!(config.score.uses(ScorerKind::Program) && !config.score.uses(ScorerKind::Rm));
        // No weights: 1 each; one scorer as a string, as before lists.
        let config = load("scorer = [\"tests\", \"program\"]").unwrap();
        assert_eq!(config.score.parts()[1], (ScorerKind::Program, 1.0));
        let config = load("scorer = \"program\"").unwrap();
        assert_eq!(config.score.parts(), [(ScorerKind::Program, 1.0)]);
        let refused = |score: &str, field: &str| {
            let error = load(score).unwrap_err();
            assert!(error.contains(field), "{score}: {error}");
        };
        refused(
            "scorer = [\"tests\", \"program\"]\nweights = [1.0]",
            "score.weights",
        );
        refused("scorer = [\"tests\", \"tests\"]", "score.scorer");
        refused("scorer = []", "score.scorer");
        refused("scorer = [\"tests\", \"rm\"]", "score.reward_model");
    }

    #[test]
    fn a_config_named_without_a_directory_resolves_against_the_current_one() {
        // `prefloop run --config exp.toml` failed: "cannot make an empty path absolute".
        assert_eq!(config_dir(Path::new("exp.toml")), Path::new("."));
        assert_eq!(
            config_dir(Path::new("configs/demo.toml")),
            Path::new("configs")
        );
        assert_eq!(config_dir(Path::new("/etc/x.toml")), Path::new("/etc"));
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "rounds = 1\n[data]\nproblems = \"data/humaneval\"\n",
        );
        let config = RunConfig::load(&path).unwrap();
        assert_eq!(config.data.problems, dir.path().join("data/humaneval"));
        assert_eq!(config.generate, GenerateConfig::default());
        assert_eq!(config.dpo.beta, 0.1);
    }

    /// The demo sampled raw prompts and trained DPO on the chat template's: a run whose
    /// generation and trainer encode prompts in different forms is refused, naming both.
    #[test]
    fn prompts_sampled_raw_but_trained_templated_are_refused_naming_both_fields() {
        let dir = tempfile::tempdir().unwrap();
        for (trainer, algorithm) in [("dpo", "dpo_iter"), ("ppo", "ppo"), ("group", "grpo")] {
            let text = format!(
                "algorithm = \"{algorithm}\"\n[data]\nproblems = \"/p\"\n\
                 [generate]\nraw_prompts = true\n"
            );
            let path = write(dir.path(), &text);
            let e = RunConfig::load(&path).unwrap_err().to_string();
            assert!(
                e.contains("generate.raw_prompts")
                    && e.contains(&format!("{trainer}.encode.raw_prompts")),
                "{e}"
            );
            let agreed = format!("{text}[{trainer}.encode]\nraw_prompts = true\n");
            RunConfig::load(&write(dir.path(), &agreed)).unwrap();
        }
    }

    #[test]
    fn the_frozen_toml_reads_back_to_the_same_config_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "dtype = \"bf16\"\n[data]\nproblems = \"/p\"\nlimit = 3\n[dpo]\nbeta = 0.2\n\
             [ppo]\ntruncated = \"score\"\n",
        );
        let config = RunConfig::load(&path).unwrap();
        assert_eq!(config.dtype, Precision::Bf16);
        let frozen = write(dir.path(), &config.to_toml());
        let again = RunConfig::load(&frozen).unwrap();
        assert_eq!(again, config);
        assert_eq!(again.hash(), config.hash());
    }

    /// `path` with its `..` components applied.
    fn lexical(path: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for part in path.components() {
            match part {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn every_shipped_config_loads() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for dir in [configs.clone(), configs.join("study")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let config = RunConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    // The inputs shipped under configs/ exist (others come from earlier runs).
                    let inputs = [
                        &config.data.prompts,
                        &config.eval.prompts,
                        &config.score.program,
                    ];
                    for input in inputs.into_iter().flatten() {
                        let shipped = lexical(input).starts_with(lexical(&configs));
                        assert!(
                            !shipped || input.exists(),
                            "{}: {}",
                            path.display(),
                            input.display()
                        );
                    }
                    seen += 1;
                }
            }
        }
        assert!(
            seen >= 8,
            "configs/ holds the demo, the code configs and the study's"
        );
    }

    #[test]
    fn set_overrides_dotted_keys_and_its_errors_name_the_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[data]\nproblems = \"/p\"\n[generate]\nn = 4\n");
        let set = |items: &[&str]| {
            let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
            RunConfig::load_with(&path, &items)
        };
        let config = set(&[
            "generate.seed=7",
            "dpo.train.optim.lr=2e-5",
            "algorithm=ppo",
        ])
        .unwrap();
        assert_eq!(config.generate.seed, 7);
        assert_eq!(config.generate.n, 4, "the file's other keys stay");
        assert_eq!(config.dpo.train.optim.lr, 2e-5);
        assert_eq!(config.algorithm, Algorithm::Ppo);
        let err = set(&["generate.sed=1"]).unwrap_err().to_string();
        assert!(err.contains("run.toml") && err.contains("sed"), "{err}");
        // PPO's and the group estimators' shared settings come in through `flatten`: a key
        // nothing took is refused by its path all the same.
        for (key, named) in [
            ("ppo.sed", "ppo.sed"),
            ("group.sed", "group.sed"),
            ("group.lora.rnak", "rnak"),
        ] {
            let err = set(&[&format!("{key}=1")]).unwrap_err().to_string();
            assert!(
                err.contains("run.toml") && err.contains(named),
                "{key}: {err}"
            );
        }
        let config = set(&["ppo.seed=3", "group.max_new_tokens=9"]).unwrap();
        assert_eq!(
            (config.ppo.online.seed, config.group.online.max_new_tokens),
            (3, 9)
        );
        let err = set(&["generate.n.x=1"]).unwrap_err().to_string();
        assert!(
            err.contains("--set generate.n.x=1") && err.contains("`n`"),
            "{err}"
        );
        let err = set(&["seed"]).unwrap_err().to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[data]\nproblems = \"/p\"\nlimt = 3\n");
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("run.toml") && err.contains("limt"), "{err}");
        let path = write(dir.path(), "[generate]\nn = 4\n");
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("data.problems"), "{err}");
        let path = write(dir.path(), "[data]\nproblems = \"/p\"\nimport = \"imdb\"\n");
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("data.import"), "{err}");
        let path = write(
            dir.path(),
            "[data]\nproblems = \"/p\"\n[score]\nscorer = \"rm\"\n",
        );
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("score.reward_model"), "{err}");
        let path = write(
            dir.path(),
            "[data]\nproblems = \"/p\"\n[dpo.encode]\nmax_length = 100\n",
        );
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("`dpo`") && err.contains("max_length"), "{err}");
        let path = write(dir.path(), "dtype = \"fp16\"\n[data]\nproblems = \"/p\"\n");
        let err = RunConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("run.toml") && err.contains("fp16"), "{err}");
    }
}
