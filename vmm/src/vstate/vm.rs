//! The KVM VM: memslots for guest RAM and the read-only model window.

use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm, or run on a machine with virtualization)")]
    NoKvm,
    #[error("cannot open /dev/kvm: {0} (the user needs read-write access to /dev/kvm, e.g. membership of the kvm group)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks the {0} capability, which aivmm needs")]
    MissingCapability(&'static str),
    #[error("cannot create a KVM VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot register {what} ({size} bytes at guest-physical {guest_addr:#x}) with KVM: {source}")]
    Memslot {
        what: &'static str,
        guest_addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register an ioeventfd at guest-physical {addr:#x}: {source}")]
    IoEventFd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// One KVM VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    next_slot: u32,
}

impl Vm {
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|error| {
            if error.errno() == libc::ENOENT {
                VmError::NoKvm
            } else {
                VmError::OpenKvm(error)
            }
        })?;
        for (cap, name) in [
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ExtCpuid, "EXT_CPUID"),
            (Cap::Xcrs, "XCRS"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Vm {
            kvm,
            fd,
            next_slot: 0,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID entries KVM can give a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)
    }

    /// Registers every region of guest RAM as a read-write memslot.
    pub fn register_ram(&mut self, ram: &GuestMemoryMmap) -> Result<(), VmError> {
        for region in ram.iter() {
            let guest_addr = region.start_addr().0;
            let size = region.len();
            let host_addr = region.as_ptr() as u64;
            self.add_memslot("guest RAM", guest_addr, size, host_addr, 0)?;
        }
        Ok(())
    }

    /// Registers `size` bytes at `host_addr` as a read-only memslot: guest
    /// reads come from that memory, guest writes exit as MMIO writes.
    pub fn register_read_only(
        &mut self,
        what: &'static str,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), VmError> {
        if !self.kvm.check_extension(Cap::ReadonlyMem) {
            return Err(VmError::MissingCapability("READONLY_MEM"));
        }
        self.add_memslot(what, guest_addr, size, host_addr, KVM_MEM_READONLY)
    }

    /// An eventfd that KVM signals for every guest write to the MMIO address
    /// `addr` (any length, any value), completing the write in the kernel.
    pub fn register_ioeventfd(&self, addr: u64) -> Result<EventFd, VmError> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_ioevent(&event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| VmError::IoEventFd { addr, source })?;
        Ok(event)
    }

    fn add_memslot(
        &mut self,
        what: &'static str,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        flags: u32,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: self.next_slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the host range [host_addr, host_addr + size) is a mapping
        // owned by the partition (guest RAM or the model window), which keeps it
        // alive until after this VM (and so the memslot) is gone.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Memslot {
            what,
            guest_addr,
            size,
            source,
        })?;
        self.next_slot += 1;
        Ok(())
    }
}
