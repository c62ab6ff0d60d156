//! The few header fields the routed programs read: Ethernet, IPv4 without
//! fragments, TCP. Anything else is "not ours" and left to the normal path.
use aya_ebpf::programs::TcContext;
use proxy_common::routed::{FLOW_RST, FlowKey};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// One TCP segment's addressing and sequence space.
pub struct Segment {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    pub payload: u32,
    /// Offset of the first payload byte in the packet.
    pub payload_at: u32,
}

impl Segment {
    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The key of this segment's flow when it travels runner -> target.
    #[inline(always)]
    pub fn key_up(&self) -> FlowKey {
        FlowKey {
            runner_addr: self.src,
            target_addr: self.dst,
            runner_port: self.sport,
            target_port: self.dport,
        }
    }

    /// The key of this segment's flow when it travels target -> runner.
    #[inline(always)]
    pub fn key_down(&self) -> FlowKey {
        FlowKey {
            runner_addr: self.dst,
            target_addr: self.src,
            runner_port: self.dport,
            target_port: self.sport,
        }
    }

    /// Sequence number just past the segment's payload.
    #[inline(always)]
    pub fn data_end(&self) -> u32 {
        self.seq.wrapping_add(self.payload)
    }
}

/// `a` comes after `b` in sequence space.
#[inline(always)]
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The `T` at `offset`: read in place when the linear part of the packet
/// holds it (the headers almost always are: a helper call per field cost
/// as much as the rest of the program), copied with `bpf_skb_load_bytes`
/// when not.
#[inline(always)]
fn field<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() <= ctx.data_end() {
        // SAFETY: `at..at + size_of::<T>()` lies between `data` and
        // `data_end`, which the check above proves to the verifier; the
        // read is unaligned-safe.
        return Some(unsafe { core::ptr::read_unaligned(at as *const T) });
    }
    ctx.load(offset).ok()
}

/// Source port, destination port, sequence number, data offset byte and
/// flags of the TCP header after an IPv4 header of `ihl` bytes.
#[inline(always)]
fn tcp_head(ctx: &TcContext, ihl: usize) -> Option<(u16, u16, u32, u8, u8)> {
    if ihl == 20 {
        // Constant offsets, so the verifier can bound each read in place;
        // a header with IP options is rare enough for the helper.
        const TCP: usize = ETH_HLEN + 20;
        return Some((
            u16::from_be(field(ctx, TCP)?),
            u16::from_be(field(ctx, TCP + 2)?),
            u32::from_be(field(ctx, TCP + 4)?),
            field(ctx, TCP + 12)?,
            field(ctx, TCP + 13)?,
        ));
    }
    let tcp = ETH_HLEN + ihl;
    Some((
        u16::from_be(ctx.load(tcp).ok()?),
        u16::from_be(ctx.load(tcp + 2).ok()?),
        u32::from_be(ctx.load(tcp + 4).ok()?),
        ctx.load(tcp + 12).ok()?,
        ctx.load(tcp + 13).ok()?,
    ))
}

/// Parses an Ethernet + IPv4 + TCP packet; `None` for anything else,
/// fragments included.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Segment> {
    let proto: u16 = u16::from_be(field(ctx, 12)?);
    if proto != ETH_P_IP {
        return None;
    }
    let vihl: u8 = field(ctx, ETH_HLEN)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let total: u16 = u16::from_be(field(ctx, ETH_HLEN + 2)?);
    let frag: u16 = u16::from_be(field(ctx, ETH_HLEN + 6)?);
    // More fragments, or an offset: not a whole segment.
    if frag & 0x3fff != 0 {
        return None;
    }
    let protocol: u8 = field(ctx, ETH_HLEN + 9)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let src: [u8; 4] = field(ctx, ETH_HLEN + 12)?;
    let dst: [u8; 4] = field(ctx, ETH_HLEN + 16)?;
    let (sport, dport, seq, doff, flags) = tcp_head(ctx, ihl)?;
    let headers = ihl as u32 + u32::from(doff >> 4) * 4;
    let payload = u32::from(total).checked_sub(headers)?;
    Some(Segment {
        src,
        dst,
        sport,
        dport,
        seq,
        flags,
        payload,
        payload_at: ETH_HLEN as u32 + headers,
    })
}

/// Adds what `segment` carries past `next` to `bytes`, and moves `next`:
/// retransmissions count once, empty segments never (an ACK after the FIN
/// sits one past the last byte).
#[inline(always)]
pub fn count_bytes(next: &mut u32, bytes: &mut u64, segment: &Segment) {
    let end = segment.data_end();
    if segment.payload > 0 && seq_after(end, *next) {
        *bytes += u64::from(end.wrapping_sub(*next));
        *next = end;
    }
}

/// The flow flags a segment sets: `fin` for its direction's FIN, and
/// `FLOW_RST` for a reset.
#[inline(always)]
pub fn close_flags(segment: &Segment, fin: u32) -> u32 {
    let mut flags = 0;
    if segment.has(TCP_FIN) {
        flags |= fin;
    }
    if segment.has(TCP_RST) {
        flags |= FLOW_RST;
    }
    flags
}
