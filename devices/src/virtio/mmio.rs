//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! Without an interrupt line (the inference kernel) the guest polls the used
//! rings. With one ([`VirtioMmioTransport::with_interrupt`], a Linux guest),
//! each time the device returns buffers the transport sets the "used buffer"
//! bit of INTERRUPT_STATUS and raises the line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use aivmm_guest_abi::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};

use super::VirtioDevice;
use crate::bus::{fill, value_of, DeviceError, MmioAction, MmioDevice};
use crate::GuestMemory;

struct TransportState<D> {
    device: D,
    queues: Vec<Queue>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    interrupt_status: u32,
}

/// INTERRUPT_STATUS bit: the device used buffers in at least one queue.
pub const INTERRUPT_USED_BUFFER: u32 = 1;

/// Raises the device's interrupt (an irqfd write, say).
pub type InterruptLine = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// A virtio device on MMIO.
pub struct VirtioMmioTransport<D> {
    name: &'static str,
    memory: GuestMemory,
    state: Mutex<TransportState<D>>,
    notifications: AtomicU64,
    interrupt: Option<InterruptLine>,
    interrupt_failures: AtomicU64,
}

impl<D: VirtioDevice> VirtioMmioTransport<D> {
    pub fn new(device: D, memory: GuestMemory) -> Result<Self, DeviceError> {
        let name = device.name();
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max)| {
                Queue::new(max).map_err(|error| DeviceError::Queue {
                    device: name,
                    queue: index as u16,
                    why: format!("invalid maximum size {max}: {error}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioMmioTransport {
            name,
            memory,
            state: Mutex::new(TransportState {
                device,
                queues,
                status: 0,
                device_features_select: 0,
                driver_features_select: 0,
                driver_features: 0,
                queue_select: 0,
                interrupt_status: 0,
            }),
            notifications: AtomicU64::new(0),
            interrupt: None,
            interrupt_failures: AtomicU64::new(0),
        })
    }

    /// Raises `line` whenever the device returns buffers to the guest.
    pub fn with_interrupt(mut self, line: InterruptLine) -> Self {
        self.interrupt = Some(line);
        self
    }

    /// Interrupts that could not be raised (the line's error was dropped).
    pub fn interrupt_failures(&self) -> u64 {
        self.interrupt_failures.load(Ordering::Relaxed)
    }

    /// Runs `process` on `queue`, then interrupts the guest if it used
    /// buffers and the driver wants to hear about it.
    fn process_and_signal<T>(
        &self,
        interrupt_status: &mut u32,
        queue: &mut Queue,
        process: impl FnOnce(&mut Queue) -> T,
    ) -> T {
        let used_before = queue.next_used();
        let result = process(queue);
        if let Some(line) = &self.interrupt {
            let wanted = queue.needs_notification(&self.memory).unwrap_or(true);
            if queue.next_used() != used_before && wanted {
                *interrupt_status |= INTERRUPT_USED_BUFFER;
                if line().is_err() {
                    self.interrupt_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        result
    }

    /// How many QUEUE_NOTIFY writes the guest made (each one a VM exit).
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, TransportState<D>> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Runs `f` with the device (e.g. to read its statistics).
    pub fn with_device<T>(&self, f: impl FnOnce(&D) -> T) -> T {
        f(&self.lock().device)
    }

    /// Runs `f` with the device and queue `index`, for work the host starts
    /// (filling a guest buffer) or an ioeventfd reports (a notification that
    /// never reached this transport). None while the driver has not finished
    /// setting the device up (DRIVER_OK) or the queue is not valid.
    pub fn with_live_queue<T>(
        &self,
        index: u16,
        f: impl FnOnce(&mut D, &mut Queue, &GuestMemory) -> T,
    ) -> Option<T> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.status & reg::STATUS_DRIVER_OK == 0 {
            return None;
        }
        let queue = state.queues.get_mut(index as usize)?;
        if !queue.is_valid(&self.memory) {
            return None;
        }
        let device = &mut state.device;
        Some(
            self.process_and_signal(&mut state.interrupt_status, queue, |queue| {
                f(device, queue, &self.memory)
            }),
        )
    }

    fn offered_features(device: &D) -> u64 {
        device.features() | 1 << reg::F_VERSION_1
    }
}

impl<D> TransportState<D> {
    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self)
    where
        D: VirtioDevice,
    {
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device.reset();
    }
}

impl<D: VirtioDevice> MmioDevice for VirtioMmioTransport<D> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let mut state = self.lock();
        if offset >= reg::CONFIG {
            state.device.read_config(offset - reg::CONFIG, data);
            return Ok(());
        }
        if data.len() != 4 {
            return Err(DeviceError::BadAccess {
                device: self.name,
                access: "read",
                offset,
                len: data.len(),
            });
        }
        let value: u32 = match offset {
            reg::MAGIC_VALUE => reg::MAGIC,
            reg::VERSION => reg::TRANSPORT_VERSION,
            reg::DEVICE_ID => state.device.device_type(),
            reg::VENDOR_ID => reg::VENDOR,
            reg::DEVICE_FEATURES => {
                let features = Self::offered_features(&state.device);
                match state.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => state.selected_queue().map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => state.selected_queue().map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => state.interrupt_status,
            reg::STATUS => state.status,
            reg::CONFIG_GENERATION => 0,
            _ => {
                return Err(DeviceError::BadAccess {
                    device: self.name,
                    access: "read",
                    offset,
                    len: data.len(),
                })
            }
        };
        fill(data, value as u64);
        Ok(())
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
        if data.len() != 4 {
            return Err(DeviceError::BadAccess {
                device: self.name,
                access: "write",
                offset,
                len: data.len(),
            });
        }
        let value = value_of(data) as u32;
        let mut state = self.lock();
        let state = &mut *state;
        match offset {
            reg::DEVICE_FEATURES_SEL => state.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => state.driver_features_select = value,
            reg::DRIVER_FEATURES => match state.driver_features_select {
                0 => state.driver_features = (state.driver_features & !0xffff_ffff) | value as u64,
                1 => {
                    state.driver_features =
                        (state.driver_features & 0xffff_ffff) | (value as u64) << 32
                }
                _ => {}
            },
            reg::QUEUE_SEL => state.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(queue) = state.selected_queue() {
                    queue.set_size(value as u16);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                let (low, high) = halves(offset == reg::QUEUE_DESC_LOW, value);
                if let Some(queue) = state.selected_queue() {
                    queue.set_desc_table_address(low, high);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                let (low, high) = halves(offset == reg::QUEUE_DRIVER_LOW, value);
                if let Some(queue) = state.selected_queue() {
                    queue.set_avail_ring_address(low, high);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                let (low, high) = halves(offset == reg::QUEUE_DEVICE_LOW, value);
                if let Some(queue) = state.selected_queue() {
                    queue.set_used_ring_address(low, high);
                }
            }
            reg::QUEUE_READY => {
                if let Some(queue) = state.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                self.notifications.fetch_add(1, Ordering::Relaxed);
                let index = value as u16;
                let running = state.status & reg::STATUS_DRIVER_OK != 0;
                let queue = state.queues.get_mut(index as usize);
                // Notifications for queues that are not live are ignored (virtio 1.2, 2.9).
                if let (true, Some(queue)) = (running, queue) {
                    if !queue.is_valid(&self.memory) {
                        return Err(DeviceError::Queue {
                            device: self.name,
                            queue: index,
                            why: "notified, but the queue is not ready or its rings are not in guest RAM".into(),
                        });
                    }
                    let device = &mut state.device;
                    self.process_and_signal(&mut state.interrupt_status, queue, |queue| {
                        device.process_queue(index, queue, &self.memory)
                    })?;
                }
            }
            reg::INTERRUPT_ACK => state.interrupt_status &= !value,
            reg::STATUS => {
                if value == 0 {
                    state.reset();
                } else {
                    let mut status = value;
                    let offered = Self::offered_features(&state.device);
                    let acceptable = state.driver_features & !offered == 0
                        && state.driver_features & (1 << reg::F_VERSION_1) != 0;
                    if status & reg::STATUS_FEATURES_OK != 0 && !acceptable {
                        status &= !reg::STATUS_FEATURES_OK;
                    }
                    state.status = status;
                }
            }
            _ => {
                return Err(DeviceError::BadAccess {
                    device: self.name,
                    access: "write",
                    offset,
                    len: data.len(),
                })
            }
        }
        Ok(MmioAction::Continue)
    }
}

/// The (low, high) arguments of the queue address setters for one 32-bit write.
fn halves(is_low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if is_low {
        (Some(value), None)
    } else {
        (None, Some(value))
    }
}
