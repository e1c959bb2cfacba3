//! Quotas (`--quotas`), end to end in front of the fake upstream: a bucket's
//! burst passes and the next call is `QUOTA_EXCEEDED` with `QuotaFailure`
//! and `RetryInfo`, unsent; other organizations keep their own buckets; a
//! per-RPC bucket replaces its entry's; a caller's quota spans its
//! organizations; a reload applies to the next call and a bad file keeps
//! the old quotas; a bad file stops the binary. Across replicas: two
//! gateways on one Redis share a bucket, and with Redis down each
//! `--quota-store-failure` mode does what docs/tenants.md says.
//!
//! Limits are 0.001 calls a second: a bucket refills one call in 1000 s, so
//! nothing refills during a test and every count is exact.

use std::time::Duration;

use serde_json::json;
use tonic::Code;

use gormic_gateway::errors::{GATEWAY_DOMAIN, reason};
use gormic_gateway::idempotency::Idempotency;
use gormic_gateway::metrics::Metrics;
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::quota::{QuotaTable, Quotas, StoreFailure};
use gormic_gateway::reload::Reloads;
use gormic_gateway::store::Store;

use crate::support::admin::Scrape;
use crate::support::binary::run_to_exit;
use crate::support::certs::{Ca, Names, TestDir, client_config};
use crate::support::redis::RedisServer;
use crate::support::secure::{SecureGateway, server_tls};
use crate::support::stores::open_at;
use crate::support::{
    API_KEY, FakeUpstream, PATIENCE, Scripted, TestGateway, as_org, details, error_info, keyed_as,
    logs, retry_delay, until,
};

/// One call every 1000 s: no refill while a test runs.
const SLOW: &str = "calls_per_second = 0.001";

/// An answer both CloseInvoice and DeleteInvoice can read.
async fn answering_upstream() -> FakeUpstream {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(json!({
        "invoiceNumber": 7,
        "invoiceSource": "POS",
        "invoicedAt": "2026-11-25T10:00:00Z",
        "succeed": true,
    })));
    upstream
}

fn quotas_file(dir: &TestDir, text: &str) -> QuotaTable {
    QuotaTable::load(&dir.write("quotas.toml", text)).expect("a valid quotas file")
}

/// A close of `inv-1` for `organization`, with the test's api-key.
fn close_for(organization: &str) -> tonic::Request<pb::CloseInvoiceRequest> {
    as_org(organization, crate::support::close())
}

async fn close(
    client: &mut InvoiceServiceClient<tonic::transport::Channel>,
    organization: &str,
) -> Result<(), tonic::Status> {
    client
        .close_invoice(close_for(organization))
        .await
        .map(drop)
}

/// How many of `n` closes for `organization` pass, and the first refusal.
async fn closes(
    client: &mut InvoiceServiceClient<tonic::transport::Channel>,
    organization: &str,
    n: usize,
) -> (usize, Option<tonic::Status>) {
    let mut passed = 0;
    let mut refused = None;
    for _ in 0..n {
        match close(client, organization).await {
            Ok(()) => passed += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(error_info(&status).reason, reason::QUOTA_EXCEEDED);
                refused.get_or_insert(status);
            }
        }
    }
    (passed, refused)
}

/// `gormic_gateway_quota_checks_total` of `bucket`, `result` and
/// `decided_by` in `scrape`.
fn quota_checks(scrape: &Scrape, bucket: &str, result: &str, decided_by: &str) -> Option<f64> {
    scrape.value(&format!(
        r#"gormic_gateway_quota_checks_total{{bucket="{bucket}",result="{result}",decided_by="{decided_by}"}}"#
    ))
}

/// The `QuotaFailure` violation of a refusal: (subject, description).
fn quota_failure(status: &tonic::Status) -> (String, String) {
    let details = details(status);
    let failure = details.quota_failure().expect("QuotaFailure");
    assert_eq!(failure.violations.len(), 1, "{failure:?}");
    let violation = &failure.violations[0];
    (violation.subject.clone(), violation.description.clone())
}

