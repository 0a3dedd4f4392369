//! Driver of the virtio-mmio inference device (`aivmm_guest_abi::inference`).
//!
//! Only the boot vCPU uses it. Requests: one device-writable buffer stays
//! available on the request queue; the host fills it and puts it in the used
//! ring, which [`InferenceDriver::poll_request`] reads from memory (no exit).
//! Events: each goes into its own slot of the event queue; [`InferenceDriver::notify`]
//! tells the host about everything written since the last notification with
//! one QUEUE_NOTIFY write (an ioeventfd on the host: no return to the VMM).

use aivmm_guest_abi::inference::{self as abi, EventHeader, RequestHeader};
use aivmm_guest_abi::virtio_mmio as reg;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use crate::virtio_mmio::{self, device_error, read32, write32};

const REQUEST_QUEUE_SIZE: u16 = 2;
const EVENT_QUEUE_SIZE: u16 = abi::EVENT_QUEUE_MAX_SIZE;
const EVENT_PAYLOAD_MAX: usize = abi::EVENT_SLOT_BYTES - abi::EVENT_HEADER_BYTES;

/// Descriptor flag: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct AvailRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElement {
    id: u32,
    len: u32,
}

#[repr(C)]
struct UsedRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElement; N],
    avail_event: u16,
}

/// A split virtqueue (virtio 1.2, section 2.7) in one page-aligned block.
#[repr(C, align(4096))]
struct SplitQueue<const N: usize> {
    descriptors: [Descriptor; N],
    avail: AvailRing<N>,
    used: UsedRing<N>,
}

#[repr(C, align(4096))]
struct EventSlot([u8; abi::EVENT_SLOT_BYTES]);

/// A request as the host sent it.
pub struct Request {
    pub header: RequestHeader,
    pub payload: Vec<u8>,
}

pub struct InferenceDriver {
    mmio: u64,
    requests: *mut SplitQueue<{ REQUEST_QUEUE_SIZE as usize }>,
    request_buffer: Vec<u8>,
    /// Next avail index of the request queue, and the used index seen last.
    request_avail: u16,
    request_used: u16,
    events: *mut SplitQueue<{ EVENT_QUEUE_SIZE as usize }>,
    slots: *mut [EventSlot; EVENT_QUEUE_SIZE as usize],
    event_avail: u16,
    /// Events made available since the last notification.
    unnotified: u16,
    /// Notifications so far.
    notifications: u64,
}

/// A zeroed, leaked (it lives as long as the partition) allocation of `T`,
/// whose address the device is given.
fn leak_zeroed<T>() -> *mut T {
    // SAFETY: every `T` used here (queues of integers, byte slots) is valid
    // when all-zero.
    Box::into_raw(unsafe { Box::<T>::new_zeroed().assume_init() })
}

