//! The baseline servers as child processes: each answers what tidewatch answers in
//! shape (one verdict per sample, device id and values echoed) and nothing more, and
//! every tool names itself and its version.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use crate::common::test_dir;

/// A baseline server started on a free port; killed on drop.
struct Baseline {
    child: Child,
    addr: SocketAddr,
}

impl Baseline {
    /// Starts `binary --addr 127.0.0.1:0` and reads the address from its
    /// "... listening on ADDR" line.
    fn start(binary: &str) -> Self {
        let mut child = Command::new(binary)
            .args(["--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the baseline");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_tool_has_a_version_and_a_description() {
    for binary in [
        env!("CARGO_BIN_EXE_tidewatch-bench"),
        env!("CARGO_BIN_EXE_bare-tonic"),
        env!("CARGO_BIN_EXE_bare-axum"),
    ] {
        let name = std::path::Path::new(binary)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let out = Command::new(binary).arg("--version").output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
        let help = Command::new(binary).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let about = help.lines().next().unwrap_or_default();
        assert!(about.len() > 30, "{name}: no description: {help}");
    }
}

#[test]
fn bare_tonic_answers_every_sample_and_judges_nothing() {
    let bare = Baseline::start(env!("CARGO_BIN_EXE_bare-tonic"));
    let report = test_dir("bare-tonic").join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tidewatch-bench"))
        .args(["--url", &format!("http://{}", bare.addr)])
        .args(["--threads", "1", "--batch", "5", "--devices", "300"])
        .args(["--messages", "200", "--output"])
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["statusCodeDistribution"], serde_json::json!({"OK": 200}));
    assert_eq!(r["tags"]["samples_answered"], "1000");
    assert_eq!(r["tags"]["anomalous_samples"], "0");
}

/// One HTTP/1.1 POST of a JSON body; the status and the parsed answer.
fn post(addr: SocketAddr, body: &str) -> (u16, Value) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let (_, json) = answer.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(json).unwrap())
}

#[test]
fn bare_axum_parses_the_gateway_shapes_and_answers_one_verdict_per_sample() {
    let bare = Baseline::start(env!("CARGO_BIN_EXE_bare-axum"));
    let single = r#"{"timestamp": 1710000000.5, "device_id": "fleet-eu-west/gw-000001/dev-000123", "cpu": 0.75, "rps": 150}"#;
    let (status, r) = post(bare.addr, single);
    assert_eq!(status, 200);
    let verdicts = r["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 1);
    assert_eq!(
        verdicts[0]["deviceId"],
        "fleet-eu-west/gw-000001/dev-000123"
    );
    assert_eq!(verdicts[0]["metrics"].as_array().unwrap().len(), 2);
    let batch = format!(
        r#"{{"samples": [{}, {{"device_id": "b", "metrics": {{"temp_c": 21.5}}}}]}}"#,
        single
    );
    let (status, r) = post(bare.addr, &batch);
    assert_eq!(status, 200);
    assert_eq!(r["verdicts"].as_array().unwrap().len(), 2);
    assert_eq!(r["verdicts"][1]["metrics"][0]["metric"], "temp_c");
    let (status, _) = post(bare.addr, r#"{"device_id": "x", "cpu": "high"}"#);
    assert_eq!(status, 400);
    let (status, _) = post(bare.addr, "{not json");
    assert_eq!(status, 400);
}
