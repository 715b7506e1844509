//! The real binary under process death: SIGKILL in the middle of concurrent
//! appends must lose nothing that was acknowledged and tear nothing; SIGTERM
//! must stop the server cleanly, answering the readers it holds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, ServerProcess};
use reqwest::StatusCode;

const STREAM: &str = "/crash/log";
const WRITERS: usize = 16;

/// One record: which writer, in which kill cycle, its number in that run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Record {
    writer: usize,
    cycle: usize,
    n: u64,
}

impl Record {
    fn line(&self) -> String {
        format!("w{}-c{}-{}\n", self.writer, self.cycle, self.n)
    }

    fn parse(line: &str) -> Option<Record> {
        let rest = line.strip_prefix('w')?;
        let mut parts = rest.split('-');
        let writer = parts.next()?.parse().ok()?;
        let cycle = parts.next()?.strip_prefix('c')?.parse().ok()?;
        let n = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Record { writer, cycle, n })
    }
}

/// Appends records until the server stops answering; returns how many it
/// sent (records 0..sent) and how many were acknowledged (0..acked).
async fn writer(url: String, writer: usize, cycle: usize, acks: Arc<Mutex<u64>>) -> (u64, u64) {
    let client = client();
    let mut n = 0;
    loop {
        let record = Record { writer, cycle, n };
        let res = client
            .post(format!("{url}{STREAM}"))
            .header("content-type", "application/octet-stream")
            .body(record.line())
            .send()
            .await;
        n += 1;
        match res {
            Ok(r) if r.status() == StatusCode::NO_CONTENT => *acks.lock().unwrap() += 1,
            // The connection died (or the server failed): this record may or may not be there.
            _ => return (n, n - 1),
        }
    }
}

/// Reads the whole stream (catch-up pages until up to date).
async fn read_stream(url: &str) -> Vec<u8> {
    let client = client();
    let mut offset = "-1".to_owned();
    let mut out = Vec::new();
    loop {
        let res = client.get(format!("{url}{STREAM}")).query(&[("offset", offset.as_str())]).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let done = res.headers().contains_key("stream-up-to-date");
        offset = res.headers()["stream-next-offset"].to_str().unwrap().to_owned();
        out.extend_from_slice(&res.bytes().await.unwrap());
        if done {
            return out;
        }
    }
}

/// Per (writer, cycle): how many records were sent and how many acknowledged.
type Ledger = BTreeMap<(usize, usize), (u64, u64)>;

/// Every acknowledged record is present exactly once and intact; every
/// present record was sent; each writer's records are a gap-free prefix
/// (a writer only sends record n+1 after n was acknowledged).
fn verify(body: &[u8], ledger: &Ledger) {
    let text = std::str::from_utf8(body).expect("the stream holds only the text we wrote");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the stream ends in a torn record: {:?}",
        &text[text.len().saturating_sub(40)..]
    );
    let mut seen: BTreeSet<Record> = BTreeSet::new();
    let mut per_run: BTreeMap<(usize, usize), Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let record = Record::parse(line).unwrap_or_else(|| panic!("torn record {line:?}"));
        assert!(seen.insert(record), "{record:?} is present twice");
        let (sent, _) =
            ledger.get(&(record.writer, record.cycle)).unwrap_or_else(|| panic!("{record:?} was never sent"));
        assert!(record.n < *sent, "{record:?} was never sent");
        per_run.entry((record.writer, record.cycle)).or_default().push(record.n);
    }
    for (run, (_, acked)) in ledger {
        let present = per_run.remove(run).unwrap_or_default();
        let prefix: Vec<u64> = (0..present.len() as u64).collect();
        assert_eq!(present, prefix, "writer {run:?} is not an in-order prefix");
        assert!(
            present.len() as u64 >= *acked,
            "writer {run:?}: {acked} acknowledged, only {} survived",
            present.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_append_and_tears_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::start(&data, &log, &[]).await;
    let created =
        client().put(server.url(STREAM)).header("content-type", "application/octet-stream").send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    let mut ledger = Ledger::new();
    for cycle in 0..3 {
        let acks = Arc::new(Mutex::new(0u64));
        let writers: Vec<_> =
            (0..WRITERS).map(|w| tokio::spawn(writer(server.url(""), w, cycle, acks.clone()))).collect();
        // Let them write for about a second, and at least until some succeed.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1)
            || (*acks.lock().unwrap() < WRITERS as u64 && started.elapsed() < Duration::from_secs(20))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.sigkill();
        for (w, handle) in writers.into_iter().enumerate() {
            let counts = tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("every writer notices the dead server")
                .unwrap();
            ledger.insert((w, cycle), counts);
        }
        assert!(*acks.lock().unwrap() > 0, "no append succeeded in cycle {cycle}");

        server = ServerProcess::start(&data, &log, &[]).await;
        verify(&read_stream(&server.url("")).await, &ledger);
    }
    // Writers ran right up to each kill, so recovery went through the write-ahead log.
    assert!(
        server.log_text().contains("replayed the write-ahead log"),
        "no restart replayed the log; log:\n{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_waiting_long_poll_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::start(&data, &log, &["--long-poll-timeout", "60s"]).await;
    let client = client();
    let url = server.url("/term");
    let created = client.put(&url).header("content-type", "text/plain").body("before").send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let tail = created.headers()["stream-next-offset"].to_str().unwrap().to_owned();

    let reader = tokio::spawn(client.get(&url).query(&[("offset", tail.as_str()), ("live", "long-poll")]).send());
    // Give the reader time to be waiting inside the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!reader.is_finished(), "the long-poll should be waiting");
    server.sigterm();

    let answered = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the waiting reader is answered at shutdown")
        .unwrap()
        .expect("the reader gets a response, not a dropped connection");
    assert_eq!(answered.status(), StatusCode::NO_CONTENT);
    assert_eq!(answered.headers()["stream-next-offset"].to_str().unwrap(), tail);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no exit within 5s; log:\n{}", server.log_text()));
    assert!(status.success(), "exit {status}; log:\n{}", server.log_text());

    // A clean stop leaves the data readable by the next server.
    let server = ServerProcess::start(&data, &log, &[]).await;
    assert_eq!(read_stream_at(&server.url(""), "/term").await, b"before");
}

async fn read_stream_at(url: &str, path: &str) -> Vec<u8> {
    let res = client().get(format!("{url}{path}")).query(&[("offset", "-1")]).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.bytes().await.unwrap().to_vec()
}
