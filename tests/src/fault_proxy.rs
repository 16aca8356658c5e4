//! An HTTP proxy on a loopback port that misbehaves on purpose, in front of a real registry or
//! S3 server: the faults a backend, a load balancer or a broken middlebox bring, which a
//! `FaultyBlobStore` (below the HTTP client) cannot show.
//!
//! Each client connection carries one request: the proxy reads the request head (and a body with
//! a `Content-Length`), sends it upstream on a fresh connection with `Connection: close`, reads
//! the whole answer, and passes it on with `Connection: close`, so the client never reuses a
//! connection the proxy has damaged. A fault applies to *ranged* GETs only (a `Range` header: the
//! fetcher's chunk requests), so manifests and indexes pass untouched and a mount can open while
//! its chunk requests fail. [`FaultProxy::inject`] arms a fault for the next N ranged GETs (or
//! until [`FaultProxy::heal`]); requests already being answered keep the fault they started
//! with.
//!
//! The registry client tries TLS first on a loopback host and falls back to plain HTTP when the
//! handshake fails; a connection that opens with a TLS record is therefore closed at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// Longest request or response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// How long the proxy waits for a client's request or an upstream answer before giving up on the
/// connection (a trickled body is written slowly, not waited for).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What the proxy does to a ranged GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFault {
    /// Passes the body at `bytes_per_sec` (the head at once): a server that still answers but
    /// too slowly to be of use, which no per-read idle timeout notices.
    Trickle { bytes_per_sec: u64 },
    /// Passes the head and half the body, then resets the connection (RST).
    ResetMidBody,
    /// Passes the head and half the body, then closes the connection cleanly: a body shorter
    /// than its `Content-Length`.
    Truncate,
    /// Flips the lowest bit of the middle byte of the body.
    FlipByte,
    /// Asks upstream for the range one byte off (earlier, or later for a range at offset 0) and
    /// passes its honest answer: other bytes, under a `Content-Range` naming them.
    ShiftedRange,
    /// Passes the right bytes under a `Content-Range` header naming the range one byte later.
    WrongContentRange,
    /// Closes the connection without answering (a server that crashed or dropped the request).
    NoAnswer,
    /// Answers `status` itself (with `Retry-After: SECONDS` when `retry_after` is set) without
    /// asking upstream: 503 bursts, 429 throttling.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
}

#[derive(Debug)]
struct Armed {
    fault: HttpFault,
    /// Ranged GETs left to damage.
    left: u64,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<Option<Armed>>,
    ranged: AtomicU64,
    injected: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// The fault for the next ranged GET, if one is armed; counts it.
    fn take(&self) -> Option<HttpFault> {
        self.ranged.fetch_add(1, Ordering::Relaxed);
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        let current = armed.as_mut()?;
        let fault = current.fault;
        current.left -= 1;
        if current.left == 0 {
            *armed = None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }
}

/// A running proxy; stops accepting on drop.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream` (`HOST:PORT`), passing
    /// everything until a fault is injected.
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_string();
        let accepting = shared.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let shared = accepting.clone();
                let upstream = upstream.clone();
                thread::spawn(move || {
                    // A connection that fails (a client that gave up, upstream down) just ends,
                    // as it would at a real proxy.
                    let _ = serve(client, &upstream, &shared);
                });
            }
        });
        Ok(FaultProxy { port, shared })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `times` ranged GETs, then passes them again.
    pub fn inject(&self, fault: HttpFault, times: u64) {
        assert!(times > 0, "inject a fault at least once");
        *self
            .shared
            .armed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Armed { fault, left: times });
    }

    /// Applies `fault` to every ranged GET until [`FaultProxy::heal`].
    pub fn inject_always(&self, fault: HttpFault) {
        self.inject(fault, u64::MAX);
    }

    /// Passes every request from now on.
    pub fn heal(&self) {
        *self
            .shared
            .armed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Ranged GETs received so far.
    pub fn ranged_requests(&self) -> u64 {
        self.shared.ranged.load(Ordering::Relaxed)
    }

    /// Ranged GETs damaged so far.
    pub fn faults_injected(&self) -> u64 {
        self.shared.injected.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// An HTTP message head: the first line and the header fields, in order.
struct Head {
    line: String,
    fields: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: &str, value: String) {
        self.remove(name);
        self.fields.push((name.to_string(), value));
    }

    fn remove(&mut self, name: &str) {
        self.fields.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn content_length(&self) -> Result<Option<usize>> {
        self.get("Content-Length")
            .map(|v| v.trim().parse().context("bad Content-Length"))
            .transpose()
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (k, v) in &self.fields {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Reads a message head; `None` when the peer closed before sending one.
fn read_head(reader: &mut impl BufRead) -> Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            ensure!(lines.is_empty(), "connection closed inside a head");
            return Ok(None);
        }
        total += n;
        ensure!(total <= MAX_HEAD, "head longer than {MAX_HEAD} bytes");
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut lines = lines.into_iter();
    let line = lines.next().context("empty head")?;
    let fields = lines
        .map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("bad header line {l:?}"))
        })
        .collect::<Result<_>>()?;
    Ok(Some(Head { line, fields }))
}

