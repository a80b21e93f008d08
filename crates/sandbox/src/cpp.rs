//! C++ programs: compiled on the host by Debian's clang-19 to a wasm32-wasi core module and run
//! in wasmtime with WASI preview 1, like the Python runner with nothing of the host reachable.
//!
//! Compiling is the one step that runs on the host, so the compiler only ever sees allowed
//! files: the source is preprocessed first and every file it pulled in (`#include`, `#embed`)
//! must lie under the wasm32 sysroot headers, clang's own headers or the sandbox's shim
//! (`bits/stdc++.h`); anything else is a compile error before a byte of it is compiled. The
//! preprocessed text is then compiled and linked with the exception stub
//! (`sandbox/cpp/exceptions.c`). Modules, and compile errors, are cached on disk by the hash of
//! the source, the flags and the compiler's version.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{Caller, Engine, Extern, InstancePre, Linker, Module, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::runtime::{MemoryLimiter, SleepCap};
use crate::{Result, SandboxError};

/// The compiler, unless `PREFLOOP_CLANGXX` names another.
const CLANGXX: &str = "clang++-19";

/// The sysroot of Debian's wasi-libc and libc++ wasm32 packages.
const SYSROOT: &str = "/usr";

/// Flags of every compile: GNU C++20 at -O2, as judges compile.
const FLAGS: &[&str] = &[
    "--target=wasm32-wasi",
    "--sysroot=/usr",
    "-std=gnu++20",
    "-O2",
];

/// The shadow stack in linear memory. Judges give a C++ program as much stack as memory;
/// deep recursion (a DFS over 10^5 vertices) is common in accepted solutions.
pub(crate) const SHADOW_STACK_BYTES: usize = 64 << 20;

/// The machine stack wasm frames may use (wasmtime's `max_wasm_stack`), and the stack of the
/// thread a C++ run gets: the same plus room for the host's own frames.
pub(crate) const WASM_STACK_BYTES: usize = 64 << 20;
pub(crate) const RUN_THREAD_STACK_BYTES: usize = WASM_STACK_BYTES + (16 << 20);

/// A compile that takes longer is a compile error (template or constexpr bombs).
const COMPILE_TIME: Duration = Duration::from_secs(60);

/// Diagnostics kept for a compile error.
const MAX_DIAGNOSTIC_BYTES: usize = 4096;

/// The sandbox's C++ files under the runtime directory (scripts/setup puts them there).
const CPP_DIR: &str = "cpp";

/// How a compile ended.
#[derive(Debug, Clone)]
pub(crate) enum Compiled {
    Module(PathBuf),
    /// The program does not compile (verdict CE), with the compiler's diagnostics.
    Error(String),
}

/// clang for wasm32-wasi and where its allowed headers are.
#[derive(Debug)]
pub(crate) struct Compiler {
    clang: PathBuf,
    /// `clang++ --version`'s first line: part of the cache key.
    version: String,
    /// The `bits/stdc++.h` shim.
    include: PathBuf,
    /// The exception stub's object file, and its hash (part of the cache key).
    stub: PathBuf,
    stub_hash: String,
    /// Directories a program's included files must lie under (canonical).
    allowed: Vec<PathBuf>,
    cache: PathBuf,
}

static SCRATCH: AtomicU64 = AtomicU64::new(0);

