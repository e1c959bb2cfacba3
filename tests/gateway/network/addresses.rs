//! Connections: a name with a dead first address, HTTP/2 with prior
//! knowledge (and its streams refused unprocessed), and keep-alive
//! connections the upstream closes under the gateway, and a slow link
//! (25 ms each way) under 200 calls at once.

use std::time::Duration;

use http::Version;

use gormic_gateway::upstream::UpstreamOptions;

use super::{CONNECTIONS_OPENED, Observed, Unreachable, closed, timed_close, unreachable};
use crate::support::blackhole::Blackhole;
use crate::support::idle_closing::IdleClosingUpstream;
use crate::support::refusing_streams::RefusingStreams;
use crate::support::{FakeUpstream, Scripted, no_proxy};

/// Room for a loaded 2-core CI machine on top of what a call waits for.
const SLACK: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_name_whose_first_address_is_blackholed_is_reached_at_the_next_within_the_connect_timeout_and_then_reused()
 {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    let blackhole = Blackhole::start().await;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    // No port in the URL: each address keeps its own (an explicit port
    // would replace both).
    let observed = Observed::start(
        "http://upstream.test",
        UpstreamOptions {
            connect_timeout: CONNECT_TIMEOUT,
            resolve: vec![(
                "upstream.test".into(),
                vec![blackhole.addr(), upstream.addr()],
            )],
            ..no_proxy()
        },
    )
    .await;
    let mut client = observed.client();

    let first = timed_close(&mut client).await;
    let elapsed = first.elapsed();
    assert_eq!(first.result.expect("reached").invoice_number, 1);
    // hyper-util gives each of the two addresses half the timeout: the
    // blackhole costs its half, then the second address answers at once.
    let share = CONNECT_TIMEOUT / 2;
    assert!(
        elapsed >= share,
        "the first address was tried for its share first: {elapsed:?}"
    );
    assert!(
        elapsed < CONNECT_TIMEOUT + SLACK,
        "the second address was tried within the connect timeout: {elapsed:?}"
    );

    for n in 0..5 {
        let later = timed_close(&mut client).await;
        let elapsed = later.elapsed();
        assert_eq!(later.result.expect("served").invoice_number, 1);
        assert!(
            elapsed < share,
            "call {n} reused the connection, without a new connect: {elapsed:?}"
        );
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 6);
    assert!(
        requests
            .iter()
            .all(|r| r.header("host") == Some("upstream.test")),
        "the name, not the address, is the Host"
    );
    assert_eq!(upstream.connections().accepted, 1);
    assert_eq!(observed.scrape().value(CONNECTIONS_OPENED), Some(1.0));
}

#[tokio::test]
async fn with_http2_an_h2c_upstream_gets_every_call_as_http2_over_one_connection() {
    let upstream = FakeUpstream::start_h2c().await;
    upstream.respond(Scripted::ok(closed()));
    let observed = Observed::start(
        &upstream.url(),
        UpstreamOptions {
            http2: true,
            ..no_proxy()
        },
    )
    .await;
    let mut client = observed.client();

    for _ in 0..3 {
        let call = timed_close(&mut client).await;
        assert_eq!(call.result.expect("served over h2c").invoice_number, 1);
    }
    // A burst, each answer held until all of them are at the upstream at
    // once: over HTTP/1.1 they would need a connection each.
    const BURST: usize = 16;
    upstream.hold_answers_until(3 + BURST);
    let calls: Vec<_> = (0..BURST)
        .map(|_| {
            let mut client = observed.client();
            tokio::spawn(async move { timed_close(&mut client).await })
        })
        .collect();
    for call in calls {
        let call = call.await.expect("the call task");
        assert_eq!(call.result.expect("served in the burst").invoice_number, 1);
    }

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3 + BURST);
    assert!(
        requests.iter().all(|r| r.version == Version::HTTP_2),
        "{:?}",
        requests.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    assert_eq!(format!("{:?}", requests[0].version), "HTTP/2.0");
    assert_eq!(
        upstream.connections().accepted,
        1,
        "every call on one connection"
    );
    assert_eq!(observed.scrape().value(CONNECTIONS_OPENED), Some(1.0));
}

