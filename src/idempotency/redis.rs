//! The shared store (`--idempotency-store redis://…`): records in Redis or
//! Valkey, so a retry landing on another replica finds the first call's
//! record. Every operation is one atomic script (a key is taken with
//! `SET NX PX` inside it; a verdict compares the owner's exact value before
//! it sets or deletes), sent by EVALSHA with a fallback to loading the script,
//! and bounded by `--idempotency-store-timeout`.
//!
//! Keys are `gormic:idem:v1:<64 hex digits of the scope hash>`; values are
//! the records of [`super::record`]. Nothing in Redis names an organization,
//! an api-key or an idempotency key.
//!
//! Set-up expected of the server (documented for operators):
//! - `maxmemory-policy noeviction`: when full, Redis refuses writes and the
//!   gateway answers RESOURCE_EXHAUSTED (`IDEMPOTENCY_STORE_FULL`) to new
//!   keys. An evicting policy would silently forget live records, and a
//!   retry could then act twice. Verdicts that find Redis full leave the
//!   record in progress; it turns "outcome unknown" when its lease ends.
//! - Persistence (`appendonly yes`) or a replica, if losing records on a
//!   restart is not acceptable: a record lost with its server lets a retry
//!   of that key act again.
//! - One primary (no Redis Cluster); ACL user with `GET SET DEL PTTL EVALSHA
//!   EVAL SCRIPT` on `gormic:idem:*` keys.
//!
//! The connection: one multiplexed connection per store through
//! [`ConnectionManager`], which reconnects after errors. It is created
//! without connecting, so the gateway starts while Redis is down; its
//! background tasks run on the runtime of the call that needed them.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};

use super::args::RedisUrl;
use super::lease::{Claim, Pending, Recorded};
use super::record::{self, IN_PROGRESS_LEN, Record};
use super::{Begin, ConfigError, Digest, Lease, MAX_LEASE, Scope, StoreError};

/// Versioned so that a future layout never reads these records by mistake.
pub const KEY_PREFIX: &str = "gormic:idem:v1:";
pub(crate) type RedisKey = [u8; KEY_PREFIX.len() + 64];

/// Takes a new key or reports the existing record and its remaining life.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        // Reads first: a Redis out of memory refuses any SET, even one that
        // NX would turn into a no-op, and a repeat must still replay then.
        r"-- KEYS[1] record; ARGV[1] in-progress record; ARGV[2] its time to live (ms)
local stored = redis.call('GET', KEYS[1])
if stored then
  return {stored, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return redis.error_reply('record appeared during an atomic script')",
    )
});

/// Replaces the record if it is still exactly what this lease wrote.
static REPLACE_IF_HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS[1] record; ARGV[1] the lease's record; ARGV[2] new record; ARGV[3] its time to live (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0",
    )
});

/// Deletes the record if it is still exactly what this lease wrote.
static DELETE_IF_HELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS[1] record; ARGV[1] the lease's record
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

pub(crate) struct RedisStore {
    connection: ConnectionManager,
    timeout: Duration,
    ttl_ms: u64,
    /// The URL without its password, to name the store in errors.
    target: String,
    /// The password as written and percent-decoded: scrubbed from error
    /// texts, should a client error ever quote it.
    secrets: Vec<String>,
    token_seed: [u8; 8],
    token_counter: AtomicU64,
}

