//! Conformance of the `Ingest` fast path with tonic: one corpus of raw gRPC request
//! bodies (split frames, compression flags, oversized and truncated messages, bad
//! UTF-8, unknown fields and groups, repeated map keys, gzip, deflate and zstd
//! messages (whole, split, cut short, bombs), `grpc-encoding`,
//! `grpc-accept-encoding` and `content-type` headers) goes over real HTTP/2 to a
//! plain tonic server generated from the same proto (prost decoding, tonic's
//! compression, started here on `127.0.0.1:0`) and to the real server: with flush
//! consolidation and `GRPC_COMPRESSION=gzip,deflate,zstd` against a tonic server that
//! sends the same, and without either against one that sends none. Each answer (HTTP
//! status, gRPC status and message, `grpc-accept-encoding`, `grpc-encoding`, each
//! response's compressed flag and contents) must be the same, except for the
//! differences the contract in `server/src/grpc/fast.rs` lists, which are asserted as
//! such.
//!
//! Verdicts are the engine's, which a plain tonic service does not have: the
//! reference answers each sample with a verdict that echoes its device id, `seq` and
//! metrics, and the responses are compared on exactly those fields (what decoding
//! decides), not on the detector's numbers.

use std::{convert::Infallible, net::SocketAddr, pin::Pin, time::Duration};

use crate::common::TestServer;
use bytes::{Buf as _, Bytes};
use futures::Stream;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use prost::Message as _;
use tidewatch_proto::{
    pbjson_types::Timestamp,
    v1::{
        AnalyzeRequest, AnalyzeResponse, DeleteDeviceRequest, DeleteDeviceResponse, DetectorConfig,
        IngestRequest, IngestResponse, MetricVerdict, Sample, Verdict, WatchAnomaliesRequest,
        WatchAnomaliesResponse,
        telemetry_service_server::{TelemetryService, TelemetryServiceServer},
    },
};
use tidewatch_server::{
    config::GrpcCompression,
    fuzz::wire::{entry, group, key, len_field, raw_sample, sample_fields, unknowns, varint},
};
use tonic::{Code, Request, Response, Status, Streaming, codec::CompressionEncoding};

/// `MAX_MESSAGE_BYTES` of both servers.
const MAX_MESSAGE: usize = 4096;

/// The encodings both servers accept, in tonic's order.
const ENCODINGS: [CompressionEncoding; 3] = [
    CompressionEncoding::Gzip,
    CompressionEncoding::Deflate,
    CompressionEncoding::Zstd,
];

