//! The circuit breaker in front of an upstream that is away: a blackholed
//! one (connects time out) and a refusing one (probes back off, doubling,
//! until it listens again), in-process and in the binary (its log lines
//! and `/metrics`); answers, even error answers, never open it.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use gormic_gateway::errors::UPSTREAM_DOMAIN;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;
use gormic_gateway::upstream::{BreakerArgs, UpstreamOptions};

use super::{
    CONNECTIONS_OPENED, Observed, Timed, UPSTREAM_REQUESTS, Unreachable, breaker_state,
    breaker_transitions, client_of, closed, sum_of, timed_close, unreachable,
};
use crate::support::admin::{get, scrape};
use crate::support::binary::Serving;
use crate::support::blackhole::Blackhole;
use crate::support::{FakeUpstream, PATIENCE, Scripted, error_info, no_proxy, until, within};

/// Room for a loaded 2-core CI machine on top of what a call waits for.
const SLACK: Duration = Duration::from_millis(400);
/// The breaker's jitter: each wait is the backoff plus up to 20 %.
const JITTER: f64 = 1.2;
/// Pause between two calls of a loop (pacing, not waiting for anything).
const PACE: Duration = Duration::from_millis(10);

fn breaker(failures: u32, backoff: Duration, max_backoff: Duration) -> BreakerArgs {
    BreakerArgs {
        upstream_breaker_failures: failures,
        upstream_breaker_backoff: backoff,
        upstream_breaker_max_backoff: max_backoff,
        ..BreakerArgs::default()
    }
}

#[tokio::test]
async fn a_blackholed_upstream_fails_each_call_at_the_connect_timeout_unretried_until_the_breaker_opens_and_fails_fast()
 {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    const FAILURES: u32 = 3;
    // Longer than the test: no probe goes while it runs.
    const BACKOFF: Duration = Duration::from_secs(30);
    let blackhole = Blackhole::start().await;
    let observed = Observed::start(
        &blackhole.url(),
        UpstreamOptions {
            connect_timeout: CONNECT_TIMEOUT,
            breaker: breaker(FAILURES, BACKOFF, 2 * BACKOFF),
            ..no_proxy()
        },
    )
    .await;
    let mut client = observed.client();

    let mut last = None;
    for n in 1..=FAILURES {
        let call = timed_close(&mut client).await;
        let elapsed = call.elapsed();
        let Unreachable::Tried { detail, attempts } = unreachable(call.status()) else {
            panic!("call {n} was refused by the breaker: {:?}", call.status());
        };
        assert_eq!(attempts, 1, "a connect timeout is not retried: {detail}");
        assert!(detail.contains("--upstream-connect-timeout"), "{detail}");
        assert!(
            elapsed >= CONNECT_TIMEOUT,
            "call {n} waited the connect timeout: {elapsed:?}"
        );
        assert!(
            elapsed < CONNECT_TIMEOUT + SLACK * 3,
            "call {n} failed once the connect timed out: {elapsed:?}"
        );
        last = Some(call);
    }
    let tripping = last.expect("calls were made");
    let open = observed.scrape();
    assert_eq!(open.value(&breaker_state("open")), Some(1.0));
    assert_eq!(open.value(&breaker_transitions("open")), Some(1.0));
    assert_eq!(sum_of(&open, UPSTREAM_REQUESTS), f64::from(FAILURES));

    for n in 0..5 {
        let call = timed_close(&mut client).await;
        let elapsed = call.elapsed();
        let Unreachable::BreakerOpen { retry_after } = unreachable(call.status()) else {
            panic!("call {n} tried the blackhole again: {:?}", call.status());
        };
        assert!(
            elapsed < CONNECT_TIMEOUT / 2,
            "an open breaker fails at once: {elapsed:?}"
        );
        // The first probe may go a backoff (plus jitter) after the trip.
        assert!(
            retry_after <= BACKOFF.mul_f64(JITTER),
            "RetryInfo {retry_after:?}"
        );
        assert!(
            retry_after + (call.ended - tripping.started) >= BACKOFF,
            "RetryInfo {retry_after:?} is the time left until the probe"
        );
    }
    let still = observed.scrape();
    assert_eq!(
        sum_of(&still, UPSTREAM_REQUESTS),
        f64::from(FAILURES),
        "fast-fails make no request"
    );
    assert_eq!(still.value(&breaker_transitions("open")), Some(1.0));
    assert_eq!(still.value(&breaker_state("open")), Some(1.0));
}

