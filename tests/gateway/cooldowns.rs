//! The upstream's rate limit honoured (issue 18): a 429, or a 503 with
//! `Retry-After`, opens a cooldown for the api-key and organization-id;
//! until it ends their calls fail at once, unsent, with the time left;
//! other credentials are untouched; no gateway retry lands inside it; and
//! replicas sharing a Redis store share it. The fake upstream counts what
//! reached it.

use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;
use tonic::{Code, Response, Status};

use gormic_gateway::errors::GATEWAY_DOMAIN;
use gormic_gateway::idempotency::IdempotencyArgs;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::upstream::{BreakerArgs, DEFAULT_COOLDOWN, UpstreamOptions};

use crate::support::admin::Scrape;
use crate::support::redis::RedisServer;
use crate::support::stores::open_at;
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, PATIENCE, Scripted, TestGateway, authed, close, create,
    error_info, keyed, logs, no_proxy, replayed, retry_delay, spawn_app, until, with_metadata,
};

type Closed = Result<Response<pb::CloseInvoiceResponse>, Status>;

fn closed() -> Scripted {
    Scripted::ok(crate::support::closed())
}

/// A CloseInvoice with this api-key and organization-id.
async fn close_as(gateway: &TestGateway, api_key: &str, organization: &str) -> Closed {
    let request = with_metadata(
        close(),
        &[("api-key", api_key), ("organization-id", organization)],
    );
    gateway.client.clone().close_invoice(request).await
}

/// A CloseInvoice with the usual credential.
async fn close_call(gateway: &TestGateway) -> Closed {
    close_as(gateway, API_KEY, ORGANIZATION).await
}

fn reason(answer: &Closed) -> Option<String> {
    answer
        .as_ref()
        .err()
        .map(|status| error_info(status).reason)
}

/// Checks that `answer` is the cooldown's refusal, sent nowhere, and
/// returns its RetryInfo (the time left).
fn refused_unsent(answer: Closed) -> Duration {
    let status = answer.expect_err("refused while the credential cools down");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_RATE_LIMITED");
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata["request_sent"], "false");
    assert!(!info.metadata.contains_key("attempts"), "{info:?}");
    let left = retry_delay(&status);
    assert!(left > Duration::ZERO, "{left:?}");
    left
}

fn with_cap(max: Duration) -> UpstreamOptions {
    UpstreamOptions {
        cooldown_max: max,
        ..no_proxy()
    }
}

fn value(metrics: &Metrics, series: &str) -> f64 {
    Scrape(metrics.encode()).value(series).unwrap_or(0.0)
}

const ACTIVE: &str = "gormic_gateway_upstream_cooldowns_active";
const SHED: &str = r#"gormic_gateway_calls_shed_total{reason="upstream_rate_limited"}"#;
const OPENED_HERE: &str = r#"gormic_gateway_upstream_cooldowns_opened_total{source="local"}"#;
const OPENED_BY_REPLICA: &str =
    r#"gormic_gateway_upstream_cooldowns_opened_total{source="replica"}"#;

