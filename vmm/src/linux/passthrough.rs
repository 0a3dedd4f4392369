//! `--device BDF`: host PCI devices given to a Linux guest through VFIO.
//!
//! Before anything is built, [`preflight`] checks each device on the host
//! (IOMMU, vfio-pci binding of its group, /dev/vfio, NUMA node of the
//! partition's CPUs, locked-memory limit). Then, per device:
//! - VFIO container, group and device, all guest RAM mapped for its DMA;
//! - its virtualized config space as a function on the guest's PCI bus,
//!   with its BARs placed in the BAR windows of [`super::pci`];
//! - each BAR split into pieces: the parts VFIO lets us mmap become KVM
//!   memslots (the guest reaches the device without exits), the rest (the
//!   MSI-X table and PBA, and whatever VFIO does not allow to map) is a
//!   [`TrappedBar`] in [`BarTraps`];
//! - MSI-X (and MSI) vectors: one GSI per vector, and one eventfd per
//!   vector given to VFIO when the guest enables MSI-X (or MSI); each
//!   vector's irqfd is attached once the guest programs and unmasks it, so
//!   interrupts reach the guest without exits.
//!
//! Memslots and traps follow the guest: nothing is mapped until it enables
//! memory decode, and a BAR the guest moves moves its memslots and trap.
//! I/O-space BARs are placed but not forwarded (their ports read all ones):
//! GPUs and NICs do not need them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use aivmm_devices::pci::{PciBus, PciBusError};
use aivmm_passthrough::bar::BarKind;
use aivmm_passthrough::bar_trap::TrappedBar;
use aivmm_passthrough::bdf::Bdf;
use aivmm_passthrough::config_space::{ConfigChange, ConfigError, VirtualConfigSpace};
use aivmm_passthrough::irq_routing::{DeviceVectors, GsiRoutingTable, IrqfdChange, RoutingError};
use aivmm_passthrough::msi::MsiState;
use aivmm_passthrough::msix::MsixTable;
use aivmm_passthrough::pci_function::PassthroughFunction;
use aivmm_passthrough::preflight::{
    self, PreflightError, PreflightReport, PreflightRequest, ProcessLimits,
};
use aivmm_passthrough::vfio::{
    bar_pieces, VfioBarRegion, VfioConfig, VfioPassthrough, VfioSetupError,
};
use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::pci::{bar_windows, BarTraps, PciError};
use crate::vstate::vm::Vm;

/// KVM memslots of device BARs start here (guest RAM uses the first few).
pub const FIRST_DEVICE_SLOT: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("--device {0} is given twice")]
    Duplicate(Bdf),
    #[error("--device {bdf}: {error}")]
    Preflight { bdf: Bdf, error: PreflightError },
    #[error("--device {bdf}: {error}")]
    Vfio { bdf: Bdf, error: VfioSetupError },
    #[error("--device {bdf}: its config space cannot be virtualized: {error}")]
    Config { bdf: Bdf, error: ConfigError },
    #[error("--device {bdf}: {error}")]
    Bus { bdf: Bdf, error: PciBusError },
    #[error("--device {bdf}: {error}")]
    Pci { bdf: Bdf, error: PciError },
    #[error("--device {bdf}: {error}")]
    Routing { bdf: Bdf, error: RoutingError },
    #[error("--device {bdf}: cannot create an eventfd for its interrupts: {error}")]
    EventFd { bdf: Bdf, error: std::io::Error },
    #[error(
        "--device {bdf}: cannot mmap {len:#x} bytes at offset {offset:#x} of BAR {bar}: {error}"
    )]
    Mmap {
        bdf: Bdf,
        bar: u8,
        offset: u64,
        len: u64,
        error: std::io::Error,
    },
    #[error("--device {bdf}: KVM refused memslot {slot} for BAR {bar} at guest address {guest:#x} ({len:#x} bytes): {error}")]
    Memslot {
        bdf: Bdf,
        bar: u8,
        slot: u32,
        guest: u64,
        len: u64,
        error: kvm_ioctls::Error,
    },
}

