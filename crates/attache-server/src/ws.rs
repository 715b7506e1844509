//! `GET /ws`: task events pushed over WebSocket, in ClaudeBench's protocol.
//!
//! Client → server: `{"action":"subscribe","events":["task.*"]}`,
//! `{"action":"unsubscribe","events":[..]}`, `{"action":"ping"}` and
//! `{"action":"execute","request":<JSON-RPC request>}`.
//! Server → client: `{"type":"connected","clientId"}`, `{"type":"subscribed","events"}`,
//! `{"type":"event","event":<type>,"data":<event>,"timestamp"}`, `{"type":"pong"}`,
//! JSON-RPC responses, and `{"type":"error","error":{code,message}}`.
//!
//! Patterns are exact event types, `prefix.*` or `*`. Events come from the
//! global events stream (so only durable ones), filtered to the tasks the
//! connection's principal may read; `"offset"` in a subscribe replays from there.
//!
//! Bounds: a message (all its fragments together) is at most
//! `ws_max_message_bytes`, else the socket closes with 1009 (message too big);
//! a message in progress holds its declared bytes of the body budget
//! (`--body-buffer-bytes`; past it the socket closes with 1013, try again
//! later) and must end within `--body-read-timeout` of its first byte, pings
//! and pongs between its fragments notwithstanding (else 1008: [`frames`]);
//! a connection holds at most `ws_max_patterns` patterns of at most
//! [`MAX_PATTERN_BYTES`] each, and a subscribe that would pass either is
//! refused whole with -32602. Work per event is one hash
//! lookup plus at most `ws_max_patterns` prefix comparisons. A message as a
//! tree of values is held from the body budget while it is handled (an
//! `execute` until its calls have run), as a `/rpc` body is, and refused
//! past it with -32600 naming `body_buffer_bytes`. A replay (a subscribe's
//! `offset`) reads one page of the log per turn of the connection's loop,
//! yielding between pages ([`events::next_page`]); a connection runs one
//! replay at a time, and a subscribe with an offset while one runs is
//! refused with -32602.
//!
//! Sockets: a principal holds at most `max_websockets_per_principal` open at
//! once (429 past it), all principals together at most `max_websockets`
//! (503 past it; by default half of `max_connections`), refused before the
//! upgrade ([`slots`]).
//!
//! Timers (the connection's own stop at the upgrade): the server pings every
//! half `idle_timeout`; a connection from which no frame at all (a pong, a
//! message) arrives for `idle_timeout` is closed with 1001 (going away). A
//! send the client does not take for `slow_reader_timeout` (it reads
//! nothing) ends the connection; a 1008 close frame is offered for a moment
//! first, in case a little room is left.

pub mod frames;
pub mod slots;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use attache_core::{Offset, PrincipalKey, ReadOffset};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::Message;

use crate::access::now_ms;
use crate::auth::{self, Presented};
use crate::error::ApiError;
use crate::events::{self, Visibility};
use crate::metrics::Closed;
use crate::rpc;
use crate::AppState;

/// The socket `/ws` serves: tungstenite over the upgraded connection, its
/// incoming frames watched ([`frames::Watched`]).
type Socket = WebSocketStream<frames::Watched<TokioIo<hyper::upgrade::Upgraded>>>;

/// The longest event pattern a subscribe may name (event types are a few
/// dozen bytes): the patterns a connection holds, echoed whole by every
/// `subscribed` reply, stay within `ws_max_patterns` times this.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Does `pattern` (`task.*`, `*`, or an exact type) match `event_type`?
pub fn matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// The patterns one connection holds: exact types in a set, prefixes (with
/// `*` for the empty prefix) in a list no longer than the pattern cap. Each
/// pattern's text is held once, shared by the list in order and the set or
/// list that matches it.
#[derive(Debug, Default)]
pub struct Patterns {
    /// Every pattern, in the order first subscribed (what `subscribed` echoes).
    order: Vec<Arc<str>>,
    exact: HashSet<Arc<str>>,
    /// Prefix patterns, each with its `*`.
    prefixes: Vec<Arc<str>>,
}

/// A prefix pattern without its `*`.
fn prefix_of(pattern: &str) -> &str {
    pattern.strip_suffix('*').unwrap_or(pattern)
}

impl Patterns {
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Every pattern, in the order first subscribed.
    pub fn listed(&self) -> Vec<&str> {
        self.order.iter().map(|p| &**p).collect()
    }

