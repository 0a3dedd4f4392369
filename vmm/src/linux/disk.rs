//! `--disk PATH[,ro]`: virtio-blk devices for a Linux guest on virtio-mmio.
//!
//! Disk `n` has its register window at [`DISK_MMIO_BASE`] + n * 4 KiB in the
//! 32-bit MMIO hole and one of the free ISA IRQs ([`DISK_IRQS`]), which KVM's
//! in-kernel IOAPIC delivers (an irqfd); the MP table already routes them.
//! The DSDT describes each as an `LNRO0005` device at [`placement`]
//! (acpi.rs), which is how Debian's modular virtio_mmio finds them; a guest
//! booted with `acpi=off` gets them on the command line instead
//! (`virtio_mmio.device=4K@<addr>:<irq>`, read by a kernel built with
//! CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). The guest's
//! QUEUE_NOTIFY write completes in KVM (an ioeventfd); one event thread per
//! VM serves the requests and raises the interrupt.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use aivmm_devices::bus::{BusError, DeviceError, MmioBus};
use aivmm_devices::virtio::block::{Block, BlockError, BlockStats, REQUEST_QUEUE};
use aivmm_devices::virtio::mmio::VirtioMmioTransport;
use aivmm_devices::virtio::VirtioDevice;
use aivmm_devices::GuestMemory;
use aivmm_guest_abi::virtio_mmio::QUEUE_NOTIFY;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::e820::MMIO_HOLE_START;
use super::vcpu::{LinuxEnd, Shared};
use crate::isolation::ThreadKind;
use crate::vstate::vm::{Vm, VmError};

/// The first disk's register window, 256 MiB into the 32-bit hole (above
/// the PCI 32-bit BAR window, below ECAM).
pub const DISK_MMIO_BASE: u64 = MMIO_HOLE_START + 0x1000_0000;
/// Each disk's register window.
pub const DISK_MMIO_SIZE: u64 = 0x1000;
/// ISA IRQs no device of a Linux guest uses: not the PIT (0), keyboard (1),
/// cascade (2), COM2/COM1 (3/4, Linux probes them), RTC (8) or FPU (13).
pub const DISK_IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];

const _: () = assert!(
    DISK_MMIO_BASE + DISK_IRQS.len() as u64 * DISK_MMIO_SIZE <= super::pci::ECAM_BASE,
    "the disks' register windows must end below ECAM"
);

/// One `--disk` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

