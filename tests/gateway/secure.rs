//! Issue 7's transport security and caller identity, end to end through the
//! real gateway: gRPC and gRPC-Web over TLS, plaintext refused on the TLS
//! port, the handshake timeout, mTLS identities on the call log line and
//! refusals at the handshake, certificate rotation under a running server,
//! credential injection (mapped, unmapped, another organization, reloaded),
//! the upstream over HTTPS with a private CA, HTTP/2 and a client
//! certificate, and the binary's start-up refusals and acceptances.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

use gormic_gateway::credentials::CredentialMap;
use gormic_gateway::errors::{GATEWAY_DOMAIN, reason};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::reload::{self, Reloaded};
use gormic_gateway::server::ServerOptions;
use gormic_gateway::service::InvoiceGateway;
use gormic_gateway::tls::{TlsArgs, UpstreamTls};
use gormic_gateway::upstream::{Upstream, UpstreamOptions};

use crate::support::binary::{SERVING, Serving, run_to_exit};
use crate::support::certs::{Ca, Leaf, Names, TestDir, client_config, server_config, tls_connect};
use crate::support::logs::Logs;
use crate::support::redis::{RedisServer, free_port};
use crate::support::redis_command::command;
use crate::support::secure::{
    SecureGateway, grpc_web_over_https, plaintext_channel, server_files, server_tls, tls_channel,
};
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, Scripted, TestGateway, error_info, logs, until,
    with_metadata, within,
};

/// Upper bound on anything a test waits for; only reached when it fails.
const PATIENCE: Duration = Duration::from_secs(20);

const INVOICER: &str = "spiffe://prod.example/ns/billing/sa/invoicer";
const REPORTER: &str = "spiffe://prod.example/ns/analytics/sa/reporter";
const STRANGER: &str = "spiffe://prod.example/ns/other/sa/stranger";

/// Keys in the credentials files, distinctive so that a leak into the logs
/// cannot go unnoticed.
const INVOICER_KEY: &str = "gk_live_MAPPED_invoicer_4b7e01";
const REPORTER_KEY: &str = "gk_live_MAPPED_reporter_90d3c2";

fn credentials_file(invoicer_key: &str, invoicer_org: &str) -> String {
    format!(
        "[[caller]]\nidentity = \"{INVOICER}\"\napi_key = \"{invoicer_key}\"\n\
         organization_id = \"{invoicer_org}\"\n\n\
         [[caller]]\nidentity = \"{REPORTER}\"\napi_key = \"{REPORTER_KEY}\"\n"
    )
}

const CLOSE: &str = "/gormic.om.v1.InvoiceService/CloseInvoice";
const CLOSE_PATH: &str = "/v1/om/invoices/inv-1/close";

fn closed() -> serde_json::Value {
    json!({"invoiceNumber": 7, "invoiceSource": "POS", "invoicedAt": "2026-11-25T10:00:00Z"})
}

fn close() -> pb::CloseInvoiceRequest {
    pb::CloseInvoiceRequest {
        invoice_id: "inv-1".into(),
    }
}

