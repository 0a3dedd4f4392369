//! VFIO setup of one host device for a partition, over `vfio-ioctls`:
//! the KVM VFIO pseudo-device, a container (one IOMMU domain), the device's
//! group and the device itself; DMA mapping of every guest RAM region; the
//! device's config region as the source of [`VirtualConfigSpace`]; its BAR
//! regions split into pieces mapped into the guest as memslots and pieces
//! the VMM traps (the MSI-X table and PBA); MSI-X vectors wired to KVM
//! irqfds.
//!
//! None of this runs without an IOMMU and /dev/vfio; run
//! [`crate::preflight::preflight`] first, which says what the host lacks.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioRegionInfoCap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::bar::BAR_COUNT;
use crate::bar_trap::DeviceRegion;
use crate::bdf::Bdf;
use crate::config_space::DeviceConfig;
use crate::irq_routing::{GsiRoutingTable, IrqfdChange, RoutingError};

#[derive(Debug, thiserror::Error)]
pub enum VfioSetupError {
    #[error("cannot create KVM's VFIO device (KVM_CREATE_DEVICE of type VFIO): {0}; the host kernel needs KVM built with VFIO support (CONFIG_KVM_VFIO)")]
    KvmVfioDevice(kvm_ioctls::Error),
    #[error("cannot open the VFIO container: {0}; load the VFIO modules (`modprobe vfio-pci`); `aivmm topology` shows which devices are assignable, and the device preflight says what the host lacks")]
    Container(VfioError),
    #[error("cannot set up PCI device {bdf} through VFIO: {source}; the device preflight names the host change needed")]
    Device { bdf: Bdf, source: VfioError },
    #[error(
        "guest RAM region at {guest_address:#x} ({len:#x} bytes) cannot be mapped for DMA: {why}"
    )]
    BadRegion {
        guest_address: u64,
        len: u64,
        why: &'static str,
    },
    #[error("DMA mapping of guest RAM {iova:#x}+{len:#x} for {bdf} failed: {source}; the usual cause is RLIMIT_MEMLOCK (all guest RAM is pinned): raise it or run with CAP_IPC_LOCK")]
    DmaMap {
        bdf: Bdf,
        iova: u64,
        len: u64,
        source: VfioError,
    },
    #[error("{bdf}: enabling MSI-X with {vectors} vectors failed: {source}")]
    EnableMsix {
        bdf: Bdf,
        vectors: usize,
        source: VfioError,
    },
    #[error("{bdf}: setting MSI to {vectors} vectors failed: {source}")]
    EnableMsi {
        bdf: Bdf,
        vectors: usize,
        source: VfioError,
    },
    #[error("KVM refused the interrupt routing of {bdf}'s vector {vector} (GSI {gsi}): {source}")]
    Irqfd {
        bdf: Bdf,
        vector: usize,
        gsi: u32,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

/// One guest RAM region as the IOMMU maps it: device address = guest
/// physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    pub iova: u64,
    pub len: u64,
    pub host_address: u64,
}

/// The DMA mappings that make all of `memory` reachable by the device,
/// checked for page alignment (the IOMMU maps whole pages).
pub fn dma_plan<M: GuestMemoryBackend>(
    memory: &M,
    page_size: u64,
) -> Result<Vec<DmaMapping>, VfioSetupError> {
    let mut plan = Vec::new();
    for region in memory.iter() {
        let guest_address = region.start_addr().0;
        let len = region.len();
        let bad = |why| VfioSetupError::BadRegion {
            guest_address,
            len,
            why,
        };
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| bad("it has no host mapping"))? as u64;
        if !(guest_address.is_multiple_of(page_size)
            && len.is_multiple_of(page_size)
            && host.is_multiple_of(page_size))
        {
            return Err(bad("it is not page-aligned"));
        }
        plan.push(DmaMapping {
            iova: guest_address,
            len,
            host_address: host,
        });
    }
    Ok(plan)
}

/// One piece of a BAR: mapped into the guest (a memslot over the mmap of
/// the device's region) or trapped (the VMM handles each access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarPiece {
    pub offset: u64,
    pub len: u64,
    pub mmap: bool,
}

