//! Quotas every replica counts against together, when the gateway has a
//! Redis store (`--idempotency-store redis://…`): the same GCRA as
//! [`super::local`], run by one Lua script per checked bucket, one round
//! trip, on Redis's clock (`TIME`), so that replicas share one clock as
//! well as one TAT.
//!
//! Keys are `gormic:quota:v1:<hex SHA-256 of kind, subject and RPC>`: the
//! same on every replica and in every deployment (one key per script, so
//! no hash tag in a cluster), and no organization id or caller identity in
//! clear. A key expires when its TAT passes, when it would read as a full
//! bucket anyway. TATs are kept in microseconds (Redis's clock's
//! resolution); the GCRA is governor's, decision for decision.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use ring::digest::{Context, SHA256};
use tokio::time::Instant;

use super::file::Limit;
use super::table::Target;
use crate::store::{self, Failure, FailureKind, Script, Store, Wait};

/// Versioned, so that a future layout never reads these keys by mistake.
pub const KEY_PREFIX: &str = "gormic:quota:v1:";
type Key = [u8; KEY_PREFIX.len() + 64];

/// GCRA on one bucket: takes a call or says how long until one passes.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "quota_take",
        // Numbers are doubles in Lua: microseconds since 1970 (about 2^51)
        // are exact; %d writes them without an exponent.
        r"-- KEYS[1] the bucket's TAT (us); ARGV[1] interval (us); ARGV[2] tolerance, interval * (burst - 1) (us)
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local earliest = tat - tolerance
if now < earliest then
  return {0, earliest - now}
end
if tat < now then tat = now end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000))
return {1, 0}",
    )
});

/// What the store decided for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Refused; a call would pass after this long.
    Refused(Duration),
}

/// Takes one call from the bucket's shared TAT, within the store timeout
/// and `deadline`.
pub(super) async fn take(
    store: &Store,
    target: &Target<'_>,
    deadline: Instant,
) -> Result<Decision, Failure> {
    let key = key(target);
    let (interval, tolerance) = micros(target.limit);
    let mut call = TAKE.call(&[&key[..]]);
    call.arg(interval).arg(tolerance);
    let reply = store.run(&call, Wait::None, Some(deadline)).await?;
    decision(&reply.value).ok_or_else(|| Failure {
        kind: FailureKind::Unavailable,
        detail: format!("{}: unexpected reply to the quota script", store.target()),
        may_have_applied: true,
    })
}

/// The bucket's key: a SHA-256 of its kind, subject and RPC, each with
/// its length, so that no two buckets share one.
pub(super) fn key(target: &Target<'_>) -> Key {
    let mut hash = Context::new(&SHA256);
    hash.update(b"gormic-quota-v1\0");
    let rpc = target.rpc.unwrap_or_default();
    for field in [
        target.kind.subject_kind().as_bytes(),
        target.subject,
        rpc.as_bytes(),
    ] {
        hash.update(&(field.len() as u64).to_be_bytes());
        hash.update(field);
    }
    let digest = hash.finish();
    let digest: &[u8; 32] = digest.as_ref().try_into().expect("a SHA-256 is 32 bytes");
    store::prefixed_hex(KEY_PREFIX, digest)
}

/// The interval and the tolerance in microseconds (at least 1 µs between
/// calls).
fn micros(limit: Limit) -> (u64, u64) {
    let interval = u64::try_from(limit.interval().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    (
        interval,
        interval.saturating_mul(u64::from(limit.burst.saturating_sub(1))),
    )
}

fn decision(value: &Value) -> Option<Decision> {
    let Value::Array(fields) = value else {
        return None;
    };
    match fields.as_slice() {
        [Value::Int(1), Value::Int(_)] => Some(Decision::Allowed),
        [Value::Int(0), Value::Int(wait)] => Some(Decision::Refused(Duration::from_micros(
            u64::try_from(*wait).ok()?,
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::{Kind, Local};
    use super::*;
    use crate::quota::local::Bucket;

    fn target<'a>(
        bucket: &'a Bucket,
        kind: Kind,
        subject: &'a [u8],
        rpc: Option<&'static str>,
    ) -> Target<'a> {
        Target {
            kind,
            subject,
            rpc,
            limit: bucket.limit(),
            local: Local::Entry(bucket),
        }
    }

    #[test]
    fn keys_are_the_prefix_and_the_hex_of_kind_subject_and_rpc_the_same_for_defaults() {
        let bucket = Bucket::new(Limit {
            calls_per_second: 1.0,
            burst: 1,
        });
        let org = key(&target(&bucket, Kind::Organization, b"org-1", None));
        let text = std::str::from_utf8(&org).expect("ASCII");
        assert!(text.starts_with("gormic:quota:v1:"), "{text}");
        assert_eq!(text.len(), 16 + 64);
        assert!(
            text[16..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!text.contains("org-1"));
        // A default bucket is the organization's, whatever the file says.
        assert_eq!(org, key(&target(&bucket, Kind::Default, b"org-1", None)));
        let others = [
            key(&target(&bucket, Kind::Caller, b"org-1", None)),
            key(&target(&bucket, Kind::Organization, b"org-2", None)),
            key(&target(
                &bucket,
                Kind::Organization,
                b"org-1",
                Some("CreateInvoice"),
            )),
            key(&target(
                &bucket,
                Kind::Organization,
                b"org-1Create",
                Some("Invoice"),
            )),
        ];
        for other in others {
            assert_ne!(org, other);
        }
        assert_ne!(others[2], others[3], "lengths keep fields apart");
        // Known answer: the same on every replica and every version.
        let mut hash = Context::new(&SHA256);
        hash.update(b"gormic-quota-v1\0");
        for field in [&b"organization"[..], b"org-1", b""] {
            hash.update(&(field.len() as u64).to_be_bytes());
            hash.update(field);
        }
        let hex: String = hash
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&text[16..], hex);
    }

    #[test]
    fn limits_go_to_redis_in_microseconds() {
        let limit = |calls_per_second, burst| Limit {
            calls_per_second,
            burst,
        };
        assert_eq!(micros(limit(20.0, 40)), (50_000, 50_000 * 39));
        assert_eq!(micros(limit(0.5, 1)), (2_000_000, 0));
        assert_eq!(micros(limit(1_000_000.0, 3)), (1, 2));
    }

    #[test]
    fn replies_are_read_strictly() {
        let reply = |a, b| Value::Array(vec![Value::Int(a), Value::Int(b)]);
        assert_eq!(decision(&reply(1, 0)), Some(Decision::Allowed));
        assert_eq!(
            decision(&reply(0, 1500)),
            Some(Decision::Refused(Duration::from_micros(1500)))
        );
        assert_eq!(decision(&reply(0, -1)), None);
        assert_eq!(decision(&reply(2, 0)), None);
        assert_eq!(decision(&Value::Int(1)), None);
        assert_eq!(decision(&Value::Nil), None);
    }
}
