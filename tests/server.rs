//! The HTTP server, started for real on 127.0.0.1:0 with the tiny fixture and spoken to over
//! TCP: caption and VQA give the pipeline's own answers, SSE tokens add up to the final text,
//! bad input is a 4xx with `{error, error_type}` and the server keeps serving, and shutdown
//! drains and returns.

mod common;

use std::net::SocketAddr;

use base64::Engine as _;
use blip2_server::generation::GenerationParams;
use blip2_server::model::ModelFiles;
use blip2_server::server::{self, ServeOptions};
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn load() -> Blip2Pipeline {
    let files = ModelFiles::from_dir(&model_dir("opt-tiny")).unwrap();
    Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap()
}

/// One HTTP/1.1 request; returns (status, de-chunked body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json_body(image: &[u8], extra: serde_json::Value) -> Vec<u8> {
    let mut body =
        serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(image)});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_captions_answers_streams_and_errors() {
    let reference = load();
    let image = std::fs::read(image_path("rgb_640x480.png")).unwrap();
    let greedy = GenerationParams {
        max_new_tokens: 8,
        min_new_tokens: 8,
        ..GenerationParams::default()
    };
    let expected_caption = reference
        .generate(
            std::slice::from_ref(&image),
            &[Some("a photo of".into())],
            std::slice::from_ref(&greedy),
        )
        .unwrap();
    let expected_answer = reference
        .generate(
            std::slice::from_ref(&image),
            &[Some("Question: what is it? Answer:".into())],
            std::slice::from_ref(&greedy),
        )
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        load(),
        ServeOptions::default(),
        listener,
        async {
            let _ = stop_rx.await;
        },
    ));

    let (status, body) = http(addr, "GET", "/health", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(http(addr, "GET", "/ready", &[], b"").await.0, 200);
    let (_, info) = http(addr, "GET", "/info", &[], b"").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&info).unwrap()["model_type"],
        "opt"
    );

    let params = serde_json::json!({"max_new_tokens": 8, "min_new_tokens": 8});
    let (status, body) = http(
        addr,
        "POST",
        "/v1/caption",
        &[("content-type", "application/json")],
        &json_body(
            &image,
            serde_json::json!({"prompt": "a photo of", "parameters": params}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["text"], expected_caption[0].sequences[0].text);
    assert_eq!(v["usage"]["generated_tokens"], 8);

    let (status, body) = http(
        addr,
        "POST",
        "/v1/vqa",
        &[],
        &json_body(
            &image,
            serde_json::json!({"question": "what is it?", "parameters": params}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["answer"], expected_answer[0].sequences[0].text);

    // SSE: data lines per token, the last one with the full text.
    let (status, body) = http(
        addr,
        "POST",
        "/v1/caption",
        &[],
        &json_body(
            &image,
            serde_json::json!({"prompt": "a photo of", "parameters": params, "stream": true}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let events: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(tokens.len(), 8);
    let streamed: String = tokens
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(last["text"], expected_caption[0].sequences[0].text);
    assert!(expected_caption[0].sequences[0].text.starts_with(&streamed));

    // Bad input: the right 4xx with {error, error_type}, and the server keeps serving.
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{not json".to_vec(), 400),
        (
            serde_json::to_vec(&serde_json::json!({"image": "!!!"})).unwrap(),
            422,
        ),
        (
            json_body(b"plain text, not an image", serde_json::json!({})),
            415,
        ),
        (
            json_body(&image, serde_json::json!({"parameters": {"top_p": 2.0}})),
            422,
        ),
        (
            json_body(&image, serde_json::json!({"parameters": {"nonsense": 1}})),
            422,
        ),
        (
            json_body(&image[..image.len() / 2], serde_json::json!({})),
            400,
        ),
    ];
    for (body, want) in cases {
        let (status, text) = http(addr, "POST", "/v1/caption", &[], &body).await;
        assert_eq!(status, want, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["error"].is_string() && v["error_type"].is_string(),
            "{text}"
        );
    }
    let (status, _) = http(
        addr,
        "POST",
        "/v1/vqa",
        &[],
        &json_body(&image, serde_json::json!({"question": " "})),
    )
    .await;
    assert_eq!(status, 422);
    let (_, metrics) = http(addr, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics.contains("blip2_requests_total{endpoint=\"caption\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert_eq!(http(addr, "GET", "/health", &[], b"").await.0, 200);

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
