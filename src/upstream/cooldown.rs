//! The upstream's rate limit honoured: a `429`, or a `503` with
//! `Retry-After`, opens a cooldown for the call's credential (its api-key
//! and organization-id). Until it ends, calls with that credential fail at
//! once, unsent ([`UpstreamError::RateLimited`](super::UpstreamError)),
//! before the breaker and before a slot (`super::exchange`), and no gateway
//! retry lands inside it. Other credentials are untouched.
//!
//! - **How long**: the `Retry-After` when it states a wait (delay-seconds,
//!   or an HTTP-date in the future); otherwise [`DEFAULT_COOLDOWN`] (no
//!   header, an unreadable one, `0`, or a date already past: clocks apart,
//!   most likely); never more than `--upstream-cooldown-max`, so that a
//!   broken header cannot lock a key out for a day. `0s` turns cooldowns
//!   off. The answer that opened it tells its caller the same length
//!   (`Rejection::cooldown`), so that no caller retries into a refusal.
//! - **Keyed** by a [`CredentialId`]: a truncated SHA-256 of the api-key
//!   and the organization-id, the same on every replica, never the key.
//! - **Cost**: while no cooldown is live, a call pays one atomic load; the
//!   credential is hashed (once per exchange, [`CallCredential`]) and the
//!   table locked only while one is.
//! - **Bounded**: at most [`CAPACITY`] credentials; an ended entry goes
//!   when it is next met, and all of them at once when the last has ended;
//!   past the bound, the soonest-ending entry gives way.
//! - **Shared** by the replicas through the store (`broadcast`): the
//!   replica that opens or lengthens a cooldown publishes it, every replica
//!   applies what it hears.
//! - **Seen** through `metrics` (live cooldowns, opened by source, the
//!   messages) and one log line per cooldown opened by an answer to this
//!   replica (the organization-id and the length, never the api-key); the
//!   refusals are `gormic_gateway_calls_shed_total{reason="upstream_rate_limited"}`.

mod broadcast;
mod metrics;

use std::cell::OnceCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub(super) use metrics::CooldownSeries;

use super::error::{Rejection, RetryAfter};
use crate::credentials::Credentials;
use crate::store::Store;

/// The cooldown of an answer that states no wait: long enough that the
/// calls right behind a 429 are not sent into it, short enough that a
/// limit counted per second has passed.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// Default of `--upstream-cooldown-max` (justified there).
pub const DEFAULT_COOLDOWN_MAX: Duration = Duration::from_secs(60);

/// Largest `--upstream-cooldown-max`: a longer refusal is a lockout, not a
/// cooldown.
pub const MAX_COOLDOWN_MAX: Duration = Duration::from_secs(3600);

/// Credentials cooling down at once, at most: 10,000 entries of ~50 bytes
/// (a few hundred KiB), far more than the keys one gateway serves.
pub const CAPACITY: usize = 10_000;

/// Domain of the credential hash, so that it matches no other SHA-256 of
/// the same bytes (an idempotency scope, say).
const ID_DOMAIN: &[u8] = b"gormic-gateway upstream cooldown v1\0";

/// A credential as the cooldowns know it: the first 16 bytes of the
/// SHA-256 of its api-key and organization-id. Replicas compute the same;
/// the key cannot be read back from it. Not keyed (every replica must
/// compute the same), so callers could grind api-keys whose ids collide in
/// a few bits: the table hashes it again with the standard library's
/// per-process random keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct CredentialId([u8; 16]);

/// The cooldowns' table: an end per credential.
type Table = HashMap<CredentialId, Instant>;

/// A call's credential, as the cooldowns look it up: its [`Credentials`]
/// and their [`CredentialId`].
pub(super) trait Credential {
    fn credentials(&self) -> &Credentials;
    fn id(&self) -> CredentialId;
}

/// The credential of one exchange: hashed when a cooldown first needs its
/// id, once for all the exchange's look-ups.
pub(super) struct CallCredential<'a> {
    credentials: &'a Credentials,
    id: OnceCell<CredentialId>,
}

impl<'a> CallCredential<'a> {
    pub(super) fn new(credentials: &'a Credentials) -> Self {
        Self {
            credentials,
            id: OnceCell::new(),
        }
    }
}

