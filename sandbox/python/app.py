"""prefloop's Python runner, built into a WASI component by componentize-py.

The build imports the modules below and snapshots the initialised interpreter, so each test
starts a warm CPython in a few milliseconds. The host passes, in the WASI environment:

  PREFLOOP_MODE     stdio | call | check
  PREFLOOP_PROGRAM  the program's source
  PREFLOOP_FN       call: the function to call (a method of `Solution` if the program has one)
                    check: the entry point handed to `check`
  PREFLOOP_TEST     check: the test program that defines check(candidate)

  PREFLOOP_STDIN_BYTES  the size of stdin (what os.fstat(0) reports)

and the test's input on stdin (call: a JSON list of arguments). The last line on stderr is
this runner's report, after a NUL: "ok", "exit <code>", "syntax <message>" or
"error <ExceptionName>". In call mode stdout holds only the JSON of the returned value.
"""

import io
import json
import sys
import traceback

import atexit
import importlib
import os
import threading

# Imported here so the snapshot holds them: the runtime has no standard library on disk, so a
# module not imported now cannot be imported by a program later. The list covers what the
# solutions of APPS, CodeContests, HumanEval and MBPP import, and the rest of the usual kit.
PRELOADED = """
    abc array base64 binascii bisect calendar cmath collections collections.abc contextlib copy
    dataclasses datetime decimal enum fractions functools graphlib hashlib heapq inspect io
    itertools json keyword math numbers operator pprint queue random re secrets statistics
    string struct textwrap time traceback types typing unicodedata warnings weakref
""".split()
for _name in PRELOADED:
    try:
        importlib.import_module(_name)
    except ImportError:
        pass


def _start_inline(self):
    """Thread.start: WASI has no threads. Competitive programs start one only to get a big
    stack for deep recursion, so the target runs here, to completion."""
    self._started.set()
    self.run()


threading.Thread.start = _start_inline
threading.Thread.join = lambda self, timeout=None: None
threading.stack_size = lambda size=0: 0

from wit_world import exports
from wit_world.imports import environment


def report(status):
    sys.stderr.write("\n\0" + status + "\n")
    sys.stderr.flush()


def stdin_like_a_file(size):
    """Judges redirect stdin from a file, and solutions read it with
    os.read(0, os.fstat(0).st_size): report the input's size for fd 0 as a file would."""
    real_fstat = os.fstat

    def fstat(fd):
        result = real_fstat(fd)
        if fd != 0:
            return result
        fields = list(result)
        fields[6] = size  # st_size
        return os.stat_result(fields)

    os.fstat = fstat


def shut_down(namespace):
    """What interpreter exit does, less tearing the heap down (the instance is thrown away):
    atexit handlers, then the program's streams flushed and closed while the functions they
    call still exist. Fast-output solutions replace sys.stdout with a buffering io.IOBase and
    rely on exactly this to see their output written."""
    atexit._run_exitfuncs()
    original = {sys.__stdin__, sys.__stdout__, sys.__stderr__}
    streams = [sys.stdout, sys.stderr]
    for value in reversed(list(namespace.values())):
        if isinstance(value, io.IOBase):
            streams.append(value)
            # The stream it wraps, if any (fast-output wrappers hold their buffer object).
            attributes = getattr(value, "__dict__", {}).values()
            streams.extend(v for v in attributes if isinstance(v, io.IOBase))
    for stream in streams:
        if stream.closed:
            continue
        try:
            if stream in original:
                stream.flush()
            else:
                stream.close()
        except Exception:
            traceback.print_exc()
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__


def run_program(env):
    mode = env.get("PREFLOOP_MODE", "stdio")
    stdin_like_a_file(int(env.get("PREFLOOP_STDIN_BYTES", "0")))
    source = env.get("PREFLOOP_PROGRAM", "")
    try:
        code = compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError) as e:
        return "syntax " + type(e).__name__ + ": " + str(e).replace("\n", " ")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if mode == "stdio":
        try:
            exec(code, namespace)
        finally:
            shut_down(namespace)
        return "ok"
    if mode == "check":
        exec(code, namespace)
        test = compile(env.get("PREFLOOP_TEST", ""), "test.py", "exec")
        exec(test, namespace)
        namespace["check"](namespace[env["PREFLOOP_FN"]])
        return "ok"
    if mode == "call":
        args = json.loads(sys.stdin.read())
        # What the function prints goes to stderr, the host's capped pipe: stdout holds only
        # the returned value, and a program that prints without end is cut at the output
        # limit (OLE), as a stdio program is, not kept in guest memory until that runs out.
        real_stdout, sys.stdout = sys.stdout, sys.stderr
        try:
            exec(code, namespace)
            name = env["PREFLOOP_FN"]
            if "Solution" in namespace and hasattr(namespace["Solution"], name):
                function = getattr(namespace["Solution"](), name)
            else:
                function = namespace[name]
            result = function(*args)
        finally:
            sys.stdout = real_stdout
        sys.stdout.write(json.dumps(result, default=str))
        return "ok"
    return "error UnknownMode"


class Run(exports.Run):
    def run(self) -> None:
        env = dict(environment.get_environment())
        try:
            status = run_program(env)
        except SystemExit as e:
            code = e.code
            if code is None or code == 0:
                status = "ok"
            else:
                if not isinstance(code, int):
                    sys.stderr.write(str(code) + "\n")
                    code = 1
                status = "exit " + str(code)
        except BaseException as e:  # the program's failure, whatever it is, is reported
            traceback.print_exc()
            status = "error " + type(e).__name__
        try:
            if not sys.stdout.closed:
                sys.stdout.flush()
        except BaseException as e:
            status = "error " + type(e).__name__
        report(status)
