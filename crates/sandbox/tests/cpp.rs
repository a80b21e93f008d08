//! C++ in the sandbox: ordinary programs pass, fail or do not compile; programs that crash,
//! hang, exhaust memory, sleep, or reach for host files get their verdicts with the host
//! unharmed and the sandbox still serving. Skipped with a message when scripts/setup could not
//! install the C++ toolchain (or has not built the runtime).

mod common;

use std::time::{Duration, Instant};

use prefloop_core::{TestCase, Verdict};
use prefloop_sandbox::{Compare, JudgeOptions, Judgement, Language, Limits, Program, TestStyle};

fn options() -> JudgeOptions {
    JudgeOptions {
        limits: Limits {
            time: Duration::from_secs(2),
            memory_bytes: 512 << 20,
            output_bytes: 1 << 20,
            fuel: None,
        },
        compare: Compare::Tokens,
        all_tests: false,
    }
}

fn judge(source: &str, tests: &[(&str, &str)]) -> Option<Judgement> {
    let sandbox = common::sandbox()?;
    if let Err(e) = sandbox.check_language(Language::Cpp) {
        eprintln!("skipping: {e}");
        return None;
    }
    let program = Program {
        language: Language::Cpp,
        source: source.into(),
        style: TestStyle::Stdio,
    };
    let tests: Vec<TestCase> = tests
        .iter()
        .map(|(input, output)| TestCase {
            input: (*input).into(),
            output: (*output).into(),
        })
        .collect();
    Some(sandbox.judge(&program, &tests, &options()))
}

const SUM: &str = "#include <bits/stdc++.h>\nusing namespace std;\n\
int main() { long long a, b; cin >> a >> b; cout << a + b << endl; }\n";

/// Judges `source` on one test expecting `verdict`, then checks a normal program still passes.
fn expect(source: &str, input: &str, expected: &str, verdict: Verdict) -> Option<Judgement> {
    let judgement = judge(source, &[(input, expected)])?;
    assert_eq!(
        judgement.verdict, verdict,
        "{source}\n{:?}",
        judgement.tests
    );
    let next = judge(SUM, &[("2 3\n", "5")]).unwrap();
    assert_eq!(
        next.verdict,
        Verdict::Ok,
        "the next program: {:?}",
        next.tests
    );
    Some(judgement)
}

#[test]
fn ordinary_programs_pass_and_fail_per_test() {
    let Some(judgement) = judge(SUM, &[("1 2", "3"), ("100000000000 1", "100000000001")]) else {
        return;
    };
    assert_eq!((judgement.verdict, judgement.passed), (Verdict::Ok, 2));
    // Common competitive-programming fare: the GNU catch-all header, fast io, STL, floats.
    let stl = "#include <bits/stdc++.h>\nusing namespace std;\n\
        int main() { ios::sync_with_stdio(false); cin.tie(nullptr); int n; cin >> n;\n\
        vector<int> v(n); for (auto &x : v) cin >> x; sort(v.rbegin(), v.rend());\n\
        map<int, int> count; for (int x : v) count[x]++;\n\
        printf(\"%d %zu %.6f\\n\", v[0], count.size(), sqrt(2.0)); }\n";
    expect(stl, "4\n3 1 3 2\n", "3 3 1.414214", Verdict::Ok);
    let wrong = judge(SUM, &[("1 2", "4")]).unwrap();
    assert_eq!(wrong.verdict, Verdict::WrongAnswer);
}

#[test]
fn a_compile_error_is_ce_with_the_compilers_message_and_is_cached() {
    let source = "int main() { return undefined_name; }\n";
    let Some(judgement) = expect(source, "", "", Verdict::CompileError) else {
        return;
    };
    assert!(
        judgement.tests[0].detail.contains("undefined_name"),
        "{:?}",
        judgement.tests
    );
    // Cached on disk: the second judge reads the diagnostics back instead of compiling.
    let cache = prefloop_sandbox::default_runtime_dir().join("cache/cpp");
    let cached = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ce"))
        .any(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains("undefined_name")
        });
    assert!(cached, "no cached compile error in {}", cache.display());
    let again = judge(source, &[("", "")]).unwrap();
    assert_eq!(again.verdict, Verdict::CompileError);
    assert_eq!(again.tests[0].detail, judgement.tests[0].detail);
}

