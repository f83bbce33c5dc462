//! Reward functions as sandboxed WebAssembly modules (wasmtime).
//!
//! # The core-module interface (API 1)
//!
//! A reward script is a core wasm module (`.wasm`, or `.wat` text) that
//! exports:
//!
//! - `memory`;
//! - `oxtune_alloc(len: i32) -> i32`: a buffer of `len` bytes the host
//!   writes an input into;
//! - `oxtune_reward(prompt_ptr, prompt_len, completion_ptr, completion_len,
//!   columns_ptr, columns_len: i32) -> f64`: the score of one sample. The
//!   prompt and completion are UTF-8; the columns are the row's other
//!   columns as a UTF-8 JSON object.
//!
//! # The sandbox
//!
//! Each sample runs in a fresh instance (no state leaks between samples),
//! with a fuel budget (a deterministic deadline: an infinite loop ends in a
//! clear error) and a memory cap. The module may import nothing but what the
//! user granted: `clock` gives WASI's `clock_time_get`, `env:NAME` gives
//! WASI's `environ_get` / `environ_sizes_get` with the variable `NAME`.
//! There is no file system or network: a module importing anything else is
//! refused at load, naming the import.
//!
//! A `.wasm` file may also be a component of the typed WIT world
//! `oxtune:reward` (`registry/wit/reward.wit`); it gets the same sandbox.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use oxtune_plugin_api::RewardSample;
use wasmtime::{Caller, Config, Engine, Extern, ExternType, Linker, Module, ResourceLimiter, Store, Trap, ValType};

use crate::RegistryError;

const WASI: &str = "wasi_snapshot_preview1";

/// What reward scripts may use. The default grants nothing.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// The most linear memory one instance may hold, in bytes.
    pub memory_limit: usize,
    /// The fuel (roughly, wasm instructions) one sample may burn.
    pub fuel_per_sample: u64,
    /// Whether WASI's wall clock is available.
    pub grant_clock: bool,
    /// Environment variables made visible through WASI, with their values.
    pub granted_env: Vec<(String, String)>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_limit: 64 << 20,
            fuel_per_sample: 1_000_000_000,
            grant_clock: false,
            granted_env: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// Applies one `--wasm-grant` value: `clock` or `env:NAME`.
    pub fn grant(&mut self, what: &str) -> Result<(), String> {
        if what == "clock" {
            self.grant_clock = true;
            Ok(())
        } else if let Some(name) = what.strip_prefix("env:") {
            let value = std::env::var(name).unwrap_or_default();
            self.granted_env.push((name.to_owned(), value));
            Ok(())
        } else {
            Err(format!(
                "unknown sandbox grant `{what}`: use `clock` or `env:NAME` (files and sockets cannot be granted)"
            ))
        }
    }
}

/// The one fuel-metered engine every reward script (module or component) runs on.
pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.consume_fuel(true);
        Engine::new(&config).expect("a fuel-metered wasmtime engine is always configurable")
    })
}

/// Per-instance state: the memory cap and whether it was hit.
pub(crate) struct SandboxState {
    memory_limit: usize,
    denied_growth: Option<usize>,
    env: Vec<(String, String)>,
}

impl ResourceLimiter for SandboxState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.denied_growth = Some(desired);
            return Err(wasmtime::Error::msg("memory cap reached"));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A loaded reward script.
pub struct WasmReward {
    name: String,
    path: PathBuf,
    script: Script,
    config: SandboxConfig,
}

/// The two kinds of reward script.
enum Script {
    /// A core module with the `oxtune_alloc` / `oxtune_reward` ABI.
    Core { module: Module, linker: Linker<SandboxState> },
    /// A component of the `oxtune:reward` WIT world.
    Component(crate::component::ComponentScript),
}

impl std::fmt::Debug for WasmReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmReward").field("name", &self.name).field("path", &self.path).finish()
    }
}

/// Whether a file name looks like a reward script.
pub fn is_wasm_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("wasm" | "wat"))
}

fn advice_for(module: &str, name: &str) -> String {
    match (module, name) {
        (WASI, "clock_time_get" | "clock_res_get") => "grant it with --wasm-grant clock".into(),
        (WASI, "environ_get" | "environ_sizes_get") => "grant variables with --wasm-grant env:NAME".into(),
        (WASI, n) if n.starts_with("fd_") || n.starts_with("path_") => {
            "reward scripts get no file system: pass what they need as dataset columns".into()
        }
        (WASI, n) if n.starts_with("sock_") => "reward scripts get no network".into(),
        _ => "a reward script may import only what --wasm-grant allows (clock, env:NAME)".into(),
    }
}