/// The NUMA node of the host CPUs a partition is pinned to, if they are all
/// on one node (read from sysfs under `root`).
pub fn node_of_cpus(root: &Path, cpus: &[usize]) -> Option<u32> {
    let node_of = |cpu: usize| -> Option<u32> {
        let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}"));
        std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("node")?
                .parse()
                .ok()
        })
    };
    let nodes: Vec<Option<u32>> = cpus.iter().map(|&cpu| node_of(cpu)).collect();
    match nodes.first() {
        Some(&Some(node)) if nodes.iter().all(|n| *n == Some(node)) => Some(node),
        _ => None,
    }
}

/// Checks every device on the host under `root` ("/" in production) before
/// anything is built: each failure says what to change on the host.
pub fn preflight(
    root: &Path,
    devices: &[Bdf],
    guest_ram_bytes: u64,
    partition_node: Option<u32>,
    limits: ProcessLimits,
) -> Result<Vec<PreflightReport>, PassthroughError> {
    for (i, bdf) in devices.iter().enumerate() {
        if devices[..i].contains(bdf) {
            return Err(PassthroughError::Duplicate(*bdf));
        }
    }
    let mut reports = Vec::new();
    for &bdf in devices {
        let request = PreflightRequest {
            bdf,
            guest_ram_bytes,
            partition_node,
        };
        let report = preflight::preflight(root, &request, limits)
            .map_err(|error| PassthroughError::Preflight { bdf, error })?;
        reports.push(report);
    }
    Ok(reports)
}

/// One mmapped piece of a BAR and the memslot that shows it to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedPiece {
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    pub len: u64,
    pub slot: u32,
    /// The host mapping of the device's region (an mmap of the VFIO fd).
    pub host: u64,
}

/// A memslot change: `guest` None deletes the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOp {
    pub slot: u32,
    pub guest: Option<u64>,
    pub piece: MappedPiece,
}

/// The memslot changes for BAR `bar` moving from `from` to `to` (None: not
/// decoded): the old slots go first, then the new ones at `to + offset`.
pub fn plan_bar_move(
    pieces: &[MappedPiece],
    bar: u8,
    from: Option<u64>,
    to: Option<u64>,
) -> Vec<SlotOp> {
    let of_bar = || pieces.iter().filter(move |p| p.bar == bar);
    let mut ops = Vec::new();
    if from.is_some() {
        ops.extend(of_bar().map(|&piece| SlotOp {
            slot: piece.slot,
            guest: None,
            piece,
        }));
    }
    if let Some(base) = to {
        ops.extend(of_bar().map(|&piece| SlotOp {
            slot: piece.slot,
            guest: Some(base + piece.offset),
            piece,
        }));
    }
    ops
}

/// Interrupt vectors of one kind (MSI-X or MSI): the eventfds VFIO signals
/// and their GSIs.
struct Vectors {
    eventfds: Vec<EventFd>,
    gsis: DeviceVectors,
}

struct DeviceState {
    msix: Option<Vectors>,
    msi: Option<Vectors>,
    /// Whether VFIO currently has MSI-X / MSI enabled on the device (one
    /// at most: the guest enables one or the other, as on hardware).
    msix_on: bool,
    msi_on: bool,
}

/// One passed-through device of a running guest.
struct AssignedDevice {
    bdf: Bdf,
    function: Arc<PassthroughFunction<VfioConfig>>,
    trapped: Vec<Arc<TrappedBar<VfioBarRegion>>>,
    msix_table: Arc<Mutex<MsixTable>>,
    pieces: Vec<MappedPiece>,
    state: Mutex<DeviceState>,
    // Last: dropped after the memslots over its mmaps are gone (Drop below).
    vfio: VfioPassthrough,
}