impl FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH,ro` or `PATH,rw`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (path, read_only) = match text.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, other)) => {
                return Err(format!(
                    "unknown disk option {other:?} (write PATH or PATH,ro)"
                ))
            }
            None => (text, false),
        };
        if path.is_empty() {
            return Err("the disk path is empty (write PATH or PATH,ro)".into());
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] BlockError),
    #[error("disk image {path} is given twice; attach each image once")]
    Duplicate { path: PathBuf },
    #[error("{count} disks given; a Linux guest has at most {max}")]
    TooMany { count: usize, max: usize },
    #[error("disk {index}: {source}")]
    Device { index: usize, source: DeviceError },
    #[error("disk {index}: {source}")]
    Bus { index: usize, source: BusError },
    #[error("disk {index}: {source}")]
    Vm { index: usize, source: VmError },
    #[error("disk {index}: cannot route its interrupt to IRQ {irq}: {source}")]
    Irq {
        index: usize,
        irq: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd for the disks: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up the disks' event loop: {0}")]
    EventManager(String),
    #[error("cannot start the disks' event thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where disk `index` is: (register window, IRQ).
pub fn placement(index: usize) -> Option<(u64, u32)> {
    let irq = *DISK_IRQS.get(index)?;
    Some((DISK_MMIO_BASE + index as u64 * DISK_MMIO_SIZE, irq))
}

/// `cmdline` with one `virtio_mmio.device=` per disk appended when the
/// guest is told not to read ACPI (`acpi=off`); otherwise the DSDT
/// describes the disks, and the same device announced twice would make the
/// second probe fail on its busy register window.
pub fn with_disk_args(cmdline: &str, disks: usize) -> String {
    let mut line = cmdline.trim_end().to_string();
    if !line.split_whitespace().any(|word| word == "acpi=off") {
        return line;
    }
    for (addr, irq) in (0..disks).map_while(placement) {
        line.push_str(&format!(
            " virtio_mmio.device={}K@{addr:#x}:{irq}",
            DISK_MMIO_SIZE >> 10
        ));
    }
    line
}

/// Opens and locks every image, before anything else is built: a missing
/// or busy image is the first error the user sees.
pub fn open(specs: &[DiskSpec]) -> Result<Vec<Block>, DiskError> {
    if specs.len() > DISK_IRQS.len() {
        return Err(DiskError::TooMany {
            count: specs.len(),
            max: DISK_IRQS.len(),
        });
    }
    for (index, spec) in specs.iter().enumerate() {
        let same = |other: &DiskSpec| match (spec.path.canonicalize(), other.path.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => spec.path == other.path,
        };
        if specs[..index].iter().any(same) {
            return Err(DiskError::Duplicate {
                path: spec.path.clone(),
            });
        }
    }
    specs
        .iter()
        .map(|spec| Block::open(&spec.path, spec.read_only).map_err(DiskError::from))
        .collect()
}

type DiskTransport = VirtioMmioTransport<Block>;

/// The disks of a running guest and their event thread.
#[derive(Default)]
pub struct Disks {
    transports: Vec<Arc<DiskTransport>>,
    /// The eventfds KVM signals for each disk's QUEUE_NOTIFY.
    notify: Vec<EventFd>,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Disks {
    /// Puts each device on `bus` and wires its interrupt and notification
    /// to KVM; starts the event thread (none without disks), under its
    /// seccomp filter when `seccomp`.
    pub fn attach(
        vm: &Vm,
        memory: &GuestMemory,
        blocks: Vec<Block>,
        bus: &mut MmioBus,
        shared: Arc<Shared>,
        seccomp: bool,
    ) -> Result<Self, DiskError> {
        if blocks.is_empty() {
            return Ok(Disks::default());
        }
        let mut transports = Vec::new();
        let mut notifiers = Vec::new();
        let mut notify_fds = Vec::new();
        for (index, block) in blocks.into_iter().enumerate() {
            let (addr, irq) = placement(index).ok_or(DiskError::TooMany {
                count: index + 1,
                max: DISK_IRQS.len(),
            })?;
            let line = EventFd::new(libc::EFD_NONBLOCK).map_err(DiskError::EventFd)?;
            vm.fd()
                .register_irqfd(&line, irq)
                .map_err(|source| DiskError::Irq { index, irq, source })?;
            let transport = Arc::new(
                VirtioMmioTransport::new(block, memory.clone())
                    .map_err(|source| DiskError::Device { index, source })?
                    .with_interrupt(Box::new(move || line.write(1))),
            );
            bus.insert(addr, DISK_MMIO_SIZE, transport.clone())
                .map_err(|source| DiskError::Bus { index, source })?;
            let notify = vm
                .register_ioeventfd(addr + QUEUE_NOTIFY)
                .map_err(|source| DiskError::Vm { index, source })?;
            notify_fds.push(notify.try_clone().map_err(DiskError::EventFd)?);
            notifiers.push(Notifier {
                index,
                notify,
                transport: transport.clone(),
                shared: shared.clone(),
            });
            transports.push(transport);
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(DiskError::EventFd)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = Stopper {
            stop: stop.try_clone().map_err(DiskError::EventFd)?,
            stopped: stopped.clone(),
            shared: shared.clone(),
        };
        let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
            .map_err(|error| DiskError::EventManager(format!("{error:?}")))?;
        for notifier in notifiers {
            manager.add_subscriber(Box::new(notifier));
        }
        manager.add_subscriber(Box::new(stopper));
        let thread = std::thread::Builder::new()
            .name("linux-disks".into())
            .spawn(move || {
                if seccomp {
                    if let Err(end) = LinuxEnd::enter_seccomp(ThreadKind::LinuxDisks) {
                        shared.finish(end);
                        return;
                    }
                }
                while !stopped.load(Ordering::Acquire) {
                    if let Err(error) = manager.run() {
                        shared.finish(LinuxEnd::Disk {
                            error: format!("event loop: {error:?}"),
                        });
                        return;
                    }
                }
            })
            .map_err(DiskError::Thread)?;
        Ok(Disks {
            transports,
            notify: notify_fds,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Each disk's counters.
    pub fn stats(&self) -> Vec<BlockStats> {
        self.transports
            .iter()
            .map(|t| t.with_device(|block| block.stats()))
            .collect()
    }

    /// Signals disk `index`'s notification as KVM does when the guest
    /// writes its QUEUE_NOTIFY register (false: no such disk).
    pub fn notify(&self, index: usize) -> std::io::Result<bool> {
        match self.notify.get(index) {
            Some(event) => event.write(1).map(|()| true),
            None => Ok(false),
        }
    }

    /// Stops and joins the event thread.
    pub fn stop(&mut self) {
        if let (Some(stop), Some(thread)) = (self.stop.take(), self.thread.take()) {
            // A failed write means the counter is saturated, which wakes the thread too.
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one disk's queue when the guest notifies it.
struct Notifier {
    index: usize,
    notify: EventFd,
    transport: Arc<DiskTransport>,
    shared: Arc<Shared>,
}

impl MutEventSubscriber for Notifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // EAGAIN (nothing counted) is harmless: the queue is served anyway.
        let _ = self.notify.read();
        let served = self
            .transport
            .with_live_queue(REQUEST_QUEUE, |block, queue, memory| {
                block.process_queue(REQUEST_QUEUE, queue, memory)
            });
        if let Some(Err(error)) = served {
            self.shared.finish(LinuxEnd::Disk {
                error: format!("disk {}: {error}", self.index),
            });
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(error) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            self.shared.finish(LinuxEnd::Disk {
                error: format!("disk {}: cannot watch its eventfd: {error:?}", self.index),
            });
        }
    }
}

/// Ends the event loop.
struct Stopper {
    stop: EventFd,
    stopped: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Without the stop event the thread could not be ended: do not start it.
        if let Err(error) = ops.add(Events::with_data_raw(
            self.stop.as_raw_fd(),
            0,
            EventSet::IN,
        )) {
            self.stopped.store(true, Ordering::Release);
            self.shared.finish(LinuxEnd::Disk {
                error: format!("cannot watch the stop eventfd: {error:?}"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        let spec: DiskSpec = "/images/root.img,ro".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("/images/root.img"));
        assert!(spec.read_only);
        for text in ["root.img", "root.img,rw"] {
            let spec: DiskSpec = text.parse().unwrap();
            assert_eq!(
                (spec.path.to_str(), spec.read_only),
                (Some("root.img"), false)
            );
        }
        let error = "root.img,readonly".parse::<DiskSpec>().unwrap_err();
        assert!(
            error.contains("unknown disk option \"readonly\""),
            "{error}"
        );
        assert!(",ro".parse::<DiskSpec>().unwrap_err().contains("empty"));
    }

    #[test]
    fn disks_are_announced_on_the_command_line_only_without_acpi() {
        assert_eq!(
            with_disk_args("console=ttyS0 acpi=off ", 2),
            "console=ttyS0 acpi=off virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        // With ACPI, the DSDT describes them (acpi.rs).
        assert_eq!(with_disk_args("console=ttyS0", 2), "console=ttyS0");
        assert_eq!(with_disk_args("quiet acpi=off", 0), "quiet acpi=off");
        // Every window is in the hole, below the IOAPIC, and they do not overlap.
        let (last, _) = placement(DISK_IRQS.len() - 1).unwrap();
        const { assert!(DISK_MMIO_BASE >= MMIO_HOLE_START) };
        assert!(last + DISK_MMIO_SIZE <= u64::from(super::super::mptable::IOAPIC_ADDR));
        assert!(placement(DISK_IRQS.len()).is_none());
    }

    #[test]
    fn too_many_disks_are_refused_before_any_is_opened() {
        let specs = vec![
            DiskSpec {
                path: PathBuf::from("/nonexistent"),
                read_only: true,
            };
            DISK_IRQS.len() + 1
        ];
        let error = open(&specs).err().unwrap().to_string();
        assert!(error.contains("at most 9"), "{error}");
        let error = open(&specs[..2]).err().unwrap().to_string();
        assert!(error.contains("/nonexistent is given twice"), "{error}");
    }
}