impl WasmReward {
    /// Compiles and checks the script at `path`; its name is the file stem.
    pub fn load(path: &Path, config: &SandboxConfig) -> Result<WasmReward, RegistryError> {
        let bytes = std::fs::read(path).map_err(|source| RegistryError::Io { path: path.to_owned(), cause: source })?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("reward").to_owned();
        if crate::component::is_component(&bytes) {
            let script = Script::Component(crate::component::ComponentScript::load(path, engine(), &bytes)?);
            return Ok(WasmReward { name, path: path.to_owned(), script, config: config.clone() });
        }
        let module = Module::new(engine(), &bytes).map_err(|e| RegistryError::InvalidWasm {
            path: path.to_owned(),
            reason: e.to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
        let linker = Self::linker(path, &module, config)?;
        Self::check_exports(path, &module)?;
        Ok(WasmReward { name, path: path.to_owned(), script: Script::Core { module, linker }, config: config.clone() })
    }

    /// The script's name (its file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The script's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn linker(path: &Path, module: &Module, config: &SandboxConfig) -> Result<Linker<SandboxState>, RegistryError> {
        let mut linker = Linker::new(engine());
        for import in module.imports() {
            let granted = match (import.module(), import.name()) {
                (WASI, "clock_time_get") => config.grant_clock,
                (WASI, "environ_get" | "environ_sizes_get") => !config.granted_env.is_empty(),
                _ => false,
            };
            if !granted {
                return Err(RegistryError::ForbiddenImport {
                    path: path.to_owned(),
                    module: import.module().to_owned(),
                    name: import.name().to_owned(),
                    advice: advice_for(import.module(), import.name()),
                });
            }
        }
        let wire = |r: wasmtime::Result<&mut Linker<SandboxState>>| {
            r.map(|_| ()).map_err(|e| RegistryError::BadInterface { path: path.to_owned(), reason: e.to_string() })
        };
        if config.grant_clock {
            wire(linker.func_wrap(WASI, "clock_time_get", clock_time_get))?;
        }
        if !config.granted_env.is_empty() {
            wire(linker.func_wrap(WASI, "environ_sizes_get", environ_sizes_get))?;
            wire(linker.func_wrap(WASI, "environ_get", environ_get))?;
        }
        Ok(linker)
    }

    fn check_exports(path: &Path, module: &Module) -> Result<(), RegistryError> {
        let bad = |reason: String| RegistryError::BadInterface { path: path.to_owned(), reason };
        let func = |name: &str| match module.get_export(name) {
            Some(ExternType::Func(f)) => Ok(f),
            Some(_) => Err(bad(format!("exports `{name}` but not as a function"))),
            None => Err(bad(format!("does not export `{name}`"))),
        };
        let signature = |f: &wasmtime::FuncType| {
            let params: Vec<String> = f.params().map(|p| p.to_string()).collect();
            let results: Vec<String> = f.results().map(|p| p.to_string()).collect();
            format!("({}) -> ({})", params.join(", "), results.join(", "))
        };
        let is = |t: &ValType, want: &ValType| t.matches(want);
        let alloc = func("oxtune_alloc")?;
        let alloc_ok = alloc.params().len() == 1
            && alloc.params().all(|p| is(&p, &ValType::I32))
            && alloc.results().len() == 1
            && alloc.results().all(|r| is(&r, &ValType::I32));
        if !alloc_ok {
            return Err(bad(format!("exports `oxtune_alloc` as {}, expected (i32) -> (i32)", signature(&alloc))));
        }
        let reward = func("oxtune_reward")?;
        let reward_ok = reward.params().len() == 6
            && reward.params().all(|p| is(&p, &ValType::I32))
            && reward.results().len() == 1
            && reward.results().all(|r| is(&r, &ValType::F64));
        if !reward_ok {
            return Err(bad(format!(
                "exports `oxtune_reward` as {}, expected (i32, i32, i32, i32, i32, i32) -> (f64)",
                signature(&reward)
            )));
        }
        match module.get_export("memory") {
            Some(ExternType::Memory(_)) => Ok(()),
            _ => Err(bad("does not export its `memory`".into())),
        }
    }

    /// Scores each sample in its own fresh instance; one result per sample.
    pub fn score_each(&self, samples: &[RewardSample]) -> Vec<Result<f64, RegistryError>> {
        samples.iter().enumerate().map(|(i, s)| self.score_one(i, s)).collect()
    }

    /// Scores a batch, failing on the first sample that fails.
    pub fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>, RegistryError> {
        self.score_each(samples).into_iter().collect()
    }

    fn score_one(&self, index: usize, sample: &RewardSample) -> Result<f64, RegistryError> {
        let fail = |reason: String| RegistryError::WasmSample { script: self.name.clone(), index, reason };
        let state = SandboxState {
            memory_limit: self.config.memory_limit,
            denied_growth: None,
            env: self.config.granted_env.clone(),
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.set_fuel(self.config.fuel_per_sample).map_err(|e| fail(e.to_string()))?;
        let result = match &self.script {
            Script::Core { module, linker } => Self::run(module, linker, &mut store, sample),
            Script::Component(component) => component.run(&mut store, sample),
        };
        let score = result.map_err(|e| fail(self.explain(&store, e)))?;
        if !score.is_finite() {
            return Err(fail(format!("it returned a non-finite score ({score})")));
        }
        Ok(score)
    }

    fn run(
        module: &Module,
        linker: &Linker<SandboxState>,
        store: &mut Store<SandboxState>,
        sample: &RewardSample,
    ) -> wasmtime::Result<f64> {
        let instance = linker.instantiate(&mut *store, module)?;
        let memory =
            instance.get_memory(&mut *store, "memory").ok_or_else(|| wasmtime::Error::msg("no exported memory"))?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut *store, "oxtune_alloc")?;
        let reward = instance.get_typed_func::<(i32, i32, i32, i32, i32, i32), f64>(&mut *store, "oxtune_reward")?;
        let columns = serde_json::Value::Object(sample.columns.clone()).to_string();
        let mut args = [0i32; 6];
        for (k, text) in [sample.prompt.as_str(), sample.completion.as_str(), columns.as_str()].iter().enumerate() {
            let len = i32::try_from(text.len()).map_err(|_| wasmtime::Error::msg("input larger than 2 GiB"))?;
            let ptr = alloc.call(&mut *store, len)?;
            memory.write(&mut *store, ptr as u32 as usize, text.as_bytes()).map_err(|_| {
                wasmtime::Error::msg(format!("oxtune_alloc({len}) returned an out-of-bounds pointer {ptr}"))
            })?;
            args[2 * k] = ptr;
            args[2 * k + 1] = len;
        }
        reward.call(&mut *store, args.into())
    }

    fn explain(&self, store: &Store<SandboxState>, e: wasmtime::Error) -> String {
        if let Some(bytes) = store.data().denied_growth {
            return format!(
                "it tried to grow its memory to {} MiB, past the sandbox cap of {} MiB",
                bytes >> 20,
                self.config.memory_limit >> 20
            );
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => format!(
                "it ran past its deadline ({} units of fuel) and was stopped; an infinite loop?",
                self.config.fuel_per_sample
            ),
            Some(trap) => format!("it trapped: {trap}"),
            None => e.to_string().lines().next().unwrap_or_default().to_owned(),
        }
    }
}

fn memory_of(caller: &mut Caller<'_, SandboxState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::Error::msg("WASI call from a module without exported memory")),
    }
}