/// A plain tonic `TelemetryService`: prost decodes, each request is answered with an
/// echo of its samples, and a receive error ends the stream with its status (what a
/// tonic service does with `message().await?`).
struct Reference;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TelemetryService for Reference {
    type IngestStream = BoxStream<IngestResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let mut inbound = request.into_inner();
        let stream = async_stream::try_stream! {
            while let Some(request) = inbound.message().await? {
                yield IngestResponse {
                    verdicts: request.samples.into_iter().map(echo).collect(),
                };
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn analyze(
        &self,
        _request: Request<AnalyzeRequest>,
    ) -> Result<Response<AnalyzeResponse>, Status> {
        Err(Status::unimplemented("the reference serves Ingest only"))
    }

    async fn delete_device(
        &self,
        _request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        Err(Status::unimplemented("the reference serves Ingest only"))
    }

    type WatchAnomaliesStream = BoxStream<WatchAnomaliesResponse>;

    async fn watch_anomalies(
        &self,
        _request: Request<WatchAnomaliesRequest>,
    ) -> Result<Response<Self::WatchAnomaliesStream>, Status> {
        Err(Status::unimplemented("the reference serves Ingest only"))
    }
}

/// The reference's verdict: what decoding decided about the sample.
fn echo(sample: Sample) -> Verdict {
    Verdict {
        device_id: sample.device_id,
        seq: sample.seq,
        metrics: sample
            .metrics
            .into_iter()
            .map(|(metric, value)| MetricVerdict {
                metric,
                value,
                ..MetricVerdict::default()
            })
            .collect(),
        ..Verdict::default()
    }
}

/// Starts the reference on a free port: it accepts gzip, deflate and zstd, and sends
/// them when `compressing` (as the server does with `GRPC_COMPRESSION=gzip,deflate,zstd`).
async fn start_reference(compressing: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut service = TelemetryServiceServer::new(Reference).max_decoding_message_size(MAX_MESSAGE);
    for encoding in ENCODINGS {
        service = service.accept_compressed(encoding);
        if compressing {
            service = service.send_compressed(encoding);
        }
    }
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A verdict as compared: device id, `seq`, and the metrics' names and value bits.
type Echo = (String, u64, Vec<(String, u64)>);

/// What one call came to, as a client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    http: u16,
    code: Code,
    message: String,
    accept_encoding: Option<String>,
    /// The responses' `grpc-encoding`.
    encoding: Option<String>,
    /// Each response, in order: whether it is compressed, and its verdicts.
    responses: Vec<(bool, Vec<Echo>)>,
}

/// One corpus entry: a request body as DATA frames, with extra headers.
struct Case {
    name: String,
    /// Headers besides `te` and `content-type: application/grpc` (a `content-type`
    /// here replaces it; an empty value leaves the header out).
    headers: Vec<(&'static str, &'static str)>,
    frames: Vec<Vec<u8>>,
    /// Request trailers after the frames.
    trailers: bool,
    expect: Expect,
}

/// How the real server's answer relates to the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The same in every field.
    Same,
    /// A message over `MAX_MESSAGE_BYTES`: `RESOURCE_EXHAUSTED` instead of
    /// `OUT_OF_RANGE`, tonic's text naming the setting; the rest the same.
    TooLarge,
    /// A message that decompresses past `MAX_MESSAGE_BYTES`: `RESOURCE_EXHAUSTED` as
    /// tonic, its text naming the setting; the rest the same.
    Bomb,
    /// A `content-type` that is not gRPC: tonic serves it; the real server answers
    /// HTTP 415 with `INTERNAL` and reads nothing.
    NotGrpc,
}

/// Sends `case` on a new HTTP/2 connection to `addr`.
async fn call(addr: SocketAddr, case: &Case) -> Outcome {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = case
        .frames
        .iter()
        .map(|f| Ok(Frame::data(Bytes::from(f.clone()))))
        .collect();
    if case.trailers {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-client-trailer", "1".parse().expect("ascii"));
        frames.push(Ok(Frame::trailers(trailers)));
    }
    let mut request = http::Request::post(format!(
        "http://{addr}/tidewatch.v1.TelemetryService/Ingest"
    ))
    .header("te", "trailers");
    if !case.headers.iter().any(|(k, _)| *k == "content-type") {
        request = request.header("content-type", "application/grpc");
    }
    for (name, value) in &case.headers {
        if !value.is_empty() {
            request = request.header(*name, *value);
        }
    }
    let request = request
        .body(StreamBody::new(futures::stream::iter(frames)))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("an answer")
        .expect("h2 response");
    let http = response.status().as_u16();
    let accept_encoding = response
        .headers()
        .get("grpc-accept-encoding")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let encoding = response
        .headers()
        .get("grpc-encoding")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let header_status = Status::from_header_map(response.headers());
    let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends")
        .expect("no body error");
    let status = collected
        .trailers()
        .and_then(Status::from_header_map)
        .or(header_status)
        .expect("a grpc-status");
    let mut data = collected.to_bytes();
    let mut responses = Vec::new();
    while !data.is_empty() {
        let compressed = match data[0] {
            0 => false,
            1 => true,
            flag => panic!("{}: response flag {flag}", case.name),
        };
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        data.advance(5);
        let mut message = data.split_to(len);
        if compressed {
            let encoding = encoding
                .as_deref()
                .expect("a compressed response names its encoding");
            message = decompress(encoding, &message);
        }
        let response = IngestResponse::decode(message).expect("a response");
        responses.push((compressed, response.verdicts.iter().map(project).collect()));
    }
    Outcome {
        http,
        code: status.code(),
        message: status.message().to_owned(),
        accept_encoding,
        encoding,
        responses,
    }
}

/// `data` compressed with the named encoding, at the level tonic uses.
fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(data).expect("in memory");
            e.finish().expect("in memory")
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(data).expect("in memory");
            e.finish().expect("in memory")
        }
        "zstd" => zstd::encode_all(data, 3).expect("in memory"),
        other => panic!("no encoding {other}"),
    }
}

