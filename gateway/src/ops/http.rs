//! The operations listener: a small HTTP/1.1 server for GET requests, one
//! response per connection. Written here instead of pulling an HTTP stack:
//! four read-only pages, no bodies to parse, and the gateway already has
//! tokio.
//!
//! - `/` the status page (HTML), `/metrics` (Prometheus),
//!   `/status.json`, `/health` (200 or 503).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Ops;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("http.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Client(String),
}

/// Requests are read within this time, and their head is at most this big.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 8192;
/// Connections served at once. When all are taken, the one that has been
/// waiting longest for its request head is closed to make room (idle
/// sockets cannot starve `/health`, which the watchdog's view depends on).
const MAX_CONNECTIONS: usize = 32;
/// A response must be written within this time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections still reading their request head, oldest first: the ones
/// shed when every slot is taken.
#[derive(Default)]
struct Waiting {
    next_id: u64,
    queue: std::collections::VecDeque<(u64, CancellationToken)>,
}

/// A running listener.
pub struct HttpHandle {
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl HttpHandle {
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves `ops` until shut down.
pub async fn start(addr: SocketAddr, ops: Arc<Ops>) -> Result<HttpHandle, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    info!(addr = %local_addr, "HTTP listener: status page on /, metrics on /metrics");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let waiting = Arc::new(std::sync::Mutex::new(Waiting::default()));
        tokio::spawn(ops.clone().sample_drain_rate(token.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = token.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // Shed the oldest connection still sending its head.
                    let oldest = waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue
                        .pop_front();
                    if let Some((_, t)) = oldest {
                        debug!(peer = %peer, "HTTP: all slots taken, closing the oldest idle connection");
                        t.cancel();
                    }
                    tokio::select! {
                        _ = token.cancelled() => return,
                        p = slots.clone().acquire_owned() => p.expect("never closed"),
                    }
                }
            };
            let cancel = token.child_token();
            let id = {
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                w.next_id += 1;
                let id = w.next_id;
                w.queue.push_back((id, cancel.clone()));
                id
            };
            let ops = ops.clone();
            let waiting = waiting.clone();
            tokio::spawn(async move {
                let head_read = || {
                    let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                    w.queue.retain(|(i, _)| *i != id);
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = serve(stream, &ops, head_read) => if let Err(e) = r {
                        debug!(peer = %peer, error = %e, "HTTP request failed");
                    }
                }
                let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                w.queue.retain(|(i, _)| *i != id);
                drop(w);
                drop(permit);
            });
        }
    });
    Ok(HttpHandle {
        local_addr,
        shutdown,
        task,
    })
}

/// A response: status, content type, body.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads one request and answers it. `head_read` is called once the head
/// is in: from then on the connection is no longer one to shed.
async fn serve(mut stream: TcpStream, ops: &Ops, head_read: impl FnOnce()) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await;
    head_read();
    let (head_only, response) = match head {
        Err(_) => (false, Response::text(408, "request not received in time\n")),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(r))) => (false, r),
        Ok(Ok(Ok((method, path)))) => (method == "HEAD", route(ops, &method, &path).await),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    match tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Reads the request head; its method and path, or the error response.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<(String, String), Response>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(Response::text(431, "request head too large\n")));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(Response::text(400, "incomplete request\n")));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(Err(Response::text(400, "malformed request line\n")));
    };
    if !version.starts_with("HTTP/1.") {
        return Ok(Err(Response::text(400, "HTTP/1.x only\n")));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    Ok(Ok((method.to_owned(), path.to_owned())))
}

async fn route(ops: &Ops, method: &str, path: &str) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "GET only\n");
    }
    match path {
        "/" | "/index.html" => Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: super::page::render(&ops.status(true).await).into_bytes(),
        },
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: super::metrics::render(ops).await.into_bytes(),
        },
        "/status.json" => Response {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_vec(&ops.status(false).await).unwrap_or_default(),
        },
        "/health" => {
            let stuck = ops.health.stuck(ops.stale_after);
            if stuck.is_empty() {
                Response::text(200, "ok\n")
            } else {
                let what: Vec<String> = stuck
                    .iter()
                    .map(|(n, age)| format!("{n} silent for {:.1} s", age.as_secs_f64()))
                    .collect();
                Response::text(503, format!("stuck: {}\n", what.join(", ")))
            }
        }
        _ => Response::text(404, "not found: try /, /metrics, /status.json, /health\n"),
    }
}

/// `GET path` from a running gateway (blocking; for `capteurs-gateway
/// status`): the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    use std::io::{Read, Write};
    let err = |e: std::io::Error| HttpError::Client(format!("http://{addr}{path}: {e}"));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(err)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Client(format!("http://{addr}{path}: not an HTTP response")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| HttpError::Client(format!("http://{addr}{path}: no status code")))?;
    Ok((status, body.to_owned()))
}
