//! Task events: the global events stream read by offset (catch-up,
//! long-poll, SSE), per-reader filtering, WebSocket pushes and Redis PUBLISH.

mod common;
mod task_helpers;

use std::time::Duration;

use common::{header, TestServer, NEXT_OFFSET};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use task_helpers::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn read_events(s: &TestServer, principal: &str, query: &[(&str, &str)]) -> (StatusCode, Vec<Value>, String) {
    let res = s
        .client
        .get(s.url("/_attache/events"))
        .query(query)
        .header("electric-principal", principal)
        .send()
        .await
        .expect("events answer");
    let status = res.status();
    let next = header(&res, NEXT_OFFSET).unwrap_or_default();
    let bytes = res.bytes().await.unwrap();
    let events = if status != StatusCode::OK { vec![] } else { serde_json::from_slice(&bytes).expect("a JSON array") };
    (status, events, next)
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_late_subscriber_reads_every_event_from_the_start() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "events", 50).await;
    ok(&s, ALICE, "task.update", json!({"id": t, "updates": {"priority": 60}})).await;
    ok(&s, ALICE, "task.assign", json!({"taskId": t, "instanceId": "w1"})).await;
    ok(&s, ALICE, "task.unassign", json!({"taskId": t})).await;
    let a =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "analysis", "type": "json", "value": 1}))
            .await;
    ok(&s, ALICE, "task.delete_attachment", json!({"taskId": t, "key": "analysis"})).await;
    ok(&s, ALICE, "task.claim", json!({"workerId": "w1"})).await;
    ok(&s, ALICE, "task.complete", json!({"id": t, "result": "done"})).await;
    ok(&s, ALICE, "task.delete", json!({"id": t})).await;

    // A subscriber that was never online reads everything, in order.
    let (status, events, _) = read_events(&s, ALICE, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        types(&events),
        [
            "task.created",
            "task.updated",
            "task.assigned",
            "task.unassigned",
            "task.attachment_created",
            "task.attachment.deleted",
            "task.claimed",
            "task.attachment_created",
            "task.completed",
            "task.deleted"
        ]
    );
    let created = &events[4];
    assert_eq!(created["taskId"], t.as_str());
    let payload = created["payload"].as_object().unwrap();
    let keys: Vec<&str> = payload.keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert_eq!(
        Value::Object(payload.clone()),
        json!({"taskId": t, "key": "analysis", "type": "json", "attachmentId": a["id"], "instanceId": ALICE, "timestamp": created["payload"]["timestamp"]})
    );
    assert!(created["payload"]["timestamp"].is_i64());
    assert_eq!(events[5]["payload"], json!({"taskId": t, "key": "analysis", "attachmentId": a["id"]}));
    assert_eq!(events[8]["payload"]["status"], "completed");

    // Resuming from any event's offset gives exactly what followed it.
    let off = events[6]["offset"].as_str().unwrap().to_owned();
    let (_, rest, _) = read_events(&s, ALICE, &[("offset", off.as_str())]).await;
    assert_eq!(types(&rest), ["task.attachment_created", "task.completed", "task.deleted"]);

    // The same events are rows of collection `event` on the task's main stream.
    let res = s
        .client
        .get(s.url(&format!("/task/{t}/main")))
        .query(&[("offset", "-1")])
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    let rows: Vec<Value> = res.json().await.unwrap();
    let row_types: Vec<&str> =
        rows.iter().filter(|r| r["type"] == "event").map(|r| r["value"]["type"].as_str().unwrap()).collect();
    assert_eq!(row_types, types(&events));
}

#[tokio::test]
async fn long_poll_wakes_on_the_next_event_and_resumes_by_offset() {
    let s = TestServer::start_with(|c| c.long_poll_timeout = Duration::from_secs(10)).await;
    let t = create_task(&s, ALICE, "first", 50).await;
    let (_, _, tail) = read_events(&s, ALICE, &[("offset", "now")]).await;
    assert!(!tail.is_empty());
    let poll = {
        let s = &s;
        let tail = tail.clone();
        async move { read_events(s, ALICE, &[("offset", tail.as_str()), ("live", "long-poll")]).await }
    };
    let write = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "x"})).await;
    };
    let ((status, events, next), ()) = tokio::join!(poll, write);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(types(&events), ["task.attachment_created"]);
    assert!(next > tail);
    assert_eq!(events[0]["offset"], next.as_str());
    let (status, events, _) = read_events(&s, ALICE, &[("offset", next.as_str())]).await;
    assert_eq!((status, events.len()), (StatusCode::OK, 0));
}