/// A response's bytes decompressed with the named encoding.
fn decompress(encoding: &str, data: &[u8]) -> Bytes {
    use std::io::Read as _;
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(data).and_then(|mut d| d.read_to_end(&mut out)),
        other => panic!("no encoding {other}"),
    }
    .expect("a response decompresses");
    Bytes::from(out)
}

fn project(verdict: &Verdict) -> Echo {
    let mut metrics: Vec<(String, u64)> = verdict
        .metrics
        .iter()
        .map(|m| (m.metric.clone(), m.value.to_bits()))
        .collect();
    metrics.sort();
    (verdict.device_id.clone(), verdict.seq, metrics)
}

/// A gRPC message: flag, length, bytes.
fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(message.len()).expect("short").to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// An `IngestRequest` of one sample per device, as prost encodes it.
fn request(devices: &[&str], seq: u64) -> Vec<u8> {
    IngestRequest {
        samples: devices
            .iter()
            .enumerate()
            .map(|(i, d)| Sample {
                device_id: (*d).to_owned(),
                seq,
                metrics: [("cpu".to_owned(), 40.0 + i as f64), ("rps".to_owned(), 7.5)].into(),
                time: None,
            })
            .collect(),
        detector: None,
    }
    .encode_to_vec()
}

fn case(name: impl Into<String>, frames: Vec<Vec<u8>>) -> Case {
    Case {
        name: name.into(),
        headers: Vec::new(),
        frames,
        trailers: false,
        expect: Expect::Same,
    }
}

