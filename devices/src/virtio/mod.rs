//! virtio devices on the virtio-mmio transport, built on `virtio-queue`.

pub mod block;
pub mod console;
pub mod inference;
pub mod mmio;
#[cfg(any(test, feature = "test-driver"))]
pub mod test_driver;

use virtio_queue::Queue;

use crate::bus::DeviceError;
use crate::GuestMemory;

/// A virtio device behind a [`mmio::VirtioMmioTransport`].
pub trait VirtioDevice: Send {
    /// Short name for error messages.
    fn name(&self) -> &'static str;
    /// The virtio device ID (virtio 1.2, section 5).
    fn device_type(&self) -> u32;
    /// Device-specific feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64 {
        0
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset` (none by default: reads as zero).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Handles a notification of queue `index` (the driver made buffers available).
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<(), DeviceError>;
    /// Returns to the just-created state (the driver wrote 0 to STATUS).
    fn reset(&mut self);
}