#[tokio::test]
async fn readers_see_only_events_of_tasks_they_may_read() {
    let s = TestServer::start().await;
    let (_, _, start) = read_events(&s, BOB, &[("offset", "now")]).await;
    let alices = create_task(&s, ALICE, "alice's", 50).await;
    let bobs = create_task(&s, BOB, "bob's", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": alices, "key": "k", "type": "text", "content": "x"}))
        .await;

    let (_, events, bob_next) = read_events(&s, BOB, &[("offset", start.as_str())]).await;
    assert_eq!(types(&events), ["task.created"]);
    assert_eq!(events[0]["taskId"], bobs.as_str());
    let (_, all, alice_next) = read_events(&s, ALICE, &[("offset", start.as_str())]).await;
    assert_eq!(all.len(), 2, "alice sees her own only: {all:?}");
    assert_eq!(bob_next, alice_next, "offsets are the global stream's");
    let (_, anonymous, _) = read_events(&s, "user:anonymous", &[("offset", start.as_str())]).await;
    assert_eq!(anonymous.len(), 0, "a request naming no principal sees no one's events: {anonymous:?}");

    // A long-poll is not woken by events it may not see; it answers 204 past them.
    let (status, events, next) = read_events(&s, BOB, &[("offset", alice_next.as_str()), ("live", "long-poll")]).await;
    assert_eq!((status, events.len()), (StatusCode::NO_CONTENT, 0));
    assert_eq!(next, alice_next);
    ok(&s, ALICE, "task.update", json!({"id": alices, "updates": {"priority": 1}})).await;
    let (status, _, past) = read_events(&s, BOB, &[("offset", next.as_str()), ("live", "long-poll")]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(past > next, "the hidden event is skipped, not re-read");

    // A grant makes the task's whole history visible, including what came before it.
    let res = s
        .client
        .post(s.url(&format!("/_electric/entities/task/{alices}/grants")))
        .header("electric-principal", ALICE)
        .json(&json!({"subject_kind": "principal", "subject_value": BOB, "permission": "read"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let (_, events, _) = read_events(&s, BOB, &[("offset", start.as_str())]).await;
    assert_eq!(events.len(), 4);
    let (_, one, _) = read_events(&s, BOB, &[("offset", start.as_str()), ("taskId", alices.as_str())]).await;
    assert_eq!(one.len(), 3);
}

#[tokio::test]
async fn bad_offsets_and_live_modes_are_refused() {
    let s = TestServer::start().await;
    for query in [
        vec![("offset", "zzz")],
        vec![("live", "long-poll")],
        vec![("offset", "-1"), ("live", "forever")],
        vec![("offset", "0000000000000000_9999999999999999")],
    ] {
        let (status, _, _) = read_events(&s, ALICE, &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query:?}");
    }
}

#[tokio::test]
async fn sse_streams_events_with_control_offsets() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "sse", 50).await;
    let res = s
        .client
        .get(s.url("/_attache/events"))
        .query(&[("offset", "-1"), ("live", "sse")])
        .header("electric-principal", ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "content-type").unwrap(), "text/event-stream");
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let wrote =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "x"}));
    wrote.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("task.attachment_created") {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("SSE data in time").unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: data\ndata:["));
    assert!(text.contains("task.created"));
    assert!(text.contains("event: control\ndata:{\"streamNextOffset\":"));
}

async fn ws_connect(
    s: &TestServer,
    principal: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = s.url("/ws").replace("http://", "ws://").into_client_request().unwrap();
    req.headers_mut().insert("electric-principal", principal.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("the WebSocket opens");
    let hello = ws_next(&mut ws).await;
    assert_eq!(hello["type"], "connected");
    ws
}

async fn ws_next(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a message in time");
        match msg.expect("open").expect("no error") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn websocket_subscribers_get_matching_events_of_readable_tasks() {
    let s = TestServer::start().await;
    let mut bob = ws_connect(&s, BOB).await;
    let mut alice = ws_connect(&s, ALICE).await;
    for ws in [&mut bob, &mut alice] {
        ws.send(Message::Text(
            json!({"action": "subscribe", "events": ["task.attachment_created"]}).to_string().into(),
        ))
        .await
        .unwrap();
        assert_eq!(ws_next(ws).await["type"], "subscribed");
    }
    alice.send(Message::Text(json!({"action": "subscribe", "events": ["task.*"]}).to_string().into())).await.unwrap();
    assert_eq!(ws_next(&mut alice).await["events"], json!(["task.attachment_created", "task.*"]));

    let t = create_task(&s, ALICE, "ws", 50).await;
    let bobs = create_task(&s, BOB, "bob ws", 50).await;
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "k", "type": "text", "content": "x"})).await;
    ok(&s, BOB, "task.create_attachment", json!({"taskId": bobs, "key": "b", "type": "json", "value": 0})).await;

    let first = ws_next(&mut alice).await;
    assert_eq!((first["type"].as_str(), first["event"].as_str()), (Some("event"), Some("task.created")));
    let second = ws_next(&mut alice).await;
    assert_eq!(second["event"], "task.attachment_created");
    assert_eq!(second["data"]["payload"]["key"], "k");
    assert_eq!(second["data"]["taskId"], t.as_str());
    // Bob's only event is his own attachment; alice's task and bob's task.created do not reach him.
    let got = ws_next(&mut bob).await;
    assert_eq!(got["event"], "task.attachment_created");
    assert_eq!(got["data"]["taskId"], bobs.as_str());

    bob.send(Message::Text(json!({"action": "ping"}).to_string().into())).await.unwrap();
    assert_eq!(ws_next(&mut bob).await["type"], "pong");
}

