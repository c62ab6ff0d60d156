//! Directories a process keeps for its whole life, such as the shared test
//! keys, which agents and servers read by path. Rust never drops statics,
//! so without this every test binary left one behind in the temporary
//! directory. A C `atexit` handler removes them when the process exits
//! normally: a test binary's `main` returning (whatever its tests did) or
//! `std::process::exit`. A killed process still leaves its directory.

use std::path::PathBuf;
use std::sync::{Mutex, Once, PoisonError};

/// The directories to remove, each with the process that registered it.
static DIRS: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

/// Keeps `dir` (and all in it) until the process exits, then removes it.
pub fn remove_dir_at_exit(dir: tempfile::TempDir) -> PathBuf {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that takes no
        // arguments and never unwinds; libc calls it once, at exit.
        if unsafe { libc::atexit(remove_dirs) } != 0 {
            eprintln!("tcpgate-tests: atexit refused; temporary directories will stay");
        }
    });
    let path = dir.keep();
    DIRS.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((std::process::id(), path.clone()));
    path
}

extern "C" fn remove_dirs() {
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(PoisonError::into_inner));
    let pid = std::process::id();
    for (owner, dir) in dirs {
        // A forked child that exits through `exit` leaves its parent's.
        if owner == pid {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
