//! Driver of the virtio-mmio console (see `aivmm_guest_abi::console`).
//!
//! Text collects in a buffer; a flush puts the buffer on the transmit queue
//! and notifies the device with one MMIO write. The VMM drains the queue while
//! handling that write, so a flush costs exactly one VM exit however long the
//! text is. `println!` flushes once per line.

use aivmm_guest_abi::{console as dev, virtio_mmio as reg};
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{fence, Ordering};

use crate::sync::SpinLock;
use crate::virtio_mmio::{self, device_error, read32, write32};

/// Prints one line (formatted like `format!`) and flushes it to the host.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}

const QUEUE_SIZE: u16 = 8;
const BUFFER_SIZE: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE as usize],
    used_event: u16,
}

#[repr(C)]
struct UsedElement {
    id: u32,
    len: u32,
}

#[repr(C)]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElement; QUEUE_SIZE as usize],
    avail_event: u16,
}

/// The split virtqueue (virtio 1.2, section 2.7): descriptor table (16-byte
/// aligned), driver area (2-byte aligned), device area (4-byte aligned).
#[repr(C, align(4096))]
struct QueueMemory {
    descriptors: [Descriptor; QUEUE_SIZE as usize],
    avail: AvailRing,
    used: UsedRing,
}

struct SharedQueue(UnsafeCell<QueueMemory>);

// SAFETY: the driver side of the queue is only touched with the CONSOLE lock
// held; the device side is written by the VMM, and read here with volatile
// loads.
unsafe impl Sync for SharedQueue {}

static QUEUE: SharedQueue = SharedQueue(UnsafeCell::new(QueueMemory {
    descriptors: [Descriptor {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QUEUE_SIZE as usize],
    avail: AvailRing {
        flags: 0,
        idx: 0,
        ring: [0; QUEUE_SIZE as usize],
        used_event: 0,
    },
    used: UsedRing {
        flags: 0,
        idx: 0,
        ring: [const { UsedElement { id: 0, len: 0 } }; QUEUE_SIZE as usize],
        avail_event: 0,
    },
}));

struct Console {
    mmio: u64,
    ready: bool,
    avail_idx: u16,
    len: usize,
    buffer: [u8; BUFFER_SIZE],
}

static CONSOLE: SpinLock<Console> = SpinLock::new(Console {
    mmio: 0,
    ready: false,
    avail_idx: 0,
    len: 0,
    buffer: [0; BUFFER_SIZE],
});

/// Negotiates the device and sets up the transmit queue (about 20 exits, once).
pub fn init(mmio: u64) {
    let mut console = CONSOLE.lock();
    virtio_mmio::negotiate(mmio, dev::DEVICE_ID, "console");

    write32(mmio, reg::QUEUE_SEL, dev::TRANSMIT_QUEUE as u32);
    if read32(mmio, reg::QUEUE_NUM_MAX) < QUEUE_SIZE as u32 {
        device_error("console: the transmit queue is smaller than the driver needs");
    }
    write32(mmio, reg::QUEUE_NUM, QUEUE_SIZE as u32);
    let queue = QUEUE.0.get();
    // SAFETY: only addresses are taken; the queue is a static, so its
    // guest-physical address (== virtual address) is fixed forever.
    let (desc, driver, device) = unsafe {
        (
            &raw const (*queue).descriptors as u64,
            &raw const (*queue).avail as u64,
            &raw const (*queue).used as u64,
        )
    };
    for (low, high, address) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device),
    ] {
        write32(mmio, low, address as u32);
        // The high halves are 0 after the reset; skip the exit when they stay 0.
        if address >> 32 != 0 {
            write32(mmio, high, (address >> 32) as u32);
        }
    }
    write32(mmio, reg::QUEUE_READY, 1);
    virtio_mmio::driver_ok(mmio);
    console.mmio = mmio;
    console.ready = true;
}

impl Console {
    /// Hands the buffered text to the device: one descriptor, one notification.
    fn flush(&mut self) {
        if !self.ready || self.len == 0 {
            return;
        }
        let queue = QUEUE.0.get();
        let slot = (self.avail_idx % QUEUE_SIZE) as usize;
        let descriptor = Descriptor {
            addr: self.buffer.as_ptr() as u64,
            len: self.len as u32,
            flags: 0,
            next: 0,
        };
        // SAFETY: the CONSOLE lock (held: we are `&mut Console` behind it) makes
        // this vCPU the only driver-side user of the queue; volatile stores keep
        // the compiler from eliding or reordering what the device will read.
        unsafe {
            core::ptr::write_volatile(&raw mut (*queue).descriptors[0], descriptor);
            core::ptr::write_volatile(&raw mut (*queue).avail.ring[slot], 0);
        }
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*queue).avail.idx, self.avail_idx) };
        fence(Ordering::SeqCst);
        write32(self.mmio, reg::QUEUE_NOTIFY, dev::TRANSMIT_QUEUE as u32);
        // The device has consumed the buffer once it shows up in the used ring
        // (already true here, as the VMM drains during the notification).
        // SAFETY: a volatile load of a field the device writes.
        while unsafe { core::ptr::read_volatile(&raw const (*queue).used.idx) } != self.avail_idx {
            core::hint::spin_loop();
        }
        fence(Ordering::Acquire);
        self.len = 0;
    }
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let mut bytes = text.as_bytes();
        while !bytes.is_empty() {
            if self.len == BUFFER_SIZE {
                self.flush();
                if self.len == BUFFER_SIZE {
                    // No device yet: drop the oldest text rather than block.
                    self.len = 0;
                }
            }
            let take = bytes.len().min(BUFFER_SIZE - self.len);
            self.buffer[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
        }
        Ok(())
    }
}

pub fn print_line(args: core::fmt::Arguments) {
    let mut console = CONSOLE.lock();
    let _ = console.write_fmt(args);
    let _ = console.write_str("\n");
    console.flush();
}

pub fn flush() {
    CONSOLE.lock().flush();
}

/// Flushes unless another vCPU (or this one, mid-print) holds the console:
/// for the panic path, which must never wait.
pub fn flush_if_unlocked() {
    if let Some(mut console) = CONSOLE.try_lock() {
        console.flush();
    }
}
