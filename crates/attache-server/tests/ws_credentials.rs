//! A WebSocket outlives the request that opened it: its token is checked
//! again while it stays open, so a token revoked (or expired) meanwhile ends
//! it instead of letting it act and read for good.

mod common;

use std::time::Duration;

use attache_server::auth::AuthMode;
use attache_storage::tokens::TokenStore;
use common::TestServer;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const STEP: Duration = Duration::from_secs(10);

async fn open(server: &TestServer, token: &str) -> Ws {
    let mut req = server.url("/ws").replace("http://", "ws://").into_client_request().expect("a ws request");
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("the upgrade is accepted");
    assert_eq!(next(&mut ws).await.expect("a hello")["type"], "connected");
    ws
}

/// The next text message as JSON; `None` once the server has closed, with its close code.
async fn next(ws: &mut Ws) -> Result<Value, Option<CloseCode>> {
    loop {
        let msg = tokio::time::timeout(STEP, ws.next()).await.expect("the server answers in time");
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).expect("a JSON message")),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code)),
            None | Some(Err(_)) => return Err(None),
            Some(Ok(_)) => continue,
        }
    }
}

async fn rpc(server: &TestServer, token: &str, method: &str, params: Value) -> Value {
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    let res = server.client.post(server.url("/rpc")).bearer_auth(token).json(&body).send().await.expect("/rpc answers");
    res.json().await.expect("a JSON-RPC answer")
}

async fn token_server() -> (TestServer, TokenStore) {
    let server = TestServer::start_with(|c| {
        c.auth = Some(AuthMode::Token);
        c.durable = false;
    })
    .await;
    let tokens = TokenStore::new(&server.config.data_dir);
    (server, tokens)
}

/// Two `Authorization` headers are refused (400 `DUPLICATE_HEADER`) in
/// either order, on the lean stream path and on `/rpc`: before, the first
/// one won, so a proxy that adds its own beside the client's decided who the
/// server acted as (session 20's attack pass). Nothing is written.
#[tokio::test]
async fn a_request_with_two_authorization_headers_is_refused_and_writes_nothing() {
    let (server, tokens) = token_server().await;
    let (_, alice) = tokens.create("user:alice", None).expect("a token");
    let (_, mallory) = tokens.create("user:mallory", None).expect("a token");
    for (first, second) in [(&alice, &mallory), (&mallory, &alice)] {
        let put = server
            .client
            .put(server.url("/two/tokens"))
            .header("authorization", format!("Bearer {first}"))
            .header("content-type", "text/plain")
            .header("authorization", format!("Bearer {second}"));
        let res = put.send().await.expect("an answer");
        assert_eq!(res.status(), 400);
        assert!(res.text().await.unwrap().contains("DUPLICATE_HEADER"));
        let rpc = server
            .client
            .post(server.url("/rpc"))
            .header("authorization", format!("Bearer {first}"))
            .header("authorization", format!("Bearer {second}"))
            .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "task.create", "params": { "id": "t-two", "text": "x" } }));
        let res = rpc.send().await.expect("an answer");
        assert_eq!(res.status(), 400);
        let body = res.text().await.unwrap();
        assert!(body.contains("one authorization header at most") && body.contains("-32600"), "{body}");
    }
    for token in [&alice, &mallory] {
        let read = server.client.get(server.url("/two/tokens?offset=-1")).bearer_auth(token).send().await.unwrap();
        assert_eq!(read.status(), 404, "no stream was made");
        let got = rpc(&server, token, "task.get", json!({ "id": "t-two" })).await;
        assert!(got.get("error").is_some(), "no task was made: {got}");
    }
}

