//! Compare-and-set on a map value's field. Rust's bpf target offers no
//! `compare_exchange` (its spec says no atomic CAS), but the kernel has
//! the instruction (`BPF_ATOMIC | BPF_CMPXCHG` on 64 bits, since 5.12) and
//! LLVM emits it for the intrinsic (`cmpxchg_64` in the object).
use core::intrinsics::{AtomicOrdering, atomic_cxchg};

/// Sets `*target` to `new` if it holds `current`, as one step no other
/// CPU can come between; whether it did.
#[inline(always)]
pub fn compare_and_set(target: *mut u64, current: u64, new: u64) -> bool {
    // SAFETY: callers pass a field of a map value from a successful
    // lookup: valid, 8-byte aligned, and live while the program runs.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            target, current, new,
        )
        .1
    }
}
