//! Flags of `attache serve` that shape what a client gets, on the real binary.

mod common;

use common::{client, ServerProcess};
use reqwest::StatusCode;

/// `--max-read-bytes` bounds one stream read (whole JSON messages, at least
/// one): a read past it says it is not up to date, and the next read from
/// its offset goes on. The docs name this flag; before session 18 it did not
/// exist (the bound was fixed at 1 MiB).
#[tokio::test]
async fn a_stream_read_answers_at_most_max_read_bytes_and_goes_on_from_its_offset() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("server.log");
    let server = ServerProcess::start(&dir.path().join("data"), &log, &["--max-read-bytes", "1024"]).await;
    let stream = server.url("/flags/read");
    let res = client().put(&stream).header("content-type", "application/json").send().await.expect("a create");
    assert_eq!(res.status(), StatusCode::CREATED);
    let message = format!("\"{}\"", "m".repeat(600));
    for _ in 0..3 {
        let res = client()
            .post(&stream)
            .header("content-type", "application/json")
            .body(message.clone())
            .send()
            .await
            .expect("an append");
        assert!(res.status().is_success(), "{}", res.status());
    }
    let mut offset = "-1".to_owned();
    let mut pages = Vec::new();
    loop {
        let res = client().get(format!("{stream}?offset={offset}")).send().await.expect("a read");
        assert_eq!(res.status(), StatusCode::OK);
        let up_to_date = res.headers().contains_key("stream-up-to-date");
        offset = res.headers()["stream-next-offset"].to_str().expect("an offset").to_owned();
        let page: Vec<String> = res.json().await.expect("a JSON page");
        pages.push(page.len());
        if up_to_date {
            break;
        }
        assert!(pages.len() < 10, "the reads never reached the tail: {pages:?}");
    }
    // 600-byte messages, at most 1,024 bytes a read: one message each.
    assert_eq!(pages, vec![1, 1, 1], "pages of whole messages within the bound");

    let refused = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--max-read-bytes", "0", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .expect("the binary runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("max_read_bytes must be at least 1"));
}

/// A refused setting is a one-line message and a failed exit, never a stack
/// trace, even when the operator's shell sets RUST_BACKTRACE (session 19's
/// attack pass: an invalid `--allow-host` printed anyhow's backtrace).
#[test]
fn a_refused_setting_is_one_message_without_a_stack_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--allow-host", "bad host!", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--allow-host \"bad host!\" is not a host name"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "no stack trace: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// A second server on a data dir a running one holds is refused in one line
/// that says why once (the store's reason was printed twice, as the error's
/// message and again as its cause: helper-99's new-user pass, session 21).
#[tokio::test]
async fn a_second_server_on_a_held_data_dir_is_refused_saying_why_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let _running = common::ServerProcess::start(&data, &dir.path().join("first.log"), &[]).await;
    let refused = std::process::Command::new(common::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .expect("the binary runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.matches("in use by another attache process").count(), 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}
