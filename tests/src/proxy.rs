//! A TCP proxy on a loopback port that models a slow link (`tc netem` would do this in the
//! kernel, but it is not available here).
//!
//! - Latency: each burst of bytes from the client (an HTTP request) is held for `delay` before it
//!   is passed on, so each request costs one extra `delay`.
//! - Bandwidth ([`DelayProxy::start_shaped`]): replies (upstream to client) share one token
//!   bucket of `rate` bytes per second across every connection of the proxy, like one shaped
//!   link. Each connection reads at most [`SLICE`] bytes from upstream, waits until the link
//!   has carried them, passes them on, and only then reads again: the proxy holds at most one
//!   slice per connection (no queue that grows, no bufferbloat), upstream is read only as fast
//!   as the link sends, and concurrent connections take turns slice by slice, so each gets
//!   about an equal share.
//!
//! Without a rate, replies pass at once.
//!
//! The proxy also keeps a log of the HTTP requests it passed ([`DelayProxy::requests`]: client,
//! method, path, `Range`) and counts reply bytes per client ([`DelayProxy::bytes_sent_to`]), so
//! a test can tell who asked the upstream for what: the fleet tests count the requests an origin
//! served per blob and range.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

/// Bytes a shaped connection reads and sends at a time: small enough that connections sharing
/// the link interleave finely (16 KiB is 16 ms at 1 MB/s) and the proxy buffers little, large
/// enough that one `read`, one sleep and one `write` per slice cost little next to the
/// transfer even at 100 MB/s (160 us a slice).
pub const SLICE: usize = 16 << 10;

/// How long the link may have been idle and still send at once what it would have sent
/// meanwhile (the bucket's depth, at least one [`SLICE`]). A sleeping sender wakes up to about
/// a scheduler tick (4 ms at 250 Hz) late; the bucket must keep the tokens of that time or fast
/// links fall short of their rate (the reason `tc tbf` wants a burst of at least rate/HZ). An
/// idle link therefore passes at most 4 ms worth of bytes in one burst.
const BURST: Duration = Duration::from_millis(4);

/// Read buffer of an unshaped direction: one large read per burst the peer sends.
const UNSHAPED_READ: usize = 256 << 10;

/// A running proxy; stops accepting on drop (open connections end with their peers). Its
/// threads, and the connections it makes upstream, live in the network namespace of the thread
/// that started it; drop it in that namespace too (its drop connects to the listener).
pub struct DelayProxy {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    bytes_sent: Arc<AtomicU64>,
    traffic: Arc<Traffic>,
}

/// One HTTP request the proxy passed upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// The client's address.
    pub client: IpAddr,
    pub method: String,
    pub path: String,
    /// The `Range` header's value, if any (`bytes=0-1048575`).
    pub range: Option<String>,
}

/// What the proxy has seen: the requests, and the reply bytes each client received.
#[derive(Default)]
struct Traffic {
    requests: Mutex<Vec<ProxiedRequest>>,
    bytes_to: Mutex<HashMap<IpAddr, u64>>,
}

