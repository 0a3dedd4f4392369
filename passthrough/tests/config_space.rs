//! Config-space virtualization over real config dumps (this development
//! machine's devices) and a hand-built GPU-like one.

use std::path::PathBuf;

use aivmm_passthrough::bar::{self, BarKind};
use aivmm_passthrough::capability::CAP_ID_MSIX;
use aivmm_passthrough::config_space::{
    BarWindows, ConfigChange, ConfigDump, ConfigError, VirtualConfigSpace,
};
use aivmm_passthrough::irq_routing::{GsiRoutingTable, IrqfdChange, MsiMessage, Route};
use aivmm_passthrough::msix::MsixTable;

const WINDOWS: BarWindows = BarWindows {
    mmio32: (0xc000_0000, 0xfec0_0000),
    mmio64: (0x100_0000_0000, 0x200_0000_0000),
    io: (0xc000, 0x1_0000),
};

fn fixture(name: &str) -> (Vec<u8>, [u64; 6]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pci");
    let config = std::fs::read(dir.join(format!("{name}.config"))).unwrap();
    let resource = std::fs::read_to_string(dir.join(format!("{name}.resource"))).unwrap();
    (config, bar::sizes_from_sysfs_resource(&resource).unwrap())
}

fn space(name: &str) -> VirtualConfigSpace<ConfigDump> {
    let (config, sizes) = fixture(name);
    let len = config.len();
    VirtualConfigSpace::new(ConfigDump::new(config), len, &sizes, &WINDOWS).unwrap()
}

fn read32(space: &VirtualConfigSpace<ConfigDump>, offset: u16) -> u32 {
    let mut data = [0u8; 4];
    space.read(offset, &mut data).unwrap();
    u32::from_le_bytes(data)
}

fn read16(space: &VirtualConfigSpace<ConfigDump>, offset: u16) -> u16 {
    let mut data = [0u8; 2];
    space.read(offset, &mut data).unwrap();
    u16::from_le_bytes(data)
}

fn write32(
    space: &mut VirtualConfigSpace<ConfigDump>,
    offset: u16,
    value: u32,
) -> Vec<ConfigChange> {
    space.write(offset, &value.to_le_bytes()).unwrap()
}

#[test]
fn virtio_devices_of_this_machine() {
    for (name, device_id, vectors) in [
        ("virtio-balloon-1af4-1045", 0x1045, 5),
        ("virtio-block-1af4-1042", 0x1042, 2),
        ("virtio-net-1af4-1041", 0x1041, 3),
    ] {
        let space = space(name);
        assert_eq!(read32(&space, 0), 0x1af4 | device_id << 16, "{name}");
        // One 64-bit non-prefetchable 512 KiB BAR at host 0x40_0000_0000+.
        let bars = space.bars();
        assert_eq!(bars.len(), 1, "{name}");
        let bar0 = bars[0];
        assert_eq!(
            (bar0.bar.index, bar0.bar.kind, bar0.bar.prefetchable),
            (0, BarKind::Memory64, false)
        );
        assert_eq!(bar0.bar.size, 512 << 10);
        assert_eq!(bar0.bar.host_address >> 32, 0x40);
        // Non-prefetchable BARs go below 4 GiB in the guest.
        assert_eq!(bar0.address, 0xc000_0000);
        assert_eq!(read32(&space, 0x10), 0xc000_0004);
        assert_eq!(read32(&space, 0x14), 0);
        // Five vendor-specific (virtio) capabilities, then MSI-X.
        let caps: Vec<(u16, u16)> = space
            .capabilities()
            .iter()
            .map(|c| (c.id, c.offset))
            .collect();
        assert_eq!(
            caps,
            vec![
                (9, 0x40),
                (9, 0x50),
                (9, 0x60),
                (9, 0x70),
                (9, 0x84),
                (0x11, 0x98)
            ]
        );
        let msix = space.msix().unwrap();
        assert_eq!(
            (
                msix.table_size,
                msix.table_bar,
                msix.table_offset,
                msix.pba_bar,
                msix.pba_offset
            ),
            (vectors, 0, 0x8000, 0, 0x48000),
            "{name}"
        );
        // The host has MSI-X enabled; the guest starts with it off.
        assert_eq!(space.device().bytes[0x9b] & 0x80, 0x80);
        assert_eq!(read16(&space, 0x9a), vectors - 1);
        // Pin reads 0 (no INTx), the capability pointer as the device has it.
        let mut pointer = [0u8; 1];
        space.read(0x34, &mut pointer).unwrap();
        assert_eq!(pointer, [0x40]);
        assert_eq!(read16(&space, 0x3c) >> 8, 0);
        assert!(space.msi().is_none());
        // Past 256 bytes a conventional device reads 0.
        assert_eq!(read32(&space, 0x100), 0);
    }
}