#[tokio::test]
async fn a_websocket_whose_token_is_revoked_executes_nothing_more_and_is_closed_with_1008() {
    let (server, tokens) = token_server().await;
    let (ws_token, socket_token) = tokens.create("user:ann", None).expect("a token");
    let (_, other_token) = tokens.create("user:ann", None).expect("a second token");
    let mut ws = open(&server, &socket_token).await;

    let create = |id: &str| {
        json!({ "action": "execute", "request": { "jsonrpc": "2.0", "id": 1, "method": "task.create",
            "params": { "id": id, "text": "made over the socket" } } })
    };
    ws.send(Message::Text(create("t-before-revoke").to_string().into())).await.expect("sent");
    let answer = next(&mut ws).await.expect("an answer while the token is valid");
    assert_eq!(answer["result"]["id"], "t-before-revoke", "{answer}");

    assert!(tokens.revoke(&ws_token.id).expect("revoked"));
    // The revoked token is refused on a new request at once ...
    let refused = server.client.get(server.url("/metrics")).bearer_auth(&socket_token).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    // ... and the open socket acts no more on it.
    let _ = ws.send(Message::Text(create("t-after-revoke").to_string().into())).await;
    match next(&mut ws).await {
        Err(code) => assert_eq!(code, Some(CloseCode::Policy), "closed with 1008"),
        Ok(answer) => panic!("a revoked token's socket still executes: {answer}"),
    }
    let got = rpc(&server, &other_token, "task.get", json!({ "id": "t-after-revoke" })).await;
    assert!(got.get("error").is_some(), "the call made after the revoke must not have run: {got}");
}

#[tokio::test]
async fn a_websocket_subscriber_whose_token_is_revoked_gets_no_later_event() {
    let (server, tokens) = token_server().await;
    let (ws_token, socket_token) = tokens.create("user:ann", None).expect("a token");
    let (_, other_token) = tokens.create("user:ann", None).expect("a second token");
    let created = rpc(&server, &other_token, "task.create", json!({ "id": "t-1", "text": "first" })).await;
    assert_eq!(created["result"]["id"], "t-1", "{created}");
    let mut ws = open(&server, &socket_token).await;
    ws.send(Message::Text(json!({ "action": "subscribe", "events": ["task.*"] }).to_string().into())).await.unwrap();
    assert_eq!(next(&mut ws).await.expect("subscribed")["type"], "subscribed");

    let update = |text: &str| json!({ "id": "t-1", "updates": { "text": text } });
    rpc(&server, &other_token, "task.update", update("BEFORE-REVOKE")).await;
    let event = next(&mut ws).await.expect("the event while the token is valid");
    assert!(event.to_string().contains("BEFORE-REVOKE"), "{event}");

    assert!(tokens.revoke(&ws_token.id).expect("revoked"));
    rpc(&server, &other_token, "task.update", update("AFTER-REVOKE")).await;
    match next(&mut ws).await {
        Err(code) => assert_eq!(code, Some(CloseCode::Policy), "closed with 1008"),
        Ok(event) => panic!("a revoked token's socket still receives events: {event}"),
    }
}

/// A WebSocket opened with `protocols` offered (`Sec-WebSocket-Protocol`) and
/// no `Authorization` header, as a browser opens one; the socket and the
/// subprotocol the server selected, or the handshake's HTTP status.
async fn open_offering(server: &TestServer, protocols: &str) -> Result<(Ws, Option<String>), u16> {
    open_offering_with(server, protocols, None).await
}

/// As [`open_offering`], with an `Authorization: Bearer` header too when `bearer` is given.
async fn open_offering_with(
    server: &TestServer,
    protocols: &str,
    bearer: Option<&str>,
) -> Result<(Ws, Option<String>), u16> {
    let mut req = server.url("/ws").replace("http://", "ws://").into_client_request().expect("a ws request");
    req.headers_mut().insert("sec-websocket-protocol", protocols.parse().expect("a header value"));
    if let Some(token) = bearer {
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("a header value"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, res)) => {
            let selected = res.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
            Ok((ws, selected))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("the handshake failed otherwise: {e}"),
    }
}

