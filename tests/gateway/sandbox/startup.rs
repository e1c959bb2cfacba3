//! Start-up: a bad fixture file is reported with its file, place and
//! problem (by the library and by the binary, which exits before it binds
//! anything); the binary without --upstream or --sandbox refuses to start,
//! naming both; a port in use is reported once, naming its flag; and the
//! sandbox listens where `GORMIC_LISTEN` says (loopback by default).

use std::path::PathBuf;

use gormic_gateway::sandbox::{Fixture, FixtureError};

use crate::support::binary::{SERVING, Serving, run_to_exit};

/// Writes `content` to a file of this test's own in the target tmp dir.
fn fixture_file(name: &str, content: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sandbox-{name}.json"));
    std::fs::write(&path, content).expect("write the fixture file");
    path
}

const SYNTAX_ERROR: &str =
    "{\n  \"orders\": [\n    {\"id\": \"ord-1\", \"status\": \"open\",}\n  ]\n}\n";

const DANGLING_CUSTOMER: &str = r#"{
  "customers": [],
  "orders": [
    {"id": "ord-1", "status": "closed", "customerId": "cus-missing", "paymentComplete": true}
  ]
}"#;

#[test]
fn syntax_errors_name_file_line_and_column() {
    let path = fixture_file("syntax", SYNTAX_ERROR);
    let error = Fixture::from_file(&path).expect_err("refused");
    assert!(
        matches!(error, FixtureError::Syntax { line: 3, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.starts_with(&format!(
            "sandbox fixture {}: line 3, column",
            path.display()
        )),
        "{text}"
    );
}

#[test]
fn semantic_errors_name_the_order_and_field() {
    let path = fixture_file("semantic", DANGLING_CUSTOMER);
    let text = Fixture::from_file(&path).expect_err("refused").to_string();
    assert_eq!(
        text,
        format!(
            "sandbox fixture {}: orders[0] (id \"ord-1\"), field customerId: \
             customer \"cus-missing\" is not defined in customers",
            path.display()
        )
    );
}

#[tokio::test]
async fn the_binary_refuses_a_bad_fixture_before_binding() {
    let path = fixture_file("binary-semantic", DANGLING_CUSTOMER);
    let output = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--sandbox",
        "--sandbox-fixture",
        path.to_str().expect("utf-8 path"),
    ])
    .await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&path.display().to_string())
            && stderr.contains("orders[0] (id \"ord-1\"), field customerId"),
        "{stderr}"
    );
    assert!(!stderr.contains("serving"), "nothing was started: {stderr}");

    let path = fixture_file("binary-syntax", SYNTAX_ERROR);
    let output = run_to_exit(&[
        "--sandbox",
        "--sandbox-fixture",
        path.to_str().expect("utf-8 path"),
    ])
    .await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3, column"), "{stderr}");
}

#[tokio::test]
async fn the_binary_without_upstream_or_sandbox_refuses_to_start() {
    let output = run_to_exit(&["--listen", "127.0.0.1:0"]).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--upstream") && stderr.contains("--sandbox"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_port_in_use_is_reported_once_naming_its_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = taken.local_addr().expect("its address").to_string();
    for (args, flag) in [
        (
            ["--listen", addr.as_str(), "--admin-listen", "off"],
            "--listen",
        ),
        (
            ["--listen", "127.0.0.1:0", "--admin-listen", addr.as_str()],
            "--admin-listen",
        ),
    ] {
        let mut all = vec!["--sandbox"];
        all.extend(args);
        let output = run_to_exit(&all).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{flag}: {stderr}");
        assert_eq!(
            stderr.matches("cannot listen on").count(),
            1,
            "{flag}: said once: {stderr}"
        );
        assert!(
            stderr.contains(&format!("cannot listen on {addr} ({flag}): ")),
            "{flag}: {stderr}"
        );
        assert!(
            !stderr.contains(SERVING),
            "{flag}: nothing served: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_sandbox_listens_where_gormic_listen_says() {
    let serving = Serving::start_with_env(
        &["--sandbox", "--log-format", "json"],
        &[("GORMIC_LISTEN", "127.0.0.1:0")],
    )
    .await;
    let addr = serving.grpc_addr();
    assert!(
        addr.ip().is_loopback() && addr.port() != 50051,
        "an ephemeral loopback port, as GORMIC_LISTEN says: {addr}"
    );
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
}
