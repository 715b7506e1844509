//! The client commands driven as a process (`attache put|get|ls|rm|tail|send|rpc|entity`)
//! against a real server started in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use attache_server::{Server, ServerConfig};
use serde_json::Value;
use tempfile::TempDir;

fn binary() -> PathBuf {
    std::env::var_os("ATTACHE_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_attache")))
}

struct Running {
    server: Option<Server>,
    addr: SocketAddr,
    config: ServerConfig,
    _dir: TempDir,
}

impl Running {
    async fn start() -> Running {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
        config.long_poll_timeout = Duration::from_secs(1);
        config.durable = false;
        let server = Server::start(config.clone()).await.unwrap();
        Running { addr: server.addr, server: Some(server), config, _dir: dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops and starts again on the same port and data dir.
    async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let mut config = self.config.clone();
        config.listen = self.addr;
        for _ in 0..50 {
            if let Ok(s) = Server::start(config.clone()).await {
                self.server = Some(s);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server does not restart");
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(args)
            .env("ATTACHE_URL", self.url())
            .env_remove("ATTACHE_PRINCIPAL")
            .env_remove("ATTACHE_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Output {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .expect("the command finishes")
            .expect("the binary runs");
        out
    }

    /// Runs and insists on success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "attache {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        serde_json::from_str(&self.ok(&with_json).await).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn put_ls_get_with_a_range_and_rm_round_trip_an_attachment() {
    let s = Running::start().await;
    s.ok(&["entity", "spawn", "/chat/cli"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cat.png");
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();

    let entry = s
        .json(&[
            "put",
            "/chat/cli",
            file.to_str().unwrap(),
            "--id",
            "cat",
            "--subject",
            "inbox:m1",
            "--meta",
            r#"{"caption":"a cat"}"#,
        ])
        .await;
    assert_eq!(entry["id"], "cat");
    assert_eq!(entry["mimeType"], "image/png");
    assert_eq!(entry["byteLength"], 5000);
    assert_eq!(entry["subject"]["key"], "m1");
    assert_eq!(entry["meta"]["caption"], "a cat");
    // Without --json, the id alone is printed, for scripts.
    let plain = s.run(&["put", "chat/cli", file.to_str().unwrap(), "--role", "output"]).await;
    assert!(plain.status.success());
    let id = String::from_utf8(plain.stdout.clone()).unwrap();
    assert!(!id.trim().is_empty() && id.trim() != "cat");
    let note = stderr(&plain);
    // No --subject: put picks one (the server requires it, as Electric does) and says which.
    assert_eq!(note.lines().next(), Some("no --subject given: the attachment is about context:cat.png"), "{note:?}");
    assert!(note.lines().nth(1).is_some_and(|l| l.starts_with("uploaded ")), "{note:?}");
    assert_eq!(note.lines().count(), 2, "no progress bar when piped: {note:?}");

    let listing = s.json(&["ls", "/chat/cli"]).await;
    assert_eq!(listing.as_array().unwrap().len(), 2);
    let table = s.ok(&["ls", "/chat/cli"]).await;
    assert!(table.starts_with("ID") && table.contains("cat") && table.contains("inbox:m1"), "{table}");

    let whole = dir.path().join("whole.png");
    let wrote = s.json(&["get", "/chat/cli", "cat", "-o", whole.to_str().unwrap()]).await;
    assert_eq!(wrote["bytes"], 5000);
    assert_eq!(std::fs::read(&whole).unwrap(), bytes);
    let part = s.run(&["get", "/chat/cli", "cat", "--range", "100-199"]).await;
    assert!(part.status.success());
    assert_eq!(part.stdout, &bytes[100..200], "a range goes to stdout when no file is given");

    s.ok(&["rm", "/chat/cli", "cat"]).await;
    let gone = s.run(&["get", "/chat/cli", "cat"]).await;
    assert_eq!(gone.status.code(), Some(3), "not found: {}", stderr(&gone));
    assert!(stderr(&gone).contains("Attachment not found"), "{}", stderr(&gone));
}

#[tokio::test]
async fn put_reads_stdin_and_resumable_puts_complete() {
    let s = Running::start().await;
    s.ok(&["entity", "spawn", "/chat/stdin"]).await;
    let mut cmd = s.command(&["put", "/chat/stdin", "-", "--id", "piped", "--mime-type", "text/plain", "--json"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello from a pipe").await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let entry: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entry["byteLength"], 17);
    assert_eq!(
        entry["subject"],
        serde_json::json!({"type": "context", "key": "piped"}),
        "the id keys the default subject"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let entry = s.json(&["put", "/chat/stdin", file.to_str().unwrap(), "--id", "big", "--resumable"]).await;
    assert_eq!((entry["status"].as_str(), entry["byteLength"].as_u64()), (Some("complete"), Some(100_000)));
}

#[tokio::test]
async fn a_resumable_put_rerun_with_another_file_exits_5_and_the_first_file_still_completes_and_reruns_as_done() {
    let s = Running::start().await;
    s.ok(&["entity", "spawn", "/chat/resume"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
    let a_bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&a, &a_bytes).unwrap();
    std::fs::write(&b, vec![1u8; 1000]).unwrap();

    // A first `put --resumable` of A that died after its first chunk: begun as
    // the CLI begins it (same principal, same input), 64 KiB appended.
    let client = attache_client::RuntimeServerClient::new(&s.url()).unwrap();
    let entity = attache_client::EntityUrl::parse("/chat/resume").unwrap();
    let input = attache_client::AttachmentInput::file(&a)
        .id("big")
        .subject(attache_client::Subject::new("context", "big").unwrap());
    let pending = client.begin_resumable_upload(&entity, "big", &input).await.unwrap();
    let mut producer =
        attache_client::IdempotentProducer::new(&client, &pending.stream_path, &pending.mime_type, "dying", 0).unwrap();
    let held = producer.append(a_bytes[..65_536].to_vec()).await.unwrap().next_offset;

    let out = s.run(&["put", "/chat/resume", b.to_str().unwrap(), "--id", "big", "--resumable"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not match this input"), "{}", stderr(&out));
    let info = client.head_stream(&pending.stream_path).await.unwrap();
    assert_eq!((info.next_offset, info.closed), (held, false), "nothing appended, not closed");
    assert_eq!(
        client.get_attachment(&entity, "big").await.unwrap().unwrap().status,
        attache_client::AttachmentStatus::Pending
    );

    let entry = s.json(&["put", "/chat/resume", a.to_str().unwrap(), "--id", "big", "--resumable"]).await;
    assert_eq!((entry["status"].as_str(), entry["byteLength"].as_u64()), (Some("complete"), Some(200_000)));
    let copy = dir.path().join("copy.bin");
    s.ok(&["get", "/chat/resume", "big", "-o", copy.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(&copy).unwrap(), a_bytes);

    // Run again once complete (its answer lost, say): the same file is done
    // (exit 0, the complete entry); another file is still a conflict (5).
    let again = s.json(&["put", "/chat/resume", a.to_str().unwrap(), "--id", "big", "--resumable"]).await;
    assert_eq!((again["status"].as_str(), again["byteLength"].as_u64()), (Some("complete"), Some(200_000)));
    let other = s.run(&["put", "/chat/resume", b.to_str().unwrap(), "--id", "big", "--resumable"]).await;
    assert_eq!(other.status.code(), Some(5), "{}", stderr(&other));
}

#[tokio::test]
async fn send_attaches_files_and_tail_once_shows_the_inbox_and_manifest_rows() {
    let s = Running::start().await;
    s.ok(&["entity", "spawn", "/chat/send", "--principal", "user:sam"]).await;
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.jpg");
    std::fs::write(&a, "aaa").unwrap();
    std::fs::write(&b, "bbbb").unwrap();
    let sent = s
        .json(&[
            "send",
            "/chat/send",
            "look at these",
            "--attach",
            a.to_str().unwrap(),
            "--attach",
            b.to_str().unwrap(),
            "--key",
            "m1",
            "--principal",
            "user:sam",
        ])
        .await;
    assert_eq!(sent["receipt"]["key"], "m1");
    assert_eq!(sent["attachments"].as_array().unwrap().len(), 2);

    let rows = s.ok(&["tail", "/chat/send", "--once", "--principal", "user:sam"]).await;
    let rows: Vec<Value> = rows.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let inbox: Vec<&Value> = rows.iter().filter(|r| r["type"] == "inbox").collect();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0]["value"]["payload"]["text"], "look at these");
    let complete = rows.iter().filter(|r| r["type"] == "manifest" && r["value"]["status"] == "complete").count();
    assert_eq!(complete, 2);

    // A send that fails leaves nothing behind: the key is taken.
    let again = s
        .run(&["send", "/chat/send", "dup", "--attach", a.to_str().unwrap(), "--key", "m1", "--principal", "user:sam"])
        .await;
    assert_eq!(again.status.code(), Some(5), "{}", stderr(&again));
    let listing = s.json(&["ls", "/chat/send", "--principal", "user:sam"]).await;
    assert_eq!(listing.as_array().unwrap().len(), 2, "the upload of the failed send was rolled back");
}

#[tokio::test]
async fn tail_follows_a_stream_live_and_resumes_after_the_server_restarts() {
    let mut s = Running::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/logs/live", s.url());
    let res = client.put(&url).header("content-type", "text/plain").send().await.unwrap();
    assert!(res.status().is_success());
    let post = |body: &'static str| {
        let (url, client) = (url.clone(), client.clone());
        async move {
            let res = client.post(url).header("content-type", "text/plain").body(body).send().await.unwrap();
            assert!(res.status().is_success());
        }
    };
    post("one\n").await;
    let mut cmd = s.command(&["tail", "/logs/live"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.restart().await;
    post("two\n").await;
    let close = client.post(format!("{}/logs/live", s.url())).header("stream-closed", "true").send().await.unwrap();
    assert!(close.status().is_success());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is closed"), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "one\ntwo\n");
}

#[tokio::test]
async fn entity_commands_spawn_get_grant_and_stop() {
    let s = Running::start().await;
    let spawned = s
        .json(&[
            "entity",
            "spawn",
            "/notes/n1",
            "--tag",
            "team=core",
            "--grant",
            "user:ann=read",
            "--principal",
            "user:sam",
        ])
        .await;
    assert_eq!(spawned["url"], "/notes/n1");
    assert_eq!(spawned["tags"]["team"], "core");
    let seen = s.json(&["entity", "get", "/notes/n1", "--principal", "user:ann"]).await;
    assert_eq!(seen["status"], "idle");
    let denied = s.run(&["entity", "stop", "/notes/n1", "--principal", "user:ann"]).await;
    assert_eq!(denied.status.code(), Some(4), "{}", stderr(&denied));
    assert!(stderr(&denied).contains("grant"), "the error says what to do: {}", stderr(&denied));
    let grant = s.json(&["entity", "grant", "/notes/n1", "agent", "write", "--principal", "user:sam"]).await;
    assert_eq!((grant["subject_kind"].as_str(), grant["permission"].as_str()), (Some("principal_kind"), Some("write")));
    let grants = s.json(&["entity", "grants", "/notes/n1", "--principal", "user:sam"]).await;
    assert_eq!(grants.as_array().unwrap().len(), 2);
    let gid = grant["id"].to_string();
    s.ok(&["entity", "revoke", "/notes/n1", &gid, "--principal", "user:sam"]).await;
    s.ok(&["entity", "stop", "/notes/n1", "--principal", "user:sam"]).await;
    assert_eq!(s.json(&["entity", "get", "/notes/n1", "--principal", "user:sam"]).await["status"], "stopped");
    let late = s.run(&["send", "/notes/n1", "hello?", "--principal", "user:sam"]).await;
    assert_eq!(late.status.code(), Some(5));
    assert!(stderr(&late).contains("stopped"), "{}", stderr(&late));
}

#[tokio::test]
async fn entity_fork_forks_at_a_caught_up_offset_under_a_parent_and_spawn_takes_a_parent() {
    let s = Running::start().await;
    let sam = ["--principal", "user:sam"];
    let with = |args: &[&'static str]| [args, &sam[..]].concat();
    s.ok(&with(&["entity", "spawn", "/notes/p"])).await;
    let child = s.json(&with(&["entity", "spawn", "/notes/c", "--parent", "/notes/p"])).await;
    assert_eq!(child["parent"], "/notes/p", "{child}");
    let missing = s.run(&with(&["entity", "spawn", "/notes/orphan", "--parent", "/notes/nowhere"])).await;
    assert_eq!(missing.status.code(), Some(3), "{}", stderr(&missing));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.txt");
    std::fs::write(&file, b"early bytes").unwrap();
    let file = file.to_str().unwrap();
    s.ok(&[&with(&["put", "/notes/c"])[..], &[file, "--id", "early"]].concat()).await;
    // Where a reader caught up is an offset the fork may start from.
    let caught = s.run(&with(&["tail", "/notes/c", "--once"])).await;
    assert!(caught.status.success(), "{}", stderr(&caught));
    let note = stderr(&caught);
    let at = note.split("caught up at offset ").nth(1).and_then(|r| r.split(' ').next()).expect(&note).to_owned();
    s.ok(&[&with(&["put", "/notes/c"])[..], &[file, "--id", "late"]].concat()).await;

    let forked = s
        .json(
            &[
                &with(&["entity", "fork", "/notes/c", "--id", "then", "--parent", "/notes/p", "--tag", "k=v"])[..],
                &["--at", &at],
            ]
            .concat(),
        )
        .await;
    assert_eq!(forked["root"]["url"], "/notes/then", "{forked}");
    assert_eq!(forked["root"]["parent"], "/notes/p", "{forked}");
    assert_eq!(forked["root"]["tags"]["k"], "v", "{forked}");
    assert_eq!(forked["entities"].as_array().map(Vec::len), Some(1), "{forked}");
    let carried = s.json(&with(&["ls", "/notes/then"])).await;
    let ids: Vec<&str> = carried.as_array().unwrap().iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["early"], "the fork has what the source had at --at");

    // Without --json: the fork's URL on stdout (named by the server), a remark on stderr.
    let plain = s.run(&with(&["entity", "fork", "/notes/c"])).await;
    assert!(plain.status.success(), "{}", stderr(&plain));
    let url = String::from_utf8(plain.stdout.clone()).unwrap();
    assert!(url.trim().starts_with("/notes/c-fork-"), "{url}");
    assert!(stderr(&plain).starts_with(&format!("forked /notes/c into {}", url.trim())), "{}", stderr(&plain));

    // An offset inside a message is refused (exit 6, the server's reason); --sub-offset needs --at.
    let inside =
        s.run(&with(&["entity", "fork", "/notes/c", "--id", "bad", "--at", "0000000000000000_0000000000000001"])).await;
    assert_eq!(inside.status.code(), Some(6), "{}", stderr(&inside));
    assert!(stderr(&inside).contains("inside a message"), "{}", stderr(&inside));
    let usage = s.run(&with(&["entity", "fork", "/notes/c", "--sub-offset", "1"])).await;
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    assert_eq!(s.run(&with(&["entity", "get", "/notes/bad"])).await.status.code(), Some(3), "nothing was made");
}

#[tokio::test]
async fn rpc_calls_task_methods_and_reports_rpc_errors_with_their_own_exit_code() {
    let s = Running::start().await;
    let task = s.json(&["rpc", "task.create", r#"{"text":"from the shell","priority":60}"#]).await;
    assert_eq!(task["status"], "pending");
    let id = task["id"].as_str().unwrap();
    let got = s.json(&["rpc", "task.get", &format!(r#"{{"id":"{id}"}}"#)]).await;
    assert_eq!(got["text"], "from the shell");
    let unknown = s.run(&["rpc", "task.nope"]).await;
    assert_eq!(unknown.status.code(), Some(9), "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("Method not found"), "{}", stderr(&unknown));
}

#[tokio::test]
async fn failures_read_as_sentences_with_exit_codes_that_say_what_happened() {
    let s = Running::start().await;
    let bad_meta = s.run(&["put", "/chat/x", "/dev/null", "--meta", "[1]"]).await;
    assert_eq!(bad_meta.status.code(), Some(2), "{}", stderr(&bad_meta));
    assert!(stderr(&bad_meta).contains("--meta must be a JSON object"));
    let bad_entity = s.run(&["ls", "nonsense"]).await;
    assert_eq!(bad_entity.status.code(), Some(2));
    assert!(stderr(&bad_entity).contains("/TYPE/ID"), "{}", stderr(&bad_entity));
    let missing = s.run(&["ls", "/chat/missing"]).await;
    assert_eq!(missing.status.code(), Some(3));
    assert!(stderr(&missing).starts_with("error: Entity not found at /chat/missing"), "{}", stderr(&missing));

    let down = tokio::process::Command::new(binary())
        .args(["ls", "/chat/x", "--server", "http://127.0.0.1:9"])
        .env_remove("ATTACHE_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(7));
    let text = stderr(&down);
    assert!(
        text.contains("cannot reach the attache server at http://127.0.0.1:9") && text.contains("ATTACHE_URL"),
        "{text}"
    );
}

#[tokio::test]
async fn token_mode_servers_take_the_token_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    config.auth = Some(attache_server::auth::AuthMode::Token);
    config.durable = false;
    let server = Server::start(config).await.unwrap();
    let url = format!("http://{}", server.addr);
    let made = tokio::process::Command::new(binary())
        .args(["token", "create", "--principal", "user:sam", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let token = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let run = |token: Option<&str>| {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(["entity", "spawn", "/chat/tok", "--json"]).env("ATTACHE_URL", &url).env_remove("ATTACHE_TOKEN");
        if let Some(t) = token {
            cmd.env("ATTACHE_TOKEN", t);
        }
        cmd.output()
    };
    let refused = run(None).await.unwrap();
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--token"), "{}", stderr(&refused));
    // An empty ATTACHE_TOKEN is no token (it was sent as an empty Bearer and refused as malformed).
    let empty = run(Some("")).await.unwrap();
    assert_eq!(empty.status.code(), Some(4), "{}", stderr(&empty));
    assert!(!stderr(&empty).contains("must be a Bearer token"), "{}", stderr(&empty));
    let spawned = run(Some(&token)).await.unwrap();
    assert!(spawned.status.success(), "{}", stderr(&spawned));
    let entity: Value = serde_json::from_slice(&spawned.stdout).unwrap();
    assert_eq!(entity["created_by"], "/principal/user%3Asam");
    server.stop().await;
}

#[tokio::test]
async fn with_json_a_failed_command_prints_one_error_document_on_stdout() {
    let s = Running::start().await;
    let missing = s.run(&["ls", "/chat/missing", "--json"]).await;
    assert_eq!(missing.status.code(), Some(3), "{}", stderr(&missing));
    let doc: Value = serde_json::from_slice(&missing.stdout).expect("stdout holds one JSON document");
    assert_eq!((doc["error"]["status"].as_u64(), doc["error"]["exit_code"].as_i64()), (Some(404), Some(3)), "{doc}");
    assert!(doc["error"]["message"].as_str().unwrap_or_default().contains("/chat/missing"), "{doc}");
    let rpc = s.run(&["rpc", "task.get", r#"{"id":"t-none"}"#, "--json"]).await;
    assert_eq!(rpc.status.code(), Some(9), "{}", stderr(&rpc));
    let doc: Value = serde_json::from_slice(&rpc.stdout).expect("stdout holds one JSON document");
    assert_eq!(doc["error"]["method"], "task.get", "{doc}");
    assert!(doc["error"]["rpc_code"].is_i64(), "{doc}");
}

#[tokio::test]
async fn tail_of_a_path_with_no_stream_and_no_entity_says_it_looked_for_both() {
    let s = Running::start().await;
    let out = s.run(&["tail", "/demo/nothing", "--once"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no stream and no entity your principal may read at /demo/nothing"),
        "{}",
        stderr(&out)
    );
}
