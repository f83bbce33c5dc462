//! Runs launched from the web UI: child processes of the `oxtune` binary
//! itself (its `sft`, `pt`, `rlhf` or `export` subcommand, never a shell),
//! working in the workspace folder, their output in
//! `.oxtune-web-ui/<id>.log` there. A run's progress is read from its
//! `metrics.jsonl` (step, total steps, curves) and its checkpoints from its
//! output folder. Stopping a run kills it; checkpoints are written whole
//! or not at all, so the last one stays usable. Runs still going when the
//! UI exits are stopped with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

use crate::workspace::Workspace;

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Its process is alive.
    Running,
    /// It exited with status 0.
    Finished,
    /// It exited otherwise.
    Failed,
    /// The UI stopped it.
    Stopped,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
        }
    }
}

/// One launched run.
struct Run {
    id: String,
    subcommand: String,
    command_line: String,
    /// Its output folder (absolute), when it writes one with metrics.
    output_dir: Option<PathBuf>,
    log: PathBuf,
    started: Instant,
    ended: Option<Instant>,
    child: Child,
    status: RunStatus,
    exit_code: Option<i32>,
}

impl Run {
    /// Notices that the process ended.
    fn poll(&mut self) {
        if self.status != RunStatus::Running {
            return;
        }
        if let Ok(Some(exit)) = self.child.try_wait() {
            self.ended = Some(Instant::now());
            self.exit_code = exit.code();
            self.status = if exit.success() { RunStatus::Finished } else { RunStatus::Failed };
        }
    }
}

/// The runs of one web UI, newest last.
pub struct Runs {
    exe: PathBuf,
    workspace: Workspace,
    runs: Mutex<Vec<Run>>,
}

/// The records of a `metrics.jsonl` (unreadable lines skipped: the last
/// may be half-written while the run goes on).
pub fn read_metrics(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(Value::is_object).collect()
}

/// The last whole record of a `metrics.jsonl`, read from the file's end.
fn last_metrics(path: &Path) -> Option<Value> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    // A record is a few hundred bytes; 64 KiB holds the last whole ones.
    file.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok().filter(Value::is_object))
}

/// The complete `checkpoint-<step>` folders of `dir`, by step.
fn checkpoints(dir: &Path) -> Vec<String> {
    let mut found: Vec<(u64, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            e.path().is_dir().then_some((step, name))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, name)| name).collect()
}

impl Runs {
    /// Runs of the binary `exe` in `workspace`.
    pub fn new(exe: PathBuf, workspace: Workspace) -> Runs {
        Runs { exe, workspace, runs: Mutex::new(Vec::new()) }
    }

    /// The next run's id.
    pub fn next_id(&self) -> String {
        format!("run-{}", self.runs.lock().expect("not poisoned").len() + 1)
    }

    /// Starts `oxtune ARGV` in the workspace as run `id`; `output_dir` is
    /// where its metrics and checkpoints appear, if any.
    pub fn launch(&self, id: String, argv: &[String], output_dir: Option<PathBuf>) -> Result<Value, String> {
        let logs = self.workspace.root().join(".oxtune-web-ui");
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let log = logs.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.exe)
            .args(argv)
            .current_dir(self.workspace.root())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.exe.display()))?;
        let command_line = crate::command::command_line(argv);
        let run = Run {
            id: id.clone(),
            subcommand: argv.first().cloned().unwrap_or_default(),
            command_line: command_line.clone(),
            output_dir,
            log,
            started: Instant::now(),
            ended: None,
            child,
            status: RunStatus::Running,
            exit_code: None,
        };
        self.runs.lock().expect("not poisoned").push(run);
        Ok(json!({"id": id, "command_line": command_line}))
    }

    /// Every run, newest first, with its status and progress.
    pub fn list(&self) -> Vec<Value> {
        let mut runs = self.runs.lock().expect("not poisoned");
        runs.iter_mut().rev().map(|run| self.summary(run)).collect()
    }

    fn summary(&self, run: &mut Run) -> Value {
        run.poll();
        // The list is polled every second: only the last record is parsed.
        let last = run.output_dir.as_ref().and_then(|d| last_metrics(&d.join("metrics.jsonl")));
        let last = last.as_ref();
        let step = last.and_then(|r| r["step"].as_u64()).unwrap_or(0);
        let total = last.and_then(|r| r["total_steps"].as_u64());
        let elapsed = run.ended.unwrap_or_else(Instant::now).duration_since(run.started).as_secs_f64();
        let remaining = match (run.status, total) {
            (RunStatus::Running, Some(total)) if step > 0 => Some(elapsed / step as f64 * (total - step) as f64),
            _ => None,
        };
        json!({
            "id": run.id,
            "subcommand": run.subcommand,
            "command_line": run.command_line,
            "status": run.status.as_str(),
            "output_dir": run.output_dir.as_ref().map(|d| self.workspace.relative(d)),
            "step": step,
            "total_steps": total,
            "elapsed_s": elapsed,
            "remaining_s": remaining,
            "exit_code": run.exit_code,
            "checkpoints": run.output_dir.as_ref().map(|d| checkpoints(d)).unwrap_or_default(),
        })
    }

    /// The metrics records of run `id` (`None`: no such run).
    pub fn metrics(&self, id: &str) -> Option<Vec<Value>> {
        let runs = self.runs.lock().expect("not poisoned");
        let run = runs.iter().find(|r| r.id == id)?;
        Some(run.output_dir.as_ref().map(|d| read_metrics(&d.join("metrics.jsonl"))).unwrap_or_default())
    }

    /// The last 16 KiB of run `id`'s output.
    pub fn log(&self, id: &str) -> Option<String> {
        let path = self.runs.lock().expect("not poisoned").iter().find(|r| r.id == id)?.log.clone();
        let bytes = std::fs::read(&path).unwrap_or_default();
        let tail = &bytes[bytes.len().saturating_sub(16 << 10)..];
        // Progress bars redraw with carriage returns: keep each line's last state.
        let text = String::from_utf8_lossy(tail);
        let lines: Vec<&str> = text.split('\n').map(|l| l.rsplit('\r').next().unwrap_or(l)).collect();
        Some(lines.join("\n"))
    }

    /// Stops run `id` (`None`: no such run); its status after.
    pub fn stop(&self, id: &str) -> Option<&'static str> {
        let mut runs = self.runs.lock().expect("not poisoned");
        let run = runs.iter_mut().find(|r| r.id == id)?;
        run.poll();
        if run.status == RunStatus::Running {
            let _ = run.child.kill();
            let _ = run.child.wait();
            run.ended = Some(Instant::now());
            run.status = RunStatus::Stopped;
        }
        Some(run.status.as_str())
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        for run in self.runs.get_mut().expect("not poisoned") {
            if run.status == RunStatus::Running {
                let _ = run.child.kill();
                let _ = run.child.wait();
            }
        }
    }
}
