//! What a run's rounds sample from and score against: the problems (imported into the run
//! where the config names a dataset) or the prompts, each problem by id for the tests, each
//! prompt row's fields for a reward program; held-out prompts that are also training prompts
//! are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prefloop_core::Problem;
use prefloop_data::{DatasetKind, ImportOptions, Manifest};

use crate::config::RunConfig;
use crate::error::{PipelineError, Result};
use crate::generate::PromptRow;
use crate::prompt_source::{is_growing, read_prompt_source};
use crate::run_dir::RunDir;
use crate::score::{ProgramFields, read_problems};

/// Where an imported dataset's problems stage lives in the run directory.
pub const PROBLEMS_DIR: &str = "problems";

/// What every round samples from and scores against.
#[derive(Debug)]
pub(crate) struct Inputs {
    /// The problems stage (for the reference fallback of pairs); none for bare prompts.
    pub problems_dir: Option<PathBuf>,
    pub prompts: Vec<PromptRow>,
    pub by_id: HashMap<String, Problem>,
}

impl Inputs {
    pub(crate) fn load(dir: &RunDir, config: &RunConfig) -> Result<Self> {
        if let Some(path) = config.data.prompts.as_deref().filter(|p| is_growing(p)) {
            // Rounds read a growing source as they begin (prompt_source.rs).
            tracing::info!(source = %path.display(), "prompts from a growing source");
            return Ok(Self {
                problems_dir: None,
                prompts: Vec::new(),
                by_id: HashMap::new(),
            });
        }
        if let Some(path) = &config.data.prompts {
            let mut prompts = read_prompt_source(path)?;
            let mut seen = std::collections::HashSet::new();
            prompts.retain(|p| seen.insert(p.problem_id.clone()));
            if let Some(limit) = config.data.limit {
                prompts.truncate(limit);
            }
            return Ok(Self {
                problems_dir: None,
                prompts,
                by_id: HashMap::new(),
            });
        }
        let problems_dir = problems_stage(dir, config)?;
        let problems = select_problems(read_problems(&problems_dir)?, config, &problems_dir)?;
        let prompts = problems
            .iter()
            .map(|p| PromptRow {
                problem_id: p.problem_id.clone(),
                prompt: p.prompt.clone(),
                ..PromptRow::default()
            })
            .collect();
        let by_id = problems
            .into_iter()
            .map(|p| (p.problem_id.clone(), p))
            .collect();
        Ok(Self {
            problems_dir: Some(problems_dir),
            prompts,
            by_id,
        })
    }

    /// Refuses held-out prompts (`eval.prompts`) that are also training prompts, by problem id
    /// or by text: a policy measured on what it trained on says nothing about what it learnt.
    /// (A growing prompts source is read round by round and not checked here.)
    pub(crate) fn check_held_out(&self, config: &RunConfig) -> Result<()> {
        let Some(path) = config.eval.prompts.as_deref() else {
            return Ok(());
        };
        let ids: std::collections::HashSet<&str> =
            self.prompts.iter().map(|p| p.problem_id.as_str()).collect();
        let texts: std::collections::HashSet<&str> =
            self.prompts.iter().map(|p| p.prompt.as_str()).collect();
        let overlap: Vec<String> = crate::generate::read_prompts(path)?
            .into_iter()
            .filter(|p| ids.contains(p.problem_id.as_str()) || texts.contains(p.prompt.as_str()))
            .map(|p| p.problem_id)
            .collect();
        if overlap.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = overlap.iter().take(5).map(String::as_str).collect();
        Err(PipelineError::Config {
            path: path.to_owned(),
            message: format!(
                "{} held-out prompt(s) are also training prompts (same problem_id or text): {}{}",
                overlap.len(),
                shown.join(", "),
                if overlap.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        })
    }
}

/// The problems stage: the configured one, or the configured dataset imported into the run.
fn problems_stage(dir: &RunDir, config: &RunConfig) -> Result<PathBuf> {
    let Some(kind) = &config.data.import else {
        return Ok(config.data.problems.clone());
    };
    let out = dir.root().join(PROBLEMS_DIR);
    if !Manifest::load(&out)?.is_some_and(|m| m.complete) {
        let kind = DatasetKind::parse(kind).expect("validated with the config");
        let report =
            prefloop_data::import(kind, &config.data.problems, &out, &ImportOptions::default())?;
        tracing::info!(rows = report.rows, problems = %out.display(), "imported");
    }
    Ok(out)
}

/// The first `data.limit` problems, or all; at least one.
fn select_problems(
    mut problems: Vec<Problem>,
    config: &RunConfig,
    from: &Path,
) -> Result<Vec<Problem>> {
    if let Some(limit) = config.data.limit {
        problems.truncate(limit);
    }
    if problems.is_empty() {
        return Err(PipelineError::Data {
            path: from.to_owned(),
            message: "no problems to sample from".into(),
        });
    }
    Ok(problems)
}

/// Each prompt row's fields by problem id, for a reward program.
pub(crate) fn program_fields(prompts: &[PromptRow]) -> ProgramFields {
    prompts
        .iter()
        .map(|p| (p.problem_id.clone(), p.fields.clone()))
        .collect()
}
