//! Each thread's own connections to the store's primary (to every primary,
//! in a cluster): a call's scripts and publishes are sent and answered on a
//! connection driven by the thread that runs the call. A connection is
//! driven by a task of the runtime that made it; the gateway serves calls on
//! worker threads, each with a current-thread runtime (`crate::runtime`),
//! so one connection shared by every worker would wake its maker's thread
//! twice per operation (request out, answer back), as it would the upstream
//! client, which is one per worker for the same reason.
//!
//! The supervisor decides where the primary is and publishes it with a
//! generation (`link`); a thread connects to it on its first operation
//! (checked with `ROLE` like the supervisor's connection, `finder::open`),
//! keeps the connection for as long as the generation lasts, and connects
//! again for the next one. Operations of one thread that find no connection
//! yet share one attempt. Per thread that uses the store:
//! - one connection for operations that do not wait for replicas;
//! - up to [`WAIT_CONNECTIONS`] for writes that do (`WAIT` holds the
//!   connection it is sent on until the replicas answer, so one connection
//!   would queue every durable write of the thread behind the previous
//!   one's wait), each opened when first needed and taken in turn.
//!
//! In a cluster each of them is a cluster connection: one connection per
//! primary. On a multi-thread runtime (tests) the connections are per
//! thread all the same, but their tasks run on any of its threads.
//!
//! A thread's connections to a store that was dropped close when the thread
//! next opens connections to a store, or ends.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use tokio::sync::OnceCell;

use super::finder::{self, Refused};
use super::link::{Conn, Dial, Live, Shared};
use super::{Failure, FailureKind};

/// Connections per thread for writes that wait for replicas, a connection
/// being one per primary in a cluster. A wait lasts about a round trip to
/// the replica: 4 let a thread wait for 4 writes at once, more than one
/// core's calls need on a LAN (0.25 ms each: 16,000 durable writes/s).
pub(super) const WAIT_CONNECTIONS: usize = 4;

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Scripts that do not wait, publishes.
    Commands,
    /// A script followed by `WAIT` on the same connection.
    Wait,
}

/// One connection, made by the first operation that needs it.
type Slot = Arc<OnceCell<Conn>>;

/// This thread's connections to one store's primary.
struct Connections {
    /// The store's; also keeps its address from being reused while this
    /// entry lives.
    store: Weak<Shared>,
    /// The primary's generation these connections are for.
    generation: u64,
    dial: Dial,
    commands: Slot,
    waits: [Slot; WAIT_CONNECTIONS],
    next_wait: usize,
}

impl Connections {
    fn new(shared: &Arc<Shared>, live: &Live) -> Self {
        Self {
            store: Arc::downgrade(shared),
            generation: live.generation,
            dial: live.dial.clone(),
            commands: Slot::default(),
            waits: Default::default(),
            next_wait: 0,
        }
    }

    /// The slot for `purpose`: the next wait connection in turn.
    fn slot(&mut self, purpose: Purpose) -> &Slot {
        match purpose {
            Purpose::Commands => &self.commands,
            Purpose::Wait => {
                let turn = self.next_wait;
                self.next_wait = (turn + 1) % WAIT_CONNECTIONS;
                &self.waits[turn]
            }
        }
    }
}

thread_local! {
    /// One entry per store this thread uses (one, in the gateway).
    static CONNECTIONS: RefCell<Vec<Connections>> = const { RefCell::new(Vec::new()) };
}

/// This thread's connection for `purpose` to the primary of `live` (or of a
/// later generation, if this thread already knows it), and its generation.
/// Connects if need be, on this thread's runtime; a failure to connect has
/// been reported to the supervisor already.
pub(super) async fn connection(
    shared: &Arc<Shared>,
    live: &Live,
    purpose: Purpose,
) -> Result<(Conn, u64), Failure> {
    let (slot, generation, dial) = match CONNECTIONS.try_with(|c| pick(c, shared, live, purpose)) {
        Ok(Picked::Ready(conn, generation)) => return Ok((conn, generation)),
        Ok(Picked::Empty(slot, generation, dial)) => (slot, generation, dial),
        // Only while the thread ends, its connections already dropped.
        Err(_) => {
            return Err(Failure {
                kind: FailureKind::Unavailable,
                detail: format!("{}: this thread is ending", shared.target),
                may_have_applied: false,
            });
        }
    };
    let conn = slot
        .get_or_try_init(|| connect(shared, &dial, generation))
        .await?;
    Ok((conn.clone(), generation))
}

enum Picked {
    Ready(Conn, u64),
    Empty(Slot, u64, Dial),
}

/// The slot to use, without awaiting (the thread's entries are borrowed
/// only here).
fn pick(
    entries: &RefCell<Vec<Connections>>,
    shared: &Arc<Shared>,
    live: &Live,
    purpose: Purpose,
) -> Picked {
    let mut entries = entries.borrow_mut();
    let index = match entries
        .iter()
        .position(|c| std::ptr::eq(c.store.as_ptr(), Arc::as_ptr(shared)))
    {
        Some(index) => {
            // A newer primary: this thread's connections to the old one
            // close once the operations using them are done.
            if entries[index].generation < live.generation {
                entries[index] = Connections::new(shared, live);
            }
            index
        }
        None => {
            entries.retain(|c| c.store.strong_count() > 0);
            entries.push(Connections::new(shared, live));
            entries.len() - 1
        }
    };
    let entry = &mut entries[index];
    let generation = entry.generation;
    let slot = entry.slot(purpose);
    match slot.get() {
        Some(conn) => Picked::Ready(conn.clone(), generation),
        None => {
            let slot = slot.clone();
            Picked::Empty(slot, generation, entry.dial.clone())
        }
    }
}

/// Makes this thread's connection to the primary of `generation`, unless
/// that primary has been given up meanwhile (an operation that waited on a
/// failed attempt then fails at once rather than trying again).
async fn connect(shared: &Shared, dial: &Dial, generation: u64) -> Result<Conn, Failure> {
    if !shared.is_current(generation) {
        return Err(Failure {
            kind: FailureKind::Unavailable,
            detail: format!(
                "{}: the primary was given up while connecting to it; finding it again",
                shared.target
            ),
            may_have_applied: false,
        });
    }
    match finder::open(shared, dial).await {
        Ok(conn) => Ok(conn),
        Err(Refused { failure, cause }) => {
            match cause {
                Some(cause) => shared.invalidate(generation, cause),
                // A cluster: the supervisor's look at its topology tells.
                None => shared.inspect_soon(),
            }
            Err(failure)
        }
    }
}
