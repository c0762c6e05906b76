//! Bad samples over the real gRPC server: each gets an error verdict with its stable
//! reason prefix, changes nothing, and the stream goes on.

use crate::common::{TestServer, drain, one, run_ingest, sample};
use bytes::Bytes;
use prost::Message as _;
use tidewatch_proto::v1::{IngestRequest, IngestResponse, Sample};

fn many_metrics(count: usize) -> Sample {
    Sample {
        device_id: "bad".into(),
        metrics: (0..count).map(|i| (format!("m{i}"), 1.0)).collect(),
        seq: 0,
        time: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_sample_gets_its_error_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let long_id = "d".repeat(200);
    // (request, expected error prefix or "" for a good sample)
    let cases: Vec<(IngestRequest, &str)> = vec![
        (one("bad", 1, &[("cpu", 1.0)]), ""),
        (
            one("bad", 2, &[("cpu", f64::NAN)]),
            "invalid_value: metric \"cpu\" is NaN",
        ),
        (
            one("bad", 3, &[("cpu", f64::INFINITY)]),
            "invalid_value: metric \"cpu\" is +Infinity",
        ),
        (
            one("bad", 4, &[("cpu", f64::NEG_INFINITY)]),
            "invalid_value: metric \"cpu\" is -Infinity",
        ),
        (one("bad", 5, &[]), "no_metrics"),
        (one(&long_id, 1, &[("cpu", 1.0)]), "invalid_device_id"),
        (one("bad", 6, &[("cpu load", 1.0)]), "invalid_metric_name"),
        (one("bad", 7, &[("", 1.0)]), "invalid_metric_name"),
        (
            one("bad", 8, &[(&"m".repeat(65), 1.0)]),
            "invalid_metric_name",
        ),
        (
            IngestRequest {
                samples: vec![many_metrics(33)],
                ..IngestRequest::default()
            },
            "too_many_metrics",
        ),
        // A bad metric among good ones refuses the whole sample.
        (
            one("bad", 9, &[("cpu", 2.0), ("rps", f64::NAN)]),
            "invalid_value: metric \"rps\"",
        ),
        // The stream is still alive, and none of the refused samples used up a seq.
        (one("bad", 2, &[("cpu", 3.0)]), ""),
    ];
    let requests: Vec<IngestRequest> = cases.iter().map(|(r, _)| r.clone()).collect();
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert!(status.is_none(), "the stream ended with {status:?}");
    assert_eq!(responses.len(), cases.len());
    for ((request, want), response) in cases.iter().zip(&responses) {
        assert_eq!(response.verdicts.len(), 1);
        let v = &response.verdicts[0];
        let s = &request.samples[0];
        assert_eq!((v.device_id.as_str(), v.seq), (s.device_id.as_str(), s.seq));
        if want.is_empty() {
            assert!(v.error.is_empty(), "unexpected error {}", v.error);
            assert!(!v.duplicate);
            assert_eq!(v.metrics.len(), s.metrics.len());
        } else {
            assert!(
                v.error.starts_with(want),
                "error {:?} does not start with {want:?}",
                v.error
            );
            assert!(v.metrics.is_empty() && !v.anomaly && !v.duplicate);
        }
    }
    // Only the two good samples reached the window; the long id created no device.
    let stats = server.state.engine.analyze("bad").expect("device bad");
    assert_eq!(stats.metrics.len(), 1, "{:?}", stats.metrics);
    assert_eq!(stats.metrics[0].window_count, 2);
    assert_eq!(stats.metrics[0].rolling_average, 2.0);
    assert_eq!(stats.last_seq, 2);
    assert_eq!(server.state.engine.device_count(), 1);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixes_good_and_bad_samples() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let batch = IngestRequest {
        samples: vec![
            sample("mix", 1, &[("cpu", 1.0)]),
            sample("mix", 2, &[("cpu", f64::NAN)]),
            sample("mix", 3, &[("cpu", 3.0)]),
            many_metrics(33),
            sample("", 0, &[("rps", 5.0)]),
        ],
        ..IngestRequest::default()
    };
    let mut stream = client
        .ingest(tokio_stream::iter(vec![
            batch,
            one("mix", 4, &[("cpu", 4.0)]),
        ]))
        .await
        .expect("ingest")
        .into_inner();
    let (responses, status) = drain(&mut stream).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(responses.len(), 2);
    let errors: Vec<&str> = responses[0]
        .verdicts
        .iter()
        .map(|v| v.error.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(errors, ["", "invalid_value", "", "too_many_metrics", ""]);
    // No device id means "default".
    assert_eq!(responses[0].verdicts[4].device_id, "default");
    let last = &responses[1].verdicts[0];
    assert!(last.error.is_empty());
    assert_eq!(last.metrics[0].window_count, 2);
    assert_eq!(last.metrics[0].mean, 2.0);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_and_device_limits_count_across_samples() {
    let server = TestServer::start_with(|c| {
        c.max_metrics_per_device = 2;
        c.max_devices = 2;
    })
    .await;
    let mut client = server.client().await;
    let requests = vec![
        one("a", 0, &[("m1", 1.0), ("m2", 1.0)]),
        // A third metric on a device that has two.
        one("a", 0, &[("m3", 1.0)]),
        // Known metrics are fine.
        one("a", 0, &[("m2", 2.0)]),
        one("b", 0, &[("m1", 1.0)]),
        // Its second sample: no device is on probation (docs/operations.md, "Memory").
        one("b", 0, &[("m1", 1.5)]),
        // A third device when two are in memory.
        one("c", 0, &[("m1", 1.0)]),
        one("b", 0, &[("m1", 2.0)]),
    ];
    let (responses, status) = run_ingest(&mut client, requests).await;
    assert!(status.is_none(), "{status:?}");
    let errors: Vec<&str> = responses
        .iter()
        .map(|r| r.verdicts[0].error.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        errors,
        ["", "too_many_metrics", "", "", "", "device_limit", ""]
    );
    server.stop().await.expect("clean shutdown");
}

/// Sends pre-encoded bytes as `Ingest` messages and decodes the responses with prost:
/// what a client with its own (or a broken) protobuf encoder puts on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawIngest;

#[derive(Debug, Clone, Copy, Default)]
struct ProstResponses;

impl tonic::codec::Decoder for ProstResponses {
    type Item = IngestResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<IngestResponse>, tonic::Status> {
        IngestResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Sends each message's bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawIngest {
    type Encode = Bytes;
    type Decode = IngestResponse;
    type Encoder = RawBytes;
    type Decoder = ProstResponses;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> ProstResponses {
        ProstResponses
    }
}

/// Opens an `Ingest` stream that sends `messages` as they are.
async fn raw_ingest(
    server: &TestServer,
    messages: Vec<Bytes>,
) -> Result<tonic::Streaming<IngestResponse>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.streaming(
        tonic::Request::new(tokio_stream::iter(messages)),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/tidewatch.v1.TelemetryService/Ingest",
        ),
        RawIngest,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A length-delimited field.
fn field(out: &mut Vec<u8>, number: u8, payload: &[u8]) {
    out.push((number << 3) | 2);
    out.push(u8::try_from(payload.len()).expect("short payload"));
    out.extend_from_slice(payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_but_valid_protobuf_is_read_as_prost_reads_it() {
    let server = TestServer::start().await;
    // A sample whose map repeats the key "cpu" (the last value counts), with an
    // unknown field, and its fields out of order: seq before device_id.
    let mut entry_old = Vec::new();
    field(&mut entry_old, 1, b"cpu");
    entry_old.push(0x11); // field 2, 64-bit
    entry_old.extend_from_slice(&1.0f64.to_le_bytes());
    let mut entry_new = Vec::new();
    field(&mut entry_new, 1, b"cpu");
    entry_new.push(0x11);
    entry_new.extend_from_slice(&42.5f64.to_le_bytes());
    let mut sample = vec![0x20, 0x07]; // seq = 7
    field(&mut sample, 3, &entry_old);
    field(&mut sample, 15, b"from a newer client");
    field(&mut sample, 1, b"raw-device");
    field(&mut sample, 3, &entry_new);
    let mut request = Vec::new();
    field(&mut request, 1, &sample);
    let expected = IngestRequest::decode(request.as_slice()).expect("prost reads it");
    assert_eq!(expected.samples[0].metrics["cpu"], 42.5);

    let mut responses = raw_ingest(&server, vec![Bytes::from(request)])
        .await
        .expect("stream");
    let response = responses.message().await.expect("ok").expect("a response");
    let verdict = &response.verdicts[0];
    assert_eq!((verdict.device_id.as_str(), verdict.seq), ("raw-device", 7));
    assert_eq!(verdict.metrics.len(), 1);
    assert_eq!(
        (verdict.metrics[0].metric.as_str(), verdict.metrics[0].value),
        ("cpu", 42.5)
    );
    assert!(verdict.error.is_empty(), "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_ends_the_stream_with_internal_and_the_server_goes_on() {
    let server = TestServer::start().await;
    let good = Bytes::from(one("raw", 1, &[("cpu", 1.0)]).encode_to_vec());
    // A sample field that claims 5 bytes and has 1; a device id that is not UTF-8.
    let truncated = Bytes::from_static(&[0x0a, 0x05, 0x0a]);
    let mut not_utf8 = Vec::new();
    let mut sample = Vec::new();
    field(&mut sample, 1, &[0xff, 0xfe]);
    field(&mut not_utf8, 1, &sample);
    for bad in [truncated, Bytes::from(not_utf8)] {
        let mut responses = raw_ingest(&server, vec![good.clone(), bad.clone(), good.clone()])
            .await
            .expect("stream");
        let first = responses.message().await.expect("first answered");
        assert_eq!(first.map(|r| r.verdicts.len()), Some(1));
        let status = responses
            .message()
            .await
            .expect_err("the malformed message ends the stream");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("failed to decode Protobuf message"),
            "{status:?}"
        );
    }
    // The server is fine: a normal stream is answered.
    let mut client = server.client().await;
    let (answered, status) = run_ingest(&mut client, vec![one("raw", 2, &[("cpu", 2.0)])]).await;
    assert_eq!((answered.len(), status.map(|s| s.code())), (1, None));
}
