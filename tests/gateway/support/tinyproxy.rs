//! A real `tinyproxy` (the Debian package, 1.11) on a free loopback port, for
//! the upstream proxy tests: a generated configuration in a directory of its
//! own, run in the foreground (`-d -c <config>`), ready once its log says so,
//! killed on drop. `scripts/test` installs it.
//!
//! What tells a test that a request went through it:
//! - Plain (non-CONNECT) requests, in absolute form (`GET http://host/path`),
//!   reach the upstream with a `Via: 1.1 tinyproxy (tinyproxy/1.11.1)` header
//!   (`ViaProxyName` is set, so the name does not depend on the host), which
//!   [`super::FakeUpstream`] records ([`super::fake_upstream::Recorded::header`]).
//!   tinyproxy also sends them upstream with `Connection: close` and answers
//!   the client in HTTP/1.0: one TCP connection per plain request, on both
//!   sides. `Proxy-Authorization` is not passed on.
//! - A CONNECT tunnel carries bytes untouched (no `Via`): only the log shows
//!   it.
//!
//! The log ([`Tinyproxy::log`]), at `LogLevel Info`, has one line per event:
//! `LEVEL     Mon DD HH:MM:SS.mmm [pid]: message`, the level name padded to
//! 9 columns. The lines read here, each written before tinyproxy relays the
//! first byte of an answer (so a client that has its answer finds them):
//! - `CONNECT   … Request (file descriptor 5): GET http://127.0.0.1:8080/x HTTP/1.1`
//!   for every request line read, those refused for want of credentials
//!   (407) included ([`Tinyproxy::requests`]);
//! - `CONNECT   … Established connection to host "127.0.0.1" using file descriptor 6.`
//!   once per request let through, when its upstream connection is open
//!   ([`Tinyproxy::upstream_connections`]).

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Logged once tinyproxy listens and accepts.
const READY: &str = "Accepting connections.";
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// Options of a [`Tinyproxy`]; see [`Tinyproxy::builder`].
#[derive(Debug, Default)]
pub struct TinyproxyBuilder {
    basic_auth: Option<(String, String)>,
}

impl TinyproxyBuilder {
    /// Only clients that send these credentials
    /// (`Proxy-Authorization: Basic …`) are served; others get a 407.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        assert!(
            !user.is_empty()
                && !password.is_empty()
                && !format!("{user}{password}").contains(char::is_whitespace),
            "tinyproxy's BasicAuth takes a user and a password without spaces"
        );
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Starts tinyproxy on a free loopback port and waits until it accepts.
    pub fn start(self) -> Tinyproxy {
        // A port picked free may be taken before tinyproxy binds it: try a
        // few.
        let mut last = String::new();
        for _ in 0..5 {
            match launch(free_port(), &self) {
                Ok(proxy) => return proxy,
                Err(output) => last = output,
            }
        }
        panic!("tinyproxy did not start on a free port; its log:\n{last}");
    }
}

pub struct Tinyproxy {
    child: Child,
    port: u16,
    dir: PathBuf,
}

/// One request line as tinyproxy logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// `CONNECT`, `GET`, `POST`, …
    pub method: String,
    /// `host:port` for CONNECT, else the absolute URL.
    pub target: String,
}

impl Tinyproxy {
    /// A proxy without authentication.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> TinyproxyBuilder {
        TinyproxyBuilder::default()
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://user:password@127.0.0.1:<port>` (percent-encoded).
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        let mut url = url::Url::parse(&self.url()).expect("proxy URL");
        url.set_username(user).expect("a user in an http URL");
        url.set_password(Some(password))
            .expect("a password in an http URL");
        url.as_str().trim_end_matches('/').to_owned()
    }

    /// The log so far (see the module's doc for its format).
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Every request line tinyproxy has read, in order, refused ones
    /// included.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        complete_lines(&self.log())
            .filter_map(|line| {
                let (_, request) = line.split_once("]: Request (file descriptor ")?;
                let (_, request) = request.split_once("): ")?;
                let mut words = request.split_whitespace();
                Some(LoggedRequest {
                    method: words.next()?.to_owned(),
                    target: words.next()?.to_owned(),
                })
            })
            .collect()
    }

    /// CONNECT requests read (tunnels asked for).
    pub fn tunnels(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "CONNECT")
            .count()
    }

    /// Plain (absolute-form, non-CONNECT) requests read.
    pub fn forwarded(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method != "CONNECT")
            .count()
    }

    /// Upstream connections opened: one per request let through (tunnel or
    /// plain), none for a refused one.
    pub fn upstream_connections(&self) -> usize {
        complete_lines(&self.log())
            .filter(|line| line.contains("]: Established connection to host "))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lines ended by a newline (tinyproxy writes a line in several writes).
fn complete_lines(log: &str) -> impl Iterator<Item = &str> {
    let complete = log.rfind('\n').map_or("", |end| &log[..end]);
    complete.lines()
}

fn read_log(dir: &Path) -> String {
    std::fs::read(dir.join("tinyproxy.log"))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn tinyproxy() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("tinyproxy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tinyproxy is not on PATH; the upstream proxy tests need it: \
                 install it with `apt-get install tinyproxy` (Debian/Ubuntu), \
                 or run scripts/test, which installs it"
            )
        })
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A fresh directory for one proxy under the target's tmp dir.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tinyproxy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the tinyproxy directory");
    dir
}

