//! The devices of an aivmm partition, all on MMIO: a guest register access
//! reaches them through [`bus::MmioBus`] on the vCPU thread that exited.
//!
//! - [`platform::PlatformDevice`]: boot complete, exit, fatal error,
//!   park / wake, reports (registers in `aivmm_guest_abi::platform`).
//! - [`virtio::mmio::VirtioMmioTransport`] with [`virtio::console::Console`]:
//!   the guest's log, one exit per flush.
//! - [`virtio::mmio::VirtioMmioTransport`] with [`virtio::inference::InferenceDevice`]:
//!   requests in, tokens and other events out, at most one notification per token.
//! - [`virtio::mmio::VirtioMmioTransport`] with [`virtio::block::Block`]:
//!   a file-backed virtio-blk disk for Linux guests.
//! - [`pci::PciBus`]: PCI bus 0 behind an ECAM window, with the host bridge at
//!   00:00.0, for passed-through devices (see the passthrough crate).
//!
//! The inference kernel's devices inject no interrupts: it runs at CPL3
//! without an IDT and polls (see docs/guest-abi.md). A Linux guest's virtio
//! devices get an interrupt line
//! ([`virtio::mmio::VirtioMmioTransport::with_interrupt`]).

pub mod bus;
pub mod pci;
pub mod platform;
pub mod virtio;

/// Guest memory as the devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
