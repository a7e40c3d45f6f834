//! Integration tests that run the real `octo` binary live in `tests/`.