/// Calls, a pace apart, until one goes through (the breaker's probe of an
/// upstream that listens again); every call before it fails fast at the
/// open breaker.
async fn until_a_probe_goes_through(client: &mut InvoiceServiceClient<Channel>) -> Timed {
    until(
        "a probe of the listening upstream",
        PATIENCE,
        async || timed_close(client).await,
        |call| call.result.is_ok(),
    )
    .meanwhile(|call| matches!(unreachable(call.status()), Unreachable::BreakerOpen { .. }))
    .every(PACE)
    .await
}

/// The wait before probe `k` (0: after the trip), as the breaker doubles it.
fn wait_before(k: usize, backoff: Duration, max_backoff: Duration) -> Duration {
    (backoff * (1 << k)).min(max_backoff)
}

#[tokio::test]
async fn a_refusing_upstream_opens_the_breaker_whose_probes_back_off_doubling_and_which_closes_once_the_upstream_listens()
 {
    const FAILURES: u32 = 3;
    const BACKOFF: Duration = Duration::from_millis(200);
    const MAX_BACKOFF: Duration = Duration::from_millis(800);
    // Waits of 200, 400, 800 and 800 ms (capped) before them.
    const FAILED_PROBES: usize = 4;
    let reserved = FakeUpstream::reserve();
    let observed = Observed::start(
        &reserved.url(),
        UpstreamOptions {
            breaker: breaker(FAILURES, BACKOFF, MAX_BACKOFF),
            ..no_proxy()
        },
    )
    .await;
    let mut client = observed.client();
    assert_eq!(observed.scrape().value(&breaker_state("closed")), Some(1.0));

    // Closed: every call tries (and retries) and is refused.
    let mut requests_made = 0;
    let refused = |call: &Timed, requests_made: &mut u32| -> bool {
        match unreachable(call.status()) {
            Unreachable::Tried { detail, attempts } => {
                assert!(detail.contains("refused"), "{detail}");
                assert!((1..=3).contains(&attempts), "{attempts}");
                *requests_made += attempts;
                true
            }
            Unreachable::BreakerOpen { .. } => false,
        }
    };
    let mut tries = Vec::new();
    for n in 1..=FAILURES {
        let call = timed_close(&mut client).await;
        assert!(
            refused(&call, &mut requests_made),
            "call {n} was refused by the breaker"
        );
        tries.push(call);
    }
    let open = observed.scrape();
    assert_eq!(open.value(&breaker_state("open")), Some(1.0));
    assert_eq!(open.value(&breaker_transitions("open")), Some(1.0));

    // Open: calls fail fast but for one probe per backoff.
    let mut tries = vec![tries.pop().expect("the tripping call")];
    let mut fast_fails = 0;
    within("the breaker's failed probes", PATIENCE, async {
        while tries.len() <= FAILED_PROBES {
            tokio::time::sleep(PACE).await;
            let call = timed_close(&mut client).await;
            if refused(&call, &mut requests_made) {
                tries.push(call);
                continue;
            }
            fast_fails += 1;
            let Unreachable::BreakerOpen { retry_after } = unreachable(call.status()) else {
                unreachable!()
            };
            let wait = wait_before(tries.len() - 1, BACKOFF, MAX_BACKOFF);
            assert!(
                retry_after <= wait.mul_f64(JITTER),
                "RetryInfo {retry_after:?} within the wait of {wait:?}"
            );
        }
    })
    .await;
    for (k, pair) in tries.windows(2).enumerate() {
        let (before, probe) = (&pair[0], &pair[1]);
        let wait = wait_before(k, BACKOFF, MAX_BACKOFF);
        assert!(
            probe.ended - before.started >= wait,
            "probe {} came {:?} after the previous try, before its backoff of {wait:?}",
            k + 1,
            probe.ended - before.started
        );
        assert!(
            probe.started - before.ended <= wait.mul_f64(JITTER) + SLACK,
            "probe {} came {:?} after the previous try, long after its backoff of {wait:?}",
            k + 1,
            probe.started - before.ended
        );
    }
    assert!(
        fast_fails >= FAILED_PROBES,
        "calls between probes fail fast: {fast_fails}"
    );
    let probing = observed.scrape();
    assert_eq!(
        sum_of(&probing, UPSTREAM_REQUESTS),
        f64::from(requests_made),
        "only the tries made requests, the fast-fails none"
    );
    assert_eq!(probing.value(CONNECTIONS_OPENED), Some(0.0));
    assert_eq!(
        probing.value(&breaker_transitions("open")),
        Some(1.0 + FAILED_PROBES as f64)
    );
    assert_eq!(
        probing.value(&breaker_transitions("half_open")),
        Some(FAILED_PROBES as f64)
    );

    // Back: the next probe gets an answer and closes the breaker.
    let upstream = reserved.start().await;
    upstream.respond(Scripted::ok(closed()));
    let back = Instant::now();
    let probed = until_a_probe_goes_through(&mut client).await;
    let waited = back.elapsed();
    assert_eq!(
        probed.result.expect("the probe succeeded").invoice_number,
        1
    );
    let last_wait = wait_before(FAILED_PROBES, BACKOFF, MAX_BACKOFF);
    assert!(
        waited <= last_wait.mul_f64(JITTER) + SLACK,
        "the upstream was probed within the last backoff of {last_wait:?}: {waited:?}"
    );
    for _ in 0..5 {
        let call = timed_close(&mut client).await;
        assert_eq!(
            call.result
                .expect("closed: calls go through")
                .invoice_number,
            1
        );
    }
    assert_eq!(upstream.requests().len(), 6, "the probe and the five after");

    let closed = observed.scrape();
    for (state, value) in [("closed", 1.0), ("open", 0.0), ("half_open", 0.0)] {
        assert_eq!(closed.value(&breaker_state(state)), Some(value), "{state}");
    }
    assert_eq!(
        closed.value(&breaker_transitions("open")),
        Some(1.0 + FAILED_PROBES as f64)
    );
    assert_eq!(
        closed.value(&breaker_transitions("half_open")),
        Some(FAILED_PROBES as f64 + 1.0)
    );
    assert_eq!(closed.value(&breaker_transitions("closed")), Some(1.0));
    assert_eq!(
        sum_of(&closed, UPSTREAM_REQUESTS),
        f64::from(requests_made) + 6.0
    );
}

