//! Dev mode against a hostile web page: foreign origins and rebinding Host
//! names are refused before any handler runs, a request that names no
//! principal acts as `user:anonymous` (an ordinary principal), and no
//! request may act as one of the server's own principals.

mod common;
mod entity_support;
mod task_helpers;

use std::time::Duration;

use common::{error_code, header, TestServer};
use entity_support::{api, Form, PRINCIPAL};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use task_helpers::{err, ok, rpc_raw, ALICE};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const EVIL: &str = "https://evil.example";
const UI: &str = "http://localhost:5173";

fn access_control_headers(res: &reqwest::Response) -> Vec<String> {
    res.headers().keys().map(|k| k.as_str().to_owned()).filter(|k| k.starts_with("access-control-")).collect()
}

/// A browser's CORS preflight from `origin` for a GET of `path` sending `headers`.
async fn preflight(s: &TestServer, path: &str, origin: &str, headers: &str) -> reqwest::Response {
    s.request(Method::OPTIONS, path)
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

/// A GET of `path` as alice, from a page of the listed UI origin.
async fn get_from_ui(s: &TestServer, path: &str) -> reqwest::Response {
    s.request(Method::GET, path).header("origin", UI).header(PRINCIPAL, ALICE).send().await.unwrap()
}

/// `PUT` then one append, as `principal` (none: anonymous).
async fn create_stream(s: &TestServer, principal: Option<&str>, path: &str, body: &str) {
    let mut put = s.request(Method::PUT, path).header("content-type", "text/plain");
    let mut post = s.request(Method::POST, path).header("content-type", "text/plain").body(body.to_owned());
    if let Some(p) = principal {
        put = put.header(PRINCIPAL, p);
        post = post.header(PRINCIPAL, p);
    }
    assert_eq!(put.send().await.unwrap().status(), StatusCode::CREATED, "PUT {path}");
    assert_eq!(post.send().await.unwrap().status(), StatusCode::NO_CONTENT, "POST {path}");
}

/// A `task.get` of `id` as the anonymous principal (no header): the error object, if any.
async fn anonymous_task_get(s: &TestServer, id: &str) -> Value {
    let body = json!({ "jsonrpc": "2.0", "method": "task.get", "params": { "id": id }, "id": 1 });
    let res = s.request(Method::POST, "/rpc").header("content-type", "application/json").json(&body);
    let answer: Value = res.send().await.unwrap().json().await.unwrap();
    answer
}

#[tokio::test]
async fn cross_origin_get_from_a_foreign_page_is_refused_before_any_handler() {
    let s = TestServer::start().await;
    create_stream(&s, Some(ALICE), "/alice/secret", "private words").await;
    for (principal, path) in [(None, "/alice/secret?offset=-1"), (Some(ALICE), "/alice/secret?offset=-1")] {
        let mut req = s.request(Method::GET, path).header("origin", EVIL);
        if let Some(p) = principal {
            req = req.header(PRINCIPAL, p);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{principal:?}");
        assert!(access_control_headers(&res).is_empty(), "{:?}", access_control_headers(&res));
        let body = res.text().await.unwrap();
        assert!(!body.contains("private words"));
        assert!(body.contains("ORIGIN_NOT_ALLOWED"), "{body}");
    }
    // `Origin: null` (a sandboxed frame, a file: page) is never allowed either.
    let res = s.request(Method::GET, "/alice/secret?offset=-1").header("origin", "null").send().await.unwrap();
    assert_eq!(error_code(res).await, "ORIGIN_NOT_ALLOWED");
}

#[tokio::test]
async fn text_plain_rpc_post_from_a_foreign_origin_has_no_effect() {
    let s = TestServer::start().await;
    // A form or fetch(no-cors) sends this without a preflight.
    let call =
        json!({ "jsonrpc": "2.0", "method": "task.create", "params": { "id": "t-planted", "text": "x" }, "id": 1 });
    for principal in [None, Some(ALICE)] {
        let mut req = s
            .request(Method::POST, "/rpc")
            .header("origin", EVIL)
            .header("content-type", "text/plain")
            .body(call.to_string());
        if let Some(p) = principal {
            req = req.header(PRINCIPAL, p);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(res).await, "ORIGIN_NOT_ALLOWED");
    }
    // A form post to a stream appends nothing either.
    create_stream(&s, None, "/mine", "kept").await;
    let res = s
        .request(Method::POST, "/mine")
        .header("origin", EVIL)
        .header("content-type", "text/plain")
        .body("planted")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.read_all("/mine").await, "kept");
    let e = err(&s, ALICE, "task.get", json!({ "id": "t-planted" })).await;
    assert!(e["message"].as_str().is_some_and(|m| m.contains("not found")), "{e}");
    assert!(anonymous_task_get(&s, "t-planted").await.get("error").is_some());
}

#[tokio::test]
async fn preflight_from_a_foreign_origin_is_refused_without_cors_headers() {
    let s = TestServer::start().await;
    for path in ["/alice/secret", "/rpc", "/_electric/entities/chat/x", "/mcp"] {
        let res = s
            .request(Method::OPTIONS, path)
            .header("origin", EVIL)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "electric-principal, content-type")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(access_control_headers(&res).is_empty(), "{path}: {:?}", access_control_headers(&res));
    }
}