/// `bytes=FIRST-LAST` of a `Range` header.
fn parse_range(value: &str) -> Option<(u64, u64)> {
    let (first, last) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// `bytes FIRST-LAST/TOTAL` of a `Content-Range` header.
fn parse_content_range(value: &str) -> Option<(u64, u64, String)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?, total.to_string()))
}

/// Serves one request of `client`.
fn serve(client: TcpStream, upstream: &str, shared: &Shared) -> Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut first = [0u8; 1];
    if client.peek(&mut first)? == 0 || first[0] == TLS_HANDSHAKE {
        // Closing at once fails the TLS handshake, so the client falls back to plain HTTP.
        return Ok(());
    }
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(mut request) = read_head(&mut reader)? else {
        return Ok(());
    };
    ensure!(
        request.get("Transfer-Encoding").is_none(),
        "chunked request bodies are not supported"
    );
    let mut body = vec![0u8; request.content_length()?.unwrap_or(0)];
    reader.read_exact(&mut body)?;
    let range = request.get("Range").and_then(parse_range);
    let fault = if range.is_some() && request.line.starts_with("GET ") {
        shared.take()
    } else {
        None
    };
    let mut client = client;
    if fault == Some(HttpFault::NoAnswer) {
        return Ok(());
    }
    if let Some(HttpFault::Status {
        status,
        retry_after,
    }) = fault
    {
        let text = b"fault injected by the test proxy\n";
        let mut head = Head {
            line: format!("HTTP/1.1 {status} Injected Fault"),
            fields: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("Content-Length".into(), text.len().to_string()),
                ("Connection".into(), "close".into()),
            ],
        };
        if let Some(seconds) = retry_after {
            head.set("Retry-After", seconds.to_string());
        }
        client.write_all(&head.to_bytes())?;
        client.write_all(text)?;
        return Ok(());
    }
    if let (Some(HttpFault::ShiftedRange), Some((first, last))) = (fault, range) {
        let (first, last) = if first > 0 {
            (first - 1, last - 1)
        } else {
            (first + 1, last + 1)
        };
        request.set("Range", format!("bytes={first}-{last}"));
    }
    request.set("Connection", "close".into());
    let mut server = TcpStream::connect(upstream).context("connecting upstream")?;
    server.set_read_timeout(Some(IO_TIMEOUT))?;
    server.write_all(&request.to_bytes())?;
    server.write_all(&body)?;
    let mut from_server = BufReader::new(server);
    let mut answer = read_head(&mut from_server)?.context("upstream closed without answering")?;
    let bodyless = request.line.starts_with("HEAD ")
        || answer.line.contains(" 204 ")
        || answer.line.contains(" 304 ");
    let mut payload = Vec::new();
    match answer.content_length()? {
        _ if bodyless => {}
        Some(len) => {
            payload.resize(len, 0);
            from_server.read_exact(&mut payload)?;
        }
        None => {
            from_server.read_to_end(&mut payload)?;
        }
    }
    answer.remove("Keep-Alive");
    answer.set("Connection", "close".into());
    // Body faults need a body framed by its length, as ranged answers are.
    let framed = answer.get("Transfer-Encoding").is_none() && !payload.is_empty();
    let half = payload.len() / 2;
    match fault.filter(|_| framed) {
        Some(HttpFault::WrongContentRange) => {
            let (first, last, total) = answer
                .get("Content-Range")
                .and_then(parse_content_range)
                .context("a ranged answer without a Content-Range")?;
            answer.set(
                "Content-Range",
                format!("bytes {}-{}/{total}", first + 1, last + 1),
            );
            send(&mut client, &answer, &payload)
        }
        Some(HttpFault::FlipByte) => {
            payload[half] ^= 1;
            send(&mut client, &answer, &payload)
        }
        Some(HttpFault::Truncate) => {
            send(&mut client, &answer, &payload[..half])?;
            client.shutdown(Shutdown::Both)?;
            Ok(())
        }
        Some(HttpFault::ResetMidBody) => {
            send(&mut client, &answer, &payload[..half])?;
            reset(&client)
        }
        Some(HttpFault::Trickle { bytes_per_sec }) => {
            client.write_all(&answer.to_bytes())?;
            let pause = Duration::from_secs(1) / u32::try_from(bytes_per_sec.max(1))?;
            for byte in &payload {
                // Fails once the client has given up and closed.
                client.write_all(std::slice::from_ref(byte))?;
                thread::sleep(pause);
            }
            Ok(())
        }
        Some(HttpFault::ShiftedRange | HttpFault::Status { .. } | HttpFault::NoAnswer) | None => {
            send(&mut client, &answer, &payload)
        }
    }
}

fn send(client: &mut TcpStream, head: &Head, body: &[u8]) -> Result<()> {
    client.write_all(&head.to_bytes())?;
    client.write_all(body)?;
    client.flush()?;
    Ok(())
}

