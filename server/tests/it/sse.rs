//! The gateway's OpenAPI document, live feed and console over real HTTP against the real
//! server on `127.0.0.1:0`: every route in `/openapi.json`, `Z` timestamps, `GET
//! /anomalies` (the `WatchAnomalies` filters, `Last-Event-ID` resume within the replay
//! buffer, the watcher bounds shared with gRPC, the end at shutdown), `GET /devices`,
//! `GET /window` and the console's files.

use std::{net::SocketAddr, time::Duration};

use crate::common::{TestServer, http_get, http_post, metric_total, wait_until};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tidewatch_proto::v1::WatchAnomaliesRequest;

/// Every route the gateway serves, with its method.
const ROUTES: [(&str, &str); 15] = [
    ("/ingest", "post"),
    ("/metric", "post"),
    ("/analyze", "get"),
    ("/health", "get"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
    ("/anomalies", "get"),
    ("/devices", "get"),
    ("/window", "get"),
    ("/devices/{id}", "delete"),
    ("/openapi.json", "get"),
    ("/console", "get"),
    ("/console/", "get"),
    ("/console/{file}", "get"),
];

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<u64>,
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// An open `GET /anomalies` stream.
struct Feed {
    body: hyper::body::Incoming,
    buffer: String,
}

/// Opens `GET path` with `Last-Event-ID` when given: the feed, or the refusal's status
/// and body.
async fn open_feed(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<u64>,
) -> Result<Feed, (u16, http::HeaderMap, Value)> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = http::Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    if parts.status != 200 {
        let bytes = body.collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes).expect("error JSON");
        return Err((parts.status.as_u16(), parts.headers, value));
    }
    assert_eq!(
        parts.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    Ok(Feed {
        body,
        buffer: String::new(),
    })
}

impl Feed {
    /// The next event with data (comments and the `retry` preamble skipped), or `None`
    /// when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        has_data = true;
                    }
                }
                if has_data {
                    return Some(event);
                }
            }
            let frame = self.body.frame().await?.expect("feed frame");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
    }

    /// The next event, failing the test after a few seconds.
    async fn expect(&mut self) -> SseEvent {
        tokio::time::timeout(Duration::from_secs(10), self.next())
            .await
            .expect("an event within 10 s")
            .expect("the feed is still open")
    }

    /// Asserts that no event arrives for a short while.
    async fn expect_quiet(&mut self) {
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), self.next()).await {
            panic!("expected no event, got {event:?}");
        }
    }
}