#[tokio::test]
async fn listed_origin_gets_its_own_origin_back_and_a_fixed_header_list() {
    let s = TestServer::start_with(|c| c.cors_origins = vec![UI.to_owned()]).await;
    create_stream(&s, Some(ALICE), "/alice/notes", "hello").await;
    let res = preflight(&s, "/alice/notes", UI, "electric-principal, x-anything-at-all").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&res, "access-control-allow-origin").as_deref(), Some(UI));
    assert!(header(&res, "vary").is_some_and(|v| v.contains("Origin")));
    let allowed = header(&res, "access-control-allow-headers").unwrap().to_ascii_lowercase();
    assert!(allowed.contains("electric-principal") && allowed.contains("if-none-match"), "{allowed}");
    assert!(!allowed.contains("x-anything-at-all"), "requested headers are not echoed: {allowed}");

    let res = get_from_ui(&s, "/alice/notes?offset=-1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "access-control-allow-origin").as_deref(), Some(UI));
    assert_eq!(res.text().await.unwrap(), "hello");

    // Another origin is still refused, and so is the listed one on another port.
    for other in [EVIL, "http://localhost:5174"] {
        let res = s.request(Method::GET, "/alice/notes?offset=-1").header("origin", other).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{other}");
    }
}

/// What browser clients read and send beyond the Durable Streams headers: the
/// MCP SDK's session id (its next request needs it) and its reconnect's
/// `Last-Event-ID`, the entity list's paging headers, and when to retry.
#[tokio::test]
async fn a_browser_page_may_read_and_send_every_header_its_clients_use() {
    let s = TestServer::start_with(|c| c.cors_origins = vec![UI.to_owned()]).await;
    let res = preflight(&s, "/mcp", UI, "last-event-id, mcp-session-id, mcp-protocol-version").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let allowed = header(&res, "access-control-allow-headers").unwrap().to_ascii_lowercase();
    for name in ["last-event-id", "mcp-session-id", "mcp-protocol-version"] {
        assert!(allowed.split(", ").any(|h| h == name), "{name} not in {allowed}");
    }
    let res = get_from_ui(&s, "/_electric/entities").await;
    assert_eq!(res.status(), StatusCode::OK);
    let exposed = header(&res, "access-control-expose-headers").unwrap().to_ascii_lowercase();
    for name in ["mcp-session-id", "x-total-count", "x-next-offset", "retry-after", "stream-next-offset"] {
        assert!(exposed.split(", ").any(|h| h == name), "{name} not in {exposed}");
    }
}

