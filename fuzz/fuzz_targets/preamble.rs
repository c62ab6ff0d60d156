#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tcpgate_fuzz::preamble::check(data);
});