#[tokio::test]
async fn the_burst_passes_then_the_next_call_is_quota_exceeded_with_its_details_and_never_sent() {
    let dir = TestDir::new("quotas-burst");
    let table = quotas_file(
        &dir,
        &format!("[organizations.\"org-1\"]\n{SLOW}\nburst = 3\n"),
    );
    let upstream = answering_upstream().await;
    let metrics = Metrics::default();
    let mut gateway = TestGateway::builder(&upstream.url())
        .metrics(&metrics)
        .quotas(Quotas::new(table, None, StoreFailure::Local))
        .start()
        .await;

    for call in 1..=3 {
        close(&mut gateway.client, "org-1")
            .await
            .unwrap_or_else(|status| panic!("call {call} of the burst: {status:?}"));
    }
    let status = close(&mut gateway.client, "org-1")
        .await
        .expect_err("past the burst");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "quota exceeded for organization:org-1: 0.001 calls per second, burst 3 (--quotas)"
    );
    let info = error_info(&status);
    assert_eq!(info.reason, reason::QUOTA_EXCEEDED);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert_eq!(info.metadata["quota_subject"], "organization:org-1");
    assert_eq!(info.metadata["calls_per_second"], "0.001");
    assert_eq!(info.metadata["burst"], "3");
    assert!(!info.metadata.contains_key("quota_store"));
    assert_eq!(
        quota_failure(&status),
        (
            "organization:org-1".to_owned(),
            "0.001 calls per second, burst 3 (--quotas)".to_owned()
        )
    );
    // The next call passes once the bucket has one interval (1000 s) back.
    let delay = retry_delay(&status);
    assert!(
        delay > Duration::from_secs(990) && delay <= Duration::from_secs(1000),
        "{delay:?}"
    );
    assert!(details(&status).request_info().is_some());

    assert_eq!(
        upstream.requests().len(),
        3,
        "the refused call was not sent"
    );
    let scrape = Scrape(metrics.encode());
    assert_eq!(
        scrape.value(r#"gormic_gateway_calls_shed_total{reason="quota"}"#),
        Some(1.0)
    );
    let checks = |result: &str| quota_checks(&scrape, "organization", result, "local");
    assert_eq!(checks("allowed"), Some(3.0));
    assert_eq!(checks("refused"), Some(1.0));
    assert_eq!(
        scrape.value(
            r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="8"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_refused_call_takes_no_idempotency_lease() {
    let dir = TestDir::new("quotas-no-lease");
    let upstream = answering_upstream().await;
    let keyed = |key: &str| keyed_as(crate::support::close(), key, "org-1", API_KEY);
    // A gateway with room, on the same (memory) idempotency store, runs the
    // key as new: the refusal held no lease on it.
    let store = Idempotency::in_memory().expect("a memory store");
    let mut roomy = TestGateway::builder(&upstream.url())
        .idempotency(store.clone())
        .start()
        .await;
    let mut limited = TestGateway::builder(&upstream.url())
        .idempotency(store)
        .quotas(Quotas::new(
            quotas_file(&dir, &format!("[default]\n{SLOW}\nburst = 1\n")),
            None,
            StoreFailure::Local,
        ))
        .start()
        .await;
    close(&mut limited.client, "org-1")
        .await
        .expect("the burst");
    let status = limited
        .client
        .close_invoice(keyed("key-2"))
        .await
        .expect_err("over the quota");
    assert_eq!(error_info(&status).reason, reason::QUOTA_EXCEEDED);
    let answer = roomy
        .client
        .close_invoice(keyed("key-2"))
        .await
        .expect("a fresh key: no lease was taken by the refused call");
    assert!(answer.metadata().get("idempotent-replayed").is_none());
    let again = roomy
        .client
        .close_invoice(keyed("key-2"))
        .await
        .expect("a replay");
    assert_eq!(
        again
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..]),
        "the store records keys: the first answer was not a lucky miss"
    );
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn other_organizations_keep_their_own_buckets() {
    let dir = TestDir::new("quotas-others");
    let table = quotas_file(
        &dir,
        &format!("[default]\n{SLOW}\nburst = 2\n\n[organizations.\"org-1\"]\n{SLOW}\nburst = 1\n"),
    );
    let upstream = answering_upstream().await;
    let mut gateway = TestGateway::builder(&upstream.url())
        .quotas(Quotas::new(table, None, StoreFailure::Local))
        .start()
        .await;

    let (passed, refused) = closes(&mut gateway.client, "org-1", 3).await;
    assert_eq!(passed, 1);
    assert_eq!(
        quota_failure(&refused.expect("refused")).0,
        "organization:org-1"
    );
    for organization in ["org-2", "org-3"] {
        let (passed, refused) = closes(&mut gateway.client, organization, 4).await;
        assert_eq!(passed, 2, "{organization}: a [default] bucket of its own");
        let refused = refused.expect("refused past the default burst");
        assert_eq!(
            quota_failure(&refused),
            (
                format!("organization:{organization}"),
                "0.001 calls per second, burst 2 ([default] of --quotas)".to_owned()
            )
        );
    }
    assert_eq!(upstream.requests().len(), 5);
}

#[tokio::test]
async fn a_per_rpc_bucket_replaces_its_entrys_bucket_for_that_rpc() {
    let dir = TestDir::new("quotas-rpc");
    let table = quotas_file(
        &dir,
        &format!(
            "[organizations.\"org-1\"]\n{SLOW}\nburst = 2\n\n\
             [organizations.\"org-1\".rpc.CloseInvoice]\n{SLOW}\nburst = 1\n"
        ),
    );
    let upstream = answering_upstream().await;
    let mut gateway = TestGateway::builder(&upstream.url())
        .quotas(Quotas::new(table, None, StoreFailure::Local))
        .start()
        .await;

    let (passed, refused) = closes(&mut gateway.client, "org-1", 2).await;
    assert_eq!(passed, 1);
    assert_eq!(
        quota_failure(&refused.expect("refused")),
        (
            "organization:org-1/rpc:CloseInvoice".to_owned(),
            "0.001 calls per second to CloseInvoice, burst 1 (--quotas)".to_owned()
        )
    );
    // Deletes take from the entry's bucket, which closes did not touch.
    let delete = || {
        as_org(
            "org-1",
            pb::DeleteInvoiceRequest {
                invoice_id: "inv-1".into(),
            },
        )
    };
    for call in 1..=2 {
        gateway
            .client
            .delete_invoice(delete())
            .await
            .unwrap_or_else(|status| panic!("delete {call}: {status:?}"));
    }
    let status = gateway
        .client
        .delete_invoice(delete())
        .await
        .expect_err("the entry's burst is spent");
    assert_eq!(quota_failure(&status).0, "organization:org-1");
    assert_eq!(upstream.requests().len(), 3);
}

const JOB: &str = "spiffe://prod.example/ns/batch/sa/job";
const REPORTER: &str = "spiffe://prod.example/ns/analytics/sa/reporter";

#[tokio::test]
async fn a_callers_quota_spans_its_organizations_and_its_refusals_cost_them_nothing() {
    let dir = TestDir::new("quotas-caller");
    let table = quotas_file(
        &dir,
        &format!(
            "[callers.\"{JOB}\"]\n{SLOW}\nburst = 2\n\n\
             [organizations.\"org-a\"]\n{SLOW}\nburst = 3\n"
        ),
    );
    let upstream = answering_upstream().await;
    let server_ca = Ca::new("gateway CA");
    let client_ca = Ca::new("client CA");
    let url = url::Url::parse(&upstream.url()).expect("upstream URL");
    let gateway = gormic_gateway::service::InvoiceGateway::new(
        gormic_gateway::upstream::Upstream::new(&url, crate::support::no_proxy())
            .expect("upstream client"),
    )
    .expect("in-memory idempotency store")
    .with_quotas(Quotas::new(table, None, StoreFailure::Local));
    let secure = SecureGateway::start(
        gateway,
        server_tls(&dir, &server_ca.server(), Some(&client_ca)),
    )
    .await;
    let client_as = |identity: &'static str| {
        let leaf = client_ca.client(&Names {
            uris: vec![identity],
            ..Names::default()
        });
        secure.client(client_config(&server_ca, Some(&leaf)))
    };
    let mut job = client_as(JOB);

    close(&mut job, "org-a").await.expect("the caller's burst");
    close(&mut job, "org-b").await.expect("the caller's burst");
    for organization in ["org-a", "org-b", "org-c"] {
        let status = close(&mut job, organization)
            .await
            .expect_err("the caller's burst is spent, whatever the organization");
        assert_eq!(
            quota_failure(&status),
            (
                format!("caller:{JOB}"),
                "0.001 calls per second, burst 2 (--quotas)".to_owned()
            )
        );
    }
    // org-a's bucket lost one call (the job's first), none to the refusals.
    let mut reporter = client_as(REPORTER);
    let (passed, refused) = closes(&mut reporter, "org-a", 4).await;
    assert_eq!(passed, 2);
    assert_eq!(
        quota_failure(&refused.expect("refused")).0,
        "organization:org-a"
    );
    assert_eq!(upstream.requests().len(), 4);
}

#[tokio::test]
async fn a_reload_applies_to_the_next_call_and_a_bad_file_keeps_the_quotas_in_use() {
    let dir = TestDir::new("quotas-reload");
    let path = dir.write("quotas.toml", format!("[default]\n{SLOW}\nburst = 1\n"));
    let table = QuotaTable::load(&path).expect("a valid file");
    let upstream = answering_upstream().await;
    let metrics = Metrics::default();
    let mut gateway = TestGateway::builder(&upstream.url())
        .metrics(&metrics)
        .quotas(Quotas::new(table.clone(), None, StoreFailure::Local))
        .start()
        .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Reloads {
            interval: Duration::from_millis(20),
            server_tls: None,
            upstream_tls: None,
            credentials: None,
            quotas: Some(table),
        }
        .run(
            async {
                let _ = stopped.await;
            },
            metrics.clone(),
        ),
    );
    let reloads = |result: &'static str| {
        let metrics = metrics.clone();
        async move || {
            Scrape(metrics.encode())
                .value(&format!(
                    r#"gormic_gateway_reloads_total{{file="quotas",result="{result}"}}"#
                ))
                .unwrap_or(0.0)
        }
    };

    assert_eq!(closes(&mut gateway.client, "org-1", 2).await.0, 1);
    std::fs::write(&path, format!("[default]\n{SLOW}\nburst = 3\n")).unwrap();
    until("the new quotas in use", PATIENCE, reloads("success"), |n| {
        *n == 1.0
    })
    .await;
    // A changed limit starts full.
    assert_eq!(closes(&mut gateway.client, "org-1", 4).await.0, 3);

    std::fs::write(&path, format!("[default]\n{SLOW}\nburst = 3\nburts = 9\n")).unwrap();
    until("the bad file refused", PATIENCE, reloads("failure"), |n| {
        *n == 1.0
    })
    .await;
    let (passed, refused) = closes(&mut gateway.client, "org-2", 4).await;
    assert_eq!(passed, 3, "the quotas in use stay");
    assert!(
        quota_failure(&refused.expect("refused"))
            .1
            .contains("burst 3")
    );
    let _ = stop.send(());
}

