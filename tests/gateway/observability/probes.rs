//! `/readyz`, `/livez` and the gRPC health service on drain: the real
//! binary on SIGTERM, and the server's drain hook in-process.

use std::time::Duration;

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use gormic_gateway::admin::Readiness;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::server::{self, Hooks, ServerOptions};
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::upstream::Upstream;

use super::{SERVICE, close, closed, connect, ready_invoice};
use crate::support::admin::{AdminServer, get};
use crate::support::binary::Serving;
use crate::support::sandbox::as_org;
use crate::support::{FakeUpstream, PATIENCE, Scripted, authed, within};

async fn health_status(channel: Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

#[tokio::test]
async fn on_sigterm_readyz_turns_503_with_health_while_the_binary_still_serves_then_exits_0() {
    let mut serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--sandbox",
        "--shutdown-delay",
        "3s",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .await;
    let grpc = serving.grpc_addr();
    let admin = serving.admin_addr();
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(get(admin, "/livez").await.status, 200);
    assert_eq!(
        health_status(connect(grpc).await, "").await,
        ServingStatus::Serving
    );

    serving.sigterm();
    serving
        .wait_for_line("saying the gateway shuts down", |l| {
            l.contains("shutting down: NOT_SERVING")
        })
        .await;
    // Draining has started and --shutdown-delay is running.
    let readyz = get(admin, "/readyz").await;
    assert_eq!((readyz.status, readyz.body.as_str()), (503, "not ready\n"));
    assert_eq!(
        get(admin, "/livez").await.status,
        200,
        "alive while draining"
    );
    let channel = connect(grpc).await;
    for service in ["", SERVICE] {
        assert_eq!(
            health_status(channel.clone(), service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    let created = InvoiceServiceClient::new(channel)
        .create_invoice(as_org("org-1", ready_invoice()))
        .await
        .expect("a new connection is served during the delay");
    assert!(!created.into_inner().id.is_empty());

    let (status, stderr) = serving.wait_for_exit().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
    let position = |text: &str| {
        stderr
            .iter()
            .position(|l| l.contains(text))
            .unwrap_or_else(|| panic!("no {text:?} in {stderr:#?}"))
    };
    assert!(position("SIGTERM received") < position("shutting down: NOT_SERVING"));
    assert!(position("shutting down: NOT_SERVING") < position("listener closed"));
}

/// The next status a health `Watch` stream reports.
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("a health update")
        .expect("the watch stream")
        .expect("an update, not the end")
        .status()
}

#[tokio::test]
async fn readiness_is_down_by_the_time_health_reports_not_serving() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    let url = url::Url::parse(&upstream.url()).expect("upstream URL");
    let gateway =
        InvoiceGateway::new(Upstream::new(&url, crate::support::no_proxy()).expect("client"))
            .expect("in-memory idempotency store");
    let listener = server::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let addr = listener.local_addr().expect("addr");

    // As main wires it.
    let readiness = Readiness::new();
    readiness.set_ready(true);
    let admin = AdminServer::start(Metrics::default(), readiness.clone()).await;
    let (drained, on_drain_called) = oneshot::channel::<()>();
    let flag = readiness.clone();
    let hooks = Hooks {
        on_drain: Some(Box::new(move || {
            flag.set_ready(false);
            let _ = drained.send(());
        })),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    // A delay longer than any test: the gateway serves while the test looks.
    let options = ServerOptions {
        delay: Duration::from_secs(600),
        ..ServerOptions::default()
    };
    let server = tokio::spawn(server::run_with(
        listener,
        gateway,
        async {
            let _ = stopped.await;
        },
        options,
        hooks,
    ));

    let channel = connect(addr).await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert!(readiness.is_ready());
    assert_eq!(get(admin.addr, "/readyz").await.status, 200);

    let _ = stop.send(());
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    assert!(
        !readiness.is_ready(),
        "health says NOT_SERVING while readiness still says ready"
    );
    assert_eq!(get(admin.addr, "/readyz").await.status, 503);
    within("the drain hook", PATIENCE, on_drain_called)
        .await
        .expect("on_drain was called");
    for service in ["", SERVICE] {
        assert_eq!(
            health_status(channel.clone(), service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    // Not ready, not serving, yet still answering during the delay.
    let response = InvoiceServiceClient::new(connect(addr).await)
        .close_invoice(authed(close("inv-1")))
        .await
        .expect("served during the delay");
    assert_eq!(response.into_inner().invoice_number, 1);
    server.abort();
}
