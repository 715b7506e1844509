//! `sse-fanout`: N SSE subscribers on one JSON stream, one append per round, the time from
//! just before the append is sent to the moment each subscriber has the `data` event that
//! carries it.
//!
//! The subscribers connect once (`GET path?offset=<tail>&live=sse`) and stay connected
//! across rounds; when a server ends an SSE response, the subscriber reconnects from the
//! last `streamNextOffset` it was given (counted as a reconnect). Each subscriber stamps the
//! moment it parsed a data event and sends (round, instant) to the coordinator, so the
//! coordinator's own scheduling does not add to the latency. The server's VmRSS is sampled
//! before the subscribers connect and, every round, with all of them connected.
//!
//! Only talks to the address given (meant for loopback). Bounded in count and time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::{authority, connect, message, pct, request, vm_rss_kb, Args, BoxErr};

/// Splits an SSE byte stream into (event, data) pairs.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<(String, String)>) {
        self.buf.extend_from_slice(chunk);
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let (mut event, mut data) = (String::new(), Vec::new());
            for line in text.lines() {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !event.is_empty() || !data.is_empty() {
                out.push((event, data.join("\n")));
            }
        }
    }
}

/// What a subscriber tells the coordinator.
enum Note {
    /// A response head with status 200 arrived (first connect or a reconnect).
    Connected,
    /// The message numbered `round` arrived at `at`.
    Got { round: usize, at: Instant },
    /// The server ended the response or the connection failed; the subscriber reconnects.
    Reconnect,
    /// A non-200 answer (the subscriber retries after 500 ms).
    Refused,
}

