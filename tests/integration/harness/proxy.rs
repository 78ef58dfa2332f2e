//! A TCP fault proxy between conch and one etcd member, under test control.
//!
//! Faults act like a network, not like a broken program: a stalled direction keeps reading
//! (so the sender is never blocked) and holds the bytes back, then delivers them in order
//! when the fault heals — exactly what TCP does after a partition heals. So "answers lost,
//! then answers come late" is `stall_replies()` followed by `pass()`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Hold back both directions (a partition); delivered late on `pass()`.
    Blackhole,
    /// Requests still arrive; answers are held back (delivered late on `pass()`).
    StallReplies,
    /// Forward both ways, each chunk after this delay.
    Delay(Duration),
    /// Refuse new connections (accept and reset them); existing ones are reset by `reset()`.
    Refuse,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    changed: Condvar,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy: `addr()` is what conch is pointed at.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || accept_loop(listener, target, s));
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `--endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        self.shared.changed.notify_all();
    }

    pub fn pass(&self) {
        self.set(Mode::Pass)
    }
    pub fn blackhole(&self) {
        self.set(Mode::Blackhole)
    }
    pub fn stall_replies(&self) {
        self.set(Mode::StallReplies)
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap()
    }

    /// Reset every open connection (both sides see the connection drop).
    pub fn reset(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        self.reset();
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if *shared.mode.lock().unwrap() == Mode::Refuse {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut conns = shared.conns.lock().unwrap();
            conns.push(client.try_clone().unwrap());
            conns.push(server.try_clone().unwrap());
        }
        for (from, to, reply) in [
            (
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                false,
            ),
            (server, client, true),
        ] {
            let s = Arc::clone(&shared);
            std::thread::spawn(move || pump(from, to, reply, s));
        }
    }
}

/// Bytes read but not yet delivered, and whether the sender has closed; with its signal.
type Queue = (Mutex<(Vec<u8>, bool)>, Condvar);

/// Copy `from` → `to`, applying the mode; `reply` is the etcd → conch direction.
fn pump(mut from: TcpStream, to: TcpStream, reply: bool, shared: Arc<Shared>) {
    // A writer thread delivers what the reader queued, waiting while the direction is held.
    let queue: Arc<Queue> = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
    let q = Arc::clone(&queue);
    let s = Arc::clone(&shared);
    let writer = std::thread::spawn(move || {
        let mut to = to;
        loop {
            let chunk = {
                let (lock, cv) = &*q;
                let mut g = lock.lock().unwrap();
                loop {
                    if g.0.is_empty() && g.1 {
                        // The sender closed: pass the close on.
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    if !g.0.is_empty() {
                        break;
                    }
                    g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
                }
                // Held back while this direction is faulted.
                loop {
                    let mode = *s.mode.lock().unwrap();
                    let held =
                        matches!(mode, Mode::Blackhole) || (reply && mode == Mode::StallReplies);
                    if !held || s.stop.load(Ordering::SeqCst) {
                        if let Mode::Delay(d) = mode {
                            drop(g);
                            std::thread::sleep(d);
                            g = q.0.lock().unwrap();
                        }
                        break;
                    }
                    drop(g);
                    let m = s.mode.lock().unwrap();
                    let _ = s
                        .changed
                        .wait_timeout(m, Duration::from_millis(20))
                        .unwrap();
                    g = q.0.lock().unwrap();
                }
                std::mem::take(&mut g.0)
            };
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let (lock, cv) = &*queue;
                lock.lock().unwrap().0.extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        }
    }
    {
        let (lock, cv) = &*queue;
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    }
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
}