impl Credential for CallCredential<'_> {
    fn credentials(&self) -> &Credentials {
        self.credentials
    }

    fn id(&self) -> CredentialId {
        *self.id.get_or_init(|| CredentialId::of(self.credentials))
    }
}

/// Hashed at each look-up (tests).
#[cfg(test)]
impl Credential for Credentials {
    fn credentials(&self) -> &Credentials {
        self
    }

    fn id(&self) -> CredentialId {
        CredentialId::of(self)
    }
}

impl CredentialId {
    pub(super) fn of(credentials: &Credentials) -> Self {
        let key = credentials.api_key.as_bytes();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(ID_DOMAIN);
        // The key's length first: (key, organization) pairs never collide
        // by moving bytes from one to the other.
        digest.update(&(key.len() as u64).to_be_bytes());
        digest.update(key);
        digest.update(credentials.organization_id.as_bytes());
        let mut id = [0; 16];
        id.copy_from_slice(&digest.finish().as_ref()[..16]);
        Self(id)
    }
}

/// Whether `rejection` opens a cooldown: a 429, or a 503 that says when
/// to come back.
pub(super) fn opened_by(rejection: &Rejection) -> bool {
    rejection.http_status == 429
        || (rejection.http_status == 503 && rejection.retry_after.is_some())
}

/// What a cooldown opened or heard did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The credential had no live cooldown.
    Opened,
    /// Its cooldown now ends later.
    Lengthened,
    /// Its cooldown already ended as late or later (or the table kept
    /// longer ones).
    Unchanged,
}

/// Running totals, read at scrape time (`metrics`).
#[derive(Debug, Default)]
struct Counts {
    /// Cooldowns opened by an answer to this replica.
    opened_here: AtomicU64,
    /// Cooldowns opened by another replica's message.
    opened_by_replica: AtomicU64,
    published: AtomicU64,
    publish_failed: AtomicU64,
    /// Messages of other replicas.
    received: AtomicU64,
    malformed: AtomicU64,
    /// Times the subscription was (re)made: messages may have been missed.
    gaps: AtomicU64,
}

/// The cooldowns of one gateway; shared by every clone of its upstream.
pub(super) struct Cooldowns {
    /// `--upstream-cooldown-max`; zero: cooldowns off.
    max: Duration,
    capacity: usize,
    /// Entries in `table`. Zero, the usual case, is all a call reads.
    live: AtomicUsize,
    /// When the latest entry ends, in milliseconds from `epoch` (rounded
    /// up): from then on every entry has ended.
    latest_end_ms: AtomicU64,
    epoch: Instant,
    /// When each credential's cooldown ends. `live` and `latest_end_ms` are
    /// written with it locked.
    table: Mutex<Table>,
    counts: Counts,
    /// The store the replicas share, once wired (`Cooldowns::share`).
    broadcast: OnceLock<broadcast::Broadcast>,
}

