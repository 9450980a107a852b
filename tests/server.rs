//! The HTTP server, started for real on 127.0.0.1:0 with the tiny fixture and spoken to with a
//! real HTTP client (reqwest): every endpoint and input form gives the pipeline's own answers,
//! SSE tokens add up to the final text, concurrent requests are batched and each gets what it
//! gets alone, a disconnect frees its slot, limits answer 429 / 504, bad input is a 4xx with
//! `{error, error_type}` and the server keeps serving, and the served spec is openapi.yaml.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use blip2_server::generation::GenerationParams;
use blip2_server::model::ModelFiles;
use blip2_server::server::{self, ServeError, ServeOptions};
use blip2_server::{Blip2Pipeline, LoadOptions};
use common::*;
use serde_json::{json, Value};

fn load() -> Blip2Pipeline {
    load_model("opt-tiny")
}

fn load_model(name: &str) -> Blip2Pipeline {
    let files = ModelFiles::from_dir(&model_dir(name)).unwrap();
    Blip2Pipeline::load_files(&files, &LoadOptions::default()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(image_path(name)).unwrap()
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    http: reqwest::Client,
}

impl Server {
    async fn start(options: ServeOptions) -> Self {
        Self::start_model("opt-tiny", options).await
    }

    async fn start_model(model: &str, mut options: ServeOptions) -> Self {
        // Stopping a test server need not keep serving for the balancers' shutdown_delay_s.
        options.shutdown_delay = Duration::ZERO;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(load_model(model), options, listener, async {
            let _ = stop_rx.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path))
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.post(path).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// A sample of /metrics, e.g. `blip2_batch_size_count` or `blip2_errors_total{error_type="validation"}`
    /// (0 when absent).
    async fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn info(&self) -> Value {
        self.get("/info").await.json().await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the server drains and returns")
            .unwrap()
            .unwrap();
    }
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: n,
        min_new_tokens: n,
        ..GenerationParams::default()
    }
}

/// The pipeline's own answer for one image alone: (token ids of each sequence, first text).
fn alone(
    p: &Blip2Pipeline,
    img: &[u8],
    prompt: Option<&str>,
    params: &GenerationParams,
) -> (Vec<Vec<u32>>, String) {
    let out = p
        .generate(
            &[img.to_vec()],
            &[prompt.map(str::to_string)],
            std::slice::from_ref(params),
        )
        .unwrap();
    let seqs = &out[0].sequences;
    (
        seqs.iter().map(|s| s.token_ids.clone()).collect(),
        seqs[0].text.clone(),
    )
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The `data:` payloads of an SSE body, with their event names.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let mut event = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            (!data.is_empty()).then(|| (event, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_input_form_answers_as_the_pipeline() {
    let reference = load();
    let photo = image("rgb_640x480.png");
    let other = image("photo_320x240.jpg");
    let g8 = greedy(8);
    let (caption_ids, caption_text) = alone(&reference, &photo, Some("a photo of"), &g8);
    let (other_ids, _) = alone(&reference, &other, Some("a photo of"), &g8);
    let (answer_ids, answer_text) = alone(
        &reference,
        &photo,
        Some("Question: what is it? Answer:"),
        &g8,
    );
    let s = Server::start(ServeOptions::default()).await;
    let params = json!({"max_new_tokens": 8, "min_new_tokens": 8});

    // Plain endpoints.
    let health = s.get("/health").await;
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    assert_eq!(health.text().await.unwrap(), "ok");
    assert_eq!(s.get("/ready").await.status(), 200);
    let info = s.info().await;
    assert_eq!(info["model_type"], "opt");
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["vqa_template"], "Question: {} Answer:");
    assert_eq!(info["ready"], true);
    let docs = s.get("/docs").await;
    assert_eq!(docs.headers()["x-content-type-options"], "nosniff");
    assert!(docs.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(docs.text().await.unwrap().contains("/openapi.json"));

    // A caller's request id comes back; otherwise one is made.
    let r = s
        .http
        .get(s.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");

    // JSON, base64 and data: URL.
    let (status, body) = s
        .json(
            "/v1/caption",
            json!({"image": b64(&photo), "prompt": "a photo of", "parameters": params}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body["token_ids"]), caption_ids[0]);
    assert_eq!(body["text"], caption_text.as_str());
    assert_eq!(body["finish_reason"], "length");
    assert_eq!(body["usage"]["generated_tokens"], 8);
    let url = format!("data:image/png;base64,{}", b64(&photo));
    let (status, body) = s
        .json(
            "/v1/caption",
            json!({"image": url, "prompt": "a photo of", "parameters": params}),
        )
        .await;
    assert_eq!(
        (status, ids(&body["token_ids"])),
        (200, caption_ids[0].clone())
    );

    // Several images: one result each, in order.
    let (status, body) = s
        .json(
            "/v1/caption",
            json!({"images": [b64(&photo), b64(&other)], "prompt": "a photo of", "parameters": params}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(ids(&results[0]["token_ids"]), caption_ids[0]);
    assert_eq!(ids(&results[1]["token_ids"]), other_ids[0]);

    // Multipart: file fields, parameters as their own fields and as JSON.
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(photo.clone()).file_name("a.png"),
        )
        .text("prompt", "a photo of")
        .text("max_new_tokens", "8")
        .text("parameters", r#"{"min_new_tokens": 8}"#);
    let r = s.post("/v1/caption").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(ids(&body["token_ids"]), caption_ids[0]);
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(photo.clone()).file_name("a.png"),
        )
        .part(
            "image",
            reqwest::multipart::Part::bytes(other.clone()).file_name("b.jpg"),
        )
        .text("prompt", "a photo of")
        .text("parameters", params.to_string());
    let body: Value = s
        .post("/v1/caption")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&body["results"][1]["token_ids"]), other_ids[0]);

    // VQA: the template around the question, JSON and multipart.
    let (status, body) = s
        .json(
            "/v1/vqa",
            json!({"image": b64(&photo), "question": "what is it?", "parameters": params}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body["token_ids"]), answer_ids[0]);
    assert_eq!(body["answer"], answer_text.as_str());
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(photo.clone()))
        .text("question", "what is it?")
        .text("max_new_tokens", "8")
        .text("min_new_tokens", "8");
    let body: Value = s
        .post("/v1/vqa")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&body["token_ids"]), answer_ids[0]);

    // SSE (by flag and by Accept): tokens add up to the final answer; details agree with them.
    for by_header in [false, true] {
        let mut request = json!({"image": b64(&photo), "prompt": "a photo of",
            "parameters": {"max_new_tokens": 8, "min_new_tokens": 8, "details": true}});
        let mut builder = s.post("/v1/caption");
        if by_header {
            builder = builder.header("accept", "text/event-stream");
        } else {
            request["stream"] = json!(true);
        }
        let r = builder.json(&request).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["x-accel-buffering"], "no");
        let events = sse_events(&r.text().await.unwrap());
        let (last, tokens) = events.split_last().unwrap();
        assert_eq!(tokens.len(), 8);
        let streamed_ids: Vec<u32> = tokens
            .iter()
            .map(|(_, e)| e["token"]["id"].as_u64().unwrap() as u32)
            .collect();
        let streamed_text: String = tokens
            .iter()
            .map(|(_, e)| e["token"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(streamed_ids, caption_ids[0]);
        assert_eq!(streamed_text, caption_text);
        assert_eq!(last.1["text"], caption_text.as_str());
        assert_eq!(ids(&last.1["token_ids"]), caption_ids[0]);
        let detail: Vec<Value> = last.1["details"]["tokens"].as_array().unwrap().clone();
        let streamed: Vec<Value> = tokens.iter().map(|(_, e)| e["token"].clone()).collect();
        assert_eq!(detail, streamed);
    }
    // details without streaming: the same tokens.
    let (_, body) = s
        .json(
            "/v1/caption",
            json!({"image": b64(&photo), "prompt": "a photo of",
            "parameters": {"max_new_tokens": 8, "min_new_tokens": 8, "details": true}}),
        )
        .await;
    let detail_ids: Vec<u32> = body["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(detail_ids, caption_ids[0]);

    // The served description is openapi.yaml.
    let served: Value = s.get("/openapi.json").await.json().await.unwrap();
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(served, file, "/openapi.json differs from openapi.yaml");
    // ...and it names exactly the routes the server has.
    let mut paths: Vec<&str> = file["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/docs",
            "/health",
            "/info",
            "/metrics",
            "/openapi.json",
            "/ready",
            "/v1/caption",
            "/v1/chat/completions",
            "/v1/features",
            "/v1/models",
            "/v1/vqa"
        ]
    );
    for path in paths {
        let method = file["paths"][path]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        let r = if method == "get" {
            s.get(path).await
        } else {
            s.post(path).json(&json!({})).send().await.unwrap()
        };
        assert_ne!(r.status(), 404, "{path} is in openapi.yaml but not served");
    }

    // Request metrics by endpoint and status.
    assert!(
        s.metric("blip2_requests_total{endpoint=\"/v1/caption\",status=\"200\"}")
            .await
            >= 8.0
    );
    assert!(s.metric("blip2_preprocess_duration_seconds_count").await >= 8.0);
    assert!(s.metric("blip2_time_to_first_token_seconds_count").await >= 8.0);
    assert!(s.metric("blip2_generated_tokens_sum").await >= 64.0);
    s.stop().await;
}

/// One of the 16 concurrent requests.
struct Mixed {
    vqa: bool,
    image: &'static str,
    text: Option<&'static str>,
    parameters: Value,
    params: GenerationParams,
}

fn mixes() -> Vec<Mixed> {
    let images = [
        "rgb_640x480.png",
        "rgba_100x37.png",
        "gray_13x200.png",
        "photo_320x240.jpg",
    ];
    (0..16)
        .map(|i| {
            let n = 4 + (i % 5) * 3;
            let (parameters, params) = match i % 4 {
                0 => (json!({"max_new_tokens": n, "min_new_tokens": n}), greedy(n)),
                1 => (
                    json!({"max_new_tokens": n, "num_beams": 3, "num_return_sequences": 2}),
                    GenerationParams { max_new_tokens: n, num_beams: 3, num_return_sequences: 2, ..Default::default() },
                ),
                2 => (
                    json!({"max_new_tokens": n, "do_sample": true, "seed": i, "top_k": 20, "temperature": 0.8}),
                    GenerationParams {
                        max_new_tokens: n,
                        do_sample: true,
                        seed: Some(i as u64),
                        top_k: Some(20),
                        temperature: 0.8,
                        ..Default::default()
                    },
                ),
                _ => (
                    json!({"max_new_tokens": n, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2}),
                    GenerationParams {
                        max_new_tokens: n,
                        repetition_penalty: 1.3,
                        no_repeat_ngram_size: 2,
                        ..Default::default()
                    },
                ),
            };
            Mixed {
                vqa: i % 3 == 2,
                image: images[i % 4],
                text: match i % 3 {
                    0 => None,
                    1 => Some("a photo of"),
                    _ => Some("how many?"),
                },
                parameters,
                params,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_are_batched_and_each_gets_its_own_tokens() {
    let reference = load();
    let cases = mixes();
    let expected: Vec<Vec<Vec<u32>>> = cases
        .iter()
        .map(|c| {
            let prompt = match (c.vqa, c.text) {
                (true, Some(q)) => Some(format!("Question: {q} Answer:")),
                (_, t) => t.map(str::to_string),
            };
            alone(&reference, &image(c.image), prompt.as_deref(), &c.params).0
        })
        .collect();
    let s = Server::start(ServeOptions {
        engine: blip2_server::engine::EngineConfig {
            max_batch_size: 16,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let tasks: Vec<_> = cases
        .iter()
        .map(|c| {
            let (path, body) = if c.vqa {
                ("/v1/vqa", json!({"image": b64(&image(c.image)), "question": c.text.unwrap(), "parameters": c.parameters}))
            } else {
                ("/v1/caption", json!({"image": b64(&image(c.image)), "prompt": c.text, "parameters": c.parameters}))
            };
            let request = s.post(path).json(&body);
            tokio::spawn(async move {
                let r = request.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let body = task.await.unwrap();
        let got: Vec<Vec<u32>> = match body.get("sequences") {
            Some(seqs) => seqs
                .as_array()
                .unwrap()
                .iter()
                .map(|q| ids(&q["token_ids"]))
                .collect(),
            None => vec![ids(&body["token_ids"])],
        };
        assert_eq!(got, expected[i], "request {i}");
    }
    // Some decode steps ran several requests together.
    let steps = s.metric("blip2_batch_size_count").await;
    let single = s.metric("blip2_batch_size_bucket{le=\"1\"}").await;
    assert!(
        steps > single,
        "no step ran more than one request ({steps} steps)"
    );
    assert!(s.metric("blip2_batch_size_sum").await / steps > 1.0);
    assert_eq!(s.metric("blip2_running_requests").await, 0.0);
    assert_eq!(s.metric("blip2_queue_depth").await, 0.0);
    s.stop().await;
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_a_disconnect_frees_its_slot_and_slow_requests_time_out() {
    // Flan-T5 has no position limit: 4096 forced tokens keep a request busy for seconds.
    let photo = image("rgb_640x480.png");
    let s = Server::start_model(
        "t5-tiny",
        ServeOptions {
            max_new_tokens: 4096,
            engine: blip2_server::engine::EngineConfig {
                max_batch_size: 1,
                max_queue: 1,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let long = json!({"image": b64(&photo), "stream": true,
        "parameters": {"max_new_tokens": 4096, "min_new_tokens": 4096}});
    // A long streamed request takes the only batch slot.
    let mut stream = s.post("/v1/caption").json(&long).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    stream.chunk().await.unwrap().expect("a first event");
    assert_eq!(s.info().await["running_requests"], 1);
    // A second one waits in the queue, a third is refused.
    let queued = s
        .post("/v1/caption")
        .json(&json!({"image": b64(&photo), "parameters": {"max_new_tokens": 3, "min_new_tokens": 3}}))
        .send();
    let queued = tokio::spawn(queued);
    wait_until("the second request is queued", async || {
        s.info().await["queue_depth"] == 1
    })
    .await;
    let refused = s
        .post("/v1/caption")
        .json(&json!({"image": b64(&photo)}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error_type"], "overloaded");
    // The streaming client hangs up: its slot goes to the queued request, which finishes.
    drop(stream);
    let done = queued.await.unwrap().unwrap();
    assert_eq!(done.status(), 200);
    let body: Value = done.json().await.unwrap();
    assert_eq!(body["usage"]["generated_tokens"], 3);
    wait_until("the slot is free", async || {
        s.info().await["running_requests"] == 0
    })
    .await;
    assert_eq!(s.metric("blip2_cancelled_requests_total").await, 1.0);
    s.stop().await;

    // A per-request timeout: 504 before a response, an error event inside a stream.
    let s = Server::start_model(
        "t5-tiny",
        ServeOptions {
            max_new_tokens: 4096,
            request_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    )
    .await;
    let mut plain = long.clone();
    plain["stream"] = json!(false);
    let (status, body) = s.json("/v1/caption", plain).await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (504, Some("timeout")),
        "{body}"
    );
    let text = s
        .post("/v1/caption")
        .json(&long)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let (event, last) = events.last().unwrap();
    assert_eq!(
        (event.as_str(), last["error_type"].as_str()),
        ("error", Some("timeout"))
    );
    wait_until("timed-out requests are cancelled", async || {
        s.info().await["running_requests"] == 0
    })
    .await;
    assert!(s.metric("blip2_errors_total{error_type=\"timeout\"}").await >= 2.0);
    // A stream's duration runs to its last event, not to its head (which came at once): the
    // timed-out stream (the only 200 here) lasted at least the timeout.
    let stream_duration =
        "blip2_request_duration_seconds_{}{endpoint=\"/v1/caption\",status=\"200\"}";
    wait_until("the stream's duration is recorded", async || {
        s.metric(&stream_duration.replace("{}", "count")).await == 1.0
    })
    .await;
    assert!(s.metric(&stream_duration.replace("{}", "sum")).await >= 0.3);
    s.stop().await;

    // max_concurrent_requests: one request in flight, the next is 429 at once.
    let s = Server::start_model(
        "t5-tiny",
        ServeOptions {
            max_new_tokens: 4096,
            max_concurrent_requests: 1,
            ..Default::default()
        },
    )
    .await;
    let mut stream = s.post("/v1/caption").json(&long).send().await.unwrap();
    stream.chunk().await.unwrap();
    let (status, body) = s.json("/v1/caption", json!({"image": b64(&photo)})).await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (429, Some("overloaded"))
    );
    drop(stream);
    wait_until("the in-flight request is gone", async || {
        s.json("/v1/caption", json!({"image": b64(&photo)})).await.0 == 200
    })
    .await;
    s.stop().await;
}

// Bad input: one test per kind of mistake, each on its own `start_bad_input_server` (so its own
// /metrics) and each ending with a real request that is still served. A test asserts
// `blip2_errors_total` only for an error type all of whose cases it sends itself: the 22
// validation cases of the request's shape and parameters share one test for its `>= 19`, the
// only image_too_large case is in the image test (`== 1`), and the three 401s are in the routing
// test (`== 3`). The one validation case with a multipart body sits with the other bodies, in a
// test that counts nothing.

/// One bad request to the bad-input server and the error it gets.
struct Case {
    name: &'static str,
    path: &'static str,
    body: Body,
    status: u16,
    error_type: &'static str,
}

/// A case's body: JSON, or raw bytes under their own `content-type`.
enum Body {
    Json(Value),
    Raw {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
}

/// The server the bad-input tests speak to, and the `authorization` header its API key wants.
async fn start_bad_input_server() -> (Server, String) {
    let key = "sekret";
    let s = Server::start(ServeOptions {
        max_body_bytes: 2 * 1024 * 1024,
        max_images_per_request: 2,
        max_prompt_tokens: 16,
        max_new_tokens: 200,
        engine: blip2_server::engine::EngineConfig {
            max_batch_tokens: 400,
            ..Default::default()
        },
        api_key: Some(key.into()),
        ..Default::default()
    })
    .await;
    (s, format!("Bearer {key}"))
}

/// Sends each case (with the API key) and checks its status and `{error, error_type}`, and that
/// /health still answers after it.
async fn check_cases(s: &Server, auth: &str, cases: Vec<Case>) {
    for Case {
        name: what,
        path,
        body,
        status,
        error_type: kind,
    } in cases
    {
        let mut request = s.post(path).header("authorization", auth);
        request = match body {
            Body::Json(v) => request.json(&v),
            Body::Raw {
                content_type: ct,
                bytes,
            } => request.header("content-type", ct).body(bytes),
        };
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(body["error_type"], kind, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}"
        );
        assert_eq!(s.get("/health").await.status(), 200, "after {what}");
    }
}

/// After the bad input: a real request is still served.
async fn assert_still_serving(s: &Server, auth: &str, img: &str) {
    let r = s
        .post("/v1/caption")
        .header("authorization", auth)
        .json(&json!({"image": img, "parameters": {"max_new_tokens": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_media_types_are_a_4xx_and_the_server_keeps_serving() {
    let photo = image("rgb_640x480.png");
    let (s, auth) = start_bad_input_server().await;
    let img = b64(&photo);
    let cases = vec![
        Case {
            name: "malformed JSON",
            path: "/v1/caption",
            body: Body::Raw {
                content_type: "application/json",
                bytes: b"{\"image\": ".to_vec(),
            },
            status: 400,
            error_type: "invalid_request",
        },
        Case {
            name: "wrong content type",
            path: "/v1/caption",
            body: Body::Raw {
                content_type: "text/plain",
                bytes: b"hello".to_vec(),
            },
            status: 415,
            error_type: "unsupported_media_type",
        },
        Case {
            name: "multipart without image",
            path: "/v1/caption",
            body: Body::Raw {
                content_type: "multipart/form-data; boundary=X",
                bytes:
                    b"--X\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--X--\r\n"
                        .to_vec(),
            },
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "broken multipart",
            path: "/v1/caption",
            body: Body::Raw {
                content_type: "multipart/form-data; boundary=X",
                bytes: b"--X\r\ngarbage".to_vec(),
            },
            status: 400,
            error_type: "invalid_request",
        },
    ];
    check_cases(&s, &auth, cases).await;
    // A body over max_body_bytes: 413 from the Content-Length alone. (Sent as headers only:
    // a client still writing a refused body can see a broken pipe before the answer.)
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "POST /v1/caption HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            3 * 1024 * 1024
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut answer))
            .await
            .expect("answered before the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    assert_still_serving(&s, &auth, &img).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_a_4xx_and_the_server_keeps_serving() {
    let photo = image("rgb_640x480.png");
    let (s, auth) = start_bad_input_server().await;
    let png = |w: u32, h: u32| {
        let mut out = Vec::new();
        image::RgbImage::new(w, h)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let huge_header = {
        // A valid PNG signature + IHDR claiming 100000 x 100000 pixels.
        let mut p = png(1, 1);
        p[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        p[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        p
    };
    let img = b64(&photo);
    let cases = vec![
        Case {
            name: "not an image",
            path: "/v1/caption",
            body: Body::Json(json!({"image": b64(b"hello, world")})),
            status: 415,
            error_type: "unsupported_image",
        },
        Case {
            name: "truncated PNG",
            path: "/v1/caption",
            body: Body::Json(json!({"image": b64(&photo[..200])})),
            status: 400,
            error_type: "invalid_image",
        },
        Case {
            name: "too many pixels",
            path: "/v1/caption",
            body: Body::Json(json!({"image": b64(&huge_header)})),
            status: 413,
            error_type: "image_too_large",
        },
    ];
    check_cases(&s, &auth, cases).await;
    assert_still_serving(&s, &auth, &img).await;
    assert_eq!(
        s.metric("blip2_errors_total{error_type=\"image_too_large\"}")
            .await,
        1.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_and_parameters_are_a_422_and_the_server_keeps_serving() {
    let photo = image("rgb_640x480.png");
    let (s, auth) = start_bad_input_server().await;
    let img = b64(&photo);
    let long_prompt = "word ".repeat(40);
    let cases = vec![
        // The request's shape.
        Case {
            name: "not an object",
            path: "/v1/caption",
            body: Body::Json(json!([1, 2])),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "unknown field",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "colour": 1})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "missing image",
            path: "/v1/caption",
            body: Body::Json(json!({"prompt": "a"})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "image and images",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "images": [img]})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "empty images",
            path: "/v1/caption",
            body: Body::Json(json!({"images": []})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "too many images",
            path: "/v1/caption",
            body: Body::Json(json!({"images": [img, img, img]})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "bad base64",
            path: "/v1/caption",
            body: Body::Json(json!({"image": "%%%"})),
            status: 422,
            error_type: "validation",
        },
        // The generation parameters, the limits they meet, and what streaming allows.
        Case {
            name: "bad parameter type",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "parameters": {"max_new_tokens": "ten"}})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "unknown parameter",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "parameters": {"beams": 2}})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "invalid sampling",
            path: "/v1/caption",
            body: Body::Json(
                json!({"image": img, "parameters": {"do_sample": true, "temperature": 0.0}}),
            ),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "beams below returns",
            path: "/v1/caption",
            body: Body::Json(
                json!({"image": img, "parameters": {"num_beams": 2, "num_return_sequences": 3}}),
            ),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "max_new_tokens over the cap",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "parameters": {"max_new_tokens": 201}})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "over the batch token budget",
            path: "/v1/caption",
            body: Body::Json(
                json!({"image": img, "parameters": {"max_new_tokens": 60, "num_beams": 8}}),
            ),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "past the model's positions",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "parameters": {"max_new_tokens": 150}})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "prompt too long",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "prompt": long_prompt})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "image token in prompt",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "prompt": "<image> hi"})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "stream with beams",
            path: "/v1/caption",
            body: Body::Json(json!({"image": img, "stream": true, "parameters": {"num_beams": 2}})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "stream with two images",
            path: "/v1/caption",
            body: Body::Json(json!({"images": [img, img], "stream": true})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "details with beams",
            path: "/v1/caption",
            body: Body::Json(
                json!({"image": img, "parameters": {"num_beams": 2, "details": true}}),
            ),
            status: 422,
            error_type: "validation",
        },
        // /v1/vqa's question.
        Case {
            name: "missing question",
            path: "/v1/vqa",
            body: Body::Json(json!({"image": img})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "empty question",
            path: "/v1/vqa",
            body: Body::Json(json!({"image": img, "question": "  "})),
            status: 422,
            error_type: "validation",
        },
        Case {
            name: "prompt on vqa",
            path: "/v1/vqa",
            body: Body::Json(json!({"image": img, "question": "q", "prompt": "p"})),
            status: 422,
            error_type: "validation",
        },
    ];
    check_cases(&s, &auth, cases).await;
    assert_still_serving(&s, &auth, &img).await;
    assert!(
        s.metric("blip2_errors_total{error_type=\"validation\"}")
            .await
            >= 19.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routes_methods_and_api_keys_are_a_4xx_and_the_server_keeps_serving() {
    let photo = image("rgb_640x480.png");
    let (s, auth) = start_bad_input_server().await;
    let img = b64(&photo);
    // Routes and methods that do not exist.
    let r = s.get("/v2/nothing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "not_found");
    let r = s.get("/v1/caption").await;
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_type"],
        "method_not_allowed"
    );
    // The API key: missing or wrong is 401; /health and /metrics stay open.
    for header in [None, Some("Bearer nope"), Some("sekret")] {
        let mut request = s.post("/v1/caption").json(&json!({"image": img}));
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "{header:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    assert_still_serving(&s, &auth, &img).await;
    assert_eq!(
        s.metric("blip2_errors_total{error_type=\"unauthorized\"}")
            .await,
        3.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflight_for_allowed_origins_only() {
    let s = Server::start(ServeOptions {
        cors_allow_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let preflight = |origin: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, s.url("/v1/caption"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    let r = s
        .http
        .get(s.url("/info"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    s.stop().await;
}

/// The OpenAI chat route answers what /v1/vqa (with text) or /v1/caption (without) answers,
/// streamed or not; its errors are OpenAI's shape with the field at fault named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_answer_as_vqa_and_caption_in_openai_shape() {
    let s = Server::start(ServeOptions::default()).await;
    let img = b64(&image("photo_320x240.jpg"));
    let url = format!("data:image/jpeg;base64,{img}");
    let question = "what is in the picture?";
    let (status, vqa) = s
        .json(
            "/v1/vqa",
            json!({"image": img, "question": question, "parameters": {"max_new_tokens": 6}}),
        )
        .await;
    assert_eq!(status, 200, "{vqa}");
    let chat_body = |text: Option<&str>, extra: Value| {
        let mut content = vec![json!({"type": "image_url", "image_url": {"url": url}})];
        if let Some(t) = text {
            content.push(json!({"type": "text", "text": t}));
        }
        let mut body = json!({"model": "blip2", "max_tokens": 6,
            "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": content}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let (status, chat) = s
        .json("/v1/chat/completions", chat_body(Some(question), json!({})))
        .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["choices"][0]["message"]["content"], vqa["answer"],
        "{chat} vs {vqa}"
    );
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        chat["usage"]["completion_tokens"],
        vqa["usage"]["generated_tokens"]
    );
    let want_reason = if vqa["finish_reason"] == "length" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(chat["choices"][0]["finish_reason"], want_reason);

    // Without text: the caption.
    let (_, caption) = s
        .json(
            "/v1/caption",
            json!({"image": img, "parameters": {"max_new_tokens": 6}}),
        )
        .await;
    let (_, chat_caption) = s
        .json("/v1/chat/completions", chat_body(None, json!({})))
        .await;
    assert_eq!(
        chat_caption["choices"][0]["message"]["content"],
        caption["text"]
    );

    // Streamed: the deltas concatenate to the same text; usage when asked; then [DONE].
    let body = chat_body(
        Some(question),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let text = s
        .post("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, vqa["answer"].as_str().unwrap(), "{text}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(
        usage["usage"]["completion_tokens"],
        vqa["usage"]["generated_tokens"]
    );

    // Logprobs: the chosen tokens' log-probabilities, as /v1/vqa's details give them.
    let (_, with_lp) = s
        .json(
            "/v1/chat/completions",
            chat_body(Some(question), json!({"logprobs": true})),
        )
        .await;
    let (_, details) = s
        .json(
            "/v1/vqa",
            json!({"image": img, "question": question,
            "parameters": {"max_new_tokens": 6, "details": true}}),
        )
        .await;
    let lp: Vec<&Value> = with_lp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["logprob"])
        .collect();
    let want: Vec<&Value> = details["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["logprob"])
        .collect();
    assert_eq!(lp, want);

    // n = 2 with a seed: two choices, the same twice.
    let sampled = chat_body(
        Some(question),
        json!({"n": 2, "temperature": 1.0, "seed": 7}),
    );
    let (status, a) = s.json("/v1/chat/completions", sampled.clone()).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.json("/v1/chat/completions", sampled).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"], b["choices"]);

    // Errors: OpenAI's shape, 400, the param named.
    let (status, e) = s
        .json(
            "/v1/chat/completions",
            chat_body(Some(question), json!({"top_logprobs": 3})),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "top_logprobs", "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let bad = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
    let (status, e) = s.json("/v1/chat/completions", bad).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "unsupported_image", "{e}");
    assert_eq!(
        e["error"]["param"], "messages[0].content[0].image_url.url",
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("image"),
        "{e}"
    );
    let (status, e) = s
        .json(
            "/v1/chat/completions",
            chat_body(Some(question), json!({"max_tokens": 100000})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("validation")),
        "{e}"
    );

    let models: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
    s.stop().await;
}

/// `questions` about one image: one answer per question, in order, each what the question alone
/// gets; the vision encoder runs once (one cache miss, the other lookups hits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_questions_about_one_image_run_the_vision_encoder_once() {
    let s = Server::start(ServeOptions::default()).await;
    let img = b64(&image("tall_300x1000.png"));
    let questions = ["what is it?", "what colour is it?", "is it tall?"];
    let params = json!({"max_new_tokens": 5});
    let misses = "blip2_image_cache_lookups_total{result=\"miss\"}";
    let hits = "blip2_image_cache_lookups_total{result=\"hit\"}";
    let (miss0, hit0) = (s.metric(misses).await, s.metric(hits).await);
    let (status, many) = s
        .json(
            "/v1/vqa",
            json!({"image": img, "questions": questions, "parameters": params}),
        )
        .await;
    assert_eq!(status, 200, "{many}");
    assert_eq!(s.metric(misses).await - miss0, 1.0, "one vision pass");
    assert_eq!(s.metric(hits).await - hit0, 2.0);
    let results = many["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (q, r) in questions.iter().zip(results) {
        let (_, one) = s
            .json(
                "/v1/vqa",
                json!({"image": img, "question": q, "parameters": params}),
            )
            .await;
        assert_eq!(r, &one, "{q}");
    }
    for (body, needle) in [
        (json!({"image": img, "questions": []}), "empty"),
        (
            json!({"image": img, "question": "a", "questions": ["b"]}),
            "not both",
        ),
        (
            json!({"images": [img, img], "questions": ["a"]}),
            "one image",
        ),
        (
            json!({"image": img, "questions": ["a"], "stream": true}),
            "one question",
        ),
    ] {
        let (status, e) = s.json("/v1/vqa", body).await;
        assert_eq!(status, 422, "{e}");
        assert!(e["error"].as_str().unwrap().contains(needle), "{e}");
    }
    s.stop().await;
}

/// A loopback HTTP server for image-URL tests: counts connections; `/img.png` is a PNG,
/// `/big` a body of 3 MiB, `/away` a redirect to another host, `/here` one to `/img.png`.
fn image_host(png: Vec<u8>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) <= 2 {
                    break;
                }
            }
            let (head, body): (String, Vec<u8>) = match path.as_str() {
                "/img.png" => (format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n", png.len()), png.clone()),
                "/big" => ("HTTP/1.1 200 OK\r\nContent-Length: 3145728\r\n".into(), vec![0u8; 3 << 20]),
                "/away" => ("HTTP/1.1 302 Found\r\nLocation: http://evil.example/a.png\r\nContent-Length: 0\r\n".into(), Vec::new()),
                "/here" => ("HTTP/1.1 302 Found\r\nLocation: /img.png\r\nContent-Length: 0\r\n".into(), Vec::new()),
                _ => ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n".into(), Vec::new()),
            };
            let _ = conn.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    (addr, connections)
}

/// Image URLs: refused by default; with an allow list, loopback in any spelling, private
/// addresses, user info and backslash tricks are refused without a connection; an allowed
/// loopback host (with image_url_allow_private) is fetched, redirects are checked per hop, and
/// a body over max_image_bytes is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_urls_are_fetched_only_as_the_policy_allows() {
    use blip2_server::api::fetch::UrlPolicy;
    let png = image("rgb_640x480.png");
    let (addr, connections) = image_host(png.clone());
    let port = addr.port();
    let connected = || connections.load(std::sync::atomic::Ordering::SeqCst);
    let caption = |image: String| json!({"image": image, "parameters": {"max_new_tokens": 4}});

    // Off by default.
    let s = Server::start(ServeOptions::default()).await;
    let (status, e) = s
        .json("/v1/caption", caption(format!("http://{addr}/img.png")))
        .await;
    assert_eq!(
        (status, e["error_type"].as_str()),
        (400, Some("invalid_image_url")),
        "{e}"
    );
    s.stop().await;

    let strict = UrlPolicy {
        allowed_hosts: vec!["*".into()],
        allow_private: false,
        max_redirects: 0,
        timeout: Duration::from_secs(5),
        max_bytes: 2 << 20,
    };
    let s = Server::start(ServeOptions {
        url_policy: strict.clone(),
        ..Default::default()
    })
    .await;
    for url in [
        format!("http://127.0.0.1:{port}/img.png"),
        format!("http://2130706433:{port}/img.png"),
        format!("http://0177.0.0.1:{port}/img.png"),
        format!("http://0x7f000001:{port}/img.png"),
        format!("http://[::1]:{port}/img.png"),
        format!("http://[::ffff:127.0.0.1]:{port}/img.png"),
        format!("http://0.0.0.0:{port}/img.png"),
        format!("http://localhost.:{port}/img.png"),
        format!("http://localhost:{port}/img.png"),
        format!("http://user@127.0.0.1:{port}/img.png"),
        format!("http://example.com@127.0.0.1:{port}/img.png"),
        format!("http://127.0.0.1:{port}\\@example.com/img.png"),
        format!("http://169.254.169.254:{port}/latest/meta-data"),
    ] {
        let (status, e) = s.json("/v1/caption", caption(url.clone())).await;
        assert_eq!(
            (status, e["error_type"].as_str()),
            (400, Some("invalid_image_url")),
            "{url}: {e}"
        );
    }
    // The chat route takes the same path.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("http://127.0.0.1:{port}/img.png")}}]}]});
    let (status, e) = s.json("/v1/chat/completions", chat).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_image_url")),
        "{e}"
    );
    assert_eq!(connected(), 0, "a refused URL was connected to");
    s.stop().await;

    // Loopback allowed by name and by the private switch: fetched, and the same caption as the
    // bytes themselves.
    let open = UrlPolicy {
        allowed_hosts: vec!["127.0.0.1".into()],
        allow_private: true,
        ..strict
    };
    let s = Server::start(ServeOptions {
        url_policy: open.clone(),
        ..Default::default()
    })
    .await;
    let (status, by_url) = s
        .json("/v1/caption", caption(format!("http://{addr}/img.png")))
        .await;
    assert_eq!(status, 200, "{by_url}");
    let (_, by_bytes) = s.json("/v1/caption", caption(b64(&png))).await;
    assert_eq!(by_url["text"], by_bytes["text"]);
    assert!(
        s.metric("blip2_image_fetch_duration_seconds_count{result=\"ok\"}")
            .await
            >= 1.0
    );
    let (status, e) = s
        .json("/v1/caption", caption(format!("http://{addr}/big")))
        .await;
    assert_eq!(
        (status, e["error_type"].as_str()),
        (413, Some("image_too_large")),
        "{e}"
    );
    let (status, e) = s
        .json("/v1/caption", caption(format!("http://{addr}/here")))
        .await;
    assert_eq!(status, 400, "no redirects by default: {e}");
    s.stop().await;

    let s = Server::start(ServeOptions {
        url_policy: UrlPolicy {
            max_redirects: 1,
            ..open
        },
        ..Default::default()
    })
    .await;
    let (status, e) = s
        .json("/v1/caption", caption(format!("http://{addr}/here")))
        .await;
    assert_eq!(status, 200, "a redirect within the allowed host: {e}");
    let before = connected();
    let (status, e) = s
        .json("/v1/caption", caption(format!("http://{addr}/away")))
        .await;
    assert_eq!(
        (status, e["error_type"].as_str()),
        (400, Some("invalid_image_url")),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("evil.example"), "{e}");
    assert_eq!(
        connected(),
        before + 1,
        "only the first hop was connected to"
    );
    s.stop().await;
}

/// /v1/features: every stage equals the reference's `get_image_features` outputs within 1e-4
/// (f32) on the OPT and T5 fixtures (golden/features.safetensors, written by
/// tools/make_feature_goldens.py); base64 carries the same floats; a batch answers as singles;
/// a seen image's projection comes from the vision cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_equal_the_reference_at_every_stage() {
    for model in ["opt-tiny", "t5-tiny"] {
        let dir = model_dir(model).join("golden");
        let golden = candle_core::safetensors::load(
            dir.join("features.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("features.json")).unwrap())
                .unwrap();
        let s = Server::start_model(model, ServeOptions::default()).await;
        for name in index["images"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            let stem = name.rsplit_once('.').unwrap().0;
            let img = b64(&image(name));
            for stage in ["vision", "vision_pooled", "qformer", "projected"] {
                let (status, f) = s
                    .json("/v1/features", json!({"image": img, "stage": stage}))
                    .await;
                assert_eq!(status, 200, "{model} {name} {stage}: {f}");
                let want = &golden[&format!("{stem}.{stage}")];
                let shape: Vec<usize> = serde_json::from_value(f["shape"].clone()).unwrap();
                assert_eq!(shape, want.dims(), "{model} {name} {stage}");
                assert_eq!(
                    (f["stage"].as_str(), f["dtype"].as_str()),
                    (Some(stage), Some("float32"))
                );
                let data: Vec<f32> = serde_json::from_value(f["data"].clone()).unwrap();
                let ours = candle_core::Tensor::from_vec(
                    data.clone(),
                    shape.as_slice(),
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                let diff = assert_close(&format!("{model} {name} {stage}"), &ours, want, 1e-4);
                assert!(diff.is_finite());
                let (_, b) = s
                    .json(
                        "/v1/features",
                        json!({"image": img, "stage": stage, "encoding_format": "base64"}),
                    )
                    .await;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b["data"].as_str().unwrap())
                    .unwrap();
                let floats: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                assert_eq!(floats, data, "{model} {name} {stage}: base64");
            }
        }
        // A batch answers as the singles do, in order.
        let imgs: Vec<String> = index["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| b64(&image(n.as_str().unwrap())))
            .collect();
        let (status, batch) = s
            .json("/v1/features", json!({"images": imgs, "stage": "qformer"}))
            .await;
        assert_eq!(status, 200, "{batch}");
        for (i, img) in imgs.iter().enumerate() {
            let (_, one) = s
                .json("/v1/features", json!({"image": img, "stage": "qformer"}))
                .await;
            let a: Vec<f32> = serde_json::from_value(batch["results"][i]["data"].clone()).unwrap();
            let b: Vec<f32> = serde_json::from_value(one["data"].clone()).unwrap();
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{model} batch row {i}: {worst}");
        }
        // The projection of a seen image is a cache hit.
        let hits = "blip2_image_cache_lookups_total{result=\"hit\"}";
        let before = s.metric(hits).await;
        let (_, _) = s
            .json(
                "/v1/features",
                json!({"image": imgs[0], "stage": "projected"}),
            )
            .await;
        assert_eq!(s.metric(hits).await, before + 1.0, "{model}");
        // image_embeds (a projected answer, either encoding) stand for the image itself.
        let params = json!({"max_new_tokens": 6});
        for encoding in ["float", "base64"] {
            let (_, embeds) = s
                .json(
                    "/v1/features",
                    json!({"image": imgs[1], "stage": "projected", "encoding_format": encoding}),
                )
                .await;
            for (path, field, text) in [
                ("/v1/caption", "prompt", "a photo of"),
                ("/v1/vqa", "question", "what is it?"),
            ] {
                let (_, by_image) = s
                    .json(
                        path,
                        json!({"image": imgs[1], field: text, "parameters": params}),
                    )
                    .await;
                let (status, by_embeds) = s
                    .json(
                        path,
                        json!({"image_embeds": embeds, field: text, "parameters": params}),
                    )
                    .await;
                assert_eq!(status, 200, "{model} {path} {encoding}: {by_embeds}");
                assert_eq!(
                    by_embeds["token_ids"], by_image["token_ids"],
                    "{model} {path} {encoding}"
                );
            }
        }
        let (_, pooled) = s
            .json(
                "/v1/features",
                json!({"image": imgs[1], "stage": "vision_pooled"}),
            )
            .await;
        let (status, e) = s.json("/v1/caption", json!({"image_embeds": pooled})).await;
        assert_eq!(status, 422, "{e}");
        assert!(e["error"].as_str().unwrap().contains("projected"), "{e}");
        let (_, qf) = s
            .json(
                "/v1/features",
                json!({"image": imgs[1], "stage": "projected"}),
            )
            .await;
        let mut wrong = qf.clone();
        wrong["shape"] = json!([1, qf["data"].as_array().unwrap().len()]);
        let (status, e) = s.json("/v1/caption", json!({"image_embeds": wrong})).await;
        assert_eq!(status, 422, "{e}");
        let (status, e) = s
            .json("/v1/caption", json!({"image_embeds": qf, "image": imgs[1]}))
            .await;
        assert_eq!(status, 422, "{e}");
        // Bad input.
        for (body, status) in [
            (json!({"image": imgs[0], "stage": "pixels"}), 422),
            (json!({"image": imgs[0], "encoding_format": "hex"}), 422),
            (json!({"image": imgs[0], "extra": 1}), 422),
            (json!({}), 422),
            (json!({"image": "AAAA"}), 415),
        ] {
            let (got, e) = s.json("/v1/features", body.clone()).await;
            assert_eq!(got, status, "{body}: {e}");
        }
        s.stop().await;
    }
}

/// The other-size goldens of one fixture (golden/sizes.*, written by tools/make_size_goldens.py).
struct SizeGoldens {
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    index: Value,
}

fn size_goldens(model: &str) -> SizeGoldens {
    let dir = model_dir(model).join("golden");
    SizeGoldens {
        tensors: candle_core::safetensors::load(
            dir.join("sizes.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        index: serde_json::from_str(&std::fs::read_to_string(dir.join("sizes.json")).unwrap())
            .unwrap(),
    }
}

impl SizeGoldens {
    fn cases(&self) -> impl Iterator<Item = &Value> {
        self.index["cases"].as_array().unwrap().iter()
    }
    fn max_new_tokens(&self) -> u64 {
        self.index["max_new_tokens"].as_u64().unwrap()
    }
}

fn tokens_of(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// `image_size` (transformers' `interpolate_pos_encoding=True`): at a larger square size and a
/// non-square one, every /v1/features stage equals `get_image_features` within 1e-4 (f32) and
/// greedy tokens equal `generate(..., interpolate_pos_encoding=True)` exactly, alone, batched,
/// and batched with requests of other sizes; multipart and chat take it too; bad sizes are a
/// 422 (400 on the OpenAI route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_image_sizes_equal_the_reference() {
    for model in ["opt-tiny", "t5-tiny"] {
        let g = size_goldens(model);
        let s = Server::start_model(model, ServeOptions::default()).await;
        let info = s.info().await;
        assert_eq!(info["image_size"], json!([28, 28]), "{info}");
        assert_eq!(
            (info["patch_size"].as_u64(), info["max_image_side"].as_u64()),
            (Some(7), Some(448))
        );
        let (mut checked, mut worst) = (0, 0f32);
        for size in g.index["sizes"].as_array().unwrap() {
            let tag = format!("{}x{}", size[0], size[1]);
            for name in g.index["images"].as_array().unwrap() {
                let name = name.as_str().unwrap();
                let stem = name.rsplit_once('.').unwrap().0;
                for stage in ["vision", "vision_pooled", "qformer", "projected"] {
                    let (status, f) = s
                        .json(
                            "/v1/features",
                            json!({"image": b64(&image(name)), "stage": stage, "image_size": size}),
                        )
                        .await;
                    assert_eq!(status, 200, "{model} {name} {tag} {stage}: {f}");
                    let want = &g.tensors[&format!("{stem}@{tag}.{stage}")];
                    let shape: Vec<usize> = serde_json::from_value(f["shape"].clone()).unwrap();
                    assert_eq!(shape, want.dims(), "{model} {name} {tag} {stage}");
                    let data: Vec<f32> = serde_json::from_value(f["data"].clone()).unwrap();
                    let ours = candle_core::Tensor::from_vec(
                        data,
                        shape.as_slice(),
                        &candle_core::Device::Cpu,
                    )
                    .unwrap();
                    let what = format!("{model} {name} {tag} {stage}");
                    worst = worst.max(assert_close(&what, &ours, want, 1e-4));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 3 * 4, "{model}: every size, image and stage");
        eprintln!("{model}: features at other sizes, max |ours - reference| = {worst:e}");
        let params = json!({"max_new_tokens": g.max_new_tokens()});
        let body = |case: &Value| {
            let images: Vec<String> = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| b64(&image(n.as_str().unwrap())))
                .collect();
            let mut body = json!({"image_size": case["size"], "parameters": params});
            if case["kind"] == "batch" {
                body["images"] = json!(images);
            } else {
                body["image"] = json!(images[0]);
            }
            if !case["prompt"].is_null() {
                body["prompt"] = case["prompt"].clone();
            }
            body
        };
        let answered = |case: &Value, v: &Value| -> Vec<Vec<u32>> {
            if case["kind"] == "batch" {
                v["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| ids(&r["token_ids"]))
                    .collect()
            } else {
                vec![ids(&v["token_ids"])]
            }
        };
        for case in g.cases() {
            let (status, v) = s.json("/v1/caption", body(case)).await;
            assert_eq!(status, 200, "{model} {}: {v}", case["name"]);
            assert_eq!(
                answered(case, &v),
                tokens_of(&case["tokens"]),
                "{model} {}",
                case["name"]
            );
        }
        // All cases at once: batched together across sizes (and with a checkpoint-size
        // request), each answers as alone.
        let plain = json!({"image": b64(&image("photo_320x240.jpg")), "parameters": params});
        let (_, plain_alone) = s.json("/v1/caption", plain.clone()).await;
        let cases: Vec<&Value> = g.cases().collect();
        let runs = cases.iter().map(|c| s.json("/v1/caption", body(c)));
        let (together, (_, plain_together)) = tokio::join!(
            futures_util::future::join_all(runs),
            s.json("/v1/caption", plain)
        );
        for (case, (status, v)) in cases.iter().zip(&together) {
            assert_eq!(*status, 200, "{model} {}: {v}", case["name"]);
            assert_eq!(
                answered(case, v),
                tokens_of(&case["tokens"]),
                "{model} {} batched",
                case["name"]
            );
        }
        assert_eq!(
            ids(&plain_together["token_ids"]),
            ids(&plain_alone["token_ids"]),
            "{model}: the checkpoint's size"
        );
        // Multipart ("HxW") and chat (an extra field) take the same size.
        let single = cases
            .iter()
            .find(|c| {
                c["kind"] == "single" && c["prompt"].is_null() && c["size"][0] != c["size"][1]
            })
            .unwrap();
        let size = format!("{}x{}", single["size"][0], single["size"][1]);
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(image(single["images"][0].as_str().unwrap())),
            )
            .text("image_size", size.clone())
            .text("max_new_tokens", g.max_new_tokens().to_string());
        let r = s.post("/v1/caption").multipart(form).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            vec![ids(&v["token_ids"])],
            tokens_of(&single["tokens"]),
            "{model} multipart {size}"
        );
        let url = format!(
            "data:image/png;base64,{}",
            b64(&image(single["images"][0].as_str().unwrap()))
        );
        let (status, chat) = s
            .json(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                       "max_tokens": g.max_new_tokens(), "image_size": single["size"]}),
            )
            .await;
        assert_eq!(status, 200, "{chat}");
        assert_eq!(
            chat["choices"][0]["message"]["content"], v["text"],
            "{model} chat {size}"
        );
        // Bad sizes.
        let img = b64(&image("photo_320x240.jpg"));
        for (route, size, want) in [
            ("/v1/caption", json!(20), 422),
            ("/v1/caption", json!([21, 36]), 422),
            ("/v1/caption", json!(455), 422),
            ("/v1/caption", json!([0, 7]), 422),
            ("/v1/caption", json!("28"), 422),
            ("/v1/caption", json!([7, 7, 7]), 422),
            ("/v1/features", json!(20), 422),
            ("/v1/vqa", json!(13), 422),
        ] {
            let mut body = json!({"image": img, "image_size": size});
            if route == "/v1/vqa" {
                body["question"] = json!("what?");
            }
            let (status, e) = s.json(route, body).await;
            assert_eq!(status, want, "{route} {size}: {e}");
            assert!(
                e["error"].as_str().unwrap().contains("image_size")
                    || e["error"].as_str().unwrap().contains("image size"),
                "{e}"
            );
        }
        let (_, embeds) = s.json("/v1/features", json!({"image": img})).await;
        let (status, e) = s
            .json(
                "/v1/caption",
                json!({"image_embeds": embeds, "image_size": 21}),
            )
            .await;
        assert_eq!(status, 422, "{e}");
        let (status, e) = s
            .json(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], "image_size": 20}),
            )
            .await;
        assert_eq!(
            (status, e["error"]["param"].as_str()),
            (400, Some("image_size")),
            "{e}"
        );
        s.stop().await;
    }
    // The server's own size (the `image_size` setting): plain requests get it.
    let g = size_goldens("opt-tiny");
    let case = g
        .cases()
        .find(|c| c["kind"] == "batch" && c["size"] == json!([21, 35]))
        .unwrap();
    let options = ServeOptions {
        image_size: Some(blip2_server::preprocess::ImageSize::new(21, 35)),
        ..ServeOptions::default()
    };
    let s = Server::start_model("opt-tiny", options).await;
    assert_eq!(s.info().await["image_size"], json!([21, 35]));
    let images: Vec<String> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| b64(&image(n.as_str().unwrap())))
        .collect();
    let (status, v) = s
        .json(
            "/v1/caption",
            json!({"images": images, "parameters": {"max_new_tokens": g.max_new_tokens()}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let got: Vec<Vec<u32>> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ids(&r["token_ids"]))
        .collect();
    assert_eq!(got, tokens_of(&case["tokens"]));
    s.stop().await;
}
