//! `bpf()` commands aya 0.14 offers only on what tcpgate does not keep:
//! the map batch operations (used by `map_batch`) and running a loaded
//! program by its descriptor. aya runs a program only through its
//! `Ebpf` object, which the routed path does not hold after start; the
//! flow watch runs `tcpgate_routed_sweep` every poll and
//! `tcpgate_routed_end` at each expiry or revocation.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_PROG_TEST_RUN` (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs the `bpf()` command `cmd` on `attr`, the member of `union
/// bpf_attr` for that command (the kernel may write results into it).
///
/// # Safety
///
/// `A` must be that member's layout, and every pointer in `attr` valid
/// for what the command reads or writes through it.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: the caller vouches for `attr`'s layout and pointers; its
    // size is passed, so the kernel reads no further.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The `test` member of `union bpf_attr`, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs a loaded tc (`sched_cls`) program once on `frame`, an Ethernet
/// frame of at least 14 bytes, and returns what the program returned. The
/// frame is the program's input, and receives what the program wrote into
/// it: nothing is sent or received.
pub fn run_skb_program(program: BorrowedFd<'_>, frame: &mut [u8]) -> io::Result<u32> {
    let size = u32::try_from(frame.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(program.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?,
        data_size_in: size,
        data_size_out: size,
        data_in: frame.as_ptr() as u64,
        data_out: frame.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: `TestRunAttr` is the `test` member's layout; `data_in` points
    // at `data_size_in` readable bytes and `data_out` at as many writable
    // ones (the same: the kernel copies the input in before it runs the
    // program, and the output out after; the program cannot grow it).
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr)? };
    Ok(attr.retval)
}

/// Reads a `T` from the start of `bytes`, at any alignment; `None` when
/// there are fewer than `size_of::<T>()` bytes.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `Pod` types are plain data, valid for any bit pattern, and
    // `bytes` holds at least `size_of::<T>()` bytes; `read_unaligned`
    // copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}
