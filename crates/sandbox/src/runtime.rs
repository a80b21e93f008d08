//! The wasmtime side: an engine per language, the Python runner compiled once (cached on disk
//! by wasmtime's own cache, keyed by the module's hash and the engine's flags) and pre-linked,
//! C++ programs compiled and linked once per program (crate::cpp), and a fresh store per run,
//! so that nothing a program does survives into the next run.
//!
//! A run gets stdin from memory, stdout and stderr into capped memory pipes, the WASI
//! environment as its only other input, no preopened directories, no sockets, no threads or
//! processes (WASI has none). Time is bounded by epoch interruption (a ticker thread advances
//! the engine's epoch), memory by a resource limiter that refuses growth past the limit.
//!
//! Runs with a fuel limit go to a second set of engines that count fuel (wasmtime's
//! `consume_fuel`, about one unit per wasm instruction): running out is TLE whatever the
//! machine's load, so those verdicts are reproducible. Counting costs CPU, so those engines
//! (and their compiled runner, cached apart since the flags differ) are built on the first run
//! that asks for fuel.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstancePre, Module, ResourceLimiter, Store,
    StoreContextMut, Trap,
};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxView, WasiView};

use crate::cpp::{self, Compiled, Compiler, CppLinker, CppState};
use crate::{Result, SandboxError};

/// The WASI clock interface whose sleeps [`cap_sleeps`] bounds (the version wasmtime-wasi
/// =48.0.8 defines; components importing an older 0.2 resolve to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// How often the epoch advances: the granularity of time limits.
const TICK: Duration = Duration::from_millis(5);

/// Table elements a program may grow to (tables hold function references, not data: this
/// only stops a runaway growth loop).
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// The file name of the Python runner component under the runtime directory.
pub const PYTHON_RUNNER: &str = "python-runner.wasm";

/// Bounds on one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Wall-clock time.
    pub time: Duration,
    /// Linear memory, in bytes, summed over the instance's memories.
    pub memory_bytes: usize,
    /// Bytes the program may write to stdout (and, separately, to stderr).
    pub output_bytes: usize,
    /// Fuel (about one unit per wasm instruction the program, or the interpreter running it,
    /// executes). When set, a run that uses it up is TLE however busy the machine is, so the
    /// verdict is deterministic; the time limit stays as a backstop (sleeps use no fuel).
    /// Default: none, time alone.
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            output_bytes: 16 << 20,
            fuel: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `run` returned: Ok(()) or Err(()) (exit code 0 or 1).
    Code(i32),
    /// Stopped at the time limit.
    TimedOut,
    /// Used up its fuel.
    OutOfFuel,
    /// A memory growth was refused and the program trapped or failed because of it.
    OutOfMemory,
    /// Filled stdout or stderr up to the output limit.
    OutputLimit,
    /// A wasm trap: stack overflow, unreachable, out-of-bounds access.
    Trap(String),
    /// The program did not compile (C++), with the compiler's diagnostics; it never ran.
    CompileError(String),
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub wall: Duration,
    /// A memory growth was refused during the run (the program may have survived it).
    pub memory_refused: bool,
    /// Fuel the run used, when it ran with a fuel limit: the same for every run of a program
    /// on an input, which makes it the measure to set fuel limits from.
    pub fuel_used: Option<u64>,
}

/// The store's data: WASI state and our limiter.
struct RunState {
    ctx: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    sleep: SleepCap,
}

/// No sleep of the guest's outlasts the run's deadline.
pub(crate) struct SleepCap {
    deadline: Instant,
    /// The guest asked to sleep past the deadline and was woken early: a TLE by definition,
    /// whatever it does next (the epoch ticker may lag the wall clock by a tick or two).
    cut: bool,
}

