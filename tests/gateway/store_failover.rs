//! The shared store surviving its Redis (issue 19): keyed calls through real
//! gateways while a Sentinel deployment fails over under load, a managed
//! endpoint moves to the promoted replica, a Redis Cluster loses a shard's
//! primary, and a replica pauses under `--idempotency-store-replicas 1`.
//! In every case nothing is created twice, keyed calls fail closed
//! (UNAVAILABLE, unsent, with RetryInfo) only while no primary is usable,
//! and records written before the failover replay after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::task::{JoinSet, block_in_place};
use tokio::time::Instant;
use tonic::{Code, Request, Status};

use gormic_gateway::idempotency::{Idempotency, IdempotencyArgs, Scope, parse_key, parse_store};
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::store::{Replicas, StoreArgs, StoreState};

use crate::support::fake_upstream::Recorded;
use crate::support::redis::RedisServer;
use crate::support::redis_cluster::RedisCluster;
use crate::support::redis_command::{command, signal, try_command};
use crate::support::redis_sentinel::{RedisSentinel, wait_in_sync};
use crate::support::switch_proxy::SwitchProxy;
use crate::support::{
    API_KEY, FakeUpstream, ORGANIZATION, Scripted, TestGateway, create, error_info, keyed,
    retry_delay, says_replayed, until,
};

/// Bound of every wait below; each condition holds within a fraction.
const PATIENCE: Duration = Duration::from_secs(30);
/// How soon keyed calls work again once the new primary is known.
const RECOVERY: Duration = Duration::from_secs(2);

// ---- fixtures ------------------------------------------------------------

/// A store as the flags open it.
fn store(url: &str, timeout: Duration, replicas: Replicas) -> Idempotency {
    let args = IdempotencyArgs {
        idempotency_store: parse_store(url).expect("a store URL"),
        idempotency_store_timeout: timeout,
        ..IdempotencyArgs::default()
    };
    Idempotency::open(
        &args,
        &StoreArgs {
            idempotency_store_replicas: replicas,
        },
    )
    .expect("the store opens")
}

async fn gateway(upstream: &FakeUpstream, store: Idempotency) -> TestGateway {
    TestGateway::builder(&upstream.url())
        .idempotency(store)
        .start()
        .await
}

fn unkeyed(order: &str) -> Request<pb::CreateInvoiceRequest> {
    crate::support::authed(create(order))
}

/// The Redis key of a keyed create of this test's caller.
fn redis_key(key: &str) -> String {
    let key = parse_key(key.as_bytes()).expect("a valid key");
    let scope = Scope::new(
        ORGANIZATION.as_bytes(),
        "CreateInvoice",
        API_KEY.as_bytes(),
        &key,
    );
    format!("gormic:idem:v1:{}", scope.to_hex())
}

/// How many requests reached the upstream for each order id.
fn sent_per_order(requests: &[Recorded]) -> HashMap<String, usize> {
    let mut sent = HashMap::new();
    for request in requests {
        let body = String::from_utf8_lossy(&request.body);
        let order = body
            .split('"')
            .find(|piece| piece.starts_with("ord-"))
            .unwrap_or_default()
            .to_owned();
        *sent.entry(order).or_default() += 1;
    }
    sent
}

/// Asserts a refusal for the store's sake: UNAVAILABLE, the store's
/// reason, `request_sent=false`, and RetryInfo.
fn assert_store_refusal(status: &Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = error_info(status);
    assert_eq!(info.reason, "IDEMPOTENCY_STORE_UNAVAILABLE", "{status:?}");
    assert_eq!(
        info.metadata.get("request_sent").map(String::as_str),
        Some("false"),
        "{info:?}"
    );
    let delay = retry_delay(status);
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
}