#[tokio::test]
async fn a_bad_quotas_file_stops_the_binary_before_it_binds_naming_file_line_and_field() {
    let dir = TestDir::new("quotas-binary");
    let path = dir.write(
        "quotas.toml",
        "[organizations.\"org-1\"]\ncalls_per_second = 20\nburst = 0\n",
    );
    let output = run_to_exit(&["--sandbox", "--quotas", path.to_str().expect("UTF-8")]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "gormic-gateway: --quotas {}: line 3: organizations.\"org-1\".burst must be a \
             whole number from 1 to 1000000, not 0",
            path.display()
        )
    );
}

// ---- across replicas --------------------------------------------------------

/// The store a replica opens on the Redis at `redis_url` (as `main` does,
/// through the idempotency store), answering within `timeout`.
async fn shared_store(redis_url: &str, timeout: Duration) -> Store {
    let args = gormic_gateway::idempotency::IdempotencyArgs {
        idempotency_store_timeout: timeout,
        ..Default::default()
    };
    open_at(redis_url, args)
        .await
        .shared_store()
        .cloned()
        .expect("a Redis store")
}

/// The replicas of one deployment: one upstream, one quotas file, one Redis.
struct Deployment {
    upstream: FakeUpstream,
    dir: TestDir,
    quotas: String,
    redis_url: String,
}

