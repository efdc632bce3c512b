//! The MQTT front-end (rumqttc; MQTT 5, or 3.1.1 from config): the same JSON requests as the
//! socket, on `<prefix>/<node>/request`; cancels on `<prefix>/<node>/cancel`; availability on
//! `<prefix>/<node>/status` (retained `online`, and `offline` as the last will and on a clean
//! stop). With `mqtt.group` the node also takes the group's requests, through an MQTT 5 shared
//! subscription to `<prefix>/group/<group>/request`: the broker gives each to one node of the
//! group. Every reply names the node.
//!
//! Requests are acknowledged to the broker (manual acks, persistent session) only once their
//! terminal reply is published: a node killed mid-request gets it again when it comes back.
//! Anything not run (refusals, cancels, status) is acknowledged at once.
//!
//! Two tasks. The event loop task polls rumqttc continuously and never blocks: a request is
//! parsed, checked and put on the queue in place. The publisher task turns the engine's replies
//! into messages — streamed tokens coalesced and numbered by `seq`, then exactly one terminal
//! reply — and holds them in an outbox while the broker is away: they go out after the
//! reconnect, or are dropped with a log line after `mqtt.reply_hold_ms`. Replies only go to
//! topics under `mqtt.reply_prefixes`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{LastWill as LastWill5, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};

use super::{until_true, Context};
use crate::api::status::{MqttInfo, Status};
use crate::api::wire::{self, Envelope, Incoming, Refusal, Response};
use crate::api::{CancelState, Completion, ErrorCode, Event, FinishReason};
use crate::config::{BrokerUrl, MqttConfig};
use crate::queue::{Caller, Job, Owner, Queue, Reply};

/// The longest topic name MQTT can carry.
const MAX_TOPIC_BYTES: usize = 65_535;
/// Requests answered lately, remembered to recognise the broker's redelivery of one (QoS 1,
/// DUP set) after its reply went out.
const RECENT: usize = 1024;

/// After shutdown, once every MQTT request has its terminal reply (the daemon's grace period
/// decides how long that takes), how long the publisher may take to deliver what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    #[error("{0}")]
    Config(String),
    #[error("mqtt.{key} = {path:?}: {source}")]
    File {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// A client certificate and its key, PEM.
type ClientAuth = (Vec<u8>, Vec<u8>);

/// The resolved MQTT settings.
#[derive(Clone)]
pub struct Settings {
    pub broker: BrokerUrl,
    pub v5: bool,
    pub node: String,
    pub client_id: String,
    pub request_topic: String,
    pub cancel_topic: String,
    pub status_topic: String,
    /// The node's state (queue depth, speed, requests served), for Home Assistant.
    pub state_topic: String,
    pub state_every: Duration,
    /// Home Assistant discovery: its prefix, and whether a clean stop removes the configs.
    pub discovery: Option<(String, bool)>,
    /// The fleet group this node serves too.
    pub group: Option<Group>,
    /// Unacknowledged requests the broker may hand us at once (MQTT 5 receive maximum): the
    /// queue's capacity; the broker keeps the rest.
    pub receive_max: u16,
    credentials: Option<(String, String)>,
    /// The CA (PEM) and optionally a client certificate and key (PEM), for mqtts://.
    tls: Option<(Vec<u8>, Option<ClientAuth>)>,
    pub reply_prefixes: Vec<String>,
    /// `mqtt.prefix`: control topics of every node are `<prefix>/<node>/request|cancel|status`.
    pub prefix: String,
    pub keep_alive: Duration,
    pub backoff: (Duration, Duration),
    pub coalesce: (Duration, usize),
    pub hold: Duration,
    /// Largest packet taken from the broker. MQTT 5 tells the broker, which then drops larger
    /// messages for us instead of breaking the connection; under 3.1.1 a larger one costs a
    /// reconnect. Requests between `limits.max_line_bytes` and this are answered `too_large`.
    pub max_packet: usize,
}

/// A fleet group's topics.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    /// `<prefix>/group/<name>/request`: where clients send the group's requests.
    pub request_topic: String,
    /// `$share/<name>/<request_topic>`: the shared subscription that takes them.
    pub shared_subscription: String,
    /// `<prefix>/group/<name>/cancel`: a plain subscription, so that a cancel reaches every
    /// node of the group; the node that has the id answers.
    pub cancel_topic: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Settings")
            .field(
                "broker",
                &format!("{}:{}", self.broker.host, self.broker.port),
            )
            .field("tls", &self.broker.tls)
            .field("v5", &self.v5)
            .field("node", &self.node)
            .finish()
    }
}