async fn subscriber(host: String, path: String, mut offset: String, tx: mpsc::UnboundedSender<Note>) {
    let mut sender = None;
    loop {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(&host).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = tx.send(Note::Reconnect);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let q = format!("{path}?offset={offset}&live=sse");
        let Ok(req) =
            Request::builder().method(Method::GET).uri(&q).header("host", &host).body(Full::new(Bytes::new()))
        else {
            return;
        };
        if s.ready().await.is_err() {
            let _ = tx.send(Note::Reconnect);
            continue;
        }
        let res = match s.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                let _ = tx.send(Note::Reconnect);
                continue;
            }
        };
        if res.status() != StatusCode::OK {
            let _ = tx.send(Note::Refused);
            let _ = res.into_body().collect().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            sender = Some(s);
            continue;
        }
        if tx.send(Note::Connected).is_err() {
            return;
        }
        let mut body = res.into_body();
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut clean_end = true;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                clean_end = false;
                break;
            };
            let Some(data) = frame.data_ref() else { continue };
            parser.push(data, &mut events);
            let at = Instant::now();
            for (event, data) in events.drain(..) {
                match event.as_str() {
                    "data" => {
                        if let Ok(Value::Array(msgs)) = serde_json::from_str::<Value>(&data) {
                            for m in msgs {
                                if let Some(i) = m.get("i").and_then(Value::as_u64) {
                                    if tx.send(Note::Got { round: i as usize, at }).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    "control" => {
                        if let Ok(c) = serde_json::from_str::<Value>(&data) {
                            if let Some(o) = c.get("streamNextOffset").and_then(Value::as_str) {
                                offset = o.to_owned();
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if tx.send(Note::Reconnect).is_err() {
            return;
        }
        if clean_end && !s.is_closed() {
            sender = Some(s);
        }
    }
}

pub(crate) async fn sse_fanout(a: &Args) -> Result<(), BoxErr> {
    let host = authority(&a.url);
    let path = if a.path.is_empty() { format!("/bench/sse-fanout-{}", std::process::id()) } else { a.path.clone() };

    // Create the stream and seed it with message 0.
    let mut writer = connect(&host).await?;
    let r = request(&mut writer, &host, Method::PUT, &path, Some("application/json"), Bytes::new()).await?;
    if !(r.status == StatusCode::CREATED || r.status == StatusCode::OK) {
        return Err(format!("PUT {path} -> {}", r.status).into());
    }
    let r = request(&mut writer, &host, Method::POST, &path, Some("application/json"), Bytes::from(message(0, 150)))
        .await?;
    let tail = r.next_offset.ok_or("no Stream-Next-Offset on POST")?;

    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = a.pid.and_then(vm_rss_kb);

    // Subscribers connect 100 at a time (listen backlogs).
    let (tx, mut rx) = mpsc::unbounded_channel::<Note>();
    let mut subs = JoinSet::new();
    let t_conn = Instant::now();
    let mut connected = 0usize;
    let (mut reconnects, mut refused) = (0usize, 0usize);
    let mut stray: Vec<(usize, Instant)> = Vec::new();
    let connect_deadline = Instant::now() + Duration::from_secs(a.round_timeout_s);
    while subs.len() < a.readers {
        let batch = (a.readers - subs.len()).min(100);
        for _ in 0..batch {
            subs.spawn(subscriber(host.clone(), path.clone(), tail.clone(), tx.clone()));
        }
        let target = subs.len();
        while connected < target {
            let left = connect_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Note::Connected)) => connected += 1,
                Ok(Some(Note::Reconnect)) => reconnects += 1,
                Ok(Some(Note::Refused)) => refused += 1,
                Ok(Some(Note::Got { round, at })) => stray.push((round, at)),
                Ok(None) => return Err("subscribers gone".into()),
                Err(_) => {
                    subs.abort_all();
                    return Err(format!(
                        "only {connected} of {} subscribers connected within {}s",
                        a.readers, a.round_timeout_s
                    )
                    .into());
                }
            }
        }
    }
    drop(tx);
    eprintln!("[sse-fanout] {} subscribers connected in {:?}", a.readers, t_conn.elapsed());

    let mut all: Vec<f64> = Vec::with_capacity(a.readers * a.rounds);
    let mut rss_samples: Vec<u64> = Vec::new();
    let mut misses = 0usize;
    let mut post_ms = Vec::new();
    for round in 1..=a.rounds {
        tokio::time::sleep(Duration::from_millis(if round == 1 { a.settle_ms } else { 100 })).await;
        if let Some(kb) = a.pid.and_then(vm_rss_kb) {
            rss_samples.push(kb);
        }
        // Receipts of earlier rounds that arrived late are not this round's.
        while let Ok(n) = rx.try_recv() {
            match n {
                Note::Reconnect => reconnects += 1,
                Note::Refused => refused += 1,
                Note::Connected => {}
                Note::Got { .. } => {}
            }
        }
        let t0 = Instant::now();
        let body = Bytes::from(message(round, 150));
        let pr = match request(&mut writer, &host, Method::POST, &path, Some("application/json"), body.clone()).await {
            Ok(r) => r,
            Err(_) => {
                writer = connect(&host).await?;
                request(&mut writer, &host, Method::POST, &path, Some("application/json"), body).await?
            }
        };
        post_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if !pr.status.is_success() {
            return Err(format!("append in round {round} -> {}", pr.status).into());
        }
        let mut lat = Vec::with_capacity(a.readers);
        let deadline = t0 + Duration::from_secs(a.round_timeout_s);
        while lat.len() < a.readers {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Note::Got { round: r, at })) if r == round => {
                    lat.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3)
                }
                Ok(Some(Note::Got { .. })) => {}
                Ok(Some(Note::Reconnect)) => reconnects += 1,
                Ok(Some(Note::Refused)) => refused += 1,
                Ok(Some(Note::Connected)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        misses += a.readers - lat.len();
        lat.sort_by(|x, y| x.total_cmp(y));
        eprintln!(
            "[sse-fanout] round {:>2}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms post={:.2}ms rss={}",
            round,
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
            post_ms.last().copied().unwrap_or(f64::NAN),
            rss_samples.last().map(|k| format!("{:.1}MiB", *k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
        );
        all.extend(lat);
    }
    subs.abort_all();

    all.sort_by(|x, y| x.total_cmp(y));
    let rss_max = rss_samples.iter().copied().max();
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "null".into());
    let num = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "null".into() };
    let json = format!(
        "{{\"readers\":{},\"rounds\":{},\"samples\":{},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"mean_ms\":{},\"misses\":{},\"reconnects\":{},\"refused\":{},\"stray\":{},\"rss_before_kb\":{},\"rss_wait_kb_max\":{}}}",
        a.readers,
        a.rounds,
        all.len(),
        num(pct(&all, 0.5)),
        num(pct(&all, 0.99)),
        num(all.last().copied().unwrap_or(f64::NAN)),
        num(if all.is_empty() { f64::NAN } else { all.iter().sum::<f64>() / all.len() as f64 }),
        misses,
        reconnects,
        refused,
        stray.len(),
        opt(rss_before),
        opt(rss_max),
    );
    println!("{json}");
    if let Some(p) = &a.json_out {
        std::fs::write(p, format!("{json}\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_joins_an_event_split_across_chunks() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"event: data\ndata: [{\"i\":1}", &mut out);
        assert!(out.is_empty());
        p.push(b"]\n\nevent: control\ndata: {\"streamNextOffset\":\"x\"}\n\n", &mut out);
        assert_eq!(
            out,
            vec![
                ("data".to_string(), "[{\"i\":1}]".to_string()),
                ("control".to_string(), "{\"streamNextOffset\":\"x\"}".to_string()),
            ]
        );
    }
}
