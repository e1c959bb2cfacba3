//! Forward proxies, through a real tinyproxy: the environment's variables
//! as curl reads them (`HTTP_PROXY`, `NO_PROXY`), `--upstream-proxy none`
//! and `URL`, CONNECT tunnels that leave the upstream's certificate
//! verified by the gateway, and proxy credentials that work and never show
//! (logs, errors, metrics, `--help`).

use gormic_gateway::tls::{TlsArgs, UpstreamTls};
use gormic_gateway::upstream::{ProxySetting, ProxyUrl, UpstreamOptions};

use super::{Observed, Unreachable, client_of, closed, timed_close, unreachable};
use crate::support::admin::scrape;
use crate::support::binary::{SERVING, Serving, run_to_exit_with_env};
use crate::support::certs::{Ca, TestDir, server_config};
use crate::support::tinyproxy::{LoggedRequest, Tinyproxy};
use crate::support::{FakeUpstream, Scripted, details};

/// Environment variables of a binary.
type Env<'a> = &'a [(&'a str, &'a str)];

const CLOSE_PATH: &str = "/v1/om/invoices/inv-1/close";
const PROXY_USER: &str = "gateway";
/// Distinctive, so that a leak cannot go unnoticed.
const PROXY_PASSWORD: &str = "pr0xyPASSWORDk7q2";
const WRONG_PASSWORD: &str = "wr0ngPASSWORDz9x4";

async fn answering_upstream() -> FakeUpstream {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    upstream
}

/// The binary in front of `upstream` with `args` and `env`, logging JSON.
async fn binary(upstream: &str, args: &[&str], env: Env<'_>) -> Serving {
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--upstream",
        upstream,
    ];
    all.extend_from_slice(args);
    Serving::start_with_env(&all, env).await
}

