//! HTTP helpers every face shares, below the faces (none of them imports a
//! face): reading a bounded body or a JSON body, the entity a route names,
//! and setting a header from text. SSE framing is in `sse`, header names in
//! `headers`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use attache_core::{EntityUrl, PrincipalKey};
use attache_storage::FileBody;
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::{ApiError, ApiResult};

/// Largest JSON body the entity routes accept.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// The entity a route's `{type}/{id}` names, or 400.
pub fn entity_url(entity_type: &str, instance_id: &str) -> ApiResult<EntityUrl> {
    EntityUrl::new(entity_type, instance_id).map_err(ApiError::from)
}

/// Reads a JSON body (empty means `{}`), with a size limit and clear 400s.
/// The body as a tree of values (its text and [`JSON_VALUE_COST`] a value,
/// counted from its structure before it is parsed) is held from the body
/// budget and `who`'s share for as long as the returned [`Hold`] lives: the
/// handler keeps it while it works with what it parsed. Before (session 18's
/// attack pass), the bytes were counted only while they arrived: 100
/// concurrent 1 MB sends of `[0,0,...]` payloads took RSS to 1.9 GB, 17.5 MB
/// a request, outside every budget. Past the budget: 503
/// `BODY_BUDGET_EXHAUSTED` with `Retry-After: 1`, nothing parsed.
pub(crate) async fn json_body<'a, T: serde::de::DeserializeOwned>(
    bodies: &'a BodyBudget,
    who: &'a PrincipalKey,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(T, Hold<'a>)> {
    json_body_held(bodies, who, headers, body, 1).await
}

/// [`json_body`], holding `times` its tree: for a handler that keeps about
/// that many copies of it while it works (one hold, so a request alone is
/// still always let in).
pub(crate) async fn json_body_held<'a, T: serde::de::DeserializeOwned>(
    bodies: &'a BodyBudget,
    who: &'a PrincipalKey,
    headers: &HeaderMap,
    body: Body,
    times: usize,
) -> ApiResult<(T, Hold<'a>)> {
    let bytes = read_body(bodies, body, headers, MAX_JSON_BODY).await?;
    let text = if bytes.iter().all(u8::is_ascii_whitespace) { &b"{}"[..] } else { &bytes[..] };
    let (values, tree) = json_tree_cost(text, JSON_VALUE_COST);
    let hold = bodies.hold(who, tree.saturating_mul(times), &format_args!("a body of {values} JSON values"))?;
    let value = serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request(format!("Request body does not match API schema: {e}")))?;
    Ok((value, hold))
}

/// [`json_body`] for bodies that must be a JSON object: serde would also take
/// a struct in its array form (`["SIGKILL"]`), which no client means.
pub(crate) async fn json_object_body<'a, T: serde::de::DeserializeOwned>(
    bodies: &'a BodyBudget,
    who: &'a PrincipalKey,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(T, Hold<'a>)> {
    let (object, hold): (serde_json::Map<String, serde_json::Value>, _) = json_body(bodies, who, headers, body).await?;
    let value = serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| ApiError::bad_request(format!("Request body does not match API schema: {e}")))?;
    Ok((value, hold))
}

/// What bodies being collected into memory may hold, all requests together
/// (`--body-buffer-bytes`), and how long one may take to arrive
/// (`--body-read-timeout`). A body takes its bytes as they come and gives them
/// back when collected or dropped; past the budget the request is answered
/// 503 at once, never made to wait.
/// One principal holds at most its share of it (`--budget-share-per-principal`).
pub struct BodyBudget {
    held: AtomicUsize,
    capacity: usize,
    timeout: Duration,
    shares: Shares,
    /// Who sends a body, told from its request's credentials (`Auth::owner_of`).
    auth: Arc<crate::auth::Auth>,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget").field("held", &self.held).field("capacity", &self.capacity).finish()
    }
}

impl BodyBudget {
    /// A budget of `capacity` bytes, of which one principal holds at most
    /// `share_percent` percent, whose bodies arrive within `timeout`.
    pub fn new(capacity: usize, timeout: Duration, share_percent: u8, auth: Arc<crate::auth::Auth>) -> BodyBudget {
        BodyBudget { held: AtomicUsize::new(0), capacity, timeout, shares: Shares::new(capacity, share_percent), auth }
    }

    /// Bytes held now by bodies being collected.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The budget's size (`--body-buffer-bytes`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes `n` more bytes for a body of `who` read outside [`read_body`]
    /// (a WebSocket message in progress: `ws::frames`) that holds `own`
    /// already; `false`, taking nothing, past the budget or `who`'s share.
    pub(crate) fn try_hold(&self, who: &PrincipalKey, n: usize, own: usize) -> bool {
        n == 0 || self.take_as(Some(who), n, own).is_ok()
    }