impl InferenceDriver {
    /// Negotiates the device, sets up both queues and makes the request
    /// buffer available (about 30 exits, once).
    pub fn init(mmio: u64, request_buffer_bytes: usize) -> Self {
        virtio_mmio::negotiate(mmio, abi::DEVICE_ID, "inference");

        let mut driver = InferenceDriver {
            mmio,
            requests: leak_zeroed(),
            request_buffer: vec![0u8; request_buffer_bytes],
            request_avail: 0,
            request_used: 0,
            events: leak_zeroed(),
            slots: leak_zeroed(),
            event_avail: 0,
            unnotified: 0,
            notifications: 0,
        };
        // SAFETY (both blocks): only addresses are taken, of allocations
        // leaked above, so they stay valid and fixed for the partition's life.
        let request_rings = unsafe {
            let q = driver.requests;
            (
                &raw const (*q).descriptors as u64,
                &raw const (*q).avail as u64,
                &raw const (*q).used as u64,
            )
        };
        let event_rings = unsafe {
            let q = driver.events;
            (
                &raw const (*q).descriptors as u64,
                &raw const (*q).avail as u64,
                &raw const (*q).used as u64,
            )
        };
        for (index, size, (desc, avail, used)) in [
            (abi::REQUEST_QUEUE, REQUEST_QUEUE_SIZE, request_rings),
            (abi::EVENT_QUEUE, EVENT_QUEUE_SIZE, event_rings),
        ] {
            write32(mmio, reg::QUEUE_SEL, index as u32);
            if read32(mmio, reg::QUEUE_NUM_MAX) < size as u32 {
                device_error("inference: a queue is smaller than the driver needs");
            }
            write32(mmio, reg::QUEUE_NUM, size as u32);
            for (low, high, address) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
            ] {
                write32(mmio, low, address as u32);
                if address >> 32 != 0 {
                    write32(mmio, high, (address >> 32) as u32);
                }
            }
            write32(mmio, reg::QUEUE_READY, 1);
        }
        // Event descriptor i always points at slot i; only its length changes.
        for slot in 0..EVENT_QUEUE_SIZE as usize {
            // SAFETY: the device does not read descriptors before they are
            // made available (and nothing is available yet); `slot` is in
            // bounds of both arrays.
            unsafe {
                let addr = &raw const (*driver.slots)[slot] as u64;
                core::ptr::write_volatile(
                    &raw mut (*driver.events).descriptors[slot],
                    Descriptor {
                        addr,
                        len: 0,
                        flags: 0,
                        next: 0,
                    },
                );
            }
        }
        virtio_mmio::driver_ok(mmio);
        driver.offer_request_buffer();
        driver
    }

    pub fn request_buffer_len(&self) -> usize {
        self.request_buffer.len()
    }

    /// Makes the (single) request buffer available to the host again.
    fn offer_request_buffer(&mut self) {
        let q = self.requests;
        let slot = (self.request_avail % REQUEST_QUEUE_SIZE) as usize;
        let descriptor = Descriptor {
            addr: self.request_buffer.as_ptr() as u64,
            len: self.request_buffer.len() as u32,
            flags: DESC_F_WRITE,
            next: 0,
        };
        // SAFETY: the request queue memory is ours (leaked in init); the host
        // reads descriptor 0 and the avail ring only after the idx store
        // below, which the release fence orders after these stores.
        unsafe {
            core::ptr::write_volatile(&raw mut (*q).descriptors[0], descriptor);
            core::ptr::write_volatile(&raw mut (*q).avail.ring[slot], 0);
        }
        fence(Ordering::Release);
        self.request_avail = self.request_avail.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*q).avail.idx, self.request_avail) };
    }

    /// The next request, if the host sent one (a memory read; no exit).
    pub fn poll_request(&mut self) -> Option<Request> {
        let q = self.requests;
        // SAFETY: a volatile load of the used index the device writes.
        let used = unsafe { core::ptr::read_volatile(&raw const (*q).used.idx) };
        if used == self.request_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = (self.request_used % REQUEST_QUEUE_SIZE) as usize;
        // SAFETY: the device published this used element before the index.
        let element = unsafe { core::ptr::read_volatile(&raw const (*q).used.ring[slot]) };
        self.request_used = self.request_used.wrapping_add(1);
        let written = (element.len as usize).min(self.request_buffer.len());
        if element.id != 0 || written < abi::REQUEST_HEADER_BYTES {
            device_error("inference: the host returned a request buffer without a request in it");
        }
        // The host wrote the buffer before publishing the used index (ordered
        // by the acquire fence above); read it as plain memory now.
        let mut header_bytes = [0u8; abi::REQUEST_HEADER_BYTES];
        header_bytes.copy_from_slice(&self.request_buffer[..abi::REQUEST_HEADER_BYTES]);
        let header = RequestHeader::from_bytes(&header_bytes);
        let payload_end = abi::REQUEST_HEADER_BYTES + header.payload_len as usize;
        if payload_end > written {
            device_error("inference: a request claims more payload than the host wrote");
        }
        let payload = self.request_buffer[abi::REQUEST_HEADER_BYTES..payload_end].to_vec();
        self.offer_request_buffer();
        Some(Request { header, payload })
    }

    /// Writes one event into the next free slot (waiting, without exits, for
    /// the host to return one if all are in flight). Not yet notified.
    pub fn push_event(&mut self, mut header: EventHeader, payload: &[u8]) {
        let payload = &payload[..payload.len().min(EVENT_PAYLOAD_MAX)];
        header.payload_len = payload.len() as u32;
        let q = self.events;
        loop {
            // SAFETY: a volatile load of the used index the device writes.
            let used = unsafe { core::ptr::read_volatile(&raw const (*q).used.idx) };
            if self.event_avail.wrapping_sub(used) < EVENT_QUEUE_SIZE {
                break;
            }
            if self.unnotified > 0 {
                // Every slot is in flight and the host does not know about
                // some of them yet: tell it, or it never returns any.
                self.notify();
            }
            core::hint::spin_loop();
        }
        fence(Ordering::Acquire);
        let slot = (self.event_avail % EVENT_QUEUE_SIZE) as usize;
        let len = abi::EVENT_HEADER_BYTES + payload.len();
        // SAFETY: slot `slot` is not in flight (checked above), so the device
        // does not read it or its descriptor now; the stores become visible
        // to it before the avail index (release fence below).
        unsafe {
            let bytes = (*self.slots)[slot].0.as_mut_ptr();
            core::ptr::copy_nonoverlapping(
                header.to_bytes().as_ptr(),
                bytes,
                abi::EVENT_HEADER_BYTES,
            );
            core::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                bytes.add(abi::EVENT_HEADER_BYTES),
                payload.len(),
            );
            core::ptr::write_volatile(&raw mut (*q).descriptors[slot].len, len as u32);
            core::ptr::write_volatile(&raw mut (*q).avail.ring[slot], slot as u16);
        }
        fence(Ordering::Release);
        self.event_avail = self.event_avail.wrapping_add(1);
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*q).avail.idx, self.event_avail) };
        self.unnotified += 1;
    }

    /// An event with text: split over [`abi::EVENT_TEXT`] events at character
    /// boundaries when it does not fit one slot.
    pub fn push_text_event(&mut self, header: EventHeader, text: &str) {
        let mut rest = text;
        let mut header = header;
        loop {
            let mut cut = rest.len().min(EVENT_PAYLOAD_MAX);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            self.push_event(header, &rest.as_bytes()[..cut]);
            rest = &rest[cut..];
            if rest.is_empty() {
                return;
            }
            header = EventHeader {
                kind: abi::EVENT_TEXT,
                values: [0; 5],
                ..header
            };
        }
    }

    /// Tells the host about the events written since the last notification:
    /// one exit, however many there are; none if there are none.
    pub fn notify(&mut self) {
        if self.unnotified == 0 {
            return;
        }
        fence(Ordering::SeqCst);
        write32(self.mmio, reg::QUEUE_NOTIFY, abi::EVENT_QUEUE as u32);
        self.unnotified = 0;
        self.notifications += 1;
    }

    /// Notifications made so far.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }
}
