//! Idempotency keys end to end (issue 9): calls through the real gateway,
//! in front of a scripted fake upstream that counts what reached it. Every
//! case runs once per kind of store (memory, a real redis-server: see
//! `support::stores`); then the cases only one store has (two replicas
//! sharing Redis, Redis down or full, the memory store's bound).

use std::fmt::Debug;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use gormic_gateway::deadline::DeadlineArgs;
use gormic_gateway::idempotency::{Idempotency, IdempotencyArgs, MAX_OUTCOME_BYTES, METADATA_KEY};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::upstream::UpstreamOptions;

use crate::support::fake_upstream::envelope;
use crate::support::hanging_up::HangingUpUpstream;
use crate::support::redis::RedisServer;
use crate::support::stores::{Backend, for_each_store, open_at};
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, Scripted, TestGateway, create, details, error_info, keyed,
    keyed_as, no_proxy, replayed, replayed_in, retry_delay, until, within,
};

/// Bound of every wait for an event or a condition below; each holds
/// within a fraction of it.
const PATIENCE: Duration = Duration::from_secs(15);
/// `--upstream-timeout` of the test gateways (the default): with the store
/// timeout, the longest lease a call takes.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

// ---- fixtures ------------------------------------------------------------

#[derive(Clone, Copy)]
struct Settings {
    ttl: Duration,
    max_entries: u64,
    store_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            max_entries: 100_000,
            store_timeout: Duration::from_secs(2),
        }
    }
}

impl From<Settings> for IdempotencyArgs {
    fn from(settings: Settings) -> Self {
        IdempotencyArgs {
            idempotency_ttl: settings.ttl,
            idempotency_max_entries: settings.max_entries,
            idempotency_store_timeout: settings.store_timeout,
            ..IdempotencyArgs::default()
        }
    }
}

async fn redis_store(url: &str, settings: Settings) -> Idempotency {
    open_at(url, settings).await
}

/// A gateway in front of `upstream_url` keeping its keys in `store`.
async fn gateway(upstream_url: &str, store: Idempotency) -> TestGateway {
    gateway_with(upstream_url, store, DeadlineArgs::default()).await
}

async fn gateway_with(
    upstream_url: &str,
    store: Idempotency,
    deadlines: DeadlineArgs,
) -> TestGateway {
    TestGateway::builder(upstream_url)
        .idempotency(store)
        .deadlines(deadlines)
        .start()
        .await
}

fn close(invoice: &str) -> pb::CloseInvoiceRequest {
    pb::CloseInvoiceRequest {
        invoice_id: invoice.into(),
    }
}

fn created(id: &str) -> Scripted {
    Scripted::ok(json!({ "id": id }))
}

fn reason(status: &Status) -> String {
    error_info(status).reason
}

/// Asserts the code and `ErrorInfo` reason of a refusal by the gateway.
fn assert_refused(status: &Status, code: Code, expected_reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), expected_reason, "{status:?}");
    assert!(!replayed_in(status.metadata()), "a refusal is no replay");
}

/// Asserts that `again` is `first` replayed: same code, message and details.
fn assert_replays(first: &Status, again: &Status) {
    assert_eq!(again.code(), first.code());
    assert_eq!(again.message(), first.message());
    assert_eq!(again.details(), first.details(), "details byte for byte");
    assert!(replayed_in(again.metadata()), "{again:?}");
    assert!(!replayed_in(first.metadata()), "{first:?}");
}

fn is_refused(answer: &Result<impl Debug, Status>, expected_reason: &str) -> bool {
    matches!(answer, Err(status) if reason(status) == expected_reason)
}

// ---- cases run against every kind of store ------------------------------

for_each_store!(
    a_retried_create_gets_the_same_invoice_and_the_upstream_sees_one_request,
    a_retried_functional_error_gets_the_same_code_message_and_details,
    a_key_reused_with_another_request_is_refused_and_nothing_is_sent,
    the_same_key_on_another_rpc_organization_or_api_key_is_a_new_key,
    concurrent_duplicates_send_one_request_and_the_others_are_told_to_retry,
    a_call_that_timed_out_after_sending_leaves_its_key_unknown,
    a_connection_broken_after_sending_leaves_its_key_unknown,
    a_caller_that_cancels_mid_flight_leaves_its_key_unknown,
    a_request_that_never_left_releases_its_key_for_the_retry,
    each_upstream_answer_leaves_the_key_replayed_released_or_unknown,
    a_key_is_new_again_once_its_ttl_has_passed,
    malformed_keys_are_refused_with_a_bad_request_violation_and_nothing_is_sent,
    a_keyed_create_answered_502_is_sent_once_and_its_key_left_unknown,
    a_keyed_update_retried_by_the_gateway_records_its_final_answer,
    a_success_too_large_to_record_leaves_its_key_unknown,
);