    /// Gives back `n` bytes `who` took with [`BodyBudget::try_hold`].
    pub(crate) fn give_back(&self, who: &PrincipalKey, n: usize) {
        if n > 0 {
            self.held.fetch_sub(n, Ordering::AcqRel);
            self.shares.give_back(who, n);
        }
    }

    fn take(&self, n: usize) -> ApiResult<()> {
        if n == 0 {
            return Ok(());
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= self.capacity)
            })
            .map(drop)
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "BODY_BUDGET_EXHAUSTED",
                    format!(
                        "request bodies being received hold the server's whole buffer budget of {} bytes; retry later",
                        self.capacity
                    ),
                )
                .with_header(header::RETRY_AFTER, 1)
                .with_header(header::CONNECTION, "close")
            })
    }

    /// `n` more bytes for a body of `who` that holds `own` already: as
    /// [`BodyBudget::take`], and within `who`'s share (503 past it as past the whole).
    fn take_as(&self, who: Option<&PrincipalKey>, n: usize, own: usize) -> ApiResult<()> {
        self.take(n)?;
        match who {
            Some(who) if !self.shares.take(who, n, own) => {
                self.held.fetch_sub(n, Ordering::AcqRel);
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "BODY_BUDGET_EXHAUSTED",
                    format!(
                        "request bodies of {who} being received hold its share of the server's buffer budget: {} of {} \
                         bytes (budget_share_per_principal, body_buffer_bytes); retry later",
                        self.shares.most, self.capacity
                    ),
                )
                .with_header(header::RETRY_AFTER, 1)
                .with_header(header::CONNECTION, "close"))
            }
            _ => Ok(()),
        }
    }
}

/// Memory a request's parsed form holds (an append's rows, a JSON-RPC
/// body's tree) taken from the body budget and its sender's share, as the
/// body's bytes were while they arrived; given back on drop.
pub(crate) struct Hold<'a> {
    budget: &'a BodyBudget,
    who: &'a PrincipalKey,
    bytes: usize,
}

impl BodyBudget {
    /// Holds `bytes` for `who` (`what`: what they are, for the refusal);
    /// 503 `BODY_BUDGET_EXHAUSTED` with `Retry-After: 1` when the budget or
    /// `who`'s share has not that many left (one request alone may always).
    pub(crate) fn hold<'a>(
        &'a self,
        who: &'a PrincipalKey,
        bytes: usize,
        what: &dyn std::fmt::Display,
    ) -> ApiResult<Hold<'a>> {
        self.take_for(who, bytes, what)?;
        Ok(Hold { budget: self, who, bytes })
    }

    /// Takes what [`hold`](Self::hold) holds; the caller gives it back.
    fn take_for(&self, who: &PrincipalKey, bytes: usize, what: &dyn std::fmt::Display) -> ApiResult<()> {
        if !self.try_hold(who, bytes, 0) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "BODY_BUDGET_EXHAUSTED",
                format!(
                    "{what} would hold {bytes} bytes while it is handled, past what the requests of {who} may hold \
                     now (body_buffer_bytes, budget_share_per_principal); retry later, or send less at a time"
                ),
            )
            .with_header(header::RETRY_AFTER, 1));
        }
        Ok(())
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.budget.give_back(self.who, self.bytes);
    }
}

/// A [`Hold`] that lives as long as a response body (`holding`), for a
/// request whose parsed form lives on while the answer is made (an MCP
/// message: rmcp keeps its params until the tool has answered).
pub(crate) struct OwnedHold {
    state: crate::AppState,
    who: PrincipalKey,
    bytes: usize,
}

impl OwnedHold {
    pub(crate) fn take(
        state: &crate::AppState,
        who: &PrincipalKey,
        bytes: usize,
        what: &dyn std::fmt::Display,
    ) -> ApiResult<OwnedHold> {
        state.bodies.take_for(who, bytes, what)?;
        Ok(OwnedHold { state: state.clone(), who: who.clone(), bytes })
    }
}

impl Drop for OwnedHold {
    fn drop(&mut self) {
        self.state.bodies.give_back(&self.who, self.bytes);
    }
}

