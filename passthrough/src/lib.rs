//! PCI passthrough for aivmm partitions (GPUs and NICs given to a tenant's
//! Linux guest).
//!
//! - [`preflight`]: what the host must provide before a device can be
//!   passed through (IOMMU, vfio-pci binding of the whole group, /dev/vfio,
//!   NUMA placement, locked-memory limit, hugepages), each failure with the
//!   host change that fixes it.
//! - [`vfio`]: VFIO container, group and device setup with `vfio-ioctls`,
//!   DMA mapping of all guest RAM, the device's regions and interrupts.
//! - [`config_space`]: the guest's view of the device's config space, built
//!   from [`bar`] (BAR decoding, sizing, guest placement), [`capability`]
//!   (capability lists), [`msi`] and [`msix`] (interrupt capabilities
//!   emulated in the VMM) and [`irq_routing`] (vectors to KVM GSIs and irqfds).
//! - [`pci_function`]: the device as a function on the VMM's ECAM PCI bus
//!   (`aivmm_devices::pci::PciBus`); [`bar_trap`]: the trapped part of its
//!   BARs (MSI-X table and PBA emulated, the rest through VFIO).
//!
//! None of this can run on a host without an IOMMU: the tests use real
//! config-space dumps and sysfs fixture trees (see docs/hardware-validation.md
//! for what to run on a real server).

pub mod bar;
pub mod bar_trap;
pub mod bdf;
pub mod capability;
pub mod config_space;
pub mod irq_routing;
pub mod msi;
pub mod msix;
pub mod pci_function;
pub mod preflight;
pub mod vfio;
