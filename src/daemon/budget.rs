//! The daemon's memory budget, known before anything big is allocated: the weights (mapped
//! from the model file), the KV cache and scratch buffers (from the model's header and the
//! config), the session store (`sessions.max_bytes`) and the runtime around them. It is checked
//! against `memory.max_bytes` and the cgroup `memory.max` (v2; v1's `memory.limit_in_bytes`)
//! of the daemon's cgroup and its ancestors, so that a board short of memory gets a message
//! naming the numbers at start, not an OOM kill a week later.

use std::path::Path;

use serde::Serialize;

use crate::backend::cpu::MemoryPlan;

/// Code, stacks, tokenizer tables, the async runtime and allocator slack: the daemon's resident
/// memory minus the other parts (KV counted for the positions written), measured on SmolLM2 on
/// x86-64 after three 200-token answers: 160.3 − 92.1 − 13.6 − 10.5 = 44 MiB; rounded up.
pub const RUNTIME_BYTES: u64 = 48 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub weights: u64,
    pub kv_cache: u64,
    pub scratch: u64,
    pub sessions: u64,
    pub runtime: u64,
    pub total: u64,
    /// The tightest limit that applies, and where it comes from.
    pub limit: Option<Limit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub bytes: u64,
    pub source: String,
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl Budget {
    /// The budget of a model `plan` with a session store of `sessions` bytes, against
    /// `max_bytes` (0: none) and the cgroup limit found on this machine.
    pub fn new(plan: &MemoryPlan, sessions: u64, max_bytes: u64, cgroup: Option<Limit>) -> Budget {
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

    fn parts(&self) -> String {
        format!(
            "weights {}, KV cache {}, scratch {}, sessions {}, runtime {}",
            mib(self.weights),
            mib(self.kv_cache),
            mib(self.scratch),
            mib(self.sessions),
            mib(self.runtime)
        )
    }

    /// `Err` names every part and the limit when the total is over it.
    pub fn check(&self) -> Result<(), String> {
        match &self.limit {
            Some(l) if self.total > l.bytes => Err(format!(
                "memory budget {} is over the limit of {} ({}): {}; lower model.n_ctx, use \
                 model.kv_type = \"q8_0\", lower sessions.max_bytes, or raise the limit",
                mib(self.total),
                mib(l.bytes),
                l.source,
                self.parts()
            )),
            _ => Ok(()),
        }
    }

    /// One line for the log and `serve --check`.
    pub fn summary(&self) -> String {
        let limit = match &self.limit {
            Some(l) => format!("limit {} ({})", mib(l.bytes), l.source),
            None => "no limit".into(),
        };
        format!(
            "memory budget {}: {}; {limit}",
            mib(self.total),
            self.parts()
        )
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