#[tokio::test]
async fn same_origin_requests_pass_without_cors_headers() {
    let s = TestServer::start().await;
    create_stream(&s, None, "/mine", "ok").await;
    let res = s.request(Method::GET, "/mine?offset=-1").header("origin", s.url.as_str()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(header(&res, "access-control-allow-origin").is_none());
    assert_eq!(header(&res, "content-security-policy").as_deref(), Some("sandbox"));
    assert_eq!(header(&res, "cross-origin-resource-policy").as_deref(), Some("same-origin"));
}

/// One request with a chosen `Host`, over a raw connection (a client library
/// would put the URL's host there).
async fn status_with_host(s: &TestServer, request_line: &str, host: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{request_line} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply)).await.unwrap().unwrap();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
    (status, reply)
}

#[tokio::test]
async fn rebinding_host_is_refused_on_stream_routes_rpc_and_mcp() {
    let s = TestServer::start().await;
    create_stream(&s, None, "/mine", "local only").await;
    let port = s.url.rsplit(':').next().unwrap().to_owned();
    let create =
        json!({ "jsonrpc": "2.0", "method": "task.create", "params": { "id": "t-rebound", "text": "x" }, "id": 1 })
            .to_string();
    for host in [format!("evil.example:{port}"), format!("0.0.0.0:{port}"), "localhost.evil.example".to_owned()] {
        let (status, reply) = status_with_host(&s, "GET /mine?offset=-1", &host, "").await;
        assert_eq!(status, 403, "{host}: {reply}");
        assert!(reply.contains("HOST_NOT_ALLOWED") && !reply.contains("local only"), "{reply}");
        let (status, reply) = status_with_host(&s, "POST /rpc", &host, &create).await;
        assert_eq!(status, 403, "{host}: {reply}");
        assert!(reply.contains("HOST_NOT_ALLOWED"), "{reply}");
        let (status, reply) = status_with_host(&s, "POST /mcp", &host, "{}").await;
        assert_eq!(status, 403, "{host}: {reply}");
        assert!(reply.contains("HOST_NOT_ALLOWED"), "{reply}");
    }
    assert!(anonymous_task_get(&s, "t-rebound").await.get("error").is_some(), "the task was not created");
    for host in
        [format!("localhost:{port}"), format!("app.localhost:{port}"), format!("127.0.0.2:{port}"), "[::1]".into()]
    {
        let (status, reply) = status_with_host(&s, "GET /mine?offset=-1", &host, "").await;
        assert_eq!(status, 200, "{host}: {reply}");
    }
}

#[tokio::test]
async fn allow_host_admits_a_named_host_in_dev_mode() {
    let s = TestServer::start_with(|c| c.allowed_hosts = vec!["attache.test".to_owned()]).await;
    create_stream(&s, None, "/mine", "x").await;
    let (status, _) = status_with_host(&s, "GET /mine?offset=-1", "attache.test:9", "").await;
    assert_eq!(status, 200);
    let (status, _) = status_with_host(&s, "GET /mine?offset=-1", "other.test", "").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn websocket_upgrade_from_a_foreign_origin_is_refused() {
    let s = TestServer::start().await;
    let ws_url = s.url("/ws").replace("http://", "ws://");
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("origin", EVIL.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 403),
        other => panic!("the upgrade should be refused, got {:?}", other.map(|(_, r)| r.status())),
    }
    // The same upgrade from a listed origin opens.
    let s = TestServer::start_with(|c| c.cors_origins = vec![UI.to_owned()]).await;
    let mut req = s.url("/ws").replace("http://", "ws://").into_client_request().unwrap();
    req.headers_mut().insert("origin", UI.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("a listed origin may open a WebSocket");
    let hello = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(hello, Message::Text(ref t) if t.contains("connected")), "{hello:?}");
}

