//! Limits under hostile load, each against a server process of its own: a flood of large
//! bodies against the memory budget, slow clients against the connection timeouts. Their own
//! test binary, run one test at a time (a lock), so that what they measure (peak RSS, a normal
//! request's latency) is not another test's load.

mod common;

use common::*;

/// One measuring test at a time in this binary.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 128 bodies of 20 MB (garbage images) arrive at once: the body budget (max_buffered_bytes,
/// 256 MiB by default) holds the server's peak RSS growth under the budget plus a margin, and
/// every request is answered: 4xx for the garbage, 503 (with Retry-After) for those that found
/// no room in time, none lost, no 5xx other than that 503.
#[test]
fn a_flood_of_large_bodies_stays_within_the_memory_budget() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const BODIES: usize = 128;
    const BUDGET: u64 = 256 << 20;
    const MARGIN: u64 = 96 << 20;
    let (child, addr) = spawn_server(&[], &[]);
    let server = Killed(child);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/caption");
    // Warm up: the allocator's arenas and the runtime's threads exist before the baseline.
    let small = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let warm =
        serde_json::json!({"image": base64_encode(&small), "parameters": {"max_new_tokens": 2}});
    runtime.block_on(async {
        let r = client.post(&url).json(&warm).send().await.unwrap();
        assert_eq!(r.status(), 200);
    });
    let (before, _) = rss_of(server.0.id());
    let mut body = br#"{"image": ""#.to_vec();
    body.resize(body.len() + 20_000_000, b'A');
    body.extend_from_slice(br#""}"#);
    let body = axum::body::Bytes::from(body);
    let statuses: Vec<u16> = runtime.block_on(async {
        let sends = (0..BODIES).map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("every request is answered");
                if r.status() == 503 {
                    assert!(r.headers().contains_key("retry-after"));
                }
                r.status().as_u16()
            })
        });
        futures_util::future::join_all(sends)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    });
    let (_, peak) = rss_of(server.0.id());
    let growth = peak.saturating_sub(before);
    let mut by_status = std::collections::BTreeMap::new();
    for s in &statuses {
        *by_status.entry(*s).or_insert(0) += 1;
    }
    println!(
        "{BODIES} bodies of 20 MB: statuses {by_status:?}; RSS {} MiB before, peak {} MiB (growth {} MiB; budget {} MiB)",
        before >> 20,
        peak >> 20,
        growth >> 20,
        BUDGET >> 20
    );
    drop(server);
    assert_eq!(statuses.len(), BODIES);
    assert!(
        statuses
            .iter()
            .all(|&s| (400..500).contains(&s) || s == 503),
        "{by_status:?}"
    );
    assert!(
        growth < BUDGET + MARGIN,
        "peak RSS grew by {} MiB",
        growth >> 20
    );
}

/// 200 slow or idle connections, 40 of each kind: HTTP/1 heads and HTTP/1 bodies sent a byte
/// a second, connections that never send a byte, HTTP/2's preface sent a byte a second, and
/// HTTP/2 connections whose first HEADERS frame arrives a byte a second. A normal request's
/// latency stays within 2x of its latency without them (tokio parks idle connections; nothing
/// waits on them), and the timeouts end them all: a body still incomplete after body_timeout_s
/// gets 408; every other connection is closed once it has had no request in progress for
/// header_timeout_s (hyper's own header timeout covers HTTP/1 heads only).
#[test]
fn slow_clients_do_not_delay_others_and_are_cut_off() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let (child, addr) = spawn_server(
        &[],
        &[
            ("BLIP2_HEADER_TIMEOUT_S", "4"),
            ("BLIP2_BODY_TIMEOUT_S", "4"),
        ],
    );
    let _server = Killed(child);
    let image = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let body = serde_json::json!({
        "image": base64_encode(&image),
        "parameters": {"max_new_tokens": 4, "min_new_tokens": 4},
    })
    .to_string();
    let request = format!(
        "POST /v1/caption HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let median_latency = |n: usize| {
        let mut times: Vec<f64> = (0..n)
            .map(|_| {
                let started = Instant::now();
                let answer = http_raw(&addr, &request);
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                started.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[n / 2]
    };
    median_latency(3); // warm-up
    let alone = median_latency(9);

    // HTTP/2: the client preface, an empty SETTINGS frame, then a HEADERS frame (type 1,
    // END_HEADERS) announcing 1000 bytes of header block, which then trickle.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let h2_headers: Vec<u8> = [
        PREFACE,
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
        &[0, 3, 232, 1, 4, 0, 0, 0, 1],
    ]
    .concat();
    // (kind, connection, what it then sends a byte a second)
    let mut slow: Vec<(&str, TcpStream, Vec<u8>)> = Vec::new();
    for i in 0..200 {
        let conn = TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (kind, first, trickle): (&str, &[u8], &[u8]) = match i % 5 {
            0 => (
                "http/1 head",
                b"POST /v1/caption HTTP/1.1\r\nHost: t\r\n",
                b"x",
            ),
            1 => (
                "http/1 body",
                b"POST /v1/caption HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000\r\n\r\n{",
                b"x",
            ),
            2 => ("idle", b"", b""),
            3 => ("http/2 preface", b"", PREFACE),
            _ => ("http/2 headers", &h2_headers, b"x"),
        };
        (&conn).write_all(first).unwrap();
        slow.push((kind, conn, trickle.to_vec()));
    }
    let started = Instant::now();
    // A byte a second on every slow connection, from another thread, until the check is done
    // (the preface's bytes in order, then again; or "x").
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut conns: Vec<(TcpStream, Vec<u8>)> = slow
            .iter()
            .filter(|(_, _, bytes)| !bytes.is_empty())
            .map(|(_, c, bytes)| (c.try_clone().unwrap(), bytes.clone()))
            .collect();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (c, bytes) in conns.iter_mut() {
                    let _ = c.write_all(&[bytes[sent % bytes.len()]]);
                }
                sent += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let crowded = median_latency(9);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the slow connections must still be open while measuring"
    );
    println!(
        "caption latency alone {:.1} ms, with 200 slow connections {:.1} ms",
        alone * 1e3,
        crowded * 1e3
    );
    assert!(
        crowded <= 2.0 * alone,
        "{crowded:.4} s with slow clients, {alone:.4} s without"
    );
    // Past both timeouts: slow bodies get 408; every other connection is closed (an HTTP/1
    // head may get a 408 first, an HTTP/2 connection a GOAWAY frame).
    std::thread::sleep(Duration::from_secs(6).saturating_sub(started.elapsed()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
    for (kind, mut conn, _) in slow {
        let mut answer = Vec::new();
        // Ok: the server closed it (a read timeout here would be an error).
        conn.read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("{kind}: the server must close it: {e}"));
        let text = String::from_utf8_lossy(&answer);
        match kind {
            "http/1 body" => {
                assert!(text.starts_with("HTTP/1.1 408"), "slow body: {text}");
                assert!(text.contains("body_timeout_s"), "{text}");
            }
            "http/1 head" => assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408"),
                "slow head: {text}"
            ),
            "idle" | "http/2 preface" => assert!(answer.is_empty(), "{kind}: {text}"),
            _ => assert!(!text.contains("HTTP/1.1"), "{kind}: {text}"),
        }
    }
}
