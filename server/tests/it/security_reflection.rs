//! gRPC reflection under authentication, with the real grpcurl over real TLS:
//! `REFLECTION=auth` (the default) answers a caller with valid credentials and refuses
//! one without, `open` answers anyone, `off` answers nobody; and the grpcurl examples
//! of `docs/security.md` work as printed against a server set up as that page says
//! (its policy file, a key, the CA and a client certificate), with only the address
//! replaced.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use tidewatch_server::{config::Reflection, security::policy::hash_key_hex};

use crate::common::{
    TestServer,
    certs::{Ca, tempdir, write},
    grpcurl, sample,
};

const KEY: &str = "tw-reflection-key-0123456789abcdef0123";

fn policy() -> String {
    format!(
        r#"{{"principals": [{{"name": "reader", "scopes": ["analyze"], "devices": ["r/*"],
            "api_keys_sha256": ["{}"]}}]}}"#,
        hash_key_hex(KEY)
    )
}

/// CA and server certificate for `localhost` in a fresh directory: (dir, ca).
fn certificates(what: &str) -> (PathBuf, Ca) {
    let dir = tempdir(what);
    let ca = Ca::new("tidewatch reflection ca");
    let (cert, key) = ca.leaf(&["localhost"], "tidewatch");
    write(&dir, "server.pem", &cert);
    write(&dir, "server.key", &key);
    write(&dir, "ca.pem", &ca.pem);
    (dir, ca)
}

async fn server(dir: &Path, policy: &str, reflection: Reflection, mutual: bool) -> TestServer {
    let policy = write(dir, "policy.json", policy);
    let dir = dir.to_path_buf();
    TestServer::start_with(move |c| {
        c.tls_cert = Some(dir.join("server.pem"));
        c.tls_key = Some(dir.join("server.key"));
        c.tls_client_ca = mutual.then(|| dir.join("ca.pem"));
        c.auth_policy = Some(policy);
        c.reflection = reflection;
    })
    .await
}

/// grpcurl `list` against `server` over TLS, with `extra` flags before the address.
fn list(dir: &Path, server: &TestServer, extra: &[&str]) -> Output {
    Command::new(grpcurl())
        .current_dir(dir)
        .args(["-max-time", "10", "-cacert", "ca.pem"])
        .args(extra)
        .arg(format!("localhost:{}", server.grpc_addr.port()))
        .arg("list")
        .output()
        .expect("grpcurl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// grpcurl blocks its thread: the server runs on the runtime's other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_follows_the_api_rule_unless_set_open_or_off() {
    let (dir, _ca) = certificates("reflection-modes");
    let bearer = format!("authorization: Bearer {KEY}");
    let wrong = "authorization: Bearer not-a-known-key-0123456789abcdef";

    let auth = server(&dir, &policy(), Reflection::Auth, false).await;
    let out = list(&dir, &auth, &["-H", &bearer]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("tidewatch.v1.TelemetryService"),
        "{}",
        text(&out)
    );
    for extra in [&[][..], &["-H", wrong][..]] {
        let out = list(&dir, &auth, extra);
        assert!(!out.status.success(), "{extra:?}: {}", text(&out));
        assert!(
            text(&out).contains("Unauthenticated"),
            "{extra:?}: {}",
            text(&out)
        );
        assert!(!text(&out).contains("TelemetryService"), "{}", text(&out));
    }

    let open = server(&dir, &policy(), Reflection::Open, false).await;
    let out = list(&dir, &open, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("tidewatch.v1.TelemetryService"));

    let off = server(&dir, &policy(), Reflection::Off, false).await;
    let out = list(&dir, &off, &["-H", &bearer]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("does not support the reflection API"),
        "{}",
        text(&out)
    );
}

/// The `sh` blocks of `docs/security.md`'s "Examples" section, one command per entry
/// (continuation lines joined), that start with `program`.
fn documented(program: &str) -> Vec<String> {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md"))
            .expect("docs/security.md");
    let examples = &page[page.find("## Examples").expect("an Examples section")..];
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut current = String::new();
    for line in examples.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                let command = std::mem::take(&mut current);
                if command.starts_with(&format!("{program} ")) {
                    commands.push(command);
                }
            }
        }
    }
    commands
}

/// The policy file of `docs/security.md`, with `key`'s hash in place of the
/// placeholder.
fn documented_policy(key: &str) -> String {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md"))
            .expect("docs/security.md");
    let start = page.find("```json\n").expect("the policy example") + "```json\n".len();
    let json = &page[start..start + page[start..].find("```").unwrap()];
    json.replace("<hex SHA-256 of the key>", &hash_key_hex(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_grpcurl_examples_work_as_printed() {
    let (dir, ca) = certificates("reflection-docs");
    let (cert, key) = ca.leaf(&["spiffe://example.org/device/pump-7"], "pump-7");
    write(&dir, "client.pem", &cert);
    write(&dir, "client.key", &key);
    let policy = documented_policy(KEY);
    let commands = documented("grpcurl");
    assert!(
        commands.iter().any(|c| c.contains(" list"))
            && commands.iter().any(|c| c.contains("-cert client.pem")),
        "{commands:#?}"
    );
    // Keys for the token examples, client certificates (mutual TLS) for the others.
    for mutual in [false, true] {
        let server = server(&dir, &policy, Reflection::Auth, mutual).await;
        // The devices the examples read exist.
        let engine = &server.state.engine;
        let samples =
            ["fleet-a/pump-1", "fleet-a/pump-7"].map(|id| sample(id, 0, &[("rps", 420.0)]));
        engine.ingest_batch(&samples, &engine.default_detector(), &mut Vec::new());
        let address = format!("localhost:{}", server.grpc_addr.port());
        for command in commands
            .iter()
            .filter(|c| c.contains("-cert client.pem") == mutual)
        {
            let command = command.replace("tidewatch.example.com:50051", &address);
            let out = Command::new("bash")
                .current_dir(&dir)
                .env("KEY", KEY)
                .arg("-c")
                .arg(format!(
                    "exec {} {}",
                    grpcurl().display(),
                    &command["grpcurl ".len()..]
                ))
                .output()
                .expect("bash");
            assert!(out.status.success(), "{command}: {}", text(&out));
            let printed = text(&out);
            if command.contains(" list") {
                assert!(
                    printed.contains("tidewatch.v1.TelemetryService"),
                    "{printed}"
                );
            } else {
                assert!(printed.contains("\"windowCount\""), "{command}: {printed}");
            }
        }
    }
}
