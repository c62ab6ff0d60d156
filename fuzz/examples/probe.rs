fn main() {
    for input in std::env::args().skip(1) {
        let bytes = input
            .replace("\\xff", "\u{1}")
            .into_bytes()
            .into_iter()
            .map(|b| if b == 1 { 0xff } else { b })
            .collect::<Vec<u8>>();
        let r = std::panic::catch_unwind(|| tcpgate_fuzz::token_claims::check(&bytes));
        println!("{input:?} -> {r:?}");
    }
}
