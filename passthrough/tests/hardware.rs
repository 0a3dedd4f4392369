//! Passthrough of a real device, for a server with an IOMMU (see
//! docs/hardware-validation.md). It runs only when AIVMM_VFIO_DEVICE names a
//! device bound to vfio-pci, e.g.
//!
//!     AIVMM_VFIO_DEVICE=0000:ca:00.0 cargo test -p aivmm-passthrough --test hardware -- --nocapture
//!
//! and otherwise says it was skipped: the development and CI machines have
//! no IOMMU and no /dev/vfio.

use std::path::Path;

use aivmm_passthrough::bar;
use aivmm_passthrough::bdf::Bdf;
use aivmm_passthrough::config_space::{BarWindows, DeviceConfig, VirtualConfigSpace};
use aivmm_passthrough::irq_routing::{GsiRoutingTable, MsiMessage};
use aivmm_passthrough::preflight::{preflight, PreflightRequest, ProcessLimits};
use aivmm_passthrough::vfio::{bar_pieces, VfioPassthrough};
use kvm_ioctls::{Cap, Kvm};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_RAM: usize = 64 << 20;

#[test]
fn a_real_device_through_vfio() {
    let Ok(text) = std::env::var("AIVMM_VFIO_DEVICE") else {
        println!("skipped: set AIVMM_VFIO_DEVICE=BDF (a device bound to vfio-pci on a host with an IOMMU) to run it");
        return;
    };
    let bdf: Bdf = text.parse().unwrap_or_else(|e| panic!("{e}"));
    let root = Path::new("/");
    let sysfs = root.join("sys/bus/pci/devices").join(bdf.to_string());

    // 1. Preflight: every host condition, with the fix for any that fails.
    let report = preflight(
        root,
        &PreflightRequest {
            bdf,
            guest_ram_bytes: GUEST_RAM as u64,
            partition_node: None,
        },
        ProcessLimits::current().unwrap(),
    )
    .unwrap_or_else(|e| panic!("preflight: {e}"));
    println!("preflight: {report:?}");

    // 2. Container, group and device, tied to a VM with an in-kernel irqchip.
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mut device = VfioPassthrough::open(&vm, root, bdf).unwrap_or_else(|e| panic!("{e}"));

    // 3. DMA mapping of all guest RAM (pinned).
    let memory: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_RAM)]).unwrap();
    device
        .map_guest_memory(&memory)
        .unwrap_or_else(|e| panic!("{e}"));
    println!("DMA: {GUEST_RAM} bytes of guest RAM mapped at IOVA 0");

    // 4. VFIO's config region agrees with sysfs on the identity of the device.
    let (config, len) = device.config();
    let sysfs_config = std::fs::read(sysfs.join("config")).unwrap();
    let mut header = [0u8; 16];
    config.read(0, &mut header);
    assert_eq!(&header[..4], &sysfs_config[..4], "vendor/device");
    assert_eq!(&header[8..12], &sysfs_config[8..12], "revision/class");
    // 5. VFIO's BAR sizes agree with the kernel's resources.
    let sizes = device.bar_sizes();
    let sysfs_sizes =
        bar::sizes_from_sysfs_resource(&std::fs::read_to_string(sysfs.join("resource")).unwrap())
            .unwrap();
    for (i, (vfio, sys)) in sizes.iter().zip(sysfs_sizes).enumerate() {
        // sysfs lists a 64-bit BAR's size at its low index only, VFIO too.
        assert_eq!(*vfio, sys, "BAR{i}");
    }

    // 6. The guest's config space.
    let windows = BarWindows {
        mmio32: (0xc000_0000, 0xfec0_0000),
        mmio64: (0x100_0000_0000, 0x800_0000_0000),
        io: (0xc000, 0x1_0000),
    };
    let space =
        VirtualConfigSpace::new(config, len, &sizes, &windows).unwrap_or_else(|e| panic!("{e}"));
    for guest_bar in space.bars() {
        let b = guest_bar.bar;
        let traps = space.msix().map_or_else(Vec::new, |m| m.ranges_in(b.index));
        let pieces = bar_pieces(b.size, &device.mmappable(b.index), &traps, 4096);
        println!(
            "BAR{} {:?} prefetchable={} size={:#x} host={:#x} guest={:#x} pieces={pieces:?}",
            b.index, b.kind, b.prefetchable, b.size, b.host_address, guest_bar.address
        );
        // Each mappable piece mmaps from the device fd.
        for piece in pieces.iter().filter(|p| p.mmap) {
            let address = device
                .mmap_bar(b.index, piece.offset, piece.len)
                .unwrap_or_else(|e| panic!("mmap of BAR{} piece {piece:?}: {e}", b.index));
            // SAFETY: the mapping made just above, of this length.
            unsafe { libc::munmap(address, piece.len as usize) };
        }
    }
    println!("capabilities: {:?}", space.capabilities());

    // 7. MSI-X: one eventfd per vector given to VFIO, each routed to a GSI
    //    with irqfd.
    if let Some(msix) = space.msix() {
        let vectors = usize::from(msix.table_size);
        let eventfds: Vec<EventFd> = (0..vectors)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        device
            .enable_msix(&eventfds)
            .unwrap_or_else(|e| panic!("{e}"));
        let gsis = kvm.check_extension_int(Cap::IrqRouting) as u32;
        let mut table = GsiRoutingTable::with_irqchip(gsis);
        let mut device_vectors = table.allocate(vectors).unwrap();
        let routes: Vec<Option<MsiMessage>> = (0..vectors)
            .map(|v| {
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x30 + v as u32,
                })
            })
            .collect();
        let changes = device_vectors.update_all(&routes).unwrap();
        device
            .apply_irq_changes(&vm, &mut table, &eventfds, &changes)
            .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "MSI-X: {vectors} vectors enabled and routed to GSIs {:?}..",
            device_vectors.gsi(0)
        );
    }
}
