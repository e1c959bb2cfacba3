//! The quota step's cost per call on this replica's buckets
//! (`cargo bench --bench quota`): an organization with an entry of its own,
//! organizations under `[default]` (a SipHash and a shard lock more), and a
//! caller with an entry plus its organization (two buckets). The limits are
//! far above what the loop can reach, so every call passes: the common
//! case. The Redis path is one round trip per bucket, measured end to end
//! by `scripts/bench`.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::time::Instant;

use gormic_gateway::quota::{Limit, QuotaTable, Quotas, Rule, Rules, StoreFailure};
use gormic_gateway::routes;
use gormic_gateway::tls::CallerIdentity;

/// A limit no loop reaches: one call a nanosecond, a burst of a million.
const UNREACHED: Limit = Limit {
    calls_per_second: 1e9,
    burst: 1_000_000,
};

fn rule() -> Rule {
    Rule {
        limit: UNREACHED,
        rpc: [None; routes::ALL.len()],
    }
}

/// The local path never waits: one poll gives its answer.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a local quota check waited"),
    }
}

fn quota_check(c: &mut Criterion) {
    let mut rules = Rules {
        default: Some(rule()),
        ..Rules::default()
    };
    rules
        .organizations
        .insert(Box::from(&b"org-listed"[..]), rule());
    rules.callers.insert(
        Box::from(&b"spiffe://prod.example/ns/batch/sa/job"[..]),
        rule(),
    );
    let quotas = Quotas::new(QuotaTable::from_rules(&rules), None, StoreFailure::Local);
    let route = &routes::CLOSE_INVOICE;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let caller = CallerIdentity::new("spiffe://prod.example/ns/batch/sa/job");

    // The floor: governor reads the clock once per bucket.
    c.bench_function("quota: clock read alone (baseline)", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    c.bench_function("quota: listed organization", |b| {
        b.iter(|| now(quotas.check(route, None, black_box(b"org-listed"), deadline)))
    });
    let organizations: Vec<String> = (0..10_000).map(|i| format!("org-{i:05}")).collect();
    let mut next = organizations.iter().cycle();
    c.bench_function("quota: [default] among 10,000 organizations", |b| {
        b.iter(|| {
            let organization = next.next().map_or(&b""[..], |o| o.as_bytes());
            now(quotas.check(route, None, black_box(organization), deadline))
        })
    });
    c.bench_function("quota: caller and listed organization", |b| {
        b.iter(|| {
            now(quotas.check(
                route,
                Some(black_box(&caller)),
                black_box(b"org-listed"),
                deadline,
            ))
        })
    });
}

criterion_group!(benches, quota_check);
criterion_main!(benches);
