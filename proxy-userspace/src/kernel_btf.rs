//! The one kernel layout fact the verdict program needs: where `struct
//! sk_buff` keeps its control block (`cb`), in which TCP stores a segment's
//! sequence numbers. Read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`) with a minimal parser, because aya does not
//! expose struct members. When anything is off, the answer is 0 and the
//! verdict does without (see `proxy-ebpf/src/overlap.rs`).

use std::path::Path;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("truncated BTF at byte {0}")]
    Truncated(usize),
    #[error("not little-endian BTF (magic {0:#06x})")]
    BadMagic(u16),
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("no struct {0} with a member {1}")]
    NotFound(&'static str, &'static str),
}

/// `offsetof(struct sk_buff, cb)` in the running kernel, checked against
/// `struct tcp_skb_cb` starting with `seq`; 0 (with a warning) otherwise.
#[must_use]
pub fn skb_cb_offset() -> u32 {
    match std::fs::read(Path::new(VMLINUX)) {
        Ok(btf) => match cb_offset_in(&btf) {
            Ok(offset) => offset,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find sk_buff.cb in the kernel's BTF; retransmitted bytes cannot be told apart on the kernel path");
                0
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, path = VMLINUX, "cannot read the kernel's BTF; retransmitted bytes cannot be told apart on the kernel path");
            0
        }
    }
}

/// The byte offset of `sk_buff.cb`, if `tcp_skb_cb.seq` is at its start.
pub fn cb_offset_in(btf: &[u8]) -> Result<u32, BtfError> {
    let seq = member_bit_offset(btf, "tcp_skb_cb", "seq")?;
    if seq != 0 {
        return Err(BtfError::NotFound("tcp_skb_cb", "seq"));
    }
    let cb = member_bit_offset(btf, "sk_buff", "cb")?;
    if cb % 8 != 0 || cb == 0 {
        return Err(BtfError::NotFound("sk_buff", "cb"));
    }
    Ok(cb / 8)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

fn name_at(strings: &[u8], offset: u32) -> &[u8] {
    let tail = strings.get(offset as usize..).unwrap_or_default();
    let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
    &tail[..end]
}

/// Bit offset of member `member` of the struct named `name`.
fn member_bit_offset(b: &[u8], name: &'static str, member: &'static str) -> Result<u32, BtfError> {
    let magic = b.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
    match magic {
        Some(MAGIC) => {}
        Some(other) => return Err(BtfError::BadMagic(other)),
        None => return Err(BtfError::Truncated(0)),
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
    let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
    let strings = b
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or(BtfError::Truncated(hdr_len + str_off))?;
    let mut at = hdr_len + type_off;
    let end = at + type_len;
    while at < end {
        let (name_off, info) = (u32_at(b, at)?, u32_at(b, at + 4)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kflag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,
            2 | 7..=12 | 16 | 18 => 0,
            3 => 12,
            KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            other => return Err(BtfError::UnknownKind(other)),
        };
        if kind == KIND_STRUCT && name_at(strings, name_off) == name.as_bytes() {
            for i in 0..vlen {
                let m = at + 12 * i;
                if name_at(strings, u32_at(b, m)?) == member.as_bytes() {
                    let offset = u32_at(b, m + 8)?;
                    // With kflag, the top 8 bits hold a bitfield's size.
                    return Ok(if kflag { offset & 0x00ff_ffff } else { offset });
                }
            }
        }
        at += extra;
    }
    Err(BtfError::NotFound(name, member))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: an int, then the given structs `(name, [(member, bit offset)])`.
    fn blob(structs: &[(&str, &[(&str, u32)])]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let at = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            at
        };
        let mut types = Vec::new();
        let int_name = name("int");
        for v in [int_name, 1 << 24, 4, 32] {
            types.extend_from_slice(&u32::to_le_bytes(v));
        }
        for (sname, members) in structs {
            let n = name(sname);
            let info = (KIND_STRUCT << 24) | members.len() as u32;
            for v in [n, info, 64] {
                types.extend_from_slice(&u32::to_le_bytes(v));
            }
            for (mname, offset) in members.iter() {
                let m = name(mname);
                for v in [m, 1, *offset] {
                    types.extend_from_slice(&u32::to_le_bytes(v));
                }
            }
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&u32::to_le_bytes(v));
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_the_control_block_offset() {
        let b = blob(&[
            ("tcp_skb_cb", &[("seq", 0), ("end_seq", 32)]),
            ("sk_buff", &[("sk", 192), ("cb", 320), ("len", 896)]),
        ]);
        assert_eq!(cb_offset_in(&b), Ok(40));
    }

    #[test]
    fn a_moved_sequence_number_is_refused() {
        let b = blob(&[
            ("tcp_skb_cb", &[("end_seq", 0), ("seq", 32)]),
            ("sk_buff", &[("cb", 320)]),
        ]);
        assert_eq!(
            cb_offset_in(&b),
            Err(BtfError::NotFound("tcp_skb_cb", "seq"))
        );
    }

    #[test]
    fn missing_structs_and_bad_blobs_are_errors() {
        let b = blob(&[("tcp_skb_cb", &[("seq", 0)])]);
        assert_eq!(cb_offset_in(&b), Err(BtfError::NotFound("sk_buff", "cb")));
        assert_eq!(cb_offset_in(&[0xeb, 0x9f]), Err(BtfError::BadMagic(0x9feb)));
        assert_eq!(cb_offset_in(&[]), Err(BtfError::Truncated(0)));
        let mut cut = blob(&[("sk_buff", &[("cb", 320)])]);
        cut.truncate(30);
        assert!(cb_offset_in(&cut).is_err());
    }

    #[test]
    fn the_running_kernel_has_one() {
        // Every kernel tcpgate supports has BTF; where it is missing, the
        // agent warns and runs without the check, so this only reports.
        if let Ok(b) = std::fs::read(VMLINUX) {
            let offset = cb_offset_in(&b).expect("sk_buff.cb in the kernel's BTF");
            assert!(offset > 0 && offset < 256, "{offset}");
        }
    }
}