impl SleepCap {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            deadline: Instant::now() + limit,
            cut: false,
        }
    }

    /// What is left before the deadline plus two epoch ticks, in nanoseconds: a guest woken
    /// then is past its epoch deadline and traps on its next instructions.
    pub(crate) fn left_nanos(&self) -> u64 {
        let left = self.deadline.saturating_duration_since(Instant::now()) + 2 * TICK;
        left.as_nanos().try_into().unwrap_or(u64::MAX)
    }

    /// `nanos` of sleep, cut to [`left_nanos`](Self::left_nanos).
    pub(crate) fn cap(&mut self, nanos: u64) -> u64 {
        let left = self.left_nanos();
        self.cut |= nanos > left;
        nanos.min(left)
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did.
pub(crate) struct MemoryLimiter {
    limit: usize,
    refused: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            refused: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.limit;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The engines and the pre-linked runners. Cheap to share across threads (`&Sandbox` is
/// `Sync`); every run makes its own store.
pub struct Sandbox {
    runtime_dir: PathBuf,
    /// Where compiled machine code is kept (wasmtime's cache and C++ builds).
    cache_dir: PathBuf,
    /// Runs with no fuel limit.
    timed: Runners,
    /// Runs with a fuel limit, built on the first one (or why they could not be).
    metered: OnceLock<std::result::Result<Runners, String>>,
    /// The C++ compiler, or why this machine cannot run C++ (the toolchain is not installed).
    compiler: std::result::Result<Compiler, String>,
    ticker: Ticker,
}

/// Engines and pre-linked runners of one kind: counting fuel or not.
struct Runners {
    engine: Engine,
    python: CommandPre<RunState>,
    /// None when there is no C++ compiler.
    cpp: Option<CppRuntime>,
}

/// Its own engine: C++ recursion needs a deeper machine stack than CPython's interpreter
/// loop, and every C++ run gets a thread with that stack.
struct CppRuntime {
    engine: Engine,
    linker: CppLinker,
}

/// A C++ program compiled and linked, ready for a store per test; or why it is not.
pub(crate) enum CppProgram {
    Ready(InstancePre<CppState>),
    CompileError(String),
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").finish_non_exhaustive()
    }
}

impl Runners {
    /// Compiles (or loads from the cache) and links the runners for engines that count fuel
    /// or not; C++ only when there is a compiler.
    fn new(runtime_dir: &Path, cache_dir: &Path, fuel: bool, cpp: bool) -> Result<Self> {
        let runner = runtime_dir.join(PYTHON_RUNNER);
        if !runner.is_file() {
            return Err(SandboxError::MissingRuntime(runner));
        }
        let wasm = |e: wasmtime::Error| SandboxError::Wasmtime(format!("{e:#}"));
        let engine = new_engine(cache_dir, None, fuel)?;

        let started = Instant::now();
        let component = Component::from_file(&engine, &runner)
            .map_err(|e| SandboxError::Wasmtime(format!("loading {}: {e:#}", runner.display())))?;
        tracing::debug!(elapsed = ?started.elapsed(), runner = %runner.display(), fuel, "python runner ready");
        let mut linker = Linker::<RunState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wasm)?;
        cap_sleeps(&mut linker).map_err(wasm)?;
        let python =
            CommandPre::new(linker.instantiate_pre(&component).map_err(wasm)?).map_err(wasm)?;
        let cpp = if cpp {
            let engine = new_engine(cache_dir, Some(cpp::WASM_STACK_BYTES), fuel)?;
            let linker = CppLinker::new(&engine).map_err(wasm)?;
            Some(CppRuntime { engine, linker })
        } else {
            None
        };
        Ok(Self {
            engine,
            python,
            cpp,
        })
    }

    fn engines(&self) -> Vec<Engine> {
        let mut engines = vec![self.engine.clone()];
        engines.extend(self.cpp.as_ref().map(|c| c.engine.clone()));
        engines
    }
}

impl Sandbox {
    /// Loads the runners scripts/setup built from where this installation keeps them, with
    /// the compile cache this user may write (`prefloop_core::paths`).
    pub fn open_default() -> Result<Self> {
        Self::open_with_cache(
            &default_runtime_dir(),
            &prefloop_core::paths::sandbox_cache_dir(),
        )
    }

    /// Loads the runners from `runtime_dir` (scripts/setup builds them into
    /// `.prefloop/sandbox`), compiling them on first use and caching the machine code in
    /// `cache_dir`: code this process will run, so a directory only this user can write.
    pub fn open_with_cache(runtime_dir: &Path, cache_dir: &Path) -> Result<Self> {
        // wasmtime's cache refuses a relative directory.
        let absolute = |dir: &Path| {
            std::path::absolute(dir)
                .map_err(|e| SandboxError::Io(format!("{}: {e}", dir.display())))
        };
        let (runtime_dir, cache_dir) = (&absolute(runtime_dir)?, &absolute(cache_dir)?);
        let compiler = Compiler::find(runtime_dir, cache_dir).map_err(|e| e.to_string());
        let timed = Runners::new(runtime_dir, cache_dir, false, compiler.is_ok())?;
        Ok(Self {
            ticker: Ticker::start(timed.engines()),
            runtime_dir: runtime_dir.clone(),
            cache_dir: cache_dir.clone(),
            timed,
            metered: OnceLock::new(),
            compiler,
        })
    }

    /// Whether this sandbox can run `language`: C++ needs the toolchain scripts/setup installs.
    pub fn check_language(&self, language: crate::Language) -> Result<()> {
        match language {
            crate::Language::Cpp => self.compiler().map(|_| ()),
            crate::Language::Python => Ok(()),
        }
    }

    fn compiler(&self) -> Result<&Compiler> {
        self.compiler
            .as_ref()
            .map_err(|why| SandboxError::MissingToolchain(why.clone()))
    }

    /// The runners for runs under `limits`: those that count fuel when it sets a fuel limit.
    fn runners(&self, limits: &Limits) -> Result<&Runners> {
        if limits.fuel.is_none() {
            return Ok(&self.timed);
        }
        self.metered
            .get_or_init(|| {
                let runners = Runners::new(
                    &self.runtime_dir,
                    &self.cache_dir,
                    true,
                    self.compiler.is_ok(),
                )
                .map_err(|e| e.to_string())?;
                self.ticker.add(runners.engines());
                Ok(runners)
            })
            .as_ref()
            .map_err(|why| SandboxError::Wasmtime(format!("the fuel-counting engines: {why}")))
    }

    fn cpp(&self, limits: &Limits) -> Result<&CppRuntime> {
        self.compiler()?;
        Ok(self
            .runners(limits)?
            .cpp
            .as_ref()
            .expect("C++ runners exist whenever the compiler does"))
    }

    /// Compiles and links a C++ program for runs under `limits` (compiles are cached on disk
    /// by source).
    pub(crate) fn prepare_cpp(&self, source: &str, limits: &Limits) -> Result<CppProgram> {
        let cpp = self.cpp(limits)?;
        let path = match self.compiler()?.compile(source)? {
            Compiled::Module(path) => path,
            Compiled::Error(message) => return Ok(CppProgram::CompileError(message)),
        };
        let wasm =
            |e: wasmtime::Error| SandboxError::Wasmtime(format!("{}: {e:#}", path.display()));
        let module = Module::from_file(&cpp.engine, &path).map_err(wasm)?;
        Ok(CppProgram::Ready(
            cpp.linker.instantiate_pre(&module).map_err(wasm)?,
        ))
    }

    /// Runs a linked C++ program once on `stdin`, on a thread of its own with the deep
    /// stack C++ recursion needs.
    pub(crate) fn run_cpp(
        &self,
        program: &InstancePre<CppState>,
        stdin: &[u8],
        limits: &Limits,
    ) -> Result<RunOutput> {
        let cpp = self.cpp(limits)?;
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("sandbox-cpp".into())
                .stack_size(cpp::RUN_THREAD_STACK_BYTES)
                .spawn_scoped(scope, || cpp.run(program, stdin, limits))
                .map_err(|e| SandboxError::Io(format!("starting a C++ run's thread: {e}")))?
                .join()
                .map_err(|_| SandboxError::Wasmtime("a C++ run's thread panicked".into()))?
        })
    }

    /// Runs the Python runner once: `env` is the WASI environment (the runner reads the program
    /// and its mode from it), `stdin` the test's input.
    pub fn run_python(
        &self,
        env: &[(&str, &str)],
        stdin: &[u8],
        limits: &Limits,
    ) -> Result<RunOutput> {
        let io = Io::new(stdin, limits);
        let ctx = io.wasi().envs(env).build();
        let state = RunState {
            ctx,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(limits.memory_bytes),
            sleep: SleepCap::new(limits.time),
        };
        let runners = self.runners(limits)?;
        let mut store = Store::new(&runners.engine, state);
        store.limiter(|s| &mut s.limiter);
        set_limits(&mut store, limits)?;

        let started = Instant::now();
        let result = runners
            .python
            .instantiate(&mut store)
            .and_then(|command| command.wasi_cli_run().call_run(&mut store))
            .map(|run| match run {
                Ok(()) => 0,
                Err(()) => 1,
            });
        let ended = Ended::of(&store, started, limits);
        drop(store);
        io.output(result, ended, limits)
    }
}