/// A WebSocket handshake carries one credential: two different tokens (two
/// bearer subprotocols, or one beside an `Authorization` header naming
/// another) are 400 and open nothing, never decided by which came first;
/// the same token offered twice is one credential (session 20's second
/// attack pass: the first bearer subprotocol won).
#[tokio::test]
async fn a_websocket_offering_two_different_tokens_is_refused() {
    let (server, tokens) = token_server().await;
    let (_, sam) = tokens.create("user:sam", None).expect("a token");
    let (_, ann) = tokens.create("user:ann", None).expect("a token");
    let two = format!("attache, attache.bearer.{sam}, attache.bearer.{ann}");
    assert_eq!(open_offering(&server, &two).await.err(), Some(400), "two bearer subprotocols");
    let other = format!("attache, attache.bearer.{ann}");
    assert_eq!(open_offering_with(&server, &other, Some(&sam)).await.err(), Some(400), "a header and another token");
    let same = format!("attache, attache.bearer.{sam}, attache.bearer.{sam}");
    let (mut ws, _) = open_offering(&server, &same).await.expect("the same token twice opens");
    assert_eq!(next(&mut ws).await.expect("a hello")["type"], "connected");
    let (mut ws, _) = open_offering_with(&server, &format!("attache, attache.bearer.{sam}"), Some(&sam))
        .await
        .expect("a header and the same token open");
    assert_eq!(next(&mut ws).await.expect("a hello")["type"], "connected");
}

/// A browser's WebSocket API sets no `Authorization` header, only
/// subprotocols: in token mode `/ws` takes `attache.bearer.<token>` as the
/// credential, selects the plain subprotocol offered beside it (or the
/// credential, when it is the only one: browsers refuse an answer that
/// selects none), acts as the token's principal, and ends the socket when
/// that token is revoked. A wrong token is 401 and no socket. Before, a
/// browser could not open `/ws` in token mode at all (401).
#[tokio::test]
async fn a_browser_websocket_authenticates_with_its_token_as_a_subprotocol() {
    let (server, tokens) = token_server().await;
    let (ws_token, token) = tokens.create("user:ann", None).expect("a token");
    let (_, other_token) = tokens.create("user:ann", None).expect("a second token");
    let created = rpc(&server, &other_token, "task.create", json!({ "id": "t-ann", "text": "ann's" })).await;
    assert_eq!(created["result"]["id"], "t-ann", "{created}");

    let (mut ws, selected) = open_offering(&server, &format!("attache, attache.bearer.{token}")).await.expect("opened");
    assert_eq!(selected.as_deref(), Some("attache"), "the plain subprotocol is selected, not the credential");
    assert_eq!(next(&mut ws).await.expect("a hello")["type"], "connected");
    let get = json!({ "action": "execute", "request": { "jsonrpc": "2.0", "id": 1, "method": "task.get",
        "params": { "id": "t-ann" } } });
    ws.send(Message::Text(get.to_string().into())).await.expect("sent");
    let answer = next(&mut ws).await.expect("an answer");
    assert_eq!(answer["result"]["text"], "ann's", "acts as the token's principal: {answer}");

    let (mut alone, selected) = open_offering(&server, &format!("attache.bearer.{token}")).await.expect("opened");
    assert_eq!(selected, Some(format!("attache.bearer.{token}")), "the only offer is echoed");
    assert_eq!(next(&mut alone).await.expect("a hello")["type"], "connected");

    let wrong = open_offering(&server, "attache, attache.bearer.at_000000000000_0000").await.err();
    assert_eq!(wrong, Some(401), "a wrong token opens nothing");
    assert_eq!(open_offering(&server, "attache").await.err(), Some(401), "no credential at all");

    assert!(tokens.revoke(&ws_token.id).expect("revoked"));
    ws.send(Message::Text(get.to_string().into())).await.ok();
    match next(&mut ws).await {
        Err(code) => assert_eq!(code, Some(CloseCode::Policy), "closed with 1008"),
        Ok(answer) => panic!("a revoked token's socket still executes: {answer}"),
    }
}
