//! The idempotency-key store (issue 9) on its own: every protocol case runs
//! once per kind of store (memory, a real redis-server: see
//! `support::stores`), then the cases only one store has (sharing across
//! instances, Redis down or full, the memory store's bounds), and the key
//! syntax.

use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use gormic_gateway::idempotency::{
    Begin, Digest, Idempotency, IdempotencyArgs, Lease, MAX_KEY_BYTES, MAX_OUTCOME_BYTES, Outcome,
    Recorded, Scope, StoreError, UnknownCause, parse_key, request_digest,
};
use gormic_gateway::proto::v1 as pb;

use crate::support::redis::RedisServer;
use crate::support::stores::{Backend, for_each_store, open_at};
use crate::support::{until, within};

/// A lease longer than any wait in these tests: only a verdict ends it.
const LONG: Duration = Duration::from_secs(120);
/// Bound of every "wait until" below; the conditions hold within a fraction.
const PATIENCE: Duration = Duration::from_secs(15);

// ---- fixtures ------------------------------------------------------------

#[derive(Clone, Copy)]
struct Settings {
    ttl: Duration,
    max_entries: u64,
    max_bytes: u64,
    store_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            max_entries: 100_000,
            max_bytes: 64 << 20,
            store_timeout: Duration::from_secs(5),
        }
    }
}

impl From<Settings> for IdempotencyArgs {
    fn from(settings: Settings) -> Self {
        IdempotencyArgs {
            idempotency_ttl: settings.ttl,
            idempotency_max_entries: settings.max_entries,
            idempotency_max_bytes: settings.max_bytes,
            idempotency_store_timeout: settings.store_timeout,
            ..IdempotencyArgs::default()
        }
    }
}

async fn redis_store(url: &str, settings: Settings, timeout: Duration) -> Idempotency {
    let settings = Settings {
        store_timeout: timeout,
        ..settings
    };
    open_at(url, settings).await
}

fn scope(key: &str) -> Scope {
    scope_of("org-1", "CreateInvoice", "api-key-a", key)
}

fn scope_of(organization: &str, rpc: &str, api_key: &str, key: &str) -> Scope {
    let key = parse_key(key.as_bytes()).expect("valid key");
    Scope::new(organization.as_bytes(), rpc, api_key.as_bytes(), &key)
}

fn digest(request: &pb::CreateInvoiceRequest) -> Digest {
    request_digest("CreateInvoice", &prost::Message::encode_to_vec(request))
}

fn request(order: &str) -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: order.into(),
        ..Default::default()
    }
}

fn response(id: &str) -> Outcome {
    Outcome::response(&pb::CreateInvoiceResponse {
        id: id.into(),
        meta: None,
    })
}

/// A functional error as the gateway answers it: code, message, details.
fn order_closed() -> tonic::Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        "ORDER_CLOSED",
        "om.gormic.com",
        [("upstream_request_id".to_owned(), "req-1".to_owned())],
    );
    tonic::Status::with_error_details(Code::FailedPrecondition, "order is closed", details)
}

async fn proceed(store: &Idempotency, scope: &Scope, digest: Digest, lease: Duration) -> Lease {
    match store.begin(scope, digest, lease).await {
        Ok(Begin::Proceed(lease)) => lease,
        other => panic!("expected Proceed, got {other:?}"),
    }
}

async fn begin(store: &Idempotency, scope: &Scope, digest: Digest) -> Result<Begin, StoreError> {
    store.begin(scope, digest, LONG).await
}

// ---- cases run against every kind of store ------------------------------

for_each_store!(
    a_new_key_proceeds_and_a_success_replays_byte_for_byte,
    a_functional_error_replays_with_identical_details,
    a_key_reused_with_another_request_is_a_mismatch,
    keys_are_scoped_by_organization_rpc_and_credential,
    concurrent_duplicates_get_one_proceed,
    an_unknown_outcome_is_never_a_free_key,
    a_dropped_lease_records_an_unknown_outcome,
    a_release_lets_the_retry_proceed,
    records_expire_after_the_ttl,
    an_expired_lease_reads_as_unknown_until_its_owner_finishes,
    a_lease_that_lost_its_record_changes_nothing,
    an_oversized_outcome_is_recorded_as_unknown,
);

