//! Scoring samples: each completion becomes a program for its problem, runs against the
//! problem's tests, and gets the paper's reward (10 if every test passes, else 0; partial
//! credit as an option). Programs run in parallel on rayon's pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prefloop_core::{Problem, ProblemSource, Sample, Score, Scorer, Verdict};
use rayon::prelude::*;

use crate::judge::{Compare, JudgeOptions, Judgement, Language, Program, TestStyle};
use crate::runtime::Sandbox;
use crate::{Result, SandboxError};

/// Time limits per test. CPython in wasm runs CPU-heavy code about 6× slower than native, so
/// a problem's own limit (set for native C++ or Python) is scaled, never below a floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimePolicy {
    /// For problems that state no limit and are not calibrated.
    pub default: Duration,
    /// No test gets less than this.
    pub floor: Duration,
    /// Multiplies the problem's own limit.
    pub problem_scale: f64,
    /// Multiplies the reference solution's slowest test, when calibrating.
    pub reference_scale: f64,
    /// Each test of a reference solution gets this long when it is timed: its own ceiling, far
    /// above the per-test limits, so a slow reference is measured rather than cut at the
    /// limit it is about to set.
    pub calibration_ceiling: Duration,
}

impl Default for TimePolicy {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(10),
            floor: Duration::from_secs(2),
            problem_scale: 6.0,
            reference_scale: 4.0,
            calibration_ceiling: Duration::from_secs(120),
        }
    }
}

impl TimePolicy {
    /// The limit for a problem: from its own limit, else from the reference's measured time,
    /// else the default; never below the floor.
    pub fn limit(&self, problem_limit_ms: Option<u32>, reference: Option<Duration>) -> Duration {
        let limit = match (problem_limit_ms, reference) {
            (Some(ms), _) => Duration::from_millis(ms as u64).mul_f64(self.problem_scale),
            (None, Some(time)) => time.mul_f64(self.reference_scale),
            (None, None) => self.default,
        };
        limit.max(self.floor)
    }
}

/// Options of [`score_samples`].
#[derive(Debug, Clone, Default)]
pub struct ScoreOptions {
    /// Memory and output limits, compare mode is chosen per problem, `all_tests`.
    pub judge: JudgeOptions,
    pub time: TimePolicy,
    /// Reward 10 × passed / total instead of 10 only when all pass.
    pub partial_credit: bool,
    /// Run each problem's reference solution first and scale its slowest test into the time
    /// limit of problems that state none.
    pub calibrate: bool,
}

/// What APPS' testing_util puts before every program (solutions rely on it: `List[int]`
/// hints, bare `sqrt`, `Counter`), less numpy, which the sandbox does not have.
const APPS_HEADER: &str = "import sys\nimport time\nimport itertools\n\
from itertools import accumulate, product, permutations, combinations\nimport collections\n\
from collections import Counter, OrderedDict, deque, defaultdict, ChainMap\n\
from functools import lru_cache\nimport math\n\
from math import sqrt, sin, cos, tan, ceil, fabs, floor, gcd, exp, log, log2\n\
import fractions\nfrom typing import List, Tuple\nimport random\nimport heapq\n\
from heapq import *\n";

/// The code in a completion and the language its fence names: the first fenced block
/// (```python, ```cpp, bare ```), else all of it. The language is None where no fence names
/// one (the caller's default, Python, applies).
pub fn extract_program(completion: &str) -> (Option<&str>, String) {
    let Some(open) = completion.find("```") else {
        return (None, completion.to_owned());
    };
    let after = &completion[open + 3..];
    let body_start = after.find('\n').map_or(after.len(), |i| i + 1);
    let tag = after[..body_start].trim();
    let body = &after[body_start..];
    let end = body.find("```").unwrap_or(body.len());
    ((!tag.is_empty()).then_some(tag), body[..end].to_owned())
}