/// A close call carrying `entries` and `x-request-id: request_id`.
fn close_with(
    request_id: &str,
    entries: &[(&'static str, &str)],
) -> tonic::Request<pb::CloseInvoiceRequest> {
    let mut all = entries.to_vec();
    all.push(("x-request-id", request_id));
    with_metadata(close(), &all)
}

/// A close call with the caller's own `api-key` and `organization-id`.
fn own_key_close(request_id: &str) -> tonic::Request<pb::CloseInvoiceRequest> {
    close_with(
        request_id,
        &[("api-key", API_KEY), ("organization-id", ORGANIZATION)],
    )
}

/// A plain HTTP upstream answering every close.
async fn answering_upstream() -> FakeUpstream {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    upstream
}

/// A gateway in front of `upstream` whose callers bring their own api-key.
fn gateway_to(upstream: &FakeUpstream) -> InvoiceGateway {
    let url = url::Url::parse(&upstream.url()).expect("upstream URL");
    let upstream = Upstream::new(&url, crate::support::no_proxy()).expect("upstream client");
    InvoiceGateway::new(upstream).expect("in-memory idempotency store")
}

/// The JSON log line of the call with this `x-request-id` (exactly one).
/// `logs` must have been captured before the call.
fn call_line(logs: &Logs, request_id: &str) -> serde_json::Value {
    let text = logs.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(&format!("\"request_id\":\"{request_id}\"")))
        .collect();
    assert_eq!(lines.len(), 1, "one call line for {request_id}: {lines:#?}");
    serde_json::from_str(lines[0]).expect("a JSON log line")
}

/// Whether any log line names this `x-request-id`.
fn logged(logs: &Logs, request_id: &str) -> bool {
    logs.text()
        .contains(&format!("\"request_id\":\"{request_id}\""))
}

/// The certificate a fresh TLS connection to `addr` is shown.
async fn served_certificate(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let stream = tls_connect(addr, client_config(ca, None))
        .await
        .expect("TLS handshake");
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server's certificate")[0]
        .to_vec()
}

/// Waits for the gateway's debug line saying the handshake of the
/// connection from `peer` failed, and returns it.
async fn handshake_failure_logged(logs: &Logs, peer: SocketAddr) -> String {
    let what = format!("saying the TLS handshake from {peer} failed");
    let peer = format!("\"peer\":\"{peer}\"");
    logs.wait_for_line(&what, |line| {
        line.contains("TLS handshake failed") && line.contains(&peer)
    })
    .await
}

// ---- TLS on the gRPC listener ---------------------------------------------

#[tokio::test]
async fn grpc_over_tls_is_served_and_reaches_the_upstream() {
    let logs = logs();
    let dir = TestDir::new("secure-grpc");
    let ca = Ca::new("gateway CA");
    let upstream = answering_upstream().await;
    let gateway =
        SecureGateway::start(gateway_to(&upstream), server_tls(&dir, &ca.server(), None)).await;

    let response = gateway
        .client(client_config(&ca, None))
        .close_invoice(own_key_close("secure-grpc-1"))
        .await
        .expect("a call over TLS succeeds");
    assert_eq!(response.into_inner().invoice_number, 7);
    let request = upstream.only_request();
    assert_eq!(request.path, CLOSE_PATH);
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(request.header("organization-id"), Some(ORGANIZATION));
    assert_eq!(
        call_line(&logs, "secure-grpc-1")["caller"],
        serde_json::Value::Null,
        "no caller identity without mTLS"
    );
}

#[tokio::test]
async fn a_plaintext_grpc_client_on_the_tls_port_gets_nothing_and_nothing_reaches_the_upstream() {
    let logs = logs();
    let dir = TestDir::new("secure-plaintext");
    let ca = Ca::new("gateway CA");
    let upstream = answering_upstream().await;
    let gateway =
        SecureGateway::start(gateway_to(&upstream), server_tls(&dir, &ca.server(), None)).await;

    let (channel, dialed) = plaintext_channel(gateway.addr);
    // The client's error depends on what it makes of the TLS alert it gets
    // back; what matters is the gateway's side, checked below.
    InvoiceServiceClient::new(channel)
        .close_invoice(own_key_close("secure-plaintext-1"))
        .await
        .expect_err("plaintext is not served on the TLS port");
    let peers = dialed.local_addrs();
    assert_eq!(peers.len(), 1, "one connection tried");
    handshake_failure_logged(&logs, peers[0]).await;
    assert!(
        upstream.requests().is_empty(),
        "nothing reached the upstream"
    );
    assert!(
        !logged(&logs, "secure-plaintext-1"),
        "the call was never read"
    );

    // The port still serves TLS clients.
    gateway
        .client(client_config(&ca, None))
        .close_invoice(own_key_close("secure-plaintext-2"))
        .await
        .expect("a TLS client is served");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn grpc_web_over_https_1_1_is_served() {
    let dir = TestDir::new("secure-grpc-web");
    let ca = Ca::new("gateway CA");
    let upstream = answering_upstream().await;
    let gateway =
        SecureGateway::start(gateway_to(&upstream), server_tls(&dir, &ca.server(), None)).await;

    let answer = grpc_web_over_https(
        gateway.addr,
        &client_config(&ca, None),
        CLOSE,
        &[("api-key", API_KEY), ("organization-id", ORGANIZATION)],
        &close(),
    )
    .await;
    assert_eq!(answer.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(answer.version, http::Version::HTTP_11);
    assert_eq!(answer.http_status, 200);
    assert_eq!(answer.field("grpc-status").as_deref(), Some("0"));
    assert_eq!(answer.messages.len(), 1, "{answer:?}");
    let message: pb::CloseInvoiceResponse =
        prost::Message::decode(answer.messages[0].clone()).expect("a CloseInvoiceResponse");
    assert_eq!(message.invoice_number, 7);
    assert_eq!(upstream.only_request().header("api-key"), Some(API_KEY));
}

// ---- mutual TLS --------------------------------------------------------------

#[tokio::test]
async fn a_silent_client_is_cut_off_by_the_tls_handshake_timeout() {
    let logs = logs();
    let dir = TestDir::new("secure-silent");
    let ca = Ca::new("gateway CA");
    let upstream = answering_upstream().await;
    let options = ServerOptions {
        tls_handshake_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let gateway = SecureGateway::start_with(
        gateway_to(&upstream),
        server_tls(&dir, &ca.server(), None),
        options,
    )
    .await;

    // Connects and sends nothing: the gateway must not wait for ever.
    let mut silent = TcpStream::connect(gateway.addr).await.expect("connect");
    let peer = silent.local_addr().expect("local addr");
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, silent.read_to_end(&mut received))
        .await
        .expect("the gateway closes the connection")
        .expect("a clean close");
    assert!(received.is_empty(), "{received:?}");
    let line = handshake_failure_logged(&logs, peer).await;
    assert!(
        line.contains("TLS handshake not completed within 200ms"),
        "{line}"
    );
}

#[tokio::test]
async fn an_mtls_caller_is_accepted_and_named_on_its_call_log_line() {
    let logs = logs();
    let dir = TestDir::new("secure-mtls-accepted");
    let server_ca = Ca::new("gateway CA");
    let client_ca = Ca::new("client CA");
    let upstream = answering_upstream().await;
    let tls = server_tls(&dir, &server_ca.server(), Some(&client_ca));
    let gateway = SecureGateway::start(gateway_to(&upstream), tls).await;

    let cases = [
        (
            Names {
                uris: vec![INVOICER],
                dns: vec!["invoicer.billing.svc"],
                cn: Some("invoicer"),
                ..Names::default()
            },
            INVOICER,
        ),
        (
            Names {
                dns: vec!["invoicer.billing.svc"],
                cn: Some("invoicer"),
                ..Names::default()
            },
            "invoicer.billing.svc",
        ),
        (
            Names {
                cn: Some("invoicer"),
                ..Names::default()
            },
            "invoicer",
        ),
    ];
    for (i, (names, identity)) in cases.into_iter().enumerate() {
        let request_id = format!("secure-mtls-{i}");
        let leaf = client_ca.client(&names);
        gateway
            .client(client_config(&server_ca, Some(&leaf)))
            .close_invoice(own_key_close(&request_id))
            .await
            .expect("a caller with a certificate from the client CA is served");
        let line = call_line(&logs, &request_id);
        assert_eq!(line["caller"], identity, "URI SAN, else DNS SAN, else CN");
        assert_eq!(line["grpc_code"], "OK");
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| r.header("api-key") == Some(API_KEY))
    );
}

#[tokio::test]
async fn an_mtls_gateway_refuses_callers_without_a_certificate_or_from_a_foreign_ca_at_the_handshake()
 {
    let logs = logs();
    let dir = TestDir::new("secure-mtls-refused");
    let server_ca = Ca::new("gateway CA");
    let client_ca = Ca::new("client CA");
    let foreign_ca = Ca::new("foreign CA");
    let upstream = answering_upstream().await;
    let tls = server_tls(&dir, &server_ca.server(), Some(&client_ca));
    let gateway = SecureGateway::start(gateway_to(&upstream), tls).await;
    let foreign = foreign_ca.client(&Names {
        uris: vec![INVOICER],
        ..Names::default()
    });

    for (what, identity, request_id) in [
        ("no certificate", None, "secure-mtls-none"),
        ("a foreign CA", Some(&foreign), "secure-mtls-foreign"),
    ] {
        let (channel, dialed) = tls_channel(gateway.addr, client_config(&server_ca, identity));
        // Under TLS 1.3 the client may send its request before the server
        // judges its certificate: it then sees the alert, or a reset.
        InvoiceServiceClient::new(channel)
            .close_invoice(own_key_close(request_id))
            .await
            .expect_err(what);
        let peers = dialed.local_addrs();
        assert_eq!(peers.len(), 1, "{what}: one connection tried");
        let line = handshake_failure_logged(&logs, peers[0]).await;
        assert!(line.contains("\"level\":\"DEBUG\""), "{what}: {line}");
        assert!(
            !logged(&logs, request_id),
            "{what}: the call was never read"
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing reached the upstream"
    );
}

// ---- certificate rotation ----------------------------------------------------

#[tokio::test]
async fn a_rotated_certificate_is_shown_to_new_connections_while_open_ones_keep_working() {
    let dir = TestDir::new("secure-rotation");
    let ca = Ca::new("gateway CA");
    let first = ca.server();
    let upstream = answering_upstream().await;
    let gateway = SecureGateway::start(gateway_to(&upstream), server_tls(&dir, &first, None)).await;
    let (channel, dialed) = tls_channel(gateway.addr, client_config(&ca, None));
    let mut open = InvoiceServiceClient::new(channel);
    open.close_invoice(own_key_close("secure-rotation-1"))
        .await
        .expect("served before the rotation");
    assert_eq!(
        served_certificate(gateway.addr, &ca).await,
        first.der.to_vec()
    );

    // A reload task on the server's own ServerTls: `reload::watch`, which
    // re-reads as the binary's `Reloads::run` does, for this one file.
    let mut generation = gateway.tls.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watched = gateway.tls.clone();
    let watcher = tokio::spawn(reload::watch(
        Duration::from_millis(20),
        async move {
            let _ = stopped.await;
        },
        "tls",
        move || watched.reload(),
        |_, _| {},
    ));
    let second = ca.server();
    server_files(&dir, &second, None);
    tokio::time::timeout(PATIENCE, generation.changed())
        .await
        .expect("the watch task puts the new files in use")
        .expect("the server's TLS lives");
    assert_eq!(*generation.borrow(), 1);
    stop.send(()).expect("the watch task runs");
    within("the watch task to stop", PATIENCE, watcher)
        .await
        .expect("the watch task stops");

    assert_eq!(
        served_certificate(gateway.addr, &ca).await,
        second.der.to_vec(),
        "a new connection is shown the new certificate"
    );
    gateway
        .client(client_config(&ca, None))
        .close_invoice(own_key_close("secure-rotation-2"))
        .await
        .expect("served over a new connection");
    open.close_invoice(own_key_close("secure-rotation-3"))
        .await
        .expect("the connection opened before the rotation still works");
    assert_eq!(dialed.count(), 1, "on the same connection");
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn a_rotation_to_a_mismatched_pair_leaves_the_gateway_serving_the_old_certificate() {
    let dir = TestDir::new("secure-broken-rotation");
    let ca = Ca::new("gateway CA");
    let good = ca.server();
    let upstream = answering_upstream().await;
    let gateway = SecureGateway::start(gateway_to(&upstream), server_tls(&dir, &good, None)).await;

    let cert = dir.write("tls.crt", &ca.server().cert_pem);
    let error = gateway
        .tls
        .reload()
        .expect_err("the key does not match the new certificate")
        .to_string();
    assert_eq!(
        error,
        format!(
            "--tls-key {}: the private key does not match the certificate in --tls-cert {}",
            dir.path("tls.key").display(),
            cert.display()
        )
    );
    assert_eq!(
        served_certificate(gateway.addr, &ca).await,
        good.der.to_vec()
    );
    gateway
        .client(client_config(&ca, None))
        .close_invoice(own_key_close("secure-broken-rotation-1"))
        .await
        .expect("still served with the old certificate");
    assert_eq!(
        *gateway.tls.subscribe().borrow(),
        0,
        "nothing was put in use"
    );
}

// ---- credential injection ------------------------------------------------------

/// A gateway with mTLS and `--credentials`, in front of an answering
/// upstream; the callers' certificates come from `client_ca`.
struct Injecting {
    dir: TestDir,
    server_ca: Ca,
    client_ca: Ca,
    upstream: FakeUpstream,
    credentials: CredentialMap,
    gateway: SecureGateway,
}

impl Injecting {
    async fn start(name: &str) -> Injecting {
        let dir = TestDir::new(name);
        let server_ca = Ca::new("gateway CA");
        let client_ca = Ca::new("client CA");
        let upstream = answering_upstream().await;
        let path = dir.write("credentials.toml", credentials_file(INVOICER_KEY, "org-42"));
        let credentials = CredentialMap::load(&path).expect("a valid credentials file");
        let tls = server_tls(&dir, &server_ca.server(), Some(&client_ca));
        let gateway = SecureGateway::start(
            gateway_to(&upstream).with_credentials(credentials.clone()),
            tls,
        )
        .await;
        Injecting {
            dir,
            server_ca,
            client_ca,
            upstream,
            credentials,
            gateway,
        }
    }

    /// A client whose certificate names `identity` (as its URI SAN).
    fn client_as(&self, identity: &'static str) -> InvoiceServiceClient<tonic::transport::Channel> {
        let leaf = self.client_ca.client(&Names {
            uris: vec![identity],
            ..Names::default()
        });
        self.gateway
            .client(client_config(&self.server_ca, Some(&leaf)))
    }
}

/// The caller's own key, which must never travel nor be logged.
const CALLERS_OWN_KEY: &str = "caller-own-key-SECRET-e3a9f1";

#[tokio::test]
async fn a_mapped_caller_is_sent_upstream_with_the_mapped_key_and_organization_never_its_own() {
    let logs = logs();
    let setup = Injecting::start("secure-mapped").await;
    let mut invoicer = setup.client_as(INVOICER);

    for (request_id, entries) in [
        (
            "secure-mapped-1",
            &[("api-key", CALLERS_OWN_KEY), ("organization-id", "org-42")][..],
        ),
        ("secure-mapped-2", &[("api-key", CALLERS_OWN_KEY)][..]),
        ("secure-mapped-3", &[][..]),
    ] {
        invoicer
            .close_invoice(close_with(request_id, entries))
            .await
            .unwrap_or_else(|status| panic!("{request_id}: {status:?}"));
        let line = call_line(&logs, request_id);
        assert_eq!(line["caller"], INVOICER, "{request_id}");
        assert_eq!(line["grpc_code"], "OK", "{request_id}");
    }
    setup
        .client_as(REPORTER)
        .close_invoice(close_with(
            "secure-mapped-4",
            &[("api-key", CALLERS_OWN_KEY), ("organization-id", "org-9")],
        ))
        .await
        .expect("a mapping without organization takes the caller's");

    let requests = setup.upstream.requests();
    let sent: Vec<(Vec<&str>, Option<&str>)> = requests
        .iter()
        .map(|r| {
            let keys = r
                .headers
                .get_all("api-key")
                .iter()
                .map(|v| v.to_str().expect("ASCII"))
                .collect();
            (keys, r.header("organization-id"))
        })
        .collect();
    assert_eq!(
        sent,
        vec![
            (vec![INVOICER_KEY], Some("org-42")),
            (vec![INVOICER_KEY], Some("org-42")),
            (vec![INVOICER_KEY], Some("org-42")),
            (vec![REPORTER_KEY], Some("org-9")),
        ]
    );
    let text = logs.text();
    for secret in [CALLERS_OWN_KEY, INVOICER_KEY, REPORTER_KEY] {
        assert!(!text.contains(secret), "{secret} reached the logs");
    }
}

#[tokio::test]
async fn an_unmapped_caller_is_refused_permission_denied_and_nothing_is_sent() {
    let logs = logs();
    let setup = Injecting::start("secure-unmapped").await;

    let status = setup
        .client_as(STRANGER)
        .close_invoice(close_with(
            "secure-unmapped-1",
            &[("api-key", CALLERS_OWN_KEY), ("organization-id", "org-42")],
        ))
        .await
        .expect_err("not in the credentials file");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        status.message(),
        format!("caller {STRANGER} is not in --credentials")
    );
    let info = error_info(&status);
    assert_eq!(info.reason, reason::CALLER_NOT_ALLOWED);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(
        info.metadata.get("caller").map(String::as_str),
        Some(STRANGER)
    );
    let line = call_line(&logs, "secure-unmapped-1");
    assert_eq!(line["caller"], STRANGER);
    assert_eq!(line["grpc_code"], "PERMISSION_DENIED");

    // A certificate from the client CA that names nobody usable.
    let nameless = setup.client_ca.client(&Names {
        cn: Some("bad\nname"),
        ..Names::default()
    });
    let status = setup
        .gateway
        .client(client_config(&setup.server_ca, Some(&nameless)))
        .close_invoice(close_with(
            "secure-unmapped-2",
            &[("api-key", CALLERS_OWN_KEY)],
        ))
        .await
        .expect_err("no identity");
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = error_info(&status);
    assert_eq!(info.reason, reason::CALLER_NOT_ALLOWED);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata.get("caller"), None);

    assert!(
        setup.upstream.requests().is_empty(),
        "nothing was sent upstream"
    );
    assert!(!logs.text().contains(CALLERS_OWN_KEY));
}

#[tokio::test]
async fn a_caller_asking_for_another_organization_than_mapped_is_refused() {
    let setup = Injecting::start("secure-other-org").await;

    let status = setup
        .client_as(INVOICER)
        .close_invoice(close_with(
            "secure-other-org-1",
            &[("api-key", CALLERS_OWN_KEY), ("organization-id", "org-7")],
        ))
        .await
        .expect_err("mapped to org-42");
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = error_info(&status);
    assert_eq!(info.reason, reason::ORGANIZATION_NOT_ALLOWED);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(
        info.metadata.get("caller").map(String::as_str),
        Some(INVOICER)
    );
    assert!(!status.message().contains("org-42"), "{}", status.message());
    assert!(
        setup.upstream.requests().is_empty(),
        "nothing was sent upstream"
    );
}

#[tokio::test]
async fn a_credentials_reload_applies_to_the_next_call_on_an_open_connection() {
    let setup = Injecting::start("secure-credentials-reload").await;
    let leaf = setup.client_ca.client(&Names {
        uris: vec![INVOICER],
        ..Names::default()
    });
    let (channel, dialed) = tls_channel(
        setup.gateway.addr,
        client_config(&setup.server_ca, Some(&leaf)),
    );
    let mut invoicer = InvoiceServiceClient::new(channel);

    invoicer
        .close_invoice(close_with("secure-reload-1", &[]))
        .await
        .expect("mapped");
    let rotated_key = "gk_live_MAPPED_rotated_5c21aa";
    setup
        .dir
        .write("credentials.toml", credentials_file(rotated_key, "org-43"));
    assert_eq!(
        setup.credentials.reload().expect("a valid file"),
        Reloaded::Replaced
    );
    invoicer
        .close_invoice(close_with("secure-reload-2", &[]))
        .await
        .expect("still mapped");

    // The invoicer is dropped from the file.
    setup.dir.write(
        "credentials.toml",
        format!("[[caller]]\nidentity = \"{REPORTER}\"\napi_key = \"{REPORTER_KEY}\"\n"),
    );
    assert_eq!(
        setup.credentials.reload().expect("a valid file"),
        Reloaded::Replaced
    );
    let status = invoicer
        .close_invoice(close_with("secure-reload-3", &[]))
        .await
        .expect_err("no longer mapped");
    assert_eq!(error_info(&status).reason, reason::CALLER_NOT_ALLOWED);

    assert_eq!(dialed.count(), 1, "one connection for every call");
    let requests = setup.upstream.requests();
    let sent: Vec<_> = requests
        .iter()
        .map(|r| (r.header("api-key"), r.header("organization-id")))
        .collect();
    assert_eq!(
        sent,
        vec![
            (Some(INVOICER_KEY), Some("org-42")),
            (Some(rotated_key), Some("org-43")),
        ]
    );
}

#[tokio::test]
async fn grpc_web_over_https_carries_the_mtls_identity_to_the_credentials() {
    let logs = logs();
    let setup = Injecting::start("secure-grpc-web-mtls").await;
    let leaf = setup.client_ca.client(&Names {
        uris: vec![INVOICER],
        ..Names::default()
    });

    let answer = grpc_web_over_https(
        setup.gateway.addr,
        &client_config(&setup.server_ca, Some(&leaf)),
        CLOSE,
        &[
            ("api-key", CALLERS_OWN_KEY),
            ("x-request-id", "secure-web-mtls-1"),
        ],
        &close(),
    )
    .await;
    assert_eq!(
        answer.field("grpc-status").as_deref(),
        Some("0"),
        "{answer:?}"
    );
    let request = setup.upstream.only_request();
    assert_eq!(request.header("api-key"), Some(INVOICER_KEY));
    assert_eq!(request.header("organization-id"), Some("org-42"));
    assert_eq!(call_line(&logs, "secure-web-mtls-1")["caller"], INVOICER);
}

// ---- the upstream over HTTPS ---------------------------------------------------

/// A gateway (plaintext, callers' own keys) in front of `upstream` with the
/// upstream TLS of `args`.
async fn gateway_with_upstream_tls(upstream: &FakeUpstream, args: &TlsArgs) -> TestGateway {
    gateway_with_upstream_options(upstream, args, crate::support::no_proxy()).await
}

/// As [`gateway_with_upstream_tls`], with other upstream options.
async fn gateway_with_upstream_options(
    upstream: &FakeUpstream,
    args: &TlsArgs,
    options: UpstreamOptions,
) -> TestGateway {
    let tls = UpstreamTls::load(args).expect("valid upstream TLS files");
    TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            tls: Some(tls.client_config()),
            ..options
        })
        .start()
        .await
}