/// Ingests `values` of `metric` for `device` over REST, numbered from `first_seq` (0:
/// not numbered).
async fn ingest(addr: SocketAddr, device: &str, metric: &str, first_seq: u64, values: &[f64]) {
    let samples: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| match first_seq {
            0 => json!({"deviceId": device, "metrics": {metric: v}}),
            _ => json!({"deviceId": device, "seq": first_seq + i as u64, "metrics": {metric: v}}),
        })
        .collect();
    let answer = http_post(
        addr,
        "/ingest",
        Some("application/json"),
        json!({ "samples": samples }).to_string(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// A warm window for `device`/`metric` (values around 10), then one anomaly: 1000. Each
/// call needs a fresh (device, metric).
async fn anomaly(addr: SocketAddr, device: &str, metric: &str) {
    let warm = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 10.2, 9.8];
    ingest(addr, device, metric, 0, &warm).await;
    ingest(addr, device, metric, 0, &[1000.0]).await;
}

/// The anomaly event's device and anomalous metrics.
fn what(event: &SseEvent) -> (String, Vec<String>) {
    assert_eq!(event.event, "anomaly", "{event:?}");
    let data = event.json();
    let verdict = &data["verdict"];
    let metrics = verdict["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["anomaly"] == true)
        .map(|m| m["metric"].as_str().unwrap().to_owned())
        .collect();
    (verdict["deviceId"].as_str().unwrap().to_owned(), metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_has_every_route() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let answer = http_get(addr, "/openapi.json").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let doc = answer.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (route, method) in ROUTES {
        let operation = &doc["paths"][route][method];
        assert!(operation.is_object(), "{method} {route} is not documented");
        assert!(
            operation["responses"]["200"].is_object() || operation["responses"]["308"].is_object(),
            "{method} {route} documents no success"
        );
    }
    assert_eq!(paths.len(), ROUTES.len(), "documented: {:?}", paths.keys());
    // Every documented GET route is served (the fallback answers unknown paths with a
    // "no route" error).
    for (route, method) in ROUTES {
        if method != "get" || route == "/anomalies" {
            continue;
        }
        let path = route.replace("{file}", "console.js");
        let answer = http_get(addr, &path).await;
        assert!(
            !answer.text().contains("no route for"),
            "{route} is documented but not served"
        );
    }
    // Every reference resolves, and every error status names the error schema.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"").skip(1) {
        let name = reference[..reference.find('"').unwrap()]
            .strip_prefix("#/components/schemas/")
            .unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{name} is referenced but missing"
        );
    }
    for (route, method) in ROUTES {
        for (status, response) in doc["paths"][route][method]["responses"]
            .as_object()
            .unwrap()
        {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {route} {status}"
                );
            }
        }
    }
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_timestamps_end_in_z() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let answer = http_post(
        addr,
        "/ingest",
        Some("application/json"),
        r#"{"device_id": "z-1", "timestamp": 1710000000.25, "rps": 1}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let analyzed = http_get(addr, "/analyze?device_id=z-1").await.json();
    assert_eq!(
        analyzed["updatedAt"], "2024-03-09T16:00:00.250Z",
        "{analyzed}"
    );
    http_post(
        addr,
        "/ingest",
        Some("application/json"),
        r#"{"device_id": "z-1", "timestamp": "2024-03-09T18:00:00+02:00", "rps": 2}"#,
    )
    .await;
    let window = http_get(addr, "/window?device_id=z-1").await.json();
    assert_eq!(window["updatedAt"], "2024-03-09T16:00:00Z", "{window}");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_filters_like_watch_anomalies() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let mut all = open_feed(addr, "/anomalies", None).await.unwrap();
    let mut filtered = open_feed(addr, "/anomalies?device_id=a&device_id=c&metric=rps", None)
        .await
        .unwrap();
    let mut grpc = server
        .client()
        .await
        .watch_anomalies(WatchAnomaliesRequest {
            device_ids: vec!["a".into(), "c".into()],
            metrics: vec!["rps".into()],
        })
        .await
        .unwrap()
        .into_inner();
    anomaly(addr, "a", "cpu").await; // wrong metric
    anomaly(addr, "b", "rps").await; // wrong device
    anomaly(addr, "a", "rps").await; // wanted

    let mut ids = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = all.expect().await;
        ids.push(event.id.expect("an id"));
        let data = event.json();
        assert!(data["time"].as_str().unwrap().ends_with('Z'), "{data}");
        assert_eq!(data["missed"], "0");
        seen.push(what(&event));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(
        seen,
        [
            ("a".to_owned(), vec!["cpu".to_owned()]),
            ("b".to_owned(), vec!["rps".to_owned()]),
            ("a".to_owned(), vec!["rps".to_owned()]),
        ]
    );
    let event = filtered.expect().await;
    assert_eq!(what(&event), ("a".to_owned(), vec!["rps".to_owned()]));
    assert_eq!(event.id, Some(ids[2]), "one id sequence for every client");
    filtered.expect_quiet().await;
    // The gRPC watcher with the same filter saw the same one event.
    let message = tokio::time::timeout(Duration::from_secs(10), grpc.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(message.verdict.unwrap().device_id, "a");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_event_id() {
    let server = TestServer::start_with(|c| c.feed_replay_buffer = 3).await;
    let addr = server.http_addr;
    let mut feed = open_feed(addr, "/anomalies", None).await.unwrap();
    let mut devices = (0..).map(|n| format!("r-{n}"));
    anomaly(addr, &devices.next().unwrap(), "rps").await;
    let first = feed.expect().await.id.unwrap();
    drop(feed);
    // Without a client the recorder keeps a watcher of its own and goes on recording.
    for _ in 0..2 {
        anomaly(addr, &devices.next().unwrap(), "rps").await;
    }
    // Back within the buffer: both missed events, in order, then live ones.
    let mut feed = open_feed(addr, "/anomalies", Some(first)).await.unwrap();
    let replayed: Vec<SseEvent> = vec![feed.expect().await, feed.expect().await];
    assert_eq!(
        replayed.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        [first + 1, first + 2]
    );
    assert!(replayed.iter().all(|e| e.json()["missed"] == "0"));
    anomaly(addr, &devices.next().unwrap(), "rps").await;
    assert_eq!(feed.expect().await.id, Some(first + 3));
    drop(feed);

    // Past the buffer (3 events): the oldest kept come back, counting what was lost.
    for _ in 0..5 {
        anomaly(addr, &devices.next().unwrap(), "rps").await;
    }
    let mut feed = open_feed(addr, "/anomalies?last_event_id=0", Some(first + 3))
        .await
        .unwrap();
    let event = feed.expect().await;
    assert_eq!(event.id, Some(first + 6), "the header wins over the query");
    assert_eq!(event.json()["missed"], "2");
    assert_eq!(feed.expect().await.id, Some(first + 7));
    assert_eq!(feed.expect().await.id, Some(first + 8));
    feed.expect_quiet().await;
    drop(feed);

    // The query parameter resumes too (an EventSource cannot set the header on its
    // first request).
    let mut feed = open_feed(
        addr,
        &format!("/anomalies?last_event_id={}", first + 7),
        None,
    )
    .await
    .unwrap();
    assert_eq!(feed.expect().await.id, Some(first + 8));
    let refused = open_feed(addr, "/anomalies?last_event_id=x", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.0, 400);
    assert_eq!(refused.2["error"]["code"], "invalid_argument");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_bounded_on_both_transports() {
    let server = TestServer::start_with(|c| {
        c.max_watchers = 2;
        c.max_watch_filter = 2;
    })
    .await;
    let addr = server.http_addr;
    let first = open_feed(addr, "/anomalies", None).await.unwrap();
    let mut client = server.client().await;
    let second = client
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .unwrap();

    // Full: a third watcher is refused on either transport.
    let (status, headers, body) = open_feed(addr, "/anomalies", None).await.err().unwrap();
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_WATCHERS")
    );
    assert!(headers.contains_key("retry-after"));
    let status = client
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);

    // A filter larger than MAX_WATCH_FILTER, either way.
    drop(second);
    let (status, _, body) = open_feed(addr, "/anomalies?device_id=a&device_id=b&metric=c", None)
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_WATCH_FILTER")
    );
    let status = client
        .watch_anomalies(WatchAnomaliesRequest {
            device_ids: vec!["a".into(), "b".into()],
            metrics: vec!["c".into()],
        })
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A freed place is taken again; the idle recorder's watcher is handed over.
    wait_until(
        "the gRPC watcher is closed",
        Duration::from_secs(10),
        || metric_total(&server.state, "tidewatch_watchers_active") == 1.0,
    )
    .await;
    let again = open_feed(addr, "/anomalies?device_id=a&metric=rps", None).await;
    assert!(again.is_ok());
    drop((first, again));
    wait_until("both feeds are closed", Duration::from_secs(10), || {
        metric_total(&server.state, "tidewatch_watchers_active") == 1.0
    })
    .await;
    let one = open_feed(addr, "/anomalies", None).await.unwrap();
    let two = open_feed(addr, "/anomalies", None).await.unwrap();
    assert_eq!(
        metric_total(&server.state, "tidewatch_watchers_active"),
        2.0
    );
    drop((one, two));
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_ends_with_an_error_event_at_shutdown() {
    let mut server = TestServer::start().await;
    let mut feed = open_feed(server.http_addr, "/anomalies", None)
        .await
        .unwrap();
    server.begin_shutdown();
    let event = feed.expect().await;
    assert_eq!(event.event, "error");
    assert_eq!(event.json()["error"]["code"], "unavailable");
    let end = tokio::time::timeout(Duration::from_secs(10), feed.next()).await;
    assert_eq!(end.expect("the feed ends"), None);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_pages_and_window_values() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    for device in ["pump-2", "fan-1", "pump-1", "pump-10"] {
        ingest(addr, device, "rps", 1, &[1.0, 2.0, 3.0]).await;
    }
    let page = http_get(addr, "/devices?prefix=pump-&limit=2").await.json();
    assert_eq!(
        page,
        json!({"deviceIds": ["pump-1", "pump-10"], "next": "pump-10"})
    );
    let page = http_get(addr, "/devices?prefix=pump-&limit=2&after=pump-10")
        .await
        .json();
    assert_eq!(page, json!({"deviceIds": ["pump-2"]}));
    let page = http_get(addr, "/devices").await.json();
    assert_eq!(page["deviceIds"].as_array().unwrap().len(), 4);
    for bad in [
        "/devices?limit=0",
        "/devices?limit=1001",
        "/devices?limit=x",
    ] {
        http_get(addr, bad)
            .await
            .assert_error(400, "invalid_argument");
    }

    ingest(addr, "pump-1", "rps", 4, &[4.0]).await;
    let window = http_get(addr, "/window?device_id=pump-1").await.json();
    assert_eq!(window["deviceId"], "pump-1");
    assert_eq!(window["lastSeq"], "4");
    assert_eq!(window["metrics"][0]["metric"], "rps");
    assert_eq!(window["metrics"][0]["values"], json!([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(window["metrics"][0]["mean"], 2.5);
    assert_eq!(window["threshold"], server.state.config.z_threshold);
    assert_eq!(window["windowSize"], server.state.config.window_size);
    http_get(addr, "/window?device_id=nobody")
        .await
        .assert_error(404, "not_found");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_are_served_same_origin_only() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let redirect = http_get(addr, "/console").await;
    assert_eq!(redirect.status, 308);
    assert_eq!(redirect.header("location"), Some("/console/"));
    let page = http_get(addr, "/console/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(html.contains(r#"src="console.js""#) && html.contains(r#"href="console.css""#));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no other origin"
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    for (file, kind) in [
        ("console.js", "text/javascript"),
        ("console.css", "text/css"),
    ] {
        let answer = http_get(addr, &format!("/console/{file}")).await;
        assert_eq!(answer.status, 200);
        assert!(answer.header("content-type").unwrap().starts_with(kind));
        assert!(
            !answer.text().contains("https://"),
            "{file} loads nothing from elsewhere"
        );
    }
    let js = http_get(addr, "/console/console.js").await.text();
    for endpoint in ["../anomalies", "../devices?", "../window?"] {
        assert!(js.contains(endpoint), "the console reads {endpoint}");
    }
    http_get(addr, "/console/other.js")
        .await
        .assert_error(404, "not_found");
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_takes_over_the_recorders_watcher() {
    let server = TestServer::start_with(|c| c.max_watchers = 1).await;
    let addr = server.http_addr;
    let feed = open_feed(addr, "/anomalies", None).await.unwrap();
    anomaly(addr, "t-0", "rps").await;
    drop(feed);
    // Once the client is counted out, the recorder holds the only watcher; a feed
    // client coming back takes it over (without the hand-over it would be refused for
    // as long as the recorder runs) and resumes.
    let started = std::time::Instant::now();
    let mut feed = loop {
        match open_feed(addr, "/anomalies", Some(0)).await {
            Ok(feed) => break feed,
            Err((503, _, _)) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(refused) => panic!("the returning client was refused: {refused:?}"),
        }
    };
    assert_eq!(feed.expect().await.id, Some(1));
    assert_eq!(
        metric_total(&server.state, "tidewatch_watchers_active"),
        1.0
    );
    // Meanwhile gRPC is at the limit.
    let status = server
        .client()
        .await
        .watch_anomalies(WatchAnomaliesRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    server.stop().await.expect("clean shutdown");
}
