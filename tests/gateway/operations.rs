//! What operators and debugging humans rely on: health, reflection, the call
//! log (and that it never shows the api-key), graceful shutdown, and the
//! binary's start-up and signal handling.

use std::time::Duration;

use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
};

use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;

use crate::support::binary::{Serving, run_to_exit};
use crate::support::gateway::endpoint;
use crate::support::{
    FakeUpstream, ORGANIZATION, PATIENCE, Scripted, TestGateway, authed, logs, spawn_app,
    with_metadata, within,
};

const SERVICE: &str = "gormic.om.v1.InvoiceService";

fn closed() -> serde_json::Value {
    json!({"invoiceNumber": 7, "invoiceSource": "POS", "invoicedAt": "2026-11-25T10:00:00Z"})
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let (_upstream, gateway) = spawn_app().await;
    let mut health = HealthClient::new(gateway.channel());
    for service in ["", SERVICE] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Either reflection version lists our service, health, and both versions.
fn assert_lists_every_service<'a>(listed: impl Iterator<Item = &'a str>) {
    let names: Vec<_> = listed.collect();
    for expected in [
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
}

#[tokio::test]
async fn reflection_lists_and_describes_the_service() {
    let (_upstream, gateway) = spawn_app().await;
    let mut reflection = ServerReflectionClient::new(gateway.channel());
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(SERVICE.into())),
        },
    ]);
    let mut responses = reflection
        .server_reflection_info(requests)
        .await
        .expect("reflection")
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .next()
        .await
        .expect("first answer")
        .expect("ok")
        .message_response
    else {
        panic!("expected a service list");
    };
    assert_lists_every_service(list.service.iter().map(|s| s.name.as_str()));

    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .next()
        .await
        .expect("second answer")
        .expect("ok")
        .message_response
    else {
        panic!("expected file descriptors");
    };
    let file: prost_types::FileDescriptorProto =
        prost::Message::decode(files.file_descriptor_proto[0].as_slice()).expect("descriptor");
    assert_eq!(file.name(), "gormic/om/v1/invoices.proto");
    let methods: Vec<_> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        [
            "CreateInvoice",
            "UpdateInvoice",
            "DeleteInvoice",
            "CloseInvoice",
            "SendInvoice"
        ]
    );
}

#[tokio::test]
async fn v1alpha_reflection_is_served_too() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let (_upstream, gateway) = spawn_app().await;
    let mut reflection = AlphaClient::new(gateway.channel());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha")
        .into_inner();
    let Some(AlphaResponse::ListServicesResponse(list)) = responses
        .next()
        .await
        .expect("answer")
        .expect("ok")
        .message_response
    else {
        panic!("expected a service list");
    };
    assert_lists_every_service(list.service.iter().map(|s| s.name.as_str()));
}

#[tokio::test]
async fn each_call_logs_one_line_and_never_the_api_key() {
    let logs = logs();
    let (upstream, mut gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(closed()));
    let secret = "sk-live-very-secret-31337";
    for (request_id, key) in [("log-ok-1", secret), ("log-missing-key-1", "")] {
        let mut entries = vec![("organization-id", "org-1"), ("x-request-id", request_id)];
        if !key.is_empty() {
            entries.push(("api-key", key));
        }
        let request = with_metadata(
            pb::CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            },
            &entries,
        );
        let _ = gateway.client.close_invoice(request).await;
    }
    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let request = with_metadata(
        pb::CloseInvoiceRequest {
            invoice_id: "inv-1".into(),
        },
        &[
            ("api-key", secret),
            ("organization-id", ORGANIZATION),
            ("x-request-id", "log-refused-1"),
        ],
    );
    let _ = gateway.client.close_invoice(request).await;

    let text = logs.text();
    assert!(!text.contains(secret), "the api-key leaked into the logs");
    let line = |id: &str| -> serde_json::Value {
        let lines: Vec<_> = text
            .lines()
            .filter(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {id}: {lines:?}");
        serde_json::from_str(lines[0]).expect("JSON log line")
    };
    let ok = line("log-ok-1");
    assert_eq!(ok["rpc"], "CloseInvoice");
    assert_eq!(ok["grpc_code"], "OK");
    assert_eq!(ok["upstream_status"], 200);
    assert!(ok["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    let missing = line("log-missing-key-1");
    assert_eq!(missing["grpc_code"], "UNAUTHENTICATED");
    assert!(
        missing.get("upstream_status").is_none(),
        "nothing was sent upstream"
    );
    let refused = line("log-refused-1");
    assert_eq!(refused["grpc_code"], "FAILED_PRECONDITION");
    assert_eq!(refused["upstream_status"], 400);
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish_and_refuses_new_connections() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_millis(300)));
    let mut gateway = TestGateway::builder(&upstream.url()).start().await;

    let mut client = gateway.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .close_invoice(authed(pb::CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            }))
            .await
    });
    upstream.wait_for_requests(1).await;
    gateway.shutdown();

    let response = in_flight
        .await
        .expect("task")
        .expect("the in-flight call completes");
    assert_eq!(response.into_inner().invoice_number, 7);
    within(
        "the server to stop",
        PATIENCE,
        gateway.task.take().expect("task"),
    )
    .await
    .expect("server stops cleanly");
    assert!(
        tokio::net::TcpStream::connect(gateway.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn shutdown_gives_up_on_calls_that_outlast_the_grace_period() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_secs(60)));
    let mut gateway = TestGateway::builder(&upstream.url())
        .upstream_timeout(Duration::from_secs(120))
        .grace(Duration::from_millis(200))
        .start()
        .await;
    let mut client = gateway.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .close_invoice(authed(pb::CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            }))
            .await
    });
    upstream.wait_for_requests(1).await;
    gateway.shutdown();
    tokio::time::timeout(Duration::from_secs(30), gateway.task.take().expect("task"))
        .await
        .expect("the server stops after the grace period, not after the upstream")
        .expect("clean stop");
    drop(in_flight);
}

// ---- the binary ------------------------------------------------------------

#[tokio::test]
async fn without_an_upstream_the_binary_refuses_to_start_and_names_the_flag() {
    let output = run_to_exit(&["--listen", "127.0.0.1:0"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--upstream"), "{stderr}");
}

#[tokio::test]
async fn a_bad_flag_value_is_refused_with_the_flags_name() {
    let output = run_to_exit(&[
        "--upstream",
        "http://127.0.0.1:1",
        "--upstream-timeout",
        "forever",
    ])
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--upstream-timeout"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(Duration::from_millis(300)));
    let serving = Serving::start(&[
        "--upstream",
        &upstream.url(),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .await;

    let channel = endpoint(serving.grpc_addr())
        .connect()
        .await
        .expect("connect");
    let mut client = InvoiceServiceClient::new(channel);
    let in_flight = tokio::spawn(async move {
        client
            .close_invoice(authed(pb::CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            }))
            .await
    });
    upstream.wait_for_requests(1).await;
    serving.sigterm();

    let response = in_flight
        .await
        .expect("task")
        .unwrap_or_else(|status| panic!("the in-flight call fails: {status:?}"));
    assert_eq!(response.into_inner().invoice_number, 7);
    let (status, lines) = serving.wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(
        lines.iter().any(|l| l.contains("SIGTERM received")),
        "{lines:#?}"
    );
}