/// Starts `n` close calls at once through `gateway` and returns their
/// invoice numbers, failing the test with the first error.
async fn concurrent_closes(gateway: &TestGateway, prefix: &str, n: usize) -> Vec<i64> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = gateway.client.clone();
            let request = own_key_close(&format!("{prefix}-{i}"));
            tokio::spawn(async move { client.close_invoice(request).await })
        })
        .collect();
    let mut numbers = Vec::new();
    for call in calls {
        let response = call.await.expect("the call task").expect("served");
        numbers.push(response.into_inner().invoice_number);
    }
    numbers
}

/// A TLS upstream offering ALPN `h2` then `http/1.1`, behind `ca`.
async fn h2_upstream(ca: &Ca) -> FakeUpstream {
    let upstream =
        FakeUpstream::start_tls(server_config(&ca.server(), None, &[b"h2", b"http/1.1"])).await;
    upstream.respond(Scripted::ok(closed()));
    upstream
}

fn upstream_ca_args(dir: &TestDir, ca: &Ca) -> TlsArgs {
    TlsArgs {
        upstream_ca: Some(dir.write("upstream-ca.crt", &ca.pem)),
        ..TlsArgs::default()
    }
}

#[tokio::test]
async fn an_https_upstream_behind_a_private_ca_is_reached_with_upstream_ca() {
    let logs = logs();
    let dir = TestDir::new("secure-upstream-ca");
    let private_ca = Ca::new("private upstream CA");
    let upstream =
        FakeUpstream::start_tls(server_config(&private_ca.server(), None, &[b"http/1.1"])).await;
    upstream.respond(Scripted::ok(closed()));
    let mut gateway =
        gateway_with_upstream_tls(&upstream, &upstream_ca_args(&dir, &private_ca)).await;

    let response = gateway
        .client
        .close_invoice(own_key_close("secure-upstream-ca-1"))
        .await
        .expect("the private CA is trusted");
    assert_eq!(response.into_inner().invoice_number, 7);
    let request = upstream.only_request();
    assert_eq!(
        request.version,
        http::Version::HTTP_11,
        "ALPN offered http/1.1 only"
    );
    assert_eq!(request.path, CLOSE_PATH);
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(call_line(&logs, "secure-upstream-ca-1")["attempts"], 1);
}

