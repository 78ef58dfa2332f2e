//! The wire format between conch and its supervisor: fixed 16-byte packets on one
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)`, so every `recv` yields exactly one whole message and
//! end-of-file means the other process closed its end (or died).
//!
//! Layout, little-endian: `kind: u32`, `a: i32`, `b: u64`.
//!
//! | kind | direction          | meaning                                   | a      | b           |
//! |------|--------------------|-------------------------------------------|--------|-------------|
//! | 1    | supervisor → conch | child spawned; its pidfd rides along      | pid    | 0           |
//! | 2    | supervisor → conch | spawn failed                              | errno  | 0           |
//! | 3    | supervisor → conch | child exited with a code                  | code   | 0           |
//! | 4    | supervisor → conch | child killed by a signal                  | signal | 0           |
//! | 5    | conch → supervisor | the tree must be dead by this instant     | 0      | boottime ns |
//! | 6    | conch → supervisor | the tree is empty; conch finishes normally| 0      | 0           |
//!
//! A deadline of 0 means "none". Sending never blocks and never raises SIGPIPE; a packet of
//! any other size or kind is a protocol error, which both sides treat like end-of-file.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Size of every packet.
pub(crate) const LEN: usize = 16;

/// One message, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Msg {
    /// The child runs with this pid; its pidfd is attached (`SCM_RIGHTS`).
    Spawned { pid: i32 },
    /// `fork`/`exec` or the pre-exec containment failed with this errno.
    SpawnFailed { errno: i32 },
    /// The direct child exited with this code (the supervisor has seen, not yet reaped, it).
    Exited { code: i32 },
    /// The direct child was killed by this signal.
    Signaled { signal: i32 },
    /// The whole tree must be dead by this `CLOCK_BOOTTIME` instant (ns); `None`: no deadline.
    Deadline { boot_ns: Option<u64> },
    /// The tree is empty and conch finishes normally: exit once the socket closes.
    Done,
    /// conch → a warm supervisor: start the child; the attached fd is a memfd holding the
    /// child's spec ([`encode_spec`]).
    Go,
}

impl Msg {
    pub(crate) fn encode(self) -> [u8; LEN] {
        let (kind, a, b): (u32, i32, u64) = match self {
            Msg::Spawned { pid } => (1, pid, 0),
            Msg::SpawnFailed { errno } => (2, errno, 0),
            Msg::Exited { code } => (3, code, 0),
            Msg::Signaled { signal } => (4, signal, 0),
            Msg::Deadline { boot_ns } => (5, 0, boot_ns.unwrap_or(0)),
            Msg::Done => (6, 0, 0),
            Msg::Go => (7, 0, 0),
        };
        let mut out = [0u8; LEN];
        out[0..4].copy_from_slice(&kind.to_le_bytes());
        out[4..8].copy_from_slice(&a.to_le_bytes());
        out[8..16].copy_from_slice(&b.to_le_bytes());
        out
    }

    /// `None` for anything that is not exactly one well-formed packet.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Msg> {
        let bytes: &[u8; LEN] = bytes.try_into().ok()?;
        let kind = u32::from_le_bytes(bytes[0..4].try_into().ok()?);
        let a = i32::from_le_bytes(bytes[4..8].try_into().ok()?);
        let b = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
        let msg = match kind {
            1 if a > 0 => Msg::Spawned { pid: a },
            2 => Msg::SpawnFailed { errno: a },
            3 => Msg::Exited { code: a },
            4 => Msg::Signaled { signal: a },
            5 => Msg::Deadline {
                boot_ns: (b != 0).then_some(b),
            },
            6 => Msg::Done,
            7 => Msg::Go,
            _ => return None,
        };
        Some(msg)
    }
}

/// Send one packet (with `fd` attached, if given). Never blocks: a full socket buffer is
/// `EAGAIN`, which cannot happen with the few packets either side ever sends unread.
pub(crate) fn send(sock: BorrowedFd<'_>, msg: Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = msg.encode();
    let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    let fds;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("control buffer too small"));
        }
    }
    let sent = rustix::net::sendmsg(sock, &[IoSlice::new(&bytes)], &mut control, flags)?;
    if sent != LEN {
        return Err(io::Error::other("short send on a SEQPACKET socket"));
    }
    Ok(())
}

/// What one `recv` produced.
#[derive(Debug)]
pub(crate) enum Received {
    /// A message, with the fd that came with it (close-on-exec), if any.
    Msg(Msg, Option<OwnedFd>),
    /// The other end is closed, or sent something that is not a message.
    Closed,
    /// Nothing to read yet (only without `block`).
    Empty,
}

/// Receive one packet. With `block` false the call never waits. Received fds are
/// close-on-exec; extra fds beyond the first are closed.
pub(crate) fn recv(sock: impl AsFd, block: bool) -> io::Result<Received> {
    let mut buf = [0u8; 2 * LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if !block {
        flags |= RecvFlags::DONTWAIT;
    }
    let got = loop {
        match rustix::net::recvmsg(
            sock.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            flags,
        ) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(Received::Empty),
            // The peer died with data unread: as good as end-of-file.
            Err(rustix::io::Errno::CONNRESET) => return Ok(Received::Closed),
            Err(e) => return Err(e.into()),
        }
    };
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received in fds {
                fd.get_or_insert(received);
            }
        }
    }
    if got.bytes == 0 {
        return Ok(Received::Closed);
    }
    Ok(match Msg::decode(&buf[..got.bytes.min(buf.len())]) {
        Some(msg) if got.bytes == LEN => Received::Msg(msg, fd),
        _ => Received::Closed,
    })
}

/// Largest spec a warm supervisor reads: argv and environment are bounded by the kernel's
/// `ARG_MAX` (2 MiB here) anyway.
pub(crate) const SPEC_MAX: usize = 16 << 20;

/// A warm supervisor's spec: its arguments (as [`super::Args::to_os_args`] writes them) and the
/// child's whole environment (`KEY=value`). Each list is a little-endian `u32` count, then
/// each item as a `u32` length and its bytes.
pub(crate) fn encode_spec(args: &[OsString], env: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for list in [args, env] {
        out.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for item in list {
            let bytes = item.as_bytes();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// The inverse of [`encode_spec`]; `None` for anything it did not write.
pub(crate) fn decode_spec(mut bytes: &[u8]) -> Option<(Vec<OsString>, Vec<OsString>)> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        bytes = rest;
        Some(head)
    };
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
        for _ in 0..count {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            list.push(OsString::from_vec(take(len)?.to_vec()));
        }
    }
    let [args, env] = lists;
    take(1).is_none().then_some((args, env))
}

/// A connected, close-on-exec pair.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let all = [
            Msg::Spawned { pid: 4242 },
            Msg::SpawnFailed { errno: 2 },
            Msg::Exited { code: 0 },
            Msg::Exited { code: 255 },
            Msg::Exited { code: -1 },
            Msg::Signaled { signal: 9 },
            Msg::Deadline { boot_ns: None },
            Msg::Deadline {
                boot_ns: Some(u64::MAX),
            },
            Msg::Deadline {
                boot_ns: Some(1_234_567_890_123),
            },
            Msg::Done,
            Msg::Go,
        ];
        for msg in all {
            assert_eq!(Msg::decode(&msg.encode()), Some(msg), "{msg:?}");
        }
    }

    #[test]
    fn specs_round_trip_and_garbage_is_refused() {
        let args: Vec<OsString> = ["--fd", "3", "--pgroup", "--", "/bin/sh", "sh", "", "-c"]
            .map(OsString::from)
            .to_vec();
        let env: Vec<OsString> = ["A=1", "EMPTY=", "ODD=\u{e9}\n="]
            .map(OsString::from)
            .to_vec();
        let bytes = encode_spec(&args, &env);
        assert_eq!(decode_spec(&bytes), Some((args.clone(), env.clone())));
        assert_eq!(decode_spec(&encode_spec(&[], &[])), Some((vec![], vec![])));
        for cut in 0..bytes.len() {
            assert_eq!(decode_spec(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_spec(&longer), None, "trailing bytes");
        assert_eq!(
            decode_spec(&[255, 255, 255, 255]),
            None,
            "a count with nothing behind it"
        );
    }

    #[test]
    fn the_layout_is_fixed() {
        let d = Msg::Deadline {
            boot_ns: Some(0x0102_0304_0506_0708),
        };
        assert_eq!(d.encode(), [5, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(
            Msg::Signaled { signal: 15 }.encode()[..8],
            [4, 0, 0, 0, 15, 0, 0, 0]
        );
    }

    #[test]
    fn malformed_packets_are_rejected() {
        assert_eq!(Msg::decode(&[]), None);
        assert_eq!(Msg::decode(&[6; 15]), None);
        assert_eq!(Msg::decode(&[0; 17]), None);
        let mut unknown = Msg::Done.encode();
        unknown[0] = 8;
        assert_eq!(Msg::decode(&unknown), None);
        let mut zero_pid = Msg::Spawned { pid: 1 }.encode();
        zero_pid[4] = 0;
        assert_eq!(
            Msg::decode(&zero_pid),
            None,
            "a spawned pid must be positive"
        );
    }

    #[test]
    fn packets_and_fds_cross_a_socketpair() {
        let (a, b) = pair().unwrap();
        assert!(matches!(recv(&b, false).unwrap(), Received::Empty));
        let (r, _w) = rustix::pipe::pipe().unwrap();
        send(a.as_fd(), Msg::Spawned { pid: 7 }, Some(r.as_fd())).unwrap();
        send(a.as_fd(), Msg::Exited { code: 3 }, None).unwrap();
        match recv(&b, true).unwrap() {
            Received::Msg(Msg::Spawned { pid: 7 }, Some(fd)) => {
                let flags = rustix::io::fcntl_getfd(&fd).unwrap();
                assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            recv(&b, true).unwrap(),
            Received::Msg(Msg::Exited { code: 3 }, None)
        ));
        // Packets keep their boundaries; a stray short packet is a protocol error.
        rustix::net::send(&a, &[1, 2, 3], SendFlags::empty()).unwrap();
        assert!(matches!(recv(&b, true).unwrap(), Received::Closed));
        drop(a);
        assert!(matches!(recv(&b, true).unwrap(), Received::Closed));
        assert!(
            send(b.as_fd(), Msg::Done, None).is_err(),
            "no SIGPIPE, an error"
        );
    }
}
