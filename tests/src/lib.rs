//! Test support for the privileged integration tests.