#[tokio::test]
async fn anonymous_cannot_read_another_principals_entity_attachments_task_events_or_stream() {
    let s = TestServer::start().await;
    let entity = "/chat/alice-private";
    let spawn = s.request(Method::PUT, &api(entity)).header(PRINCIPAL, ALICE).send().await.unwrap();
    assert_eq!(spawn.status(), StatusCode::CREATED);
    let form = Form::new().field("id", "secret").file(Some("s.txt"), Some("text/plain"), b"attached secret").finish();
    let upload = s
        .request(Method::POST, &format!("{}/attachments", api(entity)))
        .header(PRINCIPAL, ALICE)
        .header("content-type", Form::content_type())
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), StatusCode::CREATED);
    ok(&s, ALICE, "task.create", json!({ "id": "t-alice", "text": "alice's task" })).await;
    ok(
        &s,
        ALICE,
        "task.create_attachment",
        json!({ "taskId": "t-alice", "key": "k", "type": "text", "content": "task secret" }),
    )
    .await;
    create_stream(&s, Some(ALICE), "/alice/stream", "stream secret").await;

    for path in [
        api(entity),
        format!("{}/attachments", api(entity)),
        format!("{}/attachments/secret", api(entity)),
        format!("{entity}/main?offset=-1"),
        "/alice/stream?offset=-1".to_owned(),
    ] {
        let res = s.request(Method::GET, &path).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "anonymous GET {path}");
    }
    let listed: Value = s.request(Method::GET, "/_electric/entities").send().await.unwrap().json().await.unwrap();
    assert!(!listed.to_string().contains("alice-private"), "{listed}");

    assert!(anonymous_task_get(&s, "t-alice").await.get("error").is_some());
    for (method, params) in [
        ("task.list", json!({})),
        ("task.get_attachment", json!({ "taskId": "t-alice", "key": "k" })),
        ("task.list_attachments", json!({ "taskId": "t-alice" })),
    ] {
        let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": 1 });
        let answer: Value = s.request(Method::POST, "/rpc").json(&body).send().await.unwrap().json().await.unwrap();
        let text = answer["result"].to_string();
        assert!(!text.contains("t-alice") && !text.contains("task secret"), "{method}: {answer}");
    }
    let events = s.request(Method::GET, "/_attache/events?offset=-1").send().await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let text = events.text().await.unwrap();
    assert!(!text.contains("t-alice"), "anonymous reads alice's events: {text}");
}

#[tokio::test]
async fn anonymous_owns_the_plain_streams_it_creates() {
    let s = TestServer::start().await;
    create_stream(&s, None, "/scratch/anon", "mine").await;
    assert_eq!(s.read_all("/scratch/anon").await, "mine");
    // The owner is the ordinary principal user:anonymous, named or not ...
    let res = s
        .request(Method::GET, "/scratch/anon?offset=-1")
        .header(PRINCIPAL, attache_core::PrincipalKey::ANONYMOUS)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "mine");
    // ... and nobody else's.
    let res = s.request(Method::GET, "/scratch/anon?offset=-1").header(PRINCIPAL, ALICE).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn header_naming_a_built_in_system_principal_is_refused() {
    let s = TestServer::start().await;
    for principal in ["system:dev-local", "system:attache", "/principal/system%3Aframework"] {
        let res = s.request(Method::GET, "/_electric/entities").header(PRINCIPAL, principal).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{principal}");
        assert_eq!(error_code(res).await, "PRINCIPAL_NOT_ALLOWED");
        let (status, _) =
            rpc_raw(&s, principal, json!({"jsonrpc": "2.0", "method": "task.list", "id": 1}).to_string()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{principal} on /rpc");
    }
    // A system principal that is not one of the server's own is an ordinary one.
    let res = s.request(Method::GET, "/_electric/entities").header(PRINCIPAL, "system:my-script").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn token_mode_allows_any_origin_unless_origins_are_listed() {
    use attache_server::auth::AuthMode;
    let s = TestServer::start_with(|c| c.auth = Some(AuthMode::Token)).await;
    let res = s.request(Method::OPTIONS, "/x").header("origin", EVIL).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&res, "access-control-allow-origin").as_deref(), Some("*"));

    let s = TestServer::start_with(|c| {
        c.auth = Some(AuthMode::Token);
        c.cors_origins = vec![UI.to_owned()];
    })
    .await;
    let res = s.request(Method::OPTIONS, "/x").header("origin", EVIL).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(access_control_headers(&res).is_empty());
    let res = s.request(Method::OPTIONS, "/x").header("origin", UI).send().await.unwrap();
    assert_eq!(header(&res, "access-control-allow-origin").as_deref(), Some(UI));
}

