//! Many tenants on one gateway (docs/tenants.md, "Fair shares"): one
//! tenant alone may use all but the reserve of `--max-in-flight` and every
//! upstream slot; while it floods, another is still admitted and waits about
//! one slot's turn, not behind the flood; a flood of made-up organization
//! ids weighs as one tenant and grows no table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Code;

use gormic_gateway::metrics::Metrics;
use gormic_gateway::tenant::TenantId;
use gormic_gateway::upstream::UpstreamOptions;

use crate::support::admin::Scrape;
use crate::support::{
    FakeUpstream, PATIENCE, Scripted, TestGateway, as_org, close, closed, error_info, no_proxy,
    retry_delay, until,
};

/// A gateway with tiny caps: `--max-in-flight max_in_flight`, `slots`
/// upstream slots (one worker thread: one share), recording in `metrics`.
async fn gateway(
    upstream: &FakeUpstream,
    max_in_flight: usize,
    slots: usize,
    metrics: &Metrics,
) -> TestGateway {
    TestGateway::builder(&upstream.url())
        .max_in_flight(max_in_flight)
        .upstream(UpstreamOptions {
            max_connections: slots,
            ..no_proxy()
        })
        .metrics(metrics)
        .start()
        .await
}

/// The value of one series in `metrics`' exposition.
fn sample(metrics: &Metrics, series: &str) -> Option<f64> {
    Scrape(metrics.encode()).value(series)
}

/// Upstream slots in use and calls waiting for one.
fn slots(gateway: &TestGateway) -> (u64, u64) {
    let gauges = gateway.upstream_client().gauges();
    (
        gauges.active.load(Ordering::Relaxed),
        gauges.pending.load(Ordering::Relaxed),
    )
}

fn tenants_waiting(gateway: &TestGateway) -> u64 {
    gateway
        .upstream_client()
        .gauges()
        .tenants_waiting
        .load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_tenant_alone_may_use_all_but_the_reserve_and_every_upstream_slot() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    let metrics = Metrics::default();
    // C = 16, reserve R = max(1, 16/16) = 1: a tenant alone may hold 15.
    let gateway = gateway(&upstream, 16, 2, &metrics).await;
    // Gormic accepts org-a once: it is a tenant of its own from now on.
    gateway
        .client
        .clone()
        .close_invoice(as_org("org-a", close()))
        .await
        .expect("org-a accepted");
    assert_eq!(
        sample(&metrics, "gormic_gateway_tenants_trusted"),
        Some(1.0)
    );

    upstream.hold_answers();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut client = gateway.client.clone();
            tokio::spawn(async move { client.close_invoice(as_org("org-a", close())).await })
        })
        .collect();
    until(
        "org-a to hold 15 calls (2 upstream slots in use, 13 waiting)",
        PATIENCE,
        async || slots(&gateway),
        |&held| held == (2, 13),
    )
    .meanwhile(|&(active, pending)| active + pending <= 15)
    .await;
    until(
        "the 5 calls past org-a's share to be answered",
        PATIENCE,
        async || calls.iter().filter(|call| call.is_finished()).count(),
        |&done| done == 5,
    )
    .meanwhile(|&done| done < 5)
    .await;
    let (refused, held): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.is_finished());
    for call in refused {
        let status = call.await.expect("task").expect_err("past the share");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let info = error_info(&status);
        assert_eq!(info.reason, "TENANT_OVER_SHARE");
        assert_eq!(info.metadata["share"], "15");
        assert_eq!(info.metadata["tenant_in_flight"], "15");
        assert_eq!(info.metadata["tenants"], "1");
        assert!(!info.metadata.contains_key("unverified"), "{info:?}");
        assert_eq!(retry_delay(&status), Duration::from_secs(1));
    }
    assert_eq!(slots(&gateway), (2, 13), "every slot busy, nothing more");
    assert_eq!(
        upstream.requests().len(),
        1 + 2,
        "refused calls are never forwarded"
    );
    let limit = gateway.in_flight_limit();
    assert_eq!(limit.in_flight(), 15);
    assert_eq!(limit.tenants_in_flight(), 1);
    assert_eq!(tenants_waiting(&gateway), 1);
    assert_eq!(
        sample(
            &metrics,
            r#"gormic_gateway_calls_shed_total{reason="fair_share"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(&metrics, "gormic_gateway_tenants_in_flight"),
        Some(1.0)
    );

    // Another tenant still gets in (the reserve), and waits in a line of
    // its own.
    let mut client = gateway.client.clone();
    let other = tokio::spawn(async move { client.close_invoice(as_org("org-b", close())).await });
    until(
        "org-b's call to wait for a slot",
        PATIENCE,
        async || slots(&gateway),
        |&held| held == (2, 14),
    )
    .await;
    assert_eq!(limit.tenants_in_flight(), 2);
    assert_eq!(tenants_waiting(&gateway), 2);
    assert_eq!(
        sample(&metrics, "gormic_gateway_unverified_calls_in_flight"),
        Some(1.0),
        "org-b, never accepted yet, is the unverified organizations' tenant"
    );

    upstream.release_answers();
    for call in held.into_iter().chain([other]) {
        let answer = call.await.expect("task").expect("admitted calls succeed");
        assert_eq!(answer.into_inner().invoice_number, 1);
    }
    assert_eq!(limit.tenants_in_flight(), 0, "no tenant is kept once idle");
    assert_eq!(tenants_waiting(&gateway), 0);
    assert_eq!(
        sample(&metrics, "gormic_gateway_tenants_trusted"),
        Some(2.0)
    );
}

