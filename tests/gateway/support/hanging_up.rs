//! An "upstream" that reads each request and closes the connection without
//! answering: the request went out and no answer will ever come (a broken
//! connection after sending, `request_sent=true`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

pub struct HangingUpUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl HangingUpUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the hanging-up upstream");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = [0u8; 8192];
                // Counted before the connection closes, so a caller that saw
                // the break also sees the count.
                if matches!(socket.read(&mut buffer).await, Ok(n) if n > 0) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received (connections that delivered bytes), all unanswered.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