/// The passed-through devices of one guest.
pub struct Passthrough {
    vm: Arc<Vm>,
    traps: Arc<BarTraps>,
    routing: Mutex<GsiRoutingTable>,
    devices: Vec<AssignedDevice>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as u64,
        _ => 4096,
    }
}

fn eventfds(bdf: Bdf, count: usize) -> Result<Vec<EventFd>, PassthroughError> {
    (0..count)
        .map(|_| {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|error| PassthroughError::EventFd { bdf, error })
        })
        .collect()
}

impl Passthrough {
    /// Opens each device (already preflighted), maps guest RAM for its DMA,
    /// and puts it on `bus`. `routing` is the VM's GSI table (installed).
    pub fn attach(
        vm: Arc<Vm>,
        memory: &GuestMemoryMmap,
        bus: &mut PciBus,
        traps: Arc<BarTraps>,
        routing: GsiRoutingTable,
        devices: &[Bdf],
    ) -> Result<Passthrough, PassthroughError> {
        let mut passthrough = Passthrough {
            vm,
            traps,
            routing: Mutex::new(routing),
            devices: Vec::new(),
        };
        let mut next_slot = FIRST_DEVICE_SLOT;
        for &bdf in devices {
            let device = passthrough.open(memory, bus, bdf, &mut next_slot)?;
            passthrough.devices.push(device);
        }
        Ok(passthrough)
    }

    fn open(
        &self,
        memory: &GuestMemoryMmap,
        bus: &mut PciBus,
        bdf: Bdf,
        next_slot: &mut u32,
    ) -> Result<AssignedDevice, PassthroughError> {
        let vfio_error = |error| PassthroughError::Vfio { bdf, error };
        let mut vfio =
            VfioPassthrough::open(self.vm.fd(), Path::new("/"), bdf).map_err(vfio_error)?;
        vfio.map_guest_memory(memory).map_err(vfio_error)?;
        let (config, len) = vfio.config();
        let sizes = vfio.bar_sizes();
        let space = VirtualConfigSpace::new(config, len, &sizes, &bar_windows())
            .map_err(|error| PassthroughError::Config { bdf, error })?;
        let (bars, msix, msi) = (space.bars().to_vec(), space.msix(), space.msi());

        let mut routing = lock(&self.routing);
        let routing_error = |error| PassthroughError::Routing { bdf, error };
        let msix_table = Arc::new(Mutex::new(MsixTable::new(msix.map_or(0, |m| m.table_size))));
        // An eventfd and a GSI per vector the device may use.
        let mut vectors = |count: u16| -> Result<Vectors, PassthroughError> {
            let eventfds = eventfds(bdf, usize::from(count))?;
            let gsis = routing.allocate(eventfds.len()).map_err(routing_error)?;
            Ok(Vectors { eventfds, gsis })
        };
        let msix_vectors = msix.map(|layout| vectors(layout.table_size)).transpose()?;
        let msi_vectors = msi
            .map(|layout| vectors(u16::from(layout.max_vectors)))
            .transpose()?;
        drop(routing);

        let page = page_size();
        let mut pieces = Vec::new();
        let mut trapped = Vec::new();
        for guest_bar in &bars {
            let bar = guest_bar.bar;
            if bar.kind == BarKind::Io || bar.size == 0 {
                continue;
            }
            let traps = msix.map_or_else(Vec::new, |m| m.ranges_in(bar.index));
            for piece in bar_pieces(bar.size, &vfio.mmappable(bar.index), &traps, page) {
                // A memslot is whole pages at a page-aligned address: a BAR
                // smaller than a page stays trapped.
                if !piece.mmap || !piece.len.is_multiple_of(page) {
                    continue;
                }
                // Unmapped in Drop, after its memslot is deleted.
                let host = match vfio.mmap_bar(bar.index, piece.offset, piece.len) {
                    Ok(host) => host,
                    Err(error) => {
                        // Undo what this device mapped so far.
                        unmap_pieces(&pieces);
                        return Err(PassthroughError::Mmap {
                            bdf,
                            bar: bar.index,
                            offset: piece.offset,
                            len: piece.len,
                            error,
                        });
                    }
                };
                pieces.push(MappedPiece {
                    bar: bar.index,
                    offset: piece.offset,
                    len: piece.len,
                    slot: *next_slot,
                    host: host as u64,
                });
                *next_slot += 1;
            }
            let holds_msix =
                msix.is_some_and(|m| m.table_bar == bar.index || m.pba_bar == bar.index);
            trapped.push(Arc::new(TrappedBar::new(
                bar.index,
                bar.size,
                msix.filter(|_| holds_msix),
                msix_table.clone(),
                vfio.bar_region(),
            )));
        }
        let function = Arc::new(PassthroughFunction::new(space));
        if let Err(error) = bus.add(function.clone()) {
            unmap_pieces(&pieces);
            return Err(PassthroughError::Bus { bdf, error });
        }
        Ok(AssignedDevice {
            bdf,
            function,
            trapped,
            msix_table,
            pieces,
            state: Mutex::new(DeviceState {
                msix: msix_vectors,
                msi: msi_vectors,
                msix_on: false,
                msi_on: false,
            }),
            vfio,
        })
    }

