//! The shared test keys (no privileges needed): made once per process, in
//! a directory that goes when the process exits.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_shared_keys_directory_goes_with_the_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_key_files_probe"))
        .output()
        .expect("run key_files_probe");
    assert!(
        out.status.success(),
        "key_files_probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        dir.starts_with(std::env::temp_dir()) && dir != std::env::temp_dir(),
        "the keys were made in {}, not in a directory of their own under {}",
        dir.display(),
        std::env::temp_dir().display()
    );
    assert!(
        !dir.exists(),
        "the keys' directory {} outlived its process",
        dir.display()
    );
}