    /// Does any pattern match `event_type`?
    pub fn matches(&self, event_type: &str) -> bool {
        self.exact.contains(event_type) || self.prefixes.iter().any(|p| event_type.starts_with(prefix_of(p)))
    }

    /// Adds `wanted` (duplicates count once) unless the connection would then
    /// hold more than `max`; then nothing is added and `Err` says how many it would hold.
    pub fn add(&mut self, wanted: Vec<String>, max: usize) -> Result<(), usize> {
        let mut fresh: Vec<&str> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for p in &wanted {
            if !self.contains(p) && seen.insert(p.as_str()) {
                if self.order.len() + seen.len() > max {
                    return Err(self.order.len() + seen.len());
                }
                fresh.push(p);
            }
        }
        for p in fresh {
            let p: Arc<str> = Arc::from(p);
            if p.ends_with('*') {
                self.prefixes.push(p.clone());
            } else {
                self.exact.insert(p.clone());
            }
            self.order.push(p);
        }
        Ok(())
    }

    fn contains(&self, pattern: &str) -> bool {
        match pattern.ends_with('*') {
            true => self.prefixes.iter().any(|p| &**p == pattern),
            false => self.exact.contains(pattern),
        }
    }

    /// Removes every pattern named in `gone`.
    pub fn remove(&mut self, gone: &[String]) {
        let gone: HashSet<&str> = gone.iter().map(String::as_str).collect();
        self.order.retain(|p| !gone.contains(&**p));
        self.exact.retain(|p| !gone.contains(&**p));
        self.prefixes.retain(|p| !gone.contains(&**p));
    }
}

/// GET /ws: the HTTP/1.1 upgrade (RFC 6455). The handshake is done here
/// rather than by axum's extractor so that the connection's bytes pass
/// through [`frames::Watched`] before tungstenite reads them. HTTP/2 offers
/// no extended CONNECT (`conn`), so every WebSocket is a connection of its own.
///
/// The caller is told from the request's credentials as on every route, or,
/// in token mode without `Authorization`, from an offered subprotocol
/// `attache.bearer.<token>` ([`auth::websocket_credentials`]: a browser can
/// set no other header on a WebSocket). The answer selects one offered
/// subprotocol, as browsers require when any is offered: the first that is
/// not a credential (a client offers `attache` beside its token), else the
/// credential itself.
pub async fn upgrade(State(state): State<AppState>, mut req: Request) -> Response {
    let credentials = auth::websocket_credentials(req.headers());
    let who = match state.auth.authenticate(&credentials) {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let accept = match handshake(&req) {
        Ok(accept) => accept,
        Err(e) => return e.into_response(),
    };
    // Held by the socket's task until it ends.
    let slot = match state.websockets.take(&who) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::new(StatusCode::UPGRADE_REQUIRED, "NOT_UPGRADABLE", "this connection cannot be upgraded")
            .with_header(header::UPGRADE, "websocket")
            .into_response();
    };
    let presented = Presented::of(&credentials);
    let offered = auth::offered_subprotocols(req.headers());
    let selected = offered
        .iter()
        .find(|p| !p.starts_with(auth::WS_BEARER_PROTOCOL))
        .or_else(|| offered.first())
        .and_then(|p| HeaderValue::from_str(p).ok());
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(upgraded) = on_upgrade.await else { return };
        let max = state.config.ws_max_message_bytes;
        let (io, clock) = frames::Watched::new(TokioIo::new(upgraded), state.clone(), who.clone(), max);
        // tungstenite's 128 KiB read and write buffers would be reserved per
        // connection; /ws messages are small, and larger ones grow the buffer.
        let config = WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        serve(state, who, presented, socket, clock).await;
    });
    let mut res = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_default();
    if let Some(protocol) = selected {
        res.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    res
}

