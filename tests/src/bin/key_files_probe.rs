//! Makes the shared test keys, prints their directory and exits normally,
//! for the test kit's self-test that the directory goes with the process.

fn main() {
    let keys = tcpgate_tests::tokens::key_files();
    let dir = keys.ca_pem.parent().expect("the keys' directory");
    assert!(
        dir.join("rsa.pem").is_file(),
        "no keys in {}",
        dir.display()
    );
    println!("{}", dir.display());
}