/// The corpus. Device ids are unique per case, so no verdict is a duplicate.
fn corpus() -> Vec<Case> {
    let mut cases = vec![
        case("one message", vec![one_of("one")]),
        case("empty body", vec![]),
        case(
            "an empty DATA frame",
            vec![vec![], one_of("empty-frame"), vec![]],
        ),
        case("an empty message", vec![framed(0, &[])]),
    ];
    let three: Vec<u8> = [
        framed(0, &request(&["three-a"], 1)),
        framed(0, &request(&["three-b", "three-c"], 2)),
        framed(0, &request(&["three-d"], 3)),
    ]
    .concat();
    cases.push(case("three messages in one frame", vec![three]));
    for cut in [1, 3, 5, 6, 20, usize::MAX] {
        let split = [
            framed(0, &request(&[&format!("split{cut}-a")], 1)),
            framed(0, &request(&[&format!("split{cut}-b")], 2)),
        ]
        .concat();
        // usize::MAX: one byte before the end.
        let cut = cut.min(split.len() - 1);
        cases.push(case(
            format!("split at byte {cut}"),
            vec![split[..cut].to_vec(), split[cut..].to_vec()],
        ));
    }
    let bytewise = framed(0, &request(&["bytewise"], 1));
    cases.push(case(
        "one byte per frame",
        bytewise.iter().map(|&b| vec![b]).collect(),
    ));
    let many: Vec<u8> = (0..1500)
        .flat_map(|i| framed(0, &request(&[&format!("many-{i}")], i)))
        .collect();
    cases.push(case(
        "1,500 messages, several chunks of answers",
        vec![many],
    ));
    let devices: Vec<String> = (0..40).map(|i| format!("batch-{i}")).collect();
    let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
    cases.push(case(
        "40 samples in a message",
        vec![framed(0, &request(&refs, 1))],
    ));

    // Compression flags.
    cases.push(case(
        "compressed flag",
        vec![[one_of("flag1-first"), framed(1, &request(&["never"], 1))].concat()],
    ));
    for flag in [2u8, 128, 255] {
        cases.push(case(
            format!("flag {flag}"),
            vec![
                [
                    one_of(&format!("flag{flag}-first")),
                    framed(flag, &request(&["never"], 1)),
                ]
                .concat(),
            ],
        ));
    }

    // Sizes.
    let mut announced = framed(0, &request(&["big-first"], 1));
    announced.extend_from_slice(&[0, 0, 0, 0x10, 0x01]); // 4097 bytes announced
    let mut oversized = case("oversized, announced only", vec![announced]);
    oversized.expect = Expect::TooLarge;
    cases.push(oversized);
    let big = IngestRequest {
        samples: vec![Sample {
            device_id: "big".into(),
            metrics: (0..400).map(|i| (format!("m{i:03}"), 1.0)).collect(),
            ..Sample::default()
        }],
        detector: None,
    }
    .encode_to_vec();
    assert!(big.len() > MAX_MESSAGE);
    let mut whole = case("oversized, sent whole", vec![framed(0, &big)]);
    whole.expect = Expect::TooLarge;
    cases.push(whole);
    cases.push(case(
        "a message of exactly the limit",
        vec![framed(0, &at_limit("at-limit"))],
    ));
    let cut = framed(0, &request(&["cut"], 1));
    cases.push(case(
        "body ends inside a message",
        vec![[one_of("whole"), cut[..cut.len() - 1].to_vec()].concat()],
    ));
    cases.push(case("body ends inside a prefix", vec![vec![0, 0, 0]]));

    // Protobuf contents.
    let mut bad_id = Vec::new();
    len_field(&mut bad_id, 1, &[0xff, 0xfe]);
    cases.push(case(
        "device id not UTF-8",
        vec![[one_of("utf8-first"), framed(0, &raw_sample(&bad_id))].concat()],
    ));
    let mut bad_name = Vec::new();
    len_field(&mut bad_name, 1, b"dev");
    len_field(&mut bad_name, 3, &entry(&[b'c', 0xc3], 1.0));
    cases.push(case(
        "metric name not UTF-8",
        vec![framed(0, &raw_sample(&bad_name))],
    ));
    let mut bad_detector = Vec::new();
    len_field(&mut bad_detector, 1, &[0xe2, 0x82]);
    let mut r = request(&["detector-bad"], 1);
    len_field(&mut r, 2, &bad_detector);
    cases.push(case("detector name not UTF-8", vec![framed(0, &r)]));
    let mut r = request(&["detector-good"], 1);
    len_field(
        &mut r,
        2,
        &DetectorConfig {
            name: "zscore".into(),
            ..DetectorConfig::default()
        }
        .encode_to_vec(),
    );
    cases.push(case("a detector section", vec![framed(0, &r)]));
    let whole = request(&["trunc"], 1);
    cases.push(case(
        "protobuf cut inside a sample",
        vec![framed(0, &whole[..whole.len() - 4])],
    ));
    let mut overrun = Vec::new();
    // A sample of 4 bytes whose device id claims 6: it runs past the sample.
    overrun.extend_from_slice(&[0x0A, 4, 0x0A, 6, b'a', b'b']);
    overrun.extend_from_slice(&[0x20, 1, 0x20, 1]);
    cases.push(case(
        "a field runs past its sample",
        vec![framed(0, &overrun)],
    ));
    cases.push(case(
        "samples with the wrong wire type",
        vec![framed(0, &[0x08, 0x01])],
    ));
    cases.push(case("an invalid varint", vec![framed(0, &[0x0A, 0xff])]));
    cases.push(case("field number 0", vec![framed(0, &[0x02, 0x00])]));
    cases.push(case("wire type 7", vec![framed(0, &[0x0F])]));

    // Unknown fields and groups, where each message may have them.
    let mut top = unknowns();
    top.extend(raw_sample(&sample_fields("unknown-top")));
    top.extend(unknowns());
    cases.push(case(
        "unknown fields and groups at the top",
        vec![framed(0, &top)],
    ));
    let mut in_sample = unknowns();
    in_sample.extend(sample_fields("unknown-sample"));
    in_sample.extend(unknowns());
    cases.push(case(
        "unknown fields and groups in a sample",
        vec![framed(0, &raw_sample(&in_sample))],
    ));
    let mut e = entry(b"rps", 3.0);
    e.extend(unknowns());
    let mut t = Timestamp {
        seconds: 1_710_000_000,
        nanos: 7,
    }
    .encode_to_vec();
    t.extend(unknowns());
    let mut s = sample_fields("unknown-entry");
    len_field(&mut s, 3, &e);
    len_field(&mut s, 2, &t);
    cases.push(case(
        "unknown fields and groups in a map entry and a timestamp",
        vec![framed(0, &raw_sample(&s))],
    ));
    let nested = |depth: usize| (0..depth).fold(Vec::new(), |inner, _| group(7, &inner));
    for depth in [100, 101] {
        let mut r = raw_sample(&sample_fields(&format!("nested-{depth}")));
        r.extend(nested(depth));
        cases.push(case(
            format!("a group nested {depth} deep"),
            vec![framed(0, &r)],
        ));
    }
    let mut r = raw_sample(&sample_fields("end-group"));
    key(&mut r, 9, 4);
    cases.push(case("an end-group tag alone", vec![framed(0, &r)]));
    let mut r = raw_sample(&sample_fields("unterminated"));
    key(&mut r, 9, 3);
    cases.push(case("a group without its end", vec![framed(0, &r)]));
    let mut r = raw_sample(&sample_fields("wrong-end"));
    key(&mut r, 9, 3);
    key(&mut r, 8, 4);
    cases.push(case("a group ended by another field", vec![framed(0, &r)]));

    // Map keys and field order.
    let mut s = Vec::new();
    len_field(&mut s, 3, &entry(b"rps", 1.0));
    varint(&mut s, 0x20);
    varint(&mut s, 7);
    len_field(&mut s, 1, b"ignored");
    len_field(&mut s, 3, &entry(b"cpu", 2.0));
    len_field(&mut s, 3, &entry(b"rps", 3.0));
    len_field(&mut s, 1, b"repeated-keys");
    len_field(&mut s, 3, &entry(b"cpu", 4.0));
    cases.push(case(
        "repeated map keys and fields out of order",
        vec![framed(0, &raw_sample(&s))],
    ));
    let mut s = sample_fields("entry-shapes");
    // Value before key, a missing value, a repeated key inside the entry.
    let mut e = vec![0x11];
    e.extend_from_slice(&9.5f64.to_le_bytes());
    len_field(&mut e, 1, b"mem");
    len_field(&mut s, 3, &e);
    let mut e = Vec::new();
    len_field(&mut e, 1, b"disk");
    len_field(&mut s, 3, &e);
    let mut e = entry(b"abc", 1.0);
    len_field(&mut e, 1, b"net");
    len_field(&mut s, 3, &e);
    cases.push(case(
        "map entries off prost's shape",
        vec![framed(0, &raw_sample(&s))],
    ));
    let mut s = sample_fields("max-seq");
    varint(&mut s, 0x20);
    varint(&mut s, u64::MAX);
    cases.push(case("seq u64::MAX", vec![framed(0, &raw_sample(&s))]));

    // Headers.
    for (i, encoding) in ["gzip", "deflate", "zstd", "br", "GZIP", "gzip,zstd", ""]
        .into_iter()
        .enumerate()
    {
        let mut c = case(
            format!("grpc-encoding {encoding:?}, an uncompressed message"),
            vec![one_of(&format!("named-{i}"))],
        );
        c.headers.push(("grpc-encoding", encoding));
        cases.push(c);
    }
    let mut c = case(
        "grpc-encoding gzip with a message that is not gzip",
        vec![framed(1, &request(&["gz"], 1))],
    );
    c.headers.push(("grpc-encoding", "gzip"));
    cases.push(c);
    let mut c = case(
        "grpc-encoding identity with the compressed flag",
        vec![framed(
            1,
            &compress("gzip", &request(&["identity-flag"], 1)),
        )],
    );
    c.headers.push(("grpc-encoding", "identity"));
    cases.push(c);
    cases.extend(compressed_cases());
    cases.extend(accept_encoding_cases());
    let mut c = case("grpc-encoding identity", vec![one_of("identity")]);
    c.headers.push(("grpc-encoding", "identity"));
    cases.push(c);
    let mut c = case(
        "content-type application/grpc+proto",
        vec![one_of("plus-proto")],
    );
    c.headers.push(("content-type", "application/grpc+proto"));
    cases.push(c);
    for content_type in [
        "application/json",
        "text/plain",
        "application/grpc+json",
        "",
    ] {
        let mut c = case(
            format!("content-type {content_type:?}"),
            vec![one_of("not-grpc")],
        );
        c.headers.push(("content-type", content_type));
        c.expect = Expect::NotGrpc;
        cases.push(c);
    }
    let mut c = case("request trailers", vec![one_of("trailers")]);
    c.trailers = true;
    cases.push(c);
    cases
}

