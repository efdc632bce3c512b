//! The daemon's configuration: TOML, documented defaults embedded in the binary
//! (`configs/edgellm.toml`, printed by `edgellm config --print-default`), then the user's file,
//! then [`Config::validate`]. Unknown keys and wrong types are refused by the parser, which
//! points at the line; out-of-range values by `validate`, which names the key, the value and what
//! is allowed. Nothing starts before the whole file is accepted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::api::Limits;
use crate::backend::{BackendChoice, KvType, Provider};
use crate::kernels::KernelChoice;

/// The documented default configuration, as shipped in `configs/edgellm.toml`.
pub const DEFAULT_TOML: &str = include_str!("../configs/edgellm.toml");

/// Where `edgellm ask` and `edgellm status` look for the daemon's config when given none.
pub const SYSTEM_CONFIG: &str = "/etc/edgellm/edgellm.toml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub queue: QueueConfig,
    pub limits: Limits,
    pub socket: SocketConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub memory: MemoryConfig,
    pub ort: OrtConfig,
    pub sessions: SessionsConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub backend: BackendChoice,
    pub path: Option<PathBuf>,
    pub onnx: Option<PathBuf>,
    pub n_ctx: usize,
    pub n_sink: usize,
    pub n_discard: usize,
    pub threads: usize,
    pub kernels: KernelChoice,
    pub kv_type: KvType,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrtConfig {
    pub library: Option<PathBuf>,
    pub providers: Vec<Provider>,
    pub max_batch: usize,
    pub provider_options:
        std::collections::BTreeMap<Provider, std::collections::BTreeMap<String, String>>,
    /// Plugin execution provider libraries, by the provider they serve.
    pub ep_libraries: std::collections::BTreeMap<Provider, PathBuf>,
}

impl Default for OrtConfig {
    fn default() -> Self {
        OrtConfig {
            library: None,
            providers: vec![Provider::Cpu],
            max_batch: 64,
            provider_options: Default::default(),
            ep_libraries: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    pub max_count: usize,
    pub max_bytes: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_count: 16,
            max_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub capacity: usize,
    pub default_deadline_ms: u64,
}

/// A user or group as a config names it: a number, or a name.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Number(u32),
    Name(String),
}

fn ids<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &str,
    lookup: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<u32>, D::Error> {
    Vec::<Id>::deserialize(d)?
        .into_iter()
        .map(|id| match id {
            Id::Number(n) => Ok(n),
            Id::Name(name) => lookup(&name).ok_or_else(|| {
                serde::de::Error::custom(format!("no {what} named \"{name}\" on this machine"))
            }),
        })
        .collect()
}

fn uids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    ids(d, "user", |n| {
        nix::unistd::User::from_name(n)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    })
}

fn gids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    ids(d, "group", |n| {
        nix::unistd::Group::from_name(n)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    pub path: PathBuf,
    pub mode: String,
    pub group: Option<String>,
    /// Users by number or name (a name is looked up when the config is read).
    #[serde(deserialize_with = "uids")]
    pub allowed_uids: Vec<u32>,
    /// Groups by number or name.
    #[serde(deserialize_with = "gids")]
    pub allowed_gids: Vec<u32>,
    /// Peers that may cancel any request and see every request's id in `status`.
    #[serde(deserialize_with = "uids")]
    pub admin_uids: Vec<u32>,
    #[serde(deserialize_with = "gids")]
    pub admin_gids: Vec<u32>,
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub enabled: bool,
    pub url: String,
    pub protocol: u8,
    pub prefix: String,
    pub node: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub password_file: String,
    pub password_env: String,
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
    pub reply_prefixes: Vec<String>,
    pub keep_alive_s: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub coalesce_ms: u64,
    pub coalesce_tokens: usize,
    pub reply_hold_ms: u64,
    /// Home Assistant MQTT discovery: a device per node, its sensors fed by a state topic.
    pub discovery: bool,
    pub discovery_prefix: String,
    /// On a clean stop, remove the discovery configs (empty retained messages).
    pub discovery_remove_on_stop: bool,
    /// How often the state topic is published while connected, seconds.
    pub state_interval_s: u64,
    /// A fleet group: the node also takes requests from `<prefix>/group/<group>/request`
    /// through an MQTT 5 shared subscription (empty: none).
    pub group: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            url: "mqtt://127.0.0.1:1883".into(),
            protocol: 5,
            prefix: "edgellm".into(),
            node: String::new(),
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            password_env: String::new(),
            ca_file: String::new(),
            client_cert: String::new(),
            client_key: String::new(),
            reply_prefixes: Vec::new(),
            keep_alive_s: 30,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            coalesce_ms: 50,
            coalesce_tokens: 16,
            reply_hold_ms: 60_000,
            discovery: false,
            discovery_prefix: "homeassistant".into(),
            discovery_remove_on_stop: false,
            state_interval_s: 5,
            group: String::new(),
        }
    }
}