/// A request with more than one `Host` is 400 (RFC 9112 3.2), and one with
/// more than one `Origin` is refused too: before (session 18's attack pass),
/// the first was checked and the rest ignored, so `Host: 127.0.0.1` then
/// `Host: evil.example` was answered 200.
#[tokio::test]
async fn a_host_that_is_not_text_is_refused_and_named_as_such() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    create_stream(&s, None, "/mine", "local only").await;
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /mine?offset=-1 HTTP/1.1\r\nHost: \xc3\xa9.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply)).await.unwrap().unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("HOST_NOT_ALLOWED") && reply.contains("not visible ASCII"), "{reply}");
    assert!(!reply.contains("local only") && !reply.contains("without a Host"), "{reply}");
}

#[tokio::test]
async fn an_append_with_two_content_types_is_refused_and_appends_nothing() {
    let s = TestServer::start().await;
    let put = s.request(Method::PUT, "/json").header("content-type", "application/json").send().await.unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let (status, reply) =
        status_with_host(&s, "POST /json", "127.0.0.1\r\nContent-Type: text/plain", r#"{"a":1}"#).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("DUPLICATE_HEADER"), "{reply}");
    // One Content-Type is still taken, and only that append is in the stream.
    let (status, reply) = status_with_host(&s, "POST /json", "127.0.0.1", r#"{"a":2}"#).await;
    assert_eq!(status, 204, "{reply}");
    let read = s.request(Method::GET, "/json?offset=-1").send().await.unwrap().text().await.unwrap();
    assert_eq!(read, r#"[{"a":2}]"#);
}

/// Two `electric-principal` headers are refused, as two Hosts are: the
/// server never acts as whichever came first (session 20's attack pass).
#[tokio::test]
async fn a_request_naming_two_principals_is_refused_and_writes_nothing() {
    let s = TestServer::start().await;
    let two = "127.0.0.1\r\nelectric-principal: user:alice\r\nelectric-principal: user:mallory";
    let (status, reply) = status_with_host(&s, "PUT /two/principals", two, "").await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("DUPLICATE_HEADER"), "{reply}");
    let absent = s.request(Method::GET, "/two/principals?offset=-1").header("electric-principal", "user:alice");
    assert_eq!(absent.send().await.unwrap().status(), StatusCode::NOT_FOUND, "nothing was created");
}

#[tokio::test]
async fn a_request_target_naming_another_host_than_host_is_refused() {
    let s = TestServer::start().await;
    create_stream(&s, None, "/mine", "local only").await;
    let port = s.url.rsplit(':').next().unwrap().to_owned();
    let (status, reply) = status_with_host(&s, "GET http://evil.example/mine?offset=-1", "127.0.0.1", "").await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("HOST_MISMATCH") && !reply.contains("local only"), "{reply}");
    // The same host in both (any case, any port) is answered.
    let line = format!("GET http://LOCALHOST:{port}/mine?offset=-1");
    let (status, reply) = status_with_host(&s, &line, &format!("localhost:{port}"), "").await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("local only"), "{reply}");
}

#[tokio::test]
async fn a_request_with_two_hosts_or_two_origins_is_refused() {
    let s = TestServer::start().await;
    create_stream(&s, None, "/mine", "local only").await;
    let (status, reply) = status_with_host(&s, "GET /mine?offset=-1", "127.0.0.1\r\nHost: evil.example", "").await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("DUPLICATE_HEADER") && !reply.contains("local only"), "{reply}");
    let port = s.url.rsplit(':').next().unwrap().to_owned();
    let two_origins = format!("127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nOrigin: http://evil.example");
    let (status, reply) = status_with_host(&s, "GET /mine?offset=-1", &two_origins, "").await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("DUPLICATE_HEADER") && !reply.contains("local only"), "{reply}");
    // One of each is still answered.
    let one_origin = format!("127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}");
    let (status, reply) = status_with_host(&s, "GET /mine?offset=-1", &one_origin, "").await;
    assert_eq!(status, 200, "{reply}");
}
