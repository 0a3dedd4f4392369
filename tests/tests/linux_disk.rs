//! A Linux guest's virtio-blk disk wired into KVM as `aivmm run --disk`
//! wires it: the device on the MMIO bus, its QUEUE_NOTIFY an ioeventfd, its
//! interrupt an irqfd on IRQ 5. The driver side is the test's (a real split
//! virtqueue in guest RAM, set up through the device's registers as Linux's
//! virtio_mmio driver does); the notification is what KVM signals for the
//! guest's QUEUE_NOTIFY write, and the interrupt is checked in KVM's own
//! interrupt controller.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aivmm::isolation::{seccomp, ThreadKind};
use aivmm::linux::disk::{self, DiskSpec, Disks, DISK_IRQS, DISK_MMIO_BASE};
use aivmm::linux::e820::create_guest_ram;
use aivmm::linux::pio::PortBus;
use aivmm::linux::serial::{Capture, IrqLine, SerialConsole};
use aivmm::linux::vcpu::Shared;
use aivmm::vstate::memory::RamBacking;
use aivmm::vstate::vm::Vm;
use aivmm_devices::bus::MmioBus;
use aivmm_devices::virtio::block::{REQUEST_QUEUE, S_OK, T_IN, T_OUT};
use aivmm_devices::virtio::mmio::INTERRUPT_USED_BUFFER;
use aivmm_devices::virtio::test_driver::{read32, TestQueue};
use aivmm_guest_abi::virtio_mmio as reg;
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER};
use vm_memory::{Bytes, GuestAddress};

const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

/// The master PIC's interrupt request register: IRQs 0-7 raised and not yet
/// acknowledged (nothing acknowledges them here: no vCPU runs).
fn pic_master_irr(vm: &Vm) -> u8 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    vm.fd().get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
    // SAFETY: for chip_id KVM_IRQCHIP_PIC_MASTER, KVM filled in the `pic`
    // member of the union (plain integers, any bit pattern is valid).
    unsafe { chip.chip.pic.irr }
}

/// Waits (bounded, so a broken path fails instead of hanging) for `done`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_queue_notification_through_kvm_serves_the_request_and_raises_irq_5() {
    let test = "a_queue_notification_through_kvm_serves_the_request_and_raises_irq_5";
    if !common::kvm_available(test) {
        return;
    }
    let image = std::env::temp_dir().join(format!("aivmm-kvm-disk-{}.img", std::process::id()));
    let sectors: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&image, &sectors).unwrap();

    let memory = create_guest_ram(64 << 20, RamBacking::Anonymous, None).unwrap();
    let mut vm = Vm::new().unwrap();
    vm.register_ram(&memory).unwrap();
    vm.fd().create_irq_chip().unwrap();
    let capture = Arc::new(Mutex::new(Capture::default()));
    let serial = SerialConsole::new(IrqLine::new().unwrap(), None, capture.clone());
    let shared = Arc::new(Shared::new(PortBus::new(serial), capture, 1));
    let blocks = disk::open(&[DiskSpec {
        path: image.clone(),
        read_only: false,
    }])
    .unwrap();
    let mut bus = MmioBus::new();
    // The disk thread under its seccomp filter: serving reads, writes and
    // the interrupt is allowed (nothing refused below).
    let refused_before = seccomp::refused(ThreadKind::LinuxDisks).0;
    let mut disks = Disks::attach(&vm, &memory, blocks, &mut bus, shared.clone(), true).unwrap();

    // The driver finds the device where the command line says it is.
    let (device, offset) = bus.find(DISK_MMIO_BASE).expect("disk 0 on the bus");
    assert_eq!(offset, 0);
    assert_eq!(read32(device, reg::MAGIC_VALUE), reg::MAGIC);
    let mut queue = TestQueue::new(memory.clone(), 16);
    queue.activate(device, u32::from(REQUEST_QUEUE));

    let irq = DISK_IRQS[0];
    assert_eq!(irq, 5);
    assert_eq!(pic_master_irr(&vm) & 1 << irq, 0, "IRQ 5 not raised yet");

    // Read sector 6, then write sector 1 from the same buffer.
    for (kind, sector, used) in [(T_IN, 6u64, 513u32), (T_OUT, 1, 1)] {
        memory.write_obj(kind, GuestAddress(HEADER)).unwrap();
        memory.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
        memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let before = queue.used_idx();
        let head = queue.add_chain(&[
            (HEADER, 16, false),
            (DATA, 512, kind == T_IN),
            (STATUS, 1, true),
        ]);
        assert!(
            disks.notify(0).unwrap(),
            "disk 0 has a notification eventfd"
        );
        wait_for("the used ring", || queue.used_idx() != before);
        assert_eq!(queue.used_elem(before), (u32::from(head), used));
        assert_eq!(memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    }
    let mut data = [0u8; 512];
    memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(
        data.iter().all(|&b| b == 6),
        "sector 6 read into the buffer"
    );
    let written = std::fs::read(&image).unwrap();
    assert!(
        written[512..1024].iter().all(|&b| b == 6),
        "and written to sector 1"
    );

    assert_eq!(read32(device, reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    // KVM injects an irqfd from a worker: wait for it to reach the PIC.
    wait_for("IRQ 5 in KVM's PIC", || pic_master_irr(&vm) & 1 << irq != 0);

    disks.stop();
    assert_eq!(disks.stats()[0].requests, 2);
    assert_eq!(shared.end(), None, "the disk thread reported no error");
    assert_eq!(
        seccomp::refused(ThreadKind::LinuxDisks).0,
        refused_before,
        "the disk thread's filter refused nothing"
    );
    assert!(!disks.notify(1).unwrap(), "there is one disk");
    let _ = std::fs::remove_file(&image);
}