impl Compiler {
    /// The toolchain scripts/setup installed, or why there is none.
    pub(crate) fn find(runtime_dir: &Path, cache_dir: &Path) -> Result<Self> {
        let missing = |what: &str| SandboxError::MissingToolchain(what.to_owned());
        let clang =
            std::env::var_os("PREFLOOP_CLANGXX").map_or_else(|| CLANGXX.into(), PathBuf::from);
        let output = Command::new(&clang)
            .args(["--version"])
            .output()
            .map_err(|e| missing(&format!("{}: {e}", clang.display())))?;
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        let resource = Command::new(&clang)
            .args(["-print-resource-dir"])
            .output()
            .map_err(|e| missing(&format!("{}: {e}", clang.display())))?;
        let resource =
            PathBuf::from(String::from_utf8_lossy(&resource.stdout).trim()).join("include");
        let dir = runtime_dir.join(CPP_DIR);
        let (include, stub) = (dir.join("include"), dir.join("exceptions.o"));
        let sysroot_headers = Path::new(SYSROOT).join("include/wasm32-wasi");
        // Debian links the libc++ headers in from LLVM's tree.
        let libcxx_headers = sysroot_headers.join("c++/v1");
        for path in [
            &include,
            &stub,
            &sysroot_headers,
            &libcxx_headers,
            &resource,
        ] {
            if !path.exists() {
                return Err(missing(&path.display().to_string()));
            }
        }
        let allowed = [&include, &sysroot_headers, &libcxx_headers, &resource]
            .into_iter()
            .map(|p| {
                p.canonicalize()
                    .map_err(|e| missing(&format!("{}: {e}", p.display())))
            })
            .collect::<Result<_>>()?;
        let stub_bytes = fs::read(&stub).map_err(|e| io_error(&stub, &e))?;
        let stub_hash = format!("{:x}", Sha256::digest(&stub_bytes));
        let cache = cache_dir.join("cpp");
        fs::create_dir_all(&cache).map_err(|e| io_error(&cache, &e))?;
        Ok(Self {
            clang,
            version,
            include,
            stub,
            stub_hash,
            allowed,
            cache,
        })
    }