impl Deployment {
    /// A deployment on `redis`, its files in `TestDir::new(name)`, its
    /// quotas the default bucket's: one call every 1000 s, this `burst`.
    async fn new(name: &str, burst: u32, redis: &RedisServer) -> Self {
        Self {
            dir: TestDir::new(name),
            quotas: format!("[default]\n{SLOW}\nburst = {burst}\n"),
            upstream: answering_upstream().await,
            redis_url: redis.url(),
        }
    }

    /// A replica: buckets and a store handle of its own, on the shared Redis.
    async fn replica(&self, on_failure: StoreFailure, metrics: &Metrics) -> TestGateway {
        let store = shared_store(&self.redis_url, Duration::from_millis(500)).await;
        let table = quotas_file(&self.dir, &self.quotas);
        TestGateway::builder(&self.upstream.url())
            .metrics(metrics)
            .quotas(Quotas::new(table, Some(store), on_failure))
            .start()
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_share_one_quota() {
    let redis = RedisServer::start();
    let deployment = Deployment::new("quotas-shared", 4, &redis).await;
    let (metrics_a, metrics_b) = (Metrics::default(), Metrics::default());
    let mut a = deployment.replica(StoreFailure::Local, &metrics_a).await;
    let mut b = deployment.replica(StoreFailure::Local, &metrics_b).await;

    // Ten calls, alternating: four pass in all, whichever replica took them.
    let mut passed = 0;
    let mut refusals = Vec::new();
    for call in 0..10 {
        let client = if call % 2 == 0 {
            &mut a.client
        } else {
            &mut b.client
        };
        match close(client, "org-1").await {
            Ok(()) => passed += 1,
            Err(status) => refusals.push(status),
        }
    }
    assert_eq!(passed, 4);
    assert_eq!(deployment.upstream.requests().len(), 4);
    for status in &refusals {
        assert_eq!(error_info(status).reason, reason::QUOTA_EXCEEDED);
        let delay = retry_delay(status);
        assert!(
            delay > Duration::from_secs(990) && delay <= Duration::from_secs(1000),
            "Redis's clock says when: {delay:?}"
        );
    }
    // Both replicas asked the store, and each refused for the other's calls.
    for metrics in [&metrics_a, &metrics_b] {
        let scrape = Scrape(metrics.encode());
        let by_store =
            |result: &str| quota_checks(&scrape, "default", result, "store").unwrap_or(0.0);
        assert_eq!(by_store("allowed") + by_store("refused"), 5.0);
        assert!(by_store("refused") >= 1.0, "{}", scrape.text());
    }
    // Another organization's bucket is another key.
    close(&mut b.client, "org-2").await.expect("its own bucket");

    // One key per bucket, named by a hash, expiring with its bucket.
    let mut connection = redis.raw_connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("gormic:quota:*")
        .query_async(&mut connection)
        .await
        .expect("KEYS");
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        assert!(
            key.starts_with("gormic:quota:v1:") && key.len() == 16 + 64,
            "{key}"
        );
        assert!(!key.contains("org-"), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("PTTL");
        // org-1: four calls' worth (4000 s); org-2: one (1000 s).
        assert!(ttl > 990_000 && ttl <= 4_000_000, "{key}: {ttl} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_replica_enforces_the_quota_alone_by_default() {
    let logs = logs();
    let mut redis = RedisServer::start();
    let deployment = Deployment::new("quotas-redis-down", 2, &redis).await;
    let metrics = Metrics::default();
    let mut a = deployment.replica(StoreFailure::Local, &metrics).await;
    close(&mut a.client, "org-1").await.expect("through Redis");
    close(&mut a.client, "org-1").await.expect("through Redis");
    let status = close(&mut a.client, "org-1")
        .await
        .expect_err("shared bucket spent");
    assert_eq!(error_info(&status).reason, reason::QUOTA_EXCEEDED);

    redis.kill();
    // This replica's own bucket (full: it was never used) decides now.
    let (passed, refused) = closes(&mut a.client, "org-1", 5).await;
    assert_eq!(passed, 2);
    let refused = refused.expect("this replica's burst is spent too");
    assert!(!error_info(&refused).metadata.contains_key("quota_store"));
    assert_eq!(deployment.upstream.requests().len(), 4);
    let scrape = Scrape(metrics.encode());
    let fallback = |result: &str| quota_checks(&scrape, "default", result, "store_failed");
    assert_eq!(fallback("allowed"), Some(2.0));
    assert_eq!(fallback("refused"), Some(3.0));
    // Said once, not per call.
    let port = format!("127.0.0.1:{}", redis.port());
    let said = logs
        .text()
        .lines()
        .filter(|line| line.contains("quota store unavailable") && line.contains(&port))
        .count();
    assert_eq!(said, 1, "{}", logs.text());

    // Back: shared again, and said so.
    redis.restart();
    until(
        "calls decided by Redis again",
        PATIENCE,
        async || close(&mut a.client, "org-1").await,
        |answer| answer.is_ok(),
    )
    .await
    .expect("a call decided by Redis again");
    logs.wait_for_line("saying the quota store answers again", |line| {
        line.contains("quota store answering again") && line.contains(&port)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_allow_lets_calls_through_and_refuse_refuses_them() {
    let mut redis = RedisServer::start();
    let deployment = Deployment::new("quotas-redis-modes", 1, &redis).await;
    let metrics = Metrics::default();
    let mut allow = deployment.replica(StoreFailure::Allow, &metrics).await;
    let mut refuse = deployment.replica(StoreFailure::Refuse, &metrics).await;
    redis.kill();

    let (passed, _) = closes(&mut allow.client, "org-1", 4).await;
    assert_eq!(passed, 4, "allow: no quota while the store is down");

    let status = close(&mut refuse.client, "org-2")
        .await
        .expect_err("refuse: nothing passes unchecked");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .starts_with("quota of organization:org-2 not checked: 0.001 calls per second"),
        "{}",
        status.message()
    );
    let info = error_info(&status);
    assert_eq!(info.reason, reason::QUOTA_EXCEEDED);
    assert_eq!(info.metadata["quota_store"], "unavailable");
    let (subject, description) = quota_failure(&status);
    assert_eq!(subject, "organization:org-2");
    assert!(
        description.ends_with(
            "not checked: the quota store is unavailable (--quota-store-failure refuse)"
        ),
        "{description}"
    );
    let delay = retry_delay(&status);
    assert!(
        delay >= Duration::from_millis(100) && delay <= Duration::from_secs(1),
        "until the store's next attempt: {delay:?}"
    );
    assert_eq!(
        deployment.upstream.requests().len(),
        4,
        "the refused call was not sent"
    );
}