/// What a JSON body costs as a tree of values: its text, `per_value` bytes a
/// value (its node, and its place in its array or object),
/// [`OBJECT_NODE_BYTES`] more an object (serde_json's map allocates a node of
/// eleven slots for its first member) and [`ARRAY_NODE_BYTES`] more an array, counted from its structure before it
/// is parsed. Measured, with many in flight: ~90 B a value on `/rpc`
/// ([`JSON_VALUE_COST`]), ~245 B on `/mcp`, where rmcp holds the params more
/// than once ([`MCP_VALUE_COST`]). Before the object count (session 18's
/// second attack pass), a 1 MiB body of `[{"":0},...]` cost 200 MB while 44
/// MB of it was counted.
pub(crate) fn json_tree_cost(body: &[u8], per_value: usize) -> (usize, usize) {
    let shape = attache_core::json::shape_of(body);
    let nodes =
        shape.objects.saturating_mul(OBJECT_NODE_BYTES).saturating_add(shape.arrays.saturating_mul(ARRAY_NODE_BYTES));
    let tree = shape.values.saturating_mul(per_value).saturating_add(nodes);
    (shape.values, body.len().saturating_add(tree))
}

/// What one JSON object's map allocates besides its members' values: a
/// B-tree leaf of eleven `(String, Value)` slots, 632 B measured.
pub(crate) const OBJECT_NODE_BYTES: usize = 640;

/// What one JSON array allocates besides its items' own slots: a vector of
/// four (the least a growing `Vec` of 32-byte values takes), 128 B. Before
/// (session 18's third attack pass), nested arrays `[[[...]]]` cost 1.4-1.8×
/// their charge.
pub(crate) const ARRAY_NODE_BYTES: usize = 128;

/// [`json_tree_cost`]'s bytes a value for a `/rpc` body, and for the entity routes' JSON bodies ([`json_body`]).
pub(crate) const JSON_VALUE_COST: usize = 96;
/// [`json_tree_cost`]'s bytes a value for an MCP message (session 16's third attack pass: 245 B measured).
pub(crate) const MCP_VALUE_COST: usize = 256;

/// Bytes one body holds of the budget, and of its sender's share; given back on drop.
struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
    who: Option<PrincipalKey>,
}

impl Held<'_> {
    /// Holds at least `total` bytes (503 when the budget or the sender's share has not that many left).
    fn grow_to(&mut self, total: usize) -> ApiResult<()> {
        if total > self.bytes {
            self.budget.take_as(self.who.as_ref(), total - self.bytes, self.bytes)?;
            self.bytes = total;
        }
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        if let Some(who) = &self.who {
            self.budget.shares.give_back(who, self.bytes);
        }
    }
}

/// What each principal holds of a budget, and the most one may: a share of
/// the whole (`--budget-share-per-principal`), so that one principal's slow
/// bodies, answers it does not read, or stalled uploads cannot hold all of it
/// and lock every other principal out. Counted in bytes for the body and
/// response budgets, in places for `--max-concurrent-uploads`
/// (`attachments::UploadSlots`). A principal that holds nothing else may
/// always take one body, answer or upload (as an answer larger than the whole
/// budget is granted when nothing else is held), so a share smaller than one
/// request slows a principal down but never stops it.
pub(crate) struct Shares {
    held: parking_lot::Mutex<std::collections::HashMap<PrincipalKey, usize>>,
    most: usize,
}

impl Shares {
    /// Shares of `percent` percent (1 to 100) of `capacity`.
    pub(crate) fn new(capacity: usize, percent: u8) -> Shares {
        let most = (capacity as u128 * u128::from(percent.clamp(1, 100)) / 100) as usize;
        Shares { held: parking_lot::Mutex::new(std::collections::HashMap::new()), most }
    }

    /// Whether `who`, holding `own` bytes in the request at hand, may take
    /// `n` more: it holds nothing else, or stays within its share.
    fn fits(
        &self,
        held: &std::collections::HashMap<PrincipalKey, usize>,
        who: &PrincipalKey,
        n: usize,
        own: usize,
    ) -> bool {
        let mine = held.get(who).copied().unwrap_or(0);
        mine <= own || mine.saturating_add(n) <= self.most
    }

    /// The most one principal holds, unless it holds nothing else.
    pub(crate) fn most(&self) -> usize {
        self.most
    }

    /// Takes `n` for `who` (see [`Shares::fits`]); `false`, taking nothing, past its share.
    pub(crate) fn take(&self, who: &PrincipalKey, n: usize, own: usize) -> bool {
        let mut held = self.held.lock();
        if !self.fits(&held, who, n, own) {
            return false;
        }
        add(&mut held, who, n);
        true
    }

    /// Takes `n` bytes for `who` whatever it holds (an answer already made).
    fn take_over(&self, who: &PrincipalKey, n: usize) {
        add(&mut self.held.lock(), who, n);
    }

    fn has_room(&self, who: &PrincipalKey, n: usize) -> bool {
        self.fits(&self.held.lock(), who, n, 0)
    }

