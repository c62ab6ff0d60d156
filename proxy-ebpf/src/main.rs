//! tcpgate's eBPF programs. One small module per program; the maps they share
//! live in [`maps`].
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod atomic;
#[cfg(target_arch = "bpf")]
mod local_socket;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod overlap;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod routed_end;
#[cfg(target_arch = "bpf")]
mod routed_in;
#[cfg(target_arch = "bpf")]
mod routed_out;
#[cfg(target_arch = "bpf")]
mod routed_sweep;
#[cfg(target_arch = "bpf")]
mod screen;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so
    // this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The host build of this binary is a placeholder; see `lib.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