/// The HTTP front-end (OpenAI- and Ollama-compatible API).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where to listen: `host:port` (`[::1]:port` for IPv6) or `unix:/path`. Empty: off.
    pub listen: Vec<String>,
    /// The bearer token clients must send (`Authorization: Bearer …`); at most one of the
    /// three; required when a listener is not loopback or a Unix socket.
    pub api_key: String,
    pub api_key_file: String,
    pub api_key_env: String,
    /// Other names clients may give for the loaded model.
    pub model_aliases: Vec<String>,
    /// Largest request body in bytes; 0: `limits.max_line_bytes`.
    pub max_body_bytes: usize,
    /// Time a request may take, from its first byte to its last reply byte.
    pub request_timeout_ms: u64,
    /// Connections served at once; beyond, a connection is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Vec::new(),
            api_key: String::new(),
            api_key_file: String::new(),
            api_key_env: String::new(),
            model_aliases: Vec::new(),
            max_body_bytes: 0,
            request_timeout_ms: 600_000,
            max_connections: 64,
        }
    }
}

/// An address of `http.listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl HttpListen {
    /// Parses one `http.listen` entry; the error names the key and what is allowed.
    pub fn parse(s: &str) -> Result<HttpListen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let len = p.len();
            if !p.starts_with('/') || len > MAX_SOCKET_PATH {
                return Err(format!(
                    "http.listen: {s:?}: a Unix socket needs an absolute path of at most {MAX_SOCKET_PATH} bytes"
                ));
            }
            return Ok(HttpListen::Unix(PathBuf::from(p)));
        }
        s.parse().map(HttpListen::Tcp).map_err(|_| {
            format!(
                "http.listen: {s:?}: allowed \"host:port\" with an IP address (\"127.0.0.1:11434\", \"[::1]:11434\", \"0.0.0.0:11434\") or \"unix:/absolute/path\""
            )
        })
    }

    /// Only this machine can reach it: a loopback address or a Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            HttpListen::Tcp(a) => a.ip().is_loopback(),
            HttpListen::Unix(_) => true,
        }
    }
}

impl std::fmt::Display for HttpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpListen::Tcp(a) => write!(f, "http://{a}"),
            HttpListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A broker address from `mqtt.url`. Parsed here rather than by rumqttc's