fn clock_time_get(
    mut caller: Caller<'_, SandboxState>,
    _clock: i32,
    _precision: i64,
    out: i32,
) -> wasmtime::Result<i32> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let memory = memory_of(&mut caller)?;
    memory.write(&mut caller, out as u32 as usize, &nanos.to_le_bytes())?;
    Ok(0)
}

fn environ_sizes_get(mut caller: Caller<'_, SandboxState>, count_out: i32, size_out: i32) -> wasmtime::Result<i32> {
    let env = &caller.data().env;
    let count = env.len() as u32;
    let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let memory = memory_of(&mut caller)?;
    memory.write(&mut caller, count_out as u32 as usize, &count.to_le_bytes())?;
    memory.write(&mut caller, size_out as u32 as usize, &(size as u32).to_le_bytes())?;
    Ok(0)
}

fn environ_get(mut caller: Caller<'_, SandboxState>, ptrs: i32, buf: i32) -> wasmtime::Result<i32> {
    let env = caller.data().env.clone();
    let memory = memory_of(&mut caller)?;
    let mut at = buf as u32 as usize;
    for (i, (k, v)) in env.iter().enumerate() {
        let entry = format!("{k}={v}\0");
        memory.write(&mut caller, ptrs as u32 as usize + 4 * i, &(at as u32).to_le_bytes())?;
        memory.write(&mut caller, at, entry.as_bytes())?;
        at += entry.len();
    }
    Ok(0)
}
