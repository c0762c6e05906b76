//! Detectors over the real gRPC transport: the `detector` section of an Ingest
//! stream's first message, its errors, and `tidewatch-eval`'s gRPC replay giving the
//! same verdicts as the in-process one.

use crate::common::TestServer;
use tidewatch_proto::v1::{DetectorConfig, IngestRequest, Sample};
use tidewatch_server::{
    engine::DetectorKind,
    eval::{Series, replay_grpc, replay_in_process, synthetic},
};
use tonic::Code;

fn request(values: &[f64], detector: Option<DetectorConfig>) -> IngestRequest {
    IngestRequest {
        samples: values
            .iter()
            .map(|&v| Sample {
                device_id: "d".into(),
                metrics: [("rps".to_string(), v)].into_iter().collect(),
                ..Sample::default()
            })
            .collect(),
        detector,
    }
}

#[tokio::test]
async fn unknown_detector_ends_the_stream_with_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let detector = DetectorConfig {
        name: "magic".into(),
        ..DetectorConfig::default()
    };
    let outbound = tokio_stream::iter(vec![request(&[1.0], Some(detector))]);
    let mut inbound = client.ingest(outbound).await.unwrap().into_inner();
    let status = inbound.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("\"magic\""),
        "{}",
        status.message()
    );
    // Nothing was applied.
    assert!(!server.state.engine.contains("d"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn seed_check_keeps_anomaly_and_gains_alert_and_score() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let outbound = tokio_stream::iter(vec![
        request(&[420.0, 430.0, 410.0, 440.0, 425.0], None),
        request(&[900.0, 901.0], None),
    ]);
    let mut inbound = client.ingest(outbound).await.unwrap().into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    assert!(
        first
            .verdicts
            .iter()
            .all(|v| !v.anomaly && !v.alert && v.score == 0.0)
    );
    let second = inbound.message().await.unwrap().unwrap();
    let spike = &second.verdicts[0];
    assert!(spike.anomaly && spike.alert);
    assert!((spike.metrics[0].z_score - 47.5).abs() < 1e-9);
    assert!((spike.score - 47.5 / 49.5).abs() < 1e-9);
    // Still anomalous, same episode: no second page.
    assert!(second.verdicts[1].anomaly && !second.verdicts[1].alert);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn robust_detector_is_chosen_per_stream_and_ignores_the_detector_after_the_first_message() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let robust = DetectorConfig {
        name: "robust".into(),
        ..DetectorConfig::default()
    };
    let mut ordinary: Vec<f64> = (0..200).map(|i| 100.0 + f64::from(i % 7)).collect();
    ordinary.push(400.0);
    let outbound = tokio_stream::iter(vec![
        request(&ordinary, Some(robust)),
        // A later detector section is ignored (first message only).
        request(
            &[101.0],
            Some(DetectorConfig {
                name: "magic".into(),
                ..DetectorConfig::default()
            }),
        ),
    ]);
    let mut inbound = client.ingest(outbound).await.unwrap().into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    let (last, rest) = first.verdicts.split_last().unwrap();
    // The z-score rule would flag a 6 out of the 0..6 cycle now and then; robust does not.
    assert!(rest.iter().all(|v| !v.anomaly), "ordinary value flagged");
    assert!(last.anomaly && last.alert && last.score > 0.5, "{last:?}");
    let second = inbound.message().await.unwrap().unwrap();
    assert!(second.verdicts[0].error.is_empty());
    assert!(!second.verdicts[0].alert);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_replay_gives_the_in_process_verdicts() {
    let server = TestServer::start().await;
    let config = server.state.config.engine();
    let data = synthetic::generate(&synthetic::SyntheticSpec {
        series: 2,
        length: 3000,
        ..synthetic::SyntheticSpec::default()
    });
    let series: Vec<Series<'_>> = data
        .iter()
        .map(|s| (s.name.as_str(), s.times.as_slice(), s.values.as_slice()))
        .collect();
    for kind in [DetectorKind::ZScore, DetectorKind::Robust] {
        let spec = config.detector_defaults().spec(kind);
        let local = replay_in_process(&config, &spec, &series);
        let remote = replay_grpc(&server.grpc_url(), kind.as_str(), &spec, &series)
            .await
            .unwrap();
        assert_eq!(local.len(), remote.len());
        for (a, b) in local.iter().zip(&remote) {
            assert_eq!(a.anomaly.len(), 3000);
            assert_eq!(a.mismatches(b), 0, "{kind:?}");
        }
        assert!(
            local.iter().any(|j| j.alert.contains(&true)),
            "{kind:?} never alerted"
        );
    }
    server.stop().await.unwrap();
}