fn message(event: &str) -> String {
    format!(r#"gormic_gateway_upstream_cooldown_messages_total{{event="{event}"}}"#)
}

/// Calls until one is answered by the upstream, checking that every call
/// before it was refused unsent; returns the answer and the refusals.
async fn until_calls_flow(gateway: &TestGateway) -> (Closed, u32) {
    let mut refusals = 0;
    let answer = until(
        "calls with the credential to reach the upstream again",
        PATIENCE,
        async || {
            let answer = close_call(gateway).await;
            refusals += 1;
            answer
        },
        |answer| reason(answer).as_deref() != Some("UPSTREAM_RATE_LIMITED"),
    )
    .every(Duration::from_millis(50))
    .await;
    (answer, refusals - 1)
}

#[tokio::test]
async fn a_429_refuses_the_credential_unsent_until_its_retry_after_has_passed() {
    let metrics = Metrics::default();
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::builder(&upstream.url())
        .metrics(&metrics)
        .start()
        .await;
    upstream.respond(Scripted::too_many_requests(Some("1")));
    let started = Instant::now();

    let first = close_call(&gateway).await.expect_err("429");
    assert_eq!(first.code(), Code::ResourceExhausted);
    assert_eq!(error_info(&first).reason, "UPSTREAM_HTTP_ERROR");
    assert_eq!(retry_delay(&first), Duration::from_secs(1));
    assert_eq!(value(&metrics, ACTIVE), 1.0);
    assert_eq!(value(&metrics, OPENED_HERE), 1.0);

    upstream.respond(closed());
    let left = refused_unsent(close_call(&gateway).await);
    assert!(left <= Duration::from_secs(1), "{left:?}");
    assert_eq!(
        upstream.requests().len(),
        1,
        "the refused call was not sent"
    );

    let (answer, refused_meanwhile) = until_calls_flow(&gateway).await;
    answer.expect("the cooldown over, the call goes through");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the Retry-After: {:?}",
        started.elapsed()
    );
    assert_eq!(
        upstream.requests().len(),
        2,
        "only the 429 and the first call after the cooldown reached the upstream"
    );
    assert_eq!(value(&metrics, SHED), f64::from(1 + refused_meanwhile));
    assert_eq!(value(&metrics, ACTIVE), 0.0);
}

#[tokio::test]
async fn an_http_date_retry_after_opens_a_cooldown_until_that_date() {
    let (upstream, gateway) = spawn_app().await;
    // HTTP-dates have whole seconds: this one is 2 to 3 s away.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    upstream.respond(Scripted::too_many_requests(Some(&date)));
    let first = close_call(&gateway).await.expect_err("429");
    let cooldown = retry_delay(&first);
    assert!(
        cooldown > Duration::from_millis(1500) && cooldown <= Duration::from_secs(3),
        "the time until {date}: {cooldown:?}"
    );
    upstream.respond(closed());
    let left = refused_unsent(close_call(&gateway).await);
    assert!(left <= cooldown, "{left:?} after {cooldown:?}");
    assert_eq!(upstream.requests().len(), 1);

    // A date already past (clocks apart) and a value that is no date get
    // the default cooldown, each for its own credential.
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
    for (n, header) in [past.as_str(), "soon"].into_iter().enumerate() {
        let key = format!("other-key-{n}");
        upstream.respond(Scripted::too_many_requests(Some(header)));
        let answer = close_as(&gateway, &key, ORGANIZATION)
            .await
            .expect_err("429");
        assert_eq!(retry_delay(&answer), DEFAULT_COOLDOWN, "{header}");
        refused_unsent(close_as(&gateway, &key, ORGANIZATION).await);
    }
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn a_retry_after_longer_than_upstream_cooldown_max_is_cut_to_it() {
    let upstream = FakeUpstream::start().await;
    let cap = Duration::from_millis(1500);
    let gateway = TestGateway::builder(&upstream.url())
        .upstream(with_cap(cap))
        .start()
        .await;
    upstream.respond(Scripted::too_many_requests(Some("86400")));
    let started = Instant::now();
    let first = close_call(&gateway).await.expect_err("429");
    assert_eq!(retry_delay(&first), cap, "a day cut to the cap");
    upstream.respond(closed());
    assert!(refused_unsent(close_call(&gateway).await) <= cap);

    let (answer, _) = until_calls_flow(&gateway).await;
    answer.expect("the key is usable again after the cap, not after a day");
    assert!(started.elapsed() >= cap, "{:?}", started.elapsed());
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn retry_info_counts_down_from_one_refusal_to_the_next() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond(Scripted::too_many_requests(Some("30")));
    close_call(&gateway).await.expect_err("429");
    let first = refused_unsent(close_call(&gateway).await);
    // Time passing is what is measured here, not a wait for an event.
    let pause = Duration::from_millis(100);
    tokio::time::sleep(pause).await;
    let second = refused_unsent(close_call(&gateway).await);
    assert!(first <= Duration::from_secs(30), "{first:?}");
    assert!(
        second + pause <= first,
        "the time left decreases: {first:?}, then {second:?} {pause:?} later"
    );
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn other_credentials_are_untouched_by_a_cooldown() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond(Scripted::too_many_requests(Some("30")));
    close_call(&gateway).await.expect_err("429");

    upstream.respond(closed());
    close_as(&gateway, "another-api-key", ORGANIZATION)
        .await
        .expect("another api-key of the organization");
    close_as(&gateway, API_KEY, "org-2")
        .await
        .expect("the same api-key for another organization");
    refused_unsent(close_call(&gateway).await);
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn no_gateway_retry_lands_inside_a_cooldown() {
    let metrics = Metrics::default();
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::builder(&upstream.url())
        .metrics(&metrics)
        .start()
        .await;
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy").header("retry-after", "1"),
        Scripted::ok(json!({"success": true})),
    ]);
    let update = update_call;
    // An update may be sent again: the gateway retries it after the 503.
    let mut client = gateway.client.clone();
    let first = update();
    let retried = tokio::spawn(async move { client.update_invoice(first).await });
    until(
        "the 503 to open the cooldown",
        PATIENCE,
        async || value(&metrics, ACTIVE),
        |active| *active == 1.0,
    )
    .await;
    // Meanwhile another update with the credential is refused unsent.
    let refused = gateway.client.clone().update_invoice(update()).await;
    let status = refused.expect_err("cooling down");
    assert_eq!(error_info(&status).reason, "UPSTREAM_RATE_LIMITED");

    let answer = retried.await.expect("the call's task");
    assert!(answer.expect("the retry succeeds").into_inner().success);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "the 503 and the one retry");
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "the retry waited for the cooldown's end: {gap:?}"
    );
    assert_eq!(
        value(
            &metrics,
            r#"gormic_gateway_upstream_retries_total{rpc_method="UpdateInvoice",reason="http_503"}"#
        ),
        1.0
    );
}