#[tokio::test]
async fn an_https_upstream_behind_an_untrusted_ca_fails_unavailable_after_the_retries_and_nothing_is_sent()
 {
    let private_ca = Ca::new("private upstream CA");
    let upstream =
        FakeUpstream::start_tls(server_config(&private_ca.server(), None, &[b"h2"])).await;
    upstream.respond(Scripted::ok(closed()));
    let mut gateway = gateway_with_upstream_tls(&upstream, &TlsArgs::default()).await;

    let status = gateway
        .client
        .close_invoice(own_key_close("secure-untrusted-1"))
        .await
        .expect_err("the public roots do not know the private CA");
    assert_eq!(status.code(), Code::Unavailable);
    let info = error_info(&status);
    assert_eq!(info.reason, reason::UPSTREAM_UNAVAILABLE);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata["request_sent"], "false");
    assert_eq!(
        info.metadata["attempts"], "3",
        "a request that never left is retried up to --max-attempts, even a close"
    );
    let detail = &info.metadata["detail"];
    assert!(
        detail.contains("TLS handshake") && detail.contains("UnknownIssuer"),
        "{detail}"
    );
    assert_eq!(
        upstream.connections().accepted,
        3,
        "one handshake per attempt"
    );
    assert!(upstream.requests().is_empty(), "no request was sent");
}