    /// Compiles `source`, or finds it compiled (or refused) before.
    pub(crate) fn compile(&self, source: &str) -> Result<Compiled> {
        let mut hash = Sha256::new();
        let allowed = format!("{:?}", self.allowed);
        let setup = [
            self.version.as_str(),
            &FLAGS.join(" "),
            &allowed,
            &self.stub_hash,
        ];
        for part in setup
            .into_iter()
            .chain([&SHADOW_STACK_BYTES.to_string(), source])
        {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let key: String = hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let (module, error) = (
            self.cache.join(format!("{key}.wasm")),
            self.cache.join(format!("{key}.ce")),
        );
        if module.is_file() {
            return Ok(Compiled::Module(module));
        }
        if let Ok(message) = fs::read_to_string(&error) {
            return Ok(Compiled::Error(message));
        }
        let scratch = self.cache.join(format!(
            "tmp-{key}-{}-{}",
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&scratch).map_err(|e| io_error(&scratch, &e))?;
        let result = self
            .compile_in(&scratch, source)
            .and_then(|compiled| match compiled {
                Ok(built) => {
                    fs::rename(&built, &module).map_err(|e| io_error(&module, &e))?;
                    Ok(Compiled::Module(module))
                }
                Err(message) => {
                    let tmp = scratch.join("main.ce");
                    fs::write(&tmp, &message).map_err(|e| io_error(&tmp, &e))?;
                    fs::rename(&tmp, &error).map_err(|e| io_error(&error, &e))?;
                    Ok(Compiled::Error(message))
                }
            });
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    /// Preprocess, check what was included, compile and link in `dir`: the module's path, or
    /// the compile error.
    fn compile_in(&self, dir: &Path, source: &str) -> Result<Result<PathBuf, String>> {
        let (main, preprocessed, deps) = (
            dir.join("main.cpp"),
            dir.join("main.ii"),
            dir.join("main.d"),
        );
        fs::write(&main, source).map_err(|e| io_error(&main, &e))?;
        let mut preprocess = Command::new(&self.clang);
        preprocess
            .args(FLAGS)
            .arg("-isystem")
            .arg(&self.include)
            .args(["-E", "-MD", "-MF", "main.d", "main.cpp", "-o", "main.ii"]);
        if let Err(diagnostics) = self.run(preprocess, dir)? {
            // Only the lines about the program itself: a failed include of a host file must
            // not show that file's lines.
            let own: Vec<&str> = diagnostics
                .lines()
                .filter(|l| l.starts_with("main.cpp:"))
                .collect();
            return Ok(Err(truncate(&own.join("\n"))));
        }
        let deps = fs::read_to_string(&deps).map_err(|e| io_error(&deps, &e))?;
        for file in dependencies(&deps).into_iter().skip(1) {
            let canonical = dir
                .join(&file)
                .canonicalize()
                .unwrap_or_else(|_| file.clone());
            if !self.allowed.iter().any(|root| canonical.starts_with(root)) {
                return Ok(Err(format!(
                    "main.cpp includes {}, which is not a standard header: programs may only \
                     include the standard library",
                    file.display()
                )));
            }
        }
        let mut build = Command::new(&self.clang);
        build
            .args(FLAGS)
            .arg(&preprocessed)
            .arg(&self.stub)
            .arg(format!("-Wl,-z,stack-size={SHADOW_STACK_BYTES}"))
            .args(["-Wl,--stack-first", "-Wl,--strip-all", "-o", "main.wasm"]);
        Ok(self
            .run(build, dir)?
            .map(|()| dir.join("main.wasm"))
            .map_err(|diagnostics| truncate(&diagnostics)))
    }

    /// Runs one compiler step in `dir` under the compile time limit: Ok(()) or its diagnostics.
    fn run(&self, mut command: Command, dir: &Path) -> Result<Result<(), String>> {
        let log = dir.join("stderr.txt");
        let stderr = fs::File::create(&log).map_err(|e| io_error(&log, &e))?;
        let mut child = command
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                SandboxError::MissingToolchain(format!("{}: {e}", self.clang.display()))
            })?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| io_error(&log, &e))? {
                break status;
            }
            if started.elapsed() > COMPILE_TIME {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(Err(format!("compilation took over {COMPILE_TIME:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let diagnostics = fs::read_to_string(&log).unwrap_or_default();
        Ok(if status.success() {
            Ok(())
        } else {
            Err(diagnostics)
        })
    }
}

/// The files of a make-style dependency file (`main.ii: main.cpp /usr/include/…`), in order.
fn dependencies(text: &str) -> Vec<PathBuf> {
    let joined = text.replace("\\\n", " ");
    let files = joined.split_once(": ").map_or("", |(_, files)| files);
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = files.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => current.push(chars.next().expect("peeked")),
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths
}

fn truncate(text: &str) -> String {
    let mut end = text.len().min(MAX_DIAGNOSTIC_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_owned()
}

fn io_error(path: &Path, error: &std::io::Error) -> SandboxError {
    SandboxError::Io(format!("{}: {error}", path.display()))
}

/// The store's data of a C++ run.
pub(crate) struct CppState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) sleep: SleepCap,
    /// WASI's own `poll_oneoff`, which the capped one calls once it has cut the sleeps.
    poll_oneoff: Option<wasmtime::Func>,
}

impl CppState {
    pub(crate) fn new(wasi: WasiP1Ctx, limiter: MemoryLimiter, sleep: SleepCap) -> Self {
        Self {
            wasi,
            limiter,
            sleep,
            poll_oneoff: None,
        }
    }
}

/// WASI preview 1 for C++ modules, with its sleeps cut at the run's deadline.
pub(crate) struct CppLinker {
    /// Plain WASI: where each store's own `poll_oneoff` comes from.
    wasi: Linker<CppState>,
    /// WASI with `poll_oneoff` capped: what modules are linked against.
    capped: Linker<CppState>,
}

const WASI_P1: &str = "wasi_snapshot_preview1";

/// A subscription of `poll_oneoff` is 48 bytes: userdata u64, tag u8 (0 = clock), then at 16
/// the clock's id u32, at 24 its timeout u64, at 32 its precision u64, at 40 its flags u16.
const SUBSCRIPTION_BYTES: usize = 48;
const ABSOLUTE_TIME: u16 = 1;

impl CppLinker {
    pub(crate) fn new(engine: &Engine) -> wasmtime::Result<Self> {
        let mut wasi = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut wasi, |s: &mut CppState| &mut s.wasi)?;
        let mut capped = wasi.clone();
        capped.allow_shadowing(true);
        capped.func_wrap(
            WASI_P1,
            "poll_oneoff",
            |mut caller: Caller<'_, CppState>,
             subscriptions: i32,
             events: i32,
             count: i32,
             written: i32|
             -> wasmtime::Result<i32> {
                cap_clock_subscriptions(&mut caller, subscriptions as u32, count as u32)?;
                let poll = caller.data().poll_oneoff.expect("set before the run");
                let mut result = [Val::I32(0)];
                let args = [subscriptions, events, count, written].map(Val::I32);
                poll.call(&mut caller, &args, &mut result)?;
                Ok(result[0].unwrap_i32())
            },
        )?;
        Ok(Self { wasi, capped })
    }

    pub(crate) fn instantiate_pre(
        &self,
        module: &Module,
    ) -> wasmtime::Result<InstancePre<CppState>> {
        self.capped.instantiate_pre(module)
    }

    /// Gives `store` its WASI `poll_oneoff` for the capped one to call.
    pub(crate) fn prepare(&self, store: &mut Store<CppState>) -> wasmtime::Result<()> {
        let Extern::Func(poll) = self.wasi.get(&mut *store, WASI_P1, "poll_oneoff")? else {
            wasmtime::bail!("WASI's poll_oneoff is not a function");
        };
        store.data_mut().poll_oneoff = Some(poll);
        Ok(())
    }
}

/// Cuts every clock subscription to what is left of the run's time (in the guest's memory,
/// before WASI reads it): a blocked sleep is beyond epoch interruption's reach. A relative
/// sleep cut short is a TLE; an absolute one just wakes early, inside its epoch deadline's
/// reach.
fn cap_clock_subscriptions(
    caller: &mut Caller<'_, CppState>,
    subscriptions: u32,
    count: u32,
) -> wasmtime::Result<()> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        wasmtime::bail!("the module exports no memory");
    };
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    for i in 0..count as usize {
        let at = subscriptions as usize + i * SUBSCRIPTION_BYTES;
        let Some(sub) = data.get_mut(at..at + SUBSCRIPTION_BYTES) else {
            return Ok(()); // out of bounds: WASI itself reports the fault
        };
        if sub[8] != 0 {
            continue; // an fd subscription
        }
        let timeout = u64::from_le_bytes(sub[24..32].try_into().expect("8 bytes"));
        let flags = u16::from_le_bytes(sub[40..42].try_into().expect("2 bytes"));
        let capped = if flags & ABSOLUTE_TIME != 0 {
            sub[40..42].copy_from_slice(&(flags & !ABSOLUTE_TIME).to_le_bytes());
            state.sleep.left_nanos()
        } else {
            state.sleep.cap(timeout)
        };
        sub[24..32].copy_from_slice(&capped.to_le_bytes());
    }
    Ok(())
}

/// Runs `_start` of a linked C++ module in `store`; the error is what wasmtime reports.
pub(crate) fn run_module(
    pre: &InstancePre<CppState>,
    linker: &CppLinker,
    store: &mut Store<CppState>,
) -> wasmtime::Result<()> {
    linker.prepare(store)?;
    let instance = pre.instantiate(&mut *store)?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    start.call(&mut *store, ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_files_split_on_unescaped_spaces_across_continued_lines() {
        let text = "main.ii: main.cpp /usr/include/a.h \\\n  /tmp/with\\ space.h\n";
        assert_eq!(
            dependencies(text),
            ["main.cpp", "/usr/include/a.h", "/tmp/with space.h"].map(PathBuf::from)
        );
    }

    #[test]
    fn diagnostics_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_DIAGNOSTIC_BYTES);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_DIAGNOSTIC_BYTES && cut.chars().all(|c| c == 'é'));
    }
}