impl DelayProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream` (`HOST:PORT`), delaying each
    /// request by `delay`; replies are not limited.
    pub fn start(upstream: &str, delay: Duration) -> Result<DelayProxy> {
        DelayProxy::spawn("127.0.0.1:0", upstream, delay, None)
    }

    /// Like [`DelayProxy::start`], listening on `listen` (`IP:PORT`) instead.
    pub fn start_on(listen: &str, upstream: &str, delay: Duration) -> Result<DelayProxy> {
        DelayProxy::spawn(listen, upstream, delay, None)
    }

    /// Like [`DelayProxy::start`], and replies of all connections together pass at most
    /// `reply_bytes_per_sec` (see the module documentation).
    pub fn start_shaped(
        upstream: &str,
        delay: Duration,
        reply_bytes_per_sec: u64,
    ) -> Result<DelayProxy> {
        ensure!(
            reply_bytes_per_sec > 0,
            "a shaped link needs a rate above 0"
        );
        DelayProxy::spawn(
            "127.0.0.1:0",
            upstream,
            delay,
            Some(Arc::new(Link::new(reply_bytes_per_sec))),
        )
    }

    fn spawn(
        listen: &str,
        upstream: &str,
        delay: Duration,
        link: Option<Arc<Link>>,
    ) -> Result<DelayProxy> {
        let listener = TcpListener::bind(listen)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let traffic = Arc::new(Traffic::default());
        let upstream = upstream.to_string();
        let stopping = stop.clone();
        let counter = bytes_sent.clone();
        let seen = traffic.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(peer) = client.peer_addr() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let requests = Direction {
                    delay,
                    link: None,
                    counter: None,
                    logs_requests: true,
                    peer: peer.ip(),
                    traffic: seen.clone(),
                };
                let replies = Direction {
                    delay: Duration::ZERO,
                    link: link.clone(),
                    counter: Some(counter.clone()),
                    logs_requests: false,
                    peer: peer.ip(),
                    traffic: seen.clone(),
                };
                thread::spawn(move || pump(client, server, requests));
                thread::spawn(move || pump(server2, client2, replies));
            }
        });
        Ok(DelayProxy {
            address,
            stop,
            bytes_sent,
            traffic,
        })
    }

    /// `IP:PORT` it listens on (`127.0.0.1:PORT` unless started with [`DelayProxy::start_on`]).
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    /// Reply bytes passed to clients so far, all connections together.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Reply bytes passed to clients at `client` so far.
    pub fn bytes_sent_to(&self, client: IpAddr) -> u64 {
        let bytes_to = self.traffic.bytes_to.lock().unwrap();
        bytes_to.get(&client).copied().unwrap_or(0)
    }

    /// The HTTP requests passed upstream so far, in the order they arrived. A request is seen
    /// when its head arrives in one read from the client, as HTTP/1.1 clients write it.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.traffic.requests.lock().unwrap().clone()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.address);
    }
}

/// The request line and `Range` header of the HTTP request head at the start of `bytes`, if
/// it starts with one.
fn parse_request(client: IpAddr, bytes: &[u8]) -> Option<ProxiedRequest> {
    let head = &bytes[..bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(bytes.len())];
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?;
    let path = request_line.next()?;
    if !request_line.next()?.starts_with("HTTP/") || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let range = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    Some(ProxiedRequest {
        client,
        method: method.to_string(),
        path: path.to_string(),
        range,
    })
}

/// The shaped link: a token bucket of `rate` bytes per second, [`BURST`] deep, that may go into
/// debt. A sender takes tokens for what it has read, then sleeps until the debt it made is
/// paid, so senders queue on the link in the order they asked, each for its own slice.
struct Link {
    rate: f64,
    /// Most tokens the bucket holds.
    depth: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Negative while senders wait for the link.
    tokens: f64,
    refilled: Instant,
}

impl Link {
    fn new(bytes_per_sec: u64) -> Link {
        let rate = bytes_per_sec as f64;
        let depth = (rate * BURST.as_secs_f64()).max(SLICE as f64);
        Link {
            rate,
            depth,
            bucket: Mutex::new(Bucket {
                tokens: depth,
                refilled: Instant::now(),
            }),
        }
    }

    /// Waits until the link has carried `bytes` more (after those already queued).
    fn transmit(&self, bytes: usize) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap();
            let now = Instant::now();
            let earned = now.duration_since(bucket.refilled).as_secs_f64() * self.rate;
            bucket.tokens = (bucket.tokens + earned).min(self.depth) - bytes as f64;
            bucket.refilled = now;
            (-bucket.tokens).max(0.0) / self.rate
        };
        if wait > 0.0 {
            thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// What happens to the bytes going one way through a connection.
struct Direction {
    /// Held this long before each read is passed on.
    delay: Duration,
    /// The shaped link they must pass, if any.
    link: Option<Arc<Link>>,
    /// Counts the bytes passed on, also per client in `traffic`.
    counter: Option<Arc<AtomicU64>>,
    /// Whether HTTP request heads passing this way are logged in `traffic`.
    logs_requests: bool,
    /// The client of this connection.
    peer: IpAddr,
    traffic: Arc<Traffic>,
}

/// Copies `from` to `to` as `direction` says.
fn pump(mut from: TcpStream, mut to: TcpStream, direction: Direction) {
    let read_size = if direction.link.is_some() {
        SLICE
    } else {
        UNSHAPED_READ
    };
    let mut buf = vec![0u8; read_size];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if direction.logs_requests {
                    if let Some(request) = parse_request(direction.peer, &buf[..n]) {
                        direction.traffic.requests.lock().unwrap().push(request);
                    }
                }
                if !direction.delay.is_zero() {
                    thread::sleep(direction.delay);
                }
                if let Some(link) = &direction.link {
                    link.transmit(n);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if let Some(counter) = &direction.counter {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    let mut bytes_to = direction.traffic.bytes_to.lock().unwrap();
                    *bytes_to.entry(direction.peer).or_default() += n as u64;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_is_delayed_and_replies_pass_through() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let proxy = DelayProxy::start(&upstream, Duration::from_millis(50)).unwrap();
        let mut c = TcpStream::connect(proxy.host()).unwrap();
        for _ in 0..3 {
            let started = Instant::now();
            c.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            let rtt = started.elapsed();
            assert!(rtt >= Duration::from_millis(50), "{rtt:?}");
        }
    }

    /// Serves `len` pseudo-random bytes to every connection, then closes it.
    fn serve_bytes(len: usize) -> (String, Vec<u8>) {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = server.local_addr().unwrap().to_string();
        let data = crate::pseudo_random_bytes(4, len);
        let served = data.clone();
        thread::spawn(move || {
            for stream in server.incoming() {
                let Ok(mut stream) = stream else { continue };
                let data = served.clone();
                thread::spawn(move || {
                    let _ = stream.write_all(&data);
                });
            }
        });
        (address, data)
    }

    /// Downloads everything the proxy passes on one connection; returns the bytes and the time.
    fn download(proxy: &str) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut c = TcpStream::connect(proxy).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        (got, started.elapsed())
    }

    /// 1 MiB through a 2 MiB/s link: half a second.
    const SHAPED_LEN: usize = 1 << 20;
    const SHAPED_RATE: u64 = 2 << 20;

    /// `took` is within loose bounds of `expected` (a loaded machine oversleeps).
    fn assert_about(took: Duration, expected: Duration) {
        let ratio = took.as_secs_f64() / expected.as_secs_f64();
        assert!(
            (0.8..1.5).contains(&ratio),
            "took {took:?}, expected about {expected:?}"
        );
    }

    #[test]
    fn a_shaped_transfer_takes_its_size_over_the_rate() {
        let (upstream, data) = serve_bytes(SHAPED_LEN);
        let proxy = DelayProxy::start_shaped(&upstream, Duration::ZERO, SHAPED_RATE).unwrap();
        let (got, took) = download(&proxy.host());
        assert!(got == data, "the reply arrived changed");
        assert_about(
            took,
            Duration::from_secs_f64(SHAPED_LEN as f64 / SHAPED_RATE as f64),
        );
        assert_eq!(proxy.bytes_sent(), SHAPED_LEN as u64);
    }

    #[test]
    fn concurrent_shaped_transfers_share_the_link() {
        let (upstream, data) = serve_bytes(SHAPED_LEN);
        let proxy = DelayProxy::start_shaped(&upstream, Duration::ZERO, SHAPED_RATE).unwrap();
        let host = proxy.host();
        let transfers: Vec<_> = (0..2)
            .map(|_| {
                let host = host.clone();
                thread::spawn(move || download(&host))
            })
            .collect();
        // Each gets half the link, so each takes as long as both together would alone.
        let both = Duration::from_secs_f64(2.0 * SHAPED_LEN as f64 / SHAPED_RATE as f64);
        for transfer in transfers {
            let (got, took) = transfer.join().unwrap();
            assert!(got == data, "the reply arrived changed");
            assert_about(took, both);
        }
        assert_eq!(proxy.bytes_sent(), 2 * SHAPED_LEN as u64);
    }

    #[test]
    fn an_unshaped_transfer_is_fast_and_counted() {
        let (upstream, data) = serve_bytes(SHAPED_LEN);
        let proxy = DelayProxy::start(&upstream, Duration::ZERO).unwrap();
        let (got, took) = download(&proxy.host());
        assert!(got == data, "the reply arrived changed");
        assert!(took < Duration::from_millis(250), "{took:?}");
        assert_eq!(proxy.bytes_sent(), SHAPED_LEN as u64);
    }

    #[test]
    fn requests_are_logged_and_replies_counted_per_client() {
        let (upstream, data) = serve_bytes(1000);
        let proxy = DelayProxy::start_on("127.0.0.2:0", &upstream, Duration::ZERO).unwrap();
        assert!(proxy.host().starts_with("127.0.0.2:"), "{}", proxy.host());
        let mut c = TcpStream::connect(proxy.host()).unwrap();
        c.write_all(b"GET /v2/a/blobs/sha256:00 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert!(got == data, "the reply arrived changed");
        assert_eq!(
            proxy.requests(),
            vec![ProxiedRequest {
                client: "127.0.0.1".parse().unwrap(),
                method: "GET".into(),
                path: "/v2/a/blobs/sha256:00".into(),
                range: Some("bytes=0-99".into()),
            }]
        );
        assert_eq!(proxy.bytes_sent_to("127.0.0.1".parse().unwrap()), 1000);
        assert_eq!(proxy.bytes_sent_to("127.0.0.3".parse().unwrap()), 0);
        assert_eq!(
            parse_request(IpAddr::from([127, 0, 0, 1]), b"\x16\x03binary"),
            None
        );
    }
}