/// The start-up line's `upstream_proxy` field (absent: no proxy).
fn logged_proxy(serving: &Serving) -> Option<String> {
    let line = serving
        .stderr
        .iter()
        .find(|line| line.contains(SERVING))
        .expect("the serving line");
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    json.get("upstream_proxy")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// One close through `serving`, which must succeed.
async fn close_through(serving: &Serving) {
    let mut client = client_of(serving).await;
    let call = timed_close(&mut client).await;
    assert_eq!(call.result.expect("served").invoice_number, 1);
}

/// Stops `serving` and returns its whole stderr.
async fn stop(serving: Serving) -> String {
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
    stderr.join("\n")
}

#[tokio::test]
async fn the_binary_sends_its_requests_through_the_http_proxy_of_its_environment() {
    let upstream = answering_upstream().await;
    let proxy = Tinyproxy::start();
    let serving = binary(&upstream.url(), &[], &[("HTTP_PROXY", &proxy.url())]).await;
    assert_eq!(logged_proxy(&serving), Some(proxy.url()));

    close_through(&serving).await;

    let request = upstream.only_request();
    assert_eq!(request.path, CLOSE_PATH);
    let via = request
        .header("via")
        .expect("a Via header: it came through a proxy");
    assert!(via.contains("tinyproxy"), "Via: {via}");
    assert_eq!(
        proxy.requests(),
        vec![LoggedRequest {
            method: "PATCH".into(),
            target: format!("{}{CLOSE_PATH}", upstream.url()),
        }],
        "log:\n{}",
        proxy.log()
    );
    stop(serving).await;
}

#[tokio::test]
async fn no_proxy_or_upstream_proxy_none_keep_the_binary_off_the_proxy_of_its_environment() {
    let upstream = answering_upstream().await;
    let proxy = Tinyproxy::start();
    let url = upstream.url();
    let through = proxy.url();
    let cases: [(&[&str], Env); 2] = [
        (&[], &[("HTTP_PROXY", &through), ("NO_PROXY", "127.0.0.1")]),
        (&["--upstream-proxy", "none"], &[("HTTP_PROXY", &through)]),
    ];

    for (n, (args, env)) in cases.into_iter().enumerate() {
        let serving = binary(&url, args, env).await;
        assert_eq!(logged_proxy(&serving), None, "case {n}: {args:?} {env:?}");
        close_through(&serving).await;
        stop(serving).await;
        let requests = upstream.requests();
        assert_eq!(requests.len(), n + 1);
        assert_eq!(
            requests[n].header("via"),
            None,
            "case {n}: {args:?} {env:?} went through the proxy"
        );
    }
    assert_eq!(proxy.requests(), vec![], "log:\n{}", proxy.log());
}

/// What `--upstream-ca <file>` makes of the upstream's TLS, with `ca`
/// written to `file` in `dir`.
fn trusting(dir: &TestDir, file: &str, ca: &Ca) -> UpstreamTls {
    UpstreamTls::load(&TlsArgs {
        upstream_ca: Some(dir.write(file, &ca.pem)),
        ..TlsArgs::default()
    })
    .expect("a valid upstream CA file")
}

#[tokio::test]
async fn an_https_upstream_is_reached_through_a_connect_tunnel_and_its_certificate_is_still_verified()
 {
    let dir = TestDir::new("network-proxy-connect");
    let private_ca = Ca::new("private upstream CA");
    let upstream = FakeUpstream::start_tls(server_config(
        &private_ca.server(),
        None,
        &[b"h2", b"http/1.1"],
    ))
    .await;
    upstream.respond(Scripted::ok(closed()));
    let proxy = Tinyproxy::start();
    let through = |tls: UpstreamTls| UpstreamOptions {
        proxy: ProxySetting::Url(ProxyUrl::parse(&proxy.url()).expect("proxy URL")),
        tls: Some(tls.client_config()),
        ..UpstreamOptions::default()
    };

    let trusted = Observed::start(
        &upstream.url(),
        through(trusting(&dir, "private-ca.crt", &private_ca)),
    )
    .await;
    assert_eq!(
        trusted.proxy.as_deref(),
        Some(proxy.url().as_str()),
        "the proxy the gateway uses"
    );
    let call = timed_close(&mut trusted.client()).await;
    assert_eq!(
        call.result
            .expect("served through the tunnel")
            .invoice_number,
        1
    );
    let tunnel = LoggedRequest {
        method: "CONNECT".into(),
        target: upstream.addr().to_string(),
    };
    assert_eq!(
        proxy.requests(),
        vec![tunnel.clone()],
        "log:\n{}",
        proxy.log()
    );
    let request = upstream.only_request();
    assert_eq!(request.path, CLOSE_PATH);
    assert_eq!(
        request.header("via"),
        None,
        "a tunnel carries TLS untouched"
    );

    // Through the same proxy, an upstream certificate from a CA the gateway
    // does not trust is refused: the tunnel does not stand in for it.
    let other_ca = Ca::new("some other CA");
    let untrusting = Observed::start(
        &upstream.url(),
        through(trusting(&dir, "other-ca.crt", &other_ca)),
    )
    .await;
    let call = timed_close(&mut untrusting.client()).await;
    let Unreachable::Tried { detail, attempts } = unreachable(call.status()) else {
        panic!("the breaker was open: {:?}", call.status());
    };
    assert!(
        detail.contains("TLS handshake") && detail.contains("UnknownIssuer"),
        "{detail}"
    );
    assert_eq!(
        proxy.requests(),
        vec![tunnel; 1 + attempts as usize],
        "one tunnel per attempt; log:\n{}",
        proxy.log()
    );
    assert_eq!(
        upstream.requests().len(),
        1,
        "nothing sent to the untrusted upstream"
    );
}

/// Fails the test if `secret` is anywhere in the status: message, details
/// (decoded) or their raw bytes.
fn assert_not_in_status(status: &tonic::Status, secret: &str) {
    assert!(!status.message().contains(secret), "{status:?}");
    assert!(
        !format!("{:?}", details(status)).contains(secret),
        "{status:?}"
    );
    assert!(
        !String::from_utf8_lossy(status.details()).contains(secret),
        "{status:?}"
    );
    assert!(!format!("{:?}", status.metadata()).contains(secret));
}

#[tokio::test]
async fn a_proxy_asking_for_credentials_passes_the_gateway_and_the_password_never_shows() {
    let upstream = answering_upstream().await;
    let proxy = Tinyproxy::builder()
        .basic_auth(PROXY_USER, PROXY_PASSWORD)
        .start();
    let with_credentials = proxy.url_with_credentials(PROXY_USER, PROXY_PASSWORD);
    let serving = binary(
        &upstream.url(),
        &[
            "--upstream-proxy",
            &with_credentials,
            "--log-level",
            "debug",
        ],
        &[],
    )
    .await;
    assert_eq!(
        logged_proxy(&serving),
        Some(format!("http://{PROXY_USER}:***@{}", proxy.addr()))
    );

    close_through(&serving).await;

    let request = upstream.only_request();
    assert!(
        request
            .header("via")
            .is_some_and(|via| via.contains("tinyproxy")),
        "{request:?}"
    );
    assert_eq!(request.header("proxy-authorization"), None);
    assert_eq!(proxy.upstream_connections(), 1, "log:\n{}", proxy.log());
    let metrics = scrape(serving.admin_addr()).await;
    assert!(
        !metrics.text().contains(PROXY_PASSWORD),
        "{}",
        metrics.text()
    );
    let stderr = stop(serving).await;
    assert!(!stderr.contains(PROXY_PASSWORD), "{stderr}");
}

/// Runs one close through the binary in front of `upstream` with `args`
/// (logging at debug) and returns its failure, after checking that
/// `secret` is in none of the status, `/metrics` and stderr, and that
/// nothing reached the upstream.
async fn failing_close_never_showing(
    upstream: &FakeUpstream,
    args: &[&str],
    secret: &str,
) -> tonic::Status {
    let mut all = vec!["--log-level", "debug"];
    all.extend_from_slice(args);
    let serving = binary(&upstream.url(), &all, &[]).await;
    let mut client = client_of(&serving).await;
    let call = timed_close(&mut client).await;
    let status = call.result.expect_err("the proxy refuses the gateway");
    assert_not_in_status(&status, secret);
    let metrics = scrape(serving.admin_addr()).await;
    assert!(!metrics.text().contains(secret), "{}", metrics.text());
    let stderr = stop(serving).await;
    assert!(!stderr.contains(secret), "{stderr}");
    assert!(upstream.requests().is_empty(), "nothing passed the proxy");
    status
}

#[tokio::test]
async fn a_wrong_proxy_password_fails_the_call_without_reaching_the_upstream_and_never_shows() {
    let dir = TestDir::new("network-proxy-wrong-password");
    let private_ca = Ca::new("private upstream CA");
    let plain = answering_upstream().await;
    let tls = FakeUpstream::start_tls(server_config(
        &private_ca.server(),
        None,
        &[b"h2", b"http/1.1"],
    ))
    .await;
    tls.respond(Scripted::ok(closed()));
    let ca_file = dir.write("upstream-ca.crt", &private_ca.pem);
    let proxy = Tinyproxy::builder()
        .basic_auth(PROXY_USER, PROXY_PASSWORD)
        .start();
    let wrong = proxy.url_with_credentials(PROXY_USER, WRONG_PASSWORD);

    // HTTPS: the proxy refuses the CONNECT, so no connection is made.
    let ca_path = ca_file.to_str().expect("UTF-8 path");
    let status = failing_close_never_showing(
        &tls,
        &["--upstream-proxy", &wrong, "--upstream-ca", ca_path],
        WRONG_PASSWORD,
    )
    .await;
    let Unreachable::Tried { detail, .. } = unreachable(&status) else {
        panic!("the breaker was open: {status:?}");
    };
    assert!(detail.contains("tunnel"), "the proxy's refusal: {detail}");

    // Plain HTTP: tinyproxy answers a wrong password with its own 401 (not
    // 407), which no client can tell from the upstream's: what must hold
    // is that nothing went further and the password shows nowhere.
    failing_close_never_showing(&plain, &["--upstream-proxy", &wrong], WRONG_PASSWORD).await;
    assert_eq!(proxy.upstream_connections(), 0, "log:\n{}", proxy.log());
}

#[tokio::test]
async fn a_proxy_asking_for_credentials_the_gateway_does_not_send_is_unavailable_and_nothing_is_sent()
 {
    let upstream = answering_upstream().await;
    let proxy = Tinyproxy::builder()
        .basic_auth(PROXY_USER, PROXY_PASSWORD)
        .start();
    let observed = Observed::start(
        &upstream.url(),
        UpstreamOptions {
            proxy: ProxySetting::Url(ProxyUrl::parse(&proxy.url()).expect("proxy URL")),
            ..UpstreamOptions::default()
        },
    )
    .await;

    let call = timed_close(&mut observed.client()).await;
    // A 407 comes from the proxy by definition: the upstream never saw the
    // request, and the call says so.
    let Unreachable::Tried { detail, attempts } = unreachable(call.status()) else {
        panic!("the breaker was open: {:?}", call.status());
    };
    assert!(
        detail.contains("407") && detail.contains(&proxy.url()),
        "{detail}"
    );
    assert!(
        upstream.requests().is_empty(),
        "nothing reached the upstream"
    );
    assert_eq!(proxy.upstream_connections(), 0, "log:\n{}", proxy.log());
    assert_eq!(
        proxy.forwarded(),
        attempts as usize,
        "each attempt asked the proxy; log:\n{}",
        proxy.log()
    );
}

#[tokio::test]
async fn help_and_a_refused_proxy_never_show_a_password_from_the_environment() {
    let secret = "hunter2SECRETpw";
    let output = run_to_exit_with_env(
        &["--help"],
        &[(
            "GORMIC_UPSTREAM_PROXY",
            &format!("http://u:{secret}@proxy.test:3128"),
        )],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("--upstream-proxy"), "{stdout}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "{stdout}{stderr}"
    );

    let output = run_to_exit_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:1",
        ],
        &[(
            "GORMIC_UPSTREAM_PROXY",
            &format!("socks5://u:{secret}@proxy.test:1080"),
        )],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--upstream-proxy"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    assert!(!stderr.contains(SERVING), "{stderr}");
}
