//! The cooldowns shared by the replicas through the store's publish and
//! subscribe (`crate::store::pubsub`): the replica that opens or lengthens
//! a cooldown publishes the credential's id and the time left on
//! [`CHANNEL`]; every replica runs one subscriber task that applies what
//! the others publish (its own messages come back to it and are skipped).
//!
//! - The time *left* travels, not an end: replicas' clocks need not agree.
//!   A cooldown heard ends later than the publisher's by the time the
//!   message took (one Redis hop, about a millisecond), never earlier.
//! - Propagation: a publish is sent as the answer is read (in a task of
//!   its own, so the call does not wait), bounded by
//!   `--idempotency-store-timeout`; Redis pushes it to every subscriber at
//!   once. Calls another replica sent before the message arrived still
//!   reach Gormic: at most its calls of that credential in flight then.
//! - Delivery is at most once. While the subscription is down (Redis down,
//!   a failover, a reconnection) messages are lost and not replayed:
//!   cooldowns are kept in no key, being seconds long. Each replica still
//!   opens its own cooldowns from its own 429s, so a replica that missed a
//!   message sends that credential at most one more round of calls.
//!
//! A message is [`LEN`] bytes: a version (1), the sender's random id
//! (8 bytes), the credential id (16 bytes, a hash: no key travels), the
//! milliseconds left (4 bytes, big-endian).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Cooldowns, CredentialId};
use crate::runtime::AbortOnDrop;
use crate::store::{Event, Store, Subscription};

/// The channel every replica publishes its cooldowns on.
pub(super) const CHANNEL: &str = "gormic:upstream-cooldowns:v1";

const VERSION: u8 = 1;
/// Version, sender, credential id, milliseconds left.
pub(super) const LEN: usize = 1 + 8 + 16 + 4;

/// This replica's side of the channel: the store to publish through, its
/// id, and its subscriber task (stopped with it).
pub(super) struct Broadcast {
    store: Store,
    /// Random per process: tells this replica's messages from the others'.
    sender: u64,
    _subscriber: AbortOnDrop,
}

impl Broadcast {
    /// Subscribes and starts the task that applies the other replicas'
    /// cooldowns to `cooldowns` (it ends with them). Inside the runtime.
    pub(super) fn start(store: &Store, cooldowns: &Arc<Cooldowns>) -> Self {
        let sender = fastrand::u64(..);
        let subscription = store.subscribe(CHANNEL);
        let task = tokio::spawn(listen(subscription, Arc::downgrade(cooldowns), sender));
        Self {
            store: store.clone(),
            sender,
            _subscriber: AbortOnDrop(task.abort_handle()),
        }
    }

    /// Tells the other replicas that `id` cools down for `left`; in a task
    /// of its own, counted in `cooldowns`' totals.
    pub(super) fn publish(&self, id: CredentialId, left: Duration, cooldowns: Arc<Cooldowns>) {
        let message = encode(self.sender, id, left);
        let store = self.store.clone();
        tokio::spawn(async move {
            let counts = &cooldowns.counts;
            match store.publish(CHANNEL, &message).await {
                Ok(_) => counts.published.fetch_add(1, Ordering::Relaxed),
                Err(failure) => {
                    tracing::debug!(%failure, "upstream cooldown not published to the other replicas");
                    counts.publish_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
    }
}

/// The subscriber task: applies every other replica's message until the
/// cooldowns or the store are gone.
async fn listen(mut subscription: Subscription, cooldowns: Weak<Cooldowns>, me: u64) {
    while let Some(event) = subscription.next().await {
        let Some(cooldowns) = cooldowns.upgrade() else {
            return;
        };
        let counts = &cooldowns.counts;
        match event {
            Event::Message(bytes) => match decode(&bytes) {
                Some(message) if message.sender == me => {}
                Some(message) => {
                    counts.received.fetch_add(1, Ordering::Relaxed);
                    cooldowns.heard(message.id, message.left);
                }
                None => {
                    counts.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        bytes = bytes.len(),
                        "an upstream cooldown message this replica cannot read (another version?)"
                    );
                }
            },
            Event::Gap => {
                counts.gaps.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "subscribed to the upstream cooldowns: those published before are not known"
                );
            }
        }
    }
}

/// One message, read.
#[derive(Debug, PartialEq, Eq)]
struct Message {
    sender: u64,
    id: CredentialId,
    left: Duration,
}

fn encode(sender: u64, id: CredentialId, left: Duration) -> [u8; LEN] {
    let millis = u32::try_from(left.as_millis()).unwrap_or(u32::MAX);
    let mut message = [0; LEN];
    message[0] = VERSION;
    message[1..9].copy_from_slice(&sender.to_be_bytes());
    message[9..25].copy_from_slice(&id.0);
    message[25..].copy_from_slice(&millis.to_be_bytes());
    message
}

/// `None` for anything but a message of [`VERSION`].
fn decode(bytes: &[u8]) -> Option<Message> {
    let bytes: &[u8; LEN] = bytes.try_into().ok()?;
    if bytes[0] != VERSION {
        return None;
    }
    let sender = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
    let id = CredentialId(bytes[9..25].try_into().ok()?);
    let millis = u32::from_be_bytes(bytes[25..].try_into().ok()?);
    Some(Message {
        sender,
        id,
        left: Duration::from_millis(u64::from(millis)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_as_written() {
        let id = CredentialId([7; 16]);
        let bytes = encode(42, id, Duration::from_millis(2_500));
        assert_eq!(bytes.len(), LEN);
        assert_eq!(
            decode(&bytes),
            Some(Message {
                sender: 42,
                id,
                left: Duration::from_millis(2_500)
            })
        );
        let huge = encode(1, id, Duration::from_secs(u64::MAX));
        assert_eq!(
            decode(&huge).map(|m| m.left),
            Some(Duration::from_millis(u64::from(u32::MAX))),
            "saturated, not wrapped"
        );
    }

    #[test]
    fn anything_else_is_not_a_message() {
        let bytes = encode(42, CredentialId([7; 16]), Duration::from_secs(1));
        assert_eq!(decode(&bytes[..LEN - 1]), None);
        assert_eq!(decode(&[bytes.as_slice(), &[0]].concat()), None);
        let mut other_version = bytes;
        other_version[0] = 2;
        assert_eq!(decode(&other_version), None);
        assert_eq!(decode(b""), None);
    }
}