/// Splits a BAR of `size` bytes: the areas VFIO lets us mmap (`mmappable`,
/// the whole BAR unless a sparse-mmap capability says otherwise), minus the
/// pages holding `traps` (the MSI-X table and PBA), are mapped; everything
/// else is trapped. Pieces are in offset order and cover the BAR.
pub fn bar_pieces(
    size: u64,
    mmappable: &[(u64, u64)],
    traps: &[(u64, u64)],
    page_size: u64,
) -> Vec<BarPiece> {
    let pages = size.div_ceil(page_size);
    let mut map = vec![false; pages as usize];
    for &(offset, len) in mmappable {
        // Only whole pages inside the area can be mapped.
        let first = offset.div_ceil(page_size);
        let end = ((offset + len) / page_size).min(pages);
        for page in first..end {
            map[page as usize] = true;
        }
    }
    for &(offset, len) in traps {
        let first = offset / page_size;
        let end = (offset + len).div_ceil(page_size).min(pages);
        for page in first..end {
            map[page as usize] = false;
        }
    }
    let mut pieces: Vec<BarPiece> = Vec::new();
    for (page, &mmap) in map.iter().enumerate() {
        let offset = page as u64 * page_size;
        let len = page_size.min(size - offset);
        match pieces.last_mut() {
            Some(last) if last.mmap == mmap => last.len += len,
            _ => pieces.push(BarPiece { offset, len, mmap }),
        }
    }
    pieces
}

/// A host PCI device opened through VFIO and attached to a VM.
pub struct VfioPassthrough {
    bdf: Bdf,
    container: Arc<VfioContainer>,
    device: Arc<VfioDevice>,
    dma: Vec<DmaMapping>,
}