/// The program to run for `code` written for `problem` in `language`, and how its tests are
/// run.
pub fn program_for(problem: &Problem, language: Language, code: &str) -> Program {
    let style = match (&problem.fn_name, problem.source) {
        (Some(entry_point), ProblemSource::HumanEval | ProblemSource::Mbpp) => TestStyle::Check {
            entry_point: entry_point.clone(),
        },
        (Some(fn_name), _) => TestStyle::Call {
            fn_name: fn_name.clone(),
        },
        (None, _) => TestStyle::Stdio,
    };
    // A HumanEval completion often continues the prompt's signature instead of repeating it.
    let source = match &style {
        _ if language != Language::Python => code.to_owned(),
        TestStyle::Check { entry_point } if !code.contains(&format!("def {entry_point}")) => {
            format!("{}{code}", problem.starter_code)
        }
        _ if problem.source == ProblemSource::Apps => format!("{APPS_HEADER}{code}"),
        _ => code.to_owned(),
    };
    Program {
        language,
        source,
        style,
    }
}

/// How a problem's stdout answers are compared: APPS' cascade for APPS, tokens otherwise.
pub fn compare_for(problem: &Problem) -> Compare {
    match problem.source {
        ProblemSource::Apps => Compare::Apps,
        _ => Compare::Tokens,
    }
}

/// The reference solutions' measured times, kept across calls of [`score_samples`] so that
/// each problem's reference runs once however many batches its samples come in.
#[derive(Debug, Default)]
pub struct Calibration {
    /// None where the reference is missing or fails its own tests.
    times: Mutex<HashMap<String, Option<Duration>>>,
}

impl Calibration {
    /// The slowest test of `problem_id`'s reference, if it has been timed and passed.
    pub fn measured(&self, problem_id: &str) -> Option<Duration> {
        let times = self.times.lock().expect("calibration lock");
        times.get(problem_id).copied().flatten()
    }

    /// Problems looked at whose reference is missing, or failed (or outran the ceiling) on
    /// its own tests: they keep the default limit. Sorted.
    pub fn uncalibrated(&self) -> Vec<String> {
        let times = self.times.lock().expect("calibration lock");
        let mut ids: Vec<String> = times
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }
}

/// Scores every sample against its problem's tests. A sample whose problem is unknown is an
/// error (naming it) before anything runs. With `options.calibrate`, problems that state no
/// time limit and are not yet in `calibration` have their reference timed first.
pub fn score_samples(
    sandbox: &Sandbox,
    problems: &HashMap<String, Problem>,
    samples: &[Sample],
    options: &ScoreOptions,
    calibration: &Calibration,
) -> Result<Vec<Score>> {
    if let Some(sample) = samples
        .iter()
        .find(|s| !problems.contains_key(&s.problem_id))
    {
        return Err(SandboxError::UnknownProblem(sample.problem_id.clone()));
    }
    if options.calibrate {
        let measured: Vec<(String, Option<Duration>)> = {
            let known = calibration.times.lock().expect("calibration lock");
            samples
                .iter()
                .map(|s| &problems[&s.problem_id])
                .filter(|p| p.time_limit_ms.is_none() && !known.contains_key(&p.problem_id))
                .map(|p| (p.problem_id.as_str(), p))
                .collect::<HashMap<_, _>>()
        }
        .into_par_iter()
        .map(|(id, problem)| (id.to_owned(), reference_time(sandbox, problem, options)))
        .collect();
        for (id, time) in &measured {
            if time.is_none() {
                tracing::warn!(
                    problem = id,
                    "reference solution missing or failing its tests: the problem keeps the default time limit"
                );
            }
        }
        calibration
            .times
            .lock()
            .expect("calibration lock")
            .extend(measured);
    }
    let times = calibration.times.lock().expect("calibration lock");
    Ok(samples
        .par_iter()
        .map(|sample| {
            let problem = &problems[&sample.problem_id];
            let reference = times.get(&sample.problem_id).copied().flatten();
            score_one(sandbox, problem, sample, reference, options)
        })
        .collect())
}

