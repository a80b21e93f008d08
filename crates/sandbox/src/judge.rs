//! Judging: a program against its tests, one fresh sandboxed run per test, and the verdict
//! rules of the anchors (CodeContests' token compare, APPS' testing_util cascade, APPS'
//! call-based JSON compare, HumanEval's `check(candidate)`).

use std::time::Duration;

use prefloop_core::{TestCase, Verdict};
use serde_json::Value;

use crate::runtime::{CppProgram, Exit, Limits, RunOutput, Sandbox};
use crate::{Result, SandboxError};

/// The languages a program can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    /// C++ (GNU C++20), judged on stdin/stdout tests.
    Cpp,
}

impl Language {
    /// `python`, `python3` or `py`; `cpp`, `c++`, `cxx` or `cc`; anything else is an
    /// unsupported-language error.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(Self::Python),
            "cpp" | "c++" | "cxx" | "cc" => Ok(Self::Cpp),
            _ => Err(SandboxError::UnsupportedLanguage(name.to_owned())),
        }
    }
}

/// How a test feeds the program and reads its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestStyle {
    /// The input on stdin, the answer on stdout (APPS standard input, CodeContests).
    Stdio,
    /// APPS call-based: the input is a JSON list of arguments for `fn_name` (a method of
    /// `Solution` if the program defines one), the output the JSON of the expected value.
    Call { fn_name: String },
    /// HumanEval/MBPP: the test's input is a program defining `check(candidate)`; passing
    /// means `check(entry_point)` returns.
    Check { entry_point: String },
}

/// How a stdout answer is compared with the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compare {
    /// CodeContests: whitespace-separated tokens, equal, or both numbers within 1e-5.
    #[default]
    Tokens,
    /// APPS testing_util: exact, then stripped lines, then numbers all close, then the
    /// lines' token sets.
    Apps,
}

/// A program to judge.
#[derive(Debug, Clone)]
pub struct Program {
    pub language: Language,
    pub source: String,
    pub style: TestStyle,
}

/// Options of [`Sandbox::judge`].
#[derive(Debug, Clone, Default)]
pub struct JudgeOptions {
    pub limits: Limits,
    pub compare: Compare,
    /// Run every test even after one fails (default: stop at the first failure).
    pub all_tests: bool,
}

/// The result of one test.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    pub verdict: Verdict,
    pub wall: Duration,
    /// Why it failed, for people: the runner's report or the sandbox's error.
    pub detail: String,
}

/// A program's result over its tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// OK if every test passed, else the verdict of the first test that did not.
    pub verdict: Verdict,
    pub passed: u32,
    /// Tests in the problem (not only those run).
    pub total: u32,
    pub tests: Vec<TestResult>,
}

impl Judgement {
    pub fn wall(&self) -> Duration {
        self.tests.iter().map(|t| t.wall).sum()
    }
}

impl Sandbox {
    /// Runs `program` on each test in a fresh instance. Never fails because of the program:
    /// whatever it does is a verdict; a failure of the sandbox itself is SANDBOX_ERROR.
    pub fn judge(
        &self,
        program: &Program,
        tests: &[TestCase],
        options: &JudgeOptions,
    ) -> Judgement {
        let mut results = Vec::with_capacity(tests.len());
        let ready = self.ready(program, &options.limits);
        for test in tests {
            let result = match &ready {
                Ok(ready) => self.run_test(ready, program, test, options),
                Err(e) => TestResult {
                    verdict: Verdict::SandboxError,
                    wall: Duration::ZERO,
                    detail: e.to_string(),
                },
            };
            let failed = result.verdict != Verdict::Ok;
            // A program that does not compile fails every test the same way.
            let stop = failed && (!options.all_tests || result.verdict == Verdict::CompileError);
            results.push(result);
            if stop {
                break;
            }
        }
        let passed = results.iter().filter(|r| r.verdict == Verdict::Ok).count() as u32;
        let verdict = results
            .iter()
            .map(|r| r.verdict)
            .find(|v| *v != Verdict::Ok)
            .unwrap_or(Verdict::Ok);
        Judgement {
            verdict,
            passed,
            total: tests.len() as u32,
            tests: results,
        }
    }

    /// Runs `program` once on `test`'s input, without judging the result.
    pub fn run_program(
        &self,
        program: &Program,
        test: &TestCase,
        options: &JudgeOptions,
    ) -> Result<RunOutput> {
        self.run_ready(
            &self.ready(program, &options.limits)?,
            program,
            test,
            options,
        )
    }

    /// What `program` needs before its first test under `limits`: for C++, compiling and
    /// linking.
    fn ready(&self, program: &Program, limits: &Limits) -> Result<Ready> {
        Ok(match (program.language, &program.style) {
            (Language::Python, _) => Ready::Python,
            (Language::Cpp, TestStyle::Stdio) => {
                Ready::Cpp(self.prepare_cpp(&program.source, limits)?)
            }
            (Language::Cpp, _) => Ready::Cpp(CppProgram::CompileError(
                "C++ programs are judged on stdin/stdout tests; this problem calls a function"
                    .into(),
            )),
        })
    }

