//! The call path as one sequence: one deadline from the call's arrival for
//! every step (a slow idempotency store included), the minimum of store
//! round trips, and one admission permit from the first step to the last.

use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Code;

use gormic_gateway::idempotency::{Idempotency, IdempotencyArgs, parse_store};
use gormic_gateway::proto::v1 as pb;

use crate::support::delay_proxy::DelayProxy;
use crate::support::redis::RedisServer;
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, Scripted, TestGateway, create, error_info, keyed, logs,
    replayed, until, with_metadata,
};

/// Bound of every wait for an event below; each holds within a fraction.
const PATIENCE: Duration = Duration::from_secs(15);

/// A Redis store reached through `proxy`, as the flags open it.
async fn store_through(proxy: &DelayProxy, timeout: Duration) -> Idempotency {
    let args = IdempotencyArgs {
        idempotency_store: parse_store(&proxy.redis_url()).expect("a redis URL"),
        idempotency_store_timeout: timeout,
        ..IdempotencyArgs::default()
    };
    Idempotency::from_args(&args).await.expect("store opens")
}

async fn gateway(upstream: &FakeUpstream, store: Idempotency, max_in_flight: usize) -> TestGateway {
    TestGateway::builder(&upstream.url())
        .idempotency(store)
        .max_in_flight(max_in_flight)
        .start()
        .await
}

/// One keyed call with a generous deadline: the store connection is open
/// and its scripts are loaded, so that what follows measures a warm store.
async fn warm_up(gw: &mut TestGateway) {
    gw.client
        .create_invoice(keyed(create("ord-warm"), "warm-up"))
        .await
        .expect("the warm-up call succeeds");
}

#[tokio::test]
async fn a_keyed_call_costs_two_store_round_trips_one_for_the_lease_one_for_the_record() {
    let redis = RedisServer::start();
    let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-1"})));
    let store = store_through(&proxy, Duration::from_secs(2)).await;
    let mut gw = gateway(&upstream, store, 100).await;
    warm_up(&mut gw).await;

    proxy.reset_counts();
    redis.reset_stats();
    gw.client
        .create_invoice(keyed(create("ord-1"), "round-trips-1"))
        .await
        .expect("created");
    assert_eq!(
        proxy.round_trips(),
        2,
        "one to take the lease, one to record"
    );
    let stats = redis.commandstats();
    assert_eq!(stats.get("evalsha").copied(), Some(2), "{stats:?}");
    assert_eq!(
        stats.get("script|load"),
        None,
        "scripts stay loaded: {stats:?}"
    );
}

#[tokio::test]
async fn a_slow_store_still_gets_the_caller_its_answer_in_time_and_a_retry_never_sends_twice() {
    let redis = RedisServer::start();
    // 600 ms per store round trip: the lease alone takes most of a 1 s
    // deadline, the record would end past it.
    let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-1"})));
    let store = store_through(&proxy, Duration::from_secs(2)).await;
    let mut gw = gateway(&upstream, store, 100).await;
    warm_up(&mut gw).await;
    proxy.set_delay(Duration::from_millis(300));
    let sent_before = upstream.requests().len();

    let deadline = Duration::from_secs(1);
    let mut request = keyed(create("ord-1"), "slow-store-1");
    request.set_timeout(deadline);
    let started = Instant::now();
    let answer = gw.client.create_invoice(request).await;
    let elapsed = started.elapsed();
    let response = answer.expect("the upstream's answer, not the caller's own timeout");
    assert_eq!(response.get_ref().id, "inv-1");
    assert!(elapsed < deadline, "answered after {elapsed:?}");
    assert_eq!(upstream.requests().len(), sent_before + 1);

    // Retries with the same key: told to wait while the record is finished
    // in the background, then given the first answer; never sent again.
    let replay = until(
        "the record to be finished",
        PATIENCE,
        async || {
            gw.client
                .create_invoice(keyed(create("ord-1"), "slow-store-1"))
                .await
        },
        Result::is_ok,
    )
    .meanwhile(|answer| {
        matches!(answer, Err(status) if status.code() == Code::Aborted
            && error_info(status).reason == "IDEMPOTENCY_KEY_IN_PROGRESS")
    })
    .await
    .expect("the record is finished");
    assert!(replayed(&replay));
    assert_eq!(replay.get_ref().id, "inv-1");
    assert_eq!(upstream.requests().len(), sent_before + 1, "sent once");
}

#[tokio::test]
async fn a_call_recording_its_outcome_still_holds_its_admission_and_a_shed_call_writes_no_line() {
    let logs = logs();
    let redis = RedisServer::start();
    let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-1"})));
    let store = store_through(&proxy, Duration::from_secs(10)).await;
    let mut gw = gateway(&upstream, store, 1).await;
    let limit = gw.in_flight_limit().clone();
    warm_up(&mut gw).await;

    // The first call takes its lease and reaches the upstream; its record
    // is then held at the store.
    upstream.hold_answers();
    let mut client = gw.client.clone();
    let mut request = keyed(create("ord-1"), "parked-1");
    request.metadata_mut().insert(
        "x-request-id",
        "recorded-after-park-1".parse().expect("ASCII"),
    );
    let first = tokio::spawn(async move { client.create_invoice(request).await });
    upstream.wait_for_requests(2).await;
    proxy.reset_counts();
    proxy.hold();
    upstream.release_answers();
    tokio::time::timeout(PATIENCE, proxy.wait_for_round_trips(1))
        .await
        .expect("the record reaches the store");
    assert_eq!(limit.in_flight(), 1, "the recording call is still admitted");

    let shed = gw
        .client
        .close_invoice(with_metadata(
            pb::CloseInvoiceRequest {
                invoice_id: "inv-1".into(),
            },
            &[
                ("api-key", API_KEY),
                ("organization-id", ORGANIZATION),
                ("x-request-id", "shed-while-recording-1"),
            ],
        ))
        .await
        .expect_err("shed at --max-in-flight 1");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert_eq!(error_info(&shed).reason, "OVERLOADED");
    assert_eq!(upstream.requests().len(), 2, "the shed call sent nothing");

    proxy.release();
    let created = first.await.expect("task").expect("the first call succeeds");
    assert_eq!(created.get_ref().id, "inv-1");
    // The admitted call's line is written; the shed call's never is.
    let line = logs
        .wait_for_line("of the call recorded after its park", |l| {
            l.contains("recorded-after-park-1")
        })
        .await;
    assert!(line.contains("\"grpc_code\":\"OK\""), "{line}");
    assert!(
        !logs.text().contains("shed-while-recording-1"),
        "a shed call writes no line of its own"
    );
    assert_eq!(limit.in_flight(), 0);
}