impl RedisStore {
    pub(crate) fn new(
        url: &RedisUrl,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let target = url.redacted().to_owned();
        let mut secrets = Vec::new();
        if let Some(password) = url::Url::parse(url.expose())
            .ok()
            .and_then(|u| u.password().map(str::to_owned))
        {
            let decoded = percent_encoding::percent_decode_str(&password)
                .decode_utf8_lossy()
                .into_owned();
            secrets.push(decoded);
            secrets.push(password);
        }
        let refuse = |reason: String| ConfigError::Store {
            store: target.clone(),
            reason: scrub(reason, &secrets),
        };
        if url.is_tls() {
            // The redis crate builds its rustls configuration with the
            // process-wide default provider and cannot be handed one: make it
            // ring (the project's provider). If another default was
            // installed already, that one stays.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url.expose()).map_err(|e| refuse(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // No retry loop inside the manager: a call fails fast while Redis
            // is down (the caller's own retries are the back-off), and the
            // next call starts a fresh connection attempt.
            .set_number_of_retries(0);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| refuse(e.to_string()))?;
        let mut token_seed = [0; 8];
        let mut counter_seed = [0; 8];
        let random = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&random, &mut token_seed)
            .and_then(|()| ring::rand::SecureRandom::fill(&random, &mut counter_seed))
            .map_err(|_| ConfigError::Start("no random source for lease owner tokens".into()))?;
        Ok(Self {
            connection,
            timeout,
            ttl_ms: millis(ttl).max(1),
            target,
            secrets,
            token_seed,
            token_counter: AtomicU64::new(u64::from_be_bytes(counter_seed)),
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) async fn begin(
        self: &Arc<Self>,
        scope: &Scope,
        digest: Digest,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let lease_ms = millis(lease.min(MAX_LEASE));
        let ttl_ms = self.ttl_ms.max(lease_ms);
        let held = record::in_progress(&digest, self.next_token(), lease_ms, ttl_ms);
        let key = redis_key(scope);
        let mut invocation = BEGIN.prepare_invoke();
        invocation.key(&key[..]).arg(&held[..]).arg(ttl_ms);
        let mut connection = self.connection.clone();
        // Until the answer is read, the SET may have happened unseen (the
        // answer lost, or this future cancelled): the guard then undoes it,
        // or the key would read "unknown" for a call that never sent anything.
        let mut undo = UndoBegin {
            store: Some(self.clone()),
            key,
            held,
        };
        let reply = self
            .bounded(invocation.invoke_async::<Value>(&mut connection))
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(failure) => {
                if !failure.may_have_applied {
                    undo.store = None;
                }
                return Err(failure.error);
            }
        };
        undo.store = None;
        match reply {
            Value::Int(1) => Ok(Begin::Proceed(Lease::new(Claim::Redis {
                store: self.clone(),
                key,
                held,
                digest,
            }))),
            Value::Array(items) => match <[Value; 2]>::try_from(items) {
                Ok([Value::BulkString(stored), Value::Int(pttl)]) => {
                    self.classify(Bytes::from(stored), pttl, &digest)
                }
                _ => Err(self.unexpected("begin")),
            },
            _ => Err(self.unexpected("begin")),
        }
    }

    fn classify(&self, stored: Bytes, pttl: i64, digest: &Digest) -> Result<Begin, StoreError> {
        let (stored_digest, stored) = record::decode(stored).map_err(|reason| {
            StoreError::Unavailable(format!("{}: unreadable record: {reason}", self.target))
        })?;
        if stored_digest != *digest {
            return Ok(Begin::Mismatch);
        }
        Ok(match stored {
            Record::Done(outcome) => Begin::Replay(outcome),
            Record::Unknown => Begin::OutcomeUnknown,
            Record::InProgress { lease_ms, ttl_ms } => {
                // The lease's age by Redis's clock: the record's time to live
                // when written minus what is left of it.
                let Ok(left) = u64::try_from(pttl) else {
                    // No expiry (someone else wrote it): never "free".
                    return Ok(Begin::OutcomeUnknown);
                };
                let age = ttl_ms.saturating_sub(left);
                match lease_ms.checked_sub(age).filter(|rest| *rest > 0) {
                    Some(rest) => Begin::InProgress {
                        retry_after: Duration::from_millis(rest),
                    },
                    None => Begin::OutcomeUnknown,
                }
            }
        })
    }

    pub(crate) async fn finish(
        &self,
        key: &RedisKey,
        held: &[u8; IN_PROGRESS_LEN],
        digest: &Digest,
        pending: &Pending,
    ) -> Result<Recorded, StoreError> {
        let replacement: Vec<u8> = match pending {
            Pending::Release => return self.delete_if_held(key, held).await,
            Pending::Unknown => record::unknown(digest).to_vec(),
            Pending::Complete(outcome) => record::outcome(digest, outcome),
        };
        let mut invocation = REPLACE_IF_HELD.prepare_invoke();
        invocation
            .key(&key[..])
            .arg(&held[..])
            .arg(replacement)
            .arg(self.ttl_ms);
        let mut connection = self.connection.clone();
        let reply = self
            .bounded(invocation.invoke_async::<Value>(&mut connection))
            .await
            .map_err(|failure| failure.error)?;
        self.owned(reply, "verdict")
    }

    async fn delete_if_held(
        &self,
        key: &RedisKey,
        held: &[u8; IN_PROGRESS_LEN],
    ) -> Result<Recorded, StoreError> {
        let mut invocation = DELETE_IF_HELD.prepare_invoke();
        invocation.key(&key[..]).arg(&held[..]);
        let mut connection = self.connection.clone();
        let reply = self
            .bounded(invocation.invoke_async::<Value>(&mut connection))
            .await
            .map_err(|failure| failure.error)?;
        self.owned(reply, "release")
    }