async fn a_new_key_proceeds_and_a_success_replays_byte_for_byte(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-success"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, LONG).await;
    let outcome = response("inv-1");
    assert_eq!(lease.complete(outcome.clone()).await, Ok(Recorded::Done));
    for _ in 0..2 {
        let Ok(Begin::Replay(replayed)) = begin(&store, &s, d).await else {
            panic!("a completed key replays");
        };
        assert_eq!(replayed, outcome, "same bytes");
        let message = replayed
            .replay::<pb::CreateInvoiceResponse>()
            .expect("decodes")
            .expect("a success");
        assert_eq!(message.id, "inv-1");
    }
}

async fn a_functional_error_replays_with_identical_details(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-error"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, LONG).await;
    let status = order_closed();
    assert_eq!(
        lease.complete(Outcome::status(&status)).await,
        Ok(Recorded::Done)
    );
    let Ok(Begin::Replay(replayed)) = begin(&store, &s, d).await else {
        panic!("a completed key replays");
    };
    let Err(again) = replayed
        .replay::<pb::CreateInvoiceResponse>()
        .expect("decodes")
    else {
        panic!("the error replays as an error");
    };
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(again.message(), "order is closed");
    assert_eq!(again.details(), status.details(), "details byte for byte");
    let info = again.get_error_details();
    let info = info.error_info().expect("ErrorInfo survives");
    assert_eq!(info.reason, "ORDER_CLOSED");
}

async fn a_key_reused_with_another_request_is_a_mismatch(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let s = scope("k-reuse");
    let (first, other) = (digest(&request("o-1")), digest(&request("o-2")));
    let lease = proceed(&store, &s, first, LONG).await;
    // While in progress, and after completion.
    assert!(matches!(
        begin(&store, &s, other).await,
        Ok(Begin::Mismatch)
    ));
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));
    assert!(matches!(
        begin(&store, &s, other).await,
        Ok(Begin::Mismatch)
    ));
    assert!(matches!(
        begin(&store, &s, first).await,
        Ok(Begin::Replay(_))
    ));
    // The RPC is part of the digest too.
    let as_update = request_digest(
        "UpdateInvoice",
        &prost::Message::encode_to_vec(&request("o-1")),
    );
    assert!(matches!(
        begin(&store, &s, as_update).await,
        Ok(Begin::Mismatch)
    ));
}

async fn keys_are_scoped_by_organization_rpc_and_credential(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let d = digest(&request("o-1"));
    let base = scope_of("org-1", "CreateInvoice", "api-key-a", "k-scope");
    let lease = proceed(&store, &base, d, LONG).await;
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));
    for other in [
        scope_of("org-2", "CreateInvoice", "api-key-a", "k-scope"),
        scope_of("org-1", "SendInvoice", "api-key-a", "k-scope"),
        // Another credential never sees the first caller's answer.
        scope_of("org-1", "CreateInvoice", "api-key-b", "k-scope"),
    ] {
        let lease = proceed(&store, &other, d, LONG).await;
        assert_eq!(lease.release().await, Ok(Recorded::Done));
    }
    assert!(matches!(
        begin(&store, &base, d).await,
        Ok(Begin::Replay(_))
    ));
}

async fn concurrent_duplicates_get_one_proceed(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-race"), digest(&request("o-1")));
    let mut calls = JoinSet::new();
    for _ in 0..20 {
        let store = store.clone();
        calls.spawn(async move { store.begin(&s, d, LONG).await });
    }
    let mut leases = Vec::new();
    let mut in_progress = 0;
    let answers = within("every duplicate's answer", PATIENCE, calls.join_all()).await;
    for answer in answers {
        match answer {
            Ok(Begin::Proceed(lease)) => leases.push(lease),
            Ok(Begin::InProgress { retry_after }) => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= LONG,
                    "{retry_after:?}"
                );
                in_progress += 1;
            }
            other => panic!("a duplicate got {other:?}"),
        }
    }
    assert_eq!((leases.len(), in_progress), (1, 19));
    let lease = leases.pop().expect("one lease");
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));
    assert!(matches!(begin(&store, &s, d).await, Ok(Begin::Replay(_))));
}