    /// One line per device for the console: where its BARs are.
    pub fn describe(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| {
                let bars: Vec<String> = d.function.with_space(|space| {
                    space
                        .bars()
                        .iter()
                        .map(|b| format!("BAR{} {:#x}+{:#x}", b.bar.index, b.address, b.bar.size))
                        .collect()
                });
                let mapped: u64 = d.pieces.iter().map(|p| p.len).sum();
                format!(
                    "{}: {} ({} bytes mmapped into the guest, the rest trapped)",
                    d.bdf,
                    bars.join(", "),
                    mapped
                )
            })
            .collect()
    }

    /// Acts on what the guest's last write changed (config space: BAR
    /// moves, MSI/MSI-X control; a trapped BAR: MSI-X table entries).
    /// Called by the vCPU loop after each port or MMIO write.
    pub fn after_write(&self) -> Result<(), PassthroughError> {
        for device in &self.devices {
            for change in device.function.take_changes() {
                self.apply(device, change)?;
            }
            let mut written = Vec::new();
            for bar in &device.trapped {
                written.extend(bar.take_written_vectors());
            }
            if !written.is_empty() {
                let mut state = lock(&device.state);
                if let Some(vectors) = state.msix.as_mut() {
                    let table = lock(&device.msix_table);
                    let mut changes = Vec::new();
                    for vector in written {
                        let route = table.route(vector);
                        changes.extend(vectors.gsis.update(usize::from(vector), route).map_err(
                            |error| PassthroughError::Routing {
                                bdf: device.bdf,
                                error,
                            },
                        )?);
                    }
                    drop(table);
                    self.route(device, &vectors.eventfds, &changes)?;
                }
            }
        }
        Ok(())
    }

    fn route(
        &self,
        device: &AssignedDevice,
        eventfds: &[EventFd],
        changes: &[IrqfdChange],
    ) -> Result<(), PassthroughError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut routing = lock(&self.routing);
        device
            .vfio
            .apply_irq_changes(self.vm.fd(), &mut routing, eventfds, changes)
            .map_err(|error| PassthroughError::Vfio {
                bdf: device.bdf,
                error,
            })
    }

    fn apply(&self, device: &AssignedDevice, change: ConfigChange) -> Result<(), PassthroughError> {
        let bdf = device.bdf;
        let routing_error = |error| PassthroughError::Routing { bdf, error };
        match change {
            ConfigChange::BarMoved {
                index,
                kind,
                from,
                to,
                ..
            } => {
                if kind == BarKind::Io {
                    return Ok(());
                }
                for op in plan_bar_move(&device.pieces, index, from, to) {
                    self.set_slot(bdf, op)?;
                }
                let Some(bar) = device.trapped.iter().find(|b| b.bar() == index) else {
                    return Ok(());
                };
                if let Some(old) = from {
                    self.traps.remove(old);
                }
                if let Some(new) = to {
                    let size = device.function.with_space(|s| {
                        s.bars()
                            .iter()
                            .find(|g| g.bar.index == index)
                            .map_or(0, |g| g.bar.size)
                    });
                    self.traps
                        .insert(new, size, bar.clone())
                        .map_err(|error| PassthroughError::Pci { bdf, error })?;
                }
            }
            ConfigChange::MsixControl {
                enabled,
                function_mask,
            } => {
                let vfio_error = |error| PassthroughError::Vfio { bdf, error };
                let mut guard = lock(&device.state);
                let state = &mut *guard;
                if let Some(vectors) = state.msix.as_mut() {
                    // VFIO gets every vector's eventfd when the guest enables
                    // MSI-X; a vector reaches the guest once its irqfd is
                    // attached (programmed and unmasked).
                    if enabled && !state.msix_on {
                        device
                            .vfio
                            .enable_msix(&vectors.eventfds)
                            .map_err(vfio_error)?;
                        state.msix_on = true;
                    }
                    let routes = {
                        let mut table = lock(&device.msix_table);
                        table.set_control(enabled, function_mask);
                        table.routes()
                    };
                    let changes = vectors.gsis.update_all(&routes).map_err(routing_error)?;
                    self.route(device, &vectors.eventfds, &changes)?;
                    if !enabled && state.msix_on {
                        device.vfio.disable_msix().map_err(vfio_error)?;
                        state.msix_on = false;
                    }
                }
            }
            ConfigChange::Msi(state) => self.apply_msi(device, state)?,
        }
        Ok(())
    }

    fn apply_msi(&self, device: &AssignedDevice, msi: MsiState) -> Result<(), PassthroughError> {
        let bdf = device.bdf;
        let vfio_error = |error| PassthroughError::Vfio { bdf, error };
        let mut guard = lock(&device.state);
        let state = &mut *guard;
        let Some(vectors) = state.msi.as_mut() else {
            return Ok(());
        };
        let allotted = usize::from(msi.vectors).min(vectors.eventfds.len());
        if msi.enabled && !state.msi_on {
            device
                .vfio
                .enable_msi(&vectors.eventfds[..allotted.max(1)])
                .map_err(vfio_error)?;
            state.msi_on = true;
        }
        let changes = vectors
            .gsis
            .update_all(&msi.messages())
            .map_err(|error| PassthroughError::Routing { bdf, error })?;
        self.route(device, &vectors.eventfds, &changes)?;
        if !msi.enabled && state.msi_on {
            device.vfio.disable_msi().map_err(vfio_error)?;
            state.msi_on = false;
        }
        Ok(())
    }

    fn set_slot(&self, bdf: Bdf, op: SlotOp) -> Result<(), PassthroughError> {
        let region = kvm_userspace_memory_region {
            slot: op.slot,
            flags: 0,
            guest_phys_addr: op.guest.unwrap_or(0),
            memory_size: if op.guest.is_some() { op.piece.len } else { 0 },
            userspace_addr: op.piece.host,
        };
        // SAFETY: the host range is an mmap of the device's BAR region that
        // this Passthrough owns and unmaps only after deleting the slot
        // (Drop); a memory_size of 0 deletes the slot.
        unsafe { self.vm.fd().set_user_memory_region(region) }.map_err(|error| {
            PassthroughError::Memslot {
                bdf,
                bar: op.piece.bar,
                slot: op.slot,
                guest: op.guest.unwrap_or(0),
                len: op.piece.len,
                error,
            }
        })
    }
}