/// Keyed creates of order `ord-<key>`, the key from `next_key` each time,
/// every 20 ms until one succeeds, each refusal before being the store's
/// (unsent, with RetryInfo); bounded by PATIENCE.
async fn until_keyed_succeeds(
    gateway: &TestGateway,
    what: &str,
    mut next_key: impl FnMut() -> String,
) -> tonic::Response<pb::CreateInvoiceResponse> {
    let client = gateway.client.clone();
    until(
        what,
        PATIENCE,
        async || {
            let key = next_key();
            client
                .clone()
                .create_invoice(keyed(create(&format!("ord-{key}")), &key))
                .await
        },
        Result::is_ok,
    )
    .meanwhile(|answer| {
        assert_store_refusal(answer.as_ref().expect_err("a refusal"));
        true
    })
    .await
    .unwrap_or_else(|status| panic!("{what}: {status:?}"))
}

/// Fresh keys: `<prefix>-1`, `<prefix>-2`…
fn fresh_keys(prefix: &str) -> impl FnMut() -> String {
    let (prefix, mut n) = (prefix.to_owned(), 0);
    move || {
        n += 1;
        format!("{prefix}-{n}")
    }
}

/// Waits until the store has a primary.
async fn wait_up(store: &Idempotency) {
    let shared = store.shared_store().expect("a shared store").clone();
    until(
        "the store to connect",
        PATIENCE,
        async || shared.health(),
        |health| health.state == StoreState::Up,
    )
    .await;
}

// ---- Sentinel ------------------------------------------------------------

/// What one keyed client of the load saw.
#[derive(Default, Debug)]
struct LoadReport {
    created: Vec<String>,
    /// Keys whose outcome the gateway could not know (a lease written as
    /// the primary died): never sent again, never forgotten.
    unknown: Vec<String>,
    store_refusals: usize,
}