fn judge_options(
    problem: &Problem,
    reference: Option<Duration>,
    options: &ScoreOptions,
) -> JudgeOptions {
    let mut judge = options.judge.clone();
    judge.compare = compare_for(problem);
    judge.limits.time = options.time.limit(problem.time_limit_ms, reference);
    // A problem's own memory limit was set for native code; CPython in wasm needs more, so
    // it can only raise ours.
    if let Some(bytes) = problem.memory_limit_bytes.filter(|b| *b > 0) {
        judge.limits.memory_bytes = judge.limits.memory_bytes.max(bytes as usize);
    }
    judge
}

/// The reference solution's slowest test, if it passes all of them.
fn reference_time(
    sandbox: &Sandbox,
    problem: &Problem,
    options: &ScoreOptions,
) -> Option<Duration> {
    let reference = problem.reference_solution.as_deref()?;
    let mut judge = judge_options(problem, None, options);
    // Timed under a ceiling of its own: a per-test limit would cut a slow reference short, and
    // its problem would keep the default it was to replace.
    judge.limits.time = options.time.calibration_ceiling;
    judge.all_tests = true;
    let program = program_for(problem, Language::Python, reference);
    let judgement = sandbox.judge(&program, &problem.tests, &judge);
    (judgement.verdict == Verdict::Ok).then(|| {
        judgement
            .tests
            .iter()
            .map(|t| t.wall)
            .max()
            .unwrap_or_default()
    })
}

fn score_one(
    sandbox: &Sandbox,
    problem: &Problem,
    sample: &Sample,
    reference: Option<Duration>,
    options: &ScoreOptions,
) -> Score {
    let (tag, code) = extract_program(&sample.completion);
    let judgement = match tag.map_or(Ok(Language::Python), Language::parse) {
        Ok(language) => sandbox.judge(
            &program_for(problem, language, &code),
            &problem.tests,
            &judge_options(problem, reference, options),
        ),
        // A completion in a language the sandbox does not run cannot compile here.
        Err(_) => Judgement {
            verdict: Verdict::CompileError,
            passed: 0,
            total: problem.tests.len() as u32,
            tests: Vec::new(),
        },
    };
    let reward = if judgement.total == 0 {
        0.0
    } else if options.partial_credit {
        10.0 * judgement.passed as f32 / judgement.total as f32
    } else if judgement.verdict == Verdict::Ok {
        10.0
    } else {
        0.0
    };
    Score {
        problem_id: sample.problem_id.clone(),
        sample_idx: sample.sample_idx,
        round: sample.round,
        reward,
        scorer: Scorer::Tests,
        passed: judgement.passed,
        total: judgement.total,
        verdict: judgement.verdict,
        wall_ms: judgement.wall().as_secs_f32() * 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_takes_the_first_fenced_block_or_everything_with_its_language() {
        assert_eq!(extract_program("print(1)\n"), (None, "print(1)\n".into()));
        let reply = "Here:\n```python\nprint(2)\n```\nand\n```\nprint(3)\n```";
        assert_eq!(
            extract_program(reply),
            (Some("python"), "print(2)\n".into())
        );
        assert_eq!(
            extract_program("```py\nx = 1"),
            (Some("py"), "x = 1".into())
        );
        assert_eq!(extract_program("```\nx = 1\n```"), (None, "x = 1\n".into()));
        let cpp = "```cpp\nint main() {}\n```";
        assert_eq!(
            extract_program(cpp),
            (Some("cpp"), "int main() {}\n".into())
        );
    }

    #[test]
    fn time_limits_scale_from_the_problem_or_the_reference_with_a_floor() {
        let policy = TimePolicy::default();
        assert_eq!(policy.limit(Some(2000), None), Duration::from_secs(12));
        assert_eq!(policy.limit(Some(100), None), Duration::from_secs(2));
        assert_eq!(
            policy.limit(None, Some(Duration::from_secs(1))),
            Duration::from_secs(4)
        );
        assert_eq!(policy.limit(None, None), Duration::from_secs(10));
    }
}