impl std::fmt::Debug for Cooldowns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cooldowns")
            .field("max", &self.max)
            .field("live", &self.live.load(Ordering::Relaxed))
            .field("shared", &self.broadcast.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Cooldowns {
    /// Cooldowns of at most `max` (zero: none).
    pub(super) fn new(max: Duration) -> Arc<Self> {
        Self::with_capacity(max, CAPACITY)
    }

    fn with_capacity(max: Duration, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            capacity: capacity.max(1),
            live: AtomicUsize::new(0),
            latest_end_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
            counts: Counts::default(),
            broadcast: OnceLock::new(),
        })
    }

    /// What is left of `credential`'s cooldown, if one is running: one
    /// atomic load while none is.
    #[inline]
    pub(super) fn left(&self, credential: &impl Credential) -> Option<Duration> {
        if self.live.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.left_in_table(credential)
    }

    #[cold]
    fn left_in_table(&self, credential: &impl Credential) -> Option<Duration> {
        let now = Instant::now();
        if self.millis(now) >= self.latest_end_ms.load(Ordering::Relaxed) {
            // Every cooldown has ended: empty the table, so that the calls
            // after this one cost one load again.
            self.sweep(now);
            return None;
        }
        let id = credential.id();
        let mut table = self.lock();
        let end = *table.get(&id)?;
        if end > now {
            return Some(round_up_to_millis(end - now));
        }
        table.remove(&id);
        self.live.store(table.len(), Ordering::Relaxed);
        None
    }

    /// The cooldown an answer asks for (module comment: the stated wait or
    /// the default, capped).
    pub(super) fn length(&self, retry_after: Option<&RetryAfter>) -> Duration {
        let stated = match retry_after {
            Some(RetryAfter::Delay(delay)) if !delay.is_zero() => *delay,
            _ => DEFAULT_COOLDOWN,
        };
        stated.min(self.max)
    }

    /// `rejection`, an answer to a call with `credential`, opens or
    /// lengthens their cooldown when it is a 429 or a 503 with
    /// `Retry-After` (and cooldowns are on); returns what is left of it (a
    /// longer cooldown opened by another answer stays).
    pub(super) fn answered(
        self: &Arc<Self>,
        credential: &impl Credential,
        rejection: &Rejection,
    ) -> Option<Duration> {
        if self.max.is_zero() || !opened_by(rejection) {
            return None;
        }
        let length = self.length(rejection.retry_after.as_ref());
        let id = credential.id();
        let now = Instant::now();
        let (change, end) = self.extend(id, now + length);
        if change == Change::Opened {
            self.counts.opened_here.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                organization = credential
                    .credentials()
                    .organization_id
                    .to_str()
                    .unwrap_or("(not ASCII)"),
                http_status = rejection.http_status,
                cooldown_ms = length.as_millis() as u64,
                "upstream rate limit: calls with this organization's api-key are refused \
                 unsent until the cooldown ends"
            );
        }
        if change != Change::Unchanged
            && let Some(broadcast) = self.broadcast.get()
        {
            broadcast.publish(id, length, self.clone());
        }
        Some(round_up_to_millis(end.saturating_duration_since(now)))
    }

    /// Another replica opened or lengthened a cooldown of `left`.
    fn heard(&self, id: CredentialId, left: Duration) {
        if self.max.is_zero() {
            return;
        }
        let left = left.min(self.max);
        if self.extend(id, Instant::now() + left).0 == Change::Opened {
            self.counts
                .opened_by_replica
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                cooldown_ms = left.as_millis() as u64,
                "upstream rate limit: another replica opened a cooldown"
            );
        }
    }

    /// Shares the cooldowns with every replica using `store`: publishes
    /// those opened here, applies those heard. Once; later calls do nothing.
    pub(super) fn share(self: &Arc<Self>, store: &Store) {
        if self.max.is_zero() {
            return;
        }
        let _ = self
            .broadcast
            .get_or_init(|| broadcast::Broadcast::start(store, self));
    }

    /// Makes `id`'s cooldown end at `end` unless it ends later already;
    /// what changed, and when it ends now.
    fn extend(&self, id: CredentialId, end: Instant) -> (Change, Instant) {
        let now = Instant::now();
        let mut table = self.lock();
        let change = match table.get_mut(&id) {
            Some(current) if *current > now => {
                if end <= *current {
                    return (Change::Unchanged, *current);
                }
                *current = end;
                Change::Lengthened
            }
            Some(current) => {
                *current = end;
                Change::Opened
            }
            None => {
                if table.len() >= self.capacity && !self.make_room(&mut table, end, now) {
                    return (Change::Unchanged, end);
                }
                table.insert(id, end);
                Change::Opened
            }
        };
        self.live.store(table.len(), Ordering::Relaxed);
        self.latest_end_ms
            .fetch_max(self.millis_up(end), Ordering::Relaxed);
        (change, end)
    }

    /// Frees a place for an entry ending at `end` in a full table: drops
    /// the ended entries, else the one ending soonest, unless `end` is
    /// sooner still (then `false`: the new one is what gives way).
    fn make_room(&self, table: &mut Table, end: Instant, now: Instant) -> bool {
        table.retain(|_, ends| *ends > now);
        if table.len() < self.capacity {
            return true;
        }
        let Some((&soonest, &ends)) = table.iter().min_by_key(|(_, ends)| **ends) else {
            return true;
        };
        if end <= ends {
            return false;
        }
        table.remove(&soonest);
        true
    }

    /// Drops every ended entry.
    fn sweep(&self, now: Instant) {
        let mut table = self.lock();
        table.retain(|_, ends| *ends > now);
        self.live.store(table.len(), Ordering::Relaxed);
        let latest = table.values().max().map_or(0, |end| self.millis_up(*end));
        self.latest_end_ms.store(latest, Ordering::Relaxed);
    }

    /// Cooldowns running now (scraped).
    fn active(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|end| **end > now).count()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn millis_up(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        since.as_nanos().div_ceil(1_000_000) as u64
    }
}