/// Compressed requests, for each encoding: whole, mixed with uncompressed messages,
/// split across frames, empty, at and over the limit once decompressed (bombs), cut
/// short, not compressed at all, over the limit compressed, and answered compressed.
fn compressed_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for encoding in ["gzip", "deflate", "zstd"] {
        let named = |name: String, frames: Vec<Vec<u8>>| {
            let mut c = case(format!("{encoding}: {name}"), frames);
            c.headers.push(("grpc-encoding", encoding));
            c
        };
        let packed =
            |device: &str, seq: u64| framed(1, &compress(encoding, &request(&[device], seq)));
        let id = |name: &str| format!("{encoding}-{name}");
        cases.push(named("one message".into(), vec![packed(&id("one"), 1)]));
        cases.push(named(
            "compressed and uncompressed messages in one frame".into(),
            vec![
                [
                    packed(&id("mix-a"), 1),
                    one_of(&id("mix-b")),
                    packed(&id("mix-c"), 1),
                ]
                .concat(),
            ],
        ));
        let two = |cut: usize| {
            let a = packed(&id(&format!("split{cut}-a")), 1);
            [a, packed(&id(&format!("split{cut}-b")), 2)].concat()
        };
        for cut in [3, 9, usize::MAX] {
            let two = two(cut);
            let cut = cut.min(two.len() - 1);
            cases.push(named(
                format!("split at byte {cut}"),
                vec![two[..cut].to_vec(), two[cut..].to_vec()],
            ));
        }
        let devices: Vec<String> = (0..40).map(|i| id(&format!("batch-{i}"))).collect();
        let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
        cases.push(named(
            "40 samples in a message".into(),
            vec![framed(1, &compress(encoding, &request(&refs, 1)))],
        ));
        cases.push(named(
            "an empty message".into(),
            vec![framed(1, &compress(encoding, &[]))],
        ));
        cases.push(named("no bytes at all".into(), vec![framed(1, &[])]));
        cases.push(named(
            "exactly the limit once decompressed".into(),
            vec![framed(1, &compress(encoding, &at_limit(&id("at-limit"))))],
        ));
        let over = padded(&id("over-limit"), MAX_MESSAGE + 1);
        let mut c = named(
            "one byte over the limit once decompressed".into(),
            vec![
                [
                    one_of(&id("before-over")),
                    framed(1, &compress(encoding, &over)),
                ]
                .concat(),
            ],
        );
        c.expect = Expect::Bomb;
        cases.push(c);
        // 512 times the limit in half of it (deflate expands at most about 1,000-fold).
        let bomb = compress(encoding, &vec![0; 2 << 20]);
        assert!(bomb.len() < MAX_MESSAGE, "{encoding}: {} bytes", bomb.len());
        let mut c = named(
            "a bomb (2 MiB of zeros)".into(),
            vec![
                [
                    one_of(&id("before-bomb")),
                    framed(1, &bomb),
                    packed(&id("never"), 1),
                ]
                .concat(),
            ],
        );
        c.expect = Expect::Bomb;
        cases.push(c);
        let whole = compress(encoding, &request(&[&id("cut")], 1));
        for keep in [whole.len() / 2, whole.len() - 1] {
            cases.push(named(
                format!("compressed data cut to {keep} of {} bytes", whole.len()),
                vec![
                    [
                        one_of(&id(&format!("before-cut-{keep}"))),
                        framed(1, &whole[..keep]),
                    ]
                    .concat(),
                ],
            ));
        }
        cases.push(named(
            "data that is not compressed".into(),
            vec![framed(1, b"\x0a\x05hello, not compressed")],
        ));
        cases.push(named(
            "decompresses to invalid protobuf".into(),
            vec![framed(1, &compress(encoding, &[0x0A, 0xff]))],
        ));
        // Incompressible bytes: the compressed message itself is over the limit.
        let mut noise = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while noise.len() < 2 * MAX_MESSAGE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        let mut r = request(&[&id("noise")], 1);
        len_field(&mut r, 99, &noise);
        let mut c = named(
            "over the limit compressed".into(),
            vec![framed(1, &compress(encoding, &r))],
        );
        c.expect = Expect::TooLarge;
        cases.push(c);
        let cut = packed(&id("eof"), 2);
        cases.push(named(
            "body ends inside a compressed message".into(),
            vec![[packed(&id("eof-first"), 1), cut[..cut.len() - 1].to_vec()].concat()],
        ));
        let mut c = named(
            "compressed in, the same accepted out".into(),
            vec![[packed(&id("both-a"), 1), packed(&id("both-b"), 2)].concat()],
        );
        c.headers.push(("grpc-accept-encoding", encoding));
        cases.push(c);
        let mut c = named(
            "a bomb with compressed answers before it".into(),
            vec![[packed(&id("bomb-answered"), 1), framed(1, &bomb)].concat()],
        );
        c.headers.push(("grpc-accept-encoding", encoding));
        c.expect = Expect::Bomb;
        cases.push(c);
    }
    cases
}