/// Checks a WebSocket opening handshake (RFC 6455 section 4.2.1) and
/// answers its `Sec-WebSocket-Accept`.
fn handshake(req: &Request) -> Result<HeaderValue, ApiError> {
    let refuse = |message: &str| ApiError::new(StatusCode::BAD_REQUEST, "NOT_A_WEBSOCKET_HANDSHAKE", message);
    let headers = req.headers();
    if req.version() != Version::HTTP_11 {
        return Err(refuse("a WebSocket opens with an HTTP/1.1 upgrade"));
    }
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err(refuse("Connection must include upgrade"));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err(refuse("Upgrade must be websocket"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err(refuse("Sec-WebSocket-Version must be 13").with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or_else(|| refuse("Sec-WebSocket-Key is missing"))?;
    HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(key.as_bytes())).map_err(ApiError::internal)
}

/// The close frame for a read that failed: 1009 when the message passed the
/// size limit, 1013 when the messages in progress of all clients hold the
/// body budget, 1002 for any other protocol error.
fn close_for(e: tungstenite::Error, max: usize) -> Message {
    // Why the watch in front of tungstenite (`frames`) failed a read, if it did.
    let watched = |io: &std::io::Error| {
        io.get_ref().map(|e| (e.downcast_ref::<frames::Refused>().copied(), e.is::<frames::BudgetFull>()))
    };
    let (code, reason) = match &e {
        tungstenite::Error::Capacity(_) => (CloseCode::Size, too_big(max)),
        tungstenite::Error::Io(io) => match watched(io) {
            Some((Some(frames::Refused::MessageTooBig), _)) => (CloseCode::Size, too_big(max)),
            Some((_, true)) => (CloseCode::Again, format!("server busy: {io}; try again later")),
            _ => (CloseCode::Protocol, "protocol error".to_owned()),
        },
        _ => (CloseCode::Protocol, "protocol error".to_owned()),
    };
    close(code, reason)
}

fn too_big(max: usize) -> String {
    format!("message too big: at most {max} bytes (ws_max_message_bytes)")
}

fn close(code: CloseCode, reason: impl Into<String>) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into().into() }))
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error(code: i64, message: &str) -> Message {
    text(json!({ "type": "error", "error": { "code": code, "message": message }, "timestamp": now_ms() }))
}

/// How long a close frame may wait for room in a slow reader's connection.
const SLOW_CLOSE_WITHIN: Duration = Duration::from_millis(500);

/// Sends `msg`, giving the client `slow_reader_timeout` to take it. `false`:
/// the connection is over (gone, or closed here as a slow reader).
async fn send(state: &AppState, socket: &mut Socket, msg: Message) -> bool {
    match tokio::time::timeout(state.config.slow_reader_timeout, socket.send(msg)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            state.metrics.connection_closed(Closed::SlowReader);
            tracing::debug!("closing a WebSocket whose client reads nothing");
            let reason = "slow reader: the client read nothing for slow_reader_timeout";
            let _ = tokio::time::timeout(SLOW_CLOSE_WITHIN, socket.send(close(CloseCode::Policy, reason))).await;
            false
        }
    }
}

