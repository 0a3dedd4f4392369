//! The console: a virtio console (device ID 3) whose transmit queue carries
//! the guest's log. Each notification drains every available buffer, so the
//! guest pays one exit per flush, whatever the amount of text.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aivmm_guest_abi::console as abi;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::VirtioDevice;
use crate::bus::DeviceError;
use crate::GuestMemory;

const NAME: &str = "console";

/// Longest buffer the device accepts in one descriptor.
const MAX_BUFFER: u32 = 1 << 20;

/// Where the guest's console text goes: kept in memory (up to a limit, for
/// tests and error reports) and optionally copied to a writer as it arrives.
pub struct ConsoleOutput {
    captured: Mutex<Vec<u8>>,
    capture_limit: usize,
    dropped: AtomicU64,
    forward: Mutex<Option<Box<dyn Write + Send>>>,
}

impl ConsoleOutput {
    /// Keeps the first `capture_limit` bytes; copies everything to `forward`.
    pub fn new(capture_limit: usize, forward: Option<Box<dyn Write + Send>>) -> Self {
        ConsoleOutput {
            captured: Mutex::new(Vec::new()),
            capture_limit,
            dropped: AtomicU64::new(0),
            forward: Mutex::new(forward),
        }
    }

    fn push(&self, bytes: &[u8]) {
        {
            let mut captured = self
                .captured
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let room = self.capture_limit.saturating_sub(captured.len());
            let take = bytes.len().min(room);
            captured.extend_from_slice(&bytes[..take]);
            self.dropped
                .fetch_add((bytes.len() - take) as u64, Ordering::Relaxed);
        }
        let mut forward = self
            .forward
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(writer) = forward.as_mut() {
            // The guest's log must not fail the partition because, say, stderr
            // is closed: a failed copy is dropped.
            let _ = writer.write_all(bytes).and_then(|_| writer.flush());
        }
    }

    /// The captured text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .captured
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
        .into_owned()
    }

    /// Bytes that did not fit under the capture limit.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The console device.
pub struct Console {
    output: Arc<ConsoleOutput>,
    queue_max_sizes: [u16; 2],
    buffers: u64,
}

impl Console {
    pub fn new(output: Arc<ConsoleOutput>) -> Self {
        Console {
            output,
            queue_max_sizes: [abi::QUEUE_MAX_SIZE; 2],
            buffers: 0,
        }
    }

    /// Number of transmit buffers consumed so far.
    pub fn buffers(&self) -> u64 {
        self.buffers
    }

    fn transmit(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<(), DeviceError> {
        let queue_error = |why: String| DeviceError::Queue {
            device: NAME,
            queue: abi::TRANSMIT_QUEUE,
            why,
        };
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            for descriptor in chain {
                if descriptor.is_write_only() {
                    return Err(queue_error(format!(
                        "descriptor {head} on the transmit queue is device-writable"
                    )));
                }
                if descriptor.len() > MAX_BUFFER {
                    return Err(queue_error(format!(
                        "a {}-byte transmit buffer exceeds the {MAX_BUFFER}-byte limit",
                        descriptor.len()
                    )));
                }
                let mut bytes = vec![0u8; descriptor.len() as usize];
                memory
                    .read_slice(&mut bytes, descriptor.addr())
                    .map_err(|source| DeviceError::GuestMemory {
                        device: NAME,
                        addr: descriptor.addr().0,
                        source,
                    })?;
                self.output.push(&bytes);
            }
            queue.add_used(memory, head, 0).map_err(|error| {
                queue_error(format!("cannot return descriptor {head}: {error}"))
            })?;
            self.buffers += 1;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        abi::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<(), DeviceError> {
        match index {
            abi::TRANSMIT_QUEUE => self.transmit(queue, memory),
            // Input buffers wait until there is console input (none yet).
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::VirtioMmioTransport;
    use crate::virtio::test_driver::{read32, write32};
    use aivmm_guest_abi::virtio_mmio as reg;
    use vm_memory::GuestAddress;

    /// Drives the transport like the guest driver does, with a real split
    /// queue in guest memory, and checks the text arrives and the buffer is
    /// returned in the used ring.
    #[test]
    fn a_flush_delivers_the_text_and_returns_the_buffer() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let output = Arc::new(ConsoleOutput::new(1 << 16, None));
        let transport =
            VirtioMmioTransport::new(Console::new(output.clone()), memory.clone()).unwrap();
        assert_eq!(read32(&transport, reg::MAGIC_VALUE), reg::MAGIC);
        assert_eq!(read32(&transport, reg::DEVICE_ID), abi::DEVICE_ID);
        write32(
            &transport,
            reg::STATUS,
            reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER,
        );
        write32(&transport, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&transport, reg::DEVICE_FEATURES), 1);
        write32(&transport, reg::DRIVER_FEATURES_SEL, 1);
        write32(&transport, reg::DRIVER_FEATURES, 1);
        let features_ok = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
        write32(&transport, reg::STATUS, features_ok);
        assert_ne!(read32(&transport, reg::STATUS) & reg::STATUS_FEATURES_OK, 0);

        let (desc, avail, used, buffer) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        write32(&transport, reg::QUEUE_SEL, abi::TRANSMIT_QUEUE as u32);
        write32(&transport, reg::QUEUE_NUM, 8);
        write32(&transport, reg::QUEUE_DESC_LOW, desc as u32);
        write32(&transport, reg::QUEUE_DRIVER_LOW, avail as u32);
        write32(&transport, reg::QUEUE_DEVICE_LOW, used as u32);
        write32(&transport, reg::QUEUE_READY, 1);
        write32(&transport, reg::STATUS, features_ok | reg::STATUS_DRIVER_OK);

        let text = b"hello from the guest\n";
        memory.write_slice(text, GuestAddress(buffer)).unwrap();
        memory.write_obj(buffer, GuestAddress(desc)).unwrap();
        memory
            .write_obj(text.len() as u32, GuestAddress(desc + 8))
            .unwrap();
        memory.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = descriptor 0
        memory.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // avail.idx = 1
        write32(&transport, reg::QUEUE_NOTIFY, abi::TRANSMIT_QUEUE as u32);

        assert_eq!(output.text(), "hello from the guest\n");
        assert_eq!(memory.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(transport.notifications(), 1);
        assert_eq!(transport.with_device(|console| console.buffers()), 1);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let output = Arc::new(ConsoleOutput::new(16, None));
        let transport = VirtioMmioTransport::new(Console::new(output), memory).unwrap();
        write32(
            &transport,
            reg::STATUS,
            reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK,
        );
        assert_eq!(read32(&transport, reg::STATUS) & reg::STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn capture_is_limited() {
        let output = ConsoleOutput::new(4, None);
        output.push(b"abcdef");
        assert_eq!(output.text(), "abcd");
        assert_eq!(output.dropped(), 2);
    }
}