/// Keyed creates, one fresh key after another, each retried (same key)
/// until it succeeds or is reported unknown, until `stop`.
async fn keyed_load(
    mut client: gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient<
        tonic::transport::Channel,
    >,
    name: String,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("{name}-{n}");
        let order = format!("ord-{key}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut request = keyed(create(&order), &key);
            request.set_timeout(Duration::from_secs(2));
            match client.create_invoice(request).await {
                Ok(_) => {
                    report.created.push(key.clone());
                    break;
                }
                Err(status) => match error_info(&status).reason.as_str() {
                    "IDEMPOTENCY_STORE_UNAVAILABLE" => {
                        assert_store_refusal(&status);
                        report.store_refusals += 1;
                    }
                    "IDEMPOTENCY_KEY_IN_PROGRESS" => {}
                    "IDEMPOTENCY_OUTCOME_UNKNOWN" => {
                        report.unknown.push(key.clone());
                        break;
                    }
                    _ => panic!("{key}: unexpected refusal {status:?}"),
                },
            }
            assert!(
                Instant::now() < deadline,
                "{key}: no answer in {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_keyed_load_creates_no_key_twice_and_keyed_calls_come_back() {
    let mut deployment = block_in_place(RedisSentinel::start);
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({ "id": "inv-1" })));
    let timeout = Duration::from_millis(500);
    let (store_a, store_b) = (
        store(&deployment.url(), timeout, Replicas::Auto),
        store(&deployment.url(), timeout, Replicas::Auto),
    );
    let a = gateway(&upstream, store_a.clone()).await;
    let b = gateway(&upstream, store_b.clone()).await;
    wait_up(&store_a).await;
    wait_up(&store_b).await;
    let old_primary = deployment.primary_port().expect("a primary");
    assert_eq!(
        store_a.shared_store().expect("shared").health().primaries,
        [format!("127.0.0.1:{old_primary}")]
    );
    // A subscription made before the failover still delivers after it.
    let mut subscription = store_a
        .shared_store()
        .expect("shared")
        .subscribe("gormic:test:events");

    // Records from before the failover, acknowledged by the replica.
    for i in 0..10 {
        let mut client = a.client.clone();
        let key = format!("before-{i}");
        let created = client
            .create_invoice(keyed(create(&format!("ord-{key}")), &key))
            .await
            .expect("created before the failover");
        assert!(!says_replayed(created.metadata()));
    }
    assert!(
        store_a
            .shared_store()
            .expect("shared")
            .health()
            .required_replicas
            == 1,
        "auto waits for the connected replica"
    );

    // Keyed load on both gateways, and unkeyed calls alongside.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = JoinSet::new();
    for i in 0..4 {
        let gateway = if i % 2 == 0 { &a } else { &b };
        load.spawn(keyed_load(
            gateway.client.clone(),
            format!("load{i}"),
            stop.clone(),
        ));
    }
    let unkeyed_stop = stop.clone();
    let mut unkeyed_client = b.client.clone();
    let unkeyed_load = tokio::spawn(async move {
        let mut n = 0;
        while !unkeyed_stop.load(Ordering::Relaxed) {
            n += 1;
            unkeyed_client
                .create_invoice(unkeyed(&format!("ord-unkeyed-{n}")))
                .await
                .expect("a call without a key is untouched by the store's failover");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    block_in_place(|| deployment.primary().kill());
    let new_primary = block_in_place(|| deployment.wait_for_new_primary(old_primary));
    let known = Instant::now();

    // Keyed calls work again on both gateways within RECOVERY of the new
    // primary being known to the Sentinels.
    for (name, gateway) in [("a", &a), ("b", &b)] {
        until_keyed_succeeds(
            gateway,
            "a fresh keyed call to succeed after the failover",
            fresh_keys(&format!("after-{name}")),
        )
        .await;
        let recovered = known.elapsed();
        eprintln!("gateway {name}: keyed calls back {recovered:?} after the new primary was known");
        assert!(
            recovered <= RECOVERY,
            "gateway {name}: keyed calls came back {recovered:?} after the new primary was known"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    while let Some(report) = load.join_next().await {
        reports.push(report.expect("a load task"));
    }
    let unkeyed_calls = unkeyed_load.await.expect("the unkeyed load");
    assert!(unkeyed_calls > 0);

    // Nothing was created twice.
    let sent = sent_per_order(&upstream.requests());
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let created: usize = reports.iter().map(|r| r.created.len()).sum();
    let refusals: usize = reports.iter().map(|r| r.store_refusals).sum();
    let unknown: usize = reports.iter().map(|r| r.unknown.len()).sum();
    eprintln!("keyed load: {created} created, {refusals} store refusals, {unknown} unknown");
    assert!(created > 0, "{reports:?}");
    assert!(refusals > 0, "the failover was seen: {reports:?}");
    for report in &reports {
        for key in &report.created {
            assert_eq!(sent.get(&format!("ord-{key}")), Some(&1), "{key}");
        }
    }

    // Records from before the failover replay, on either gateway.
    let sent_before = upstream.requests().len();
    for i in 0..10 {
        let key = format!("before-{i}");
        for gateway in [&a, &b] {
            let mut client = gateway.client.clone();
            let again = client
                .create_invoice(keyed(create(&format!("ord-{key}")), &key))
                .await
                .expect("replayed after the failover");
            assert!(says_replayed(again.metadata()), "{key}");
            assert_eq!(again.get_ref().id, "inv-1");
        }
    }
    assert_eq!(
        upstream.requests().len(),
        sent_before,
        "replays send nothing"
    );

    // Both stores followed one failover, to the new primary.
    for store in [&store_a, &store_b] {
        let health = store.shared_store().expect("shared").health();
        assert_eq!(health.failovers, 1, "{health:?}");
        assert_eq!(health.primaries, [format!("127.0.0.1:{new_primary}")]);
    }

    // The subscription moved with the primary.
    let publisher = store_b.shared_store().expect("shared").clone();
    let message = tokio::time::timeout(PATIENCE, async {
        loop {
            publisher
                .publish("gormic:test:events", b"after the failover")
                .await
                .expect("published");
            match tokio::time::timeout(Duration::from_millis(200), subscription.next()).await {
                Ok(Some(gormic_gateway::store::Event::Message(bytes))) => break bytes,
                Ok(Some(gormic_gateway::store::Event::Gap)) | Err(_) => {}
                Ok(None) => panic!("the subscription ended"),
            }
        }
    })
    .await
    .expect("a message after the failover");
    assert_eq!(&message[..], b"after the failover");
}

// ---- a managed endpoint ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_endpoint_that_moves_to_the_promoted_replica_is_followed() {
    let logs = crate::support::logs();
    let first = RedisServer::start();
    let second = RedisServer::start_with(&["--replicaof", "127.0.0.1", &first.port().to_string()]);
    block_in_place(|| wait_in_sync(first.port(), second.port()));
    let endpoint = SwitchProxy::start(first.addr()).await;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({ "id": "inv-1" })));
    let store = store(
        &endpoint.redis_url(),
        Duration::from_secs(1),
        Replicas::Auto,
    );
    let mut gw = gateway(&upstream, store.clone()).await;
    gw.client
        .create_invoice(keyed(create("ord-before"), "before"))
        .await
        .expect("created on the first primary");

    // The provider's failover: the replica promoted, the old primary
    // demoted, the name moved.
    let promoted: String = command(second.port(), &["REPLICAOF", "NO", "ONE"]);
    assert_eq!(promoted, "OK");
    let demoted: String = command(
        first.port(),
        &["REPLICAOF", "127.0.0.1", &second.port().to_string()],
    );
    assert_eq!(demoted, "OK");
    endpoint.switch_to(second.addr());

    // The open connection now reaches a replica: READONLY, and the gateway
    // reconnects through the name, to the new primary.
    let answer = until_keyed_succeeds(
        &gw,
        "keyed calls to reach the promoted primary",
        fresh_keys("after"),
    )
    .await;
    assert!(!says_replayed(answer.metadata()));
    let health = store.shared_store().expect("shared").health();
    assert_eq!(health.failovers, 1, "a demotion followed: {health:?}");
    assert_eq!(health.state, StoreState::Up);
    // One log line for the failover, naming the store.
    let store_field = format!("\"store\":\"{}\"", endpoint.redis_url());
    let line = logs
        .wait_for_line("the failover's log line", |l| {
            l.contains("failover followed") && l.contains(&store_field)
        })
        .await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    let lines = logs
        .text()
        .lines()
        .filter(|l| l.contains("failover followed") && l.contains(&store_field))
        .count();
    assert_eq!(lines, 1, "{}", logs.text());

    let again = gw
        .client
        .create_invoice(keyed(create("ord-before"), "before"))
        .await
        .expect("the record from before replays");
    assert!(says_replayed(again.metadata()));
    assert_eq!(
        sent_per_order(&upstream.requests()).get("ord-before"),
        Some(&1)
    );
}

// ---- Redis Cluster -----------------------------------------------------------

/// `count` keys whose records live on the primary at `port`.
fn keys_on(cluster: &RedisCluster, port: u16, prefix: &str, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|key| cluster.primary_of(cluster.slot(redis_key(key).as_bytes())) == port)
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_keys_spread_over_the_primaries_each_call_stays_on_its_slot_and_replays_elsewhere()
 {
    let cluster = block_in_place(RedisCluster::start);
    let primaries = block_in_place(|| cluster.primary_ports());
    assert_eq!(primaries.len(), 3);
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({ "id": "inv-1" })));
    let timeout = Duration::from_secs(2);
    let store_a = store(&cluster.url(), timeout, Replicas::Auto);
    let store_b = store(&cluster.url(), timeout, Replicas::Auto);
    let mut a = gateway(&upstream, store_a.clone()).await;
    let mut b = gateway(&upstream, store_b.clone()).await;
    wait_up(&store_a).await;

    // Three keys on each primary, created on one gateway, replayed on the
    // other.
    let keys: Vec<String> = block_in_place(|| {
        primaries
            .iter()
            .flat_map(|port| keys_on(&cluster, *port, &format!("spread{port}"), 3))
            .collect()
    });
    for key in &keys {
        let created = a
            .client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
            .expect("created");
        assert!(!says_replayed(created.metadata()));
    }
    for key in &keys {
        let again = b
            .client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
            .expect("replayed by the other gateway");
        assert!(says_replayed(again.metadata()), "{key}");
    }
    assert_eq!(upstream.requests().len(), keys.len());
    // Each record is on the primary its key's slot names.
    for key in &keys {
        let owner = block_in_place(|| cluster.primary_of(cluster.slot(redis_key(key).as_bytes())));
        let exists: i64 = block_in_place(|| command(owner, &["EXISTS", &redis_key(key)]));
        assert_eq!(exists, 1, "{key} on its slot's primary");
    }
    let health = store_a.shared_store().expect("shared").health();
    let mut seen: Vec<String> = health.primaries.clone();
    seen.sort();
    let mut expected: Vec<String> = primaries.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    expected.sort();
    assert_eq!(seen, expected, "{health:?}");

    // One keyed call: both of its scripts on its key's primary, none
    // anywhere else.
    let key = "one-slot";
    let owner = block_in_place(|| cluster.primary_of(cluster.slot(redis_key(key).as_bytes())));
    for port in &primaries {
        let reset: String = block_in_place(|| command(*port, &["CONFIG", "RESETSTAT"]));
        assert_eq!(reset, "OK");
    }
    a.client
        .create_invoice(keyed(create("ord-one-slot"), key))
        .await
        .expect("created");
    for port in &primaries {
        let stats: String = block_in_place(|| command(*port, &["INFO", "commandstats"]));
        let calls = |name: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:")))
                .and_then(|f| f.split(',').find_map(|f| f.strip_prefix("calls=")))
                .map_or(0, |n| n.parse::<u64>().expect("a number"))
        };
        let scripts = calls("evalsha") + calls("eval");
        if *port == owner {
            assert_eq!(scripts, 2, "lease and record on {port}:\n{stats}");
        } else {
            assert_eq!(scripts, 0, "nothing on {port}:\n{stats}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_cluster_shard_loses_its_primary_only_its_keys_fail_closed_until_its_replica_takes_over()
 {
    let mut cluster = block_in_place(RedisCluster::start);
    let primaries = block_in_place(|| cluster.primary_ports());
    let victim = primaries[0];
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({ "id": "inv-1" })));
    let store = store(&cluster.url(), Duration::from_millis(500), Replicas::Auto);
    let mut gw = gateway(&upstream, store.clone()).await;
    wait_up(&store).await;
    let (victim_keys, other_keys) = block_in_place(|| {
        (
            keys_on(&cluster, victim, "victim", 40),
            [primaries[1], primaries[2]]
                .iter()
                .flat_map(|p| keys_on(&cluster, *p, &format!("other{p}"), 20))
                .collect::<Vec<_>>(),
        )
    });
    // Records from before, on the failing shard.
    for key in &victim_keys[..3] {
        gw.client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
            .expect("created before the failure");
    }
    let victim_slot = block_in_place(|| cluster.slot(redis_key(&victim_keys[0]).as_bytes()));

    block_in_place(|| cluster.node(victim).kill());
    let killed = Instant::now();
    // While the shard has no primary: its keys fail closed, the others work.
    let mut victim_next = victim_keys[3..].iter();
    let mut victim_refused = 0;
    for key in other_keys.iter().take(10) {
        let started = Instant::now();
        gw.client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
            .unwrap_or_else(|status| panic!("{key}, on a healthy shard: {status:?}"));
        // Not held up by the failed shard, which takes seconds to fail over.
        assert!(
            started.elapsed() < RECOVERY,
            "{key}: {:?}",
            started.elapsed()
        );
        let key = victim_next.next().expect("a victim key");
        match gw
            .client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
        {
            Err(status) => {
                assert_store_refusal(&status);
                victim_refused += 1;
            }
            // The replica may already have taken over.
            Ok(_) => break,
        }
    }
    assert!(victim_refused > 0, "the failed shard's keys failed closed");
    let new_primary = block_in_place(|| cluster.wait_for_new_primary(victim_slot, victim));
    let known = Instant::now();
    let mut remaining = victim_next.cloned();
    until_keyed_succeeds(&gw, "the failed shard's keys to work again", || {
        remaining.next().expect("victim keys left")
    })
    .await;
    eprintln!(
        "shard back {:?} after its new primary was known, {:?} after the kill; {victim_refused} refusals",
        known.elapsed(),
        killed.elapsed()
    );
    assert!(
        known.elapsed() <= RECOVERY,
        "the shard's keys came back {:?} after its new primary was known ({:?} after the kill)",
        known.elapsed(),
        killed.elapsed()
    );
    // Its records from before replay from the promoted replica.
    for key in &victim_keys[..3] {
        let again = gw
            .client
            .create_invoice(keyed(create(&format!("ord-{key}")), key))
            .await
            .expect("replayed after the shard's failover");
        assert!(says_replayed(again.metadata()), "{key}");
    }
    let twice: Vec<_> = sent_per_order(&upstream.requests())
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "{twice:?}");
    let health = store.shared_store().expect("shared").health();
    assert!(
        health
            .primaries
            .contains(&format!("127.0.0.1:{new_primary}")),
        "{health:?}"
    );
}