#[tokio::test]
async fn while_one_tenant_floods_another_is_admitted_and_waits_about_one_turn_for_a_slot() {
    // Each upstream request takes TURN: a call behind org-a's 13 waiting
    // calls first come, first served would wait 6.5 turns (2 slots).
    const TURN: Duration = Duration::from_millis(400);
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()).delayed(TURN));
    let metrics = Metrics::default();
    let gateway = gateway(&upstream, 16, 2, &metrics).await;
    let (mut a, mut b) = (gateway.client.clone(), gateway.client.clone());
    let (a, b) = tokio::join!(
        a.close_invoice(as_org("org-a", close())),
        b.close_invoice(as_org("org-b", close())),
    );
    a.expect("org-a accepted");
    b.expect("org-b accepted");
    assert_eq!(
        sample(&metrics, "gormic_gateway_tenants_trusted"),
        Some(2.0)
    );

    // org-a floods: 20 callers for its 15 places, each calling again as
    // soon as it is answered (20 ms after a refusal: for its share, or,
    // while org-b's call takes the last place, for the cap).
    let refused = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let mut client = gateway.client.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                loop {
                    match client.close_invoice(as_org("org-a", close())).await {
                        Ok(_) => {}
                        Err(status)
                            if ["TENANT_OVER_SHARE", "OVERLOADED"]
                                .contains(&error_info(&status).reason.as_str()) =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(status) => panic!("org-a: {status:?}"),
                    }
                }
            })
        })
        .collect();

    let mut waited = Vec::new();
    for n in 0..5 {
        until(
            "org-a to hold all it may (2 upstream slots in use, 13 waiting)",
            PATIENCE,
            async || slots(&gateway),
            |&held| held == (2, 13),
        )
        .await;
        let started = Instant::now();
        let answer = gateway
            .client
            .clone()
            .close_invoice(as_org("org-b", close()))
            .await;
        let took = started.elapsed();
        answer.unwrap_or_else(|status| panic!("org-b's call {n}, while org-a floods: {status:?}"));
        waited.push(took.saturating_sub(TURN));
    }
    for call in &flood {
        call.abort();
    }
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "org-a was held to its share"
    );
    // About one slot's turn: the next freed slot goes to org-a's turn, the
    // one after to org-b's, and two slots free up within a TURN. A TURN
    // more for a busy machine; first come, first served is 6.5 TURNs.
    for (n, waited) in waited.iter().enumerate() {
        assert!(
            *waited <= TURN * 2,
            "org-b's call {n} waited {waited:?} for a slot (each request takes {TURN:?}): \
             all waits {waited_all:?}",
            waited_all = waited
        );
    }
}

