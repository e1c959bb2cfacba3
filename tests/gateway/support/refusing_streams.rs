//! An HTTP/2 upstream (h2c, prior knowledge) that refuses every stream
//! with `RST_STREAM(REFUSED_STREAM)` as it arrives, as a server does at its
//! stream limit or while shutting down: by RFC 9113 §8.7 the request was
//! not processed at all. Streams and connections are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    refused: AtomicUsize,
}

pub struct RefusingStreams {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl RefusingStreams {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the refusing upstream");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let counts = shared.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(io).await else {
                        return;
                    };
                    while let Some(Ok((_request, mut respond))) = connection.accept().await {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
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

    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Streams refused so far.
    pub fn refused(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }
}

mod tests {
    use super::RefusingStreams;

    #[tokio::test]
    async fn every_stream_is_refused_unprocessed() {
        let upstream = RefusingStreams::start().await;
        let client = crate::support::http_client()
            .http2_prior_knowledge()
            .retry(reqwest::retry::never())
            .build()
            .expect("HTTP/2 client");

        let error = client
            .get(upstream.url())
            .send()
            .await
            .expect_err("the stream is refused");

        let reason =
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .find_map(|e| e.downcast_ref::<h2::Error>())
            .and_then(h2::Error::reason);
        assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{error:?}");
        assert_eq!((upstream.connections(), upstream.refused()), (1, 1));
    }
}
