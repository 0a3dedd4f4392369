//! The aivmm inference engine: GGUF language models in `no_std + alloc` Rust.
//!
//! It reads from top to bottom: [`gguf`] parses a mapped model file, [`quant`]
//! holds the tensor formats and their dot-product kernels, [`tokenizer`] turns
//! text into token ids and back, [`model`] runs the forward pass of the supported
//! architectures, [`sampling`] picks the next token, and [`parallel`] is the
//! small trait through which a host (std threads) or the inference kernel
//! (vCPUs) splits matmuls across workers.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod chat;
pub mod generate;
pub mod gguf;
#[cfg(feature = "std")]
pub mod host_pool;
pub mod model;
pub mod parallel;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