async fn an_unknown_outcome_is_never_a_free_key(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-unknown"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, LONG).await;
    assert_eq!(lease.unknown().await, Ok(Recorded::Done));
    for _ in 0..2 {
        assert!(matches!(
            begin(&store, &s, d).await,
            Ok(Begin::OutcomeUnknown)
        ));
    }
    // The digest is still checked first.
    assert!(matches!(
        begin(&store, &s, digest(&request("o-2"))).await,
        Ok(Begin::Mismatch)
    ));
}

async fn a_dropped_lease_records_an_unknown_outcome(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-dropped"), digest(&request("o-1")));
    // As when the call's future is cancelled with the request in flight.
    let (taken, lease_taken) = tokio::sync::oneshot::channel();
    let call = {
        let store = store.clone();
        tokio::spawn(async move {
            let _lease = proceed(&store, &s, d, LONG).await;
            let _ = taken.send(());
            std::future::pending::<()>().await;
        })
    };
    within("the call to take the lease", PATIENCE, lease_taken)
        .await
        .expect("the call took the lease");
    assert!(matches!(
        begin(&store, &s, d).await,
        Ok(Begin::InProgress { .. })
    ));
    call.abort();
    assert!(call.await.expect_err("aborted").is_cancelled());
    // The lease runs two minutes: only the drop can make it unknown now.
    let answer = until(
        "the dropped lease's verdict",
        PATIENCE,
        async || begin(&store, &s, d).await,
        |a| !matches!(a, Ok(Begin::InProgress { .. })),
    )
    .await;
    assert!(matches!(answer, Ok(Begin::OutcomeUnknown)), "{answer:?}");
}

async fn a_release_lets_the_retry_proceed(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-release"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, LONG).await;
    assert_eq!(lease.release().await, Ok(Recorded::Done));
    // Released, the key is free for any request, not only the first one.
    let retry = proceed(&store, &s, digest(&request("o-2")), LONG).await;
    assert_eq!(retry.complete(response("inv-2")).await, Ok(Recorded::Done));
    assert!(matches!(
        begin(&store, &s, digest(&request("o-2"))).await,
        Ok(Begin::Replay(_))
    ));
}

async fn records_expire_after_the_ttl(backend: &Backend) {
    let store = backend
        .open(Settings {
            ttl: Duration::from_millis(300),
            ..Settings::default()
        })
        .await;
    let (s, d) = (scope("k-ttl"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, Duration::from_millis(100)).await;
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));
    let answer = until(
        "the record to expire",
        PATIENCE,
        async || begin(&store, &s, d).await,
        |a| matches!(a, Ok(Begin::Proceed(_))),
    )
    .meanwhile(|a| matches!(a, Ok(Begin::Replay(_))))
    .await;
    let Ok(Begin::Proceed(lease)) = answer else {
        unreachable!()
    };
    assert_eq!(lease.release().await, Ok(Recorded::Done));
}

async fn an_expired_lease_reads_as_unknown_until_its_owner_finishes(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let (s, d) = (scope("k-lease"), digest(&request("o-1")));
    let lease = proceed(&store, &s, d, Duration::from_millis(200)).await;
    // The owner is silent past its lease: the request may have gone out,
    // so the key is unknown, never free.
    let answer = until(
        "the silent owner's lease to expire",
        PATIENCE,
        async || begin(&store, &s, d).await,
        |a| matches!(a, Ok(Begin::OutcomeUnknown)),
    )
    .meanwhile(|a| matches!(a, Ok(Begin::InProgress { .. })))
    .await;
    assert!(matches!(answer, Ok(Begin::OutcomeUnknown)), "{answer:?}");
    // A late verdict of the owner still lands: the record is still its own.
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));
    assert!(matches!(begin(&store, &s, d).await, Ok(Begin::Replay(_))));
}

