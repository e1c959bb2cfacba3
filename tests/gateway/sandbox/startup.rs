//! Start-up refusals: a bad fixture file is reported with its file, place
//! and problem (by the library and by the binary, which exits before it
//! binds anything), and the binary without --upstream or --sandbox refuses
//! to start, naming both.

use std::path::PathBuf;

use gormic_gateway::sandbox::{Fixture, FixtureError};

use crate::support::binary::run_to_exit;

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