    fn run_ready(
        &self,
        ready: &Ready,
        program: &Program,
        test: &TestCase,
        options: &JudgeOptions,
    ) -> Result<RunOutput> {
        match ready {
            Ready::Python => self.run_python_program(program, test, options),
            Ready::Cpp(CppProgram::Ready(module)) => {
                self.run_cpp(module, test.input.as_bytes(), &options.limits)
            }
            Ready::Cpp(CppProgram::CompileError(message)) => Ok(RunOutput {
                exit: Exit::CompileError(message.clone()),
                stdout: Vec::new(),
                stderr: Vec::new(),
                wall: Duration::ZERO,
                memory_refused: false,
                fuel_used: None,
            }),
        }
    }

    fn run_python_program(
        &self,
        program: &Program,
        test: &TestCase,
        options: &JudgeOptions,
    ) -> Result<RunOutput> {
        let (mode, function, check) = match &program.style {
            TestStyle::Stdio => ("stdio", "", ""),
            TestStyle::Call { fn_name } => ("call", fn_name.as_str(), ""),
            TestStyle::Check { entry_point } => {
                ("check", entry_point.as_str(), test.input.as_str())
            }
        };
        let stdin = match program.style {
            TestStyle::Check { .. } => "",
            _ => test.input.as_str(),
        };
        let stdin_bytes = stdin.len().to_string();
        let env = [
            ("PREFLOOP_MODE", mode),
            ("PREFLOOP_PROGRAM", program.source.as_str()),
            ("PREFLOOP_FN", function),
            ("PREFLOOP_TEST", check),
            ("PREFLOOP_STDIN_BYTES", stdin_bytes.as_str()),
        ];
        self.run_python(&env, stdin.as_bytes(), &options.limits)
    }

    fn run_test(
        &self,
        ready: &Ready,
        program: &Program,
        test: &TestCase,
        options: &JudgeOptions,
    ) -> TestResult {
        match self.run_ready(ready, program, test, options) {
            Ok(run) => judge_run(&run, program, Some(&test.output), options.compare),
            Err(e) => TestResult {
                verdict: Verdict::SandboxError,
                wall: Duration::ZERO,
                detail: e.to_string(),
            },
        }
    }
}

/// A program made ready for its tests.
enum Ready {
    Python,
    Cpp(CppProgram),
}

/// The runner's report: the last stderr line that starts with a NUL.
fn runner_status(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.rfind('\0')?;
    Some(text[start + 1..].trim_end().to_owned())
}

/// The verdict of one run of `program`, as the tests judge it: against `expected` output, or,
/// with None, by how the run ended alone (a clean exit is OK).
pub fn judge_run(
    run: &RunOutput,
    program: &Program,
    expected: Option<&str>,
    compare: Compare,
) -> TestResult {
    let style = &program.style;
    // Only the Python runner reports; a C++ program's stderr is its own.
    let status = match program.language {
        Language::Python => runner_status(&run.stderr),
        Language::Cpp => None,
    };
    let (verdict, detail) = match &run.exit {
        Exit::TimedOut => (Verdict::TimeLimit, String::new()),
        Exit::OutOfFuel => (Verdict::TimeLimit, "ran out of fuel".into()),
        Exit::OutOfMemory => (Verdict::MemoryLimit, String::new()),
        Exit::OutputLimit => (Verdict::OutputLimit, String::new()),
        Exit::Trap(trap) if run.memory_refused => (Verdict::MemoryLimit, trap.clone()),
        Exit::Trap(trap) => (Verdict::RuntimeError, trap.clone()),
        Exit::CompileError(message) => (Verdict::CompileError, message.clone()),
        Exit::Code(code) => match status.as_deref() {
            Some(s) if s.starts_with("syntax ") => (Verdict::CompileError, s[7..].to_owned()),
            Some("error MemoryError") => (Verdict::MemoryLimit, "MemoryError".into()),
            // check(candidate) asserting is a wrong answer, as in HumanEval.
            Some("error AssertionError") if matches!(style, TestStyle::Check { .. }) => {
                (Verdict::WrongAnswer, "AssertionError".into())
            }
            Some(s) if s.starts_with("error ") || s.starts_with("exit ") => {
                (Verdict::RuntimeError, s.to_owned())
            }
            // "ok", or no report at all (os._exit): the exit code and the output decide.
            _ if *code != 0 => (Verdict::RuntimeError, format!("exit code {code}")),
            _ => {
                let output = String::from_utf8_lossy(&run.stdout);
                let ok = match (style, expected) {
                    (TestStyle::Check { .. }, _) | (_, None) => true,
                    (TestStyle::Call { .. }, Some(expected)) => {
                        json_answer_matches(&output, expected)
                    }
                    (TestStyle::Stdio, Some(expected)) => match compare {
                        Compare::Tokens => tokens_match(&output, expected),
                        Compare::Apps => apps_match(&output, expected),
                    },
                };
                if ok {
                    (Verdict::Ok, String::new())
                } else {
                    (Verdict::WrongAnswer, String::new())
                }
            }
        },
    };
    TestResult {
        verdict,
        wall: run.wall,
        detail,
    }
}

