//! The aivmm library: everything the `aivmm` binary does, testable from `tests/`.

pub mod daemon;
pub mod guest_image;
pub mod host;
pub mod host_engine;
pub mod inference;
pub mod isolation;
pub mod linux;
pub mod model_store;
pub mod partition;
pub mod run;
pub mod stats;
pub mod vstate;
