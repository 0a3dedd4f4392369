//! The host end of a partition's inference device: the device on the MMIO
//! bus, an ioeventfd on its QUEUE_NOTIFY register (KVM completes the guest's
//! notification in the kernel, without a return to the VMM) and an
//! event-manager thread that drains the event queue when the eventfd fires.
//!
//! Requests go the other way without any exit: [`InferenceLink::submit`]
//! fills the buffer the guest keeps available and wakes the vCPUs.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aivmm_devices::bus::DeviceError;
use aivmm_devices::virtio::inference::{InferenceDevice, InferenceEvent, SubmitError};
use aivmm_devices::virtio::mmio::VirtioMmioTransport;
use aivmm_devices::GuestMemory;
use aivmm_guest_abi::inference::{self as abi, RequestHeader};
use aivmm_guest_abi::layout::INFERENCE_MMIO_ADDR;
use aivmm_guest_abi::virtio_mmio::QUEUE_NOTIFY;
use event_manager::EventSet;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::{PartitionError, Shared};
use crate::isolation::{ThreadIsolation, ThreadKind};
use crate::vstate::vm::Vm;

/// What the guest's inference session is sized for (see `BootInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InferenceSetup {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Tokens per forward pass while a prompt is processed.
    pub max_batch: u32,
    /// Bytes at the start of the heap the guest touches before loading.
    pub warmup_heap_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum InferenceLinkError {
    #[error("cannot create the inference device: {0}")]
    Device(#[source] DeviceError),
    #[error("cannot create an eventfd for the inference device: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up the inference event loop: {0}")]
    EventManager(String),
    #[error("cannot start the inference event thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("inference event thread: {0}")]
    Isolation(#[source] crate::isolation::IsolationError),
    #[error("the guest has not set up the inference device (yet)")]
    NotReady,
    #[error("cannot hand the request to the guest: {0}")]
    Submit(#[from] SubmitError),
}

/// The host end of the inference device of a running partition.
pub struct InferenceLink {
    transport: Arc<VirtioMmioTransport<InferenceDevice>>,
    events: Mutex<Receiver<InferenceEvent>>,
    counts: Arc<DrainCounts>,
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Counters the event thread keeps.
#[derive(Default)]
struct DrainCounts {
    /// Guest notifications (each one exit, completed in the kernel).
    notifications: AtomicU64,
}

impl Shared {
    fn mmio_exits(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.mmio_exits.load(Ordering::Relaxed))
            .sum()
    }
}

/// The event-manager subscriber: drains the event queue on each notification.
struct EventQueueDrainer {
    notify: EventFd,
    stop: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    transport: Arc<VirtioMmioTransport<InferenceDevice>>,
    counts: Arc<DrainCounts>,
    shared: Arc<Shared>,
}

impl EventQueueDrainer {
    fn drain(&mut self) {
        // The counter holds the number of notifications since the last read
        // (EAGAIN: none, the eventfd is non-blocking; drain anyway).
        if let Ok(count) = self.notify.read() {
            self.counts
                .notifications
                .fetch_add(count, Ordering::Relaxed);
        }
        let drained = self
            .transport
            .with_live_queue(abi::EVENT_QUEUE, |device, queue, memory| {
                device.drain_events(queue, memory)
            });
        if let Some(Err(source)) = drained {
            self.shared
                .finish(Err(PartitionError::Device { vcpu: 0, source }));
        }
    }
}

impl MutEventSubscriber for EventQueueDrainer {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // On stop, drain once more: nothing the guest notified is left uncounted.
        self.drain();
        if events.fd() == self.stop.as_raw_fd() {
            self.stopped.store(true, Ordering::Release);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.notify.as_raw_fd(), self.stop.as_raw_fd()] {
            if let Err(error) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                self.shared.finish(Err(PartitionError::InferenceLink(
                    InferenceLinkError::EventManager(format!("cannot watch an eventfd: {error:?}")),
                )));
            }
        }
    }
}

impl InferenceLink {
    /// Creates the device, registers the ioeventfd on its QUEUE_NOTIFY and
    /// starts the event thread (on the partition's CPUs, in its cgroup, under
    /// its filter). The caller puts [`InferenceLink::device`] on the MMIO bus
    /// at [`INFERENCE_MMIO_ADDR`].
    pub(super) fn attach(
        vm: &Vm,
        memory: GuestMemory,
        shared: Arc<Shared>,
        isolation: ThreadIsolation,
        cpus: Option<Vec<usize>>,
    ) -> Result<Self, PartitionError> {
        let (sender, receiver) = mpsc::channel();
        let transport = Arc::new(
            VirtioMmioTransport::new(InferenceDevice::new(sender), memory)
                .map_err(InferenceLinkError::Device)?,
        );
        let notify = vm.register_ioeventfd(INFERENCE_MMIO_ADDR + QUEUE_NOTIFY)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(InferenceLinkError::EventFd)?;
        let stop_for_thread = Arc::new(stop.try_clone().map_err(InferenceLinkError::EventFd)?);
        let counts = Arc::new(DrainCounts::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let drainer = EventQueueDrainer {
            notify,
            stop: stop_for_thread,
            stopped: stopped.clone(),
            transport: transport.clone(),
            counts: counts.clone(),
            shared: shared.clone(),
        };
        let mut manager = EventManager::<Box<EventQueueDrainer>>::new()
            .map_err(|error| InferenceLinkError::EventManager(format!("{error:?}")))?;
        manager.add_subscriber(Box::new(drainer));
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("inference-events".into())
            .spawn(move || {
                if let Err(error) = isolation.enter(ThreadKind::Events, cpus.as_deref()) {
                    thread_shared.finish(Err(PartitionError::InferenceLink(
                        InferenceLinkError::Isolation(error),
                    )));
                    return;
                }
                while !stopped.load(Ordering::Acquire) {
                    if let Err(error) = manager.run() {
                        thread_shared.finish(Err(PartitionError::InferenceLink(
                            InferenceLinkError::EventManager(format!("{error:?}")),
                        )));
                        return;
                    }
                }
            })
            .map_err(InferenceLinkError::Thread)?;
        Ok(InferenceLink {
            transport,
            events: Mutex::new(receiver),
            counts,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The device, for the MMIO bus.
    pub(super) fn device(&self) -> Arc<VirtioMmioTransport<InferenceDevice>> {
        self.transport.clone()
    }

    /// Hands a request to the guest and wakes every vCPU (vCPU 0 picks the
    /// request up; the workers will be needed right after).
    pub fn submit(&self, header: &RequestHeader, payload: &[u8]) -> Result<(), InferenceLinkError> {
        self.transport
            .with_live_queue(abi::REQUEST_QUEUE, |device, queue, memory| {
                device.submit(queue, memory, header, payload)
            })
            .ok_or(InferenceLinkError::NotReady)??;
        self.shared.wakers.wake_all();
        Ok(())
    }

    /// The next event from the guest, waiting at most `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Result<InferenceEvent, RecvTimeoutError> {
        self.events
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .recv_timeout(timeout)
    }

    /// Guest notifications of the event queue so far.
    pub fn notifications(&self) -> u64 {
        self.counts.notifications.load(Ordering::Relaxed)
    }

    /// MMIO exits to the VMM so far, on every vCPU.
    pub fn mmio_exits(&self) -> u64 {
        self.shared.mmio_exits()
    }

    /// All exits so far: MMIO exits to the VMM plus notifications.
    pub fn exits(&self) -> u64 {
        self.mmio_exits() + self.notifications()
    }

    /// Stops and joins the event thread.
    pub(super) fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A failed write can only mean the counter is saturated, which
            // also wakes the thread.
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for InferenceLink {
    fn drop(&mut self) {
        self.stop();
    }
}