    /// What `who` may still take within its share.
    fn room(&self, who: &PrincipalKey) -> usize {
        self.most.saturating_sub(self.held.lock().get(who).copied().unwrap_or(0))
    }

    pub(crate) fn give_back(&self, who: &PrincipalKey, n: usize) {
        let mut held = self.held.lock();
        if let Some(mine) = held.get_mut(who) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                held.remove(who);
            }
        }
    }
}

fn add(held: &mut std::collections::HashMap<PrincipalKey, usize>, who: &PrincipalKey, n: usize) {
    match held.get_mut(who) {
        Some(mine) => *mine += n,
        None => {
            held.insert(who.clone(), n);
        }
    }
}

/// Bytes of large answers made and not yet sent, all requests together
/// (`--response-buffer-bytes`). A read of a stream is made in memory before
/// it is sent, and a client that reads nothing (or an HTTP/2 stream that
/// opens no window) keeps it there: 200 such clients of one 15 MiB JSON
/// message held 3 GB. An answer of at least [`SEND_BUDGET_FROM`] bytes takes
/// its size from this budget before it is made and gives it back once sent
/// or dropped with its connection; past the budget a read is answered 503 at
/// once (an SSE reader waits for room instead). One principal's answers
/// hold at most its share of it (`--budget-share-per-principal`).
pub struct SendBudget {
    held: AtomicUsize,
    capacity: usize,
    shares: Shares,
}

impl std::fmt::Debug for SendBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBudget").field("held", &self.held).field("capacity", &self.capacity).finish()
    }
}

/// Answers smaller than this take nothing from the [`SendBudget`]: a socket's
/// own buffers hold about this much, and counting every small read would
/// cost each one an atomic update.
pub(crate) const SEND_BUDGET_FROM: usize = 64 << 10;

impl SendBudget {
    /// A budget of `capacity` bytes, of which one principal holds at most `share_percent` percent.
    pub fn new(capacity: usize, share_percent: u8) -> Arc<SendBudget> {
        Arc::new(SendBudget { held: AtomicUsize::new(0), capacity, shares: Shares::new(capacity, share_percent) })
    }

    /// Bytes held now by answers not yet sent.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// `n` bytes for an answer to `who` about to be made (nothing below
    /// [`SEND_BUDGET_FROM`]): `Err` when the budget, or `who`'s share of it,
    /// has not that many left.
    pub(crate) fn try_take(
        self: &Arc<Self>,
        who: Option<&PrincipalKey>,
        n: usize,
    ) -> Result<Option<SendPermit>, SendBudgetFull> {
        if n < SEND_BUDGET_FROM {
            return Ok(None);
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| self.fits(held, n).then(|| held + n))
            .map_err(|_| SendBudgetFull)?;
        let mut permit = SendPermit { budget: self.clone(), bytes: n, who: None };
        match who {
            // Dropped holding no share: gives back the budget's bytes only.
            Some(who) if !self.shares.take(who, n, 0) => Err(SendBudgetFull),
            Some(who) => {
                permit.who = Some(who.clone());
                Ok(Some(permit))
            }
            None => Ok(Some(permit)),
        }
    }

    /// Whether `n` more bytes fit beside `held`: within the budget, or alone
    /// (an answer larger than the whole budget goes when nothing else is held).
    fn fits(&self, held: usize, n: usize) -> bool {
        held == 0 || held.saturating_add(n) <= self.capacity
    }

    /// The budget, or `who`'s share of it, has no room left for another large answer.
    pub(crate) fn is_full(&self, who: &PrincipalKey) -> bool {
        !self.has_room(Some(who), SEND_BUDGET_FROM)
    }

    /// Whether [`SendBudget::try_take`] of `n` bytes would be granted now (an
    /// answer larger than the whole budget is granted when nothing else is held).
    pub(crate) fn has_room(&self, who: Option<&PrincipalKey>, n: usize) -> bool {
        n < SEND_BUDGET_FROM || (self.fits(self.held(), n) && who.is_none_or(|who| self.shares.has_room(who, n)))
    }

