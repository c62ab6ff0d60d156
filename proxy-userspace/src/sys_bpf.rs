//! `bpf()` commands aya 0.14 offers only on what tcpgate does not keep:
//! the map batch operations (used by `map_batch`) and running a loaded
//! program by its descriptor. aya runs a program only through its
//! `Ebpf` object, which the routed path does not hold after start; the
//! flow watch runs `tcpgate_routed_sweep` every poll and
//! `tcpgate_routed_end` at each expiry or revocation. A program's run
//! statistics likewise: aya reads them only through the program object.

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

/// `BPF_OBJ_GET_INFO_BY_FD` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// How often a loaded program ran and for how long in all, as the kernel
/// counts while its run statistics are on (`kernel.bpf_stats_enabled`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Reads a loaded program's [`RunCounts`] by its descriptor.
pub fn program_run_counts(program: BorrowedFd<'_>) -> io::Result<RunCounts> {
    // SAFETY: `bpf_prog_info` is integers and arrays of them only, for
    // which all zeroes is a valid value (and what the kernel expects of
    // the fields it does not fill).
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(program.as_raw_fd()).map_err(|_| io::ErrorKind::InvalidInput)?,
        info_len: u32::try_from(size_of_val(&info)).map_err(|_| io::ErrorKind::InvalidInput)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `InfoAttr` is the `info` member's layout; `info` points at a
    // zeroed `bpf_prog_info` of `info_len` bytes, which the kernel fills
    // (its pointer fields are zero, so it writes through none of them).
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(RunCounts {
        runs: info.run_cnt,
        run_time_ns: info.run_time_ns,
    })
}
