//! How much memory this process has used (for metrics and benchmarks),
//! and how much more it can take (to refuse a training shape up front).

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_resident_bytes() -> Option<u64> {
    proc_bytes("/proc/self/status", "VmHWM:")
}

/// The `KEY: N kB` line of a `/proc` file (`/proc/meminfo`,
/// `/proc/self/status`), in bytes.
fn proc_bytes(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let kib: u64 = text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How much more memory this process can take, and what sets that limit.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes this process can still allocate.
    pub bytes: u64,
    /// Where the limit comes from (`the machine's available memory`, ...),
    /// for a message.
    pub limit: &'static str,
}

/// The tightest of the limits on this process's further allocations
/// (Linux): the machine's available memory (`MemAvailable`), the cgroup's
/// memory limit less its use (a container), and the address-space limit
/// (`ulimit -v`) less what the process has mapped. `None` when none is
/// known (another OS).
pub fn budget() -> Option<MemoryBudget> {
    let machine = proc_bytes("/proc/meminfo", "MemAvailable:")
        .map(|bytes| MemoryBudget { bytes, limit: "the machine's available memory (MemAvailable)" });
    let cgroup = cgroup_room().map(|bytes| MemoryBudget { bytes, limit: "the container's memory limit (cgroup)" });
    let address_space =
        address_space_room().map(|bytes| MemoryBudget { bytes, limit: "the address-space limit (ulimit -v)" });
    [machine, cgroup, address_space].into_iter().flatten().min_by_key(|b| b.bytes)
}

/// The memory limit of this process's cgroup less its use: cgroup v2's
/// `memory.max − memory.current`, or v1's `memory.limit_in_bytes −
/// memory.usage_in_bytes`; `None` without a limit.
fn cgroup_room() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = std::path::Path::new("/sys/fs/cgroup");
    let read =
        |dir: &std::path::Path, file: &str| std::fs::read_to_string(dir.join(file)).ok()?.trim().parse::<u64>().ok();
    let v1 = groups.lines().find_map(|l| l.split_once(":memory:").map(|(_, path)| path));
    let (limit, used) = match v1 {
        Some(path) => {
            let dir = root.join("memory").join(path.trim_start_matches('/'));
            (read(&dir, "memory.limit_in_bytes")?, read(&dir, "memory.usage_in_bytes")?)
        }
        None => {
            let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
            let dir = root.join(path.trim_start_matches('/'));
            // `max` (no limit) does not parse: no budget from the cgroup.
            (read(&dir, "memory.max")?, read(&dir, "memory.current")?)
        }
    };
    // v1 states "no limit" as a page-rounded i64::MAX.
    (limit < 1 << 62).then(|| limit.saturating_sub(used))
}

/// `RLIMIT_AS` less this process's mapped size (`VmSize`), when a limit is set.
#[cfg(target_os = "linux")]
fn address_space_room() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some((limit.rlim_cur as u64).saturating_sub(proc_bytes("/proc/self/status", "VmSize:")?))
}

/// No address-space limit is read off other systems.
#[cfg(not(target_os = "linux"))]
fn address_space_room() -> Option<u64> {
    None
}