#[tokio::test]
async fn functional_errors_never_open_the_breaker() {
    let upstream = FakeUpstream::start().await;
    upstream.respond(Scripted::code("ALREADY_CLOSED"));
    let observed = Observed::start(
        &upstream.url(),
        UpstreamOptions {
            breaker: BreakerArgs {
                upstream_breaker_failures: 2,
                upstream_breaker_gateway_errors: 2,
                ..BreakerArgs::default()
            },
            ..no_proxy()
        },
    )
    .await;
    let mut client = observed.client();

    for n in 0..10 {
        let call = timed_close(&mut client).await;
        let status = call.status();
        assert_ne!(status.code(), Code::Unavailable, "call {n}: {status:?}");
        let info = error_info(status);
        assert_eq!(info.reason, "ALREADY_CLOSED", "call {n}: {status:?}");
        assert_eq!(info.domain, UPSTREAM_DOMAIN);
        assert_eq!(info.metadata["attempts"], "1");
        assert!(!info.metadata.contains_key("breaker"), "{status:?}");
    }

    assert_eq!(
        upstream.requests().len(),
        10,
        "every call reached the upstream"
    );
    let scrape = observed.scrape();
    assert_eq!(scrape.value(&breaker_state("closed")), Some(1.0));
    assert_eq!(
        sum_of(&scrape, "gormic_gateway_upstream_breaker_transitions_total"),
        0.0
    );
}