fn update_call() -> tonic::Request<pb::UpdateInvoiceRequest> {
    authed(pb::UpdateInvoiceRequest {
        invoice_id: "inv-1".into(),
        order_id: "ord-1".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_retry_waits_for_the_cooldown_even_when_the_retry_after_is_unreadable() {
    let (upstream, gateway) = spawn_app().await;
    // The retry policy alone would try again after its 25 ms backoff; the
    // default cooldown the 503 opened is 1 s.
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy").header("retry-after", "soon"),
        Scripted::ok(json!({"success": true})),
    ]);
    let answer = gateway.client.clone().update_invoice(update_call()).await;
    assert!(answer.expect("the retry succeeds").into_inner().success);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= DEFAULT_COOLDOWN,
        "the retry came {gap:?} after the 503"
    );
}

#[tokio::test]
async fn a_retry_is_given_up_when_a_longer_cooldown_opens_meanwhile() {
    let (upstream, gateway) = spawn_app().await;
    // The update's 503 asks for 1 s; the close in flight beside it gets a
    // 429 asking for 5 s, which outlasts the update's 3 s deadline.
    upstream.respond_in_order(vec![
        Scripted::raw(503, "busy").header("retry-after", "1"),
        Scripted::too_many_requests(Some("5")),
        Scripted::ok(json!({"success": true})),
    ]);
    upstream.hold_answers();
    let mut client = gateway.client.clone();
    let mut request = update_call();
    request.set_timeout(Duration::from_secs(3));
    let update = tokio::spawn(async move { client.update_invoice(request).await });
    upstream.wait_for_requests(1).await;
    let mut client = gateway.client.clone();
    let close = tokio::spawn(async move { client.close_invoice(authed(close())).await });
    upstream.wait_for_requests(2).await;
    upstream.release_answers();

    let status = close.await.expect("the close's task").expect_err("429");
    assert_eq!(retry_delay(&status), Duration::from_secs(5));
    let status = update
        .await
        .expect("the update's task")
        .expect_err("no retry into the cooldown");
    assert_eq!(status.code(), Code::Unavailable);
    let info = error_info(&status);
    assert_eq!(info.metadata["http_status"], "503");
    assert_eq!(info.metadata["attempts"], "1");
    let left = retry_delay(&status);
    assert!(
        left > Duration::from_secs(3) && left <= Duration::from_secs(5),
        "RetryInfo is what is left of the longer cooldown: {left:?}"
    );
    assert_eq!(upstream.requests().len(), 2, "the retry was not sent");
}

