//! Gate for tests that need root (network namespaces, bpffs, eBPF).

use std::io::Write as _;

/// Set to `1` to let privileged tests pass as skipped when not run as root.
pub const SKIP_ENV: &str = "TCPGATE_SKIP_PRIVILEGED";
/// Set to `required` (CI does) to forbid skipping, whatever [`SKIP_ENV`] says.
pub const REQUIRED_ENV: &str = "TCPGATE_PRIVILEGED_TESTS";

/// What a privileged test should do, from the effective uid and environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Run,
    Skip,
    Fail,
}

/// Pure decision logic, kept apart from the environment so it can be tested.
pub fn decide(is_root: bool, skip: Option<&str>, required: Option<&str>) -> Decision {
    if is_root {
        return Decision::Run;
    }
    if required == Some("required") {
        return Decision::Fail;
    }
    if skip == Some("1") {
        Decision::Skip
    } else {
        Decision::Fail
    }
}

/// Call first in every privileged test: `if !require_root() { return; }`.
///
/// Returns `true` when running as root. When not root, returns `false` after
/// printing a loud SKIPPED line if `TCPGATE_SKIP_PRIVILEGED=1`, and panics
/// otherwise (also when `TCPGATE_PRIVILEGED_TESTS=required`), so a privileged
/// test never passes silently without having run.
pub fn require_root() -> bool {
    let skip = std::env::var(SKIP_ENV).ok();
    let required = std::env::var(REQUIRED_ENV).ok();
    let is_root = nix::unistd::geteuid().is_root();
    match decide(is_root, skip.as_deref(), required.as_deref()) {
        Decision::Run => true,
        Decision::Skip => {
            let test = std::thread::current()
                .name()
                .unwrap_or("<unnamed>")
                .to_owned();
            // Straight to fd 2, not eprintln!: the test harness captures
            // the print macros, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "!!!!! SKIPPED (not root): {test} ({SKIP_ENV}=1) !!!!!"
            );
            false
        }
        Decision::Fail => panic!(
            "this test needs root (network namespaces, bpffs); run it as root, or set \
             {SKIP_ENV}=1 to skip privileged tests (not allowed when {REQUIRED_ENV}=required)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_runs() {
        assert_eq!(decide(true, Some("1"), None), Decision::Run);
        assert_eq!(decide(true, None, Some("required")), Decision::Run);
    }

    #[test]
    fn non_root_skips_only_when_asked_and_not_required() {
        assert_eq!(decide(false, Some("1"), None), Decision::Skip);
        assert_eq!(decide(false, None, None), Decision::Fail);
        assert_eq!(decide(false, Some("0"), None), Decision::Fail);
        assert_eq!(decide(false, Some("1"), Some("required")), Decision::Fail);
    }
}