#[test]
fn sizing_and_relocating_a_real_bar() {
    let mut space = space("virtio-net-1af4-1041");
    // Linux sizes with decode off: write ones, read the mask, restore.
    assert!(write32(&mut space, 0x10, 0xffff_ffff).is_empty());
    assert!(write32(&mut space, 0x14, 0xffff_ffff).is_empty());
    assert_eq!(read32(&space, 0x10), 0xfff8_0004, "512 KiB, 64-bit");
    assert_eq!(read32(&space, 0x14), 0xffff_ffff);
    write32(&mut space, 0x10, 0xd000_0000);
    write32(&mut space, 0x14, 0);
    assert_eq!(read32(&space, 0x10), 0xd000_0004);
    assert_eq!(space.device().bytes[0x05], 0x04, "the host's INTx disable");
    // Enabling memory decode maps the BAR; it reaches the device as well.
    let changes = space.write(0x04, &0x0006u16.to_le_bytes()).unwrap();
    assert_eq!(
        changes,
        vec![ConfigChange::BarMoved {
            index: 0,
            kind: BarKind::Memory64,
            size: 512 << 10,
            from: None,
            to: Some(0xd000_0000)
        }]
    );
    // INTx disable (set by the host's virtio driver) is the guest's to clear.
    assert_eq!(read16(&space, 0x04), 0x0006);
    assert_eq!(
        space.device().writes.last().unwrap(),
        &(0x04, vec![0x06, 0x00])
    );
    // Moving it while decoding: one change from the old to the new address.
    let changes = write32(&mut space, 0x10, 0xd008_0000);
    assert_eq!(
        changes,
        vec![ConfigChange::BarMoved {
            index: 0,
            kind: BarKind::Memory64,
            size: 512 << 10,
            from: Some(0xd000_0000),
            to: Some(0xd008_0000)
        }]
    );
    // An unaligned address is truncated to the BAR's alignment.
    write32(&mut space, 0x10, 0xd00c_0123);
    assert_eq!(space.bars()[0].address, 0xd008_0000);
    // Sizing while decoding unmaps it until an address is written back.
    write32(&mut space, 0x14, 0xffff_ffff);
    let changes = write32(&mut space, 0x10, 0xffff_ffff);
    assert_eq!(
        changes,
        vec![ConfigChange::BarMoved {
            index: 0,
            kind: BarKind::Memory64,
            size: 512 << 10,
            from: Some(0xffff_ffff_d008_0000),
            to: None
        }]
    );
    // The host's BAR never moved.
    assert_eq!(
        &space.device().bytes[0x10..0x18],
        &[4, 0, 0x10, 0, 0x40, 0, 0, 0]
    );
}

#[test]
fn what_the_vmm_owns_is_write_protected() {
    let mut space = space("virtio-block-1af4-1042");
    let writes_before = space.device().writes.len();
    // Vendor/device ID, class, capability pointer, a capability's next
    // pointer, the ROM BAR, the interrupt pin: nothing changes, nothing is
    // forwarded.
    write32(&mut space, 0x00, 0xdead_beef);
    write32(&mut space, 0x08, 0xffff_ffff);
    space.write(0x34, &[0x80]).unwrap();
    space.write(0x41, &[0x00]).unwrap();
    write32(&mut space, 0x30, 0xffff_ffff);
    space.write(0x3d, &[0x01]).unwrap();
    assert_eq!(space.device().writes.len(), writes_before);
    assert_eq!(read32(&space, 0), 0x1042_1af4);
    assert_eq!(read32(&space, 0x34) & 0xff, 0x40);
    assert_eq!(read16(&space, 0x40), 0x5009);
    assert_eq!(read32(&space, 0x30), 0, "no option ROM");
    // The interrupt line is the guest's scratch register.
    space.write(0x3c, &[0x0b]).unwrap();
    assert_eq!(read16(&space, 0x3c), 0x000b);
    // A capability body (virtio's common config pointer) passes through.
    write32(&mut space, 0x48, 0x1234);
    assert_eq!(
        space.device().writes.last().unwrap(),
        &(0x48, 0x1234u32.to_le_bytes().to_vec())
    );
    assert_eq!(read32(&space, 0x48), 0x1234);
    // MSI-X enable is emulated: it is reported, not forwarded (VFIO enables
    // the device's MSI-X when the VMM hands it the vectors' eventfds).
    let writes = space.device().writes.len();
    let changes = space.write(0x9a, &0x8001u16.to_le_bytes()).unwrap();
    assert_eq!(
        changes,
        vec![ConfigChange::MsixControl {
            enabled: true,
            function_mask: false
        }]
    );
    assert_eq!(space.device().writes.len(), writes);
    // The table size is read-only.
    assert_eq!(read16(&space, 0x9a), 0x8001);
    space.write(0x9a, &0x4007u16.to_le_bytes()).unwrap();
    assert_eq!(read16(&space, 0x9a), 0x4001);
    // Misaligned and odd-sized accesses are refused.
    assert!(matches!(
        space.read(0x02, &mut [0u8; 4]),
        Err(ConfigError::BadAccess { offset: 2, len: 4 })
    ));
    assert!(matches!(
        space.write(0x01, &[0u8; 2]),
        Err(ConfigError::BadAccess { .. })
    ));
    assert!(matches!(
        space.read(0x00, &mut [0u8; 3]),
        Err(ConfigError::BadAccess { .. })
    ));
}

