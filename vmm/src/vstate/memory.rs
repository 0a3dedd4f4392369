//! Guest RAM (anonymous or hugepage-backed memory through vm-memory) and the
//! model window (a file mapped read-only, never copied).

use std::fs::File;
use std::path::{Path, PathBuf};

use aivmm_guest_abi::layout;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Size of the hugepages guest RAM uses when asked to.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes is not a multiple of 2 MiB")]
    Unaligned { size: u64 },
    #[error(
        "guest memory of {size} bytes is out of range: it must be between 4 MiB and {max} bytes"
    )]
    OutOfRange { size: u64, max: u64 },
    #[error("cannot reserve {size} bytes of host memory for guest RAM: {source}")]
    Mmap { size: u64, source: std::io::Error },
    #[error(
        "not enough free 2 MiB hugepages for {size_mib} MiB of guest memory: {needed} needed, {available} available \
         ({free} free, {reserved} reserved by others). As root: echo {suggested} > /proc/sys/vm/nr_hugepages"
    )]
    HugepagesShort {
        size_mib: u64,
        needed: u64,
        available: u64,
        free: u64,
        reserved: u64,
        suggested: u64,
    },
    #[error(
        "cannot map {size_mib} MiB of guest memory on 2 MiB hugepages: {source}. \
         Check that /proc/sys/vm/nr_hugepages reserves at least {needed} pages"
    )]
    HugepageMmap {
        size_mib: u64,
        needed: u64,
        source: std::io::Error,
    },
    #[error("cannot set up guest memory regions: {0}")]
    Regions(String),
    #[error("cannot open model file {path}: {source}")]
    ModelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} is empty")]
    ModelEmpty { path: PathBuf },
    #[error("model file {path} is {size} bytes; the model window holds at most {max} bytes")]
    ModelTooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("cannot map model file {path} read-only: {source}")]
    ModelMap {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamBacking {
    /// Anonymous private memory, populated on first touch.
    #[default]
    Anonymous,
    /// 2 MiB hugetlb pages, reserved in full when the partition starts.
    Hugepages,
}

/// Guest RAM at guest-physical `[0, size)`.
pub fn create_guest_ram(size: u64, backing: RamBacking) -> Result<GuestMemoryMmap, MemoryError> {
    if !size.is_multiple_of(HUGEPAGE_SIZE) {
        return Err(MemoryError::Unaligned { size });
    }
    if !(4 << 20..=layout::RAM_MAX).contains(&size) {
        return Err(MemoryError::OutOfRange {
            size,
            max: layout::RAM_MAX,
        });
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let region = match backing {
        RamBacking::Anonymous => {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            MmapRegion::build(None, size as usize, prot, flags).map_err(|error| {
                MemoryError::Mmap {
                    size,
                    source: mmap_source(error),
                }
            })?
        }
        RamBacking::Hugepages => {
            let needed = size / HUGEPAGE_SIZE;
            check_hugepages(size, needed)?;
            // No MAP_NORESERVE: the kernel reserves every page now, so a
            // shortage fails here rather than as a SIGBUS in the middle of a run.
            let flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            MmapRegion::build(None, size as usize, prot, flags).map_err(|error| {
                MemoryError::HugepageMmap {
                    size_mib: size >> 20,
                    needed,
                    source: mmap_source(error),
                }
            })?
        }
    };
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Regions("RAM region wraps".into()))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|error| MemoryError::Regions(error.to_string()))
}

fn mmap_source(error: vm_memory::mmap::MmapRegionError) -> std::io::Error {
    match error {
        vm_memory::mmap::MmapRegionError::Mmap(source) => source,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Fails early, with numbers, when the 2 MiB pool cannot hold `needed` pages.
fn check_hugepages(size: u64, needed: u64) -> Result<(), MemoryError> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(Path::new(HUGEPAGES_SYSFS).join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(total), Some(free), Some(reserved)) = (
        read("nr_hugepages"),
        read("free_hugepages"),
        read("resv_hugepages"),
    ) else {
        // No sysfs counters (unusual kernel): let mmap decide.
        return Ok(());
    };
    let available = free.saturating_sub(reserved);
    if available < needed {
        return Err(MemoryError::HugepagesShort {
            size_mib: size >> 20,
            needed,
            available,
            free,
            reserved,
            suggested: total + (needed - available),
        });
    }
    Ok(())
}

/// A model file mapped read-only into this process, to be registered as a
/// read-only memslot at [`layout::MODEL_WINDOW_ADDR`].
pub struct ModelWindow {
    path: PathBuf,
    region: MmapRegion<()>,
    file_len: u64,
}

impl ModelWindow {
    pub fn open(path: &Path) -> Result<Self, MemoryError> {
        let file = File::open(path).map_err(|source| MemoryError::ModelOpen {
            path: path.into(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| MemoryError::ModelOpen {
                path: path.into(),
                source,
            })?
            .len();
        if file_len == 0 {
            return Err(MemoryError::ModelEmpty { path: path.into() });
        }
        if file_len > layout::MODEL_WINDOW_MAX {
            return Err(MemoryError::ModelTooLarge {
                path: path.into(),
                size: file_len,
                max: layout::MODEL_WINDOW_MAX,
            });
        }
        // The tail of the last page reads as zeros; memslots are page granular.
        let mapped_len = file_len.next_multiple_of(layout::PAGE_SIZE);
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            mapped_len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|error| MemoryError::ModelMap {
            path: path.into(),
            source: mmap_source(error),
        })?;
        Ok(ModelWindow {
            path: path.into(),
            region,
            file_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Exact length of the file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Length of the mapping (the file length rounded up to a page).
    pub fn mapped_len(&self) -> u64 {
        self.region.size() as u64
    }

    /// Host address of the mapping, for the memslot.
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// The file's bytes as this process sees them.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the region maps `mapped_len` readable bytes for as long as
        // `self` lives; the model file is not modified while in use (a
        // truncation would be a SIGBUS, the same contract as any mmap loader).
        unsafe { std::slice::from_raw_parts(self.region.as_ptr(), self.file_len as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_sizes_are_checked() {
        assert!(matches!(
            create_guest_ram(3 << 20, RamBacking::Anonymous),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            create_guest_ram(2 << 20, RamBacking::Anonymous),
            Err(MemoryError::OutOfRange { .. })
        ));
        let ram = create_guest_ram(8 << 20, RamBacking::Anonymous).unwrap();
        assert_eq!(ram.last_addr(), GuestAddress((8 << 20) - 1));
        ram.write_obj(0xabcdu64, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xabcd);
    }

    #[test]
    fn model_window_maps_the_file_read_only() {
        let path = std::env::temp_dir().join(format!("aivmm-model-window-{}", std::process::id()));
        std::fs::write(&path, b"GGUF and then some").unwrap();
        let window = ModelWindow::open(&path).unwrap();
        assert_eq!(window.bytes(), b"GGUF and then some");
        assert_eq!(window.mapped_len(), 4096);
        std::fs::remove_file(&path).unwrap();

        let empty = std::env::temp_dir().join(format!("aivmm-model-empty-{}", std::process::id()));
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            ModelWindow::open(&empty),
            Err(MemoryError::ModelEmpty { .. })
        ));
        std::fs::remove_file(&empty).unwrap();
        assert!(matches!(
            ModelWindow::open(Path::new("/nonexistent/model.gguf")),
            Err(MemoryError::ModelOpen { .. })
        ));
    }
}
