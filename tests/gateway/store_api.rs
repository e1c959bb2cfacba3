//! The shared store's API on its own (`gormic_gateway::store`), as quotas
//! and cooldowns will use it, against a real redis-server: scripts by
//! EVALSHA with the EVAL fallback, writes that wait for replicas, publish
//! and subscribe across a restart, health, and the metrics it exposes.

use std::time::Duration;

use tokio::task::block_in_place;
use tokio::time::Instant;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::store::{
    Event, FailureKind, Replicas, Script, Store, StoreState, StoreUrl, Wait,
};

use crate::support::redis::RedisServer;
use crate::support::redis_command::{command, info_field};
use crate::support::redis_sentinel::wait_in_sync;

/// Bound of every wait below.
const PATIENCE: Duration = Duration::from_secs(15);

static INCREMENT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        "test_increment",
        "return redis.call('INCRBY', KEYS[1], ARGV[1])",
    )
});

fn open(url: &str, replicas: Replicas) -> Store {
    Store::open(
        &StoreUrl::parse(url).expect("a store URL"),
        Duration::from_secs(1),
        replicas,
    )
    .expect("the store opens")
}

async fn increment(store: &Store, key: &str, by: i64, wait: Wait) -> gormic_gateway::store::Reply {
    let mut call = INCREMENT.call(&[key]);
    call.arg(by);
    store.run(&call, wait, None).await.expect("the script runs")
}

