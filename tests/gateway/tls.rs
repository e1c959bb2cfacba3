//! TLS on a real loopback listener with `ServerTls::accept` on the server
//! side and a tokio-rustls client: ALPN, plaintext refused, mTLS identities
//! and refusals, the handshake timeout, certificate rotation (good and
//! broken, by hand and by the polling task), start-up refusals naming flag
//! and file, and the upstream client configuration against a private CA.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use gormic_gateway::reload::{self, Outcome, Reloaded};
use gormic_gateway::tls::{
    CallerIdentity, HandshakeError, ServerTls, TlsArgs, TlsError, UpstreamTls, check_upstream_url,
    identity_of, upstream_client_config,
};

use crate::support::certs::{Ca, Leaf, Names, TestDir, client_config, tls_connect, tls_server};

/// Upper bound on anything a test waits for; only reached when it fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn args() -> TlsArgs {
    TlsArgs {
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        tls_handshake_timeout: Duration::from_secs(10),
        reload_interval: Duration::from_secs(10),
        upstream_ca: None,
        upstream_client_cert: None,
        upstream_client_key: None,
        allow_insecure_upstream: false,
    }
}

/// Writes `leaf` as `tls.crt`/`tls.key` (and `ca` as `ca.crt`) and returns
/// the server flags naming them.
fn server_files(dir: &TestDir, leaf: &Leaf, client_ca: Option<&Ca>) -> TlsArgs {
    let mut args = args();
    args.tls_cert = Some(dir.write("tls.crt", &leaf.cert_pem));
    args.tls_key = Some(dir.write("tls.key", &leaf.key_pem));
    args.tls_client_ca = client_ca.map(|ca| dir.write("ca.crt", &ca.pem));
    args
}

fn load(args: &TlsArgs) -> ServerTls {
    ServerTls::load(args)
        .expect("the test files are valid")
        .expect("--tls-cert is set")
}

/// The outcome of one server-side handshake.
type Handshake = Result<Option<CallerIdentity>, HandshakeError>;