// ---- the binary ------------------------------------------------------------------

/// The breaker's transition lines: `(level, message)` of each.
fn breaker_lines(stderr: &[String]) -> Vec<(String, String)> {
    stderr
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| {
            let message = line["message"].as_str()?.to_owned();
            message.starts_with("upstream circuit breaker ").then(|| {
                (
                    line["level"].as_str().unwrap_or_default().to_owned(),
                    message,
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn the_binary_logs_each_breaker_transition_once_counts_it_in_metrics_and_stays_ready() {
    const FAILED_PROBES: usize = 2;
    let reserved = FakeUpstream::reserve();
    let url = reserved.url();
    let serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--upstream",
        &url,
        "--max-attempts",
        "1",
        "--upstream-breaker-failures",
        "2",
        "--upstream-breaker-backoff",
        "100ms",
        "--upstream-breaker-max-backoff",
        "200ms",
    ])
    .await;
    let admin = serving.admin_addr();
    let mut client = client_of(&serving).await;

    // Two refused calls open it; then probes fail until the upstream listens.
    let mut tried = 0;
    within("two refused calls and the failed probes", PATIENCE, async {
        while tried < 2 + FAILED_PROBES {
            let call = timed_close(&mut client).await;
            match unreachable(call.status()) {
                Unreachable::Tried { detail, .. } => {
                    assert!(detail.contains("refused"), "{detail}");
                    tried += 1;
                }
                Unreachable::BreakerOpen { .. } => tokio::time::sleep(PACE).await,
            }
        }
    })
    .await;
    let open = scrape(admin).await;
    assert_eq!(open.value(&breaker_state("open")), Some(1.0));
    assert_eq!(
        get(admin, "/readyz").await.status,
        200,
        "readiness does not follow the breaker"
    );

    let upstream = reserved.start().await;
    upstream.respond(Scripted::ok(closed()));
    until_a_probe_goes_through(&mut client).await;
    let closed = scrape(admin).await;
    let transitions = |to: &str| closed.value(&breaker_transitions(to)).unwrap_or(0.0) as usize;
    assert_eq!(closed.value(&breaker_state("closed")), Some(1.0));
    assert_eq!(
        (
            transitions("open"),
            transitions("half_open"),
            transitions("closed")
        ),
        (1 + FAILED_PROBES, FAILED_PROBES + 1, 1)
    );
    let (status, stderr) = serving.terminate().await;
    assert_eq!(status.code(), Some(0), "{stderr:#?}");
    let lines = breaker_lines(&stderr);
    let count = |level: &str, start: &str| {
        lines
            .iter()
            .filter(|(l, m)| l == level && m.starts_with(start))
            .count()
    };
    assert_eq!(
        count("WARN", "upstream circuit breaker open: 2 consecutive calls"),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        count("WARN", "upstream circuit breaker probe failed: open again"),
        FAILED_PROBES,
        "{lines:#?}"
    );
    assert_eq!(
        count("INFO", "upstream circuit breaker half-open"),
        FAILED_PROBES + 1,
        "{lines:#?}"
    );
    assert_eq!(
        count("INFO", "upstream circuit breaker closed"),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        lines.len(),
        transitions("open") + transitions("half_open") + transitions("closed"),
        "one line per transition, no other: {lines:#?}"
    );
}
