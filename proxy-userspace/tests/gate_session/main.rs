//! Admission and relay from the attacker's side, without root: the gate,
//! the session code and the user-space data path assembled in-process on
//! 127.0.0.1 (see `harness`), so `cargo test -p proxy-userspace` checks
//! them on every run. The privileged suites (tests/tests/auth.rs,
//! grants.rs) check the same over real namespaces and the eBPF path.

mod admission;
mod grants;
mod harness;
