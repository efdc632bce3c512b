//! `edgellm serve`: the engine worker, the queue and the front-ends put together, under systemd.
//!
//! Start: the config is validated, the socket path claimed (a stale socket replaced, a live one
//! refused), the model loaded and one warm-up token generated, and only then `READY=1`.
//! Running: `WATCHDOG=1` at half of `WATCHDOG_USEC` while the engine worker's heartbeat is fresh;
//! `STATUS=` with backend, queue depth and the latest tokens/s. Stop (SIGTERM, SIGINT, or the
//! future handed to [`Daemon::run`]): `STOPPING=1`, no new connections or requests, accepted
//! requests finish within `shutdown.grace_ms`, then the rest are cancelled; every one gets its
//! terminal reply, and the process exits 0.

pub mod budget;
pub mod guard;
pub mod notify;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::api::status::{KvUse, MemoryInfo, QueueInfo, Status};
use crate::api::{GenerateRequest, Prompt, SamplingParams};
use crate::config::Config;
use crate::engine::worker::{self, Progress};
use crate::engine::Engine;
use crate::frontend::mqtt::{self, MqttState};
use crate::frontend::{http, unix, Access, Context, Live};
use crate::queue::{Queue, QueueStatus};
use notify::Notifier;

/// How often the status line and the watchdog are refreshed when systemd asks for no faster.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often waiting jobs are checked for passed deadlines.
const REAP_EVERY: Duration = Duration::from_millis(20);
/// After the grace period and the cancel, how long the engine may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the mapped model file is checked for changes in place.
const MODEL_CHECK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("starting the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("warm-up generation failed: {0}")]
    WarmUp(crate::engine::EngineError),
    #[error(
        "the engine did not stop within {0:?} of the end of the grace period; exiting without it"
    )]
    EngineStuck(Duration),
    /// The model file was truncated or rewritten in place while mapped.
    #[error("{0}")]
    ModelChanged(String),
}

/// The running request's use of the window: positions filled, their share of it, and
/// positions evicted; `None` while idle.
fn kv_use(q: &QueueStatus, progress: &Progress, n_ctx: usize) -> Option<KvUse> {
    let r = q.running.as_ref()?;
    let (used, evicted) = progress.kv();
    Some(KvUse {
        id: r.id.clone(),
        used,
        n_ctx,
        fill: (used as f64 / n_ctx.max(1) as f64 * 1000.0).round() / 1000.0,
        evicted,
    })
}

/// Where the daemon listens.
#[derive(Debug)]
pub struct Listener {
    pub socket: std::os::unix::net::UnixListener,
    /// The path we bound and remove on exit; `None` when systemd owns the socket.
    pub owned_path: Option<PathBuf>,
}

pub struct Daemon {
    pub config: Config,
    pub engine: Engine,
    pub listener: Listener,
    pub notifier: Notifier,
    /// The model's file name, for status.
    pub model: String,
    /// The MQTT front-end, when configured.
    pub mqtt: Option<mqtt::Settings>,
    /// The HTTP front-end, when configured: its bound listeners and settings.
    pub http: Option<(Vec<http::Bound>, http::Settings)>,
    /// The memory budget checked at start (reported in status).
    pub budget: budget::Budget,
    /// Why ONNX Runtime is not in use though configured (the int4 engine took over at start).
    pub fallback_reason: Option<String>,
    /// Builds the int4 engine should ONNX Runtime fail while running.
    pub fallback: Option<worker::Fallback>,
    /// The model file mapped, watched for changes in place.
    pub model_file: Option<guard::ModelFile>,
    /// What SIGHUP re-reads.
    pub reload: Option<Reload>,
}

/// Sets the log filter while the daemon runs; the error says why it cannot.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What SIGHUP reloads from: the config file, as it was read at start (before command-line
/// overrides), and the log filter's handle.
pub struct Reload {
    pub path: PathBuf,
    pub loaded: Config,
    pub set_log_filter: SetLogFilter,
}

/// Keys SIGHUP applies while the daemon runs; any other key that changed waits for a restart.
const RELOADABLE: [&str; 14] = [
    "limits.max_tokens",
    "limits.default_max_tokens",
    "limits.max_line_bytes",
    "limits.max_messages",
    "queue.default_deadline_ms",
    "socket.allowed_uids",
    "socket.allowed_gids",
    "socket.admin_uids",
    "socket.admin_gids",
    "socket.max_connections",
    "socket.max_connections_per_uid",
    "socket.idle_timeout_ms",
    "log.filter",
    "shutdown.grace_ms",
];