/// Polls `check` every 20 ms until it holds, for at most PATIENCE.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_by_evalsha_and_again_by_eval_once_the_server_forgot_it() {
    let server = RedisServer::start();
    let store = open(&server.url(), Replicas::Auto);
    let first = increment(&store, "test:{t1}:counter", 5, Wait::None).await;
    assert_eq!(first.value, redis::Value::Int(5));
    assert_eq!(first.shortfall, None);
    server.reset_stats();
    let flushed: String = block_in_place(|| command(server.port(), &["SCRIPT", "FLUSH"]));
    assert_eq!(flushed, "OK");
    let second = increment(&store, "test:{t1}:counter", 2, Wait::None).await;
    assert_eq!(second.value, redis::Value::Int(7));
    let stats = server.commandstats();
    // NOSCRIPT, then the script's source once; no SCRIPT LOAD.
    assert_eq!(stats.get("evalsha"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("eval"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("script|load"), None, "{stats:?}");
    let third = increment(&store, "test:{t1}:counter", 1, Wait::None).await;
    assert_eq!(third.value, redis::Value::Int(8));
    assert_eq!(server.commandstats().get("evalsha"), Some(&2));

    // A script error is the caller's, and the connection stays.
    static BROKEN: std::sync::LazyLock<Script> =
        std::sync::LazyLock::new(|| Script::new("test_broken", "return redis.call('NOPE')"));
    let failure = store
        .run(&BROKEN.call(&["test:k"]), Wait::None, None)
        .await
        .expect_err("the script fails");
    assert_eq!(failure.kind, FailureKind::Unavailable);
    assert!(failure.detail.starts_with(&server.url()), "{failure:?}");
    assert!(!failure.may_have_applied, "{failure:?}");
    assert_eq!(store.health().state, StoreState::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_waits_is_acknowledged_by_the_replica_and_auto_waits_only_when_there_is_one() {
    let lone = RedisServer::start();
    let store = open(&lone.url(), Replicas::Auto);
    let reply = increment(&store, "test:lone", 1, Wait::Replicas).await;
    assert_eq!(reply.shortfall, None);
    assert_eq!(store.health().required_replicas, 0);
    assert_eq!(
        lone.commandstats().get("wait"),
        None,
        "no WAIT without a replica"
    );

    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    block_in_place(|| wait_in_sync(primary.port(), replica.port()));
    let store = open(&primary.url(), Replicas::Auto);
    let reply = increment(&store, "test:replicated", 3, Wait::Replicas).await;
    assert_eq!(reply.value, redis::Value::Int(3));
    assert_eq!(reply.shortfall, None);
    let health = store.health();
    assert_eq!(
        (health.connected_replicas, health.required_replicas),
        (1, 1)
    );
    // A fresh server: the first EVALSHA and its WAIT found no script, then
    // EVAL and its WAIT.
    let stats = primary.commandstats();
    assert_eq!(
        (stats.get("evalsha"), stats.get("eval"), stats.get("wait")),
        (Some(&1), Some(&1), Some(&2)),
        "{stats:?}"
    );
    // Acknowledged means the replica has it.
    let copy: String = block_in_place(|| command(replica.port(), &["GET", "test:replicated"]));
    assert_eq!(copy, "3");

    // Two required, one connected: the write stands, short.
    let demanding = open(&primary.url(), Replicas::Exactly(2));
    let reply = increment(&demanding, "test:replicated", 1, Wait::Replicas).await;
    assert_eq!(reply.value, redis::Value::Int(4));
    let shortfall = reply.shortfall.expect("a shortfall");
    assert_eq!((shortfall.acknowledged, shortfall.required), (1, 2));
}

/// The gateway's worker threads each run a current-thread runtime: a
/// connection driven by another thread's runtime would wake that thread on
/// every operation. Here the runtime that opened the store is not running
/// at all while two other threads call, and they are answered all the same,
/// each on connections of its own: one for scripts, four for writes that
/// wait.
#[test]
fn each_thread_sends_on_its_own_connections_so_a_call_needs_no_other_threads_runtime() {
    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    wait_in_sync(primary.port(), replica.port());
    let opener = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let store = opener.block_on(async {
        let store = open(&primary.url(), Replicas::Auto);
        let reply = increment(&store, "test:{threads}:opener", 1, Wait::Replicas).await;
        assert_eq!(reply.shortfall, None);
        store
    });
    assert_eq!(store.health().required_replicas, 1);
    let clients = || -> u32 {
        info_field(primary.port(), "clients", "connected_clients")
            .expect("INFO clients")
            .parse()
            .expect("a count")
    };
    let before = clients();

    // Each thread reports, then stays (its connections open) until counted.
    let (done, reports) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut releases = Vec::new();
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let store = store.clone();
            let done = done.clone();
            let (release, released) = std::sync::mpsc::channel::<()>();
            releases.push(release);
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                let outcome = runtime.block_on(async {
                    let key = format!("test:{{threads}}:{name}");
                    for n in 1..=11 {
                        let wait = if n <= 10 { Wait::Replicas } else { Wait::None };
                        let mut call = INCREMENT.call(&[&key]);
                        call.arg(1);
                        match store.run(&call, wait, None).await {
                            Ok(reply)
                                if reply.value == redis::Value::Int(n)
                                    && reply.shortfall.is_none() => {}
                            other => return Err(format!("thread {name}, call {n}: {other:?}")),
                        }
                    }
                    Ok(())
                });
                let _ = done.send(outcome);
                let _ = released.recv_timeout(PATIENCE);
            })
        })
        .collect();
    for _ in 0..2 {
        let report = reports
            .recv_timeout(PATIENCE)
            .expect("each thread's calls to end within PATIENCE");
        report.expect("every call answered");
    }
    let during = clients();
    drop(releases);
    for thread in threads {
        thread.join().expect("the thread ends");
    }
    assert_eq!(during - before, 2 * 5, "one + four connections per thread");
    let copy: String = command(replica.port(), &["GET", "test:{threads}:b"]);
    assert_eq!(copy, "11");
    drop(opener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_hears_other_replicas_and_is_told_of_the_gap_when_redis_restarts() {
    let mut server = RedisServer::start();
    let listener = open(&server.url(), Replicas::Auto);
    let publisher = open(&server.url(), Replicas::Auto);
    let mut subscription = listener.subscribe("gormic:test:cooldowns");
    // Subscribed: told that anything before is unknown.
    let first = tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("subscribed in time");
    assert_eq!(first, Some(Event::Gap));
    let receivers = publisher
        .publish("gormic:test:cooldowns", b"key-1 3000")
        .await
        .expect("published");
    assert_eq!(receivers, 1);
    let message = tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("a message");
    assert_eq!(
        message,
        Some(Event::Message(bytes::Bytes::from_static(b"key-1 3000")))
    );

    block_in_place(|| server.restart());
    // The subscription is made again on its own, and says so.
    let gap = tokio::time::timeout(PATIENCE, subscription.next())
        .await
        .expect("told of the gap in time");
    assert_eq!(gap, Some(Event::Gap));
    let received = tokio::time::timeout(PATIENCE, async {
        loop {
            let _ = publisher
                .publish("gormic:test:cooldowns", b"key-2 1000")
                .await;
            if let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(100), subscription.next()).await
            {
                break event;
            }
        }
    })
    .await
    .expect("a message after the restart");
    assert_eq!(
        received,
        Event::Message(bytes::Bytes::from_static(b"key-2 1000"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_the_store_down_and_up_without_its_password() {
    let mut server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}", server.port());
    let store = open(&url, Replicas::Auto);
    let metrics = Metrics::default();
    metrics
        .series::<gormic_gateway::store::metrics::StoreSeries>()
        .watch(&store);
    eventually("the store to connect", || {
        store.health().state == StoreState::Up
    })
    .await;
    let health = store.health();
    assert_eq!(health.primaries, [format!("127.0.0.1:{}", server.port())]);
    let exposition = metrics.encode();
    for line in [
        "gormic_gateway_store_state{state=\"up\"} 1".to_owned(),
        "gormic_gateway_store_state{state=\"down\"} 0".to_owned(),
        format!(
            "gormic_gateway_store_primary_info{{topology=\"single\",address=\"127.0.0.1:{}\"}} 1",
            server.port()
        ),
        "gormic_gateway_store_failovers_total 0".to_owned(),
        "gormic_gateway_store_reconnects_total 0".to_owned(),
        "gormic_gateway_store_replicas_required 0".to_owned(),
    ] {
        assert!(exposition.contains(&line), "{line} in:\n{exposition}");
    }

    block_in_place(|| server.kill());
    // The next operation finds the connection broken; the store goes down.
    let failure = increment_failing(&store).await;
    assert!(!failure.detail.contains("s3cret"), "{failure:?}");
    eventually("the store to be down", || {
        store.health().state == StoreState::Down
    })
    .await;
    let health = store.health();
    let error = health.error.expect("why it is down");
    assert!(error.contains("127.0.0.1"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    assert!(
        metrics
            .encode()
            .contains("gormic_gateway_store_state{state=\"down\"} 1")
    );
    let retry = store.retry_after();
    assert!(
        retry >= Duration::from_millis(100) && retry <= Duration::from_secs(1),
        "{retry:?}"
    );

    block_in_place(|| server.restart());
    eventually("the store to be back", || {
        store.health().state == StoreState::Up
    })
    .await;
    assert_eq!(
        increment(&store, "test:back", 1, Wait::None).await.value,
        redis::Value::Int(1)
    );
    let exposition = metrics.encode();
    assert!(
        exposition.contains("gormic_gateway_store_reconnects_total 1"),
        "{exposition}"
    );
    assert!(
        exposition.contains("gormic_gateway_store_failovers_total 0"),
        "a restart is no failover: {exposition}"
    );
    assert!(!exposition.contains("s3cret"));
}

async fn increment_failing(store: &Store) -> gormic_gateway::store::Failure {
    let mut call = INCREMENT.call(&["test:down"]);
    call.arg(1);
    store
        .run(&call, Wait::None, None)
        .await
        .expect_err("Redis is down")
}
