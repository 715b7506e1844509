//! Benchmark helper for Durable Streams servers (attache and the Node reference).
//!
//! Subcommands:
//!
//!   fill   --url http://127.0.0.1:PORT --path /bench/x --count 1000 [--msg-bytes 60]
//!          Creates a JSON stream and appends `count` small JSON messages, one POST each
//!          (sequential, keep-alive). Prints `mid=<offset after count/2> tail=<offset>`.
//!
//!   fill-many --url URL --path /bench/many --streams 1000 --count 250 [--msg-bytes 150]
//!          [--batch 25] [--content-type application/json] [--conns 8]
//!          Creates streams PATH/0 .. PATH/(streams-1) and appends `count` messages to each
//!          (JSON: `batch` messages per POST as one array; other types: `batch` chunks of
//!          `msg-bytes` per POST), over `conns` connections. Every stream gets the same
//!          messages. Prints `streams=N first_get_bytes=B messages=M` (one GET offset=-1 of
//!          PATH/0: its body size and, for JSON, its message count).
//!
//!   sse-fanout --url URL [--path PATH] [--readers 1000] [--rounds 20] [--settle-ms 1000]
//!          [--pid PID] [--json-out FILE]
//!          Like `fanout`, with SSE subscribers (`live=sse`) that stay connected across
//!          rounds; see `sse.rs`.
//!
//!   soak   --url http://127.0.0.1:PORT --pid PID [--duration 30m] ...
//!          A long mixed load with the server's memory sampled; see `soak.rs` and bench/soak.sh.
//!
//!   fanout --url http://127.0.0.1:PORT [--path /bench/fanout] [--readers 1000] [--rounds 20]
//!          [--settle-ms 1000] [--pid PID] [--json-out FILE]
//!          Opens `readers` keep-alive connections. Each round: every reader issues
//!          `GET path?offset=<tail>&live=long-poll`; after `settle-ms` the server's VmRSS is
//!          sampled (if --pid), then one message is appended on a separate connection and
//!          the time from just before that POST is written to the moment each reader has
//!          received its complete response is recorded. Reports p50/p99/max over all
//!          rounds and readers.
//!
//! Only talks to the address given (meant for loopback). Bounded in count and time.

mod soak;
mod sse;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

pub(crate) type Sender = SendRequest<Full<Bytes>>;
pub(crate) type BoxErr = Box<dyn std::error::Error + Send + Sync>;

pub(crate) struct Resp {
    pub(crate) status: StatusCode,
    pub(crate) next_offset: Option<String>,
    pub(crate) body_len: usize,
    pub(crate) body: Bytes,
}

fn usage() -> ! {
    eprintln!(
        "usage:\n  fanout fill --url URL --path PATH --count N [--msg-bytes B]\n  \
         fanout fanout --url URL [--path PATH] [--readers N] [--rounds R] [--settle-ms MS] [--pid PID] [--json-out FILE]\n  \
         fanout sse-fanout --url URL [--path PATH] [--readers N] [--rounds R] [--settle-ms MS] [--pid PID] [--json-out FILE]\n  \
         fanout fill-many --url URL --path PREFIX --streams N --count M [--msg-bytes B] [--batch K] [--content-type T] [--conns C]\n  \
         fanout soak --url URL --pid PID [--duration 30m] ... (fanout soak --help)"
    );
    std::process::exit(2)
}

pub(crate) struct Args {
    cmd: String,
    url: String,
    path: String,
    count: usize,
    msg_bytes: usize,
    readers: usize,
    rounds: usize,
    settle_ms: u64,
    pid: Option<u32>,
    json_out: Option<String>,
    round_timeout_s: u64,
    streams: usize,
    batch: usize,
    content_type: String,
    conns: usize,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_else(|| usage());
    let mut a = Args {
        cmd,
        url: String::new(),
        path: String::new(),
        count: 1000,
        msg_bytes: 60,
        readers: 1000,
        rounds: 20,
        settle_ms: 1000,
        pid: None,
        json_out: None,
        round_timeout_s: 60,
        streams: 1000,
        batch: 25,
        content_type: "application/json".into(),
        conns: 8,
    };
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--url" => a.url = v(),
            "--path" => a.path = v(),
            "--count" => a.count = v().parse().unwrap_or_else(|_| usage()),
            "--msg-bytes" => a.msg_bytes = v().parse().unwrap_or_else(|_| usage()),
            "--readers" => a.readers = v().parse().unwrap_or_else(|_| usage()),
            "--rounds" => a.rounds = v().parse().unwrap_or_else(|_| usage()),
            "--settle-ms" => a.settle_ms = v().parse().unwrap_or_else(|_| usage()),
            "--pid" => a.pid = Some(v().parse().unwrap_or_else(|_| usage())),
            "--json-out" => a.json_out = Some(v()),
            "--round-timeout-s" => a.round_timeout_s = v().parse().unwrap_or_else(|_| usage()),
            "--streams" => a.streams = v().parse().unwrap_or_else(|_| usage()),
            "--batch" => a.batch = v().parse().unwrap_or_else(|_| usage()),
            "--content-type" => a.content_type = v(),
            "--conns" => a.conns = v().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.url.is_empty() {
        usage()
    }
    a
}

