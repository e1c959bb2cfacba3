//! A TCP proxy on loopback in front of one target address (a redis-server,
//! say): it delays every chunk it forwards by a fixed one-way delay, in both
//! directions and in order (a slow store), can hold the client's bytes back
//! until released (a store operation parked where the test wants it), and
//! counts connections and round trips (what the client asked of the store).
//!
//! A *round trip* is one burst of requests: on each connection, the first
//! bytes the client sends count one, and so do the first bytes it sends
//! after the server has sent anything since the client's previous bytes.
//! So a request split over several writes, or a pipeline of commands sent
//! before any answer, is one round trip; two commands each awaiting its
//! answer are two. Bytes count when the proxy reads them, before any delay
//! or hold: a held request has already counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::{PATIENCE, until};

#[derive(Default)]
struct Counts {
    connections: usize,
    round_trips: usize,
}

struct Shared {
    target: SocketAddr,
    /// One-way delay applied to each chunk from now on.
    delay: Mutex<Duration>,
    /// While true, client-to-server bytes wait (they are still read and
    /// counted).
    held: watch::Sender<bool>,
    counts: Mutex<Counts>,
    counted: Notify,
}

pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Owns the connections' tasks: aborting it closes them all.
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on `127.0.0.1:<ephemeral>` and forwards each connection to
    /// `target`, every chunk `delay` late each way (a round trip through it
    /// takes at least twice `delay`).
    pub async fn start(target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the delay proxy");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            target,
            delay: Mutex::new(delay),
            held: watch::Sender::new(false),
            counts: Mutex::default(),
            counted: Notify::new(),
        });
        let accept = tokio::spawn(serve(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:<port>`, for a proxy in front of a redis-server.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Changes the one-way delay for the chunks read from now on (chunks
    /// already read keep theirs, so order holds).
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().expect("delay lock") = delay;
    }

    /// From now on, bytes from clients are read but not forwarded until
    /// [`Self::release`]; answers still flow.
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Forwards held and later client bytes again (held ones at once if
    /// their delay has passed).
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    /// Connections accepted since the start or [`Self::reset_counts`].
    pub fn connections(&self) -> usize {
        self.shared.counts.lock().expect("counts lock").connections
    }

    /// Round trips (see the module's doc) since the start or
    /// [`Self::reset_counts`].
    pub fn round_trips(&self) -> usize {
        self.shared.counts.lock().expect("counts lock").round_trips
    }

    /// Zeroes both counts (open connections stay open; a connection whose
    /// client spoke last counts its next bytes only after an answer).
    pub fn reset_counts(&self) {
        *self.shared.counts.lock().expect("counts lock") = Counts::default();
    }

    /// Resolves once [`Self::round_trips`] is at least `n`: the client's
    /// request has reached the proxy (held or not). Fails the test after
    /// [`PATIENCE`].
    pub async fn wait_for_round_trips(&self, n: usize) {
        until(
            &format!("{n} round trip(s) through the delay proxy (the count of those made)"),
            PATIENCE,
            async || self.round_trips(),
            |made| *made >= n,
        )
        .woken_by(&self.shared.counted)
        .await;
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Dropped with this task (on abort): its connections' tasks are aborted.
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        shared.counts.lock().expect("counts lock").connections += 1;
        connections.spawn(proxy_connection(client, shared.clone()));
    }
}

/// Whether the server has spoken since the client's last bytes (true before
/// the client's first bytes).
type Turn = Arc<Mutex<bool>>;

async fn proxy_connection(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.target).await else {
        // Target down: the client sees the connection close.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let turn: Turn = Arc::new(Mutex::new(true));
    tokio::join!(
        pump(
            client_read,
            server_write,
            &shared,
            &turn,
            Direction::ToServer
        ),
        pump(
            server_read,
            client_write,
            &shared,
            &turn,
            Direction::ToClient
        ),
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Copies `from` to `to`, each chunk its delay late, until `from` ends
/// (then half-closes `to`) or either side fails.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    turn: &Turn,
    direction: Direction,
) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            count(shared, turn, direction);
            let delay = *shared.delay.lock().expect("delay lock");
            if chunks
                .send((Instant::now() + delay, buffer[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        // Dropping `chunks` lets the writer finish.
    };
    let write = async move {
        let mut held = shared.held.subscribe();
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if direction == Direction::ToServer && held.wait_for(|held| !held).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

fn count(shared: &Shared, turn: &Turn, direction: Direction) {
    let mut server_spoke = turn.lock().expect("turn lock");
    match direction {
        Direction::ToClient => *server_spoke = true,
        Direction::ToServer if *server_spoke => {
            *server_spoke = false;
            shared.counts.lock().expect("counts lock").round_trips += 1;
            shared.counted.notify_waiters();
        }
        Direction::ToServer => {}
    }
}

mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::DelayProxy;
    use crate::support::redis::RedisServer;
    use crate::support::{PATIENCE, within};

    const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
    const PONG: &[u8] = b"+PONG\r\n";

    async fn ping(stream: &mut TcpStream) {
        stream.write_all(PING).await.expect("send PING");
        let mut answer = [0u8; PONG.len()];
        within("a PONG", PATIENCE, stream.read_exact(&mut answer))
            .await
            .expect("read PONG");
        assert_eq!(&answer, PONG);
    }

    #[tokio::test]
    async fn a_ping_through_the_delay_proxy_takes_both_delays_and_counts_one_round_trip() {
        let redis = RedisServer::start();
        let proxy = DelayProxy::start(redis.addr(), Duration::from_millis(100)).await;
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");

        let started = Instant::now();
        ping(&mut stream).await;

        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "took {took:?}");
        assert_eq!(proxy.round_trips(), 1);
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn two_sequential_pings_count_two_round_trips_and_a_pipelined_pair_one() {
        let redis = RedisServer::start();
        let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");

        ping(&mut stream).await;
        ping(&mut stream).await;
        assert_eq!(proxy.round_trips(), 2);

        proxy.reset_counts();
        stream
            .write_all(&[PING, PING].concat())
            .await
            .expect("send two PINGs at once");
        let mut answers = [0u8; 2 * PONG.len()];
        within("two PONGs", PATIENCE, stream.read_exact(&mut answers))
            .await
            .expect("read PONGs");
        assert_eq!(&answers[..], &[PONG, PONG].concat()[..]);
        assert_eq!(proxy.round_trips(), 1);
        assert_eq!(proxy.connections(), 0, "counted since the reset");
    }

    #[tokio::test]
    async fn a_held_ping_waits_for_release() {
        let redis = RedisServer::start();
        let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");

        redis.reset_stats();
        proxy.hold();
        let pinged = tokio::spawn(async move { ping(&mut stream).await });
        proxy.wait_for_round_trips(1).await;
        // The PING has reached the proxy and is parked there. A window for a
        // broken hold to show (a PING forwarded at once is answered in well
        // under a millisecond): redis never sees it, no answer comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(redis.commandstats().get("ping"), None);
        assert!(!pinged.is_finished(), "the PING was answered while held");

        proxy.release();
        tokio::time::timeout(Duration::from_secs(10), pinged)
            .await
            .expect("the PING is answered once released")
            .expect("the PING task");
        assert_eq!(redis.commandstats().get("ping"), Some(&1));
    }

    #[tokio::test]
    async fn the_delay_proxy_serves_the_redis_client_at_a_delay_set_later() {
        let redis = RedisServer::start();
        let proxy = DelayProxy::start(redis.addr(), Duration::ZERO).await;
        let client = redis::Client::open(proxy.redis_url()).expect("redis URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect through the proxy");
        proxy.reset_counts();

        proxy.set_delay(Duration::from_millis(100));
        let started = Instant::now();
        let pong: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .expect("PING through the proxy");

        assert_eq!(pong, "PONG");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "took {took:?}");
        assert_eq!(proxy.round_trips(), 1);
    }
}