#[tokio::test]
async fn an_upstream_negotiating_h2_gets_http2_and_a_burst_of_calls_shares_one_connection() {
    let dir = TestDir::new("secure-upstream-h2");
    let private_ca = Ca::new("private upstream CA");
    let upstream = h2_upstream(&private_ca).await;
    let gateway = gateway_with_upstream_tls(&upstream, &upstream_ca_args(&dir, &private_ca)).await;

    // Every answer waits until all the calls are at the upstream at once:
    // over HTTP/1.1 that would take one connection each. The burst comes
    // before any connection is open, as after a start or a GOAWAY.
    const CALLS: usize = 32;
    upstream.hold_answers_until(CALLS);
    let numbers = concurrent_closes(&gateway, "secure-h2", CALLS).await;
    assert_eq!(numbers, vec![7; CALLS]);
    let requests = upstream.requests();
    assert_eq!(requests.len(), CALLS);
    assert!(
        requests.iter().all(|r| r.version == http::Version::HTTP_2),
        "{:?}",
        requests.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    assert_eq!(
        upstream.connections().accepted,
        1,
        "every call shares one connection"
    );
}

#[tokio::test]
async fn over_http2_the_connection_cap_bounds_the_streams_in_flight() {
    let dir = TestDir::new("secure-upstream-h2-cap");
    let private_ca = Ca::new("private upstream CA");
    let upstream = h2_upstream(&private_ca).await;
    let tls = UpstreamTls::load(&upstream_ca_args(&dir, &private_ca)).expect("upstream TLS");
    let gateway = TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            max_connections: 1,
            tls: Some(tls.client_config()),
            ..crate::support::no_proxy()
        })
        .start()
        .await;
    let gauges = gateway.upstream_client().gauges();

    // With --upstream-max-connections 1, one request at a time: the other
    // seven wait for the slot, none is sent meanwhile.
    const CALLS: usize = 8;
    upstream.hold_answers();
    let calls = tokio::spawn({
        let gateway_client = gateway.client.clone();
        async move {
            let mut handles = Vec::new();
            for i in 0..CALLS {
                let mut client = gateway_client.clone();
                let request = own_key_close(&format!("secure-h2-cap-{i}"));
                handles.push(tokio::spawn(
                    async move { client.close_invoice(request).await },
                ));
            }
            let mut numbers = Vec::new();
            for handle in handles {
                numbers.push(
                    handle
                        .await
                        .expect("task")
                        .expect("served")
                        .into_inner()
                        .invoice_number,
                );
            }
            numbers
        }
    });
    upstream.wait_for_requests(1).await;
    until(
        "the other calls to wait for the connection slot",
        PATIENCE,
        async || gauges.pending.load(std::sync::atomic::Ordering::Relaxed),
        |pending| *pending >= (CALLS - 1) as u64,
    )
    .every(Duration::from_millis(5))
    .await;
    assert_eq!(upstream.requests().len(), 1, "the others wait for the slot");
    upstream.release_answers();
    assert_eq!(calls.await.expect("calls"), vec![7; CALLS]);
    let requests = upstream.requests();
    assert!(requests.iter().all(|r| r.version == http::Version::HTTP_2));
    // The first call learnt that the upstream speaks HTTP/2 on its
    // connection; the worker then moved to its HTTP/2-only client (one
    // connection for any burst), whose first call opened the second.
    assert_eq!(upstream.connections().accepted, 2);
}

