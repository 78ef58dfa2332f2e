//! conchd's read-only status API and page (primitives.md): a deliberately small HTTP/1.1
//! server — GET only, one request per connection, bounded reads and timeouts — so that it
//! needs no web framework. Anything but GET is refused with 405.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::page;
use crate::conchd::metrics::Metrics;
use crate::cron::store::Store;

/// Largest request head read; a GET needs far less.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// The bound socket, made before conchd starts so a bad address fails at once.
#[derive(Debug)]
pub struct Listener {
    inner: std::net::TcpListener,
    pub addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        let inner = std::net::TcpListener::bind(addr)?;
        inner.set_nonblocking(true)?;
        let addr = inner.local_addr()?;
        Ok(Listener { inner, addr })
    }
}

/// What the server reads from.
#[derive(Debug, Clone)]
pub struct Source {
    pub store: Store,
    pub node: String,
    pub metrics: Arc<Metrics>,
}

/// Serve until `cancel`; every connection task is owned and ended with it.
pub async fn serve(listener: Listener, src: Source, cancel: CancellationToken) {
    let addr = listener.addr;
    let Ok(l) = TcpListener::from_std(listener.inner) else {
        tracing::error!(%addr, "cannot serve the status API");
        return;
    };
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the status API is bound to a non-loopback address: anyone who can reach it sees every job's command line");
    }
    tracing::info!(%addr, "status API listening");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            acc = l.accept(), if conns.len() < MAX_CONNECTIONS => {
                let Ok((stream, _)) = acc else { continue };
                let src = src.clone();
                conns.spawn(async move {
                    let _ = tokio::time::timeout(IO_TIMEOUT * 2, handle(stream, src, addr)).await;
                });
            }
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// A response: status line, content type, body.
#[derive(Debug)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn json(code: u16, v: &impl serde::Serialize) -> Response {
        Response {
            code,
            content_type: "application/json",
            body: serde_json::to_string(v).unwrap_or_else(|_| "{}".into()) + "\n",
        }
    }

    fn text(code: u16, body: impl Into<String>) -> Response {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn handle(mut stream: TcpStream, src: Source, addr: SocketAddr) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(p);
        }
        if buf.len() > MAX_HEAD {
            break None;
        }
        match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    // A HEAD request gets the status line and headers only (and 405: GET only).
    let mut head_only = false;
    let resp = match head_end {
        None => Response::text(431, "request head too large\n"),
        Some(end) => {
            let head = String::from_utf8_lossy(&buf[..end]);
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            head_only = method == "HEAD";
            route(method, target, &src, addr).await
        }
    };
    let reason = match resp.code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let allow = if resp.code == 405 {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
        resp.code,
        resp.content_type,
        resp.body.len()
    );
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(resp.body.as_bytes()).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// The routes. Every etcd read is bounded by the request timeout; failures answer 503.
pub async fn route(method: &str, target: &str, src: &Source, addr: SocketAddr) -> Response {
    if method != "GET" {
        return Response::text(405, "the status API is read-only: GET only\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let unavailable = |e: crate::etcd::CallError| {
        Response::json(503, &serde_json::json!({"error": e.to_string()}))
    };
    match path {
        "/healthz" => match src.metrics.health() {
            Ok(()) => Response::text(200, "ok\n"),
            Err(why) => Response::text(503, format!("{why}\n")),
        },
        "/metrics" => Response {
            code: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: src.metrics.render(&src.node),
        },
        "/cron" => match src.store.nodes().await {
            Ok(nodes) => match super::jobs(&src.store, &nodes, true).await {
                Ok(j) => Response::json(200, &j),
                Err(e) => unavailable(e),
            },
            Err(e) => unavailable(e),
        },
        "/elect" => match super::offices(&src.store).await {
            Ok((o, _)) => Response::json(200, &o),
            Err(e) => unavailable(e),
        },
        "/sema" => match super::semaphores(&src.store).await {
            Ok((s, _)) => Response::json(200, &s),
            Err(e) => unavailable(e),
        },
        "/nodes" => match super::read_nodes(&src.store).await {
            Ok(n) => Response::json(200, &n),
            Err(e) => unavailable(e),
        },
        "/" => {
            let snap = super::read(&src.store).await;
            Response {
                code: if snap.is_ok() { 200 } else { 503 },
                content_type: "text/html; charset=utf-8",
                body: page::render(
                    &src.node,
                    addr,
                    snap.as_ref().map_err(|e| e.to_string()),
                    src.metrics.health(),
                ),
            }
        }
        _ => Response::text(
            404,
            "not found: try /, /cron, /elect, /sema, /nodes, /healthz, /metrics\n",
        ),
    }
}
