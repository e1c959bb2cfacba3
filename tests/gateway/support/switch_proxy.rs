//! A managed Redis endpoint in miniature: a TCP forwarder on a fixed
//! loopback address whose target the test moves, as a provider moves its
//! DNS name to the new primary after a failover. Connections already open
//! keep their old target (as they would with a DNS change); new ones go to
//! the current target.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct SwitchProxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    accept: JoinHandle<()>,
}

impl SwitchProxy {
    /// Listens on `127.0.0.1:<ephemeral>`, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the switch proxy");
        let addr = listener.local_addr().expect("local address");
        let target = Arc::new(Mutex::new(target));
        let current = target.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *current.lock().expect("target lock");
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            addr,
            target,
            accept,
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// New connections go to `target` from now on.
    pub fn switch_to(&self, target: SocketAddr) {
        *self.target.lock().expect("target lock") = target;
    }
}

impl Drop for SwitchProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

mod tests {
    use super::*;
    use crate::support::redis::RedisServer;

    #[tokio::test]
    async fn new_connections_follow_the_switch_and_open_ones_stay() {
        let (a, b) = (RedisServer::start(), RedisServer::start());
        let proxy = SwitchProxy::start(a.addr()).await;
        let client = redis::Client::open(proxy.redis_url()).expect("URL");
        let mut before = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        assert_eq!(served_by(&mut before).await, a.port());
        proxy.switch_to(b.addr());
        let mut after = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        assert_eq!(served_by(&mut after).await, b.port());
        assert_eq!(served_by(&mut before).await, a.port());
    }

    /// The port of the server a connection reaches (`INFO server`).
    async fn served_by(connection: &mut redis::aio::MultiplexedConnection) -> u16 {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(connection)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("tcp_port:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("a tcp_port")
    }
}