impl CppRuntime {
    fn run(
        &self,
        program: &InstancePre<CppState>,
        stdin: &[u8],
        limits: &Limits,
    ) -> Result<RunOutput> {
        let io = Io::new(stdin, limits);
        let wasi = io.wasi().arg("main").build_p1();
        let state = CppState::new(
            wasi,
            MemoryLimiter::new(limits.memory_bytes),
            SleepCap::new(limits.time),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        set_limits(&mut store, limits)?;

        let started = Instant::now();
        let result = cpp::run_module(program, &self.linker, &mut store).map(|()| 0);
        let ended = Ended::of(&store, started, limits);
        drop(store);
        io.output(result, ended, limits)
    }
}

/// A run's stdin from memory and its stdout and stderr into capped memory pipes.
struct Io {
    stdin: MemoryInputPipe,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl Io {
    fn new(stdin: &[u8], limits: &Limits) -> Self {
        Self {
            stdin: MemoryInputPipe::new(stdin.to_vec()),
            stdout: MemoryOutputPipe::new(limits.output_bytes),
            stderr: MemoryOutputPipe::new(limits.output_bytes),
        }
    }

    /// A WASI context with these pipes and no network.
    fn wasi(&self) -> wasmtime_wasi::WasiCtxBuilder {
        let mut builder = WasiCtx::builder();
        builder
            .stdin(self.stdin.clone())
            .stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        builder
    }

    /// How the run ended, from its result (the exit code, or wasmtime's error) and what it
    /// wrote.
    fn output(
        self,
        result: wasmtime::Result<i32>,
        ended: Ended,
        limits: &Limits,
    ) -> Result<RunOutput> {
        let (stdout, stderr) = (
            self.stdout.contents().to_vec(),
            self.stderr.contents().to_vec(),
        );
        // A full pipe refuses further writes (the guest sees a broken pipe, and usually dies of
        // it): filled to the byte, it was the output limit whatever happened next.
        let full = stdout.len() >= limits.output_bytes || stderr.len() >= limits.output_bytes;
        let exit = match result {
            _ if full => Exit::OutputLimit,
            _ if ended.sleep_cut => Exit::TimedOut,
            Ok(code) => Exit::Code(code),
            Err(e) => classify(&e, ended.memory_refused)?,
        };
        Ok(RunOutput {
            exit,
            stdout,
            stderr,
            wall: ended.wall,
            memory_refused: ended.memory_refused,
            fuel_used: ended.fuel_used,
        })
    }
}

/// What a store knows when its run has ended.
struct Ended {
    wall: Duration,
    /// A memory growth was refused.
    memory_refused: bool,
    /// A sleep was cut at the deadline.
    sleep_cut: bool,
    fuel_used: Option<u64>,
}

impl Ended {
    fn of<T: Limited>(store: &Store<T>, started: Instant, limits: &Limits) -> Self {
        let wall = started.elapsed();
        let (limiter, sleep) = store.data().limits();
        Self {
            wall,
            memory_refused: limiter.refused,
            sleep_cut: sleep.cut,
            fuel_used: limits
                .fuel
                .map(|fuel| fuel - store.get_fuel().unwrap_or(0).min(fuel)),
        }
    }
}

/// A store's data that carries the run's limiter and sleep cap.
trait Limited {
    fn limits(&self) -> (&MemoryLimiter, &SleepCap);
}

impl Limited for RunState {
    fn limits(&self) -> (&MemoryLimiter, &SleepCap) {
        (&self.limiter, &self.sleep)
    }
}

impl Limited for CppState {
    fn limits(&self) -> (&MemoryLimiter, &SleepCap) {
        (&self.limiter, &self.sleep)
    }
}

/// An engine with epoch interruption and the on-disk cache of compiled code; `max_stack`
/// raises the machine stack wasm may use (its runs must then be on threads that have it);
/// `fuel` makes it count fuel.
fn new_engine(cache_dir: &Path, max_stack: Option<usize>, fuel: bool) -> Result<Engine> {
    let wasm = |e: wasmtime::Error| SandboxError::Wasmtime(format!("{e:#}"));
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(fuel);
    if let Some(bytes) = max_stack {
        // wasmtime-wasi's p2 enables async support, which checks its (unused) fiber stacks
        // can hold the wasm stack.
        config.async_stack_size(bytes + (1 << 20));
        config.max_wasm_stack(bytes);
    }
    let mut cache = CacheConfig::new();
    cache.with_directory(cache_dir);
    config.cache(Some(Cache::new(cache).map_err(wasm)?));
    Engine::new(&config).map_err(wasm)
}

/// Traps the run once its time limit's worth of epoch ticks have passed, or its fuel is used.
fn set_limits<T>(store: &mut Store<T>, limits: &Limits) -> Result<()> {
    let ticks = limits.time.as_millis().div_ceil(TICK.as_millis()).max(1) as u64;
    store.set_epoch_deadline(ticks);
    store.epoch_deadline_trap();
    if let Some(fuel) = limits.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| SandboxError::Wasmtime(format!("setting the fuel: {e:#}")))?;
    }
    Ok(())
}