/// Closes `stream` with a reset (RST) instead of a clean close: `SO_LINGER` with a zero
/// timeout makes `close` drop whatever is unsent and reset the connection.
fn reset(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a local of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    // The stream is closed (reset) when the last handle to it is dropped, by our caller.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An upstream serving `data`: a GET with `Range: bytes=A-B` gets a 206 with those bytes,
    /// any other request a 200 with all of them.
    fn upstream(data: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let Ok(Some(head)) = read_head(&mut reader) else {
                    continue;
                };
                let reply = match head.get("Range").and_then(parse_range) {
                    Some((first, last)) => {
                        let body = &data[first as usize..=last as usize];
                        let mut reply = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{}\r\nContent-Length: {}\r\n\r\n",
                            data.len(),
                            body.len()
                        )
                        .into_bytes();
                        reply.extend_from_slice(body);
                        reply
                    }
                    None => {
                        let mut reply =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len())
                                .into_bytes();
                        reply.extend_from_slice(&data);
                        reply
                    }
                };
                let _ = stream.write_all(&reply);
            }
        });
        host
    }

    /// What came back for a GET through `proxy`: the head (`None` when the connection closed
    /// without one) and the body bytes received until the connection ended, or the error that
    /// ended it.
    struct Got {
        head: Option<Head>,
        body: Vec<u8>,
        error: Option<std::io::ErrorKind>,
    }

    fn get(proxy: &FaultProxy, range: Option<(u64, u64)>) -> Got {
        let mut stream = TcpStream::connect(proxy.host()).unwrap();
        let range = range.map_or(String::new(), |(a, b)| format!("Range: bytes={a}-{b}\r\n"));
        write!(stream, "GET /blob HTTP/1.1\r\nHost: x\r\n{range}\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        let head = match read_head(&mut reader) {
            Ok(head) => head,
            // A reset may come before the head is read.
            Err(e) => {
                return Got {
                    head: None,
                    body: Vec::new(),
                    error: e.downcast_ref::<std::io::Error>().map(std::io::Error::kind),
                }
            }
        };
        let mut body = Vec::new();
        let error = reader.read_to_end(&mut body).err().map(|e| e.kind());
        Got { head, body, error }
    }

    #[test]
    fn each_fault_damages_ranged_gets_as_it_says_and_only_those() {
        let data = crate::pseudo_random_bytes(3, 1000);
        let proxy = FaultProxy::start(&upstream(data.clone())).unwrap();
        let want = &data[100..=299];
        let range = Some((100, 299));
        let header =
            |got: &Got, name: &str| got.head.as_ref().unwrap().get(name).map(str::to_string);

        let got = get(&proxy, range);
        assert_eq!(got.body, want);
        assert_eq!(header(&got, "Connection").as_deref(), Some("close"));

        // A GET without a range passes and leaves the fault armed.
        proxy.inject(HttpFault::FlipByte, 2);
        assert_eq!(get(&proxy, None).body, data);
        for _ in 0..2 {
            let got = get(&proxy, range);
            let differing = got.body.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!((got.body.len(), differing), (want.len(), 1));
        }
        assert_eq!(get(&proxy, range).body, want, "armed for two GETs only");
        assert_eq!((proxy.faults_injected(), proxy.ranged_requests()), (2, 4));

        proxy.inject(HttpFault::Truncate, 1);
        let got = get(&proxy, range);
        assert_eq!(got.body, &want[..100]);
        assert_eq!(header(&got, "Content-Length").as_deref(), Some("200"));

        proxy.inject(HttpFault::ResetMidBody, 1);
        let got = get(&proxy, range);
        assert!(got.body.len() <= 100 && want.starts_with(&got.body));
        assert_eq!(got.error, Some(std::io::ErrorKind::ConnectionReset));

        proxy.inject(HttpFault::ShiftedRange, 1);
        let got = get(&proxy, range);
        assert_eq!(got.body, &data[99..=298]);
        assert_eq!(
            header(&got, "Content-Range").as_deref(),
            Some("bytes 99-298/1000")
        );

        proxy.inject(HttpFault::WrongContentRange, 1);
        let got = get(&proxy, range);
        assert_eq!(got.body, want);
        assert_eq!(
            header(&got, "Content-Range").as_deref(),
            Some("bytes 101-300/1000")
        );

        proxy.inject(
            HttpFault::Status {
                status: 429,
                retry_after: Some(7),
            },
            1,
        );
        let got = get(&proxy, range);
        assert!(got.head.as_ref().unwrap().line.starts_with("HTTP/1.1 429 "));
        assert_eq!(header(&got, "Retry-After").as_deref(), Some("7"));

        proxy.inject(HttpFault::NoAnswer, 1);
        let got = get(&proxy, range);
        assert!(got.head.is_none() && got.body.is_empty());

        proxy.inject_always(HttpFault::Trickle {
            bytes_per_sec: 2000,
        });
        let started = Instant::now();
        let got = get(&proxy, range);
        assert_eq!(got.body, want);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(90),
            "200 bytes at 2000 B/s took {took:?}"
        );
        proxy.heal();
        assert_eq!(get(&proxy, range).body, want);
        assert_eq!(proxy.faults_injected(), 9);
    }
}