impl Settings {
    /// Resolves the node name, credentials and TLS files of `mqtt.*`; `max_request_bytes` is
    /// `limits.max_line_bytes`, `queue_capacity` is `queue.capacity`.
    pub fn from_config(
        c: &MqttConfig,
        max_request_bytes: usize,
        queue_capacity: usize,
    ) -> Result<Settings, MqttError> {
        let broker = BrokerUrl::parse(&c.url).map_err(MqttError::Config)?;
        let node = if c.node.is_empty() {
            hostname()
        } else {
            c.node.clone()
        };
        let client_id = if c.client_id.is_empty() {
            format!("edgellm-{node}")
        } else {
            c.client_id.clone()
        };
        let read = |key: &'static str, path: &str| {
            std::fs::read(path).map_err(|source| MqttError::File {
                key,
                path: path.to_string(),
                source,
            })
        };
        let password = if !c.password_file.is_empty() {
            let p = read("password_file", &c.password_file)?;
            Some(
                String::from_utf8_lossy(&p)
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            )
        } else if !c.password_env.is_empty() {
            Some(std::env::var(&c.password_env).map_err(|_| {
                MqttError::Config(format!(
                    "mqtt.password_env = {:?}: the variable is not set",
                    c.password_env
                ))
            })?)
        } else if !c.password.is_empty() {
            Some(c.password.clone())
        } else {
            broker.password.clone()
        };
        let username = if c.username.is_empty() {
            broker.username.clone()
        } else {
            Some(c.username.clone())
        };
        let credentials = match (username, password) {
            (Some(u), p) => Some((u, p.unwrap_or_default())),
            (None, Some(_)) => {
                return Err(MqttError::Config(
                    "mqtt: a password without mqtt.username".into(),
                ))
            }
            (None, None) => None,
        };
        let tls = if broker.tls {
            if c.ca_file.is_empty() {
                return Err(MqttError::Config(
                    "mqtt.ca_file: mqtts:// needs the CA that signed the broker's certificate"
                        .into(),
                ));
            }
            let ca = read("ca_file", &c.ca_file)?;
            let client = if c.client_cert.is_empty() {
                None
            } else {
                Some((
                    read("client_cert", &c.client_cert)?,
                    read("client_key", &c.client_key)?,
                ))
            };
            // rumqttc is built without a crypto provider of its own: ring is the one here.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some((ca, client))
        } else {
            None
        };
        let base = format!("{}/{node}", c.prefix);
        let reply_prefixes = if c.reply_prefixes.is_empty() {
            vec![format!("{}/", c.prefix)]
        } else {
            c.reply_prefixes.clone()
        };
        Ok(Settings {
            broker,
            v5: c.protocol == 5,
            request_topic: format!("{base}/request"),
            cancel_topic: format!("{base}/cancel"),
            status_topic: format!("{base}/status"),
            state_topic: format!("{base}/state"),
            state_every: Duration::from_secs(c.state_interval_s),
            discovery: c
                .discovery
                .then(|| (c.discovery_prefix.clone(), c.discovery_remove_on_stop)),
            group: (!c.group.is_empty()).then(|| {
                let base = format!("{}/group/{}", c.prefix, c.group);
                Group {
                    name: c.group.clone(),
                    request_topic: format!("{base}/request"),
                    shared_subscription: format!("$share/{}/{base}/request", c.group),
                    cancel_topic: format!("{base}/cancel"),
                }
            }),
            receive_max: queue_capacity.clamp(1, usize::from(u16::MAX)) as u16,
            node,
            client_id,
            credentials,
            tls,
            reply_prefixes,
            prefix: c.prefix.clone(),
            keep_alive: Duration::from_secs(c.keep_alive_s),
            backoff: (
                Duration::from_millis(c.reconnect_min_ms),
                Duration::from_millis(c.reconnect_max_ms),
            ),
            coalesce: (Duration::from_millis(c.coalesce_ms), c.coalesce_tokens),
            hold: Duration::from_millis(c.reply_hold_ms),
            max_packet: (4 * max_request_bytes + 65_536).min(256 << 20),
        })
    }

    /// Whether replies may be published on `topic`, checked before anything runs: a topic the
    /// broker would refuse (NUL, wildcards, over 65,535 bytes) breaks the connection under
    /// 3.1.1, and a control topic (any node's `request`, `cancel`, `status`) would make the
    /// reply a command. The error says why, for the log.
    fn check_reply_topic(&self, topic: &str) -> Result<(), String> {
        if topic.is_empty() {
            return Err("empty".into());
        }
        if topic.len() > MAX_TOPIC_BYTES {
            return Err(format!(
                "{} bytes; MQTT allows {MAX_TOPIC_BYTES}",
                topic.len()
            ));
        }
        if topic.contains('\0') {
            return Err("contains NUL".into());
        }
        if topic.contains(['+', '#']) {
            return Err("contains a wildcard (+ or #)".into());
        }
        if !self
            .reply_prefixes
            .iter()
            .any(|p| topic.starts_with(p.as_str()))
        {
            return Err(format!(
                "outside mqtt.reply_prefixes {:?}",
                self.reply_prefixes
            ));
        }
        if let Some(rest) = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            let levels: Vec<&str> = rest.split('/').collect();
            let control = matches!(levels.last(), Some(&("request" | "cancel" | "status")))
                && (levels.len() == 2 || (levels.len() == 3 && levels[0] == "group"));
            if control {
                return Err("a control topic of the daemons (request, cancel or status)".into());
            }
        }
        Ok(())
    }

    /// How many requests may wait for room on the queue (see [`RouteTable::held`]).
    fn held_max(&self) -> usize {
        4 * usize::from(self.receive_max)
    }

    fn transport(&self) -> Transport {
        match &self.tls {
            Some((ca, client)) => Transport::tls_with_config(TlsConfiguration::Simple {
                ca: ca.clone(),
                alpn: None,
                client_auth: client.clone(),
            }),
            None => Transport::tcp(),
        }
    }
}

/// The host's name as a topic level: characters other than letters, digits, '-', '_', '.'
/// become '-'.
fn hostname() -> String {
    let h = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "edgellm".into());
    h.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// What the status reply says about MQTT.
#[derive(Debug, Default)]
pub struct MqttState {
    inner: Mutex<MqttInfo>,
}