#[tokio::test]
async fn a_flood_of_made_up_organizations_weighs_as_one_tenant_and_grows_no_table() {
    const MADE_UP: usize = 10_000;
    const CALLERS: usize = 64;
    let upstream = FakeUpstream::start().await;
    // Gormic refuses the organizations it does not know, and serves org-1.
    upstream.respond(
        Scripted::json(403, json!({"error": {"message": "unknown organization"}}))
            .delayed(Duration::from_millis(10)),
    );
    upstream.respond_for_organization(
        "org-1",
        Scripted::ok(closed()).delayed(Duration::from_millis(2)),
    );
    let metrics = Metrics::default();
    // C = 64, R = 4: the made-up ids together may hold at most 60.
    let gateway = gateway(&upstream, 64, 4, &metrics).await;
    gateway
        .client
        .clone()
        .close_invoice(as_org("org-1", close()))
        .await
        .expect("org-1 accepted");

    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let flood: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (mut client, next, outcomes) =
                (gateway.client.clone(), next.clone(), outcomes.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= MADE_UP {
                        return;
                    }
                    let status = client
                        .close_invoice(as_org(&format!("made-up-{n}"), close()))
                        .await
                        .expect_err("Gormic refuses made-up organizations");
                    let info = error_info(&status);
                    let outcome = match (status.code(), info.reason.as_str()) {
                        (Code::PermissionDenied, "UPSTREAM_HTTP_ERROR") => "refused by Gormic",
                        (Code::ResourceExhausted, "TENANT_OVER_SHARE") => {
                            assert_eq!(info.metadata["unverified"], "true", "{info:?}");
                            "over the share"
                        }
                        _ => panic!("made-up-{n}: {status:?}"),
                    };
                    *outcomes.lock().unwrap().entry(outcome.into()).or_default() += 1;
                }
            })
        })
        .collect();
    // Meanwhile the real organization gets through, every time.
    let mut client = gateway.client.clone();
    let real = tokio::spawn(async move {
        for n in 0..20 {
            client
                .close_invoice(as_org("org-1", close()))
                .await
                .unwrap_or_else(|status| panic!("org-1's call {n} during the flood: {status:?}"));
        }
    });

    // The tables' sizes, at their largest while the flood lasts.
    let limit = gateway.in_flight_limit().clone();
    let most = Mutex::new((0, 0, 0));
    until(
        "the flood of made-up organizations to end",
        Duration::from_secs(120),
        async || {
            let mut most = most.lock().unwrap();
            *most = (
                most.0.max(limit.tenants_in_flight()),
                most.1.max(tenants_waiting(&gateway)),
                most.2.max(limit.tenant_in_flight(TenantId::UNVERIFIED)),
            );
            flood.iter().all(|call| call.is_finished())
        },
        |&ended| ended,
    )
    .every(Duration::from_millis(5))
    .await;
    for call in flood {
        call.await.expect("a made-up organization's caller");
    }
    real.await.expect("org-1's calls succeed");

    let (tenants, lines, unverified) = *most.lock().unwrap();
    assert!(
        tenants <= 2,
        "{tenants} tenants in flight: org-1 and the unverified one"
    );
    assert!(lines <= 2, "{lines} tenants waiting for a slot");
    assert!(
        unverified <= 60,
        "the made-up ids held {unverified} calls: more than C − R"
    );
    assert!(
        unverified > 4,
        "the flood did contend ({unverified} at most)"
    );
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(outcomes.values().sum::<usize>(), MADE_UP, "{outcomes:?}");
    assert!(
        outcomes.get("over the share").is_some_and(|&n| n > 0),
        "the made-up ids were held to one tenant's share: {outcomes:?}"
    );
    let forwarded = upstream
        .requests()
        .iter()
        .filter(|r| r.header("organization-id") != Some("org-1"))
        .count();
    assert_eq!(
        Some(&forwarded),
        outcomes.get("refused by Gormic"),
        "calls over the share are never forwarded"
    );
    // Nothing of the flood is kept: no trusted organization, no tenant.
    assert_eq!(
        sample(&metrics, "gormic_gateway_tenants_trusted"),
        Some(1.0)
    );
    assert_eq!(limit.tenants_in_flight(), 0);
    assert_eq!(tenants_waiting(&gateway), 0);
    assert_eq!(
        sample(&metrics, "gormic_gateway_unverified_calls_in_flight"),
        Some(0.0)
    );
}
