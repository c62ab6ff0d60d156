//! tcpgate: a transparent, token-authenticated TCP proxy whose data path runs
//! in the kernel.

/// The eBPF object, compiled by build.rs for the bpf target, with BTF.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpgate"));

pub mod auth;