#[tokio::test]
async fn an_upstream_requiring_a_client_certificate_accepts_the_gateway_with_upstream_client_cert()
{
    let dir = TestDir::new("secure-upstream-client");
    let private_ca = Ca::new("private upstream CA");
    let clients_ca = Ca::new("upstream's client CA");
    let upstream = FakeUpstream::start_tls(server_config(
        &private_ca.server(),
        Some(&clients_ca),
        &[b"h2", b"http/1.1"],
    ))
    .await;
    upstream.respond(Scripted::ok(closed()));

    let without = upstream_ca_args(&dir, &private_ca);
    let mut refused = gateway_with_upstream_tls(&upstream, &without).await;
    let status = refused
        .client
        .close_invoice(own_key_close("secure-upstream-client-1"))
        .await
        .expect_err("the upstream wants a client certificate");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).reason, reason::UPSTREAM_UNAVAILABLE);
    assert!(
        upstream.requests().is_empty(),
        "the upstream served nothing"
    );

    let gateway_leaf = clients_ca.client(&Names {
        uris: vec!["spiffe://prod.example/ns/gateway/sa/gormic-gateway"],
        ..Names::default()
    });
    let with = TlsArgs {
        upstream_client_cert: Some(dir.write("client.crt", &gateway_leaf.cert_pem)),
        upstream_client_key: Some(dir.write("client.key", &gateway_leaf.key_pem)),
        ..without
    };
    let mut accepted = gateway_with_upstream_tls(&upstream, &with).await;
    let response = accepted
        .client
        .close_invoice(own_key_close("secure-upstream-client-2"))
        .await
        .expect("the gateway presents its certificate");
    assert_eq!(response.into_inner().invoice_number, 7);
    let request = upstream.only_request();
    assert_eq!(request.version, http::Version::HTTP_2);
    assert_eq!(request.header("api-key"), Some(API_KEY));
}

