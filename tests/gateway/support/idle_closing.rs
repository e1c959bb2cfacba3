//! An upstream that closes idle keep-alive connections after a short time,
//! as servers and load balancers do (nginx's `keepalive_timeout`, a cloud
//! load balancer's idle timeout): hyper's HTTP/1.1 server, whose header
//! read timeout starts again each time a connection goes idle after an
//! answer, so a connection that brings no new request within it is closed
//! under the client (a FIN, no answer). Every request is answered with the
//! CloseInvoice envelope; connections and requests are counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{PATIENCE, until};

/// The answer to every request: a CloseInvoice success.
const CLOSED: &str = r#"{"app":"om","service":"invoices","warnings":[],"instanceId":"i-1","requestId":"r-1","data":{"invoiceNumber":1,"invoiceSource":"POS","invoicedAt":"2026-11-25T10:00:00Z"}}"#;

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    requests: AtomicUsize,
    /// Connections the server closed because they stayed idle.
    closed_idle: AtomicUsize,
    closed: Notify,
}

pub struct IdleClosingUpstream {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl IdleClosingUpstream {
    /// Serves on `127.0.0.1:<ephemeral>`, closing a connection that stays
    /// idle for `idle` (after its last answer, or from its accept).
    pub async fn start(idle: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the idle-closing upstream");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let counts = shared.clone();
                tokio::spawn(async move {
                    let requests = counts.clone();
                    let service = service_fn(move |_request| {
                        requests.requests.fetch_add(1, Ordering::SeqCst);
                        let answer = hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(CLOSED.as_bytes())))
                            .expect("answer");
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(idle)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                    if served.is_err_and(|e| e.is_timeout()) {
                        counts.closed_idle.fetch_add(1, Ordering::SeqCst);
                        counts.closed.notify_waiters();
                    }
                });
            }
        });
        Self { addr, counts }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Connections closed for staying idle.
    pub fn closed_idle(&self) -> usize {
        self.counts.closed_idle.load(Ordering::SeqCst)
    }

    /// Resolves once at least `n` connections were closed for staying idle
    /// (counted just after the close, which a client may see first). Fails
    /// the test after [`PATIENCE`].
    pub async fn wait_for_closed_idle(&self, n: usize) {
        until(
            &format!("the upstream to close {n} idle connection(s) (the count of those closed)"),
            PATIENCE,
            async || self.closed_idle(),
            |closed| *closed >= n,
        )
        .woken_by(&self.counts.closed)
        .await;
    }
}

mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::IdleClosingUpstream;
    use crate::support::{PATIENCE, within};

    const REQUEST: &[u8] =
        b"POST /v1/om/invoices/inv-1/close HTTP/1.1\r\nHost: upstream\r\nContent-Length: 0\r\n\r\n";

    /// Reads one answer (its head and the Content-Length body).
    async fn read_answer(stream: &mut TcpStream) -> String {
        within("an answer from the upstream", PATIENCE, read_one(stream)).await
    }

    async fn read_one(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).await.expect("read"), 1, "an answer");
            answer.push(byte[0]);
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("content-length")
                    .parse()
                    .expect("a length");
                if body.len() == length {
                    return text;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_connection_is_kept_alive_between_requests_then_closed_once_idle() {
        let idle = Duration::from_millis(200);
        let upstream = IdleClosingUpstream::start(idle).await;
        let mut stream = TcpStream::connect(upstream.url().trim_start_matches("http://"))
            .await
            .expect("connect");

        for _ in 0..2 {
            stream.write_all(REQUEST).await.expect("write");
            let answer = read_answer(&mut stream).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains(r#""invoiceNumber":1"#), "{answer}");
        }
        let idle_from = Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("the upstream closes the idle connection");
        assert_eq!(read.expect("a clean close"), 0, "no answer, only the close");
        assert!(idle_from.elapsed() >= idle - Duration::from_millis(5));
        assert_eq!(
            (upstream.connections(), upstream.requests()),
            (1, 2),
            "both requests on one connection"
        );
        tokio::time::timeout(Duration::from_secs(10), upstream.wait_for_closed_idle(1))
            .await
            .expect("the close is counted as an idle one");
    }
}