async fn serve(
    state: AppState,
    who: PrincipalKey,
    presented: Presented,
    mut socket: Socket,
    clock: std::sync::Arc<frames::MessageClock>,
) {
    let _live = state.metrics.live_reader();
    let client_id = format!("ws-{}-{:08x}", now_ms(), rand::random::<u32>());
    if !send(&state, &mut socket, text(json!({ "type": "connected", "clientId": client_id, "timestamp": now_ms() })))
        .await
    {
        return;
    }
    let Ok(mut signal) = state.store.subscribe(events::EVENTS_PATH).await else { return };
    let mut pos = match state.store.head(events::EVENTS_PATH).await {
        Ok(info) => info.tail_offset(),
        Err(_) => return,
    };
    let mut patterns = Patterns::default();
    // A replay from a subscribe's offset has not reached the tail yet.
    let mut replaying = false;
    // At least a moment: a zero timeout would ping without pause.
    let idle = state.config.idle_timeout.max(Duration::from_millis(100));
    // Last frame from the client, and last ping to it.
    let (mut heard, mut pinged) = (tokio::time::Instant::now(), tokio::time::Instant::now());
    loop {
        let mut wake = (heard + idle).min(pinged + idle / 2);
        if let Some(began) = clock.began() {
            wake = wake.min(tokio::time::Instant::from_std(began + state.config.body_read_timeout));
        }
        // Decide first, act after: the futures in `select!` borrow `pos`.
        let step = tokio::select! {
            // A client whose socket is full is read from again only once what
            // waits for it is written (`MessageClock::output_blocked`).
            incoming = async {
                if clock.output_blocked() {
                    if let Err(e) = SinkExt::flush(&mut socket).await {
                        return Some(Err(e));
                    }
                }
                socket.next().await
            } => Step::Incoming(incoming),
            // A message began: its deadline goes into the next wake.
            _ = clock.message_began() => Step::Tick,
            batch = events::next_page(&state, Some(&who), &mut pos, &mut signal) => Step::Events(batch),
            _ = tokio::time::sleep_until(wake) => Step::Tick,
            _ = state.shutdown.cancelled() => Step::Shutdown,
        };
        // The credentials are checked again before anything is acted on or
        // sent (and at each ping, for a subscriber that sends nothing): a
        // token revoked or expired while the socket is open ends it.
        if !matches!(step, Step::Shutdown) && !state.auth.still_valid(&presented, &who) {
            let reason = "credentials no longer valid (token revoked or expired): connect again";
            if send(&state, &mut socket, close(CloseCode::Policy, reason)).await {
                linger(&mut socket).await;
            }
            return;
        }
        match step {
            Step::Tick => {
                let now = tokio::time::Instant::now();
                let limit = state.config.body_read_timeout;
                if clock.began().is_some_and(|began| now.into_std() >= began + limit) {
                    // Pongs between its fragments kept the connection from idling: the message
                    // itself must end in time, as a request body must.
                    state.metrics.connection_closed(Closed::MessageTimeout);
                    let reason = format!("message not finished within {}s (body_read_timeout)", limit.as_secs_f64());
                    if send(&state, &mut socket, close(CloseCode::Policy, reason)).await {
                        linger(&mut socket).await;
                    }
                    return;
                }
                if now >= heard + idle {
                    state.metrics.connection_closed(Closed::IdleTimeout);
                    let reason = format!("idle timeout: no frame from the client for {}s", idle.as_secs_f64());
                    if send(&state, &mut socket, close(CloseCode::Away, reason)).await {
                        linger(&mut socket).await;
                    }
                    return;
                }
                if now >= pinged + idle / 2 {
                    pinged = now;
                    if !send(&state, &mut socket, Message::Ping(Default::default())).await {
                        return;
                    }
                }
            }
            Step::Incoming(incoming) => {
                heard = tokio::time::Instant::now();
                let msg = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned().into(),
                    Some(Err(e)) => {
                        if send(&state, &mut socket, close_for(e, state.config.ws_max_message_bytes)).await {
                            linger(&mut socket).await;
                        }
                        return;
                    }
                    // tungstenite queues the reply to a client's close frame; it
                    // goes out only when the socket is flushed, so flush it (a
                    // client otherwise sees 1006, an abnormal close).
                    Some(Ok(Message::Close(_))) => {
                        // The Sink's close, which flushes; the stream's own `close` sends a close frame
                        // (refused: one was received).
                        let _ = tokio::time::timeout(SLOW_CLOSE_WITHIN, SinkExt::close(&mut socket)).await;
                        return;
                    }
                    None => return,
                    Some(Ok(_)) => continue,
                };
                let at = Position { pos: &mut pos, replaying: &mut replaying };
                let replies = on_message(&state, &who, msg.as_str(), &mut patterns, at).await;
                drop(msg);
                for reply in replies {
                    if !send(&state, &mut socket, reply).await {
                        return;
                    }
                }
            }
            Step::Events(None) => return,
            Step::Events(Some(batch)) => {
                // One page of the log per turn of this loop (`events::next_page`):
                // a replay over a long log reads its next page only after this
                // socket's messages and timers had their turn and, yielding,
                // every other task of the worker had its own.
                let catching_up = !batch.up_to_date;
                replaying &= catching_up;
                if catching_up {
                    tokio::task::yield_now().await;
                }
                if patterns.is_empty() {
                    continue;
                }
                let mut vis = Visibility::new(&state, &who);
                for event in batch.events {
                    let kind = event.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
                    if !patterns.matches(&kind) || !vis.may_see(&event).await {
                        continue;
                    }
                    let push = json!({ "type": "event", "event": kind, "data": event, "timestamp": now_ms() });
                    if !send(&state, &mut socket, text(push)).await {
                        return;
                    }
                }
            }
            Step::Shutdown => {
                let _ = tokio::time::timeout(SLOW_CLOSE_WITHIN, socket.send(Message::Close(None))).await;
                return;
            }
        }
    }
}

/// After our close frame: reads (and drops) what the client still sends,
/// until its close, its end, an error or one second, so that closing the
/// socket does not reset the connection before the client reads why.
async fn linger(socket: &mut Socket) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

enum Step {
    Incoming(Option<Result<Message, tungstenite::Error>>),
    Events(Option<events::Batch>),
    /// A timer: ping the client, or close an idle connection.
    Tick,
    Shutdown,
}

fn string_list(v: Option<&Value>) -> Option<Vec<String>> {
    v?.as_array()?.iter().map(|e| e.as_str().map(str::to_owned)).collect()
}