impl MqttState {
    fn update(&self, f: impl FnOnce(&mut MqttInfo)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn info(&self) -> MqttInfo {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn connected(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connected
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
struct Out {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    correlation: Option<bytes::Bytes>,
    made: Instant,
}

/// What acknowledges one received message to the broker: its packet id and QoS, and the
/// connection it came on (an ack is only good on that connection; after a reconnect the broker
/// delivers the message again, and that delivery's ack is the one to send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    pkid: u16,
    exactly_once: bool,
    connection: u64,
}

/// What the publisher sends, in order: a message, or the ack of a request once the messages
/// before it (its terminal reply) are out.
#[derive(Debug, Clone)]
enum Item {
    Publish(Out),
    Ack(Ack),
}

/// A received publish, from either protocol version.
struct Msg {
    /// `None` for QoS 0, which is never acknowledged.
    ack: Option<Ack>,
    topic: String,
    /// Sent retained: a stored message the broker hands every new subscriber.
    retain: bool,
    /// Set by the broker on a QoS 1 redelivery.
    dup: bool,
    payload: bytes::Bytes,
    response_topic: Option<String>,
    correlation: Option<bytes::Bytes>,
    expiry_s: Option<u32>,
    priority: Option<String>,
}

enum Polled {
    Connected,
    Message(Msg),
    Disconnected,
    Other,
}

enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

impl Client {
    fn try_publish(&self, o: &Out) -> bool {
        match self {
            Client::V5(c) => {
                let props = PublishProperties {
                    correlation_data: o.correlation.clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    o.topic.clone(),
                    QoS5::AtLeastOnce,
                    o.retain,
                    o.payload.clone(),
                    props,
                )
                .is_ok()
            }
            Client::V4(c) => c
                .try_publish(
                    o.topic.clone(),
                    QoS::AtLeastOnce,
                    o.retain,
                    o.payload.clone(),
                )
                .is_ok(),
        }
    }

    fn try_ack(&self, a: Ack) -> bool {
        match self {
            Client::V5(c) => {
                let qos = if a.exactly_once {
                    QoS5::ExactlyOnce
                } else {
                    QoS5::AtLeastOnce
                };
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Vec::new(), None);
                p.pkid = a.pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V4(c) => {
                let qos = if a.exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                let mut p = rumqttc::Publish::new("", qos, Vec::new());
                p.pkid = a.pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    fn try_subscribe(&self, topic: &str) -> bool {
        match self {
            Client::V5(c) => c.try_subscribe(topic, QoS5::AtLeastOnce).is_ok(),
            Client::V4(c) => c.try_subscribe(topic, QoS::AtLeastOnce).is_ok(),
        }
    }

    fn try_disconnect(&self) {
        // Failing only when the event loop is gone, which is what a disconnect wants anyway.
        match self {
            Client::V5(c) => drop(c.try_disconnect()),
            Client::V4(c) => drop(c.try_disconnect()),
        }
    }
}

enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            EventLoop::V5(l) => {
                use rumqttc::v5::{Event as E, Incoming as I};
                match l.poll().await {
                    Ok(E::Incoming(I::ConnAck(_))) => Ok(Polled::Connected),
                    Ok(E::Incoming(I::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let priority = props
                            .user_properties
                            .iter()
                            .find(|(k, _)| k == "priority")
                            .map(|(_, v)| v.clone());
                        Ok(Polled::Message(Msg {
                            ack: ack_of(p.pkid, p.qos as u8),
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            retain: p.retain,
                            dup: p.dup,
                            payload: p.payload,
                            response_topic: props.response_topic,
                            correlation: props.correlation_data,
                            expiry_s: props.message_expiry_interval,
                            priority,
                        }))
                    }
                    Ok(E::Outgoing(rumqttc::Outgoing::Disconnect)) => Ok(Polled::Disconnected),
                    Ok(E::Incoming(I::PubAck(a))) => {
                        use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
                        if !matches!(a.reason, R::Success | R::NoMatchingSubscribers) {
                            // Refused once, dropped: never retried.
                            let why = a.properties.and_then(|p| p.reason_string);
                            tracing::warn!(
                                "mqtt: the broker refused a message of ours ({:?}{}); dropped",
                                a.reason,
                                why.map(|w| format!(": {w}")).unwrap_or_default()
                            );
                        }
                        Ok(Polled::Other)
                    }
                    Ok(_) => Ok(Polled::Other),
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                        Err(format!("the broker refused the connection: {code:?}"))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            EventLoop::V4(l) => {
                use rumqttc::{Event as E, Packet as I};
                match l.poll().await {
                    Ok(E::Incoming(I::ConnAck(_))) => Ok(Polled::Connected),
                    Ok(E::Incoming(I::Publish(p))) => Ok(Polled::Message(Msg {
                        ack: ack_of(p.pkid, p.qos as u8),
                        topic: p.topic,
                        retain: p.retain,
                        dup: p.dup,
                        payload: p.payload,
                        response_topic: None,
                        correlation: None,
                        expiry_s: None,
                        priority: None,
                    })),
                    Ok(E::Outgoing(rumqttc::Outgoing::Disconnect)) => Ok(Polled::Disconnected),
                    Ok(_) => Ok(Polled::Other),
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        Err(format!("the broker refused the connection: {code:?}"))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}

/// The ack a received message needs (QoS 1 or 2); its connection is filled in by the loop.
fn ack_of(pkid: u16, qos: u8) -> Option<Ack> {
    (qos > 0).then_some(Ack {
        pkid,
        exactly_once: qos == 2,
        connection: 0,
    })
}

fn connect(s: &Settings) -> (Client, EventLoop) {
    // Sessions survive a reconnect (QoS 1 requests sent while we were away are delivered
    // after it); subscriptions are renewed at every connect anyway.
    const SESSION_EXPIRY_S: u32 = 3600;
    if s.v5 {
        let mut o = rumqttc::v5::MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
        o.set_keep_alive(s.keep_alive)
            .set_clean_start(false)
            .set_manual_acks(true)
            .set_receive_maximum(Some(s.receive_max))
            .set_session_expiry_interval(Some(SESSION_EXPIRY_S))
            .set_max_packet_size(Some(s.max_packet as u32))
            .set_transport(s.transport())
            .set_last_will(LastWill5::new(
                &s.status_topic,
                "offline",
                QoS5::AtLeastOnce,
                true,
                None,
            ));
        if let Some((u, p)) = &s.credentials {
            o.set_credentials(u, p);
        }
        let (c, l) = rumqttc::v5::AsyncClient::new(o, 64);
        (Client::V5(c), EventLoop::V5(Box::new(l)))
    } else {
        let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
        o.set_keep_alive(s.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            // Outgoing: a done reply carries the whole text.
            .set_max_packet_size(s.max_packet, 16 << 20)
            .set_transport(s.transport())
            .set_last_will(rumqttc::LastWill::new(
                &s.status_topic,
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        if let Some((u, p)) = &s.credentials {
            o.set_credentials(u, p);
        }
        let (c, l) = rumqttc::AsyncClient::new(o, 64);
        (Client::V4(c), EventLoop::V4(Box::new(l)))
    }
}

/// Where a request's replies go.
struct Route {
    topic: String,
    correlation: Option<bytes::Bytes>,
    seq: u64,
    /// Streamed text not yet published, how many tokens it holds, since when.
    pending: String,
    pending_tokens: usize,
    pending_since: Option<Instant>,
    /// The request as it came (reply topic and payload), to recognise a redelivery of it.
    digest: u64,
    /// Sent to the broker after the terminal reply.
    ack: Option<Ack>,
}

/// Routes of the requests in flight, the digests of those answered lately, and the requests
/// held back while the queue is full.
#[derive(Default)]
struct RouteTable {
    live: HashMap<Arc<str>, Route>,
    recent: VecDeque<(Arc<str>, u64)>,
    /// Taken from the broker but not yet on the queue, oldest first: the queue was full. Not
    /// acknowledged either, as every request in flight. A broker that honours our receive
    /// maximum (the queue's capacity) never fills this; mosquitto 2.0 sends past it (each ack
    /// lets up to a receive maximum more through), so a burst waits here rather than being
    /// answered `queue_full` — up to `held_max`, beyond which the queue answers.
    held: VecDeque<Job>,
}

impl std::ops::Deref for RouteTable {
    type Target = HashMap<Arc<str>, Route>;
    fn deref(&self) -> &Self::Target {
        &self.live
    }
}

impl std::ops::DerefMut for RouteTable {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.live
    }
}

impl RouteTable {
    /// Puts the job on the queue, or holds it back while the queue is full (in order, up to
    /// `held_max`; beyond, the queue answers `queue_full`).
    fn submit(&mut self, queue: &Queue, job: Job, held_max: usize) {
        if self.held.is_empty() && queue.has_room() || self.held.len() >= held_max {
            queue.submit(job);
        } else {
            self.held.push_back(job);
        }
    }

    /// Moves held jobs to the queue while it has room (at shutdown: all, to be refused).
    fn release(&mut self, queue: &Queue) {
        while !self.held.is_empty() && queue.has_room() {
            if let Some(job) = self.held.pop_front() {
                queue.submit(job);
            }
        }
    }

    /// Cancels a held job: answered `cancelled` at once, as a waiting one.
    fn cancel_held(&mut self, id: &str) -> bool {
        let Some(i) = self.held.iter().position(|j| &*j.id == id) else {
            return false;
        };
        if let Some(job) = self.held.remove(i) {
            job.send(Event::Done(Box::new(Completion::empty(
                FinishReason::Cancelled,
            ))));
        }
        true
    }

    /// The request's route is done: remembered for a while by its digest.
    fn finish(&mut self, id: &Arc<str>) {
        if let Some(r) = self.live.remove(id) {
            if self.recent.len() >= RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back((id.clone(), r.digest));
        }
    }

    /// Whether `id` with `digest` is in flight or was answered lately.
    fn seen(&self, id: &str, digest: u64) -> bool {
        self.live.get(id).is_some_and(|r| r.digest == digest)
            || self.recent.iter().any(|(i, d)| &**i == id && *d == digest)
    }
}

/// What identifies one delivery of a request: its reply topic and its bytes.
fn digest(topic: &str, payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

type Routes = Arc<Mutex<RouteTable>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sensors of a node's Home Assistant device: object id, name, value template (`None`: the
/// availability topic's own payload), unit.
const SENSORS: [(&str, &str, Option<&str>, Option<&str>); 5] = [
    ("availability", "Availability", None, None),
    (
        "queue_depth",
        "Queue depth",
        Some("{{ value_json.queue_depth }}"),
        None,
    ),
    (
        "decode_tps",
        "Decode speed",
        Some("{{ value_json.last_decode_tps }}"),
        Some("tok/s"),
    ),
    (
        "requests_served",
        "Requests served",
        Some("{{ value_json.requests_served }}"),
        None,
    ),
    ("model", "Model", Some("{{ value_json.model }}"), None),
];

/// Home Assistant's discovery configs for this node (retained), or with `remove` the empty
/// retained messages that delete them.
fn discovery_messages(s: &Settings, status: &Status, remove: bool) -> Vec<Out> {
    let Some((prefix, _)) = &s.discovery else {
        return Vec::new();
    };
    // Home Assistant's node ids are letters, digits, '_' and '-'.
    let node_id: String = s
        .node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let device = serde_json::json!({
        "identifiers": [format!("edgellm_{node_id}")],
        "name": format!("edgellm {}", s.node),
        "manufacturer": "edgellm",
        "model": status.model,
        "sw_version": status.version,
    });
    SENSORS
        .iter()
        .map(|(object, name, template, unit)| {
            let topic = format!("{prefix}/sensor/edgellm_{node_id}/{object}/config");
            let payload = if remove {
                Vec::new()
            } else {
                let mut c = serde_json::json!({
                    "name": name,
                    "unique_id": format!("edgellm_{node_id}_{object}"),
                    "state_topic": if template.is_some() { &s.state_topic } else { &s.status_topic },
                    "availability_topic": s.status_topic,
                    "payload_available": "online",
                    "payload_not_available": "offline",
                    "device": device,
                    "origin": {"name": "edgellm", "sw_version": status.version},
                });
                if let Some(t) = template {
                    c["value_template"] = serde_json::json!(t);
                }
                if let Some(u) = unit {
                    c["unit_of_measurement"] = serde_json::json!(u);
                    c["state_class"] = serde_json::json!("measurement");
                }
                c.to_string().into_bytes()
            };
            Out {
                topic,
                payload,
                retain: true,
                correlation: None,
                made: Instant::now(),
            }
        })
        .collect()
}

/// The state topic's message: what the sensors show.
fn state_message(s: &Settings, status: &Status) -> Out {
    let payload = serde_json::json!({
        "queue_depth": status.queue.depth,
        "running": status.queue.running.is_some(),
        "last_decode_tps": status.last_decode_tps,
        "requests_served": status.requests.done,
        "model": status.model,
        "backend": status.backend,
        "uptime_s": status.uptime_s,
    });
    Out {
        topic: s.state_topic.clone(),
        payload: payload.to_string().into_bytes(),
        retain: false,
        correlation: None,
        made: Instant::now(),
    }
}

/// Runs the MQTT front-end until `shutdown`, then delivers what is left, says `offline` and
/// disconnects.
pub async fn serve(
    settings: Settings,
    ctx: Arc<Context>,
    state: Arc<MqttState>,
    shutdown: watch::Receiver<bool>,
) {
    state.update(|s| {
        s.broker = format!(
            "{}://{}:{}",
            if settings.broker.tls { "mqtts" } else { "mqtt" },
            settings.broker.host,
            settings.broker.port
        );
        s.node = settings.node.clone();
        s.group = settings.group.as_ref().map(|g| g.name.clone());
        s.protocol = if settings.v5 { "5" } else { "3.1.1" }.to_string();
    });
    tracing::info!(
        broker = %lock(&state.inner).broker,
        node = %settings.node,
        requests = %settings.request_topic,
        group = settings.group.as_ref().map(|g| g.request_topic.as_str()).unwrap_or(""),
        "mqtt: connecting"
    );
    let (client, eventloop) = connect(&settings);
    let client = Arc::new(client);
    let routes: Routes = Arc::default();
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Item>();
    // The connection's number while connected (1, 2, … at each connect), 0 while not.
    let (connected_tx, connected_rx) = watch::channel(0u64);
    let (finish_tx, finish_rx) = watch::channel(false);
    // The state topic, every few seconds while connected (Home Assistant's sensors read it).
    let stater = settings.discovery.is_some().then(|| {
        let (ctx, out_tx, s) = (ctx.clone(), out_tx.clone(), settings.clone());
        let mut connected = connected_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(s.state_every);
            loop {
                tick.tick().await;
                if *connected.borrow_and_update() == 0 {
                    if connected.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                if out_tx
                    .send(Item::Publish(state_message(&s, &ctx.status())))
                    .is_err()
                {
                    return;
                }
            }
        })
    });
    let ctx_for_stop = ctx.clone();
    let handler = Handler {
        ctx,
        settings: settings.clone(),
        routes: routes.clone(),
        reply_tx,
        out_tx,
        state: state.clone(),
    };
    let looper = tokio::spawn(run_loop(
        eventloop,
        client.clone(),
        handler,
        connected_tx,
        finish_rx,
        state.clone(),
    ));
    let inputs = Inputs {
        replies: reply_rx,
        immediate: out_rx,
        connected: connected_rx,
        shutdown,
    };
    publisher(
        &settings,
        &client,
        (routes, &ctx_for_stop.queue),
        inputs,
        &state,
    )
    .await;
    if let Some(t) = stater {
        t.abort();
    }
    // Clean stop: `offline` (retained) replaces the `online` of this run, then disconnect.
    if state.connected() {
        if settings
            .discovery
            .as_ref()
            .is_some_and(|(_, remove)| *remove)
        {
            for o in discovery_messages(&settings, &ctx_for_stop.status(), true) {
                client.try_publish(&o);
            }
        }
        client.try_publish(&Out {
            topic: settings.status_topic.clone(),
            payload: b"offline".to_vec(),
            retain: true,
            correlation: None,
            made: Instant::now(),
        });
    }
    client.try_disconnect();
    let _ = finish_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(3), looper)
        .await
        .is_err()
    {
        tracing::warn!("mqtt: the broker did not see the disconnect in time");
    }
    tracing::info!("mqtt: stopped");
}

/// Polls the event loop without pause; reconnects with capped exponential backoff.
async fn run_loop(
    mut eventloop: EventLoop,
    client: Arc<Client>,
    handler: Handler,
    connected: watch::Sender<u64>,
    mut finish: watch::Receiver<bool>,
    state: Arc<MqttState>,
) {
    let s = &handler.settings;
    let mut backoff = s.backoff.0;
    let mut failures = 0u64;
    let mut connection = 0u64;
    loop {
        // A poll in progress may hold a request it took from the client's channel and has not
        // yet written (rumqttc's poll is not cancel-safe): the stop waits for it to finish
        // rather than dropping it, or a removal or the `offline` queued just before the stop
        // could be lost.
        let polled = {
            let poll = eventloop.poll();
            tokio::pin!(poll);
            tokio::select! {
                p = &mut poll => Ok(p),
                _ = until_true(&mut finish) => {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    Err((deadline, tokio::time::timeout_at(deadline, &mut poll).await))
                }
            }
        };
        let polled = match polled {
            Ok(p) => p,
            Err((deadline, mut last)) => {
                // After our DISCONNECT, read until the broker closes the connection: closing
                // it ourselves with its acks unread would send a reset, and the broker drops
                // what it had not yet read — the last removals and `offline` with it.
                let mut sent_disconnect = false;
                while let Ok(p) = last {
                    match p {
                        Ok(Polled::Disconnected) => sent_disconnect = true,
                        Err(e) if !sent_disconnect => {
                            tracing::warn!("mqtt: {e} while stopping");
                            break;
                        }
                        Err(_) => break,
                        Ok(_) => {}
                    }
                    last = tokio::time::timeout_at(deadline, eventloop.poll()).await;
                }
                return;
            }
        };
        match polled {
            Ok(Polled::Connected) => {
                backoff = s.backoff.0;
                if failures > 0 {
                    tracing::info!("mqtt: connected again after {failures} failed attempts");
                } else {
                    tracing::info!("mqtt: connected");
                }
                failures = 0;
                state.update(|st| {
                    st.connected = true;
                    st.connects += 1;
                    st.last_error = None;
                });
                connection += 1;
                client.try_subscribe(&s.request_topic);
                client.try_subscribe(&s.cancel_topic);
                if let Some(g) = &s.group {
                    client.try_subscribe(&g.shared_subscription);
                    client.try_subscribe(&g.cancel_topic);
                }
                client.try_publish(&Out {
                    topic: s.status_topic.clone(),
                    payload: b"online".to_vec(),
                    retain: true,
                    correlation: None,
                    made: Instant::now(),
                });
                let status = handler.ctx.status();
                for o in discovery_messages(s, &status, false) {
                    client.try_publish(&o);
                }
                if s.discovery.is_some() {
                    client.try_publish(&state_message(s, &status));
                }
                let _ = connected.send(connection);
            }
            Ok(Polled::Message(mut m)) => {
                if let Some(a) = &mut m.ack {
                    a.connection = connection;
                }
                handler.on_message(m)
            }
            Ok(Polled::Disconnected) | Ok(Polled::Other) => {}
            Err(e) => {
                let _ = connected.send(0);
                failures += 1;
                // The first failure of an outage, and a changed reason, are worth a line; the
                // rest of a long outage is one line a minute at most, by the backoff's cap.
                let was = lock(&state.inner).last_error.clone();
                if was.as_deref() != Some(&e) || failures == 1 {
                    tracing::warn!("mqtt: {e}; reconnecting in {} ms", backoff.as_millis());
                }
                state.update(|st| {
                    st.connected = false;
                    st.last_error = Some(e);
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = until_true(&mut finish) => return,
                }
                backoff = (backoff * 2).min(s.backoff.1);
            }
        }
    }
}

/// The channel of every MQTT request: MQTT requests share one id space (the socket's
/// connections count up from 1).
const MQTT_CHANNEL: u64 = u64::MAX;

/// Who an MQTT message comes from. The broker's ACLs decide who may publish to a node's topics,
/// so any MQTT client may cancel an MQTT request by its id; the peer is the reply topic, which
/// keeps sessions (and the running id in `status`) apart per client: a client that cannot read
/// a reply topic cannot read its sessions' answers either.
struct MqttCaller(Owner);

impl MqttCaller {
    fn of(reply_topic: &Option<String>) -> MqttCaller {
        let peer = match reply_topic {
            Some(t) => format!("mqtt:{t}"),
            None => "mqtt".to_string(),
        };
        MqttCaller(Owner::new(MQTT_CHANNEL, &peer))
    }

    fn as_caller(&self) -> Caller<'_> {
        Caller {
            owner: &self.0,
            admin: false,
        }
    }
}

/// Handles received messages, in the event loop task: nothing here waits.
struct Handler {
    ctx: Arc<Context>,
    settings: Settings,
    routes: Routes,
    reply_tx: mpsc::UnboundedSender<Reply>,
    out_tx: mpsc::UnboundedSender<Item>,
    state: Arc<MqttState>,
}

impl Handler {
    fn publish(&self, topic: &str, correlation: &Option<bytes::Bytes>, reply: &Response) {
        let _ = self.out_tx.send(Item::Publish(Out {
            topic: topic.to_string(),
            payload: reply.to_mqtt(None, &self.settings.node).into_bytes(),
            retain: false,
            correlation: correlation.clone(),
            made: Instant::now(),
        }));
    }

    /// Handles a received message and acknowledges it to the broker: at once, unless it became
    /// a request in flight, whose ack waits for its terminal reply.
    fn on_message(&self, m: Msg) {
        let ack = m.ack;
        if !self.take(m) {
            if let Some(a) = ack {
                let _ = self.out_tx.send(Item::Ack(a));
            }
        }
    }

    /// Handles a received message; true when it is (or already was) a request in flight.
    fn take(&self, m: Msg) -> bool {
        let s = &self.settings;
        let group = s.group.as_ref();
        let from_group =
            group.is_some_and(|g| m.topic == g.request_topic || m.topic == g.cancel_topic);
        let is_cancel =
            m.topic == s.cancel_topic || group.is_some_and(|g| m.topic == g.cancel_topic);
        let is_request =
            m.topic == s.request_topic || group.is_some_and(|g| m.topic == g.request_topic);
        if !is_request && !is_cancel {
            return false;
        }
        self.state.update(|st| st.requests += 1);
        if m.retain {
            // A retained request would run again at every restart and for every new node.
            self.refused();
            tracing::warn!(
                topic = %m.topic,
                "mqtt: a retained request was not run (requests must not be retained); clearing it from the broker"
            );
            if !m.payload.is_empty() {
                let _ = self.out_tx.send(Item::Publish(Out {
                    topic: m.topic.clone(),
                    payload: Vec::new(),
                    retain: true,
                    correlation: None,
                    made: Instant::now(),
                }));
            }
            return false;
        }
        // The payload is read once: its envelope (id, 3.1.1 reply topic) first, so that even a
        // request that fails to parse further is answered where it asked.
        let json = wire::read_json(&m.payload);
        let (id_hint, payload_reply_to) = json.as_ref().map(Envelope::of).unwrap_or_default();
        // The reply topic: MQTT 5's response topic, else the payload's `reply_to` (3.1.1). Both
        // are checked before anything runs; a refused one is logged (shortened, escaped), and
        // answered on the other when that one is valid.
        let mut candidates = [m.response_topic.clone(), payload_reply_to];
        let mut topic = None;
        let mut why_not = None;
        for t in candidates.iter_mut().filter_map(Option::take) {
            match s.check_reply_topic(&t) {
                Ok(()) if topic.is_none() => topic = Some(t),
                Ok(()) => {}
                Err(why) if topic.is_none() && why_not.is_none() => why_not = Some((t, why)),
                Err(_) => {}
            }
        }
        if let Some((t, why)) = why_not {
            self.refused();
            let shown: String = t.chars().take(120).collect();
            tracing::warn!(
                id = id_hint.as_deref().unwrap_or(""),
                "mqtt: refused a request whose reply topic {shown:?}{} is not allowed: {why}",
                if shown.len() < t.len() { "…" } else { "" }
            );
            if let Some(valid) = topic {
                let reply = Response::error(
                    id_hint.as_deref(),
                    ErrorCode::BadRequest,
                    format!("reply_to: not an allowed reply topic ({why})"),
                );
                self.publish(&valid, &m.correlation, &reply);
            }
            return false;
        }
        let answer = |reply: Response| match &topic {
            Some(t) => self.publish(t, &m.correlation, &reply),
            None => {
                tracing::warn!(
                    id = id_hint.as_deref().unwrap_or(""),
                    "mqtt: no reply topic (response topic or reply_to) for: {}",
                    reply.to_line()
                )
            }
        };
        let live = self.ctx.live();
        let limits = &live.limits;
        if m.payload.len() > limits.max_line_bytes {
            self.refused();
            answer(Response::error(
                id_hint.as_deref(),
                ErrorCode::TooLarge,
                format!(
                    "request of {} bytes; the limit is {} bytes (limits.max_line_bytes)",
                    m.payload.len(),
                    limits.max_line_bytes
                ),
            ));
            return false;
        }
        // A cancel sent to the group reaches every node of it: the node that has the request
        // answers, the others stay silent.
        let cancel = |id: String| {
            let mut routes = lock(&self.routes);
            if from_group && !routes.contains_key(id.as_str()) {
                tracing::debug!(%id, "mqtt: a group cancel for a request not here");
                return;
            }
            let state = if routes.cancel_held(&id) {
                CancelState::Queued
            } else {
                drop(routes);
                self.ctx
                    .queue
                    .cancel(MqttCaller::of(&topic).as_caller(), &id)
            };
            if topic.is_some() {
                answer(Response::Cancel { id, state });
            }
        };
        if is_cancel {
            let id = id_hint.clone().unwrap_or_default();
            if id.is_empty() {
                self.refused();
                answer(Response::error(
                    None,
                    ErrorCode::BadRequest,
                    "id: a cancel needs the id (a string) of the request to cancel",
                ));
            } else {
                cancel(id);
            }
            return false;
        }
        let now = Instant::now();
        let parsed = json.and_then(|v| wire::parse_value(v, limits, live.default_deadline_ms, now));
        let g = match parsed {
            Err(r) => {
                self.refused();
                answer(r.response());
                return false;
            }
            Ok(Incoming::Status { .. }) => {
                let mut status = self.ctx.status_for(MqttCaller::of(&topic).as_caller());
                status.id = id_hint.clone();
                answer(Response::Status(Box::new(status)));
                return false;
            }
            Ok(Incoming::Cancel { id, .. }) => {
                cancel(id);
                return false;
            }
            Ok(Incoming::Generate(g)) => g,
        };
        let Some(topic) = topic else {
            self.refused();
            tracing::warn!(
                id = %g.id,
                "mqtt: request names no reply topic (MQTT 5 response topic, or reply_to); not run"
            );
            return false;
        };
        let refuse = |code, message: String| {
            self.refused();
            let reply = Refusal {
                id: Some(g.id.clone()),
                code,
                message,
            }
            .response();
            self.publish(&topic, &m.correlation, &reply);
        };
        let priority = match (g.priority, &m.priority) {
            (Some(p), _) => p,
            (None, Some(p)) => match p.trim().parse::<i32>() {
                Ok(p) if wire::check_priority(p).is_ok() => p,
                _ => {
                    refuse(
                        ErrorCode::BadRequest,
                        format!("user property priority = {p:?}: allowed -100..=100"),
                    );
                    return false;
                }
            },
            (None, None) => 0,
        };
        // Message expiry (MQTT 5) is a deadline too; the earlier one holds.
        let expiry = m.expiry_s.map(|s| now + Duration::from_secs(u64::from(s)));
        let deadline = match (g.deadline, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let id: Arc<str> = g.id.as_str().into();
        {
            let mut routes = lock(&self.routes);
            let digest = digest(&topic, &m.payload);
            if m.dup {
                // The broker's redelivery (QoS 1, DUP) of a request already taken: run once.
                // One in flight is acknowledged after its reply, on the connection this
                // delivery came on; one answered lately at once.
                if let Some(r) = routes.live.get_mut(&id).filter(|r| r.digest == digest) {
                    tracing::debug!(id = %g.id, "mqtt: a redelivered request is in flight");
                    r.ack = m.ack.or(r.ack);
                    return true;
                }
                if routes.seen(&id, digest) {
                    tracing::debug!(id = %g.id, "mqtt: a redelivered request was answered");
                    return false;
                }
            }
            if routes.contains_key(&id) {
                drop(routes);
                refuse(
                    ErrorCode::BadRequest,
                    format!("id {:?} is already queued or running", g.id),
                );
                return false;
            }
            routes.insert(
                id.clone(),
                Route {
                    topic: topic.clone(),
                    correlation: m.correlation.clone(),
                    seq: 0,
                    pending: String::new(),
                    pending_tokens: 0,
                    pending_since: None,
                    digest,
                    ack: m.ack,
                },
            );
        }
        let g = *g;
        let owner = MqttCaller::of(&Some(topic.clone())).0;
        let mut job = Job::new(&g.id, owner, "mqtt", g.req, self.reply_tx.clone());
        job.stream = g.stream;
        job.priority = priority;
        job.deadline = deadline;
        // A refusal comes back through the publisher like any terminal reply.
        lock(&self.routes).submit(&self.ctx.queue, job, self.settings.held_max());
        true
    }

    fn refused(&self) {
        self.state.update(|st| st.refused += 1);
    }
}

/// What the publisher waits on.
struct Inputs {
    /// The engine's replies to MQTT requests.
    replies: mpsc::UnboundedReceiver<Reply>,
    /// What the event loop task answers at once (refusals, status, cancel replies, and the acks
    /// of messages not run).
    immediate: mpsc::UnboundedReceiver<Item>,
    /// The connection's number, 0 while disconnected.
    connected: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

/// Turns replies into messages and publishes them when the broker is there; sends each
/// request's ack after its terminal reply.
async fn publisher(
    s: &Settings,
    client: &Client,
    (routes, queue): (Routes, &Queue),
    inputs: Inputs,
    state: &MqttState,
) {
    let Inputs {
        mut replies,
        mut immediate,
        mut connected,
        mut shutdown,
    } = inputs;
    let mut outbox: VecDeque<Item> = VecDeque::new();
    let tick_every = s
        .coalesce
        .0
        .clamp(Duration::from_millis(5), Duration::from_millis(100));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    // Since when, after shutdown, every request has had its terminal reply.
    let mut answered_since: Option<Instant> = None;
    loop {
        tokio::select! {
            Some(r) = replies.recv() => on_reply(r, &routes, s, &mut outbox),
            Some(o) = immediate.recv() => outbox.push_back(o),
            _ = tick.tick() => {
                flush_due(&routes, s, &mut outbox);
            }
            _ = connected.changed() => {}
            _ = until_true(&mut shutdown), if !stopping => {
                stopping = true;
            }
        }
        // Requests held back while the queue was full go on as it empties (on every reply, and
        // at least every tick).
        lock(&routes).release(queue);
        // Publish what the broker can take now; drop what waited too long, and acks meant for
        // a connection that is gone (the broker delivers those requests again).
        let connection = *connected.borrow();
        if connection != 0 {
            while let Some(item) = outbox.front() {
                let sent = match item {
                    Item::Publish(o) => client.try_publish(o),
                    Item::Ack(a) => a.connection != connection || client.try_ack(*a),
                };
                if !sent {
                    break; // the client's queue is full: next tick
                }
                if let Some(Item::Publish(_)) = outbox.pop_front() {
                    state.update(|st| st.published += 1);
                }
            }
        }
        loop {
            match outbox.front() {
                Some(Item::Ack(a)) if a.connection != connection => {}
                Some(Item::Publish(o)) if o.made.elapsed() > s.hold => {
                    state.update(|st| st.dropped_replies += 1);
                    tracing::warn!(
                        topic = %o.topic,
                        "mqtt: dropped a reply held {} ms while the broker was away (mqtt.reply_hold_ms)",
                        o.made.elapsed().as_millis()
                    );
                }
                _ => break,
            }
            outbox.pop_front();
        }
        if stopping && lock(&routes).is_empty() {
            let since = *answered_since.get_or_insert_with(Instant::now);
            if outbox.is_empty() {
                return;
            }
            if since.elapsed() > DRAIN_TIMEOUT {
                tracing::warn!("mqtt: stopping with {} replies undelivered", outbox.len());
                return;
            }
        }
    }
}

fn message(route: &mut Route, body: &Response, node: &str) -> Item {
    let payload = body.to_mqtt(Some(route.seq), node);
    route.seq += 1;
    Item::Publish(Out {
        topic: route.topic.clone(),
        payload: payload.into_bytes(),
        retain: false,
        correlation: route.correlation.clone(),
        made: Instant::now(),
    })
}

fn flush_route(id: &str, route: &mut Route, node: &str, outbox: &mut VecDeque<Item>) {
    if route.pending_tokens == 0 {
        return;
    }
    let text = std::mem::take(&mut route.pending);
    route.pending_tokens = 0;
    route.pending_since = None;
    let o = message(
        route,
        &Response::Token {
            id: id.to_string(),
            text,
        },
        node,
    );
    outbox.push_back(o);
}

fn on_reply(r: Reply, routes: &Routes, s: &Settings, outbox: &mut VecDeque<Item>) {
    let (every, max_tokens) = s.coalesce;
    let mut routes = lock(routes);
    let Some(route) = routes.get_mut(&r.id) else {
        return;
    };
    match r.event {
        Event::Token(text) => {
            route.pending.push_str(&text);
            route.pending_tokens += 1;
            route.pending_since.get_or_insert_with(Instant::now);
            if route.pending_tokens >= max_tokens || every.is_zero() {
                flush_route(&r.id, route, &s.node, outbox);
            }
        }
        terminal => {
            flush_route(&r.id, route, &s.node, outbox);
            let o = message(route, &Response::event(&r.id, &terminal), &s.node);
            outbox.push_back(o);
            if let Some(a) = route.ack {
                outbox.push_back(Item::Ack(a));
            }
            routes.finish(&r.id);
        }
    }
}

fn flush_due(routes: &Routes, s: &Settings, outbox: &mut VecDeque<Item>) {
    let mut routes = lock(routes);
    for (id, route) in routes.iter_mut() {
        if route
            .pending_since
            .is_some_and(|t| t.elapsed() >= s.coalesce.0)
        {
            flush_route(id, route, &s.node, outbox);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let c = MqttConfig {
            node: "n1".into(),
            ..Default::default()
        };
        Settings::from_config(&c, 65536, 64).expect("settings")
    }

    #[test]
    fn reply_topics_are_checked_before_anything_runs() {
        let s = settings();
        assert_eq!(s.check_reply_topic("edgellm/replies/a"), Ok(()));
        assert_eq!(s.check_reply_topic("edgellm/n1/replies"), Ok(()));
        for bad in [
            "",
            "edgellm/replies/a\0b",
            "edgellm/replies/+",
            "edgellm/replies/#",
            "other/replies",
            "edgellm/n1/request",
            "edgellm/n2/cancel",
            "edgellm/n1/status",
            "edgellm/group/kitchen/request",
            "edgellm/group/kitchen/cancel",
        ] {
            assert!(s.check_reply_topic(bad).is_err(), "{bad:?}");
        }
        let long = format!("edgellm/{}", "x".repeat(MAX_TOPIC_BYTES));
        assert!(s.check_reply_topic(&long).is_err());
    }

    /// A redelivered request (same reply topic and bytes) is recognised while it runs and for a
    /// while after its reply; another request with the same id is not.
    #[test]
    fn redeliveries_are_recognised() {
        let mut t = RouteTable::default();
        let id: Arc<str> = "r1".into();
        let d = digest("edgellm/replies/a", b"{\"id\":\"r1\"}");
        t.insert(
            id.clone(),
            Route {
                topic: "edgellm/replies/a".into(),
                correlation: None,
                seq: 0,
                pending: String::new(),
                pending_tokens: 0,
                pending_since: None,
                digest: d,
                ack: None,
            },
        );
        assert!(t.seen("r1", d));
        assert!(!t.seen("r1", digest("edgellm/replies/b", b"{\"id\":\"r1\"}")));
        t.finish(&id);
        assert!(t.is_empty());
        assert!(t.seen("r1", d), "remembered after its reply");
        for i in 0..RECENT {
            let other: Arc<str> = format!("x{i}").into();
            t.recent.push_back((other, 0));
            if t.recent.len() > RECENT {
                t.recent.pop_front();
            }
        }
        assert!(!t.seen("r1", d), "forgotten after RECENT others");
    }
}
