//! A loopback address that never answers a connect: a socket listening with
//! backlog 0 that is never accepted, its accept queue filled by client
//! sockets of our own. Linux drops a SYN to a listener whose accept queue is
//! full (no RST, no SYN-ACK), so a further connect hangs until the caller's
//! timeout, as to a host that is down: what a connect timeout is for.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long a connect to loopback may take before it counts as dropped while
/// filling the queue. A connect that the kernel completes takes microseconds.
const PROBE: Duration = Duration::from_millis(100);
/// Linux queues backlog + 1 = 1 connection; a few more allowed for a kernel
/// that rounds the backlog up.
const MAX_QUEUED: usize = 8;

pub struct Blackhole {
    addr: SocketAddr,
    /// Listening, never accepted.
    _listener: TcpListener,
    /// The connections filling its accept queue, kept open.
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    /// Listens on `127.0.0.1:<ephemeral>` with backlog 0 and connects to it
    /// until a connect attempt does not complete within [`PROBE`]: from then
    /// on every connect to [`Self::addr`] hangs.
    pub async fn start() -> Self {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind a loopback port");
        let listener = socket.listen(0).expect("listen with backlog 0");
        let addr = listener.local_addr().expect("local address");
        let mut queued = Vec::new();
        loop {
            assert!(
                queued.len() <= MAX_QUEUED,
                "the accept queue of a backlog-0 listener took {} connections and \
                 still accepts more: this kernel does not drop SYNs to a full queue",
                queued.len()
            );
            match tokio::time::timeout(PROBE, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(e)) => panic!("connect to the blackhole's listener failed: {e}"),
                // Dropped: the queue is full (the half-open attempt is closed
                // with the future).
                Err(_) => break,
            }
        }
        Self {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    use super::Blackhole;

    #[tokio::test]
    async fn a_connect_to_the_blackhole_does_not_complete_within_300_ms() {
        let blackhole = Blackhole::start().await;

        let attempt = tokio::time::timeout(
            Duration::from_millis(300),
            TcpStream::connect(blackhole.addr()),
        )
        .await;

        assert!(
            attempt.is_err(),
            "the connect completed (or failed) instead of hanging: {attempt:?}"
        );
    }

    #[tokio::test]
    async fn an_http_client_times_out_connecting_to_the_blackhole_url() {
        let blackhole = Blackhole::start().await;
        let client = crate::support::http_client()
            .connect_timeout(Duration::from_millis(300))
            .build()
            .expect("HTTP client");

        let error = client
            .get(blackhole.url())
            .send()
            .await
            .expect_err("nothing answers on the blackhole");

        assert!(
            error.is_connect() && error.is_timeout(),
            "not a connect timeout: {error:?}"
        );
    }
}