#[tokio::test]
async fn a_429_never_opens_the_breaker() {
    let metrics = Metrics::default();
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::builder(&upstream.url())
        .upstream(UpstreamOptions {
            breaker: BreakerArgs {
                upstream_breaker_failures: 1,
                upstream_breaker_gateway_errors: 1,
                ..BreakerArgs::default()
            },
            ..no_proxy()
        })
        .metrics(&metrics)
        .start()
        .await;
    upstream.respond(Scripted::too_many_requests(None));
    for n in 0..3 {
        close_as(&gateway, &format!("key-{n}"), ORGANIZATION)
            .await
            .expect_err("429");
    }
    upstream.respond(closed());
    close_as(&gateway, "key-fresh", ORGANIZATION)
        .await
        .expect("the breaker stayed closed");
    assert_eq!(
        value(
            &metrics,
            r#"gormic_gateway_upstream_breaker_state{state="closed"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            r#"gormic_gateway_upstream_breaker_transitions_total{to="open"}"#
        ),
        0.0
    );
}

#[tokio::test]
async fn a_keyed_call_refused_by_a_cooldown_leaves_its_key_for_after_it() {
    let (upstream, gateway) = spawn_app().await;
    let keyed_call = || keyed(create("ord-1"), "cooldown-key-1");
    let create = async || gateway.client.clone().create_invoice(keyed_call()).await;
    upstream.respond(Scripted::too_many_requests(Some("1")));
    create().await.expect_err("429: the key is released");
    upstream.respond(Scripted::ok(json!({"id": "inv-after"})));
    let refused = create().await.expect_err("cooling down");
    assert_eq!(error_info(&refused).reason, "UPSTREAM_RATE_LIMITED");
    let created = until(
        "the keyed call to go through after the cooldown",
        PATIENCE,
        create,
        Result::is_ok,
    )
    .meanwhile(|answer| {
        answer
            .as_ref()
            .is_err_and(|status| error_info(status).reason == "UPSTREAM_RATE_LIMITED")
    })
    .every(Duration::from_millis(50))
    .await
    .expect("created");
    assert_eq!(created.get_ref().id, "inv-after");
    assert!(!replayed(&created));
    let replay = gateway
        .client
        .clone()
        .create_invoice(keyed_call())
        .await
        .expect("replayed");
    assert!(replayed(&replay));
    assert_eq!(upstream.requests().len(), 2, "the 429 and the creation");
}