    /// `n` bytes for an answer to `who`, within what the budget has left and
    /// within `who`'s share, whatever else it holds: unlike
    /// [`SendBudget::try_take`], nothing past either is granted, alone or not.
    fn take_within(self: &Arc<Self>, who: &PrincipalKey, n: usize) -> Option<SendPermit> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&t| t <= self.capacity)
            })
            .ok()?;
        // Dropped holding no share: gives back the budget's bytes only.
        let mut permit = SendPermit { budget: self.clone(), bytes: n, who: None };
        if n > self.shares.room(who) || !self.shares.take(who, n, 0) {
            return None;
        }
        permit.who = Some(who.clone());
        Some(permit)
    }

    /// The most one principal's answers hold together.
    pub(crate) fn share(&self) -> usize {
        self.shares.most
    }

    /// [`SendBudget::try_take`], refused as the 503 a client gets.
    pub(crate) fn take_as(self: &Arc<Self>, who: Option<&PrincipalKey>, n: usize) -> ApiResult<Option<SendPermit>> {
        self.try_take(who, n).map_err(|SendBudgetFull| self.exhausted())
    }

    /// 503 `RESPONSE_BUDGET_EXHAUSTED`: answers not yet sent hold the whole
    /// budget, or the caller's share of it.
    pub(crate) fn exhausted(&self) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            RESPONSE_BUDGET_EXHAUSTED,
            format!(
                "answers waiting for their clients to read them hold the server's whole buffer of {} bytes \
                 (response_buffer_bytes), or the caller's share of it, {} bytes (budget_share_per_principal); \
                 retry later",
                self.capacity, self.shares.most
            ),
        )
        .with_header(header::RETRY_AFTER, 1)
    }
}

/// The code of [`budgeted_json`]'s refusal of an answer larger than a principal's share.
pub(crate) const RESPONSE_TOO_LARGE: &str = "RESPONSE_TOO_LARGE";