async fn a_retried_create_gets_the_same_invoice_and_the_upstream_sees_one_request(
    backend: &Backend,
) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![created("inv-1"), created("inv-2")]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let first = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-create"))
        .await
        .expect("the first call succeeds");
    assert!(!replayed(&first), "the first answer is no replay");
    let first = first.into_inner();
    assert_eq!(first.id, "inv-1");

    for _ in 0..2 {
        let again = gw
            .client
            .create_invoice(keyed(create("ord-1"), "key-create"))
            .await
            .expect("the retry succeeds");
        assert!(replayed(&again), "{:?}", again.metadata());
        assert_eq!(again.into_inner(), first, "the same response message");
    }
    assert_eq!(upstream.requests().len(), 1, "one invoice created");
}

async fn a_retried_functional_error_gets_the_same_code_message_and_details(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![
        Scripted::code("ALREADY_CLOSED"),
        Scripted::ok(json!({"invoiceNumber": 1, "invoiceSource": "POS", "invoicedAt": "2026-11-25T10:00:00Z"})),
    ]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let first = gw
        .client
        .close_invoice(keyed(close("inv-1"), "key-close"))
        .await
        .expect_err("already closed");
    assert_eq!(first.code(), Code::FailedPrecondition, "{first:?}");
    assert_eq!(reason(&first), "ALREADY_CLOSED");

    let again = gw
        .client
        .close_invoice(keyed(close("inv-1"), "key-close"))
        .await
        .expect_err("replayed, not sent again (it would now succeed)");
    assert_replays(&first, &again);
    assert_eq!(reason(&again), "ALREADY_CLOSED");
    assert_eq!(upstream.requests().len(), 1);
}

async fn a_key_reused_with_another_request_is_refused_and_nothing_is_sent(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![created("inv-1"), created("inv-2")]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    gw.client
        .create_invoice(keyed(create("ord-1"), "key-reuse"))
        .await
        .expect("first use");
    let status = gw
        .client
        .create_invoice(keyed(create("ord-2"), "key-reuse"))
        .await
        .expect_err("another order under the same key");
    assert_refused(&status, Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED");
    let bad_request = details(&status).bad_request().cloned().expect("BadRequest");
    assert_eq!(bad_request.field_violations.len(), 1, "{bad_request:?}");
    assert_eq!(bad_request.field_violations[0].field, "idempotency-key");
    assert_eq!(upstream.requests().len(), 1, "nothing sent for the reuse");

    // The refusal changed nothing: the first request still replays.
    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-reuse"))
        .await
        .expect("replay");
    assert!(replayed(&again));
    assert_eq!(again.into_inner().id, "inv-1");
    assert_eq!(upstream.requests().len(), 1);
}

async fn the_same_key_on_another_rpc_organization_or_api_key_is_a_new_key(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![
        created("inv-1"),
        Scripted::ok(json!({"success": true})),
        created("inv-2"),
        created("inv-3"),
    ]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;
    let key = "key-scope";

    let first = gw
        .client
        .create_invoice(keyed(create("ord-1"), key))
        .await
        .expect("create");
    assert_eq!(first.into_inner().id, "inv-1");

    let sent = gw
        .client
        .send_invoice(keyed(
            pb::SendInvoiceRequest {
                invoice_id: "inv-1".into(),
            },
            key,
        ))
        .await
        .expect("another RPC proceeds");
    assert!(!replayed(&sent));
    assert!(sent.into_inner().success);
    assert_eq!(upstream.requests().len(), 2);

    let other_organization = gw
        .client
        .create_invoice(keyed_as(create("ord-1"), key, "org-2", API_KEY))
        .await
        .expect("another organization proceeds");
    assert!(!replayed(&other_organization));
    assert_eq!(other_organization.into_inner().id, "inv-2");
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].header("organization-id"), Some("org-2"));

    let other_api_key = gw
        .client
        .create_invoice(keyed_as(
            create("ord-1"),
            key,
            ORGANIZATION,
            "another-api-key",
        ))
        .await
        .expect("another api-key proceeds");
    assert!(!replayed(&other_api_key));
    assert_eq!(other_api_key.into_inner().id, "inv-3");
    assert_eq!(upstream.requests().len(), 4);

    // Each scope kept its own record.
    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), key))
        .await
        .expect("replay");
    assert!(replayed(&again));
    assert_eq!(again.into_inner().id, "inv-1");
    let again = gw
        .client
        .create_invoice(keyed_as(create("ord-1"), key, "org-2", API_KEY))
        .await
        .expect("replay");
    assert!(replayed(&again));
    assert_eq!(again.into_inner().id, "inv-2");
    assert_eq!(upstream.requests().len(), 4);
}