/// Starts tinyproxy on `port` and waits for its readiness line; on failure,
/// returns its log and what it printed.
fn launch(port: u16, options: &TinyproxyBuilder) -> Result<Tinyproxy, String> {
    let dir = fresh_dir();
    // No ConnectPort line: CONNECT is allowed to every port. No User: it
    // stays the test's user (and warns that it does).
    let mut config = format!(
        "Listen 127.0.0.1\n\
         Port {port}\n\
         Allow 127.0.0.1\n\
         Timeout 60\n\
         MaxClients 100\n\
         LogLevel Info\n\
         LogFile \"{log}\"\n\
         ViaProxyName \"tinyproxy\"\n",
        log = dir.join("tinyproxy.log").display()
    );
    if let Some((user, password)) = &options.basic_auth {
        config.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    let config_path = dir.join("tinyproxy.conf");
    std::fs::write(&config_path, config).expect("write the tinyproxy configuration");
    let output = File::create(dir.join("output.txt")).expect("create tinyproxy's output file");
    let child = Command::new(tinyproxy())
        .arg("-d")
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("output file"))
        .stderr(output)
        .spawn()
        .expect("spawn tinyproxy");
    let mut proxy = Tinyproxy { child, port, dir };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if proxy.log().contains(READY) {
            return Ok(proxy);
        }
        let exited = proxy.child.try_wait().expect("tinyproxy's status");
        if exited.is_some() || Instant::now() >= deadline {
            let printed = std::fs::read_to_string(proxy.dir.join("output.txt")).unwrap_or_default();
            let failure = format!("{}\n(exit: {exited:?}; printed: {printed})", proxy.log());
            // Drop kills it and removes its directory.
            drop(proxy);
            return Err(failure);
        }
        std::thread::sleep(POLL);
    }
}

mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{LoggedRequest, Tinyproxy};
    use crate::support::{FakeUpstream, PATIENCE, Scripted, within};

    fn client_through(proxy: &str) -> reqwest::Client {
        crate::support::http_client()
            .proxy(reqwest::Proxy::all(proxy).expect("proxy URL"))
            .build()
            .expect("HTTP client")
    }

    #[tokio::test]
    async fn a_plain_request_through_tinyproxy_arrives_with_a_via_header_naming_it() {
        let upstream = FakeUpstream::start().await;
        upstream.respond(Scripted::raw(200, "hello"));
        let proxy = Tinyproxy::start();

        let answer = client_through(&proxy.url())
            .get(format!("{}/plain?x=1", upstream.url()))
            .send()
            .await
            .expect("an answer through the proxy");

        assert_eq!(answer.status(), 200);
        let request = upstream.only_request();
        assert_eq!(request.path, "/plain");
        let via = request.header("via").expect("a Via header");
        assert!(via.contains("tinyproxy"), "Via: {via}");
        assert_eq!(request.header("connection"), Some("close"));
        assert_eq!(
            proxy.requests(),
            vec![LoggedRequest {
                method: "GET".into(),
                target: format!("{}/plain?x=1", upstream.url()),
            }],
            "log:\n{}",
            proxy.log()
        );
        assert_eq!((proxy.forwarded(), proxy.tunnels()), (1, 0));
        assert_eq!(proxy.upstream_connections(), 1);
    }

    #[tokio::test]
    async fn a_connect_tunnel_through_tinyproxy_is_logged_and_carries_the_request_untouched() {
        let upstream = FakeUpstream::start().await;
        upstream.respond(Scripted::raw(200, "tunnelled"));
        let proxy = Tinyproxy::start();
        let target = upstream.addr();

        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to tinyproxy");
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .expect("send CONNECT");
        let established = within(
            "tinyproxy's answer to CONNECT",
            PATIENCE,
            read_head(&mut stream),
        )
        .await;
        assert!(
            established.starts_with("HTTP/1.0 200"),
            "CONNECT answered: {established}"
        );
        stream
            .write_all(
                format!("GET /inside HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send a request through the tunnel");
        let mut answer = String::new();
        within(
            "the answer through the tunnel",
            PATIENCE,
            stream.read_to_string(&mut answer),
        )
        .await
        .expect("read the answer through the tunnel");

        assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer}");
        let request = upstream.only_request();
        assert_eq!(request.path, "/inside");
        assert_eq!(request.header("via"), None);
        assert_eq!(
            proxy.requests(),
            vec![LoggedRequest {
                method: "CONNECT".into(),
                target: target.to_string(),
            }],
            "log:\n{}",
            proxy.log()
        );
        assert_eq!((proxy.tunnels(), proxy.forwarded()), (1, 0));
    }

    #[tokio::test]
    async fn tinyproxy_with_basic_auth_refuses_a_request_without_credentials_and_passes_one_with() {
        let upstream = FakeUpstream::start().await;
        upstream.respond(Scripted::raw(200, "hello"));
        let proxy = Tinyproxy::builder().basic_auth("alice", "s3cret").start();
        let url = format!("{}/authed", upstream.url());

        let refused = client_through(&proxy.url())
            .get(&url)
            .send()
            .await
            .expect("an answer from the proxy");
        assert_eq!(refused.status(), 407);
        assert!(upstream.requests().is_empty());
        assert_eq!(proxy.upstream_connections(), 0);

        let passed = client_through(&proxy.url_with_credentials("alice", "s3cret"))
            .get(&url)
            .send()
            .await
            .expect("an answer through the proxy");
        assert_eq!(passed.status(), 200);
        let request = upstream.only_request();
        assert_eq!(request.path, "/authed");
        assert_eq!(request.header("proxy-authorization"), None);
        assert_eq!(proxy.forwarded(), 2, "log:\n{}", proxy.log());
        assert_eq!(proxy.upstream_connections(), 1);
    }

    /// Reads an HTTP head (up to the blank line), byte by byte so nothing
    /// after it is consumed.
    async fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("read an HTTP head");
            head.push(byte);
        }
        String::from_utf8(head).expect("an ASCII head")
    }
}