fn too_many_patterns(max: usize) -> Message {
    error(-32602, &format!("a connection holds at most {max} event patterns (ws_max_patterns); nothing was subscribed"))
}

/// Where a connection reads the log, which a subscribe's `offset` moves.
struct Position<'a> {
    pos: &'a mut Offset,
    /// A replay from an earlier offset has not reached the tail yet.
    replaying: &'a mut bool,
}

fn replay_in_progress() -> Message {
    error(
        -32602,
        "a replay from an offset is in progress on this connection: one connection replays once at a time \
         (subscribe without offset meanwhile, or open another connection); nothing was subscribed",
    )
}

async fn on_message(
    state: &AppState,
    who: &PrincipalKey,
    raw: &str,
    patterns: &mut Patterns,
    at: Position<'_>,
) -> Replies {
    // The message as a tree of values costs ~64-90 B a value besides its
    // text, as a `/rpc` body does: held from the body budget while the
    // message is handled (an execute's calls included), counted from its
    // structure before it is parsed, and refused past the budget or the
    // principal's share as `/rpc` refuses it. Before (issue 10), 32 sockets
    // each sending one ~1 MB execute of ~480,000 values held +130 MB to
    // +1 GB outside every budget while their calls ran.
    let (values, tree) = crate::http::json_tree_cost(raw.as_bytes(), crate::http::JSON_VALUE_COST);
    let _tree = match state.bodies.hold(who, tree, &format_args!("a message of {values} JSON values")) {
        Ok(hold) => hold,
        Err(e) => return vec![tree_refused(state, raw, &e)].into(),
    };
    let Ok(mut msg) = serde_json::from_str::<Value>(raw) else { return vec![error(-32700, "Parse error")].into() };
    Replies::from(match msg.get("action").and_then(Value::as_str) {
        Some("subscribe") => {
            let max = state.config.ws_max_patterns;
            // Counted before anything is copied: a huge list costs its parse, nothing more.
            if msg.get("events").and_then(Value::as_array).is_some_and(|a| a.len() > max) {
                return vec![too_many_patterns(max)].into();
            }
            // Each reply echoes every pattern held: with patterns of any length,
            // a hundred subscribes of 1 MiB each made the last reply 100 MiB.
            if msg
                .get("events")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|p| p.as_str().is_some_and(|p| p.len() > MAX_PATTERN_BYTES)))
            {
                return vec![error(
                    -32602,
                    &format!("an event pattern is at most {MAX_PATTERN_BYTES} bytes; nothing was subscribed"),
                )]
                .into();
            }
            let Some(wanted) = string_list(msg.get("events")) else {
                return vec![error(-32602, "subscribe needs events: an array of strings")].into();
            };
            // A replay reads the log from its offset to the tail, a page per
            // turn; while one runs, another offset is refused, so that a
            // client sending subscribes with `"offset":"-1"` again and again
            // never has the socket scan the whole log anew for each.
            let mut from = None;
            if let Some(raw_offset) = msg.get("offset").and_then(Value::as_str) {
                if *at.replaying {
                    return vec![replay_in_progress()].into();
                }
                let parsed = match ReadOffset::parse(Some(raw_offset)) {
                    Ok(o) => events::start_offset(state.store.as_ref(), o).await.ok(),
                    Err(_) => None,
                };
                match parsed {
                    Some(o) => from = Some(o),
                    None => return vec![error(-32602, "offset is not a valid events offset")].into(),
                }
            }
            if patterns.add(wanted, max).is_err() {
                return vec![too_many_patterns(max)].into();
            }
            if let Some(from) = from {
                let tail = state.store.head(events::EVENTS_PATH).await.map(|info| info.tail_offset());
                *at.replaying = tail.is_ok_and(|tail| from < tail);
                *at.pos = from;
            }
            vec![text(json!({ "type": "subscribed", "events": patterns.listed(), "timestamp": now_ms() }))]
        }
        Some("unsubscribe") => {
            let Some(gone) = string_list(msg.get("events")) else {
                return vec![error(-32602, "unsubscribe needs events: an array of strings")].into();
            };
            patterns.remove(&gone);
            vec![text(json!({ "type": "unsubscribed", "events": gone, "timestamp": now_ms() }))]
        }
        Some("ping") => vec![text(json!({ "type": "pong", "timestamp": now_ms() }))],
        // As a call on /rpc: refused before it runs while answers not yet sent
        // hold the whole response budget, and its answer holds its share of
        // the budget until it is sent (the `for` loop over these replies in
        // `serve` ends after its last send).
        // The request is taken out of the message, not copied: one tree, held above.
        Some("execute") => match msg.as_object_mut().and_then(|m| m.remove("request")) {
            Some(request) => match rpc::handle_value_within_budget(state, who, request).await {
                Some((answer, held)) => return Replies { messages: vec![Message::Text(answer.into())], held },
                None => vec![],
            },
            None => vec![error(-32602, "execute needs request: a JSON-RPC request")],
        },
        _ => vec![error(-32600, "action must be subscribe, unsubscribe, ping or execute")],
    })
}