#[tokio::test]
async fn opening_a_cooldown_is_one_log_line_with_the_organization_never_the_api_key() {
    let logs = logs();
    let (upstream, gateway) = spawn_app().await;
    let (api_key, organization) = ("api-key-cooldown-log-7e1", "org-cooldown-log");
    // Two calls in flight answered 429 together: one cooldown, one line.
    upstream.hold_answers_until(2);
    upstream.respond(Scripted::too_many_requests(Some("2")));
    let (one, two) = tokio::join!(
        close_as(&gateway, api_key, organization),
        close_as(&gateway, api_key, organization)
    );
    one.expect_err("429");
    two.expect_err("429");
    refused_unsent(close_as(&gateway, api_key, organization).await);

    let opened = |line: &str| line.contains(organization) && line.contains(r#""cooldown_ms""#);
    let line = logs.wait_for_line("of the cooldown opened", opened).await;
    assert!(line.contains(r#""cooldown_ms":2000"#), "{line}");
    assert!(line.contains(r#""http_status":429"#), "{line}");
    assert!(line.contains(r#""level":"WARN""#), "{line}");
    let text = logs.text();
    assert_eq!(
        text.lines().filter(|line| opened(line)).count(),
        1,
        "{text}"
    );
    assert!(
        !text.contains(api_key),
        "the api-key never reaches the logs"
    );
}

#[tokio::test]
async fn with_upstream_cooldown_max_0s_a_429_refuses_nothing() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::builder(&upstream.url())
        .upstream(with_cap(Duration::ZERO))
        .start()
        .await;
    upstream.respond(Scripted::too_many_requests(Some("30")));
    let first = close_call(&gateway).await.expect_err("429");
    assert_eq!(
        retry_delay(&first),
        Duration::from_secs(30),
        "the upstream's Retry-After, as before cooldowns"
    );
    upstream.respond(closed());
    close_call(&gateway).await.expect("forwarded");
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_one_replica_opens_is_honoured_by_the_other_without_a_request() {
    let redis = RedisServer::start();
    let replica = async |upstream: &FakeUpstream, metrics: &Metrics| {
        let idempotency = open_at(&redis.url(), IdempotencyArgs::default()).await;
        let store = idempotency.shared_store().expect("a Redis store").clone();
        TestGateway::builder(&upstream.url())
            .idempotency(idempotency)
            .share_cooldowns(&store)
            .metrics(metrics)
            .start()
            .await
    };
    let (upstream_a, upstream_b) = (FakeUpstream::start().await, FakeUpstream::start().await);
    let (metrics_a, metrics_b) = (Metrics::default(), Metrics::default());
    let a = replica(&upstream_a, &metrics_a).await;
    let b = replica(&upstream_b, &metrics_b).await;
    // Delivery is at most once: both subscribe before anything is published.
    for metrics in [&metrics_a, &metrics_b] {
        until(
            "the replica to subscribe to the cooldowns",
            PATIENCE,
            async || value(metrics, &message("gap")),
            |gaps| *gaps >= 1.0,
        )
        .await;
    }

    upstream_a.respond(Scripted::too_many_requests(Some("5")));
    upstream_b.respond(closed());
    let first = close_call(&a).await.expect_err("429 at replica A");
    assert_eq!(retry_delay(&first), Duration::from_secs(5));
    until(
        "replica B to hear of the cooldown",
        PATIENCE,
        async || value(&metrics_b, ACTIVE),
        |active| *active == 1.0,
    )
    .await;

    let left = refused_unsent(close_call(&b).await);
    assert!(left <= Duration::from_secs(5), "{left:?}");
    assert!(
        upstream_b.requests().is_empty(),
        "replica B sent nothing with the credential"
    );
    close_as(&b, "another-api-key", ORGANIZATION)
        .await
        .expect("other credentials go through replica B");
    assert_eq!(upstream_b.requests().len(), 1);

    assert_eq!(value(&metrics_a, OPENED_HERE), 1.0);
    // Counted once Redis answered A's publish, which may come after B heard it.
    until(
        "replica A to count its message published",
        PATIENCE,
        async || value(&metrics_a, &message("published")),
        |published| *published == 1.0,
    )
    .await;
    assert_eq!(
        value(&metrics_a, &message("received")),
        0.0,
        "its own message is not one of another replica"
    );
    assert_eq!(value(&metrics_b, OPENED_BY_REPLICA), 1.0);
    assert_eq!(value(&metrics_b, &message("received")), 1.0);
    assert_eq!(value(&metrics_b, OPENED_HERE), 0.0);
    assert_eq!(value(&metrics_b, SHED), 1.0);
}