async fn concurrent_duplicates_send_one_request_and_the_others_are_told_to_retry(
    backend: &Backend,
) {
    let settings = Settings::default();
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    upstream.hold_answers();
    let mut gw = gateway(&upstream.url(), backend.open(settings).await).await;

    let mut calls = JoinSet::new();
    for _ in 0..10 {
        let mut client = gw.client.clone();
        calls.spawn(async move {
            client
                .create_invoice(keyed(create("ord-1"), "key-race"))
                .await
        });
    }
    within(
        "the first request to arrive",
        PATIENCE,
        upstream.wait_for_requests(1),
    )
    .await;
    // Nine calls are answered while one is held by the upstream.
    for _ in 0..9 {
        let answer = within("a duplicate to be answered", PATIENCE, calls.join_next())
            .await
            .expect("a call left")
            .expect("the call's task");
        let status = answer.expect_err("a duplicate while the first is in flight");
        assert_refused(&status, Code::Aborted, "IDEMPOTENCY_KEY_IN_PROGRESS");
        let delay = retry_delay(&status);
        assert!(
            delay > Duration::ZERO && delay <= UPSTREAM_TIMEOUT + settings.store_timeout,
            "at most the rest of the lease: {delay:?}"
        );
    }
    assert_eq!(upstream.requests().len(), 1, "one request upstream");

    // Another request under the key is refused while it is in progress too.
    let status = gw
        .client
        .create_invoice(keyed(create("ord-2"), "key-race"))
        .await
        .expect_err("reuse");
    assert_refused(&status, Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED");

    upstream.release_answers();
    let first = within("the first call to end", PATIENCE, calls.join_next())
        .await
        .expect("the first call")
        .expect("the call's task")
        .expect("the first call succeeds");
    assert!(!replayed(&first));
    let first = first.into_inner();
    assert_eq!(first.id, "inv-1");

    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-race"))
        .await
        .expect("a retry after completion");
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), first);
    assert_eq!(upstream.requests().len(), 1);
}

async fn a_call_that_timed_out_after_sending_leaves_its_key_unknown(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    upstream.hold_answers();
    // The gateway answers a tenth of the deadline early (200 ms), well
    // before the client's own timer would cancel the call.
    let options = DeadlineArgs {
        deadline_margin: Duration::from_secs(1),
        ..Default::default()
    };
    let mut gw = gateway_with(
        &upstream.url(),
        backend.open(Settings::default()).await,
        options,
    )
    .await;

    let mut request = keyed(create("ord-1"), "key-timeout");
    request.set_timeout(Duration::from_secs(2));
    let status = gw
        .client
        .create_invoice(request)
        .await
        .expect_err("the upstream holds its answer past the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_TIMEOUT");
    assert_eq!(info.metadata["bound"], "caller_deadline");
    assert_eq!(info.metadata["timeout_ms"], "1800");
    assert_eq!(upstream.requests().len(), 1);

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-timeout"))
        .await
        .expect_err("the first call may have created the invoice");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
    );
    assert_eq!(upstream.requests().len(), 1, "never re-sent blindly");
    upstream.release_answers();
}

async fn a_connection_broken_after_sending_leaves_its_key_unknown(backend: &Backend) {
    let upstream = HangingUpUpstream::start().await;
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-broken"))
        .await
        .expect_err("the connection breaks");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.metadata["request_sent"], "true");
    assert_eq!(info.metadata["attempts"], "1");
    assert_eq!(upstream.requests(), 1);

    // Well inside the first call's lease: only its verdict makes this unknown.
    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-broken"))
        .await
        .expect_err("unknown");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
    );
    assert_eq!(upstream.requests(), 1, "never re-sent blindly");
}

