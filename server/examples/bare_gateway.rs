//! The baseline of the HTTP gateway benchmark (`scripts/bench-gateway.sh`): a bare
//! axum server whose `POST /ingest` reads the body, parses the same JSON the gateway
//! parses (into a `serde_json::Value`), and answers a constant. No engine, no
//! middleware, no metrics: what HTTP plus JSON parsing alone costs on this machine.
//!
//! `cargo run --release --example bare_gateway -- 127.0.0.1:18081`

use std::net::SocketAddr;

use axum::{Router, body::Bytes, http::StatusCode, routing::post, serve::ListenerExt as _};

/// Parses the body as JSON and answers a constant verdict list.
async fn ingest(body: Bytes) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    let content = [("content-type", "application/json")];
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(value) if value.is_object() || value.is_array() => {
            (StatusCode::OK, content, r#"{"verdicts":[]}"#)
        }
        _ => (
            StatusCode::BAD_REQUEST,
            content,
            r#"{"error":{"code":"invalid_argument","message":"malformed JSON"}}"#,
        ),
    }
}

fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("bare gateway listening on {}", listener.local_addr()?);
        // TCP_NODELAY like the gateway, so the comparison is of the work only.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, Router::new().route("/ingest", post(ingest))).await?;
        Ok(())
    })
}