async fn a_lease_that_lost_its_record_changes_nothing(backend: &Backend) {
    let store = backend
        .open(Settings {
            ttl: Duration::from_millis(300),
            ..Settings::default()
        })
        .await;
    let (s, d) = (scope("k-lost"), digest(&request("o-1")));
    let stale = proceed(&store, &s, d, Duration::from_millis(100)).await;
    // Past the TTL the key is taken afresh by another call.
    let answer = until(
        "the key to be taken afresh past its TTL",
        PATIENCE,
        async || begin(&store, &s, d).await,
        |a| matches!(a, Ok(Begin::Proceed(_))),
    )
    .meanwhile(|a| matches!(a, Ok(Begin::InProgress { .. } | Begin::OutcomeUnknown)))
    .await;
    let Ok(Begin::Proceed(current)) = answer else {
        unreachable!()
    };
    assert_eq!(
        stale.complete(response("stale")).await,
        Ok(Recorded::NotOwner)
    );
    assert!(matches!(
        begin(&store, &s, d).await,
        Ok(Begin::InProgress { .. })
    ));
    // Still the current owner's record: its verdict lands.
    assert_eq!(
        current.complete(response("inv-2")).await,
        Ok(Recorded::Done)
    );
}

async fn an_oversized_outcome_is_recorded_as_unknown(backend: &Backend) {
    let store = backend.open(Settings::default()).await;
    let d = digest(&request("o-1"));
    let largest = Outcome::Response(Bytes::from(vec![7; MAX_OUTCOME_BYTES]));
    let lease = proceed(&store, &scope("k-largest"), d, LONG).await;
    assert_eq!(lease.complete(largest.clone()).await, Ok(Recorded::Done));
    let Ok(Begin::Replay(replayed)) = begin(&store, &scope("k-largest"), d).await else {
        panic!("the largest outcome replays");
    };
    assert_eq!(replayed, largest);

    let lease = proceed(&store, &scope("k-too-large"), d, LONG).await;
    let too_large = Outcome::Status {
        code: Code::FailedPrecondition as i32,
        message: "x".repeat(MAX_OUTCOME_BYTES),
        details: Bytes::new(),
    };
    assert_eq!(
        lease.complete(too_large).await,
        Ok(Recorded::AsUnknown(UnknownCause::TooLarge {
            bytes: MAX_OUTCOME_BYTES + 8
        }))
    );
    assert!(matches!(
        begin(&store, &scope("k-too-large"), d).await,
        Ok(Begin::OutcomeUnknown)
    ));
}