/// The reply to a message whose tree the body budget refuses: for an
/// `execute`, the JSON-RPC error `/rpc` answers such a body with (-32600,
/// `data.reason` naming `body_buffer_bytes`, id null); for any other, the
/// socket's error with the same code and reason. Which it is is read from
/// the message's top level without building its tree.
fn tree_refused(state: &AppState, raw: &str, e: &ApiError) -> Message {
    /// The message's `action`, its other members skipped unparsed.
    #[derive(serde::Deserialize)]
    struct Action<'a> {
        #[serde(borrow)]
        action: Option<std::borrow::Cow<'a, str>>,
    }
    let reason = e.refusal().message;
    let execute = serde_json::from_str::<Action>(raw).is_ok_and(|a| a.action.as_deref() == Some("execute"));
    if !execute {
        return error(-32600, &reason);
    }
    state.metrics.rpc_call("", "-32600");
    let err = rpc::error_object(&rpc::RpcError::InvalidRequest(reason));
    text(json!({ "jsonrpc": "2.0", "error": err, "id": null }))
}

/// The replies to one message, in order, and the share of the response
/// budget an `execute` answer holds: iterating them keeps it until the
/// iterator is dropped, after the last of them is sent.
struct Replies {
    messages: Vec<Message>,
    held: Option<crate::http::SendPermit>,
}

impl From<Vec<Message>> for Replies {
    fn from(messages: Vec<Message>) -> Replies {
        Replies { messages, held: None }
    }
}

impl IntoIterator for Replies {
    type Item = Message;
    type IntoIter = Sending;

    fn into_iter(self) -> Sending {
        Sending { messages: self.messages.into_iter(), _held: self.held }
    }
}

/// [`Replies`] being sent.
struct Sending {
    messages: std::vec::IntoIter<Message>,
    _held: Option<crate::http::SendPermit>,
}

impl Iterator for Sending {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        self.messages.next()
    }
}

#[cfg(test)]
mod tests {
    use super::{matches, Patterns};

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn held_patterns_match_as_each_pattern_does() {
        let mut p = Patterns::default();
        p.add(list(&["task.created", "task.attachment_*", "task.created"]), 10).unwrap();
        assert_eq!(p.len(), 2, "duplicates count once");
        for kind in ["task.created", "task.attachment_created", "task.updated", "task.created.more", ""] {
            let one_by_one = ["task.created", "task.attachment_*"].iter().any(|pat| matches(pat, kind));
            assert_eq!(p.matches(kind), one_by_one, "{kind}");
        }
        p.add(list(&["*"]), 10).unwrap();
        assert!(p.matches("anything"));
        p.remove(&list(&["*", "task.created"]));
        assert!(!p.matches("anything") && !p.matches("task.created") && p.matches("task.attachment_x"));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_subscribe_past_the_cap_adds_nothing() {
        let mut p = Patterns::default();
        p.add(list(&["a", "b*"]), 3).unwrap();
        assert_eq!(p.add(list(&["c", "a", "d"]), 3), Err(4));
        assert_eq!(p.len(), 2);
        assert!(!p.matches("c"));
        p.add(list(&["c", "a", "b*"]), 3).unwrap();
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn patterns_match_prefixes_and_exact_types() {
        assert!(matches("task.*", "task.created"));
        assert!(matches("task.*", "task.attachment_created"));
        assert!(matches("*", "task.created"));
        assert!(matches("task.attachment_created", "task.attachment_created"));
        assert!(!matches("task.attachment_created", "task.attachment.deleted"));
        // ClaudeBench's two attachment types differ in their separator: one prefix does not cover both.
        assert!(matches("task.attachment.*", "task.attachment.deleted"));
        assert!(!matches("task.attachment.*", "task.attachment_created"));
        assert!(!matches("task.created", "task.created.more"));
    }
}