#[tokio::test]
async fn http2_streams_refused_unprocessed_are_retried_and_the_call_says_nothing_was_sent() {
    let upstream = RefusingStreams::start().await;
    let observed = Observed::start(
        &upstream.url(),
        UpstreamOptions {
            http2: true,
            ..no_proxy()
        },
    )
    .await;

    let call = timed_close(&mut observed.client()).await;

    // REFUSED_STREAM means unprocessed (RFC 9113 §8.7): even a close is
    // sent again, and the caller learns that nothing happened upstream.
    let Unreachable::Tried { detail, attempts } = unreachable(call.status()) else {
        panic!("the breaker was open: {:?}", call.status());
    };
    assert_eq!(attempts, 3, "retried up to --max-attempts: {detail}");
    assert!(detail.contains("refused"), "{detail}");
    assert_eq!(upstream.refused(), 3);
    assert_eq!(
        upstream.connections(),
        1,
        "the retries reuse the connection"
    );
    let scrape = observed.scrape();
    assert_eq!(
        scrape.value(r#"gormic_gateway_upstream_retries_total{rpc_method="CloseInvoice",reason="refused_stream"}"#),
        Some(2.0)
    );
}

#[tokio::test]
async fn closes_spaced_around_the_upstreams_keep_alive_timeout_never_lose_a_call_to_a_stale_connection()
 {
    // CloseInvoice is never sent twice: a pooled connection the upstream
    // has closed must never be handed a close (nor cost the call).
    const IDLE: Duration = Duration::from_millis(200);
    const SPACING: [Duration; 3] = [
        Duration::from_millis(150),
        Duration::from_millis(200),
        Duration::from_millis(250),
    ];
    const CALLS: usize = 30;
    let upstream = IdleClosingUpstream::start(IDLE).await;
    let observed = Observed::start(&upstream.url(), no_proxy()).await;
    let mut client = observed.client();

    for n in 0..CALLS {
        let call = timed_close(&mut client).await;
        match &call.result {
            Ok(closed) => assert_eq!(closed.invoice_number, 1),
            Err(status) => panic!(
                "call {n} (after {:?} idle) failed: {status:?}",
                SPACING[(n + 2) % 3]
            ),
        }
        // Pacing, not waiting for readiness: the idle time is the point.
        tokio::time::sleep(SPACING[n % 3]).await;
    }

    assert_eq!(
        upstream.requests(),
        CALLS,
        "one request per call: none was repeated"
    );
    assert!(
        upstream.connections() > 1 && upstream.closed_idle() >= 1,
        "the upstream closed idle connections under the gateway: {} connections, {} closed idle",
        upstream.connections(),
        upstream.closed_idle()
    );
    assert_eq!(
        observed.scrape().value(CONNECTIONS_OPENED),
        Some(upstream.connections() as f64)
    );
}

#[tokio::test]
async fn over_a_link_of_25_ms_each_way_2000_calls_at_200_at_once_all_succeed_and_none_is_sent_twice()
 {
    use crate::support::delay_proxy::DelayProxy;
    const CALLS: usize = 2_000;
    const AT_ONCE: usize = 200;
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::ok(closed()));
    let link = DelayProxy::start(upstream.addr(), Duration::from_millis(25)).await;
    let observed = Observed::start(&format!("http://{}", link.addr()), no_proxy()).await;

    let turns = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut client = observed.client();
            let turns = turns.clone();
            tokio::spawn(async move {
                let _turn = turns.acquire_owned().await.expect("open semaphore");
                client
                    .close_invoice(crate::support::authed(super::close()))
                    .await
            })
        })
        .collect();
    for call in calls {
        let response = call.await.expect("task").expect("every call succeeds");
        assert_eq!(response.into_inner().invoice_number, 1);
    }
    assert_eq!(upstream.requests().len(), CALLS, "each call sent once");
    assert!(
        link.connections() <= AT_ONCE,
        "connections are reused: {}",
        link.connections()
    );
}