/// A listener that runs `ServerTls::accept` on each connection, reports the
/// outcome, and on success writes `served` and closes.
async fn serve(
    tls: ServerTls,
    timeout: Duration,
) -> (SocketAddr, mpsc::UnboundedReceiver<Handshake>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(tcp, timeout).await {
                    Ok(mut accepted) => {
                        let _ = accepted.stream.write_all(b"served").await;
                        let _ = accepted.stream.shutdown().await;
                        let _ = tx.send(Ok(accepted.identity));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next(results: &mut mpsc::UnboundedReceiver<Handshake>) -> Handshake {
    tokio::time::timeout(PATIENCE, results.recv())
        .await
        .expect("the server reports the handshake")
        .expect("the server task runs")
}

/// Everything the client can read before the connection ends (an error
/// counts as the end: a refused handshake may end in a reset).
async fn read_all<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut received = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the connection ends");
    received
}

/// The certificate a fresh handshake sees.
async fn served_certificate(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let mut stream = tls_connect(addr, client_config(ca, None))
        .await
        .expect("handshake");
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .to_vec();
    assert_eq!(read_all(&mut stream).await, b"served");
    der
}

#[tokio::test]
async fn tls_is_accepted_with_h2_negotiated() {
    let dir = TestDir::new("accepted");
    let ca = Ca::new("server CA");
    let leaf = ca.server();
    let tls = load(&server_files(&dir, &leaf, None));
    assert!(!tls.mutual());
    let (addr, mut results) = serve(tls, Duration::from_secs(10)).await;

    let mut stream = tls_connect(addr, client_config(&ca, None))
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(read_all(&mut stream).await, b"served");
    let identity = next(&mut results).await.expect("server-side handshake");
    assert_eq!(identity, None, "no client certificate without mTLS");

    // gRPC-Web clients may only speak HTTP/1.1.
    let mut http1 = (*client_config(&ca, None)).clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = tls_connect(addr, std::sync::Arc::new(http1))
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn plaintext_on_the_tls_port_is_refused() {
    let dir = TestDir::new("plaintext");
    let ca = Ca::new("server CA");
    let (addr, mut results) = serve(load(&server_files(&dir, &ca.server(), None)), PATIENCE).await;

    for request in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"POST /gormic.om.v1.InvoiceService/GetInvoice HTTP/1.1\r\nhost: x\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(request).await.expect("send plaintext");
        let received = read_all(&mut tcp).await;
        assert!(
            !received.windows(6).any(|w| w == b"served") && !received.starts_with(b"HTTP/"),
            "nothing served to a plaintext client: {received:?}"
        );
        let outcome = next(&mut results).await;
        assert!(
            matches!(outcome, Err(HandshakeError::Failed(_))),
            "{outcome:?}"
        );
    }
}

#[tokio::test]
async fn mtls_identity_prefers_uri_then_dns_then_cn() {
    let dir = TestDir::new("identities");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let tls = load(&server_files(&dir, &server_ca.server(), Some(&client_ca)));
    assert!(tls.mutual());
    let (addr, mut results) = serve(tls, PATIENCE).await;

    let cases = [
        (
            Names {
                uris: vec!["spiffe://prod.example/ns/billing/sa/invoicer"],
                dns: vec!["invoicer.billing.svc"],
                cn: Some("invoicer"),
                ..Names::default()
            },
            "spiffe://prod.example/ns/billing/sa/invoicer",
        ),
        (
            Names {
                dns: vec!["invoicer.billing.svc", "other.billing.svc"],
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
    for (names, expected) in cases {
        let client = client_ca.client(&names);
        let mut stream = tls_connect(addr, client_config(&server_ca, Some(&client)))
            .await
            .expect("handshake with a certificate from the client CA");
        assert_eq!(read_all(&mut stream).await, b"served");
        let identity = next(&mut results).await.expect("accepted");
        assert_eq!(
            identity.as_ref().map(CallerIdentity::as_str),
            Some(expected)
        );
        assert_eq!(
            identity_of(&client.der).as_ref().map(|i| i.to_string()),
            Some(expected.to_string())
        );
    }
}

#[tokio::test]
async fn mtls_refuses_no_certificate_and_a_foreign_ca() {
    let dir = TestDir::new("mtls-refused");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let foreign_ca = Ca::new("foreign CA");
    let tls = load(&server_files(&dir, &server_ca.server(), Some(&client_ca)));
    let (addr, mut results) = serve(tls, PATIENCE).await;

    let foreign = foreign_ca.client(&Names {
        uris: vec!["spiffe://prod.example/ns/billing/sa/invoicer"],
        ..Names::default()
    });
    for (what, identity) in [("no certificate", None), ("foreign CA", Some(&foreign))] {
        // With TLS 1.3 the client may finish its side before the server
        // judges its certificate; the refusal then shows on the first read.
        let received = match tls_connect(addr, client_config(&server_ca, identity)).await {
            Ok(mut stream) => read_all(&mut stream).await,
            Err(_) => Vec::new(),
        };
        assert!(received.is_empty(), "{what}: nothing served: {received:?}");
        let outcome = next(&mut results).await;
        assert!(
            matches!(outcome, Err(HandshakeError::Failed(_))),
            "{what}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_silent_client_is_cut_off_by_the_handshake_timeout() {
    let dir = TestDir::new("silent");
    let ca = Ca::new("server CA");
    let timeout = Duration::from_millis(200);
    let (addr, mut results) = serve(load(&server_files(&dir, &ca.server(), None)), timeout).await;

    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let outcome = next(&mut results).await;
    assert!(
        matches!(outcome, Err(HandshakeError::Timeout(t)) if t == timeout),
        "{outcome:?}"
    );
    assert_eq!(
        read_all(&mut silent).await,
        b"",
        "the server closed the connection"
    );
}

#[tokio::test]
async fn rotation_is_picked_up_by_new_handshakes() {
    let dir = TestDir::new("rotation");
    let ca = Ca::new("server CA");
    let first = ca.server();
    let tls = load(&server_files(&dir, &first, None));
    let generation = tls.subscribe();
    let first_expiry = tls.not_after();
    let (addr, _results) = serve(tls.clone(), PATIENCE).await;
    assert_eq!(served_certificate(addr, &ca).await, first.der.to_vec());
    assert_eq!(tls.reload().expect("unchanged files"), Reloaded::Unchanged);

    let second = ca.leaf(
        &Names {
            dns: vec!["localhost"],
            validity: Some(((2020, 1, 1), (3000, 1, 1))),
            ..Names::default()
        },
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    server_files(&dir, &second, None);
    assert_eq!(tls.reload().expect("valid rotation"), Reloaded::Replaced);
    assert_eq!(*generation.borrow(), 1);
    assert_eq!(served_certificate(addr, &ca).await, second.der.to_vec());
    assert_ne!(tls.not_after(), first_expiry);
    assert_eq!(
        humantime::format_rfc3339_seconds(tls.not_after()).to_string(),
        "3000-01-01T00:00:00Z"
    );
    assert_eq!(tls.reload().expect("judged already"), Reloaded::Unchanged);
}

#[tokio::test]
async fn a_broken_rotation_keeps_the_old_certificate() {
    let dir = TestDir::new("broken-rotation");
    let ca = Ca::new("server CA");
    let good = ca.server();
    let args = server_files(&dir, &good, None);
    let tls = load(&args);
    let (addr, _results) = serve(tls.clone(), PATIENCE).await;
    let cert = args.tls_cert.clone().expect("cert path");
    let key = args.tls_key.clone().expect("key path");

    // A new certificate with the old key.
    let other = ca.server();
    dir.write("tls.crt", &other.cert_pem);
    let error = tls.reload().expect_err("mismatched key").to_string();
    assert_eq!(
        error,
        format!(
            "--tls-key {}: the private key does not match the certificate in --tls-cert {}",
            key.display(),
            cert.display()
        )
    );
    assert_eq!(served_certificate(addr, &ca).await, good.der.to_vec());
    assert_eq!(
        tls.reload().expect("same broken files"),
        Reloaded::Unchanged,
        "a refused rotation is reported once"
    );

    dir.write("tls.crt", "garbage");
    let error = tls.reload().expect_err("garbage").to_string();
    assert!(
        error.starts_with(&format!("--tls-cert {}: not a PEM file", cert.display())),
        "{error}"
    );
    assert_eq!(served_certificate(addr, &ca).await, good.der.to_vec());
    assert_eq!(*tls.subscribe().borrow(), 0, "nothing was put in use");

    server_files(&dir, &other, None);
    assert_eq!(tls.reload().expect("repaired"), Reloaded::Replaced);
    assert_eq!(served_certificate(addr, &ca).await, other.der.to_vec());
}

/// A Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> a
/// timestamped directory`; an update swaps the `..data` link in one rename.
fn publish_secret(dir: &TestDir, version: &str, leaf: &Leaf) {
    let version_dir = dir.path(version);
    std::fs::create_dir_all(&version_dir).expect("version dir");
    std::fs::write(version_dir.join("tls.crt"), &leaf.cert_pem).expect("cert");
    std::fs::write(version_dir.join("tls.key"), &leaf.key_pem).expect("key");
    let staging = dir.path("..data_tmp");
    let _ = std::fs::remove_file(&staging);
    std::os::unix::fs::symlink(version, &staging).expect("symlink");
    std::fs::rename(&staging, dir.path("..data")).expect("swap ..data");
    for name in ["tls.crt", "tls.key"] {
        let link = dir.path(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("link");
        }
    }
}

#[tokio::test]
async fn the_watch_task_follows_a_secret_volume_update() {
    let dir = TestDir::new("watch");
    let ca = Ca::new("server CA");
    let first = ca.server();
    publish_secret(&dir, "..v1", &first);
    let mut args = args();
    args.tls_cert = Some(dir.path("tls.crt"));
    args.tls_key = Some(dir.path("tls.key"));
    let tls = load(&args);
    let (addr, _results) = serve(tls.clone(), PATIENCE).await;

    let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watched = tls.clone();
    let task = tokio::spawn(reload::watch(
        Duration::from_millis(20),
        async move {
            let _ = stopped.await;
        },
        "tls",
        move || watched.reload(),
        move |what, outcome| {
            let _ = outcomes_tx.send((what, outcome));
        },
    ));
    let mut next_outcome = async || {
        tokio::time::timeout(PATIENCE, outcomes.recv())
            .await
            .expect("the watch task reports")
            .expect("the watch task runs")
    };

    let second = ca.server();
    publish_secret(&dir, "..v2", &second);
    assert_eq!(next_outcome().await, ("tls", Outcome::Success));
    assert_eq!(served_certificate(addr, &ca).await, second.der.to_vec());

    // A volume update whose key belongs to another certificate.
    let mut mismatched = ca.server();
    mismatched.key_pem = first.key_pem.clone();
    publish_secret(&dir, "..v3", &mismatched);
    assert_eq!(next_outcome().await, ("tls", Outcome::Failure));
    assert_eq!(Outcome::Failure.as_str(), "failure");
    assert_eq!(served_certificate(addr, &ca).await, second.der.to_vec());

    stop.send(()).expect("the watch task is waiting");
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the watch task stops on shutdown")
        .expect("no panic");
}

#[test]
fn bad_files_are_refused_at_start_up_naming_flag_and_file() {
    let dir = TestDir::new("startup");
    let ca = Ca::new("server CA");
    let good = ca.server();
    let other = ca.server();
    let expired = ca.leaf(
        &Names {
            dns: vec!["localhost"],
            validity: Some(((2000, 1, 1), (2001, 1, 1))),
            ..Names::default()
        },
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let future = ca.leaf(
        &Names {
            dns: vec!["localhost"],
            validity: Some(((3000, 1, 1), (3001, 1, 1))),
            ..Names::default()
        },
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let expired_ca_pem = {
        let leaf = ca.leaf(
            &Names {
                cn: Some("old CA"),
                validity: Some(((2000, 1, 1), (2001, 1, 1))),
                ..Names::default()
            },
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        leaf.cert_pem
    };
    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkq\n-----END ENCRYPTED PRIVATE KEY-----\n";

    let cert = dir.write("good.crt", &good.cert_pem);
    let key = dir.write("good.key", &good.key_pem);
    let other_key = dir.write("other.key", &other.key_pem);
    let missing = dir.path("missing.pem");
    let garbage = dir.write("garbage.pem", "this is not a certificate\n");
    let der = dir.write("cert.der", good.der.as_ref());
    let empty = dir.write("empty.pem", "");
    let expired_cert = dir.write("expired.crt", &expired.cert_pem);
    let expired_key = dir.write("expired.key", &expired.key_pem);
    let future_cert = dir.write("future.crt", &future.cert_pem);
    let future_key = dir.write("future.key", &future.key_pem);
    let encrypted_key = dir.write("encrypted.key", encrypted);
    let expired_ca = dir.write("expired-ca.crt", &expired_ca_pem);
    // Tests run as root here, which reads any file whatever its mode: a
    // directory is the unreadable file every user gets.
    let directory = dir.dir().to_path_buf();

    let cases: Vec<(&str, TlsArgs, &str, &Path, &str)> = vec![
        (
            "missing cert",
            with(&missing, &key, None),
            "--tls-cert",
            &missing,
            "cannot read the file: it does not exist",
        ),
        (
            "missing key",
            with(&cert, &missing, None),
            "--tls-key",
            &missing,
            "cannot read the file: it does not exist",
        ),
        (
            "unreadable cert",
            with(&directory, &key, None),
            "--tls-cert",
            &directory,
            "cannot read the file: it is a directory",
        ),
        (
            "non-PEM cert",
            with(&garbage, &key, None),
            "--tls-cert",
            &garbage,
            "not a PEM file",
        ),
        (
            "DER cert",
            with(&der, &key, None),
            "--tls-cert",
            &der,
            "looks like binary DER",
        ),
        (
            "empty key",
            with(&cert, &empty, None),
            "--tls-key",
            &empty,
            "the file is empty",
        ),
        (
            "non-PEM key",
            with(&cert, &garbage, None),
            "--tls-key",
            &garbage,
            "not a PEM file",
        ),
        (
            "swapped",
            with(&key, &cert, None),
            "--tls-cert",
            &key,
            "only a private key (are the certificate and key files swapped?)",
        ),
        (
            "encrypted key",
            with(&cert, &encrypted_key, None),
            "--tls-key",
            &encrypted_key,
            "the private key is encrypted",
        ),
        (
            "mismatched key",
            with(&cert, &other_key, None),
            "--tls-key",
            &other_key,
            "the private key does not match the certificate in --tls-cert",
        ),
        (
            "expired",
            with(&expired_cert, &expired_key, None),
            "--tls-cert",
            &expired_cert,
            "the certificate expired at 2001-01-01T00:00:00Z",
        ),
        (
            "not yet valid",
            with(&future_cert, &future_key, None),
            "--tls-cert",
            &future_cert,
            "the certificate is not valid before 3000-01-01T00:00:00Z",
        ),
        (
            "missing client CA",
            with(&cert, &key, Some(&missing)),
            "--tls-client-ca",
            &missing,
            "cannot read the file: it does not exist",
        ),
        (
            "non-PEM client CA",
            with(&cert, &key, Some(&garbage)),
            "--tls-client-ca",
            &garbage,
            "not a PEM file",
        ),
        (
            "client CA holds a key",
            with(&cert, &key, Some(&key)),
            "--tls-client-ca",
            &key,
            "no certificate in the file",
        ),
        (
            "expired client CA",
            with(&cert, &key, Some(&expired_ca)),
            "--tls-client-ca",
            &expired_ca,
            "no CA certificate in the file is valid now: the certificate expired at 2001-01-01T00:00:00Z",
        ),
    ];
    for (what, args, flag, path, problem) in cases {
        let error: TlsError = ServerTls::load(&args).expect_err(what);
        let message = error.to_string();
        assert_eq!(
            (error.flag, error.path.as_path()),
            (flag, path),
            "{what}: {message}"
        );
        let prefix = format!("{flag} {}: ", path.display());
        assert!(
            message.starts_with(&prefix) && message.contains(problem),
            "{what}: {message}"
        );
        for secret in [&good.key_pem, &other.key_pem, &expired.key_pem] {
            let body_line = secret.lines().nth(1).expect("a PEM body line");
            assert!(
                !message.contains(body_line),
                "{what}: key material in {message}"
            );
        }
    }
}

fn with(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsArgs {
    let mut args = args();
    args.tls_cert = Some(cert.to_path_buf());
    args.tls_key = Some(key.to_path_buf());
    args.tls_client_ca = client_ca.map(Path::to_path_buf);
    args
}

/// Reads what a TLS server behind `config` sends, or the error.
async fn upstream_read(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<(Vec<u8>, Option<Vec<u8>>)> {
    let mut stream = tls_connect(addr, config).await?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the test server answers or closes")?;
    Ok((received, alpn))
}

#[tokio::test]
async fn upstream_https_with_a_private_ca() {
    let dir = TestDir::new("upstream-ca");
    let private_ca = Ca::new("private upstream CA");
    let addr = tls_server(&private_ca.server(), None).await;

    let error = upstream_read(addr, upstream_client_config(&args()).expect("public roots"))
        .await
        .expect_err("a private CA is not among the public roots");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");

    let mut with_ca = args();
    with_ca.upstream_ca = Some(dir.write("upstream-ca.crt", &private_ca.pem));
    let config = upstream_client_config(&with_ca).expect("--upstream-ca");
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    let (received, alpn) = upstream_read(addr, config).await.expect("trusted now");
    assert_eq!(received, b"ok\n");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    let mut missing = args();
    missing.upstream_ca = Some(dir.path("nowhere.crt"));
    let error = upstream_client_config(&missing).expect_err("missing CA file");
    assert_eq!(error.flag, "--upstream-ca");
    assert!(
        error.to_string().starts_with(&format!(
            "--upstream-ca {}: cannot read",
            dir.path("nowhere.crt").display()
        )),
        "{error}"
    );
}

#[tokio::test]
async fn upstream_client_certificate() {
    let dir = TestDir::new("upstream-client");
    let private_ca = Ca::new("private upstream CA");
    let client_ca = Ca::new("upstream's client CA");
    let addr = tls_server(&private_ca.server(), Some(&client_ca)).await;
    let client = client_ca.client(&Names {
        uris: vec!["spiffe://prod.example/ns/gateway/sa/gormic-gateway"],
        ..Names::default()
    });

    let mut no_certificate = args();
    no_certificate.upstream_ca = Some(dir.write("upstream-ca.crt", &private_ca.pem));
    let refused = upstream_read(
        addr,
        upstream_client_config(&no_certificate).expect("config"),
    )
    .await;
    assert!(
        !matches!(&refused, Ok((received, _)) if !received.is_empty()),
        "the upstream refuses a gateway without a certificate: {refused:?}"
    );

    let mut with_certificate = no_certificate.clone();
    with_certificate.upstream_client_cert = Some(dir.write("client.crt", &client.cert_pem));
    with_certificate.upstream_client_key = Some(dir.write("client.key", &client.key_pem));
    let (received, _) = upstream_read(
        addr,
        upstream_client_config(&with_certificate).expect("config"),
    )
    .await
    .expect("accepted with the client certificate");
    assert_eq!(received, b"ok\n");

    let mut mismatched = with_certificate.clone();
    let other_key = dir.write("other.key", &client_ca.client(&Names::default()).key_pem);
    mismatched.upstream_client_key = Some(other_key.clone());
    let error = upstream_client_config(&mismatched).expect_err("mismatched pair");
    assert_eq!(
        error.to_string(),
        format!(
            "--upstream-client-key {}: the private key does not match the certificate in --upstream-client-cert {}",
            other_key.display(),
            dir.path("client.crt").display()
        )
    );
}

#[test]
fn plain_http_upstream_only_on_loopback_or_when_allowed() {
    let check = |url: &str, allow: bool| check_upstream_url(&url.parse().expect("URL"), allow);
    for url in [
        "https://api.example.com/gormic",
        "https://10.0.0.5:8443",
        "http://127.0.0.1:8080/api",
        "http://127.9.9.9",
        "http://[::1]:8080",
        "http://[::ffff:127.0.0.1]:8080",
        "http://localhost:8080",
        "http://LOCALHOST.",
        "http://0x7f.1:8080",
    ] {
        assert_eq!(check(url, false), Ok(()), "{url}");
    }
    for url in [
        "http://api.example.com",
        "http://10.0.0.5:8080",
        "http://[2001:db8::1]",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "http://localhost.evil.example",
    ] {
        let error = check(url, false).expect_err(url);
        assert!(
            error.contains("in clear") && error.contains("--allow-insecure-upstream"),
            "{url}: {error}"
        );
        assert_eq!(
            check(url, true),
            Ok(()),
            "{url} with --allow-insecure-upstream"
        );
    }
    let error = check("ftp://api.example.com", true).expect_err("ftp");
    assert!(error.contains("ftp"), "{error}");
}

#[test]
fn identities_with_control_characters_are_passed_over() {
    let ca = Ca::new("client CA");
    let client = ca.client(&Names {
        dns: vec!["invoicer.billing.svc"],
        cn: Some("evil\nline"),
        ..Names::default()
    });
    assert_eq!(
        identity_of(&client.der).map(|i| i.to_string()),
        Some("invoicer.billing.svc".to_string())
    );
    let client = ca.client(&Names {
        cn: Some("evil\nline"),
        ..Names::default()
    });
    assert_eq!(identity_of(&client.der), None);
    assert_eq!(identity_of(b"not a certificate"), None);
}

#[tokio::test]
async fn upstream_ca_and_client_certificate_rotate_without_a_new_config() {
    let dir = TestDir::new("upstream-rotation");
    let old_ca = Ca::new("old upstream CA");
    let new_ca = Ca::new("new upstream CA");
    let clients_ca = Ca::new("upstream's client CA");
    let other_ca = Ca::new("some other client CA");
    // The upstream before and after it moved to a new CA; both require a
    // client certificate from `clients_ca`.
    let before = tls_server(&old_ca.server(), Some(&clients_ca)).await;
    let after = tls_server(&new_ca.server(), Some(&clients_ca)).await;
    let rejected_client = other_ca.client(&Names::default());
    let accepted_client = clients_ca.client(&Names::default());

    let mut flags = args();
    flags.upstream_ca = Some(dir.write("upstream-ca.crt", &old_ca.pem));
    flags.upstream_client_cert = Some(dir.write("client.crt", &rejected_client.cert_pem));
    flags.upstream_client_key = Some(dir.write("client.key", &rejected_client.key_pem));
    let upstream = UpstreamTls::load(&flags).expect("valid files");
    assert!(upstream.has_files());
    let config = upstream.client_config();

    let refused = upstream_read(before, config.clone()).await;
    assert!(
        !matches!(&refused, Ok((received, _)) if !received.is_empty()),
        "a client certificate from another CA is refused: {refused:?}"
    );
    assert!(
        upstream_read(after, config.clone()).await.is_err(),
        "new CA not trusted yet"
    );

    dir.write("upstream-ca.crt", &new_ca.pem);
    dir.write("client.crt", &accepted_client.cert_pem);
    dir.write("client.key", &accepted_client.key_pem);
    assert_eq!(
        upstream.reload().expect("valid rotation"),
        Reloaded::Replaced
    );
    let (received, _) = upstream_read(after, config.clone())
        .await
        .expect("the same config now trusts the new CA and presents the new certificate");
    assert_eq!(received, b"ok\n");
    assert!(
        upstream_read(before, config.clone()).await.is_err(),
        "the old CA was replaced"
    );

    // A broken rotation: the key of another certificate.
    let key = dir.write("client.key", &rejected_client.key_pem);
    let error = upstream.reload().expect_err("mismatched pair").to_string();
    assert!(
        error.starts_with(&format!(
            "--upstream-client-key {}: the private key does not match",
            key.display()
        )),
        "{error}"
    );
    let (received, _) = upstream_read(after, config)
        .await
        .expect("the old pair stays");
    assert_eq!(received, b"ok\n");
    assert_eq!(
        upstream.reload().expect("reported once"),
        Reloaded::Unchanged
    );

    let plain = UpstreamTls::load(&args()).expect("no files");
    assert!(!plain.has_files());
    assert_eq!(
        plain.reload().expect("nothing to read"),
        Reloaded::Unchanged
    );
}

#[tokio::test]
async fn a_resumed_mtls_session_keeps_its_identity() {
    let dir = TestDir::new("resumption");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let tls = load(&server_files(&dir, &server_ca.server(), Some(&client_ca)));
    let (addr, mut results) = serve(tls, PATIENCE).await;
    let client = client_ca.client(&Names {
        uris: vec!["spiffe://prod.example/ns/billing/sa/invoicer"],
        ..Names::default()
    });
    // One config, so its session cache carries the ticket to the second
    // connection.
    let config = client_config(&server_ca, Some(&client));

    let mut kinds = Vec::new();
    for _ in 0..2 {
        let mut stream = tls_connect(addr, config.clone()).await.expect("handshake");
        assert_eq!(read_all(&mut stream).await, b"served");
        kinds.push(stream.get_ref().1.handshake_kind());
        let identity = next(&mut results).await.expect("accepted");
        assert_eq!(
            identity.as_ref().map(CallerIdentity::as_str),
            Some("spiffe://prod.example/ns/billing/sa/invoicer")
        );
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}