/// `MqttOptions::parse_url`, which requires a `?client_id=` in the URL (ours comes from
/// `mqtt.client_id` or the host name) and reports errors without the config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl BrokerUrl {
    /// `mqtt://[user[:pass]@]host[:port]` (port 1883) or `mqtts://…` (8883).
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let bad = |why: &str| {
            format!("mqtt.url = {url:?}: {why}; allowed mqtt://[user[:password]@]host[:port] or mqtts://…")
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(bad("unknown scheme"));
        };
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // [v6]:port
            let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None => default_port,
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (hostport.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        Ok(BrokerUrl {
            tls,
            host,
            port,
            username,
            password,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    pub grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub filter: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            backend: BackendChoice::Auto,
            path: None,
            onnx: None,
            n_ctx: 2048,
            n_sink: 4,
            n_discard: 0,
            threads: 0,
            kernels: KernelChoice::Auto,
            kv_type: KvType::F16,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            capacity: 16,
            default_deadline_ms: 0,
        }
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from("/run/edgellm/edgellm.sock"),
            mode: "0660".into(),
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
            max_connections: 64,
            max_connections_per_uid: 16,
            idle_timeout_ms: 60_000,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_ms: 10_000 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, an unknown key or a wrong type; the parser's message shows the line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value out of range: `key = value: allowed …`.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Ranges of the numeric keys, in one place so the messages and the checks agree.
const RANGES: &[(&str, u64, u64)] = &[
    ("mqtt.keep_alive_s", 5, 3600),
    ("mqtt.reconnect_min_ms", 10, 600_000),
    ("mqtt.reconnect_max_ms", 10, 600_000),
    ("mqtt.coalesce_ms", 0, 10_000),
    ("mqtt.coalesce_tokens", 1, 1024),
    ("mqtt.reply_hold_ms", 0, 86_400_000),
    ("mqtt.state_interval_s", 1, 3600),
    ("queue.capacity", 1, 4096),
    ("queue.default_deadline_ms", 0, 86_400_000),
    ("limits.max_tokens", 1, 65536),
    ("limits.max_line_bytes", 1024, 16 << 20),
    ("socket.max_connections", 1, 4096),
    ("socket.max_connections_per_uid", 1, 4096),
    ("socket.idle_timeout_ms", 100, 86_400_000),
    ("limits.max_messages", 1, 65536),
    ("shutdown.grace_ms", 0, 600_000),
    ("model.threads", 0, 256),
    ("model.n_sink", 0, 64),
    ("sessions.max_count", 0, 4096),
    ("sessions.max_bytes", 0, 1 << 40),
    ("ort.max_batch", 1, 4096),
    ("http.max_body_bytes", 0, 64 << 20),
    ("http.request_timeout_ms", 1000, 86_400_000),
    ("http.max_connections", 1, 4096),
];

/// A secret's sources (inline, file, variable): at most one may be set; whether one is.
fn at_most_one(keys: [&str; 3], values: [&String; 3]) -> Result<bool, String> {
    match values.iter().filter(|v| !v.is_empty()).count() {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!("{}: give at most one", keys.join(", "))),
    }
}

/// Longest path a `sockaddr_un` holds (108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

impl Config {
    /// Parses a config text; `origin` names it in errors and anchors relative paths.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        c.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_path_buf(),
            message,
        })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        for p in [&mut c.model.path, &mut c.model.onnx, &mut c.ort.library]
            .into_iter()
            .flatten()
        {
            *p = base.join(&*p);
        }
        for p in c.ort.ep_libraries.values_mut() {
            *p = base.join(&*p);
        }
        c.socket.path = base.join(&c.socket.path);
        for f in [
            &mut c.http.api_key_file,
            &mut c.mqtt.password_file,
            &mut c.mqtt.ca_file,
            &mut c.mqtt.client_cert,
            &mut c.mqtt.client_key,
        ] {
            if !f.is_empty() {
                *f = base.join(&*f).to_string_lossy().into_owned();
            }
        }
        Ok(c)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks every value's range; the message names the key, the value and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.mqtt;
        let values = [
            m.keep_alive_s,
            m.reconnect_min_ms,
            m.reconnect_max_ms,
            m.coalesce_ms,
            m.coalesce_tokens as u64,
            m.reply_hold_ms,
            m.state_interval_s,
            self.queue.capacity as u64,
            self.queue.default_deadline_ms,
            self.limits.max_tokens as u64,
            self.limits.max_line_bytes as u64,
            self.socket.max_connections as u64,
            self.socket.max_connections_per_uid as u64,
            self.socket.idle_timeout_ms,
            self.limits.max_messages as u64,
            self.shutdown.grace_ms,
            self.model.threads as u64,
            self.model.n_sink as u64,
            self.sessions.max_count as u64,
            self.sessions.max_bytes,
            self.ort.max_batch as u64,
            self.http.max_body_bytes as u64,
            self.http.request_timeout_ms,
            self.http.max_connections as u64,
        ];
        for (&(key, lo, hi), v) in RANGES.iter().zip(values) {
            if !(lo..=hi).contains(&v) {
                return Err(format!("{key} = {v}: allowed {lo}..={hi}"));
            }
        }
        let n = self.model.n_ctx;
        if n != 0 && !(16..=131_072).contains(&n) {
            return Err(format!(
                "model.n_ctx = {n}: allowed 0 (the model's) or 16..=131072"
            ));
        }
        if n != 0 && self.model.n_sink + self.model.n_discard >= n {
            return Err(format!(
                "model.n_sink + model.n_discard = {}: allowed less than model.n_ctx ({n})",
                self.model.n_sink + self.model.n_discard
            ));
        }
        let d = self.limits.default_max_tokens;
        if d == 0 || d > self.limits.max_tokens {
            return Err(format!(
                "limits.default_max_tokens = {d}: allowed 1..=limits.max_tokens ({})",
                self.limits.max_tokens
            ));
        }
        if self.model.backend == BackendChoice::Ort && self.model.onnx.is_none() {
            return Err("model.backend = \"ort\" needs model.onnx, an ONNX model folder".into());
        }
        if self.ort.providers.is_empty() {
            return Err(format!(
                "ort.providers = []: allowed a list of one or more of {}",
                Provider::ALL.map(Provider::name).join(", ")
            ));
        }
        self.socket_mode()?;
        let len = self.socket.path.as_os_str().len();
        if len == 0 || len > MAX_SOCKET_PATH {
            return Err(format!(
                "socket.path = {:?}: {len} bytes; allowed 1..={MAX_SOCKET_PATH} (the size of a Unix socket address)",
                self.socket.path
            ));
        }
        if let Some(g) = &self.socket.group {
            if g.is_empty() {
                return Err("socket.group = \"\": allowed a group name or number".into());
            }
        }
        self.validate_mqtt()?;
        self.validate_http()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            format!(
                "log.filter = {:?}: {e}; allowed a tracing filter such as \"info\" or \"edgellm=debug\"",
                self.log.filter
            )
        })?;
        Ok(())
    }

    fn validate_mqtt(&self) -> Result<(), String> {
        let m = &self.mqtt;
        BrokerUrl::parse(&m.url)?;
        if m.protocol != 5 && m.protocol != 3 {
            return Err(format!(
                "mqtt.protocol = {}: allowed 5 (MQTT 5) or 3 (MQTT 3.1.1)",
                m.protocol
            ));
        }
        if m.reconnect_min_ms > m.reconnect_max_ms {
            return Err(format!(
                "mqtt.reconnect_min_ms = {}: allowed at most mqtt.reconnect_max_ms ({})",
                m.reconnect_min_ms, m.reconnect_max_ms
            ));
        }
        let topic_part = |key: &str, v: &str, empty_ok: bool| {
            let ok = (empty_ok || !v.is_empty())
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{key} = {v:?}: allowed 1..=64 of letters, digits, '-', '_', '.'"
                ))
            }
        };
        topic_part("mqtt.prefix", &m.prefix, false)?;
        topic_part("mqtt.node", &m.node, true)?;
        topic_part("mqtt.discovery_prefix", &m.discovery_prefix, false)?;
        topic_part("mqtt.group", &m.group, true)?;
        if !m.group.is_empty() && m.protocol != 5 {
            return Err(format!(
                "mqtt.group = {:?}: fleet groups are MQTT 5 shared subscriptions; set mqtt.protocol = 5",
                m.group
            ));
        }
        at_most_one(
            ["mqtt.password", "mqtt.password_file", "mqtt.password_env"],
            [&m.password, &m.password_file, &m.password_env],
        )?;
        if m.client_cert.is_empty() != m.client_key.is_empty() {
            return Err("mqtt.client_cert and mqtt.client_key: give both or neither".into());
        }
        if let Some(p) = m
            .reply_prefixes
            .iter()
            .find(|p| p.is_empty() || p.contains('+') || p.contains('#'))
        {
            return Err(format!(
                "mqtt.reply_prefixes: {p:?}: allowed non-empty topic prefixes without wildcards"
            ));
        }
        Ok(())
    }

    fn validate_http(&self) -> Result<(), String> {
        let h = &self.http;
        let listen = h
            .listen
            .iter()
            .map(|l| HttpListen::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        let keyed = at_most_one(
            ["http.api_key", "http.api_key_file", "http.api_key_env"],
            [&h.api_key, &h.api_key_file, &h.api_key_env],
        )?;
        if let Some(open) = listen.iter().find(|l| !l.is_local()) {
            if !keyed {
                return Err(format!(
                    "http.listen: {open} is reachable from other machines; set http.api_key_file (or http.api_key_env, http.api_key) so that clients must send a bearer token, or listen on a loopback address"
                ));
            }
        }
        if let Some(a) = h
            .model_aliases
            .iter()
            .find(|a| a.is_empty() || a.len() > 128 || a.chars().any(char::is_control))
        {
            return Err(format!(
                "http.model_aliases: {a:?}: allowed 1..=128 characters, no control characters"
            ));
        }
        Ok(())
    }

    /// `socket.mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let m = &self.socket.mode;
        match u32::from_str_radix(m, 8) {
            Ok(v) if v <= 0o777 && !m.is_empty() => Ok(v),
            _ => Err(format!(
                "socket.mode = {m:?}: allowed an octal file mode \"0000\"..\"0777\""
            )),
        }
    }
}