#[test]
fn host_bridge_dump_is_4k_with_nothing_to_virtualize() {
    let space = space("host-bridge-8086-0d57");
    assert_eq!(space.len(), 4096);
    assert_eq!(read32(&space, 0), 0x0d57_8086);
    assert_eq!(read32(&space, 0x08) >> 8, 0x06_0000);
    assert!(space.bars().is_empty());
    assert!(space.capabilities().is_empty());
}

#[test]
fn gpu_like_bars_capabilities_and_sizing() {
    let mut space = space("gpu-like");
    let bars: Vec<(u8, BarKind, bool, u64, u64)> = space
        .bars()
        .iter()
        .map(|g| {
            (
                g.bar.index,
                g.bar.kind,
                g.bar.prefetchable,
                g.bar.size,
                g.address,
            )
        })
        .collect();
    assert_eq!(
        bars,
        vec![
            (0, BarKind::Memory32, false, 16 << 20, 0xc000_0000),
            (1, BarKind::Memory64, true, 64 << 30, 0x100_0000_0000),
            (3, BarKind::Memory64, true, 32 << 20, 0x110_0000_0000),
            (5, BarKind::Io, false, 128, 0xc000),
        ]
    );
    let caps: Vec<(u16, u16, bool)> = space
        .capabilities()
        .iter()
        .map(|c| (c.id, c.offset, c.extended))
        .collect();
    assert_eq!(
        caps,
        vec![
            (0x01, 0x60, false),
            (0x05, 0x68, false),
            (0x10, 0x78, false),
            (0x11, 0xb4, false),
            (0x0001, 0x100, true),
            (0x0019, 0x148, true),
            (0x0015, 0x168, true)
        ]
    );
    // 64-bit prefetchable sizing: 64 GiB has no address bits in the low half.
    write32(&mut space, 0x14, 0xffff_ffff);
    write32(&mut space, 0x18, 0xffff_ffff);
    assert_eq!(
        (read32(&space, 0x14), read32(&space, 0x18)),
        (0x0000_000c, 0xffff_fff0)
    );
    write32(&mut space, 0x1c, 0xffff_ffff);
    write32(&mut space, 0x20, 0xffff_ffff);
    assert_eq!(
        (read32(&space, 0x1c), read32(&space, 0x20)),
        (0xfe00_000c, 0xffff_ffff)
    );
    write32(&mut space, 0x24, 0xffff_ffff);
    assert_eq!(read32(&space, 0x24), 0xffff_ff81);
    write32(&mut space, 0x10, 0xffff_ffff);
    assert_eq!(read32(&space, 0x10), 0xff00_0000);
    // An extended capability header cannot be rewritten; AER's body can.
    write32(&mut space, 0x100, 0);
    assert_eq!(read32(&space, 0x100), 0x0001 | 2 << 16 | 0x148 << 20);
    write32(&mut space, 0x108, 0x0000_1000);
    assert_eq!(space.device().writes.last().unwrap().0, 0x108);
    // Resizable BAR's control (0x168 + 8) is read-only to the guest.
    let writes = space.device().writes.len();
    write32(&mut space, 0x170, 0x0000_0d00);
    assert_eq!(space.device().writes.len(), writes);
    // The PCIe capability's device control passes through.
    space.write(0x80, &0x2950u16.to_le_bytes()).unwrap();
    assert_eq!(read16(&space, 0x80), 0x2950);
}