/// How many bytes `v` takes as JSON, counted without writing them anywhere.
pub fn json_size<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that cannot be JSON counts what was written.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// `value` as JSON when it takes at most `max` bytes; `None` past them, having
/// written no more than `max` (a writer that refuses the byte past them stops
/// serde_json there).
fn json_at_most(value: &impl serde::Serialize, max: usize) -> ApiResult<Option<Vec<u8>>> {
    struct AtMost {
        out: Vec<u8>,
        max: usize,
    }
    impl std::io::Write for AtMost {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.out.len() + buf.len() > self.max {
                return Err(std::io::Error::other("past the answer's room"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = AtMost { out: Vec::new(), max };
    match serde_json::to_writer(&mut w, value) {
        Ok(()) => Ok(Some(w.out)),
        Err(e) if e.is_io() => Ok(None),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// The code of [`SendBudget::exhausted`]'s refusal.
pub(crate) const RESPONSE_BUDGET_EXHAUSTED: &str = "RESPONSE_BUDGET_EXHAUSTED";

/// The [`SendBudget`] has too little left.
#[derive(Debug)]
pub(crate) struct SendBudgetFull;

/// Bytes one answer holds of the [`SendBudget`], and of its reader's share; given back on drop.
#[derive(Debug)]
pub(crate) struct SendPermit {
    budget: Arc<SendBudget>,
    bytes: usize,
    who: Option<PrincipalKey>,
}

impl Drop for SendPermit {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        if let Some(who) = &self.who {
            self.budget.shares.give_back(who, self.bytes);
        }
    }
}

impl SendPermit {
    /// A permit holding nothing yet for an answer to `who`, grown as the
    /// answer is counted ([`SendPermit::try_grow`]): a JSON-RPC, `/ws`
    /// `execute` or MCP answer, built in memory before it is sent.
    pub(crate) fn empty(budget: &Arc<SendBudget>, who: &PrincipalKey) -> SendPermit {
        SendPermit { budget: budget.clone(), bytes: 0, who: Some(who.clone()) }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The budget this permit holds of.
    pub(crate) fn budget(&self) -> &SendBudget {
        &self.budget
    }

    /// Takes `n` more bytes, or refuses taking nothing when the budget, or
    /// the principal's share of it, has not that many left beside what this
    /// permit holds. An answer alone may pass both (as [`SendBudget::try_take`]
    /// grants an answer larger than the whole budget when nothing else is held).
    pub(crate) fn try_grow(&mut self, n: usize) -> Result<(), SendBudgetFull> {
        let (budget, own) = (&self.budget, self.bytes);
        budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held <= own || held.saturating_add(n) <= budget.capacity).then(|| held.saturating_add(n))
            })
            .map_err(|_| SendBudgetFull)?;
        if let Some(who) = &self.who {
            if !budget.shares.take(who, n, own) {
                budget.held.fetch_sub(n, Ordering::AcqRel);
                return Err(SendBudgetFull);
            }
        }
        self.bytes += n;
        Ok(())
    }

    /// Takes `n` more bytes whatever is held: the answer of a call that
    /// changed something, which is sent whatever it costs.
    pub(crate) fn grow_over(&mut self, n: usize) {
        self.budget.held.fetch_add(n, Ordering::AcqRel);
        if let Some(who) = &self.who {
            self.budget.shares.take_over(who, n);
        }
        self.bytes += n;
    }

    /// Holds exactly `n` bytes, the text of the answer as it is sent (taken
    /// whatever is held, or given back); `None`, holding nothing, below
    /// [`SEND_BUDGET_FROM`].
    pub(crate) fn settle(mut self, n: usize) -> Option<SendPermit> {
        if n < SEND_BUDGET_FROM {
            return None;
        }
        match n.checked_sub(self.bytes) {
            Some(more) => self.grow_over(more),
            None => {
                let less = self.bytes - n;
                self.budget.held.fetch_sub(less, Ordering::AcqRel);
                if let Some(who) = &self.who {
                    self.budget.shares.give_back(who, less);
                }
                self.bytes = n;
            }
        }
        Some(self)
    }
}

/// A JSON answer held within the response budget until it is sent (each
/// large answer a slow reader leaves unread holds its bytes: the entity
/// list, the manifest of an entity with thousands of attachments, a list of
/// thousands of grants). 503 `RESPONSE_BUDGET_EXHAUSTED` when the budget, or
/// `who`'s share of it, is held by answers not yet read.
///
/// A large answer is counted first (written to a counter, which holds
/// nothing), then takes exactly its size within what `who` may hold, and only
/// then is made: before (session 17's attack pass), a manifest listed as 400
/// MB (its text values escaped six times over) was made whole and then
/// granted as an answer alone, and while its reader read slowly every other
/// principal's large answers were refused. An answer larger than one
/// principal's share is refused as 413 `RESPONSE_TOO_LARGE` (ask for less: a
/// `limit`, one item at a time); one that does not fit beside the answers not
/// yet read, as 503.
pub(crate) fn budgeted_json(
    answers: &Arc<SendBudget>,
    who: &PrincipalKey,
    status: StatusCode,
    value: &impl serde::Serialize,
) -> ApiResult<axum::response::Response> {
    // Most answers are small: made once, within what takes nothing from the budget.
    let (body, permit) = match json_at_most(value, SEND_BUDGET_FROM)? {
        Some(body) => (body, None),
        None => {
            let size = crate::access::cpu_heavy(true, || json_size(value));
            if size > answers.share() {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    RESPONSE_TOO_LARGE,
                    format!(
                        "the answer would be {size} bytes, more than the {} bytes one principal's answers may hold \
                         (response_buffer_bytes × budget_share_per_principal); ask for less at a time (a smaller \
                         limit, or one item at a time)",
                        answers.share()
                    ),
                ));
            }
            let permit = answers.take_within(who, size).ok_or_else(|| answers.exhausted())?;
            let body = crate::access::cpu_heavy(true, || json_at_most(value, size))?
                .ok_or_else(|| ApiError::internal("an answer grew between its count and its making"))?;
            (body, Some(permit))
        }
    };
    let mut res = axum::response::Response::new(held_body(body.into(), permit));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(res)
}

/// A response body of `bytes` that holds `permit` for as long as it lives:
/// until it is sent whole, or dropped with its connection.
pub(crate) fn held_body(bytes: Bytes, permit: Option<SendPermit>) -> Body {
    match permit {
        None => Body::from(bytes),
        Some(permit) => Body::new(HeldBody { bytes: Some(bytes), _permit: permit }),
    }
}

struct HeldBody {
    bytes: Option<Bytes>,
    _permit: SendPermit,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.bytes.take().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// `body`, keeping `held` (a share of the [`SendBudget`], or a slot one is
/// put in later) until the body is sent whole or dropped with its connection.
pub(crate) fn holding<T: Send + Unpin + 'static>(body: Body, held: T) -> Body {
    Body::new(Holding { body, _held: held })
}

struct Holding<T> {
    body: Body,
    _held: T,
}

impl<T: Send + Unpin + 'static> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How often a chunk waiting for room in the [`SendBudget`] looks again (as an SSE reader does).
const ROOM_POLL: Duration = Duration::from_millis(50);

/// `chunks` (`len` bytes in all, each chunk at most `chunk`) as they are
/// sent within the [`SendBudget`]: each takes its size before it is read
/// (what is left, up to `chunk`: a small body takes nothing) and holds it
/// until the next is asked for, which the connection does once it has sent
/// it. A chunk that finds no room waits for it, holding nothing: the
/// response has begun (its status and length are out), so it is late, never
/// cut short. Over HTTP/2 a stream that opens no window is never asked for
/// its next chunk: it held its last one (256 KiB, 100 streams a connection)
/// outside any budget, for as long as the connection lived.
pub(crate) fn paced<E: Send + 'static>(
    answers: Arc<SendBudget>,
    who: PrincipalKey,
    len: u64,
    chunk: usize,
    chunks: futures::stream::BoxStream<'static, Result<Bytes, E>>,
) -> futures::stream::BoxStream<'static, Result<Bytes, E>> {
    use futures::StreamExt as _;
    type State<E> = (futures::stream::BoxStream<'static, Result<Bytes, E>>, u64, Option<SendPermit>);
    let step = move |(mut chunks, left, sent): State<E>| {
        let (answers, who) = (answers.clone(), who.clone());
        async move {
            // Asked for more: the chunk before has been sent.
            drop(sent);
            let next = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
            let permit = loop {
                match answers.try_take(Some(&who), next) {
                    Ok(permit) => break permit,
                    Err(SendBudgetFull) => tokio::time::sleep(ROOM_POLL).await,
                }
            };
            let item = chunks.next().await?;
            let taken = item.as_ref().map_or(0, |b| b.len() as u64);
            Some((item, (chunks, left.saturating_sub(taken), permit)))
        }
    };
    futures::stream::unfold((chunks, len, None), step).boxed()
}

