//! Programs that try to break out, hang, or exhaust the host: each gets its expected verdict,
//! the host is unharmed, and the same sandbox serves the next program normally.
//! Needs the Python runner built by scripts/setup; skipped with a message without it.

mod common;

use std::time::Duration;

use prefloop_core::{TestCase, Verdict};
use prefloop_sandbox::{Compare, JudgeOptions, Judgement, Language, Limits, Program, TestStyle};

use common::sandbox;

fn options() -> JudgeOptions {
    JudgeOptions {
        limits: Limits {
            time: Duration::from_secs(2),
            memory_bytes: 256 << 20,
            output_bytes: 1 << 20,
            fuel: None,
        },
        compare: Compare::Tokens,
        all_tests: false,
    }
}

fn judge_with(
    source: &str,
    input: &str,
    expected: &str,
    options: &JudgeOptions,
) -> Option<Judgement> {
    let program = Program {
        language: Language::Python,
        source: source.into(),
        style: TestStyle::Stdio,
    };
    let test = TestCase {
        input: input.into(),
        output: expected.into(),
    };
    Some(sandbox()?.judge(&program, &[test], options))
}

fn judge(source: &str, input: &str, expected: &str) -> Option<Judgement> {
    judge_with(source, input, expected, &options())
}

/// Runs `source` expecting `verdict`, then checks a normal program still passes.
fn expect(source: &str, input: &str, expected: &str, verdict: Verdict) {
    let Some(judgement) = judge(source, input, expected) else {
        return;
    };
    assert_eq!(
        judgement.verdict, verdict,
        "{source}\n{:?}",
        judgement.tests
    );
    let next = judge(
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "2 3\n",
        "5",
    )
    .unwrap();
    assert_eq!(
        next.verdict,
        Verdict::Ok,
        "the next program: {:?}",
        next.tests
    );
}

#[test]
fn ordinary_programs_pass_fail_and_do_not_compile() {
    expect(
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
        "1 2 3\n",
        "6",
        Verdict::Ok,
    );
    expect("print(open(0).read().upper())", "abc", "ABC", Verdict::Ok);
    expect("print(41)", "", "42", Verdict::WrongAnswer);
    expect("print(1/0)", "", "", Verdict::RuntimeError);
    expect("def f(:\n  pass", "", "", Verdict::CompileError);
}

#[test]
fn infinite_loop_is_tle() {
    expect("while True:\n    pass\n", "", "", Verdict::TimeLimit);
}

/// Regression: a sleeping guest blocks in the host's poll, where epoch interruption cannot
/// reach it, so `time.sleep(30)` under a 2 s limit held its worker for 30 s.
#[test]
fn sleeping_past_the_limit_is_tle_at_the_limit_not_after_the_sleep() {
    for source in [
        "import time\ntime.sleep(30)\nprint(1)\n",
        "import time\nwhile True:\n    time.sleep(0.5)\n",
        "import select, sys\nselect.select([], [], [], 30)\nprint(1)\n",
    ] {
        let started = std::time::Instant::now();
        expect(source, "", "1", Verdict::TimeLimit);
        // The limit is 2 s; allow for the normal program `expect` runs next and a slow CI.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{source} held the sandbox {:?}",
            started.elapsed()
        );
    }
    // A short sleep within the limit still completes normally.
    expect(
        "import time\ntime.sleep(0.1)\nprint(1)\n",
        "",
        "1",
        Verdict::Ok,
    );
}

#[test]
fn memory_bomb_is_mle() {
    expect(
        "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
        "",
        "",
        Verdict::MemoryLimit,
    );
    expect("x = bytearray(1 << 30)\n", "", "", Verdict::MemoryLimit);
    // Larger than a wasm32 address space: CPython refuses it before allocating.
    expect("x = 'a' * (1 << 40)\n", "", "", Verdict::RuntimeError);
}

#[test]
fn deep_recursion_is_re_or_mle_once_the_limit_is_lifted() {
    expect(
        "def f(n):\n    return f(n + 1)\nf(0)\n",
        "",
        "",
        Verdict::RuntimeError,
    );
    expect(
        "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
        "",
        "",
        Verdict::MemoryLimit,
    );
}

#[test]
fn processes_are_unavailable_and_threads_run_inline() {
    expect("import os\nos.fork()\n", "", "", Verdict::RuntimeError);
    expect(
        "import subprocess\nsubprocess.run(['ls'])\n",
        "",
        "",
        Verdict::RuntimeError,
    );
    expect(
        "import os\nos.system('touch /tmp/x')\n",
        "",
        "",
        Verdict::RuntimeError,
    );
    // WASI has no threads: a started thread's target runs to completion in place, which is
    // what competitive programs want from `threading` (a big stack for deep recursion).
    expect(
        "import sys, threading\n\
         sys.setrecursionlimit(100000)\n\
         threading.stack_size(1 << 27)\n\
         def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n\
         def main():\n    print(depth(50000))\n\
         t = threading.Thread(target=main)\nt.start()\nt.join()\n",
        "",
        "50000",
        Verdict::Ok,
    );
}

#[test]
fn stdin_reads_like_a_redirected_file() {
    // The fast-input idiom of Codeforces solutions sizes its read by fstat(0).
    expect(
        "import io, os\ndata = os.read(0, os.fstat(0).st_size)\nprint(sum(map(int, data.split())))\n",
        "1 2 3 4\n",
        "10",
        Verdict::Ok,
    );
    // atexit handlers run, as at interpreter exit: solutions flush buffered output there.
    expect(
        "import atexit, io, sys\nout = io.StringIO()\natexit.register(lambda: sys.stdout.write(out.getvalue()))\nout.write('7')\n",
        "",
        "7",
        Verdict::Ok,
    );
}