async fn a_caller_that_cancels_mid_flight_leaves_its_key_unknown(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    upstream.hold_answers();
    // A lease far longer than PATIENCE: only the cancelled call's own
    // verdict can turn the key unknown within this test.
    let options = DeadlineArgs {
        upstream_timeout: Duration::from_secs(300),
        ..Default::default()
    };
    let gw = gateway_with(
        &upstream.url(),
        backend.open(Settings::default()).await,
        options,
    )
    .await;

    let mut client = gw.client.clone();
    let call = tokio::spawn(async move {
        client
            .create_invoice(keyed(create("ord-1"), "key-cancel"))
            .await
    });
    within(
        "the request to arrive",
        PATIENCE,
        upstream.wait_for_requests(1),
    )
    .await;
    call.abort(); // an HTTP/2 RST_STREAM reaches the gateway
    within(
        "the gateway to drop the upstream request",
        PATIENCE,
        upstream.wait_for_abandoned(1),
    )
    .await;

    // The Redis store records a dropped lease's verdict in the background.
    let answer = until(
        "the dropped lease's verdict",
        PATIENCE,
        async || {
            let mut client = gw.client.clone();
            client
                .create_invoice(keyed(create("ord-1"), "key-cancel"))
                .await
        },
        |answer| !is_refused(answer, "IDEMPOTENCY_KEY_IN_PROGRESS"),
    )
    .await;
    let status = answer.expect_err("unknown");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
    );
    assert_eq!(upstream.requests().len(), 1);
    upstream.release_answers();
}