/// Reads a whole body of at most `limit` bytes; over it is a 413. The bytes
/// come out of `bodies` while it is read (503 when it has too few left), and a
/// body not all there within its read timeout is a 408; both close the
/// connection rather than wait for the rest.
pub(crate) async fn read_body(bodies: &BodyBudget, body: Body, headers: &HeaderMap, limit: usize) -> ApiResult<Bytes> {
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    // The bytes are taken from the budget as they arrive, not as declared:
    // declared lengths cost a client nothing, and 16 connections each
    // declaring 16 MiB and sending one byte held the whole budget (every
    // other body refused) for as long as the read timeout, again and again.
    //
    // A body whole in its first frame (every body the lean HTTP/1 path hands
    // over) is held for no time, so it is charged to the budget alone: only a
    // body still arriving after its first frame is charged to its sender's
    // share too, from its first byte, and only then is the sender told from
    // the request's credentials (a second parse of them and a lock per body
    // were a measurable part of a small append).
    let mut held = Held { budget: bodies, bytes: 0, who: None };
    let collect = async {
        let mut body = body;
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        let mut named = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            len += data.len();
            if len > limit {
                return Err(ApiError::payload_too_large(limit));
            }
            if !named && !http_body::Body::is_end_stream(&body) {
                named = true;
                held.who = bodies.auth.owner_of(headers);
            }
            held.grow_to(len)?;
            if !data.is_empty() {
                chunks.push(data);
            }
        }
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => {
                let mut whole = BytesMut::with_capacity(len);
                for c in &chunks {
                    whole.extend_from_slice(c);
                }
                whole.freeze()
            }
        })
    };
    match tokio::time::timeout(bodies.timeout, collect).await {
        Ok(result) => result,
        Err(_) => Err(body_read_timeout(format!("the request body did not arrive within {:?}", bodies.timeout))),
    }
}

/// The refusal code of a body that did not arrive in time.
pub const BODY_READ_TIMEOUT: &str = "BODY_READ_TIMEOUT";

/// 408 [`BODY_READ_TIMEOUT`], closing the connection (the rest of the body is not waited for).
pub(crate) fn body_read_timeout(message: String) -> ApiError {
    ApiError::new(StatusCode::REQUEST_TIMEOUT, BODY_READ_TIMEOUT, message).with_header(header::CONNECTION, "close")
}

/// Sets a header to `value` as text; a value that is not a valid header value is left out.
/// Formatted on the stack: offsets, lengths and tags cost one allocation (the value's), not two.
pub(crate) fn set(
    headers: &mut HeaderMap,
    name: impl axum::http::header::IntoHeaderName,
    value: impl std::fmt::Display,
) {
    use std::io::Write as _;
    let mut buf = [0u8; 96];
    let mut out = std::io::Cursor::new(&mut buf[..]);
    let formatted = match write!(out, "{value}") {
        Ok(()) => {
            let len = usize::try_from(out.position()).unwrap_or(0);
            HeaderValue::from_bytes(&buf[..len])
        }
        Err(_) => HeaderValue::from_str(&value.to_string()),
    };
    if let Ok(v) = formatted {
        headers.insert(name, v);
    }
}

/// Sets `name` to an offset's text, written without the formatter (every
/// stream answer carries one: `set`'s `Display` cost ~400 instructions).
pub(crate) fn set_offset(headers: &mut HeaderMap, name: axum::http::HeaderName, offset: attache_core::Offset) {
    match offset.digits() {
        Some(text) => {
            if let Ok(v) = HeaderValue::from_bytes(&text) {
                headers.insert(name, v);
            }
        }
        None => set(headers, name, offset),
    }
}