// ---- Redis only ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_one_redis_act_once() {
    let server = RedisServer::start();
    let a = redis_store(&server.url(), Settings::default(), Duration::from_secs(5)).await;
    let b = redis_store(&server.url(), Settings::default(), Duration::from_secs(5)).await;
    let (s, d) = (scope("k-shared"), digest(&request("o-1")));

    let lease = proceed(&a, &s, d, LONG).await;
    assert!(matches!(
        begin(&b, &s, d).await,
        Ok(Begin::InProgress { .. })
    ));
    let status = order_closed();
    assert_eq!(
        lease.complete(Outcome::status(&status)).await,
        Ok(Recorded::Done)
    );
    let Ok(Begin::Replay(replayed)) = begin(&b, &s, d).await else {
        panic!("the other replica replays");
    };
    assert_eq!(replayed, Outcome::status(&status));

    // Duplicates spread over both replicas: still one proceeds.
    let race = scope("k-shared-race");
    let mut calls = JoinSet::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.spawn(async move { store.begin(&race, d, LONG).await });
    }
    let mut proceeds = Vec::new();
    let answers = within("every duplicate's answer", PATIENCE, calls.join_all()).await;
    for answer in answers {
        match answer {
            Ok(Begin::Proceed(lease)) => proceeds.push(lease),
            Ok(Begin::InProgress { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(proceeds.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_only_hashed_keys_and_no_caller_data() {
    let server = RedisServer::start();
    let store = redis_store(&server.url(), Settings::default(), Duration::from_secs(5)).await;
    let s = scope_of(
        "org-secretive",
        "CreateInvoice",
        "api-key-hush",
        "key-visible",
    );
    let d = digest(&request("o-1"));
    let lease = proceed(&store, &s, d, LONG).await;
    assert_eq!(lease.complete(response("inv-1")).await, Ok(Recorded::Done));

    let mut raw = server.raw_connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut raw)
        .await
        .expect("KEYS");
    assert_eq!(keys, vec![format!("gormic:idem:v1:{}", s.to_hex())]);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut raw)
        .await
        .expect("GET");
    assert_eq!(value[0], 1, "format version");
    for secret in ["org-secretive", "api-key-hush", "key-visible"] {
        assert!(
            !keys[0].contains(secret) && !contains(&value, secret.as_bytes()),
            "{secret} stored"
        );
    }
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut raw)
        .await
        .expect("PTTL");
    assert!(ttl_ms > 0 && ttl_ms <= 3_600_000, "{ttl_ms}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_an_unknown_format_fails_closed() {
    let server = RedisServer::start();
    let store = redis_store(&server.url(), Settings::default(), Duration::from_secs(5)).await;
    let (s, d) = (scope("k-format"), digest(&request("o-1")));
    let mut raw = server.raw_connection().await;
    let () = redis::cmd("SET")
        .arg(format!("gormic:idem:v1:{}", s.to_hex()))
        .arg(b"\x09\x02future".as_slice())
        .query_async(&mut raw)
        .await
        .expect("SET");
    let Err(StoreError::Unavailable(why)) = begin(&store, &s, d).await else {
        panic!("an unreadable record is a store error");
    };
    assert!(why.contains("version 9"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_fast_and_never_shows_the_password() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("redis://gw:hunter2@127.0.0.1:{port}/0");
    // Start-up does not need Redis.
    let store = redis_store(&url, Settings::default(), Duration::from_secs(5)).await;
    assert!(!format!("{store:?}").contains("hunter2"), "{store:?}");
    for _ in 0..3 {
        let answer =
            tokio::time::timeout(PATIENCE, begin(&store, &scope("k"), digest(&request("o"))))
                .await
                .expect("bounded by the store timeout");
        let Err(StoreError::Unavailable(why)) = answer else {
            panic!("a closed port is unavailable: {answer:?}");
        };
        assert!(
            why.contains(&format!("redis://gw:***@127.0.0.1:{port}/0")),
            "{why}"
        );
        assert!(!why.contains("hunter2"), "{why}");
        assert!(why.contains("refused"), "{why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sets_up_tls_and_fails_closed_against_a_plain_server() {
    // Exercises the rustls set-up (provider, trust store) up to the
    // handshake, which a plain-text server never answers.
    let server = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let store = redis_store(&url, Settings::default(), Duration::from_millis(500)).await;
    let answer = tokio::time::timeout(PATIENCE, begin(&store, &scope("k"), digest(&request("o"))))
        .await
        .expect("bounded by the store timeout");
    assert!(
        matches!(answer, Err(StoreError::Unavailable(ref why)) if why.starts_with(&url)),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out() {
    // Accepts connections and reads nothing: a hung server or a black hole.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "redis://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let store = redis_store(&url, Settings::default(), Duration::from_millis(200)).await;
    let answer = tokio::time::timeout(PATIENCE, begin(&store, &scope("k"), digest(&request("o"))))
        .await
        .expect("bounded by the store timeout");
    let Err(StoreError::Unavailable(why)) = answer else {
        panic!("a silent server is unavailable: {answer:?}");
    };
    assert!(why.contains("200ms"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_call_fails_closed_and_recovers() {
    let mut server = RedisServer::start();
    let store = redis_store(&server.url(), Settings::default(), Duration::from_secs(2)).await;
    let d = digest(&request("o-1"));
    let lease = proceed(&store, &scope("k-before"), d, LONG).await;

    server.kill();
    let answer = tokio::time::timeout(PATIENCE, begin(&store, &scope("k-during"), d))
        .await
        .expect("bounded");
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "{answer:?}"
    );
    let verdict = tokio::time::timeout(PATIENCE, lease.complete(response("inv-1")))
        .await
        .expect("bounded");
    assert!(
        matches!(verdict, Err(StoreError::Unavailable(_))),
        "{verdict:?}"
    );

    server.restart();
    // The first call after the restart may still meet the broken connection;
    // the manager reconnects and a later one goes through.
    let answer = until(
        "a lease with Redis back",
        PATIENCE,
        async || begin(&store, &scope("k-after"), d).await,
        |a| matches!(a, Ok(Begin::Proceed(_))),
    )
    .meanwhile(|a| matches!(a, Err(StoreError::Unavailable(_))))
    .await;
    let Ok(Begin::Proceed(lease)) = answer else {
        unreachable!()
    };
    assert_eq!(lease.complete(response("inv-2")).await, Ok(Recorded::Done));
    assert!(matches!(
        begin(&store, &scope("k-after"), d).await,
        Ok(Begin::Replay(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_new_keys_with_full() {
    let server =
        RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let store = redis_store(&server.url(), Settings::default(), Duration::from_secs(5)).await;
    let d = digest(&request("o-1"));
    let big = Outcome::Response(Bytes::from(vec![1; 60 * 1024]));
    let mut recorded = 0;
    let mut full = false;
    for i in 0..1000 {
        match begin(&store, &scope(&format!("k-{i}")), d).await {
            Ok(Begin::Proceed(lease)) => match lease.complete(big.clone()).await {
                Ok(Recorded::Done) => recorded += 1,
                Err(StoreError::Full) => {}
                other => panic!("{other:?}"),
            },
            Err(StoreError::Full) => {
                full = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        full,
        "never full after {recorded} records of 60 KiB in 4 MB"
    );
    assert!(recorded > 0, "{}", server.output());
    // What was recorded is still there: nothing was evicted.
    assert!(matches!(
        begin(&store, &scope("k-0"), d).await,
        Ok(Begin::Replay(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_server_needs_the_password() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let good = format!("redis://:s3cret-pw@127.0.0.1:{}", server.port());
    let store = redis_store(&good, Settings::default(), Duration::from_secs(5)).await;
    let lease = proceed(&store, &scope("k-auth"), digest(&request("o-1")), LONG).await;
    assert_eq!(lease.release().await, Ok(Recorded::Done));

    let bad = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let store = redis_store(&bad, Settings::default(), Duration::from_secs(5)).await;
    let answer = begin(&store, &scope("k-auth"), digest(&request("o-1"))).await;
    let Err(StoreError::Unavailable(why)) = answer else {
        panic!("a wrong password is unavailable: {answer:?}");
    };
    assert!(
        !why.contains("wrong-pw") && !why.contains("s3cret-pw"),
        "{why}"
    );
    assert!(why.contains("authentication failed"), "{why}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---- memory store only ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_refuses_new_keys_and_evicts_nothing() {
    let store = open_at(
        "memory",
        Settings {
            max_entries: 3,
            ..Settings::default()
        },
    )
    .await;
    let d = digest(&request("o-1"));
    let mut leases = Vec::new();
    for i in 0..3 {
        leases.push(proceed(&store, &scope(&format!("k-{i}")), d, LONG).await);
    }
    assert_eq!(
        begin(&store, &scope("k-3"), d).await.err(),
        Some(StoreError::Full)
    );
    // Keys already recorded still answer.
    assert!(matches!(
        begin(&store, &scope("k-0"), d).await,
        Ok(Begin::InProgress { .. })
    ));
    let first = leases.remove(0);
    assert_eq!(first.complete(response("inv-0")).await, Ok(Recorded::Done));
    assert_eq!(
        begin(&store, &scope("k-3"), d).await.err(),
        Some(StoreError::Full)
    );
    assert!(matches!(
        begin(&store, &scope("k-0"), d).await,
        Ok(Begin::Replay(_))
    ));
    // A release frees its room.
    let second = leases.remove(0);
    assert_eq!(second.release().await, Ok(Recorded::Done));
    let lease = proceed(&store, &scope("k-3"), d, LONG).await;
    assert_eq!(
        store.usage().map(|u| u.entries),
        Some(3),
        "k-0 done, k-2 and k-3 in progress"
    );
    drop((lease, leases));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_make_room_in_a_full_memory_store() {
    let store = open_at(
        "memory",
        Settings {
            ttl: Duration::from_millis(300),
            max_entries: 2,
            ..Settings::default()
        },
    )
    .await;
    let d = digest(&request("o-1"));
    for i in 0..2 {
        let lease = proceed(
            &store,
            &scope(&format!("k-{i}")),
            d,
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(lease.complete(response("inv")).await, Ok(Recorded::Done));
    }
    let answer = until(
        "expired records to make room",
        PATIENCE,
        async || begin(&store, &scope("k-2"), d).await,
        |a| matches!(a, Ok(Begin::Proceed(_))),
    )
    .meanwhile(|a| matches!(a, Err(StoreError::Full)))
    .await;
    let Ok(Begin::Proceed(lease)) = answer else {
        unreachable!()
    };
    assert_eq!(lease.release().await, Ok(Recorded::Done));
    // And the sweeper empties the store once everything has expired.
    until(
        "the sweeper to empty the store",
        PATIENCE,
        async || store.usage(),
        |usage| usage.as_ref().map(|u| u.entries) == Some(0),
    )
    .every(Duration::from_millis(50))
    .await;
    assert_eq!(store.usage().map(|u| u.bytes), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_byte_bound_holds() {
    use gormic_gateway::idempotency::memory::ENTRY_OVERHEAD;
    let store = open_at(
        "memory",
        Settings {
            max_bytes: 2 * ENTRY_OVERHEAD + 100,
            ..Settings::default()
        },
    )
    .await;
    let d = digest(&request("o-1"));
    // An outcome with no room left is recorded as unknown, and says so.
    let lease = proceed(&store, &scope("k-big"), d, LONG).await;
    let big = Outcome::Response(Bytes::from(vec![0; 2 * ENTRY_OVERHEAD as usize]));
    assert_eq!(
        lease.complete(big).await,
        Ok(Recorded::AsUnknown(UnknownCause::NoRoom))
    );
    assert!(matches!(
        begin(&store, &scope("k-big"), d).await,
        Ok(Begin::OutcomeUnknown)
    ));
    let lease = proceed(&store, &scope("k-small"), d, LONG).await;
    let small = Outcome::Response(Bytes::from(vec![0; 50]));
    assert_eq!(lease.complete(small).await, Ok(Recorded::Done));
    assert_eq!(
        begin(&store, &scope("k-third"), d).await.err(),
        Some(StoreError::Full)
    );
    let usage = store.usage().expect("memory usage");
    assert_eq!(usage.bytes, 2 * ENTRY_OVERHEAD + 50);
    assert_eq!(usage.entries, 2);
}

// ---- the key -------------------------------------------------------------

#[test]
fn keys_are_1_to_255_printable_ascii_bytes() {
    assert!(parse_key(b"").unwrap_err().contains("empty"));
    assert_eq!(parse_key(b"a").expect("1 byte").as_str(), "a");
    let longest = "~".repeat(MAX_KEY_BYTES);
    assert_eq!(
        parse_key(longest.as_bytes()).expect("255 bytes").as_str(),
        longest
    );
    let too_long = parse_key("k".repeat(256).as_bytes()).unwrap_err();
    assert!(
        too_long.contains("255") && too_long.contains("256"),
        "{too_long}"
    );
    assert_eq!(
        parse_key(b" order 7/retry: #1 ")
            .expect("spaces and punctuation")
            .as_str(),
        " order 7/retry: #1 "
    );
    for bad in [
        &b"tab\there"[..],
        b"del\x7f",
        b"nul\x00",
        "caf\u{e9}".as_bytes(),
    ] {
        let error = parse_key(bad).unwrap_err();
        assert!(error.contains("printable ASCII"), "{error}");
    }
}
