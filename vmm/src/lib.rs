//! The aivmm library: everything the `aivmm` binary does, testable from `tests/`.

pub mod host_engine;
pub mod model_store;