impl VfioPassthrough {
    /// Opens `bdf` (its sysfs directory under `root`, "/" on a real host)
    /// into a new container tied to `vm` through KVM's VFIO device (which
    /// lets KVM keep coherent DMA and no-snoop right for the guest).
    pub fn open(vm: &VmFd, root: &Path, bdf: Bdf) -> Result<Self, VfioSetupError> {
        let mut kvm_device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm
            .create_device(&mut kvm_device)
            .map_err(VfioSetupError::KvmVfioDevice)?;
        let container = Arc::new(
            VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio))))
                .map_err(VfioSetupError::Container)?,
        );
        let sysfs = root.join("sys/bus/pci/devices").join(bdf.to_string());
        let device = VfioDevice::new(&sysfs, container.clone(), false)
            .map_err(|source| VfioSetupError::Device { bdf, source })?;
        Ok(VfioPassthrough {
            bdf,
            container,
            device: Arc::new(device),
            dma: Vec::new(),
        })
    }

    /// Maps all of guest RAM for the device's DMA (it is pinned from now
    /// on). On failure the regions already mapped are unmapped again.
    pub fn map_guest_memory<M: GuestMemoryBackend>(
        &mut self,
        memory: &M,
    ) -> Result<(), VfioSetupError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as u64,
            _ => 4096,
        };
        for mapping in dma_plan(memory, page_size)? {
            // SAFETY: the range is a guest RAM region: memory the VMM only
            // shares with the guest (through KVM) and reaches with volatile
            // accesses and system calls, never through Rust references, and
            // it stays mapped for the partition's life; it is unmapped from
            // the IOMMU (Drop) before the guest memory is freed.
            let result = unsafe {
                self.container.vfio_dma_map(
                    mapping.iova,
                    mapping.len as usize,
                    mapping.host_address as *mut u8,
                )
            };
            if let Err(source) = result {
                self.unmap_guest_memory();
                return Err(VfioSetupError::DmaMap {
                    bdf: self.bdf,
                    iova: mapping.iova,
                    len: mapping.len,
                    source,
                });
            }
            self.dma.push(mapping);
        }
        Ok(())
    }

    fn unmap_guest_memory(&mut self) {
        for mapping in self.dma.drain(..) {
            // Nothing better to do on failure: the device is being torn down.
            let _ = self
                .container
                .vfio_dma_unmap(mapping.iova, mapping.len as usize);
        }
    }

    /// The device's config region as [`VirtualConfigSpace`]'s source, and
    /// its length (256 or 4096).
    pub fn config(&self) -> (VfioConfig, usize) {
        let len = self.device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX) as usize;
        (
            VfioConfig {
                device: self.device.clone(),
            },
            len,
        )
    }

    /// The device's BAR registers for [`crate::bar_trap::TrappedBar`].
    pub fn bar_region(&self) -> VfioBarRegion {
        VfioBarRegion {
            device: self.device.clone(),
        }
    }

    /// The size of each BAR as VFIO reports it (0: not implemented).
    pub fn bar_sizes(&self) -> [u64; BAR_COUNT] {
        let mut sizes = [0; BAR_COUNT];
        for (i, size) in sizes.iter_mut().enumerate() {
            *size = self
                .device
                .get_region_size(VFIO_PCI_BAR0_REGION_INDEX + i as u32);
        }
        sizes
    }

    /// The areas of BAR `index` VFIO allows to mmap, as (offset, len).
    pub fn mmappable(&self, index: u8) -> Vec<(u64, u64)> {
        let region = VFIO_PCI_BAR0_REGION_INDEX + u32::from(index);
        if self.device.get_region_flags(region) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        let sparse = self
            .device
            .get_region_caps(region)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(sparse) => Some(sparse),
                _ => None,
            });
        match sparse {
            Some(sparse) => sparse.areas.iter().map(|a| (a.offset, a.size)).collect(),
            None => vec![(0, self.device.get_region_size(region))],
        }
    }

    /// Offset of BAR `index`'s region in the device fd, for mmap.
    pub fn mmap_offset(&self, index: u8) -> u64 {
        self.device
            .get_region_offset(VFIO_PCI_BAR0_REGION_INDEX + u32::from(index))
    }

    pub fn device_fd(&self) -> i32 {
        self.device.as_raw_fd()
    }

    /// Maps `len` bytes of BAR `index` from `offset` (a piece VFIO reports as
    /// mmappable) into this process, shared and writable. The caller unmaps
    /// it with `munmap` and never makes Rust references into it: it is device
    /// memory, for KVM to map into a guest.
    pub fn mmap_bar(&self, index: u8, offset: u64, len: u64) -> std::io::Result<*mut libc::c_void> {
        let file_offset = self.mmap_offset(index) + offset;
        let file_offset = libc::off_t::try_from(file_offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a new mapping at an address the kernel picks, so no existing
        // memory is affected; nothing is read or written through it here.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device_fd(),
                file_offset,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(address)
    }

    /// Hands the device one eventfd per MSI-X vector: VFIO signals
    /// `eventfds[n]` when the device fires vector n.
    pub fn enable_msix(&self, eventfds: &[EventFd]) -> Result<(), VfioSetupError> {
        self.device
            .enable_msix(eventfds.iter().collect())
            .map_err(|source| VfioSetupError::EnableMsix {
                bdf: self.bdf,
                vectors: eventfds.len(),
                source,
            })
    }

    /// Takes MSI-X away from the device again (the guest disabled it).
    pub fn disable_msix(&self) -> Result<(), VfioSetupError> {
        self.device
            .disable_msix()
            .map_err(|source| VfioSetupError::EnableMsix {
                bdf: self.bdf,
                vectors: 0,
                source,
            })
    }

    /// Hands the device one eventfd per MSI vector (multiple-message MSI).
    pub fn enable_msi(&self, eventfds: &[EventFd]) -> Result<(), VfioSetupError> {
        self.device
            .enable_msi(eventfds.iter().collect())
            .map_err(|source| VfioSetupError::EnableMsi {
                bdf: self.bdf,
                vectors: eventfds.len(),
                source,
            })
    }

    /// Takes MSI away from the device again (the guest disabled it).
    pub fn disable_msi(&self) -> Result<(), VfioSetupError> {
        self.device
            .disable_msi()
            .map_err(|source| VfioSetupError::EnableMsi {
                bdf: self.bdf,
                vectors: 0,
                source,
            })
    }

    /// Applies vector changes: attaches or detaches irqfds, then gives KVM
    /// the whole routing table.
    pub fn apply_irq_changes(
        &self,
        vm: &VmFd,
        table: &mut GsiRoutingTable,
        eventfds: &[EventFd],
        changes: &[IrqfdChange],
    ) -> Result<(), VfioSetupError> {
        for change in changes {
            table.apply(change);
        }
        table.install(vm)?;
        for change in changes {
            let (vector, gsi, attach) = match *change {
                IrqfdChange::Attach { vector, gsi, .. } => (vector, gsi, true),
                IrqfdChange::Detach { vector, gsi } => (vector, gsi, false),
                IrqfdChange::Retarget { .. } => continue,
            };
            let Some(eventfd) = eventfds.get(vector) else {
                continue;
            };
            let result = if attach {
                vm.register_irqfd(eventfd, gsi)
            } else {
                vm.unregister_irqfd(eventfd, gsi)
            };
            result.map_err(|source| VfioSetupError::Irqfd {
                bdf: self.bdf,
                vector,
                gsi,
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for VfioPassthrough {
    fn drop(&mut self) {
        self.unmap_guest_memory();
    }
}

/// The device's real config space through VFIO's config region.
pub struct VfioConfig {
    device: Arc<VfioDevice>,
}

impl DeviceConfig for VfioConfig {
    fn read(&self, offset: u16, data: &mut [u8]) {
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, data, u64::from(offset));
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, u64::from(offset));
    }
}

/// The device's BAR regions through VFIO (read/write on the device fd).
pub struct VfioBarRegion {
    device: Arc<VfioDevice>,
}

impl DeviceRegion for VfioBarRegion {
    fn read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.device
            .region_read(VFIO_PCI_BAR0_REGION_INDEX + u32::from(bar), data, offset);
    }

    fn write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.device
            .region_write(VFIO_PCI_BAR0_REGION_INDEX + u32::from(bar), data, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn dma_plan_covers_every_ram_region_at_its_guest_address() {
        let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(0x1_0000_0000), 4 << 20),
        ])
        .unwrap();
        let plan = dma_plan(&memory, 4096).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!((plan[0].iova, plan[0].len), (0, 2 << 20));
        assert_eq!((plan[1].iova, plan[1].len), (0x1_0000_0000, 4 << 20));
        assert!(plan
            .iter()
            .all(|m| m.host_address != 0 && m.host_address % 4096 == 0));
        // The host addresses are the regions' own mappings.
        let region = memory.iter().nth(1).unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
        assert_eq!(plan[1].host_address, host);
        // Regions that are not multiples of a 2 MiB IOMMU page are refused.
        let error = dma_plan(&memory, 4 << 20).unwrap_err();
        assert!(
            matches!(
                error,
                VfioSetupError::BadRegion {
                    guest_address: 0,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn msix_table_pages_are_trapped_and_the_rest_mapped() {
        // A 16 MiB BAR0 with the table at 0xb90000 (6 vectors) and the PBA
        // at 0xba0000, like the GPU-like fixture.
        let pieces = bar_pieces(
            16 << 20,
            &[(0, 16 << 20)],
            &[(0xb9_0000, 96), (0xba_0000, 8)],
            4096,
        );
        assert_eq!(
            pieces,
            vec![
                BarPiece {
                    offset: 0,
                    len: 0xb9_0000,
                    mmap: true
                },
                BarPiece {
                    offset: 0xb9_0000,
                    len: 0x1000,
                    mmap: false
                },
                BarPiece {
                    offset: 0xb9_1000,
                    len: 0xf000,
                    mmap: true
                },
                BarPiece {
                    offset: 0xba_0000,
                    len: 0x1000,
                    mmap: false
                },
                BarPiece {
                    offset: 0xba_1000,
                    len: 0x45_f000,
                    mmap: true
                },
            ]
        );
        // Table and PBA in one page of a small BAR: one trapped page.
        let pieces = bar_pieces(0x8000, &[(0, 0x8000)], &[(0x2000, 0x40), (0x2800, 8)], 4096);
        assert_eq!(
            pieces,
            vec![
                BarPiece {
                    offset: 0,
                    len: 0x2000,
                    mmap: true
                },
                BarPiece {
                    offset: 0x2000,
                    len: 0x1000,
                    mmap: false
                },
                BarPiece {
                    offset: 0x3000,
                    len: 0x5000,
                    mmap: true
                },
            ]
        );
    }

    #[test]
    fn sparse_and_unmappable_regions() {
        // VFIO said: only [0x1000, 0x3000) may be mmapped.
        let pieces = bar_pieces(0x4000, &[(0x1000, 0x2000)], &[], 4096);
        assert_eq!(
            pieces,
            vec![
                BarPiece {
                    offset: 0,
                    len: 0x1000,
                    mmap: false
                },
                BarPiece {
                    offset: 0x1000,
                    len: 0x2000,
                    mmap: true
                },
                BarPiece {
                    offset: 0x3000,
                    len: 0x1000,
                    mmap: false
                },
            ]
        );
        // No mmap at all (an I/O BAR, or a region without the MMAP flag),
        // and a BAR smaller than a page.
        assert_eq!(
            bar_pieces(0x4000, &[], &[], 4096),
            vec![BarPiece {
                offset: 0,
                len: 0x4000,
                mmap: false
            }]
        );
        assert_eq!(
            bar_pieces(0x80, &[(0, 0x80)], &[], 4096),
            vec![BarPiece {
                offset: 0,
                len: 0x80,
                mmap: false
            }]
        );
    }

    /// This host has no /dev/vfio: opening a device fails with an error that
    /// points at the preflight, and nothing panics.
    #[test]
    fn opening_without_vfio_fails_with_a_pointer_to_the_preflight() {
        if std::path::Path::new("/dev/vfio/vfio").exists() {
            println!("skipped: this host has /dev/vfio/vfio");
            return;
        }
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(error) if std::env::var_os("CI").is_none() => {
                println!("skipped: no usable /dev/kvm ({error})");
                return;
            }
            Err(error) => panic!("CI is set but /dev/kvm is not usable: {error}"),
        };
        let vm = kvm.create_vm().unwrap();
        let bdf: Bdf = "0000:00:03.0".parse().unwrap();
        let error = match VfioPassthrough::open(&vm, Path::new("/"), bdf) {
            Ok(_) => panic!("opened a VFIO device on a host without /dev/vfio"),
            Err(error) => error,
        };
        // KVM's VFIO device needs CONFIG_KVM_VFIO; the container needs /dev/vfio/vfio.
        assert!(
            matches!(
                error,
                VfioSetupError::KvmVfioDevice(_)
                    | VfioSetupError::Container(VfioError::OpenContainer(_))
            ),
            "{error}"
        );
        println!("{error}");
    }
}
