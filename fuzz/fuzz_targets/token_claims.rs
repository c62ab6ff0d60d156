#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tcpgate_fuzz::token_claims::check(data);
});
