//! The one kind of socket pair the agent's processes talk over.

use std::os::fd::OwnedFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair, close-on-exec: each message arrives whole
/// (with the descriptors attached to it), and an end that closes is seen as EOF. How the
/// init talks to its shim server, the agent to its own, and a shim to its reaper.
pub fn seqpacket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}