/// Uncompressed requests that accept compressed answers: `grpc-accept-encoding` as
/// grpcio and grpc-js send it (`identity,deflate,gzip`), as Connect does (`gzip,br`),
/// in other orders and spacings, with unknown names only, and with many answers, an
/// empty one and an error.
fn accept_encoding_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, accept) in [
        "gzip",
        "identity,deflate,gzip",
        "gzip,br",
        "zstd",
        " zstd , gzip",
        "br",
        "identity",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = case(
            format!("grpc-accept-encoding {accept:?}"),
            vec![
                [
                    one_of(&format!("accept-{i}-a")),
                    one_of(&format!("accept-{i}-b")),
                ]
                .concat(),
            ],
        );
        c.headers.push(("grpc-accept-encoding", accept));
        cases.push(c);
    }
    let many: Vec<u8> = (0..1500)
        .flat_map(|i| framed(0, &request(&[&format!("accept-many-{i}")], i)))
        .collect();
    let mut c = case("gzip accepted, 1,500 answers", vec![many]);
    c.headers.push(("grpc-accept-encoding", "gzip"));
    cases.push(c);
    let mut c = case("zstd accepted, an empty message", vec![framed(0, &[])]);
    c.headers.push(("grpc-accept-encoding", "zstd"));
    cases.push(c);
    let mut bad = Vec::new();
    len_field(&mut bad, 1, &[0xff, 0xfe]);
    let mut c = case(
        "deflate accepted, an error after an answer",
        vec![[one_of("accept-error-first"), framed(0, &raw_sample(&bad))].concat()],
    );
    c.headers.push(("grpc-accept-encoding", "deflate"));
    cases.push(c);
    cases
}