/// RetryInfo in whole milliseconds, never zero while a cooldown runs.
fn round_up_to_millis(left: Duration) -> Duration {
    Duration::from_millis(left.as_nanos().div_ceil(1_000_000) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn credentials(key: &str, organization: &str) -> Credentials {
        Credentials {
            api_key: HeaderValue::from_str(key).unwrap(),
            organization_id: HeaderValue::from_str(organization).unwrap(),
        }
    }

    fn answer(status: u16, retry_after: Option<RetryAfter>) -> Rejection {
        Rejection {
            http_status: status,
            retry_after,
            ..Default::default()
        }
    }

    fn seconds(n: u64) -> Option<RetryAfter> {
        Some(RetryAfter::Delay(Duration::from_secs(n)))
    }

    #[test]
    fn a_credential_is_its_key_and_organization_hashed() {
        let id = CredentialId::of(&credentials("key-1", "org-1"));
        assert_eq!(id, CredentialId::of(&credentials("key-1", "org-1")));
        assert_ne!(id, CredentialId::of(&credentials("key-2", "org-1")));
        assert_ne!(id, CredentialId::of(&credentials("key-1", "org-2")));
        // Bytes moved between the two halves make another credential.
        assert_ne!(
            CredentialId::of(&credentials("ab", "c")),
            CredentialId::of(&credentials("a", "bc"))
        );
        assert!(!format!("{id:?}").contains("key-1"));
    }

    #[test]
    fn the_length_is_the_stated_wait_or_the_default_and_never_past_the_cap() {
        let cooldowns = Cooldowns::new(Duration::from_secs(60));
        assert_eq!(
            cooldowns.length(seconds(3).as_ref()),
            Duration::from_secs(3)
        );
        assert_eq!(
            cooldowns.length(seconds(86_400).as_ref()),
            Duration::from_secs(60)
        );
        assert_eq!(cooldowns.length(None), DEFAULT_COOLDOWN);
        assert_eq!(cooldowns.length(seconds(0).as_ref()), DEFAULT_COOLDOWN);
        let garbage = RetryAfter::Other("soon".into());
        assert_eq!(cooldowns.length(Some(&garbage)), DEFAULT_COOLDOWN);
        let tight = Cooldowns::new(Duration::from_millis(300));
        assert_eq!(tight.length(None), Duration::from_millis(300));
    }

    #[test]
    fn a_429_or_a_503_with_retry_after_opens_one_and_nothing_else_does() {
        assert!(opened_by(&answer(429, None)));
        assert!(opened_by(&answer(429, seconds(2))));
        assert!(opened_by(&answer(503, seconds(2))));
        assert!(opened_by(&answer(503, Some(RetryAfter::Other("x".into())))));
        assert!(!opened_by(&answer(503, None)));
        assert!(!opened_by(&answer(502, seconds(2))));
        assert!(!opened_by(&answer(400, seconds(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_counts_down_for_its_credential_alone_then_ends() {
        let cooldowns = Cooldowns::new(Duration::from_secs(60));
        let limited = credentials("key-1", "org-1");
        assert_eq!(cooldowns.left(&limited), None);
        assert_eq!(
            cooldowns.answered(&limited, &answer(429, seconds(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(cooldowns.left(&limited), Some(Duration::from_secs(3)));
        assert_eq!(cooldowns.left(&credentials("key-2", "org-1")), None);
        assert_eq!(cooldowns.left(&credentials("key-1", "org-2")), None);
        tokio::time::advance(Duration::from_millis(1250)).await;
        assert_eq!(cooldowns.left(&limited), Some(Duration::from_millis(1750)));
        assert_eq!(cooldowns.active(), 1);
        tokio::time::advance(Duration::from_millis(1750)).await;
        assert_eq!(cooldowns.left(&limited), None);
        assert_eq!(cooldowns.active(), 0);
        assert_eq!(
            cooldowns.live.load(Ordering::Relaxed),
            0,
            "the ended table is emptied: the next calls cost one load"
        );
        assert_eq!(cooldowns.counts.opened_here.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_answer_lengthens_a_cooldown_and_an_earlier_one_does_not_shorten_it() {
        let cooldowns = Cooldowns::new(Duration::from_secs(60));
        let limited = credentials("key-1", "org-1");
        cooldowns.answered(&limited, &answer(429, seconds(2)));
        assert_eq!(
            cooldowns.answered(&limited, &answer(429, seconds(1))),
            Some(Duration::from_secs(2)),
            "the caller is told the cooldown that runs"
        );
        assert_eq!(cooldowns.left(&limited), Some(Duration::from_secs(2)));
        cooldowns.answered(&limited, &answer(503, seconds(5)));
        assert_eq!(cooldowns.left(&limited), Some(Duration::from_secs(5)));
        assert_eq!(
            cooldowns.counts.opened_here.load(Ordering::Relaxed),
            1,
            "one cooldown, lengthened"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cooldowns_off_open_nothing_and_hear_nothing() {
        let cooldowns = Cooldowns::new(Duration::ZERO);
        let limited = credentials("key-1", "org-1");
        assert_eq!(cooldowns.answered(&limited, &answer(429, seconds(3))), None);
        cooldowns.heard(CredentialId::of(&limited), Duration::from_secs(3));
        assert_eq!(cooldowns.left(&limited), None);
        assert_eq!(cooldowns.live.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_heard_from_a_replica_is_capped_by_this_replicas_flag() {
        let cooldowns = Cooldowns::new(Duration::from_secs(10));
        let limited = credentials("key-1", "org-1");
        cooldowns.heard(CredentialId::of(&limited), Duration::from_secs(3600));
        assert_eq!(cooldowns.left(&limited), Some(Duration::from_secs(10)));
        assert_eq!(
            cooldowns.counts.opened_by_replica.load(Ordering::Relaxed),
            1
        );
        assert_eq!(cooldowns.counts.opened_here.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_the_soonest_ending_gives_way() {
        let cooldowns = Cooldowns::with_capacity(Duration::from_secs(60), 3);
        let key = |n: u32| credentials(&format!("key-{n}"), "org-1");
        for (n, seconds) in [(1, 10), (2, 5), (3, 20)] {
            cooldowns.heard(CredentialId::of(&key(n)), Duration::from_secs(seconds));
        }
        // Full: the one ending in 5 s gives way to one ending in 15 s.
        cooldowns.heard(CredentialId::of(&key(4)), Duration::from_secs(15));
        assert_eq!(cooldowns.live.load(Ordering::Relaxed), 3);
        assert_eq!(cooldowns.left(&key(2)), None);
        assert!(cooldowns.left(&key(4)).is_some());
        // One ending sooner than all the others is the one left out.
        cooldowns.heard(CredentialId::of(&key(5)), Duration::from_secs(1));
        assert_eq!(cooldowns.left(&key(5)), None);
        assert_eq!(cooldowns.live.load(Ordering::Relaxed), 3);
        // Ended entries make room first.
        tokio::time::advance(Duration::from_secs(12)).await;
        cooldowns.heard(CredentialId::of(&key(6)), Duration::from_secs(1));
        assert!(cooldowns.left(&key(6)).is_some());
        assert_eq!(cooldowns.left(&key(1)), None);
        assert_eq!(cooldowns.active(), 3, "key 3, key 4, key 6");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_entry_met_by_its_credential_leaves_the_table() {
        let cooldowns = Cooldowns::new(Duration::from_secs(60));
        let short = credentials("key-1", "org-1");
        let long = credentials("key-2", "org-1");
        cooldowns.answered(&short, &answer(429, seconds(1)));
        cooldowns.answered(&long, &answer(429, seconds(30)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cooldowns.live.load(Ordering::Relaxed), 2);
        assert_eq!(cooldowns.left(&short), None);
        assert_eq!(cooldowns.live.load(Ordering::Relaxed), 1);
        assert_eq!(cooldowns.left(&long), Some(Duration::from_secs(28)));
    }

    #[test]
    fn retry_info_is_rounded_up_to_the_millisecond() {
        assert_eq!(
            round_up_to_millis(Duration::from_nanos(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            round_up_to_millis(Duration::from_micros(2_500)),
            Duration::from_millis(3)
        );
        assert_eq!(
            round_up_to_millis(Duration::from_millis(7)),
            Duration::from_millis(7)
        );
    }
}