async fn a_request_that_never_left_releases_its_key_for_the_retry(backend: &Backend) {
    // Bound, not listening: connections are refused until it starts.
    let reserved = FakeUpstream::reserve();
    let mut gw = gateway(&reserved.url(), backend.open(Settings::default()).await).await;

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-refused"))
        .await
        .expect_err("connection refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(info.metadata["request_sent"], "false");

    let upstream = reserved.start().await;
    upstream.respond_in_order(vec![created("inv-1"), created("inv-2")]);
    let retry = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-refused"))
        .await
        .expect("the retry proceeds");
    assert!(!replayed(&retry), "a fresh answer");
    assert_eq!(retry.into_inner().id, "inv-1");

    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-refused"))
        .await
        .expect("replay");
    assert!(replayed(&again));
    assert_eq!(again.into_inner().id, "inv-1");
    assert_eq!(upstream.requests().len(), 1);
}

/// An error body with a code, as Gormic's functional errors have.
fn coded(code: &str) -> serde_json::Value {
    json!({"error": {"code": code}, "requestId": "req-upstream-1"})
}

/// What a repeat of a key gets after the first call's upstream answer.
#[derive(Debug, Clone, Copy)]
enum Repeat {
    /// Completed: the first answer again.
    Replays,
    /// Released (the upstream did not act): sent again.
    Proceeds,
    /// The upstream may have acted: IDEMPOTENCY_OUTCOME_UNKNOWN.
    Unknown,
}

async fn each_upstream_answer_leaves_the_key_replayed_released_or_unknown(backend: &Backend) {
    use Repeat::*;
    let upstream = FakeUpstream::start().await;
    // Cooldowns off: each 429 would refuse the repeat after it unsent
    // (that case is tests/gateway/cooldowns.rs's).
    let mut gw = TestGateway::builder(&upstream.url())
        .idempotency(backend.open(Settings::default()).await)
        .upstream(UpstreamOptions {
            cooldown_max: Duration::ZERO,
            ..no_proxy()
        })
        .start()
        .await;
    let cases = [
        (Scripted::code("ORDER_CLOSED"), Replays),
        (Scripted::raw(400, "bad request"), Replays),
        (Scripted::raw(404, "not found"), Replays),
        (Scripted::raw(409, "conflict"), Replays),
        (Scripted::json(200, json!({"data": {}})), Replays),
        (Scripted::raw(408, "request timeout"), Unknown),
        (Scripted::raw(500, "internal"), Unknown),
        (Scripted::raw(502, "bad gateway"), Unknown),
        (Scripted::raw(504, "gateway timeout"), Unknown),
        (Scripted::raw(429, "slow down"), Proceeds),
        (Scripted::raw(503, "busy"), Proceeds),
        // The status decides, whatever code a body names: Gormic's
        // functional errors are 400s; a proxy or an overloaded server may
        // put a code in any answer.
        (
            Scripted::json(200, json!({"error": {"code": "ORDER_CLOSED"}})),
            Replays,
        ),
        (Scripted::json(408, coded("REQUEST_TIMEOUT")), Unknown),
        (Scripted::json(500, coded("INTERNAL_ERROR")), Unknown),
        (Scripted::json(504, coded("GATEWAY_TIMEOUT")), Unknown),
        (Scripted::json(429, coded("RATE_LIMITED")), Proceeds),
        (Scripted::json(503, coded("SERVICE_UNAVAILABLE")), Proceeds),
    ];
    for (i, (answer, repeat)) in cases.into_iter().enumerate() {
        let context = format!("HTTP {} then {repeat:?}", answer.status);
        let key = format!("key-verdict-{i}");
        upstream.respond_in_order(vec![answer, created("inv-after")]);
        let before = upstream.requests().len();

        let first = gw
            .client
            .create_invoice(keyed(create("ord-1"), &key))
            .await
            .expect_err(&context);
        assert_eq!(upstream.requests().len(), before + 1, "{context}");

        let again = gw.client.create_invoice(keyed(create("ord-1"), &key)).await;
        match repeat {
            Replays => {
                let again = again.expect_err(&context);
                assert_replays(&first, &again);
                assert_eq!(upstream.requests().len(), before + 1, "{context}");
            }
            Unknown => {
                let again = again.expect_err(&context);
                assert_refused(
                    &again,
                    Code::FailedPrecondition,
                    "IDEMPOTENCY_OUTCOME_UNKNOWN",
                );
                assert_eq!(upstream.requests().len(), before + 1, "{context}");
            }
            Proceeds => {
                let again = again.unwrap_or_else(|e| panic!("{context}: {e:?}"));
                assert!(!replayed(&again), "{context}");
                assert_eq!(again.into_inner().id, "inv-after", "{context}");
                assert_eq!(upstream.requests().len(), before + 2, "{context}");
            }
        }
    }
}

async fn a_key_is_new_again_once_its_ttl_has_passed(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![created("inv-1"), created("inv-2")]);
    let settings = Settings {
        ttl: Duration::from_millis(500),
        ..Settings::default()
    };
    let gw = gateway(&upstream.url(), backend.open(settings).await).await;

    let first = gw
        .client
        .clone()
        .create_invoice(keyed(create("ord-1"), "key-ttl"))
        .await
        .expect("first");
    assert_eq!(first.into_inner().id, "inv-1");

    // Replays of the first answer until the record expires, then a new call.
    let answer = until(
        "the record to expire",
        PATIENCE,
        async || {
            let mut client = gw.client.clone();
            client
                .create_invoice(keyed(create("ord-1"), "key-ttl"))
                .await
        },
        |answer| matches!(answer, Ok(response) if !replayed(response)),
    )
    .meanwhile(|answer| matches!(answer, Ok(response) if replayed(response) && response.get_ref().id == "inv-1"))
    .await;
    assert_eq!(answer.expect("fresh").into_inner().id, "inv-2");
    assert_eq!(upstream.requests().len(), 2);
}

async fn malformed_keys_are_refused_with_a_bad_request_violation_and_nothing_is_sent(
    backend: &Backend,
) {
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let too_long = "k".repeat(256);
    let cases: [(&[u8], &str); 4] = [
        (b"", "must not be empty"),
        (too_long.as_bytes(), "at most 255 bytes, not 256"),
        // What ASCII metadata can carry outside printable ASCII: a tab,
        // and bytes above 0x7F.
        (b"tab\there", "byte 3 is 0x09"),
        (b"caf\xe9", "byte 3 is 0xE9"),
    ];
    for (key, expected) in cases {
        let mut request = keyed(create("ord-1"), "placeholder");
        let value = MetadataValue::try_from(key).expect("tonic carries it");
        request.metadata_mut().insert(METADATA_KEY, value);
        let status = gw.client.create_invoice(request).await.expect_err(expected);
        assert_refused(&status, Code::InvalidArgument, "INVALID_REQUEST");
        let bad_request = details(&status).bad_request().cloned().expect("BadRequest");
        let [violation] = bad_request.field_violations.as_slice() else {
            panic!("one violation: {bad_request:?}");
        };
        assert_eq!(violation.field, "idempotency-key");
        assert!(
            violation.description.contains(expected),
            "{expected}: {}",
            violation.description
        );
    }
    assert!(upstream.requests().is_empty(), "nothing sent");

    // The longest key, spaces and punctuation included, is fine.
    let longest = format!("{} ~!", "k ".repeat(126));
    assert_eq!(longest.len(), 255);
    gw.client
        .create_invoice(keyed(create("ord-1"), &longest))
        .await
        .expect("a 255-byte printable key");
    assert_eq!(upstream.requests().len(), 1);
}

