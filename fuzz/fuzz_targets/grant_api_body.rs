#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tcpgate_fuzz::grant_api_body::check(data);
});
