//! A virtio driver for unit tests: register accesses to a transport and a
//! split virtqueue built by hand in test guest memory.

use aivmm_guest_abi::virtio_mmio as reg;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::{MmioAction, MmioDevice};
use crate::GuestMemory;

pub fn write32(device: &dyn MmioDevice, offset: u64, value: u32) {
    assert_eq!(
        device.write(0, offset, &value.to_le_bytes()).unwrap(),
        MmioAction::Continue
    );
}

pub fn read32(device: &dyn MmioDevice, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    device.read(0, offset, &mut data).unwrap();
    u32::from_le_bytes(data)
}

/// VIRTQ_DESC_F_NEXT and VIRTQ_DESC_F_WRITE.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// One queue of a device, set up at fixed addresses in `memory`.
pub struct TestQueue {
    pub memory: GuestMemory,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Rings at 0x1000 (descriptors), 0x3000 (available), 0x4000 (used);
    /// buffers go from 0x10000 up.
    pub fn new(memory: GuestMemory, size: u16) -> Self {
        TestQueue {
            memory,
            size,
            desc: 0x1000,
            avail: 0x3000,
            used: 0x4000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Negotiates every offered feature and makes queue `index` live, as
    /// Linux's virtio_mmio driver does.
    pub fn activate(&self, device: &dyn MmioDevice, index: u32) {
        write32(device, reg::STATUS, 0);
        write32(
            device,
            reg::STATUS,
            reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER,
        );
        for select in 0..2 {
            write32(device, reg::DEVICE_FEATURES_SEL, select);
            let offered = read32(device, reg::DEVICE_FEATURES);
            write32(device, reg::DRIVER_FEATURES_SEL, select);
            write32(device, reg::DRIVER_FEATURES, offered);
        }
        let features_ok = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
        write32(device, reg::STATUS, features_ok);
        assert_ne!(read32(device, reg::STATUS) & reg::STATUS_FEATURES_OK, 0);
        write32(device, reg::QUEUE_SEL, index);
        assert!(read32(device, reg::QUEUE_NUM_MAX) >= u32::from(self.size));
        assert_eq!(read32(device, reg::QUEUE_READY), 0);
        write32(device, reg::QUEUE_NUM, u32::from(self.size));
        write32(device, reg::QUEUE_DESC_LOW, self.desc as u32);
        write32(device, reg::QUEUE_DRIVER_LOW, self.avail as u32);
        write32(device, reg::QUEUE_DEVICE_LOW, self.used as u32);
        write32(device, reg::QUEUE_READY, 1);
        write32(device, reg::STATUS, features_ok | reg::STATUS_DRIVER_OK);
    }

    /// Writes descriptor `index` as is (for malformed chains).
    pub fn put_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        self.memory
            .write_obj(Descriptor::new(addr, len, flags, next), at)
            .unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a chain of (address, length, device-writable) buffers in fresh
    /// descriptors and makes it available; returns its head.
    pub fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == buffers.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.put_descriptor(index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + buffers.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.memory.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `n`: (descriptor head, length written).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        (
            self.memory.read_obj(GuestAddress(at)).unwrap(),
            self.memory.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