/// The WASI monotonic clock's sleeps, cut short at the run's deadline. Epoch interruption stops
/// only wasm code: a guest blocked in the host's poll (`time.sleep`, `select` with a timeout)
/// would otherwise hold its worker for as long as it asked. Cut at the deadline, it wakes past
/// its epoch deadline and traps as a TLE.
fn cap_sleeps(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::clocks::WasiClocksView;
    use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host;

    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, RunState>, (nanos,): (u64,)| {
            let state = store.data_mut();
            let capped = state.sleep.cap(nanos);
            Ok((state.clocks().subscribe_duration(capped)?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, RunState>, (when,): (u64,)| {
            let state = store.data_mut();
            let now = state.clocks().now()?;
            let capped = now.saturating_add(state.sleep.cap(when.saturating_sub(now)));
            Ok((state.clocks().subscribe_instant(capped)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Turns a wasmtime error out of a run into how the program ended; an error that is no fault
/// of the program's is ours.
fn classify(error: &wasmtime::Error, memory_refused: bool) -> Result<Exit> {
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return Ok(Exit::Code(exit.0));
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return Ok(match trap {
            Trap::Interrupt => Exit::TimedOut,
            Trap::OutOfFuel => Exit::OutOfFuel,
            _ if memory_refused => Exit::OutOfMemory,
            other => Exit::Trap(other.to_string()),
        });
    }
    let message = format!("{error:#}");
    if memory_refused {
        return Ok(Exit::OutOfMemory);
    }
    Err(SandboxError::Wasmtime(message))
}

/// Advances the engines' epochs every tick until the sandbox is dropped.
struct Ticker {
    engines: Arc<Mutex<Vec<Engine>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(engines: Vec<Engine>) -> Self {
        let engines = Arc::new(Mutex::new(engines));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, ticked) = (Arc::clone(&stop), Arc::clone(&engines));
        let thread = std::thread::Builder::new()
            .name("sandbox-epoch".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let engines = ticked.lock().unwrap_or_else(|e| e.into_inner());
                    engines.iter().for_each(Engine::increment_epoch);
                }
            })
            .expect("spawning the epoch thread");
        Self {
            engines,
            stop,
            thread: Some(thread),
        }
    }

    /// Ticks these engines too from now on.
    fn add(&self, engines: Vec<Engine>) {
        self.engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(engines);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where scripts/setup puts the runners and their compile cache
/// (`prefloop_core::paths::sandbox_dir`, absolute and the same from any working directory).
pub fn default_runtime_dir() -> PathBuf {
    prefloop_core::paths::sandbox_dir()
}