// ---- the binary: start-up refusals and acceptances ------------------------------

/// Runs the binary with `args`, which must make it refuse to start: exit
/// status 2, one message naming `flag` and `path` with `problem`, nothing
/// served. Returns stderr.
async fn assert_refused(args: &[&str], flag: &str, path: &str, problem: &str) -> String {
    let output = run_to_exit(args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(&format!("{flag} {path}")) && stderr.contains(problem),
        "{args:?}: expected `{flag} {path}` and `{problem}` in: {stderr}"
    );
    assert!(!stderr.contains(SERVING), "nothing was started: {stderr}");
    stderr
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

const LOOPBACK_UPSTREAM: &str = "http://127.0.0.1:1";

#[tokio::test]
async fn the_binary_refuses_a_missing_tls_key_file() {
    let dir = TestDir::new("binary-missing-key");
    let leaf = Ca::new("gateway CA").server();
    let cert = dir.write("tls.crt", &leaf.cert_pem);
    let key = dir.path("tls.key");
    assert_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            LOOPBACK_UPSTREAM,
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
        ],
        "--tls-key",
        path_str(&key),
        "cannot read the file: it does not exist",
    )
    .await;
}

#[tokio::test]
async fn the_binary_refuses_a_key_that_does_not_match_the_certificate() {
    let dir = TestDir::new("binary-mismatched");
    let ca = Ca::new("gateway CA");
    let cert = dir.write("tls.crt", &ca.server().cert_pem);
    let key = dir.write("tls.key", &ca.server().key_pem);
    let stderr = assert_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            LOOPBACK_UPSTREAM,
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
        ],
        "--tls-key",
        path_str(&key),
        &format!(
            "the private key does not match the certificate in --tls-cert {}",
            cert.display()
        ),
    )
    .await;
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

#[tokio::test]
async fn the_binary_refuses_an_expired_certificate() {
    let dir = TestDir::new("binary-expired");
    let expired = Ca::new("gateway CA").leaf(
        &Names {
            dns: vec!["localhost"],
            validity: Some(((2000, 1, 1), (2001, 1, 1))),
            ..Names::default()
        },
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert = dir.write("tls.crt", &expired.cert_pem);
    let key = dir.write("tls.key", &expired.key_pem);
    assert_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            LOOPBACK_UPSTREAM,
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
        ],
        "--tls-cert",
        path_str(&cert),
        "the certificate expired at 2001-01-01T00:00:00Z",
    )
    .await;
}

#[tokio::test]
async fn the_binary_refuses_a_bad_credentials_file_naming_its_line() {
    let dir = TestDir::new("binary-credentials");
    let server_ca = Ca::new("gateway CA");
    let client_ca = Ca::new("client CA");
    let args = server_files(&dir, &server_ca.server(), Some(&client_ca));
    let credentials = dir.write(
        "credentials.toml",
        format!(
            "[[caller]]\nidentity = \"{INVOICER}\"\napi_key = \"gk_live_SECRET_binary\"\n\
             organisation_id = \"org-1\"\n"
        ),
    );
    let stderr = assert_refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            LOOPBACK_UPSTREAM,
            "--tls-cert",
            path_str(args.tls_cert.as_deref().expect("cert")),
            "--tls-key",
            path_str(args.tls_key.as_deref().expect("key")),
            "--tls-client-ca",
            path_str(args.tls_client_ca.as_deref().expect("client CA")),
            "--credentials",
            path_str(&credentials),
        ],
        "--credentials",
        path_str(&credentials),
        "line 4: unknown field in [[caller]]",
    )
    .await;
    assert!(!stderr.contains("SECRET"), "a key was echoed: {stderr}");
}

#[tokio::test]
async fn the_binary_refuses_a_plain_http_upstream_off_loopback_naming_the_flag_that_allows_it() {
    let output = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://10.1.2.3:80",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--upstream http://10.1.2.3/")
            && stderr.contains("in clear")
            && stderr.contains("--allow-insecure-upstream"),
        "{stderr}"
    );
    assert!(!stderr.contains(SERVING), "nothing was started: {stderr}");
}

#[tokio::test]
async fn the_binary_serves_a_plain_http_upstream_off_loopback_with_allow_insecure_upstream() {
    let serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://10.1.2.3:80",
        "--allow-insecure-upstream",
    ])
    .await;
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
}

#[tokio::test]
async fn the_binary_serves_a_plain_http_localhost_upstream_without_the_flag() {
    let serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://localhost:1",
    ])
    .await;
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
}