fn unmap_pieces(pieces: &[MappedPiece]) {
    for piece in pieces {
        // SAFETY: `host` is a mapping of `len` bytes this module made with
        // mmap and nothing else refers to (its memslot is gone or was never
        // made).
        unsafe { libc::munmap(piece.host as *mut libc::c_void, piece.len as usize) };
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        for device in &self.devices {
            for &piece in &device.pieces {
                // Deleting a slot that was never created fails harmlessly.
                let _ = self.set_slot(
                    device.bdf,
                    SlotOp {
                        slot: piece.slot,
                        guest: None,
                        piece,
                    },
                );
            }
            unmap_pieces(&device.pieces);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(bar: u8, offset: u64, len: u64, slot: u32) -> MappedPiece {
        MappedPiece {
            bar,
            offset,
            len,
            slot,
            host: 0x7f00_0000_0000 + offset,
        }
    }

    #[test]
    fn bar_moves_delete_then_recreate_the_slots() {
        // BAR 0 mapped around an MSI-X table page; BAR 2 one piece.
        let pieces = [
            piece(0, 0, 0x2000, 256),
            piece(0, 0x3000, 0xd000, 257),
            piece(2, 0, 0x1_0000_0000, 258),
        ];
        // The guest enables decode: BAR 0 appears at 0xc0000000.
        let ops = plan_bar_move(&pieces, 0, None, Some(0xc000_0000));
        assert_eq!(
            ops.iter().map(|o| (o.slot, o.guest)).collect::<Vec<_>>(),
            vec![(256, Some(0xc000_0000)), (257, Some(0xc000_3000))]
        );
        // It moves: old slots deleted first, then made at the new base.
        let ops = plan_bar_move(&pieces, 0, Some(0xc000_0000), Some(0xc010_0000));
        assert_eq!(
            ops.iter().map(|o| (o.slot, o.guest)).collect::<Vec<_>>(),
            vec![
                (256, None),
                (257, None),
                (256, Some(0xc010_0000)),
                (257, Some(0xc010_3000))
            ]
        );
        // Decode off (or sizing): the slots go away.
        let ops = plan_bar_move(&pieces, 2, Some(0x10_0000_0000), None);
        assert_eq!(ops.len(), 1);
        assert_eq!((ops[0].slot, ops[0].guest), (258, None));
        assert!(plan_bar_move(&pieces, 4, None, Some(0xd000_0000)).is_empty());
    }

    #[test]
    fn node_of_pinned_cpus_from_sysfs() {
        let root = std::env::temp_dir().join(format!("aivmm-numa-{}", std::process::id()));
        for (cpu, node) in [(0, 0), (1, 0), (2, 1)] {
            let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}/node{node}"));
            std::fs::create_dir_all(dir).unwrap();
        }
        assert_eq!(node_of_cpus(&root, &[0, 1]), Some(0));
        assert_eq!(node_of_cpus(&root, &[2]), Some(1));
        assert_eq!(node_of_cpus(&root, &[1, 2]), None, "two nodes");
        assert_eq!(node_of_cpus(&root, &[7]), None, "no such CPU");
        assert_eq!(node_of_cpus(&root, &[]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn preflight_refuses_duplicates_and_names_the_device() {
        let limits = ProcessLimits {
            memlock_bytes: None,
            cap_ipc_lock: true,
        };
        let bdf: Bdf = "0000:00:1f.0".parse().unwrap();
        let other: Bdf = "0000:00:02.0".parse().unwrap();
        let error = preflight(
            Path::new("/nonexistent"),
            &[bdf, other, bdf],
            1 << 30,
            None,
            limits,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(error, "--device 0000:00:1f.0 is given twice");
        let error = preflight(Path::new("/nonexistent"), &[bdf], 1 << 30, None, limits)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("--device 0000:00:1f.0: PCI device 0000:00:1f.0 does not exist"),
            "{error}"
        );
        // A device that exists on a host without an IOMMU.
        let root = std::env::temp_dir().join(format!("aivmm-noiommu-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sys/bus/pci/devices/0000:00:1f.0")).unwrap();
        let error = preflight(&root, &[bdf], 1 << 30, None, limits)
            .unwrap_err()
            .to_string();
        assert!(error.contains("IOMMU is not enabled"), "{error}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