/// `section.key` → value of every key of a config.
fn flatten(c: &Config) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(c) {
        for (section, v) in sections {
            match v {
                serde_json::Value::Object(keys) => {
                    for (k, v) in keys {
                        out.insert(format!("{section}.{k}"), v.to_string());
                    }
                }
                v => {
                    out.insert(section, v.to_string());
                }
            }
        }
    }
    out
}

/// Re-reads the config file on SIGHUP: applies the reloadable keys, logs each that changed and
/// those that need a restart; a file that no longer parses changes nothing.
fn reload(r: &mut Reload, ctx: &Context, grace: &mut Duration) {
    let new = match Config::load(&r.path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; keeping the settings in force");
            return;
        }
    };
    let (old_keys, new_keys) = (flatten(&r.loaded), flatten(&new));
    let changed: Vec<&String> = new_keys
        .iter()
        .filter(|(k, v)| old_keys.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    if changed.is_empty() {
        tracing::info!(config = %r.path.display(), "SIGHUP: configuration unchanged");
        return;
    }
    if new.log.filter != r.loaded.log.filter {
        if let Err(e) = (r.set_log_filter)(&new.log.filter) {
            tracing::warn!("SIGHUP: log.filter not changed: {e}");
        }
    }
    ctx.set_live(live_settings(&new));
    *grace = Duration::from_millis(new.shutdown.grace_ms);
    for k in &changed {
        let (was, now) = (
            old_keys.get(*k).map_or("(unset)", String::as_str),
            new_keys.get(*k).map_or("(unset)", String::as_str),
        );
        if RELOADABLE.contains(&k.as_str()) {
            tracing::info!("SIGHUP: {k} = {now} (was {was})");
        } else {
            tracing::warn!("SIGHUP: {k} = {now} (was {was}) needs a restart to take effect");
        }
    }
    // What needs a restart still runs as it was, and is reported again at the next reload.
    r.loaded = merge_reloadable(&r.loaded, &new);
}

/// `running` with the reloadable keys of `new` ([`RELOADABLE`], the one list of them), taken
/// through the config's serialized form.
fn merge_reloadable(running: &Config, new: &Config) -> Config {
    let (Ok(mut merged), Ok(new)) = (serde_json::to_value(running), serde_json::to_value(new))
    else {
        return running.clone();
    };
    for key in RELOADABLE {
        if let Some((section, k)) = key.split_once('.') {
            if let Some(v) = new.get(section).and_then(|s| s.get(k)) {
                merged[section][k] = v.clone();
            }
        }
    }
    serde_json::from_value(merged).unwrap_or_else(|e| {
        tracing::warn!(
            "SIGHUP: the reloaded settings did not merge ({e}); keeping the running ones"
        );
        running.clone()
    })
}

impl Daemon {
    /// Generates one token so that the first request does not pay for cold pages and caches,
    /// and so that `READY=1` means the engine has produced a token.
    pub fn warm_up(&mut self) -> Result<(), DaemonError> {
        let mut req = GenerateRequest::new(Prompt::Raw("Hello".into()));
        req.max_tokens = 1;
        req.sampling = SamplingParams::greedy();
        let mut sink = String::new();
        self.engine
            .generate(&req, &mut sink)
            .map_err(DaemonError::WarmUp)?;
        Ok(())
    }