    /// A lease dropped without a verdict, or whose verdict was cancelled:
    /// carried out by a task, since `Drop` must not wait.
    pub(crate) fn finish_detached(
        store: Arc<Self>,
        key: RedisKey,
        held: [u8; IN_PROGRESS_LEN],
        digest: Digest,
        pending: Pending,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "idempotency: lease dropped outside the runtime; \
                 its record reads outcome unknown once the lease ends"
            );
            return;
        };
        runtime.spawn(async move {
            if let Err(error) = store.finish(&key, &held, &digest, &pending).await {
                tracing::warn!(%error, "idempotency: could not record the verdict of a dropped lease; \
                     its record reads outcome unknown once the lease ends");
            }
        });
    }

    fn owned(&self, reply: Value, what: &str) -> Result<Recorded, StoreError> {
        match reply {
            Value::Int(1) => Ok(Recorded::Done),
            Value::Int(0) => Ok(Recorded::NotOwner),
            _ => Err(self.unexpected(what)),
        }
    }

    /// Runs one store operation within the store timeout.
    async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.failure(&error)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Failure {
        Failure {
            error: StoreError::Unavailable(format!(
                "{}: no answer within {}",
                self.target,
                humantime::format_duration(self.timeout)
            )),
            may_have_applied: true,
        }
    }

    fn failure(&self, error: &RedisError) -> Failure {
        if error.is_timeout() {
            // The client's own timeouts are set to ours.
            return self.timed_out();
        }
        let text = error.to_string();
        // Under `noeviction`, Redis refuses writes with an OOM error; inside
        // a script it may come wrapped in a script error.
        if error.code() == Some("OOM") || text.contains("OOM command not allowed") {
            return Failure {
                error: StoreError::Full,
                may_have_applied: false,
            };
        }
        Failure {
            error: StoreError::Unavailable(format!(
                "{}: {}",
                self.target,
                scrub(text, &self.secrets)
            )),
            // A refused connection or an error reply means the script did not
            // run to a write that went unreported.
            may_have_applied: !(error.is_connection_refusal()
                || matches!(error.kind(), redis::ErrorKind::Server(_))),
        }
    }

    fn unexpected(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!("{}: unexpected reply to {what}", self.target))
    }

    /// Unique across replicas: 8 random bytes per process, then a counter.
    fn next_token(&self) -> [u8; 16] {
        let mut token = [0; 16];
        token[..8].copy_from_slice(&self.token_seed);
        token[8..].copy_from_slice(&self.token_counter.fetch_add(1, Relaxed).to_be_bytes());
        token
    }
}

/// Deletes a possibly written in-progress record when dropped armed.
struct UndoBegin {
    store: Option<Arc<RedisStore>>,
    key: RedisKey,
    held: [u8; IN_PROGRESS_LEN],
}

impl Drop for UndoBegin {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (key, held) = (self.key, self.held);
            // Best effort: if it fails too, the record reads "outcome
            // unknown" when its lease ends, which is safe.
            runtime.spawn(async move {
                let _ = store.delete_if_held(&key, &held).await;
            });
        }
    }
}

struct Failure {
    error: StoreError,
    /// Whether the operation may have taken effect with its answer lost.
    may_have_applied: bool,
}

fn redis_key(scope: &Scope) -> RedisKey {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut key = [0; KEY_PREFIX.len() + 64];
    key[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
    for (i, b) in scope.0.iter().enumerate() {
        key[KEY_PREFIX.len() + 2 * i] = DIGITS[usize::from(b >> 4)];
        key[KEY_PREFIX.len() + 2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    key
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn scrub(mut text: String, secrets: &[String]) -> String {
    for secret in secrets {
        if !secret.is_empty() && text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "***");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_hex_of_the_scope() {
        let scope = Scope([0xab; 32]);
        let key = redis_key(&scope);
        let key = std::str::from_utf8(&key).unwrap();
        assert_eq!(key, format!("gormic:idem:v1:{}", "ab".repeat(32)));
        assert_eq!(&key[KEY_PREFIX.len()..], scope.to_hex());
    }

    #[test]
    fn scrub_hides_the_password() {
        let secrets = ["p w".to_owned(), "p%20w".to_owned()];
        assert_eq!(scrub("auth p w, p%20w".into(), &secrets), "auth ***, ***");
        assert_eq!(scrub("x".into(), &[String::new()]), "x");
    }
}