async fn a_keyed_create_answered_502_is_sent_once_and_its_key_left_unknown(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![Scripted::raw(502, "bad gateway"), created("inv-1")]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-502"))
        .await
        .expect_err("not retried by the gateway");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).metadata["attempts"], "1");
    assert_eq!(
        upstream.requests().len(),
        1,
        "a second create is a second invoice"
    );

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-502"))
        .await
        .expect_err("the 502 may have come after Gormic acted");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
    );
    assert_eq!(upstream.requests().len(), 1);
}

async fn a_keyed_update_retried_by_the_gateway_records_its_final_answer(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![
        Scripted::raw(502, "bad gateway"),
        Scripted::ok(json!({"success": true})),
    ]);
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;
    let update = || pb::UpdateInvoiceRequest {
        invoice_id: "inv-1".into(),
        order_id: "ord-1".into(),
        ..Default::default()
    };

    let first = gw
        .client
        .update_invoice(keyed(update(), "key-update"))
        .await
        .expect("the gateway's retry succeeds");
    assert!(!replayed(&first));
    let first = first.into_inner();
    assert!(first.success);
    assert_eq!(upstream.requests().len(), 2, "502, then the retry");

    let again = gw
        .client
        .update_invoice(keyed(update(), "key-update"))
        .await
        .expect("replay");
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), first);
    assert_eq!(upstream.requests().len(), 2);
}

async fn a_success_too_large_to_record_leaves_its_key_unknown(backend: &Backend) {
    let upstream = FakeUpstream::start().await;
    // 80 warnings of 1 KiB: an answer over MAX_OUTCOME_BYTES (64 KiB).
    let warnings: Vec<_> = (0..80)
        .map(|i| json!({"code": format!("W{i}"), "text": "w".repeat(1024)}))
        .collect();
    let mut body = envelope(json!({"id": "inv-1"}));
    body["warnings"] = json!(warnings);
    upstream.respond(Scripted::json(200, body));
    let mut gw = gateway(&upstream.url(), backend.open(Settings::default()).await).await;

    let first = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-large"))
        .await
        .expect("the caller gets its answer");
    let first = first.into_inner();
    assert_eq!(first.id, "inv-1");
    let meta = first.meta.expect("meta");
    assert_eq!(meta.warnings.len(), 80);
    assert!(prost::Message::encoded_len(&meta) > MAX_OUTCOME_BYTES);

    // Not truncated, not dropped: a repeat is told to reconcile.
    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-large"))
        .await
        .expect_err("not recorded");
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "IDEMPOTENCY_OUTCOME_UNKNOWN",
    );
    assert_eq!(upstream.requests().len(), 1);
}