#[tokio::test]
async fn deleting_an_attachment_publishes_task_attachment_deleted_as_claudebench_does() {
    let s = TestServer::start().await;
    let mut ws = ws_connect(&s, ALICE).await;
    // ClaudeBench's names: `task.attachment_created` on create, `task.attachment.deleted` on delete.
    let events = json!({"action": "subscribe", "events": ["task.attachment_created", "task.attachment.*"]});
    ws.send(Message::Text(events.to_string().into())).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
    let t = create_task(&s, ALICE, "deleted", 50).await;
    let a =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "notes", "type": "text", "content": "x"}))
            .await;
    let deleted = ok(&s, ALICE, "task.delete_attachment", json!({"taskId": t, "key": "notes"})).await;
    assert_eq!(deleted["deleted"], true);

    let created = ws_next(&mut ws).await;
    assert_eq!(created["event"], "task.attachment_created");
    let gone = ws_next(&mut ws).await;
    assert_eq!(gone["event"], "task.attachment.deleted");
    assert_eq!(gone["data"]["payload"], json!({"taskId": t, "key": "notes", "attachmentId": a["id"]}));

    let (_, all, _) = read_events(&s, ALICE, &[("offset", "-1"), ("taskId", t.as_str())]).await;
    assert_eq!(types(&all), ["task.created", "task.attachment_created", "task.attachment.deleted"]);
}