/// Sets `name` to `text` as it is (dropped if it is not a valid header value, as `set` does).
pub(crate) fn set_text(headers: &mut HeaderMap, name: axum::http::HeaderName, text: &str) {
    if let Ok(v) = HeaderValue::from_str(text) {
        headers.insert(name, v);
    }
}

/// Marks a response whose body is a [`FileBody`]: the lean HTTP/1 path takes
/// it and sends the file range with `sendfile`, leaving the ordinary body
/// (the same bytes, read in chunks) unpolled. Any other path never looks at
/// it and sends that body.
#[derive(Clone)]
pub(crate) struct SendFile(pub(crate) FileBody);

/// A response whose body is `file`'s bytes: an ordinary body of exactly
/// that length (so `content-length` as for bytes in memory), reading the
/// file in bounded chunks only when polled, each within `answers`
/// ([`paced`]), with [`SendFile`] beside it.
pub(crate) fn file_response(file: FileBody, answers: &Arc<SendBudget>, who: &PrincipalKey) -> axum::response::Response {
    let chunks = paced(answers.clone(), who.clone(), file.len(), attache_storage::BLOB_CHUNK, file.chunks());
    let body = FileChunks { chunks, left: file.len() };
    let mut res = axum::response::Response::new(Body::new(body));
    res.extensions_mut().insert(SendFile(file));
    res
}

/// [`FileBody::chunks`] as an HTTP body whose exact length is known.
struct FileChunks {
    chunks: futures::stream::BoxStream<'static, attache_storage::StoreResult<Bytes>>,
    left: u64,
}

impl http_body::Body for FileChunks {
    type Data = Bytes;
    type Error = attache_storage::StoreError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use futures::StreamExt as _;
        match std::task::ready!(self.chunks.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => {
                self.left = self.left.saturating_sub(chunk.len() as u64);
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            Some(Err(err)) => std::task::Poll::Ready(Some(Err(err))),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_header_is_the_offsets_display_text() {
        let name = axum::http::HeaderName::from_static("stream-next-offset");
        for pos in [0, 1, 42, 1_000_000, attache_core::Offset::MAX, attache_core::Offset::MAX + 1, u64::MAX] {
            let offset = attache_core::Offset(pos);
            let mut hm = HeaderMap::new();
            set_offset(&mut hm, name.clone(), offset);
            assert_eq!(hm.get(&name).and_then(|v| v.to_str().ok()), Some(offset.to_string().as_str()), "{pos}");
        }
    }

    /// A JSON body's cost counts a map node for each object (a 1 MiB body of
    /// `[{"":0},...]` cost 200 MB while 44 MB of it was counted: session 18).
    #[test]
    fn a_body_of_small_objects_costs_a_map_node_an_object() {
        // 1,000 one-member objects: each a map node besides its two values.
        let body = format!("[{}]", vec![r#"{"":0}"#; 1000].join(","));
        let (values, cost) = json_tree_cost(body.as_bytes(), JSON_VALUE_COST);
        assert!(values >= 2000, "{values}");
        assert!(cost >= 1000 * (OBJECT_NODE_BYTES + JSON_VALUE_COST), "{cost}");
        // As many values in an array of numbers cost no map node.
        let numbers = format!("[{}]", vec!["0"; 2000].join(","));
        let (_, plain) = json_tree_cost(numbers.as_bytes(), JSON_VALUE_COST);
        assert!(plain < 1000 * OBJECT_NODE_BYTES, "{plain}");
    }

    /// A JSON answer takes exactly its size, within its principal's share
    /// whatever else it holds: two answers of one principal go together when
    /// both fit its share (before, the first took the whole share while it
    /// was made, and the second was refused: session 17's second attack
    /// pass), and one past the share is never granted, even alone.
    #[test]
    fn answers_take_their_size_within_the_share_and_never_past_it() {
        let budget = SendBudget::new(1 << 20, 25);
        let (alice, bob) = (PrincipalKey::anonymous(), PrincipalKey::parse("user:bob").expect("a key"));
        let first = budget.take_within(&alice, 100 << 10).expect("room");
        let second = budget.take_within(&alice, 100 << 10).expect("room beside the first");
        assert!(budget.take_within(&alice, 100 << 10).is_none(), "past alice's 256 KiB share");
        assert!(budget.take_within(&bob, 200 << 10).is_some(), "bob's share is his own");
        drop((first, second));
        assert!(budget.take_within(&alice, (256 << 10) + 1).is_none(), "past the share, alone");
        assert_eq!(budget.held(), 0, "everything given back");
    }
}
