//! What the daemon says about itself in its `status` reply: the backend in use, the queue and
//! its counters, the window, the sessions, memory (the budget checked at start and what is
//! resident) and MQTT. Data only: the layers that own each part fill it in.

use serde::{Deserialize, Serialize};

/// The reply to `{"op":"status"}` (its `type` is `status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// MQTT echoes the request's id, so that a client sharing a reply topic can match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub version: String,
    /// "ort", "cpu-int4", or "cpu-int4 (fallback: <reason>)".
    pub backend: String,
    /// Kernels or execution provider.
    pub compute: String,
    pub threads: usize,
    /// Why ONNX Runtime is not in use, when it was configured.
    pub fallback: Option<String>,
    /// The model's file or folder name.
    pub model: String,
    pub n_ctx: usize,
    pub uptime_s: u64,
    pub accepting: bool,
    pub queue: QueueInfo,
    /// The running request's use of the window; `null` while idle.
    pub kv: Option<KvUse>,
    pub sessions: SessionStats,
    pub requests: Counters,
    pub last_decode_tps: f64,
    pub engine_heartbeat_ms: u64,
    pub memory: MemoryInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueueInfo {
    /// Jobs waiting.
    pub depth: usize,
    pub capacity: usize,
    pub running: Option<Running>,
}

/// The running job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Running {
    /// Shown to the peer that sent the request (and to admins); other peers see only that
    /// something runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who sent it ("uid:1000", "mqtt"): what `id` is shown against; never serialized.
    #[serde(skip)]
    pub owner: String,
    /// "unix", "mqtt", "cli".
    pub frontend: String,
    pub elapsed_ms: u64,
}

/// Positions of the window in use by the running request, their share of it, and positions
/// evicted so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KvUse {
    /// As in [`Running`]: shown to its own peer and to admins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub used: u64,
    pub n_ctx: usize,
    /// `used / n_ctx`, to three decimals.
    pub fill: f64,
    pub evicted: u64,
}

/// Totals since start. Every generate request the daemon parsed is counted once in `received`
/// and ends in exactly one of the other terminal counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Generate requests handed to the queue (accepted or refused).
    pub received: u64,
    /// Entered the queue.
    pub accepted: u64,
    pub queue_full: u64,
    pub shutting_down: u64,
    /// Refused at submission for another reason (a duplicate id).
    pub refused_other: u64,
    /// Answered `done` (any finish reason, cancelled in the queue included).
    pub done: u64,
    /// Of `done`: finish reason `cancelled`.
    pub cancelled: u64,
    /// Of `done`: finish reason `deadline` (stopped while running).
    pub deadline_running: u64,
    /// Answered error `deadline` (expired in the queue).
    pub deadline_queued: u64,
    /// Answered error after entering the queue (bad_request, too_large, internal, shutting_down).
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What status reports about the sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions held, the resident one included.
    pub held: usize,
    /// Bytes of the saved ones.
    pub bytes: u64,
    pub max_count: usize,
    pub max_bytes: u64,
    /// Sessions evicted to stay within the bounds, since start.
    pub evicted: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryInfo {
    pub budget: Budget,
    /// Resident memory of the daemon now (0 where /proc does not say).
    pub rss_bytes: u64,
}

/// The memory budget checked at start: each part, their total, and the tightest limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub bytes: u64,
    pub source: String,
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl Budget {
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

/// What status says about the MQTT front-end.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MqttInfo {
    pub connected: bool,
    pub broker: String,
    pub node: String,
    /// The fleet group (`mqtt.group`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub protocol: String,
    pub connects: u64,
    pub last_error: Option<String>,
    pub requests: u64,
    pub refused: u64,
    pub published: u64,
    pub dropped_replies: u64,
}
