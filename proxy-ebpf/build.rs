//! Makes cargo rebuild the eBPF object when bpf-linker changes.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found; run `cargo xtask setup`"),
    }
}
