//! The 16-byte address form used in every map: IPv6 as is, IPv4 mapped.

/// Prefix of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Bits that the IPv4-mapped prefix adds in front of an IPv4 prefix length.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Maps an IPv4 address (network order octets) into the 16-byte form.
#[must_use]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = octets[0];
    out[13] = octets[1];
    out[14] = octets[2];
    out[15] = octets[3];
    out
}

/// The 16-byte form of `addr`: IPv6 as is, IPv4 mapped. An IPv4-mapped
/// IPv6 address stays as it is, so it and its IPv4 form agree.
#[must_use]
pub const fn ip_octets(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// Nanoseconds since the Unix epoch, as map records hold times (0 before
/// the epoch, saturating far after it).
#[cfg(feature = "user")]
#[must_use]
pub fn unix_ns(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Returns the IPv4 octets if `addr` is IPv4-mapped.
#[must_use]
pub fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[..12] == V4_MAPPED_PREFIX {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// Copies `src` into a fixed, NUL-padded field, truncating at a UTF-8
/// character boundary so the stored bytes stay valid UTF-8.
pub fn fill_str(dst: &mut [u8], src: &str) {
    let mut end = src.len().min(dst.len());
    while end > 0 && !src.is_char_boundary(end) {
        end -= 1;
    }
    dst.fill(0);
    dst[..end].copy_from_slice(&src.as_bytes()[..end]);
}

/// Reads a NUL-padded field written by [`fill_str`].
#[must_use]
pub fn read_str(src: &[u8]) -> &str {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    core::str::from_utf8(&src[..end]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trip() {
        let mapped = v4_mapped([192, 0, 2, 10]);
        assert_eq!(as_v4(&mapped), Some([192, 0, 2, 10]));
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        assert_eq!(as_v4(&v6), None);
        let v4: core::net::IpAddr = core::net::Ipv4Addr::new(192, 0, 2, 10).into();
        assert_eq!(ip_octets(v4), mapped);
        let v6: core::net::IpAddr = core::net::Ipv6Addr::from(v6).into();
        assert_eq!(as_v4(&ip_octets(v6)), None);
    }

    #[test]
    fn strings_truncate_on_char_boundary() {
        let mut field = [0xAAu8; 5];
        fill_str(&mut field, "ab\u{e9}\u{e9}");
        // "ab" + 'é' is 4 bytes; the second 'é' does not fit whole.
        assert_eq!(read_str(&field), "ab\u{e9}");
        assert_eq!(field[4], 0);
    }
}
