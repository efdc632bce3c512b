//! `GET /health` for load balancers and `GET /metrics` in Prometheus' text format.

use std::fmt::Write;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{json_response, Body, Shared};
use crate::queue::Histogram;

/// 200 while the daemon takes requests (it serves HTTP only once the model answered its
/// warm-up token); 503 once it stops accepting (shutting down).
pub fn health(shared: &Shared) -> Response<Body> {
    let s = shared.ctx.status();
    let ok = s.accepting;
    json_response(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({
            "status": if ok { "ok" } else { "unavailable" },
            "model": shared.settings.model.name,
            "backend": s.backend,
            "queue_depth": s.queue.depth,
            "engine_heartbeat_ms": s.engine_heartbeat_ms,
        }),
    )
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let cumulative = h.cumulative();
    for (i, n) in cumulative.iter().enumerate() {
        match h.bounds.get(i) {
            Some(b) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", b / 1000.0);
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum {}", h.sum / 1000.0);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// Label values escaped as the text format wants them.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn metrics(shared: &Shared) -> Response<Body> {
    let s = shared.ctx.status();
    let q = shared.ctx.queue.status();
    let c = &s.requests;
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "edgellm_info",
        "gauge",
        "The daemon's version, backend, kernels and model (value 1).",
    );
    let _ = writeln!(
        out,
        "edgellm_info{{version=\"{}\",backend=\"{}\",compute=\"{}\",model=\"{}\"}} 1",
        label(&s.version),
        label(&s.backend),
        label(&s.compute),
        label(&shared.settings.model.name)
    );
    family(
        &mut out,
        "edgellm_requests_received_total",
        "counter",
        "Generate requests handed to the queue, every front-end.",
    );
    let _ = writeln!(out, "edgellm_requests_received_total {}", c.received);
    family(
        &mut out,
        "edgellm_requests_total",
        "counter",
        "Generate requests by how they ended.",
    );
    let completed = c
        .done
        .saturating_sub(c.cancelled)
        .saturating_sub(c.deadline_running);
    for (outcome, n) in [
        ("completed", completed),
        ("cancelled", c.cancelled),
        ("deadline", c.deadline_running + c.deadline_queued),
        ("queue_full", c.queue_full),
        ("shutting_down", c.shutting_down),
        ("refused", c.refused_other),
        ("failed", c.failed),
    ] {
        let _ = writeln!(out, "edgellm_requests_total{{outcome=\"{outcome}\"}} {n}");
    }
    for (name, help, v) in [
        (
            "edgellm_prompt_tokens_total",
            "Prompt tokens of answered requests.",
            c.prompt_tokens,
        ),
        (
            "edgellm_completion_tokens_total",
            "Tokens generated.",
            c.completion_tokens,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let kv = s.kv.as_ref();
    for (name, help, v) in [
        (
            "edgellm_queue_depth",
            "Requests waiting for the engine.",
            s.queue.depth as f64,
        ),
        (
            "edgellm_queue_capacity",
            "Requests the queue holds (queue.capacity).",
            s.queue.capacity as f64,
        ),
        (
            "edgellm_requests_running",
            "Requests the engine is running (0 or 1).",
            f64::from(u8::from(s.queue.running.is_some())),
        ),
        (
            "edgellm_kv_cache_tokens",
            "Positions of the context window the running request fills (0 when idle).",
            kv.map_or(0.0, |k| k.used as f64),
        ),
        (
            "edgellm_kv_cache_fill_ratio",
            "Share of the context window the running request fills (0 when idle).",
            kv.map_or(0.0, |k| k.fill),
        ),
        (
            "edgellm_context_window_tokens",
            "Positions of the context window (model.n_ctx).",
            s.n_ctx as f64,
        ),
        (
            "edgellm_resident_memory_bytes",
            "Resident set size of the daemon.",
            s.memory.rss_bytes as f64,
        ),
        (
            "edgellm_memory_budget_bytes",
            "Memory planned at start: weights, KV cache, scratch, sessions, runtime.",
            s.memory.budget.total as f64,
        ),
        (
            "edgellm_last_decode_tokens_per_second",
            "Decode speed of the latest request.",
            s.last_decode_tps,
        ),
        (
            "edgellm_engine_heartbeat_age_seconds",
            "Time since the engine thread last showed progress.",
            s.engine_heartbeat_ms as f64 / 1000.0,
        ),
        (
            "edgellm_uptime_seconds",
            "Time since the daemon started.",
            s.uptime_s as f64,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    histogram(
        &mut out,
        "edgellm_time_to_first_token_seconds",
        "Time from a request's start (prefill included) to its first token.",
        &q.latency.ttft_ms,
    );
    histogram(
        &mut out,
        "edgellm_time_per_output_token_seconds",
        "Time per generated token after the first (each counted at its request's mean).",
        &q.latency.token_ms,
    );
    let mut r = Response::new(Body::Full(Some(out.into())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