#[test]
fn gpu_like_command_and_status_writes() {
    let mut space = space("gpu-like");
    // Command: memory + bus master + special cycles (bit 3, not passed
    // through); status: clear received-master-abort (write 1 to bit 13).
    let changes = write32(&mut space, 0x04, 0x2000_0000 | 0x000e);
    assert_eq!(
        changes.len(),
        3,
        "BAR0, BAR1, BAR3 start decoding: {changes:?}"
    );
    let (offset, bytes) = space.device().writes.last().unwrap().clone();
    assert_eq!(offset, 0x04);
    let forwarded = u32::from_le_bytes(bytes.try_into().unwrap());
    // Special cycles not written; the status register's read-only
    // capability-list bit (0x10) written back as it reads, its set-but-not-
    // cleared RW1C bits written 0.
    assert_eq!(forwarded, 0x2000_0000 | 0x0010_0000 | 0x0006);
    assert_eq!(read16(&space, 0x04), 0x0006);
    // I/O decode maps the I/O BAR.
    let changes = space.write(0x04, &0x0007u16.to_le_bytes()).unwrap();
    assert_eq!(
        changes,
        vec![ConfigChange::BarMoved {
            index: 5,
            kind: BarKind::Io,
            size: 128,
            from: None,
            to: Some(0xc000)
        }]
    );
}

#[test]
fn gpu_like_msi_reaches_the_routing_table() {
    let mut space = space("gpu-like");
    let msi = space.msi().unwrap();
    assert!(msi.is_64bit && !msi.per_vector_mask && msi.max_vectors == 1);
    write32(&mut space, 0x6c, 0xfee0_3003); // bits 1:0 are reserved
    write32(&mut space, 0x70, 0);
    space.write(0x74, &0x4061u16.to_le_bytes()).unwrap();
    let changes = space.write(0x6a, &0x0081u16.to_le_bytes()).unwrap();
    let [ConfigChange::Msi(state)] = changes[..] else {
        panic!("expected one MSI change, got {changes:?}");
    };
    assert!(state.enabled);
    let mut table = GsiRoutingTable::with_irqchip(1024);
    let mut vectors = table.allocate(1).unwrap();
    let changes = vectors.update_all(&state.messages()).unwrap();
    let message = MsiMessage {
        address: 0xfee0_3000,
        data: 0x4061,
    };
    assert_eq!(
        changes,
        vec![IrqfdChange::Attach {
            vector: 0,
            gsi: 24,
            message
        }]
    );
    changes.iter().for_each(|c| table.apply(c));
    assert_eq!(table.route(24), Some(Route::Msi(message)));
    // The 64-bit flag of MSI control is read-only.
    space.write(0x6a, &0x0001u16.to_le_bytes()).unwrap();
    assert_eq!(read16(&space, 0x6a), 0x0081);
}