#[test]
fn including_a_host_file_is_ce_and_shows_nothing_of_it() {
    for include in [
        "#include \"/etc/passwd\"",
        "#include \"../../../../../../etc/hostname\"",
    ] {
        let source = format!("{include}\nint main() {{}}\n");
        let Some(judgement) = expect(&source, "", "", Verdict::CompileError) else {
            return;
        };
        let detail = &judgement.tests[0].detail;
        assert!(detail.contains("not a standard header"), "{detail}");
        assert!(!detail.contains("root:"), "{detail}");
    }
    let embed =
        "const char data[] = {\n#embed \"/etc/passwd\"\n, 0};\nint main() { return data[0]; }\n";
    expect(embed, "", "", Verdict::CompileError);
}

#[test]
fn a_segfault_is_re() {
    let source = "#include <cstdio>\nint main() { volatile int *p = (int *)0x7ffffff0; \
        for (long i = 0;; i += 1 << 20) p[i] = 1; }\n";
    expect(source, "", "", Verdict::RuntimeError);
}

#[test]
fn recursing_forever_is_re_but_deep_recursion_runs() {
    let forever = "int f(int n) { volatile int pad[16]; pad[0] = n; return f(n + 1) + pad[0]; }\n\
        int main() { return f(0); }\n";
    expect(forever, "", "", Verdict::RuntimeError);
    // A DFS 10^6 deep, as accepted solutions do.
    let deep = "#include <bits/stdc++.h>\nusing namespace std;\nvector<int> next_of;\n\
        long long depth(int v) { return v < 0 ? 0 : 1 + depth(next_of[v]); }\n\
        int main() { int n = 1000000; next_of.resize(n); \
        for (int i = 0; i < n; i++) next_of[i] = i + 1 < n ? i + 1 : -1; \
        cout << depth(0) << endl; }\n";
    expect(deep, "", "1000000", Verdict::Ok);
}

#[test]
fn an_infinite_loop_and_a_long_sleep_are_tle_at_the_limit() {
    expect(
        "int main() { volatile int x = 0; for (;;) x++; }\n",
        "",
        "",
        Verdict::TimeLimit,
    );
    let sleep = "#include <unistd.h>\nint main() { sleep(30); return 0; }\n";
    let started = Instant::now();
    expect(sleep, "", "", Verdict::TimeLimit);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_memory_bomb_is_mle() {
    let source = "#include <bits/stdc++.h>\nint main() { std::vector<std::vector<char>> v; \
        for (;;) v.emplace_back(1 << 20, 1); }\n";
    expect(source, "", "", Verdict::MemoryLimit);
}

#[test]
fn an_exception_is_re_and_exit_codes_count() {
    let throws = "#include <bits/stdc++.h>\nint main() { std::vector<int> v; return v.at(3); }\n";
    expect(throws, "", "", Verdict::RuntimeError);
    expect(
        "#include <cstdlib>\nint main() { exit(3); }\n",
        "",
        "",
        Verdict::RuntimeError,
    );
    let abort = "#include <cstdlib>\n#include <cstdio>\nint main() { puts(\"5\"); abort(); }\n";
    expect(abort, "", "5", Verdict::RuntimeError);
}

#[test]
fn files_and_output_floods_are_contained() {
    let read = "#include <cstdio>\nint main() { FILE *f = fopen(\"/etc/passwd\", \"r\"); \
        puts(f ? \"opened\" : \"denied\"); FILE *g = fopen(\"out.txt\", \"w\"); \
        puts(g ? \"created\" : \"denied\"); }\n";
    expect(read, "", "denied denied", Verdict::Ok);
    let flood = "#include <cstdio>\nint main() { for (;;) fputs(\"yyyyyyyyyyyyyyyy\", stdout); }\n";
    expect(flood, "", "", Verdict::OutputLimit);
}

#[test]
fn c_plus_plus_judges_stdin_tests_only() {
    let Some(sandbox) = common::sandbox() else {
        return;
    };
    if sandbox.check_language(Language::Cpp).is_err() {
        return;
    }
    let program = Program {
        language: Language::Cpp,
        source: SUM.into(),
        style: TestStyle::Call {
            fn_name: "solve".into(),
        },
    };
    let test = TestCase {
        input: "[1]".into(),
        output: "1".into(),
    };
    let judgement = sandbox.judge(&program, &[test], &options());
    assert_eq!(judgement.verdict, Verdict::CompileError);
    assert!(judgement.tests[0].detail.contains("stdin/stdout"));
}
