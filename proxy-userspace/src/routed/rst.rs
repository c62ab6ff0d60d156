//! RSTs the agent sends to end a routed flow: one to each end, from the
//! other end's address, carrying the sequence number the tc programs
//! tracked, so the endpoint takes it (an exact `rcv_nxt` match resets; a
//! guess inside the window would only draw a challenge ACK).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const IP_HEADER: usize = 20;
const TCP_HEADER: usize = 20;
const TCP_RST: u8 = 0x04;

/// A raw IPv4 socket carrying the agent's upstream mark, so the guard
/// and the intercept table let its packets out.
pub struct RstSender {
    socket: OwnedFd,
}

impl RstSender {
    pub fn new(upstream_mark: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mark = upstream_mark;
        // SAFETY: SO_MARK takes a u32 by pointer and length, both valid here.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&raw const mark).cast(),
                size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { socket })
    }

    /// Sends one RST from `from` to `to` with sequence number `seq`.
    pub fn send(&self, from: SocketAddrV4, to: SocketAddrV4, seq: u32) -> io::Result<()> {
        let packet = segment(from, to, seq);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The IPv4 + TCP RST, checksummed (the kernel fills the IP header's
/// checksum and length in anyway with `IPPROTO_RAW`).
#[must_use]
pub fn segment(from: SocketAddrV4, to: SocketAddrV4, seq: u32) -> [u8; IP_HEADER + TCP_HEADER] {
    let mut p = [0u8; IP_HEADER + TCP_HEADER];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((IP_HEADER + TCP_HEADER) as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let ip_sum = checksum(&p[..IP_HEADER], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[IP_HEADER..];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = ((TCP_HEADER / 4) as u8) << 4;
    tcp[13] = TCP_RST;
    let mut pseudo = 0u32;
    for chunk in from
        .ip()
        .octets()
        .chunks(2)
        .chain(to.ip().octets().chunks(2))
    {
        pseudo += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    pseudo += u32::from(libc::IPPROTO_TCP as u16) + TCP_HEADER as u32;
    let tcp_sum = checksum(tcp, pseudo);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The Internet checksum of `data`, starting from the partial sum `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let hi = chunk[0];
        let lo = chunk.get(1).copied().unwrap_or(0);
        sum += u32::from(u16::from_be_bytes([hi, lo]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_checksums_to_zero_and_carries_the_rst() {
        let from: SocketAddrV4 = "192.0.2.10:9000".parse().expect("addr");
        let to: SocketAddrV4 = "198.51.100.2:40000".parse().expect("addr");
        let p = segment(from, to, 0xdead_beef);
        assert_eq!(checksum(&p[..IP_HEADER], 0), 0, "IP header");
        let tcp = &p[IP_HEADER..];
        let mut pseudo = 0u32;
        for pair in p[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        pseudo += 6 + 20;
        assert_eq!(checksum(tcp, pseudo), 0, "TCP with pseudo-header");
        assert_eq!(&tcp[4..8], &0xdead_beef_u32.to_be_bytes());
        assert_eq!(tcp[13], TCP_RST);
        assert_eq!(&tcp[0..4], &[0x23, 0x28, 0x9c, 0x40]);
    }
}