/// CodeContests: the same number of whitespace-separated tokens, each equal, or both numbers
/// within 1e-5.
pub fn tokens_match(output: &str, expected: &str) -> bool {
    let (mut got, mut want) = (output.split_whitespace(), expected.split_whitespace());
    loop {
        match (got.next(), want.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b || numbers_close(a, b, 1e-5, 0.0) => {}
            _ => return false,
        }
    }
}

fn numbers_close(a: &str, b: &str, absolute: f64, relative: f64) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) if x.is_finite() && y.is_finite() => {
            (x - y).abs() <= absolute + relative * y.abs()
        }
        _ => false,
    }
}

/// APPS testing_util's cascade for standard-input problems.
pub fn apps_match(output: &str, expected: &str) -> bool {
    if output == expected || output.trim() == expected.trim() {
        return true;
    }
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let (got, want) = (lines(output), lines(expected));
    if got == want {
        return true;
    }
    // numpy.allclose over all tokens: |a - b| <= 1e-8 + 1e-5 |b|.
    let (got_tokens, want_tokens): (Vec<&str>, Vec<&str>) = (
        output.split_whitespace().collect(),
        expected.split_whitespace().collect(),
    );
    if got_tokens.len() == want_tokens.len()
        && !got_tokens.is_empty()
        && got_tokens
            .iter()
            .zip(&want_tokens)
            .all(|(a, b)| numbers_close(a, b, 1e-8, 1e-5))
    {
        return true;
    }
    let sets = |lines: &[String]| -> Vec<std::collections::BTreeSet<String>> {
        lines
            .iter()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    sets(&got) == sets(&want)
}

/// APPS call-based: the returned value equals the expected one, or the expected one is a
/// non-empty list whose first element it equals (APPS wraps some answers in a list).
pub fn json_answer_matches(output: &str, expected: &str) -> bool {
    let (Ok(got), Ok(want)) = (
        serde_json::from_str::<Value>(output.trim()),
        serde_json::from_str::<Value>(expected.trim()),
    ) else {
        return false;
    };
    json_equal(&got, &want)
        || matches!(&want, Value::Array(items) if items.first().is_some_and(|first| json_equal(&got, first)))
}

/// Python's `==` on JSON values: 1 == 1.0.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecontests_tokens_ignore_whitespace_and_allow_small_float_error() {
        assert!(tokens_match("1 2\n3\n", "1\n2 3"));
        assert!(tokens_match("0.3333333", "0.33333333333"));
        assert!(!tokens_match("0.3334", "0.3333"));
        assert!(!tokens_match("1 2", "1 2 3"));
        assert!(!tokens_match("YES", "yes"));
        assert!(tokens_match("", "\n"));
    }

    #[test]
    fn apps_cascade_accepts_stripped_lines_close_numbers_and_token_sets() {
        assert!(apps_match("3\n", "3"));
        assert!(apps_match("a  \n\n b\n", "a\nb\n"));
        assert!(apps_match("1.0000001 2", "1.0 2.0"));
        assert!(apps_match("2 1\n", "1 2\n"));
        assert!(!apps_match("1 2\n", "1 3\n"));
    }

    #[test]
    fn call_answers_compare_as_python_values_with_apps_list_unwrapping() {
        assert!(json_answer_matches("[1, 2]", "[1, 2]"));
        assert!(json_answer_matches("3", "3.0"));
        assert!(json_answer_matches("true", "[true]"));
        assert!(!json_answer_matches("[1, 2]", "[2, 1]"));
        assert!(!json_answer_matches("not json", "1"));
    }

    #[test]
    fn runner_status_is_the_last_nul_line() {
        assert_eq!(runner_status(b"noise\n\0ok\n").as_deref(), Some("ok"));
        assert_eq!(
            runner_status(b"\0fake\nTraceback\n\0error ValueError\n").as_deref(),
            Some("error ValueError")
        );
        assert_eq!(runner_status(b"no report"), None);
    }

    #[test]
    fn other_languages_are_a_clear_error() {
        let e = Language::parse("haskell").unwrap_err().to_string();
        assert!(
            e.contains("unsupported language") && e.contains("haskell"),
            "{e}"
        );
    }
}
