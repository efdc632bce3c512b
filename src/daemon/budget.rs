//! The daemon's memory budget, known before anything big is allocated: the weights (mapped
//! from the model file), the KV cache and scratch buffers (from the model's header and the
//! config), the session store (`sessions.max_bytes`) and the runtime around them. It is checked
//! against `memory.max_bytes` and the cgroup `memory.max` (v2; v1's `memory.limit_in_bytes`)
//! of the daemon's cgroup and its ancestors, so that a board short of memory gets a message
//! naming the numbers at start, not an OOM kill a week later.

use std::path::Path;

pub use crate::api::status::{Budget, Limit};
use crate::backend::MemoryPlan;

/// Code, stacks, tokenizer tables, the async runtime and allocator slack: the daemon's resident
/// memory minus the other parts (KV counted for the positions written), measured on SmolLM2 on
/// x86-64 after three 200-token answers: 160.3 − 92.1 − 13.6 − 10.5 = 44 MiB; rounded up.
pub const RUNTIME_BYTES: u64 = 48 << 20;

/// The budget of a model `plan` with a session store of `sessions` bytes, against `max_bytes`
/// (0: none) and the cgroup limit found on this machine.
pub fn budget(plan: &MemoryPlan, sessions: u64, max_bytes: u64, cgroup: Option<Limit>) -> Budget {
    let total = plan.weights + plan.kv_cache + plan.scratch + sessions + RUNTIME_BYTES;
    let config = (max_bytes > 0).then(|| Limit {
        bytes: max_bytes,
        source: "memory.max_bytes".into(),
    });
    let limit = [config, cgroup]
        .into_iter()
        .flatten()
        .min_by_key(|l| l.bytes);
    Budget {
        weights: plan.weights,
        kv_cache: plan.kv_cache,
        scratch: plan.scratch,
        sessions,
        runtime: RUNTIME_BYTES,
        total,
        limit,
    }
}

/// The smallest memory limit of the cgroup named in `proc_self_cgroup` (the text of
/// /proc/self/cgroup) and of its ancestors, under the cgroup mount `root`: cgroup v2's
/// `memory.max` ("0::/path"), or cgroup v1's `memory.limit_in_bytes` (a "N:memory:/path" line,
/// under `root/memory`). `None` when no level sets a limit ("max", or v1's page-rounded
/// i64::MAX).
pub fn cgroup_limit(proc_self_cgroup: &str, root: &Path) -> Option<Limit> {
    let v2 = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| (root.to_path_buf(), p, "memory.max"));
    let v1 = proc_self_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, p) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',')
            .any(|c| c == "memory")
            .then(|| (root.join("memory"), p, "memory.limit_in_bytes"))
    });
    [v2, v1]
        .into_iter()
        .flatten()
        .filter_map(|(base, rel, name)| smallest(&base, rel.trim().trim_start_matches('/'), name))
        .min_by_key(|l| l.bytes)
}

/// The smallest limit in file `name` from `base/rel` up to `base`.
fn smallest(base: &Path, rel: &str, name: &str) -> Option<Limit> {
    let mut dir = base.join(rel);
    let mut best: Option<Limit> = None;
    loop {
        let file = dir.join(name);
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(bytes) = text.trim().parse::<u64>() {
                if bytes < 1 << 62 && best.as_ref().is_none_or(|b| bytes < b.bytes) {
                    best = Some(Limit {
                        bytes,
                        source: format!("cgroup {}", file.display()),
                    });
                }
            }
        }
        if dir == base || !dir.pop() || !dir.starts_with(base) {
            return best;
        }
    }
}

/// [`cgroup_limit`] of this process, on the standard mount.
pub fn own_cgroup_limit() -> Option<Limit> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit(&text, Path::new("/sys/fs/cgroup"))
}

/// A `kB` field of /proc/self/status, in bytes; 0 where /proc is absent.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    status_kb("VmHWM:") as f64 / (1u64 << 20) as f64
}

/// Resident set size of this process now (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:")
}
