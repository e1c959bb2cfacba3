//! The admin endpoints as an operator's tools see them: an admin listener
//! served in-test around the gateway's `Metrics` and `Readiness`, plain
//! HTTP/1.1 requests to any admin address (in-test or the binary's), and
//! `/metrics` samples read by their exact series.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use gormic_gateway::admin::{self, Readiness};
use gormic_gateway::metrics::Metrics;

use super::{PATIENCE, until, within};

/// An admin listener on `127.0.0.1:<ephemeral>`; stops when dropped.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl AdminServer {
    pub async fn start(metrics: Metrics, readiness: Readiness) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("admin addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(admin::serve(listener, metrics, readiness, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
        }
    }

    pub async fn scrape(&self) -> Scrape {
        scrape(self.addr).await
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

/// `GET path` on its own connection (as a kubelet probe or a scraper does).
pub async fn get(addr: SocketAddr, path: &str) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the admin listener {addr}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    within(
        &format!("the answer to GET {path} from {addr}"),
        PATIENCE,
        stream.read_to_end(&mut raw),
    )
    .await
    .expect("read answer");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    HttpAnswer {
        status,
        body: body.to_owned(),
    }
}

/// `/metrics` of the admin listener at `addr`.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let answer = get(addr, "/metrics").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    Scrape(answer.body)
}

/// Scrapes until `done` holds, for what is recorded just after an event the
/// test can observe (a cancelled call is counted as its future is dropped).
pub async fn scrape_until(addr: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    until(
        "/metrics to show the expected values",
        PATIENCE,
        async || scrape(addr).await,
        done,
    )
    .await
}

/// One `/metrics` exposition.
#[derive(Debug, Clone)]
pub struct Scrape(pub String);

impl Scrape {
    pub fn text(&self) -> &str {
        &self.0
    }

    /// The value of one series, written exactly as in the exposition
    /// (`name{label="value",...}`); `None` when it is absent.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().expect("numeric sample"))
    }

    /// How much `series` grew since `before` (absent counts as 0, as a
    /// counter not yet created is).
    pub fn delta(&self, before: &Scrape, series: &str) -> f64 {
        self.value(series).unwrap_or(0.0) - before.value(series).unwrap_or(0.0)
    }

    /// `(series name, [(label, value)])` of every sample line.
    pub fn samples(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, _value) = line.rsplit_once(' ').expect("sample value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                // Label values here never hold `,` or `"`: splitting is enough.
                let labels = labels
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            })
            .collect()
    }
}