// ---- durable leases ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_required_a_lease_a_paused_replica_cannot_acknowledge_fails_closed_unsent()
{
    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    block_in_place(|| wait_in_sync(primary.port(), replica.port()));
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({ "id": "inv-1" })));
    let store = store(&primary.url(), Duration::from_secs(1), Replicas::Exactly(1));
    let metrics = Metrics::default();
    metrics
        .series::<gormic_gateway::store::metrics::StoreSeries>()
        .watch(store.shared_store().expect("shared"));
    let mut gw = gateway(&upstream, store.clone()).await;
    gw.client
        .create_invoice(keyed(create("ord-k-1"), "k-1"))
        .await
        .expect("the replica acknowledges");

    let pid = replica.pid().expect("the replica runs");
    signal(pid, "STOP");
    let deadline = Duration::from_secs(2);
    let mut request = keyed(create("ord-k-2"), "k-2");
    request.set_timeout(deadline);
    let started = Instant::now();
    let status = gw
        .client
        .create_invoice(request)
        .await
        .expect_err("no replica acknowledges the lease");
    let elapsed = started.elapsed();
    signal(pid, "CONT");
    assert!(elapsed < deadline, "answered after {elapsed:?}");
    assert_store_refusal(&status);
    let info = error_info(&status);
    assert_eq!(
        info.metadata.get("wait_shortfall").map(String::as_str),
        Some("true"),
        "{info:?}"
    );
    assert!(
        info.metadata["detail"].contains("0 of 1 replicas acknowledged"),
        "{info:?}"
    );
    assert_eq!(upstream.requests().len(), 1, "nothing sent");
    // The lease was released: nothing left on the primary for the key.
    let record: Option<Vec<u8>> =
        block_in_place(|| try_command(primary.port(), &["GET", &redis_key("k-2")])).expect("GET");
    assert_eq!(record, None);
    let exposition = metrics.encode();
    assert!(
        exposition
            .contains("gormic_gateway_store_wait_shortfalls_total{script=\"idempotency_begin\"} 1"),
        "{exposition}"
    );
    assert!(
        exposition.contains("gormic_gateway_store_replicas_required 1"),
        "{exposition}"
    );

    // The replica back: the same key proceeds, sent once.
    until_keyed_succeeds(&gw, "the key to proceed once the replica is back", || {
        "k-2".to_owned()
    })
    .await;
    assert_eq!(
        sent_per_order(&upstream.requests()).get("ord-k-2"),
        Some(&1)
    );
}