/// `rediss://` end to end: a Redis serving TLS only, with a certificate a
/// private CA signed. The store verifies it against the system's trust
/// store, which `SSL_CERT_FILE` names here (as it does for OpenSSL). With
/// that CA trusted, a keyed call's record is kept on the server and its
/// repeat replays; with another CA trusted, the handshake is refused and a
/// keyed call fails closed, never sent.
#[tokio::test]
async fn the_binary_keeps_keys_on_a_tls_redis_it_verifies_and_fails_closed_on_one_it_cannot() {
    let dir = TestDir::new("binary-rediss");
    let redis_ca = Ca::new("private Redis CA");
    let leaf = redis_ca.server();
    let cert = dir.write("redis.crt", &leaf.cert_pem);
    let key = dir.write("redis.key", &leaf.key_pem);
    let trusted = dir.write("trusted.crt", &redis_ca.pem);
    let other = dir.write("other.crt", &Ca::new("another CA").pem);
    let tls_port = free_port().to_string();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        path_str(&cert),
        "--tls-key-file",
        path_str(&key),
        "--tls-ca-cert-file",
        path_str(&trusted),
        "--tls-auth-clients",
        "no",
    ]);
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    let upstream_url = upstream.url();
    let store = format!("rediss://127.0.0.1:{tls_port}");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--upstream",
        &upstream_url,
        "--idempotency-store",
        &store,
    ];
    let keyed = |key: &str| {
        close_with(
            "binary-rediss",
            &[
                ("api-key", API_KEY),
                ("organization-id", ORGANIZATION),
                ("idempotency-key", key),
            ],
        )
    };

    let serving = Serving::start_with_env(&args, &[("SSL_CERT_FILE", path_str(&trusted))]).await;
    let (channel, _) = plaintext_channel(serving.grpc_addr());
    let mut client = InvoiceServiceClient::new(channel);
    let first = client
        .close_invoice(keyed("rediss-1"))
        .await
        .expect("the lease and the record kept on the TLS store")
        .into_inner();
    let again = client
        .close_invoice(keyed("rediss-1"))
        .await
        .expect("the repeat replays")
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(upstream.requests().len(), 1, "the repeat was not sent");
    let records: Vec<String> = command(redis.port(), &["KEYS", "gormic:idem:*"]);
    assert_eq!(records.len(), 1, "{records:?}");
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");

    let serving = Serving::start_with_env(&args, &[("SSL_CERT_FILE", path_str(&other))]).await;
    let (channel, _) = plaintext_channel(serving.grpc_addr());
    let mut client = InvoiceServiceClient::new(channel);
    let refused = client
        .close_invoice(keyed("rediss-2"))
        .await
        .expect_err("a store whose certificate is not trusted is not used");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        error_info(&refused).reason,
        reason::IDEMPOTENCY_STORE_UNAVAILABLE,
        "{refused:?}"
    );
    assert_eq!(
        upstream.requests().len(),
        1,
        "the refused call was not sent"
    );
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
}

#[tokio::test]
async fn the_binary_wires_mtls_credentials_a_private_upstream_ca_and_their_reloads() {
    let dir = TestDir::new("binary-secure");
    let server_ca = Ca::new("gateway CA");
    let client_ca = Ca::new("client CA");
    let upstream_ca = Ca::new("private upstream CA");
    let upstream = FakeUpstream::start_tls(server_config(
        &upstream_ca.server(),
        None,
        &[b"h2", b"http/1.1"],
    ))
    .await;
    upstream.respond(Scripted::ok(closed()));
    let first = server_ca.server();
    let server = server_files(&dir, &first, Some(&client_ca));
    let credentials = dir.write("credentials.toml", credentials_file(INVOICER_KEY, "org-42"));
    let upstream_ca_file = dir.write("upstream-ca.crt", &upstream_ca.pem);
    let upstream_url = upstream.url();
    let mut serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--upstream",
        &upstream_url,
        "--upstream-ca",
        path_str(&upstream_ca_file),
        "--tls-cert",
        path_str(server.tls_cert.as_deref().expect("cert")),
        "--tls-key",
        path_str(server.tls_key.as_deref().expect("key")),
        "--tls-client-ca",
        path_str(server.tls_client_ca.as_deref().expect("client CA")),
        "--credentials",
        path_str(&credentials),
        "--reload-interval",
        "50ms",
    ])
    .await;
    let addr = serving.grpc_addr();
    let invoicer = client_ca.client(&Names {
        uris: vec![INVOICER],
        ..Names::default()
    });
    let (channel, dialed) = tls_channel(addr, client_config(&server_ca, Some(&invoicer)));
    let mut client = InvoiceServiceClient::new(channel);

    client
        .close_invoice(close_with(
            "binary-secure-1",
            &[("api-key", CALLERS_OWN_KEY)],
        ))
        .await
        .expect("served over mTLS, forwarded over HTTPS");
    let rotated_key = "gk_live_MAPPED_binary_rotated_77f0";
    dir.write("credentials.toml", credentials_file(rotated_key, "org-43"));
    serving
        .wait_for_line("saying the credentials were reloaded", |line| {
            line.contains("reloaded credentials")
        })
        .await;
    client
        .close_invoice(close_with("binary-secure-2", &[]))
        .await
        .expect("served with the new mapping");

    let second = server_ca.server();
    server_files(&dir, &second, Some(&client_ca));
    serving
        .wait_for_line("saying the TLS files were reloaded", |line| {
            line.contains("reloaded tls")
        })
        .await;
    assert_eq!(
        served_certificate_with(addr, &server_ca, &invoicer).await,
        second.der.to_vec()
    );
    assert_ne!(first.der, second.der);

    let requests = upstream.requests();
    let sent: Vec<_> = requests
        .iter()
        .map(|r| (r.version, r.header("api-key"), r.header("organization-id")))
        .collect();
    assert_eq!(
        sent,
        vec![
            (http::Version::HTTP_2, Some(INVOICER_KEY), Some("org-42")),
            (http::Version::HTTP_2, Some(rotated_key), Some("org-43")),
        ]
    );
    assert_eq!(dialed.count(), 1);
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
    let stderr = stderr.join("\n");
    assert!(
        stderr.contains(&format!("\"caller\":\"{INVOICER}\"")),
        "{stderr}"
    );
    for secret in [CALLERS_OWN_KEY, INVOICER_KEY, rotated_key] {
        assert!(!stderr.contains(secret), "{secret} reached the logs");
    }
}

/// The certificate a fresh mTLS connection to `addr` is shown.
async fn served_certificate_with(addr: SocketAddr, ca: &Ca, identity: &Leaf) -> Vec<u8> {
    let stream = tls_connect(addr, client_config(ca, Some(identity)))
        .await
        .expect("TLS handshake");
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server's certificate")[0]
        .to_vec()
}