/// `http://host:port[/]` -> `host:port`
pub(crate) fn authority(url: &str) -> String {
    let s = url.strip_prefix("http://").unwrap_or_else(|| {
        eprintln!("only http:// URLs are supported");
        std::process::exit(2)
    });
    s.trim_end_matches('/').to_string()
}

pub(crate) async fn connect(addr: &str) -> Result<Sender, BoxErr> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

pub(crate) async fn request(
    sender: &mut Sender,
    host: &str,
    method: Method,
    path_and_query: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Resp, BoxErr> {
    sender.ready().await?;
    let mut b = Request::builder().method(method).uri(path_and_query).header("host", host);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    let req = b.body(Full::new(body))?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let next_offset = res.headers().get("stream-next-offset").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Resp { status, next_offset, body_len: body.len(), body })
}

pub(crate) fn message(i: usize, bytes: usize) -> String {
    let head = format!("{{\"i\":{i},\"user\":\"alice\",\"action\":\"click\",\"pad\":\"");
    let tail = "\"}";
    let pad = bytes.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

pub(crate) fn vm_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn fill(a: &Args) -> Result<(), BoxErr> {
    let host = authority(&a.url);
    let mut s = connect(&host).await?;
    let r = request(&mut s, &host, Method::PUT, &a.path, Some("application/json"), Bytes::new()).await?;
    if !(r.status == StatusCode::CREATED || r.status == StatusCode::OK) {
        return Err(format!("PUT {} -> {}", a.path, r.status).into());
    }
    let mut mid = None;
    let mut tail = r.next_offset;
    for i in 0..a.count {
        let body = Bytes::from(message(i, a.msg_bytes));
        let r = match request(&mut s, &host, Method::POST, &a.path, Some("application/json"), body.clone()).await {
            Ok(r) => r,
            Err(_) => {
                // connection dropped (keep-alive timeout etc.): reconnect once
                s = connect(&host).await?;
                request(&mut s, &host, Method::POST, &a.path, Some("application/json"), body).await?
            }
        };
        if !r.status.is_success() {
            return Err(format!("POST #{i} -> {}", r.status).into());
        }
        tail = r.next_offset;
        if i + 1 == a.count / 2 {
            mid = tail.clone();
        }
    }
    println!("mid={} tail={}", mid.unwrap_or_else(|| "-1".into()), tail.unwrap_or_default());
    Ok(())
}

/// One POST body of `n` messages starting at message number `first`: a JSON array for
/// JSON streams, concatenated chunks of `msg_bytes` otherwise.
fn batch_body(json: bool, first: usize, n: usize, msg_bytes: usize) -> Bytes {
    if json {
        let msgs: Vec<String> = (first..first + n).map(|i| message(i, msg_bytes)).collect();
        Bytes::from(format!("[{}]", msgs.join(",")))
    } else {
        let mut v = Vec::with_capacity(n * msg_bytes);
        for i in first..first + n {
            v.extend(std::iter::repeat(b'a' + (i % 26) as u8).take(msg_bytes));
        }
        Bytes::from(v)
    }
}

async fn fill_many(a: &Args) -> Result<(), BoxErr> {
    let host = authority(&a.url);
    if a.path.is_empty() || a.streams == 0 || a.batch == 0 {
        usage()
    }
    let json = a.content_type.starts_with("application/json");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.conns.max(1).min(a.streams) {
        let (host, next) = (host.clone(), next.clone());
        let (prefix, ct, count, batch, msg_bytes, streams) =
            (a.path.clone(), a.content_type.clone(), a.count, a.batch, a.msg_bytes, a.streams);
        set.spawn(async move {
            let mut s = connect(&host).await?;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= streams {
                    return Ok::<(), BoxErr>(());
                }
                let path = format!("{prefix}/{i}");
                let r = request(&mut s, &host, Method::PUT, &path, Some(&ct), Bytes::new()).await?;
                if !(r.status == StatusCode::CREATED || r.status == StatusCode::OK) {
                    return Err(format!("PUT {path} -> {}", r.status).into());
                }
                let mut done = 0;
                while done < count {
                    let n = batch.min(count - done);
                    let body = batch_body(json, done, n, msg_bytes);
                    let r = match request(&mut s, &host, Method::POST, &path, Some(&ct), body.clone()).await {
                        Ok(r) => r,
                        Err(_) => {
                            s = connect(&host).await?;
                            request(&mut s, &host, Method::POST, &path, Some(&ct), body).await?
                        }
                    };
                    if !r.status.is_success() {
                        return Err(format!("POST {path} -> {}", r.status).into());
                    }
                    done += n;
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    // What one whole-stream GET returns (a server may answer a large stream in parts).
    let mut s = connect(&host).await?;
    let r = request(&mut s, &host, Method::GET, &format!("{}/0?offset=-1", a.path), None, Bytes::new()).await?;
    let messages = if json {
        serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len().to_string()))
            .unwrap_or_else(|| "null".into())
    } else {
        "null".into()
    };
    println!("streams={} first_get_bytes={} messages={messages}", a.streams, r.body_len);
    Ok(())
}

async fn fanout(a: &Args) -> Result<(), BoxErr> {
    let host = authority(&a.url);
    let path = if a.path.is_empty() { format!("/bench/fanout-{}", std::process::id()) } else { a.path.clone() };

    // Create the stream and seed it with one message.
    let mut writer = connect(&host).await?;
    let r = request(&mut writer, &host, Method::PUT, &path, Some("application/json"), Bytes::new()).await?;
    if !(r.status == StatusCode::CREATED || r.status == StatusCode::OK) {
        return Err(format!("PUT {path} -> {}", r.status).into());
    }
    let r = request(&mut writer, &host, Method::POST, &path, Some("application/json"), Bytes::from(message(0, 150)))
        .await?;
    let mut offset = r.next_offset.ok_or("no Stream-Next-Offset on POST")?;

    // Server memory before any reader connects (the stream exists, seeded with one message).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = a.pid.and_then(vm_rss_kb);

    // Open the reader connections, 100 at a time (the Node server's listen backlog is 511).
    let t_conn = Instant::now();
    let mut senders: Vec<Option<Sender>> = Vec::with_capacity(a.readers);
    while senders.len() < a.readers {
        let batch = (a.readers - senders.len()).min(100);
        let mut set = JoinSet::new();
        for _ in 0..batch {
            let h = host.clone();
            set.spawn(async move { connect(&h).await });
        }
        while let Some(r) = set.join_next().await {
            senders.push(Some(r??));
        }
    }
    eprintln!("[fanout] {} connections open in {:?}", a.readers, t_conn.elapsed());

    let mut all: Vec<f64> = Vec::with_capacity(a.readers * a.rounds);
    let mut round_p50 = Vec::new();
    let mut round_p99 = Vec::new();
    let mut round_max = Vec::new();
    let mut rss_samples: Vec<u64> = Vec::new();
    let mut post_ms: Vec<f64> = Vec::new();
    let mut misses = 0usize; // responses that were not 200 with data (e.g. 204 timeouts, errors)
    let mut early = 0usize; // responses that completed before the append was sent

    for round in 0..a.rounds {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut set = JoinSet::new();
        let q = format!("{path}?offset={offset}&live=long-poll");
        for (i, slot) in senders.iter_mut().enumerate() {
            let s = slot.take();
            let h = host.clone();
            let q = q.clone();
            let done = done.clone();
            set.spawn(async move {
                let mut s = match s {
                    Some(s) if !s.is_closed() => s,
                    _ => match connect(&h).await {
                        Ok(s) => s,
                        Err(e) => return (i, None, Instant::now(), Err(e)),
                    },
                };
                let r = request(&mut s, &h, Method::GET, &q, None, Bytes::new()).await;
                let t = Instant::now();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (i, Some(s), t, r)
            });
        }
        tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
        let _early_now = done.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(pid) = a.pid {
            if let Some(kb) = vm_rss_kb(pid) {
                rss_samples.push(kb);
            }
        }

        let t0 = Instant::now();
        let pr = match request(
            &mut writer,
            &host,
            Method::POST,
            &path,
            Some("application/json"),
            Bytes::from(message(round + 1, 150)),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                writer = connect(&host).await?;
                request(
                    &mut writer,
                    &host,
                    Method::POST,
                    &path,
                    Some("application/json"),
                    Bytes::from(message(round + 1, 150)),
                )
                .await?
            }
        };
        post_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if !pr.status.is_success() {
            return Err(format!("append in round {round} -> {}", pr.status).into());
        }
        let new_offset = pr.next_offset.clone().ok_or("no Stream-Next-Offset on POST")?;

        let mut lat = Vec::with_capacity(a.readers);
        let deadline = Duration::from_secs(a.round_timeout_s);
        let collected = tokio::time::timeout(deadline, async {
            let mut out = Vec::with_capacity(a.readers);
            while let Some(j) = set.join_next().await {
                out.push(j);
            }
            out
        })
        .await;
        let results = match collected {
            Ok(r) => r,
            Err(_) => {
                set.abort_all();
                return Err(format!("round {round}: readers did not finish within {deadline:?}").into());
            }
        };
        for j in results {
            let (i, s, t, r) = j?;
            senders[i] = s;
            match r {
                Ok(resp) if resp.status == StatusCode::OK && resp.body_len > 0 => {
                    if t < t0 {
                        early += 1;
                    } else {
                        lat.push((t - t0).as_secs_f64() * 1e3);
                    }
                }
                _ => misses += 1,
            }
        }
        lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
        let (p50, p99, mx) = (pct(&lat, 0.5), pct(&lat, 0.99), lat.last().copied().unwrap_or(f64::NAN));
        eprintln!(
            "[fanout] round {:>2}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms post={:.2}ms rss={}",
            round + 1,
            lat.len(),
            p50,
            p99,
            mx,
            post_ms.last().unwrap(),
            rss_samples.last().map(|k| format!("{:.1}MiB", *k as f64 / 1024.0)).unwrap_or_else(|| "-".into())
        );
        round_p50.push(p50);
        round_p99.push(p99);
        round_max.push(mx);
        all.extend(lat);
        offset = new_offset;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    all.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let mut post_sorted = post_ms.clone();
    post_sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let rss_max = rss_samples.iter().copied().max();
    let rss_mean =
        if rss_samples.is_empty() { None } else { Some(rss_samples.iter().sum::<u64>() / rss_samples.len() as u64) };
    let fmt_list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(",");
    let json = format!(
        "{{\"readers\":{},\"rounds\":{},\"samples\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"mean_ms\":{:.3},\"post_p50_ms\":{:.3},\"misses\":{},\"early\":{},\"rss_before_kb\":{},\"rss_wait_kb_max\":{},\"rss_wait_kb_mean\":{},\"round_p50_ms\":[{}],\"round_p99_ms\":[{}],\"round_max_ms\":[{}]}}",
        a.readers,
        a.rounds,
        all.len(),
        pct(&all, 0.5),
        pct(&all, 0.99),
        all.last().copied().unwrap_or(f64::NAN),
        if all.is_empty() { f64::NAN } else { all.iter().sum::<f64>() / all.len() as f64 },
        pct(&post_sorted, 0.5),
        misses,
        early,
        rss_before.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
        rss_max.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
        rss_mean.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
        fmt_list(&round_p50),
        fmt_list(&round_p99),
        fmt_list(&round_max),
    );
    println!("{json}");
    if let Some(p) = &a.json_out {
        std::fs::write(p, format!("{json}\n"))?;
    }
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("soak") {
        std::process::exit(soak::main(std::env::args().skip(2).collect()));
    }
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let r = rt.block_on(async {
        match a.cmd.as_str() {
            "fill" => fill(&a).await,
            "fanout" => fanout(&a).await,
            "sse-fanout" => sse::sse_fanout(&a).await,
            "fill-many" => fill_many(&a).await,
            _ => usage(),
        }
    });
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