#[test]
fn gpu_like_msix_table_vectors_route_to_gsis() {
    let mut space = space("gpu-like");
    let layout = space.msix().unwrap();
    assert_eq!(
        (layout.table_size, layout.table_bar, layout.table_offset),
        (6, 0, 0xb9_0000)
    );
    assert_eq!((layout.pba_bar, layout.pba_offset), (0, 0xba_0000));
    let mut msix = MsixTable::new(layout.table_size);
    let mut routing = GsiRoutingTable::with_irqchip(1024);
    let mut vectors = routing.allocate(usize::from(layout.table_size)).unwrap();
    // The guest driver programs vectors 0 and 5, then enables MSI-X.
    for (vector, address, data) in [(0u64, 0xfee0_0000u32, 0x4021u32), (5, 0xfee0_1000, 0x4022)] {
        msix.write_table(vector * 16, &address.to_le_bytes())
            .unwrap();
        msix.write_table(vector * 16 + 8, &data.to_le_bytes())
            .unwrap();
        let v = msix
            .write_table(vector * 16 + 12, &0u32.to_le_bytes())
            .unwrap();
        // Disabled MSI-X: no route yet.
        assert_eq!(vectors.update(usize::from(v), msix.route(v)).unwrap(), None);
    }
    let changes = space
        .write(layout.offset + 2, &0x8005u16.to_le_bytes())
        .unwrap();
    let [ConfigChange::MsixControl {
        enabled,
        function_mask,
    }] = changes[..]
    else {
        panic!("{changes:?}");
    };
    assert!(msix.set_control(enabled, function_mask));
    let changes = vectors.update_all(&msix.routes()).unwrap();
    let gsis: Vec<(usize, u32)> = changes
        .iter()
        .map(|c| match c {
            IrqfdChange::Attach { vector, gsi, .. } => (*vector, *gsi),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(gsis, vec![(0, 24), (5, 29)]);
    changes.iter().for_each(|c| routing.apply(c));
    assert_eq!(routing.kvm_entries().len(), 23 + 15 + 2); // no route for GSI 2 (the cascade)
                                                          // The guest masks vector 5: its irqfd is detached and an interrupt that
                                                          // arrives meanwhile shows in the PBA.
    let v = msix.write_table(5 * 16 + 12, &1u32.to_le_bytes()).unwrap();
    let change = vectors.update(usize::from(v), msix.route(v)).unwrap();
    assert_eq!(change, Some(IrqfdChange::Detach { vector: 5, gsi: 29 }));
    msix.set_pending(5, true);
    let mut pba = [0u8; 8];
    msix.read_pba(0, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1 << 5);
    assert!(space
        .capabilities()
        .iter()
        .any(|c| c.id == u16::from(CAP_ID_MSIX)));
}

#[test]
fn the_option_rom_is_hidden() {
    let (mut config, sizes) = fixture("gpu-like");
    config[0x30..0x34].copy_from_slice(&0xfc00_0001u32.to_le_bytes()); // enabled ROM at the host address
    let mut space =
        VirtualConfigSpace::new(ConfigDump::new(config), 4096, &sizes, &WINDOWS).unwrap();
    assert_eq!(read32(&space, 0x30), 0);
    write32(&mut space, 0x30, 0xffff_f800);
    assert_eq!(read32(&space, 0x30), 0, "sizing finds no ROM");
    assert!(space.device().writes.is_empty());
}

#[test]
fn malformed_dumps_are_refused_with_the_reason() {
    let (config, sizes) = fixture("gpu-like");
    let short =
        VirtualConfigSpace::new(ConfigDump::new(config[..64].to_vec()), 64, &sizes, &WINDOWS);
    assert!(matches!(short, Err(ConfigError::BadLength { len: 64 })));
    let mut bridge = config.clone();
    bridge[0x0e] = 0x01;
    let error = VirtualConfigSpace::new(ConfigDump::new(bridge), 4096, &sizes, &WINDOWS)
        .err()
        .unwrap();
    assert!(
        error
            .to_string()
            .contains("bridges cannot be passed through"),
        "{error}"
    );
    // The MSI-X table said to live past the end of BAR0.
    let mut far = config.clone();
    far[0xba] = 0x00;
    far[0xbb] = 0x01; // table offset 0x0100_0000 = BAR0's size
    let error = VirtualConfigSpace::new(ConfigDump::new(far), 4096, &sizes, &WINDOWS)
        .err()
        .unwrap();
    assert!(
        matches!(
            error,
            ConfigError::MsixOutsideBar {
                what: "table",
                bar: 0,
                ..
            }
        ),
        "{error}"
    );
    // A capability list that loops.
    let mut looped = config;
    looped[0xb5] = 0x60;
    let error = VirtualConfigSpace::new(ConfigDump::new(looped), 4096, &sizes, &WINDOWS)
        .err()
        .unwrap();
    assert!(matches!(error, ConfigError::Capability(_)), "{error}");
}

/// Every PCI device of the machine the tests run on, read live from sysfs.
#[test]
fn every_device_of_this_host_virtualizes() {
    let Ok(entries) = std::fs::read_dir("/sys/bus/pci/devices") else {
        println!("skipped: this host has no /sys/bus/pci");
        return;
    };
    let mut checked = 0;
    for entry in entries {
        let dir = entry.unwrap().path();
        let config = std::fs::read(dir.join("config")).unwrap();
        if config.len() < 256 {
            println!(
                "skipped {}: config is {} bytes (not root)",
                dir.display(),
                config.len()
            );
            continue;
        }
        let header_type = config[0x0e] & 0x7f;
        let sizes =
            bar::sizes_from_sysfs_resource(&std::fs::read_to_string(dir.join("resource")).unwrap())
                .unwrap();
        let len = config.len();
        match VirtualConfigSpace::new(ConfigDump::new(config), len, &sizes, &WINDOWS) {
            Ok(space) => {
                assert_eq!(
                    read32(&space, 0) & 0xffff,
                    u32::from_str_radix(
                        std::fs::read_to_string(dir.join("vendor"))
                            .unwrap()
                            .trim()
                            .trim_start_matches("0x"),
                        16
                    )
                    .unwrap()
                );
                checked += 1;
            }
            Err(ConfigError::NotAnEndpoint { .. }) if header_type != 0 => {}
            Err(error) => panic!("{}: {error}", dir.display()),
        }
    }
    println!("{checked} devices virtualized");
}