#[tokio::test]
async fn websocket_replays_from_an_offset_and_executes_json_rpc() {
    let s = TestServer::start().await;
    let t = create_task(&s, ALICE, "replay", 50).await;
    let mut ws = ws_connect(&s, ALICE).await;
    ws.send(Message::Text(json!({"action": "subscribe", "events": ["*"], "offset": "-1"}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
    let replayed = ws_next(&mut ws).await;
    assert_eq!(replayed["event"], "task.created");
    assert_eq!(replayed["data"]["taskId"], t.as_str());

    let request = json!({"jsonrpc": "2.0", "method": "task.get", "params": {"id": t}, "id": 5});
    ws.send(Message::Text(json!({"action": "execute", "request": request}).to_string().into())).await.unwrap();
    let answer = ws_next(&mut ws).await;
    assert_eq!(answer["id"], 5);
    assert_eq!(answer["result"]["text"], "replay");
    ws.send(Message::Text("{nope".into())).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["error"]["code"], -32700);
}

/// A throwaway Redis without persistence on a free port, if `redis-server` is installed.
struct ScratchRedis {
    child: std::process::Child,
    port: u16,
}

impl ScratchRedis {
    fn start() -> Option<ScratchRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(ScratchRedis { child, port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_subscribers_receive_each_event_on_its_type_channel() {
    let Some(redis_server) = ScratchRedis::start() else {
        attache_storage::postgres::test_cluster::missing_service("Redis", "redis-server could not be started");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", redis_server.port);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("a Redis subscriber");
    pubsub.subscribe("task.attachment_created").await.unwrap();
    pubsub.psubscribe("task.*").await.unwrap();
    let s = TestServer::start_with(|c| c.redis_url = Some(url.clone())).await;

    let t = create_task(&s, ALICE, "redis", 50).await;
    let a =
        ok(&s, ALICE, "task.create_attachment", json!({"taskId": t, "key": "analysis", "type": "json", "value": {}}))
            .await;
    let mut messages = pubsub.on_message();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.expect("published").unwrap();
        let body: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        seen.push((msg.get_channel_name().to_owned(), body));
    }
    let channels: Vec<&str> = seen.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(channels.iter().filter(|c| **c == "task.created").count(), 1);
    assert_eq!(channels.iter().filter(|c| **c == "task.attachment_created").count(), 2, "exact and pattern");
    let (_, created) = seen.iter().find(|(c, _)| c == "task.attachment_created").unwrap();
    assert_eq!(created["type"], "task.attachment_created");
    assert_eq!(created["payload"]["attachmentId"], a["id"]);
    assert_eq!(created["payload"]["taskId"], t.as_str());
}

#[tokio::test]
async fn a_long_poll_that_may_see_nothing_in_a_long_log_answers_an_empty_page_instead_of_reading_it_all() {
    let s = TestServer::start_with(|c| {
        c.max_read_bytes = 1024;
        c.long_poll_timeout = Duration::from_secs(10);
    })
    .await;
    for n in 0..60 {
        create_task(&s, "user:alice", &format!("alice's task {n}"), 50).await;
    }
    let started = std::time::Instant::now();
    let res = s
        .request(reqwest::Method::GET, "/_attache/events")
        .header("electric-principal", "user:mallory")
        .query(&[("offset", "-1"), ("live", "long-poll")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "an empty page, not a wait");
    assert!(started.elapsed() < Duration::from_secs(5), "answered without waiting out the long-poll");
    let next = header(&res, NEXT_OFFSET).expect("where the scan stopped");
    assert!(res.headers().get("stream-up-to-date").is_none(), "not up to date: the log goes on");
    assert_eq!(res.json::<Value>().await.unwrap(), json!([]));
    // Going on from there, mallory reaches the end seeing nothing of alice's.
    let mut offset = next;
    for _ in 0..100 {
        let res = s
            .request(reqwest::Method::GET, "/_attache/events")
            .header("electric-principal", "user:mallory")
            .query(&[("offset", offset.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let up_to_date = res.headers().get("stream-up-to-date").is_some();
        offset = header(&res, NEXT_OFFSET).expect("a next offset");
        assert_eq!(res.json::<Value>().await.unwrap(), json!([]));
        if up_to_date {
            return;
        }
    }
    panic!("the log has an end");
}

/// A `/ws` replay from an offset reads the log a page per turn up to the
/// tail; while it runs, a subscribe with another offset is refused (-32602,
/// nothing subscribed) rather than starting the scan over, and once the
/// replay has caught up, a new offset is taken again. Before (issue 10),
/// each subscribe with `"offset":"-1"` made the socket rescan the whole log:
/// 32 sockets of a principal who may see none of a 16.5 MB log's events,
/// subscribing every 0.5 s, kept `/healthz` waiting 0.6 s (median).
#[tokio::test]
async fn a_websocket_replay_runs_once_at_a_time_and_a_subscribe_with_another_offset_meanwhile_is_refused() {
    // A page holds an event or two: the replay below takes some 100 turns.
    let s = TestServer::start_with(|c| c.max_read_bytes = 512).await;
    const TASKS: usize = 150;
    for n in 0..TASKS {
        create_task(&s, ALICE, &format!("task {n}"), 50).await;
    }
    let mut ws = ws_connect(&s, ALICE).await;
    let replay = json!({ "action": "subscribe", "events": ["task.created"], "offset": "-1" }).to_string();
    let again = json!({ "action": "subscribe", "events": ["task.updated"], "offset": "-1" }).to_string();
    // Both in one write: the second arrives while the replay has most of the log to go.
    ws.feed(Message::Text(replay.clone().into())).await.unwrap();
    ws.feed(Message::Text(again.clone().into())).await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");
    let (mut replayed, mut refusal) = (0, None);
    while replayed < TASKS {
        let msg = ws_next(&mut ws).await;
        match msg["type"].as_str() {
            Some("event") => replayed += 1,
            Some("error") => refusal = Some(msg),
            _ => panic!("unexpected {msg}"),
        }
    }
    let refusal = refusal.expect("the second offset is refused while the replay runs");
    assert_eq!(refusal["error"]["code"], -32602, "{refusal}");
    assert!(refusal["error"]["message"].as_str().unwrap().contains("replay"), "{refusal}");
    // Nothing of the refused subscribe was kept; the replay was not started over.
    ws.send(Message::Text(json!({ "action": "ping" }).to_string().into())).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "pong", "each event once, then nothing");
    // Caught up: an offset is taken again, and replays the log once more.
    ws.send(Message::Text(again.into())).await.unwrap();
    let subscribed = ws_next(&mut ws).await;
    assert_eq!(subscribed["events"], json!(["task.created", "task.updated"]), "{subscribed}");
    assert_eq!(ws_next(&mut ws).await["event"], "task.created");
}

type Setup = fn(&str) -> Vec<(&'static str, Value)>;

/// The calls that change an existing task's record, each with the event it
/// publishes, the calls that set the task up for it, and its params (`"T"`
/// stands for the task's id).
fn task_record_changes() -> [(&'static str, &'static str, Setup, Value); 5] {
    [
        ("task.update", "task.updated", |_| vec![], json!({ "id": "T", "updates": { "priority": 60 } })),
        ("task.assign", "task.assigned", |_| vec![], json!({ "taskId": "T", "instanceId": "w1" })),
        (
            "task.unassign",
            "task.unassigned",
            |t| vec![("task.assign", json!({ "taskId": t, "instanceId": "w1" }))],
            json!({ "taskId": "T" }),
        ),
        ("task.claim", "task.claimed", |_| vec![], json!({ "workerId": "w1" })),
        // Without a result: a result attachment would reach the pause first.
        (
            "task.complete",
            "task.completed",
            |_| vec![("task.claim", json!({ "workerId": "w1" }))],
            json!({ "id": "T" }),
        ),
    ]
}

/// A task write whose rows the store refuses publishes no event: an
/// attachment write waits between its decision and its write (the
/// `task_write` pause) while the owner stops the task's entity (`DELETE` on
/// it closes its main stream), so the write of its rows is refused. The call
/// answers the stopped error (-32602) and `/_attache/events` shows nothing
/// of it. Before, the event went to the events stream whatever the rows'
/// fate. (A change of the task record waits there holding the task's life,
/// so a stop waits for it: the next test.)
#[tokio::test]
async fn a_task_change_whose_rows_are_refused_publishes_no_event() {
    let cases: [(&str, &str, Setup, Value); 2] = [
        (
            "task.create_attachment",
            "task.attachment_created",
            |_| vec![],
            json!({ "taskId": "T", "key": "k", "type": "json", "value": 1 }),
        ),
        (
            "task.delete_attachment",
            "task.attachment.deleted",
            |t| vec![("task.create_attachment", json!({ "taskId": t, "key": "k", "type": "json", "value": 1 }))],
            json!({ "taskId": "T", "key": "k" }),
        ),
    ];
    for (method, event, setup, params) in cases {
        let pauses = attache_server::pause::Pauses::default();
        let given = pauses.clone();
        let s = TestServer::start_with(move |c| c.pauses = Some(given)).await;
        let t = create_task(&s, ALICE, "refused", 50).await;
        for (m, p) in setup(&t) {
            ok(&s, ALICE, m, p).await;
        }
        let params: Value = serde_json::from_str(&params.to_string().replace("\"T\"", &format!("\"{t}\""))).unwrap();
        let pause = pauses.arm(attache_server::pause::TASK_WRITE);
        let stop = async {
            pause.reached().await;
            let res = stop_task(&s, &t, false).await;
            assert_eq!(res.status(), StatusCode::OK, "{method}: the owner stops the task's entity");
            pause.release();
        };
        let (answer, ()) = tokio::join!(call(&s, ALICE, method, params), stop);
        assert_eq!(answer["error"]["code"], -32602, "{method}: {answer}");
        assert_eq!(answer["error"]["message"], "Task is stopped and accepts no more changes", "{method}: {answer}");

        let mine = events_of(&s, &t).await;
        assert_eq!(mine.first().map(|e| e["type"].clone()), Some(json!("task.created")), "{method}: {mine:?}");
        // The setup's own events are there (so the reader sees this task's events); the refused change's is not.
        let expected = 1 + setup(&t).len();
        assert_eq!(mine.len(), expected, "{method}: only the setup's events: {mine:?}");
        assert!(mine.iter().all(|e| e["type"] != event), "{method}: its event {event} was published: {mine:?}");
    }
}

/// Stops the task's entity as its owner: `DELETE` on it, or SIGTERM.
async fn stop_task(s: &TestServer, t: &str, by_signal: bool) -> reqwest::Response {
    let entity = s.url(&format!("/_electric/entities/task/{t}"));
    let request = if by_signal {
        s.client.post(format!("{entity}/signal")).json(&json!({ "signal": "SIGTERM" }))
    } else {
        s.client.delete(entity)
    };
    request.header("electric-principal", ALICE).send().await.unwrap()
}

/// Alice's events of task `t`, oldest first.
async fn events_of(s: &TestServer, t: &str) -> Vec<Value> {
    let (status, events, _) = read_events(s, ALICE, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::OK);
    events.into_iter().filter(|e| e["taskId"] == t).collect()
}

/// A stop (`DELETE` on the task's entity, or SIGTERM) that comes while a
/// change of the task record is between its compare-and-set and its write
/// (the `task_write` pause) waits for the write: the change is answered,
/// its event published, the record shows it, and the task is stopped after.
/// Whatever the order, the record shows a change exactly when its event was
/// written. Before, the stop closed the main stream in between: the call
/// answered "stopped" and published nothing, but the record kept the change.
#[tokio::test]
async fn a_stop_during_a_task_change_waits_for_its_write_and_the_record_shows_only_written_changes() {
    let cases = task_record_changes();
    for by_signal in [false, true] {
        for (method, event, setup, params) in cases.clone() {
            let case = format!("{method} (stopped by {})", if by_signal { "SIGTERM" } else { "DELETE" });
            let pauses = attache_server::pause::Pauses::default();
            let given = pauses.clone();
            let s = TestServer::start_with(move |c| c.pauses = Some(given)).await;
            let t = create_task(&s, ALICE, "stopped meanwhile", 50).await;
            for (m, p) in setup(&t) {
                ok(&s, ALICE, m, p).await;
            }
            let before = ok(&s, ALICE, "task.get", json!({ "id": t })).await;
            let params: Value =
                serde_json::from_str(&params.to_string().replace("\"T\"", &format!("\"{t}\""))).unwrap();
            let pause = pauses.arm(attache_server::pause::TASK_WRITE);
            let stop = async {
                tokio::time::timeout(Duration::from_secs(10), pause.reached()).await.expect("the change pauses");
                let stop = stop_task(&s, &t, by_signal);
                tokio::pin!(stop);
                // Given this long, a stop that does not wait for the change is over.
                let early = tokio::time::timeout(Duration::from_millis(500), &mut stop).await.ok();
                pause.release();
                let res = match early {
                    Some(res) => res,
                    None => stop.await,
                };
                assert_eq!(res.status(), StatusCode::OK, "{case}: the owner stops the task");
            };
            let (answer, ()) = tokio::join!(call(&s, ALICE, method, params), stop);

            let after = ok(&s, ALICE, "task.get", json!({ "id": t })).await;
            let published = events_of(&s, &t).await.iter().any(|e| e["type"] == event);
            if answer.get("error").is_some() {
                assert!(!published, "{case}: a refused change published {event}: {answer}");
                assert_eq!(after, before, "{case}: refused ({answer}), yet the record shows the change");
            } else {
                assert!(published, "{case}: an answered change published no {event}");
                assert_ne!(after, before, "{case}: answered, yet the record does not show it");
            }
            assert!(answer.get("error").is_none(), "{case}: the stop waits for the change's write: {answer}");
            let refused = err(&s, ALICE, "task.update", json!({ "id": t, "updates": { "priority": 1 } })).await;
            assert_eq!(refused["code"], -32602, "{case}: stopped after: {refused}");
        }
    }
}

/// A change of the task record whose request is dropped (the client closes
/// its connection) while the change is between its compare-and-set and its
/// write (held at the `task_write` pause) is finished all the same: the
/// record shows it and its event is published, never one without the other.
/// Before, the dropped request took the write with it: the record kept the
/// change (priority, assignee, status, the task itself) and no `task.*`
/// event or main-stream row was ever written.
#[tokio::test]
async fn a_task_change_whose_request_is_dropped_after_its_decision_is_written_with_its_event() {
    let create: (&str, &str, Setup, Value) =
        ("task.create", "task.created", |_| vec![], json!({ "id": "T", "text": "dropped", "priority": 60 }));
    let delete: (&str, &str, Setup, Value) = ("task.delete", "task.deleted", |_| vec![], json!({ "id": "T" }));
    let cases = [create].into_iter().chain(task_record_changes()).chain([delete]);
    let mut wrong = Vec::new();
    for (method, event, setup, params) in cases {
        let pauses = attache_server::pause::Pauses::default();
        let given = pauses.clone();
        let s = TestServer::start_with(move |c| c.pauses = Some(given)).await;
        let t = if method == "task.create" {
            "t-dropped".to_owned()
        } else {
            create_task(&s, ALICE, "dropped meanwhile", 50).await
        };
        for (m, p) in setup(&t) {
            ok(&s, ALICE, m, p).await;
        }
        let before = call(&s, ALICE, "task.get", json!({ "id": t })).await;
        let params: Value = serde_json::from_str(&params.to_string().replace("\"T\"", &format!("\"{t}\""))).unwrap();
        let pause = pauses.arm(attache_server::pause::TASK_WRITE);
        call_dropped_at(&s, ALICE, method, &params, &pause).await;
        pause.release();

        // What the change does runs on its own now: given time, its event is there.
        let mut published = false;
        for _ in 0..50 {
            published = events_of(&s, &t).await.iter().any(|e| e["type"] == event);
            if published {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = call(&s, ALICE, "task.get", json!({ "id": t })).await;
        let changed = after != before;
        if changed != published {
            wrong.push(format!(
                "{method}: the record {} the change, yet {event} was {}published: {before} -> {after}",
                if changed { "shows" } else { "does not show" },
                if published { "" } else { "not " },
            ));
        } else if !published {
            wrong.push(format!("{method}: a change decided before its request was dropped is not finished"));
        }
        let cells = s.memory_counts().await.task_cells;
        assert_eq!(cells, 0, "{method}: the finished change gave back its task cell");
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The SSE events in `text` so far: (name, data) of each one complete.
fn sse_events(text: &str) -> Vec<(String, String)> {
    let complete = &text[..text.rfind("\n\n").map_or(0, |at| at + 2)];
    complete
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_owned();
            let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data:")).collect();
            (name, data.join("\n"))
        })
        .collect()
}

/// Reads `body` until `text` holds `count` complete SSE events in all.
async fn read_sse(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
    count: usize,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sse_events(text).len() < count {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("SSE events in time");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the response goes on").expect("bytes")));
    }
    sse_events(text)
}

#[tokio::test]
async fn an_sse_reader_is_told_nothing_when_only_events_it_may_not_see_are_appended() {
    let s = TestServer::start().await;
    let alices = create_task(&s, ALICE, "private", 50).await;
    let res = s
        .client
        .get(s.url("/_attache/events"))
        .query(&[("offset", "now"), ("live", "sse")])
        .header("electric-principal", BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let first = read_sse(&mut body, &mut text, 1).await;
    assert_eq!(first[0].0, "control", "{text}");
    let told: Value = serde_json::from_str(&first[0].1).unwrap();
    assert_eq!(told["upToDate"], true, "{text}");

    // Alice's task changes: Bob's reader hears nothing of it, not even an offset.
    ok(&s, ALICE, "task.create_attachment", json!({"taskId": alices, "key": "k", "type": "text", "content": "x"}))
        .await;
    ok(&s, ALICE, "task.update", json!({"id": alices, "updates": {"priority": 60}})).await;
    let quiet = tokio::time::timeout(Duration::from_millis(1500), body.next()).await;
    assert!(quiet.is_err(), "nothing for Bob, got {quiet:?}");

    // Bob's own task: its event, then a control just past it (not past Alice's after it).
    let bobs = create_task(&s, BOB, "mine", 50).await;
    ok(&s, ALICE, "task.update", json!({"id": alices, "updates": {"priority": 70}})).await;
    let events = read_sse(&mut body, &mut text, 3).await;
    assert_eq!((events[1].0.as_str(), events[2].0.as_str()), ("data", "control"), "{text}");
    let data: Vec<Value> = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(types(&data), ["task.created"]);
    assert_eq!(data[0]["taskId"], bobs.as_str());
    let control: Value = serde_json::from_str(&events[2].1).unwrap();
    let resume = control["streamNextOffset"].as_str().unwrap().to_owned();
    assert_eq!(data[0]["offset"], resume.as_str());
    let quiet = tokio::time::timeout(Duration::from_millis(500), body.next()).await;
    assert!(quiet.is_err(), "nothing for Alice's update after Bob's event, got {quiet:?}");

    // Resuming from that offset skips nothing Bob may see, and shows nothing of Alice's.
    ok(&s, BOB, "task.create_attachment", json!({"taskId": bobs, "key": "k", "type": "text", "content": "y"})).await;
    let (status, resumed, _) = read_events(&s, BOB, &[("offset", &resume)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(types(&resumed), ["task.attachment_created"]);
    assert_eq!(resumed[0]["taskId"], bobs.as_str());
}

/// A server reading pages of at most 256 KiB, with a response budget of
/// `budget` bytes of which one principal holds `share_percent`, and its
/// pause points (for a scan held at `EVENTS_SCAN`).
async fn scanning_server(budget: usize, share_percent: u8) -> (TestServer, attache_server::pause::Pauses) {
    let pauses = attache_server::pause::Pauses::default();
    let given = pauses.clone();
    let s = TestServer::start_with(move |c| {
        c.max_read_bytes = 256 << 10;
        c.response_buffer_bytes = budget;
        c.budget_share_per_principal = share_percent;
        c.pauses = Some(given);
    })
    .await;
    (s, pauses)
}

/// One principal's scans of a long event log hold at most its share of the
/// response budget, from before they read a page: past it, its next scan is
/// 503 `RESPONSE_BUDGET_EXHAUSTED` at once (holding nothing), while another
/// principal still reads. Session 21's attack pass: every scan read its
/// 1 MiB page first and then waited for a turn to parse it, counted by no
/// budget; a principal that may see nothing held 3 GB with 3,000 long-polls,
/// and everyone's event reads waited behind its pages.
#[tokio::test]
async fn a_principals_scans_of_the_event_log_hold_at_most_its_share_and_others_still_read() {
    let (s, pauses) = scanning_server(2 << 20, 50).await;
    // Some 400 KB of alice's events: more than a large page.
    create_tasks(&s, ALICE, 500, &"e".repeat(500)).await;
    let held = pauses.arm(attache_server::pause::EVENTS_SCAN);
    let first = {
        let (client, url) = (s.client.clone(), s.url("/_attache/events"));
        tokio::spawn(async move {
            client.get(url).query(&[("offset", "-1")]).header("electric-principal", BOB).send().await.unwrap().status()
        })
    };
    held.reached().await;

    let (status, _, _) = read_events(&s, BOB, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "bob's second scan is past his share");
    let (status, events, _) = read_events(&s, ALICE, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::OK, "alice reads while bob's scan holds his share");
    assert!(!events.is_empty(), "alice's events");
    held.release();
    assert_eq!(first.await.unwrap(), StatusCode::OK, "bob's first scan goes on");
}

/// An SSE reader scanning the event log (64 KiB or more behind its tail)
/// takes room for its page from its principal's share as a catch-up does,
/// though its pages are small (64 KiB): while one of bob's SSE scans holds
/// its room, bob's catch-up past his share is 503, and alice still reads.
/// Session 21's second attack pass: SSE scans took no room and no parse
/// turn, and 2,000 of them that could see nothing held alice's read for
/// seconds.
#[tokio::test]
async fn an_sse_reader_scanning_the_event_log_takes_room_from_its_principals_share() {
    let (s, pauses) = scanning_server(1 << 20, 25).await;
    // Some 160 KB of alice's events: more than one SSE page.
    create_tasks(&s, ALICE, 200, &"e".repeat(500)).await;
    let held = pauses.arm(attache_server::pause::EVENTS_SCAN);
    let sse = {
        let (client, url) = (s.client.clone(), s.url("/_attache/events"));
        tokio::spawn(async move {
            let query = [("offset", "-1"), ("live", "sse")];
            // The response is kept open: dropped, its reader (and its room) would go.
            client.get(url).query(&query).header("electric-principal", BOB).send().await.unwrap()
        })
    };
    tokio::time::timeout(Duration::from_secs(10), held.reached()).await.expect("bob's SSE scan takes room");

    let (status, _, _) = read_events(&s, BOB, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "bob's catch-up is past his share");
    let (status, events, _) = read_events(&s, ALICE, &[("offset", "-1")]).await;
    assert_eq!(status, StatusCode::OK, "alice reads");
    assert!(!events.is_empty(), "alice's events");
    held.release();
    assert_eq!(sse.await.unwrap().status(), StatusCode::OK, "bob's SSE read goes on");
}
