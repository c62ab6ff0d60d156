//! tcpgate: a transparent, token-authenticated TCP proxy whose data path runs
//! in the kernel.
//!
//! The crate is the agent and the operator CLI. The eBPF programs live in
//! `proxy-ebpf` and are embedded here at build time; the map types they
//! share with user space live in `proxy-common`.
//!
//! # Layers
//!
//! Modules use only the layers below them (checked: the import graph of
//! the top-level modules has no cycle):
//!
//! 1. Leaves: `field_error`, `dest`, `sockopt`, `sockdiag`, `bpf` and
//!    `map_batch` (both on `sys_bpf`), `sys_bpf`, `kernel_btf`, `audit`,
//!    `notify`, `heap`.
//! 2. `auth` (tokens, JWKS, policy, grants) on `dest` and `field_error`;
//!    `config` (the file, every section) on `auth`'s `[auth]` schema.
//! 3. The data path: `datapath` (SOCKHASH splice, user-space copy) on `bpf`
//!    and `sockopt`; `registry` and `metrics` on `datapath` (`metrics` also
//!    on `bpf`, for the programs' run statistics); `firewall` (nftables
//!    guard) on `config`; `intercept` (sk_lookup, marks, routes) on
//!    `datapath`, `firewall` and `config`; `pinned` (operator views).
//! 4. `gate` (admission: grants, preambles, revocations) on `auth`.
//! 5. `session` (one connection end to end) on `gate`, `datapath`,
//!    `intercept`, `registry`, `metrics` and `audit`; `routed` (granted
//!    flows the tc programs forward: their events, audit lines and RSTs)
//!    on `gate`, `auth`, `config`, `datapath`, `pinned`, `bpf`,
//!    `map_batch`, `sys_bpf`, `metrics` and `audit`.
//! 6. `api` (grant API, operator endpoints) on `gate`, `registry`,
//!    `datapath` and `metrics`.
//! 7. `agent` (startup, accept loops, signals) on everything above.
//! 8. `supervise` (`run --supervise`: the agents' parent, systemd's main
//!    process) on `agent` (its environment variable) and `notify`.
//! 9. `cli` (one module per verb) on `agent`, `supervise` and the operator
//!    views.

pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bpf;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod dest;
pub mod drain_pins;
pub mod field_error;
pub mod firewall;
pub mod gate;
pub mod heap;
pub mod intercept;
pub mod kernel_btf;
pub mod map_batch;
pub mod metrics;
pub mod notify;
pub mod pinned;
pub mod registry;
pub mod routed;
pub mod session;
pub mod sockdiag;
pub mod sockopt;
pub mod supervise;
pub mod sys_bpf;

/// The eBPF object, compiled by build.rs for the bpf target, with BTF.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpgate"));

/// Makes aws-lc-rs rustls's process-wide default provider. etcd-client's
/// TLS compiles ring in too, and with two providers rustls picks none by
/// itself; tonic (the etcd link) takes the process default. Idempotent:
/// a provider already installed stays.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Renders an error with its chain of causes, for logs and audit details.
#[must_use]
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