    /// Serves until SIGTERM, SIGINT or `stop` completes, then shuts down gracefully.
    pub fn run(self, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DaemonError::Runtime)?;
        let Daemon {
            config,
            engine,
            listener,
            notifier,
            model,
            mqtt,
            http,
            budget,
            fallback_reason,
            fallback,
            model_file,
            reload: mut reloader,
        } = self;
        let mqtt_state = mqtt.as_ref().map(|_| Arc::new(MqttState::default()));
        let info = engine.backend.info();
        let queue = Arc::new(Queue::new(config.queue.capacity));
        let progress = Arc::new(Progress::default());
        progress.set_backend(worker::BackendLabel::new(&engine, fallback_reason));
        let worker = worker::spawn(engine, queue.clone(), progress.clone(), fallback)
            .map_err(DaemonError::Thread)?;
        let started = Instant::now();
        let status = {
            let queue = queue.clone();
            let progress = progress.clone();
            let info = info.clone();
            let mqtt_state = mqtt_state.clone();
            move || {
                let q = queue.status();
                let b = progress.backend();
                Status {
                    id: None,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    backend: b.backend,
                    compute: b.compute,
                    threads: b.threads,
                    fallback: b.fallback,
                    model: model.clone(),
                    n_ctx: info.n_ctx,
                    uptime_s: started.elapsed().as_secs(),
                    accepting: q.accepting,
                    kv: kv_use(&q, &progress, info.n_ctx),
                    queue: QueueInfo {
                        depth: q.depth,
                        capacity: q.capacity,
                        running: q.running,
                    },
                    sessions: progress.sessions(),
                    requests: q.counters,
                    last_decode_tps: (progress.last_tps() * 10.0).round() / 10.0,
                    engine_heartbeat_ms: progress.since_beat().as_millis() as u64,
                    memory: MemoryInfo {
                        budget: budget.clone(),
                        rss_bytes: self::budget::rss_bytes(),
                    },
                    mqtt: mqtt_state.as_ref().map(|m| m.info()),
                }
            }
        };
        let ctx = Arc::new(Context::new(
            queue.clone(),
            live_settings(&config),
            Box::new(status),
        ));
        let mut grace = Duration::from_millis(config.shutdown.grace_ms);
        let Listener { socket, owned_path } = listener;

        let result = rt.block_on(async {
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let signals = signals();
            // Installed before READY, as the others: a SIGHUP never kills the daemon.
            let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(DaemonError::Runtime)?;
            let listener =
                tokio::net::UnixListener::from_std(socket).map_err(DaemonError::Runtime)?;
            let server = tokio::spawn(unix::serve(listener, ctx.clone(), shutdown_rx.clone()));
            let mqtt_task = match (mqtt, &mqtt_state) {
                (Some(settings), Some(state)) => Some(tokio::spawn(mqtt::serve(
                    settings,
                    ctx.clone(),
                    state.clone(),
                    shutdown_rx.clone(),
                ))),
                _ => None,
            };
            let http_paths: Vec<PathBuf> = http
                .as_ref()
                .map(|(bound, _)| {
                    bound
                        .iter()
                        .filter_map(|b| match b {
                            http::Bound::Unix(_, p) => Some(p.clone()),
                            http::Bound::Tcp(_) => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let http_task = http.map(|(bound, settings)| {
                tokio::spawn(http::serve(bound, settings, ctx.clone(), shutdown_rx.clone()))
            });
            let reaper = {
                let queue = queue.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(REAP_EVERY);
                    loop {
                        tick.tick().await;
                        queue.expire_now();
                    }
                })
            };
            // The STATUS= line is read off the same snapshot as the status reply.
            let status_line = {
                let ctx = ctx.clone();
                move || status_line(&ctx.status())
            };
            let ready_status = status_line();
            notifier.send(&format!("READY=1\n{ready_status}"));
            let b = progress.backend();
            tracing::info!(
                backend = %b.backend,
                compute = %b.compute,
                threads = b.threads,
                n_ctx = info.n_ctx,
                "ready"
            );
            let notifier = Arc::new(notifier);
            let ticker = {
                let notifier = notifier.clone();
                let watchdog = notifier.watchdog();
                let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    let mut last = ready_status;
                    loop {
                        tick.tick().await;
                        // A heartbeat within the last watchdog interval means the engine loop is
                        // alive: waiting for work (it beats every 200 ms) or between tokens. A
                        // wedged engine stops the pings, and systemd restarts the service one
                        // interval later.
                        if let Some(w) = watchdog {
                            let since = progress.since_beat();
                            if since < w {
                                notifier.send("WATCHDOG=1");
                            } else {
                                tracing::warn!(
                                    "engine heartbeat {} ms old; withholding the watchdog ping",
                                    since.as_millis()
                                );
                            }
                        }
                        let s = status_line();
                        if s != last {
                            notifier.send(&s);
                            last = s;
                        }
                    }
                })
            };

            tokio::pin!(signals);
            tokio::pin!(stop);
            let mut model_check = tokio::time::interval(MODEL_CHECK_EVERY);
            let mut fatal = None;
            loop {
                tokio::select! {
                    s = &mut signals => {
                        tracing::info!("{s}: shutting down");
                        break;
                    }
                    _ = &mut stop => {
                        tracing::info!("shutting down");
                        break;
                    }
                    Some(()) = hangups.recv() => match &mut reloader {
                        Some(r) => reload(r, &ctx, &mut grace),
                        None => tracing::info!("SIGHUP: the daemon was started without --config; nothing to reload"),
                    },
                    _ = model_check.tick() => {
                        if let Some(Err(e)) = model_file.as_ref().map(guard::ModelFile::check) {
                            tracing::error!("{e}; stopping for the service manager to restart the daemon");
                            fatal = Some(e);
                            break;
                        }
                    }
                }
            }
            notifier.send("STOPPING=1");
            let _ = shutdown_tx.send(true);
            ctx.queue.close();
            let q = ctx.queue.clone();
            let idle = tokio::task::spawn_blocking(move || q.wait_idle(grace))
                .await
                .unwrap_or(false);
            if !idle {
                tracing::warn!(
                    "grace period of {} ms over; cancelling what is left",
                    grace.as_millis()
                );
                ctx.queue.abort_all();
            }
            let joined = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + STOP_TIMEOUT;
                while !worker.is_finished() {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                worker.join().is_ok()
            })
            .await
            .unwrap_or(false);
            // Connections end once their replies are written; a client that stopped reading
            // does not hold the exit forever.
            let _ = tokio::time::timeout(STOP_TIMEOUT, server).await;
            // The MQTT front-end ends once its last replies are out (or after its own drain
            // timeout when the broker is away), then says `offline` and disconnects.
            if let Some(t) = mqtt_task {
                let _ = tokio::time::timeout(STOP_TIMEOUT * 2, t).await;
            }
            // HTTP connections end once their responses are written.
            if let Some(t) = http_task {
                let _ = tokio::time::timeout(STOP_TIMEOUT, t).await;
            }
            for p in http_paths {
                let _ = std::fs::remove_file(p);
            }
            reaper.abort();
            ticker.abort();
            if !joined {
                return Err(DaemonError::EngineStuck(STOP_TIMEOUT));
            }
            match fatal {
                Some(e) => Err(DaemonError::ModelChanged(e)),
                None => Ok(()),
            }
        });
        if let Some(p) = &owned_path {
            let _ = std::fs::remove_file(p);
        }
        let c = ctx.queue.status().counters;
        tracing::info!(
            accepted = c.accepted,
            done = c.done,
            failed = c.failed,
            queue_full = c.queue_full,
            "stopped"
        );
        result
    }
}

