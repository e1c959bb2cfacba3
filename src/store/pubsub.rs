//! Publish and subscribe on the shared store: small messages broadcast to
//! every replica of the gateway (cooldowns, say). One subscriber connection
//! per store, opened with the first subscription, carries every channel:
//! on the primary (it follows a failover), or in a cluster on any node
//! (classic `PUBLISH` reaches every node of a cluster).
//!
//! Delivery is at most once: a message published while the subscription is
//! being re-established (a failover, a broken connection) is lost, and the
//! subscriber is told so with [`Event::Gap`] once its channel is subscribed
//! again (and the first time, for what was published before). Anything a
//! late or gapped subscriber must know belongs in a key as well, read again
//! on a gap.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::link::Shared;

/// Messages kept for a slow subscriber before it is told it missed some.
const CAPACITY: usize = 256;
/// How often the subscriber connection checks its server answers.
const PING: Duration = Duration::from_secs(1);
/// Pause before the subscriber connection is made again.
const RETRY: Duration = Duration::from_millis(200);

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message published on the channel.
    Message(Bytes),
    /// Messages may have been missed (the subscription was made again, or
    /// this subscriber fell behind): re-read whatever state is kept in keys.
    Gap,
}

/// A subscription to one channel; dropping it unsubscribes this receiver
/// (the connection keeps the channel).
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<Event>,
}

impl Subscription {
    /// The next event; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<Event> {
        match self.receiver.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Event::Gap),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// The channels subscribed to, and their receivers.
#[derive(Default)]
pub(super) struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Event>>>,
    added: Notify,
}

impl Hub {
    pub(super) fn subscribe(&self, channel: &str) -> Subscription {
        let receiver = self
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .subscribe();
        self.added.notify_one();
        Subscription { receiver }
    }

    fn deliver(&self, channel: &str, event: Event) {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = channels.get(channel) {
            // No receiver left: nothing to do.
            let _ = sender.send(event);
        }
    }

    fn names(&self) -> Vec<String> {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }
}

/// The subscriber connection, for as long as the store lives (aborted).
pub(super) async fn run(shared: Arc<Shared>, hub: Arc<Hub>) {
    let mut attempt = 0_usize;
    loop {
        let Ok(live) = shared.live(Instant::now() + shared.timeout).await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let Some(client) = live
            .clients
            .get(attempt % live.clients.len().max(1))
            .cloned()
        else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        attempt += 1;
        let generation = live.generation;
        drop(live);
        let connected = async {
            let pubsub = tokio::time::timeout(shared.timeout, client.get_async_pubsub())
                .await
                .ok()?
                .ok()?;
            Some(pubsub.split())
        };
        let Some((mut sink, mut stream)) = connected.await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let mut subscribed = HashSet::new();
        let mut healthy = subscribe_new(&shared, &hub, &mut sink, &mut subscribed).await;
        while healthy {
            let changed = shared.changed.notified();
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => hub.deliver(
                        message.get_channel_name(),
                        Event::Message(Bytes::copy_from_slice(message.get_payload_bytes())),
                    ),
                    None => healthy = false,
                },
                () = hub.added.notified() => {
                    healthy = subscribe_new(&shared, &hub, &mut sink, &mut subscribed).await;
                }
                () = tokio::time::sleep(PING) => {
                    let pong = tokio::time::timeout(shared.timeout, sink.ping::<redis::Value>()).await;
                    healthy = matches!(pong, Ok(Ok(_)));
                }
                () = changed => {
                    // A new primary: subscribe there.
                    healthy = matches!(&**shared.state(),
                        super::link::State::Up(live) if live.generation == generation);
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Subscribes to the channels this connection does not carry yet, then
/// tells their subscribers they may have missed messages until now.
async fn subscribe_new(
    shared: &Shared,
    hub: &Hub,
    sink: &mut PubSubSink,
    subscribed: &mut HashSet<String>,
) -> bool {
    let new: Vec<String> = hub
        .names()
        .into_iter()
        .filter(|name| !subscribed.contains(name))
        .collect();
    if new.is_empty() {
        return true;
    }
    match tokio::time::timeout(shared.timeout, sink.subscribe(&new)).await {
        Ok(Ok(())) => {
            for name in new {
                hub.deliver(&name, Event::Gap);
                subscribed.insert(name);
            }
            true
        }
        _ => false,
    }
}