// ---- Redis only ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_landing_on_another_instance_replays_the_first_answer() {
    let server = RedisServer::start();
    let upstream = FakeUpstream::start().await;
    upstream.respond_in_order(vec![created("inv-1"), created("inv-2")]);
    let settings = Settings::default();
    let mut a = gateway(&upstream.url(), redis_store(&server.url(), settings).await).await;
    let mut b = gateway(&upstream.url(), redis_store(&server.url(), settings).await).await;

    let first = a
        .client
        .create_invoice(keyed(create("ord-1"), "key-shared"))
        .await
        .expect("on A");
    assert!(!replayed(&first));
    let first = first.into_inner();
    let again = b
        .client
        .create_invoice(keyed(create("ord-1"), "key-shared"))
        .await
        .expect("on B");
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), first);
    assert_eq!(upstream.requests().len(), 1, "one request in total");

    // While A's call is in flight, B tells the duplicate to retry; once A
    // has its answer, B replays it.
    upstream.hold_answers();
    let mut client = a.client.clone();
    let on_a = tokio::spawn(async move {
        client
            .create_invoice(keyed(create("ord-2"), "key-shared-2"))
            .await
    });
    within(
        "A's request to arrive",
        PATIENCE,
        upstream.wait_for_requests(2),
    )
    .await;
    let status = b
        .client
        .create_invoice(keyed(create("ord-2"), "key-shared-2"))
        .await
        .expect_err("in progress on A");
    assert_refused(&status, Code::Aborted, "IDEMPOTENCY_KEY_IN_PROGRESS");
    upstream.release_answers();
    let on_a = within("A's call to end", PATIENCE, on_a)
        .await
        .expect("task")
        .expect("A's call succeeds")
        .into_inner();
    assert_eq!(on_a.id, "inv-2");
    let again = b
        .client
        .create_invoice(keyed(create("ord-2"), "key-shared-2"))
        .await
        .expect("on B");
    assert!(replayed(&again));
    assert_eq!(again.into_inner(), on_a);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_released_on_one_instance_proceeds_on_the_other() {
    let server = RedisServer::start();
    let settings = Settings::default();
    // A's upstream refuses connections; B's answers.
    let unreachable = FakeUpstream::reserve();
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let mut a = gateway(
        &unreachable.url(),
        redis_store(&server.url(), settings).await,
    )
    .await;
    let mut b = gateway(&upstream.url(), redis_store(&server.url(), settings).await).await;

    let status = a
        .client
        .create_invoice(keyed(create("ord-1"), "key-released"))
        .await
        .expect_err("refused");
    assert_eq!(error_info(&status).metadata["request_sent"], "false");

    let on_b = b
        .client
        .create_invoice(keyed(create("ord-1"), "key-released"))
        .await
        .expect("B proceeds");
    assert!(!replayed(&on_b));
    let on_b = on_b.into_inner();

    // A now replays B's answer without reaching for its own upstream.
    let on_a = a
        .client
        .create_invoice(keyed(create("ord-1"), "key-released"))
        .await
        .expect("A replays");
    assert!(replayed(&on_a));
    assert_eq!(on_a.into_inner(), on_b);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_calls_fail_closed_while_redis_is_down_and_work_again_once_it_is_back() {
    let mut server = RedisServer::start();
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let settings = Settings {
        store_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let mut gw = gateway(&upstream.url(), redis_store(&server.url(), settings).await).await;
    gw.client
        .create_invoice(keyed(create("ord-1"), "key-before"))
        .await
        .expect("Redis up");
    assert_eq!(upstream.requests().len(), 1);

    server.kill();
    // A recorded key and a new one alike: never sent without a record.
    for key in ["key-before", "key-during"] {
        let started = tokio::time::Instant::now();
        let status = gw
            .client
            .create_invoice(keyed(create("ord-1"), key))
            .await
            .expect_err("the store is down");
        let elapsed = started.elapsed();
        assert_refused(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
        let info = error_info(&status);
        let target = format!("redis://127.0.0.1:{}", server.port());
        assert!(info.metadata["detail"].contains(&target), "{info:?}");
        assert!(status.message().contains("nothing was sent"), "{status:?}");
        // Bounded by the store timeout (1 s), not the upstream's (10 s).
        assert!(elapsed < UPSTREAM_TIMEOUT, "{key}: {elapsed:?}");
    }
    assert_eq!(upstream.requests().len(), 1, "nothing sent");

    let unkeyed = gw
        .client
        .create_invoice(crate::support::authed(create("ord-9")))
        .await
        .expect("a call without a key is unaffected");
    assert_eq!(unkeyed.into_inner().id, "inv-1");
    assert_eq!(upstream.requests().len(), 2);

    tokio::task::block_in_place(|| server.restart());
    // The connection manager reconnects by itself; a fresh key per try, as
    // a failed try records nothing.
    let mut tries = 0;
    let answer = until(
        "a keyed call to succeed with Redis back",
        PATIENCE,
        async || {
            tries += 1;
            let key = format!("key-after-{tries}");
            let mut client = gw.client.clone();
            client.create_invoice(keyed(create("ord-1"), &key)).await
        },
        Result::is_ok,
    )
    .meanwhile(|answer| is_refused(answer, "IDEMPOTENCY_STORE_UNAVAILABLE"))
    .await;
    assert!(!replayed(&answer.expect("Redis back")));
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_lease_timed_out_unseen_in_redis_stays_free() {
    let server = RedisServer::start();
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let settings = Settings {
        store_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let mut gw = gateway(&upstream.url(), redis_store(&server.url(), settings).await).await;
    let mut raw = server.raw_connection().await;

    // A first keyed call loads the script (a paused EVALSHA of an unknown
    // script would only fail, late, with NOSCRIPT).
    gw.client
        .create_invoice(keyed(create("ord-0"), "key-warm"))
        .await
        .expect("Redis up");

    // Redis holds writes (and scripts) unanswered: the gateway's lease is
    // taken only once the pause ends, after the call gave up on it.
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query_async(&mut raw)
        .await
        .expect("CLIENT PAUSE");
    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-paused"))
        .await
        .expect_err("no answer from the store in time");
    assert_refused(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
    assert_eq!(upstream.requests().len(), 1, "nothing sent");
    let () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut raw)
        .await
        .expect("CLIENT UNPAUSE");

    // The late lease is undone: the key proceeds (not "outcome unknown"
    // once the lease, 11 s, ends).
    let answer = until(
        "the key to proceed once its late lease is undone",
        PATIENCE,
        async || {
            let mut client = gw.client.clone();
            client
                .create_invoice(keyed(create("ord-1"), "key-paused"))
                .await
        },
        Result::is_ok,
    )
    .meanwhile(|answer| is_refused(answer, "IDEMPOTENCY_KEY_IN_PROGRESS"))
    .await;
    assert!(!replayed(&answer.expect("proceeds")));
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_redis_never_came_up_serves_calls_without_a_key() {
    // Bound, not listening: Redis connections are refused.
    let nothing = FakeUpstream::reserve();
    let port = nothing.addr().port();
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let store = redis_store(&format!("redis://127.0.0.1:{port}"), Settings::default()).await;
    let mut gw = gateway(&upstream.url(), store).await;

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-1"))
        .await
        .expect_err("no store");
    assert_refused(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
    assert!(upstream.requests().is_empty());
    gw.client
        .create_invoice(crate::support::authed(create("ord-1")))
        .await
        .expect("without a key");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_new_keys_and_sends_nothing() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let mut gw = gateway(
        &upstream.url(),
        redis_store(&server.url(), Settings::default()).await,
    )
    .await;
    gw.client
        .create_invoice(keyed(create("ord-1"), "key-before"))
        .await
        .expect("room for one");

    // Below what Redis already uses: from now on it refuses every write.
    // (Filling it would not do: a big write's own buffer tips it over the
    // limit, and once refused, small writes fit again.)
    let mut raw = server.raw_connection().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut raw)
        .await
        .expect("CONFIG SET maxmemory");

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-new"))
        .await
        .expect_err("no room for a new key");
    assert_refused(&status, Code::ResourceExhausted, "IDEMPOTENCY_STORE_FULL");
    assert_eq!(upstream.requests().len(), 1, "nothing sent");
    // What was recorded still replays; calls without a key still work.
    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-before"))
        .await
        .expect("replay");
    assert!(replayed(&again));
    gw.client
        .create_invoice(crate::support::authed(create("ord-1")))
        .await
        .expect("without a key");
    assert_eq!(upstream.requests().len(), 2);
}

// ---- memory store only ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_refuses_a_new_key_and_sends_nothing() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(created("inv-1"));
    let settings = Settings {
        max_entries: 1,
        ..Settings::default()
    };
    let mut gw = gateway(&upstream.url(), open_at("memory", settings).await).await;
    gw.client
        .create_invoice(keyed(create("ord-1"), "key-first"))
        .await
        .expect("room for one");

    let status = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-second"))
        .await
        .expect_err("full");
    assert_refused(&status, Code::ResourceExhausted, "IDEMPOTENCY_STORE_FULL");
    assert!(
        details(&status).retry_info().is_some(),
        "RetryInfo: {status:?}"
    );
    assert_eq!(upstream.requests().len(), 1, "nothing sent");

    // Nothing was evicted to make room, and keyless calls still work.
    let again = gw
        .client
        .create_invoice(keyed(create("ord-1"), "key-first"))
        .await
        .expect("replay");
    assert!(replayed(&again));
    gw.client
        .create_invoice(crate::support::authed(create("ord-1")))
        .await
        .expect("without a key");
    assert_eq!(upstream.requests().len(), 2);
}