/// The settings of `config` that SIGHUP may change while the daemon runs.
pub fn live_settings(config: &Config) -> Live {
    Live {
        limits: config.limits.clone(),
        default_deadline_ms: config.queue.default_deadline_ms,
        access: Access::of(&config.socket),
    }
}

/// Waits for SIGTERM or SIGINT; the handlers are installed when this is called, before the
/// returned future is first polled, so no signal between READY and the first poll is missed.
fn signals() -> impl Future<Output = &'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => tokio::select! {
                _ = t.recv() => "SIGTERM",
                _ = i.recv() => "SIGINT",
            },
            (t, i) => {
                let e = t
                    .err()
                    .or(i.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::error!("cannot install the signal handlers: {e}; stop with the service manager's SIGKILL");
                std::future::pending().await
            }
        }
    }
}

/// systemd's one-line status from the status reply: backend, kernels, threads, queue, the latest
/// tokens/s, requests served, and MQTT's connection when it is on.
fn status_line(v: &Status) -> String {
    let mqtt = match v.mqtt.as_ref().map(|m| m.connected) {
        Some(true) => "; mqtt connected",
        Some(false) => "; mqtt disconnected",
        None => "",
    };
    format!(
        "STATUS={} ({}, {} threads); queue {}/{}; last {:.1} tok/s; served {}{mqtt}",
        v.backend,
        v.compute,
        v.threads,
        v.queue.depth,
        v.queue.capacity,
        v.last_decode_tps,
        v.requests.done
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly the keys of `RELOADABLE` come from the new config; everything else stays.
    #[test]
    fn a_reload_merges_the_reloadable_keys_only() {
        let running = Config::default();
        assert_eq!(merge_reloadable(&running, &running), running);
        let mut new = running.clone();
        new.limits.max_tokens = 7;
        new.limits.max_messages = 9;
        new.socket.allowed_uids = vec![1000];
        new.socket.idle_timeout_ms = 1234;
        new.log.filter = "debug".into();
        new.shutdown.grace_ms = 55;
        new.queue.default_deadline_ms = 66;
        let mut restart = new.clone();
        restart.model.n_ctx = 99;
        restart.queue.capacity = 3;
        restart.mqtt.node = "other".into();
        assert_eq!(merge_reloadable(&running, &restart), new);
    }
}