#[test]
fn replaced_and_buffered_stdout_is_flushed_at_exit() {
    expect(
        "import io, sys\nsys.stdout = io.TextIOWrapper(sys.stdout.buffer)\nprint(int(input()) * 2)\n",
        "21\n",
        "42",
        Verdict::Ok,
    );
    // The Codeforces fast-output template: an io.IOBase that buffers and writes with os.write
    // only when flushed, which at real exit happens as the object is finalised.
    expect(
        "import os, sys\nfrom io import BytesIO, IOBase\n\
         class FastIO(IOBase):\n\
         \x20   def __init__(self, fd):\n\
         \x20       self.fd, self.buffer = fd, BytesIO()\n\
         \x20   def write(self, s):\n\
         \x20       self.buffer.write(s.encode())\n\
         \x20   def flush(self):\n\
         \x20       os.write(self.fd, self.buffer.getvalue())\n\
         \x20       self.buffer = BytesIO()\n\
         sys.stdout = FastIO(1)\n\
         print(6 * 7)\n",
        "",
        "42",
        Verdict::Ok,
    );
}

#[test]
fn the_file_system_is_out_of_reach() {
    expect(
        "print(open('/etc/passwd').read())",
        "",
        "",
        Verdict::RuntimeError,
    );
    let name = "prefloop-sandbox-escape-test.txt";
    expect(
        &format!("open('{name}', 'w').write('x')"),
        "",
        "",
        Verdict::RuntimeError,
    );
    expect(
        &format!("open('/tmp/{name}', 'w').write('x')"),
        "",
        "",
        Verdict::RuntimeError,
    );
    assert!(!std::path::Path::new(name).exists());
    assert!(!std::path::Path::new("/tmp").join(name).exists());
    expect(
        "import os\nprint(os.listdir('/'))",
        "",
        "",
        Verdict::RuntimeError,
    );
}

#[test]
fn the_network_is_out_of_reach() {
    expect(
        "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n",
        "",
        "",
        Verdict::RuntimeError,
    );
    expect(
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1/')\n",
        "",
        "",
        Verdict::RuntimeError,
    );
}

#[test]
fn printing_gigabytes_is_ole() {
    expect(
        "while True:\n    print('x' * 4096)\n",
        "",
        "",
        Verdict::OutputLimit,
    );
    expect(
        "import sys\nsys.stdout.write('y' * (64 << 20))\n",
        "",
        "",
        Verdict::OutputLimit,
    );
}

#[test]
fn reading_past_the_end_of_stdin_is_re() {
    expect(
        "a = input()\nb = input()\nprint(a, b)\n",
        "only one line\n",
        "",
        Verdict::RuntimeError,
    );
}

#[test]
fn non_utf8_output_is_judged_not_a_crash() {
    expect(
        "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe 1\\n')\n",
        "",
        "1",
        Verdict::WrongAnswer,
    );
}

#[test]
fn exits_midway() {
    expect(
        "print(1)\nimport sys\nsys.exit(0)\nprint(2)\n",
        "",
        "1",
        Verdict::Ok,
    );
    expect(
        "print(1)\nimport sys\nsys.exit(3)\n",
        "",
        "1",
        Verdict::RuntimeError,
    );
    expect(
        "import os, sys\nprint(1)\nsys.stdout.flush()\nos._exit(0)\nprint(2)\n",
        "",
        "1",
        Verdict::Ok,
    );
    expect("import os\nos._exit(5)\n", "", "", Verdict::RuntimeError);
}

#[test]
fn no_state_survives_between_tests() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    // A module-level global, a builtins patch and a cached import: each test starts clean.
    let source = "import builtins, math\n\
        print(getattr(builtins, 'seen', 0))\n\
        builtins.seen = 1\n\
        math.pi = 3\n";
    let program = Program {
        language: Language::Python,
        source: source.into(),
        style: TestStyle::Stdio,
    };
    let test = TestCase {
        input: String::new(),
        output: "0".into(),
    };
    let judgement = sandbox.judge(&program, &[test.clone(), test.clone(), test], &options());
    assert_eq!(
        (judgement.verdict, judgement.passed),
        (Verdict::Ok, 3),
        "{:?}",
        judgement.tests
    );
}

#[test]
fn call_based_and_check_style_tests() {
    let Some(sandbox) = sandbox() else {
        return;
    };
    let call = Program {
        language: Language::Python,
        source: "class Solution:\n    def add(self, a, b):\n        print('noise')\n        return (a + b, a - b)\n".into(),
        style: TestStyle::Call { fn_name: "add".into() },
    };
    let tests = [
        TestCase {
            input: "[3, 1]".into(),
            output: "[4, 2]".into(),
        },
        TestCase {
            input: "[0, 0]".into(),
            output: "[[0, 0]]".into(),
        },
    ];
    let judgement = sandbox.judge(&call, &tests, &options());
    assert_eq!(judgement.verdict, Verdict::Ok, "{:?}", judgement.tests);

    let check = Program {
        language: Language::Python,
        source: "def inc(x):\n    return x + 1\n".into(),
        style: TestStyle::Check {
            entry_point: "inc".into(),
        },
    };
    let pass = TestCase {
        input: "def check(f):\n    assert f(1) == 2\n".into(),
        output: String::new(),
    };
    let fail = TestCase {
        input: "def check(f):\n    assert f(1) == 3\n".into(),
        output: String::new(),
    };
    assert_eq!(
        sandbox.judge(&check, &[pass], &options()).verdict,
        Verdict::Ok
    );
    assert_eq!(
        sandbox.judge(&check, &[fail], &options()).verdict,
        Verdict::WrongAnswer
    );
}
