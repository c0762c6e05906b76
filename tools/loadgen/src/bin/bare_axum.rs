//! `bare-axum`: the baseline of the HTTP gateway benchmark (`scripts/bench-gateway.sh`).
//!
//! `POST /ingest` does what tidewatch's gateway does around its engine: it reads the
//! body, parses it into a `serde_json::Value`, turns every sample of the same body
//! shapes (one flat sample, an array, `{"samples": [...]}`, canonical samples with
//! `metrics`) into a `tidewatch.v1.Sample`, and answers one verdict per sample (device
//! id echoed, one entry per metric, no statistics) in the same proto3 JSON encoding.
//! No engine, no middleware, no metrics: what HTTP, JSON in and JSON out cost alone.
//! It shares tidewatch's allocator, runtime and socket options (see the crate
//! documentation).

use std::net::SocketAddr;

use axum::{
    Router,
    body::Bytes,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
    serve::ListenerExt as _,
};
use clap::Parser;
use serde::Deserialize as _;
use serde_json::{Map, Value};
use tidewatch_proto::{pbjson_types::Timestamp, v1::Sample};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "bare-axum",
    version,
    about = "Bare axum POST /ingest: tidewatch's JSON parse and answer shape, no detection (HTTP gateway benchmark baseline)"
)]
struct Args {
    /// Listen address.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:18481")]
    addr: SocketAddr,
}

/// A flat sample's fields, as the gateway reads them.
fn flat(map: Map<String, Value>) -> Option<Sample> {
    let mut sample = Sample::default();
    for (key, value) in map {
        match (key.as_str(), value) {
            ("timestamp" | "time", Value::Number(n)) => {
                let secs = n.as_f64()?;
                sample.time = Some(Timestamp {
                    seconds: secs.floor() as i64,
                    nanos: (secs.fract() * 1e9) as i32,
                });
            }
            ("device_id" | "deviceId", Value::String(id)) => sample.device_id = id,
            ("seq", Value::Number(n)) => sample.seq = n.as_u64()?,
            (_, Value::Number(n)) => {
                sample.metrics.insert(key, n.as_f64()?);
            }
            _ => return None,
        }
    }
    Some(sample)
}

/// Every sample of a body, or `None` when it is not one of the gateway's shapes.
fn samples(body: &[u8]) -> Option<Vec<Sample>> {
    let items = match serde_json::from_slice::<Value>(body).ok()? {
        Value::Array(items) => items,
        Value::Object(mut map)
            if matches!(map.get("samples"), Some(Value::Array(_)))
                && !map.contains_key("metrics") =>
        {
            match map.remove("samples") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            }
        }
        single => vec![single],
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(map) if map.contains_key("metrics") => {
                Sample::deserialize(Value::Object(map)).ok()
            }
            Value::Object(map) => flat(map),
            _ => None,
        })
        .collect()
}

/// `POST /ingest`.
async fn ingest(body: Bytes) -> Response {
    let json = [(header::CONTENT_TYPE, "application/json")];
    match samples(&body).map(tidewatch_loadgen::constant_verdicts) {
        Some(response) => match serde_json::to_vec(&response) {
            Ok(bytes) => (StatusCode::OK, json, bytes).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
        None => (
            StatusCode::BAD_REQUEST,
            json,
            r#"{"error":{"code":"invalid_argument","message":"malformed body"}}"#,
        )
            .into_response(),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tidewatch_loadgen::server_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let served: std::io::Result<()> = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        println!("http listening on {}", listener.local_addr()?);
        // TCP_NODELAY as the gateway sets it.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, Router::new().route("/ingest", post(ingest)))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-axum: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
