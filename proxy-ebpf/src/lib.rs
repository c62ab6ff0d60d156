//! Empty on the host: the programs live in the `tcpgate` binary target, which
//! only builds for the bpf target (see `proxy-userspace/build.rs`).
#![no_std]