/// A request of one sample `device`, padded with an unknown field to exactly
/// `MAX_MESSAGE` bytes.
fn at_limit(device: &str) -> Vec<u8> {
    padded(device, MAX_MESSAGE)
}

/// A request of one sample `device`, padded with an unknown field to `size` bytes.
fn padded(device: &str, size: usize) -> Vec<u8> {
    let mut m = request(&[device], 1);
    // The padding field's key and length take two bytes each.
    let pad = size - m.len() - 4;
    len_field(&mut m, 99, &vec![b'p'; pad]);
    assert_eq!(m.len(), size);
    m
}

/// One framed single-sample request for `device`.
fn one_of(device: &str) -> Vec<u8> {
    framed(0, &request(&[device], 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_answers_the_corpus_as_tonic_does() {
    let compressing_reference = start_reference(true).await;
    let plain_reference = start_reference(false).await;
    // The corpus tests the wire, not the engine's rules: any seq is applied (the
    // `seq u64::MAX` case would otherwise be refused as `invalid_seq`).
    let consolidating = TestServer::start_with(|c| {
        c.max_message_bytes = MAX_MESSAGE;
        c.flush_consolidation = true;
        c.max_seq_jump = u64::MAX;
        c.grpc_compression = vec![
            GrpcCompression::Gzip,
            GrpcCompression::Deflate,
            GrpcCompression::Zstd,
        ];
    })
    .await;
    let direct = TestServer::start_with(|c| {
        c.max_message_bytes = MAX_MESSAGE;
        c.flush_consolidation = false;
        c.max_seq_jump = u64::MAX;
    })
    .await;
    let corpus = corpus();
    assert!(corpus.len() >= 120, "{} cases", corpus.len());
    let mut failures = Vec::new();
    let mut compressed_answers = 0;
    for case in &corpus {
        for (server, reference) in [
            (&consolidating, compressing_reference),
            (&direct, plain_reference),
        ] {
            let theirs = call(reference, case).await;
            let ours = call(server.grpc_addr, case).await;
            compressed_answers += ours.responses.iter().filter(|(c, _)| *c).count();
            if let Err(why) = compare(case, &theirs, &ours) {
                failures.push(format!(
                    "{} (consolidation {}, GRPC_COMPRESSION {:?}): {why}\n  tonic: {theirs:?}\n  ours:  {ours:?}",
                    case.name,
                    server.state.config.flush_consolidation,
                    server.state.config.grpc_compression,
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Not a corpus that compares nothing compressed.
    assert!(
        compressed_answers > 1500,
        "{compressed_answers} compressed answers"
    );
    consolidating.stop().await.expect("clean shutdown");
    direct.stop().await.expect("clean shutdown");
}

/// Whether `ours` is what `case.expect` says it must be, given tonic's answer.
fn compare(case: &Case, theirs: &Outcome, ours: &Outcome) -> Result<(), String> {
    match case.expect {
        Expect::Same => {
            if ours != theirs {
                return Err("answers differ".into());
            }
        }
        Expect::TooLarge => {
            if theirs.code != Code::OutOfRange || ours.code != Code::ResourceExhausted {
                return Err("codes are not OUT_OF_RANGE and RESOURCE_EXHAUSTED".into());
            }
            if ours.message != format!("{} (MAX_MESSAGE_BYTES)", theirs.message) {
                return Err("messages differ beyond the setting's name".into());
            }
            let same_rest = Outcome {
                code: theirs.code,
                message: theirs.message.clone(),
                ..ours.clone()
            };
            if &same_rest != theirs {
                return Err("answers differ".into());
            }
        }
        Expect::Bomb => {
            if theirs.code != Code::ResourceExhausted || ours.code != Code::ResourceExhausted {
                return Err("codes are not both RESOURCE_EXHAUSTED".into());
            }
            if ours.message != format!("{} (MAX_MESSAGE_BYTES)", theirs.message) {
                return Err("messages differ beyond the setting's name".into());
            }
            let same_rest = Outcome {
                message: theirs.message.clone(),
                ..ours.clone()
            };
            if &same_rest != theirs {
                return Err("answers differ".into());
            }
        }
        Expect::NotGrpc => {
            // tonic serves any content-type as gRPC; the fast path refuses it.
            if (theirs.http, theirs.code) != (200, Code::Ok) || theirs.responses.len() != 1 {
                return Err("tonic no longer serves it: re-check the contract".into());
            }
            let shown = case
                .headers
                .iter()
                .find(|(k, _)| *k == "content-type")
                .map(|(_, v)| *v)
                .filter(|v| !v.is_empty())
                .map_or_else(|| "none".to_owned(), |v| format!("{v:?}"));
            let expected = Outcome {
                http: 415,
                code: Code::Internal,
                message: format!("invalid gRPC request content-type {shown}"),
                accept_encoding: None,
                encoding: None,
                responses: Vec::new(),
            };
            if ours != &expected {
                return Err(format!("expected {expected:?}"));
            }
        }
    }
    Ok(())
}
