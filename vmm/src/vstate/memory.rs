//! Guest RAM (anonymous or hugepage-backed memory through vm-memory), bound
//! to a NUMA node when asked and prefaulted in full, and the model window (a
//! file mapped read-only, never copied).
//!
//! Prefault: every page of guest RAM is populated (on the bound node) before
//! the partition starts, so no host page fault happens while it serves; a
//! hugepage shortage shows up here as an error rather than as a SIGBUS later.

use std::fs::File;
use std::path::{Path, PathBuf};

use aivmm_guest_abi::layout;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Size of the hugepages guest RAM uses when asked to.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const NODES_SYSFS: &str = "/sys/devices/system/node";
/// Highest NUMA node number accepted (the nodemask passed to mbind has this many bits).
const MAX_NODES: u32 = 1024;

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
    #[error(
        "not enough free 2 MiB hugepages on NUMA node {node} for {size_mib} MiB of guest memory: \
         {needed} needed, {available} free there. As root: echo {suggested} > \
         /sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/nr_hugepages"
    )]
    HugepagesShortOnNode {
        node: u32,
        size_mib: u64,
        needed: u64,
        available: u64,
        suggested: u64,
    },
    #[error("NUMA node {node} does not exist on this host (nodes: {nodes})")]
    NoSuchNode { node: u32, nodes: String },
    #[error("cannot bind guest memory to NUMA node {node} (mbind MPOL_BIND): {source}")]
    Mbind { node: u32, source: std::io::Error },
    #[error(
        "cannot populate {size_mib} MiB of guest memory{where_}: {source}{hint}",
        where_ = node.map(|n| format!(" on NUMA node {n}")).unwrap_or_default(),
        hint = if *hugepages { format!(". Reserve more 2 MiB hugepages{}", node.map(|n| format!(" on node {n} (/sys/devices/system/node/node{n}/hugepages/hugepages-2048kB/nr_hugepages)")).unwrap_or_else(|| " (/proc/sys/vm/nr_hugepages)".into())) } else { String::new() }
    )]
    Prefault {
        size_mib: u64,
        node: Option<u32>,
        hugepages: bool,
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

impl RamBacking {
    /// The backing asked for by a `hugepages` switch (CLI flag, API field).
    pub fn with_hugepages(hugepages: bool) -> RamBacking {
        if hugepages {
            RamBacking::Hugepages
        } else {
            RamBacking::Anonymous
        }
    }
}

/// Guest RAM at guest-physical `[0, size)`, on NUMA node `node` when given
/// (MPOL_BIND: allocations never fall back to another node), every page
/// populated before this returns.
pub fn create_guest_ram(
    size: u64,
    backing: RamBacking,
    node: Option<u32>,
) -> Result<GuestMemoryMmap, MemoryError> {
    if !size.is_multiple_of(HUGEPAGE_SIZE) {
        return Err(MemoryError::Unaligned { size });
    }
    if !(4 << 20..=layout::RAM_MAX).contains(&size) {
        return Err(MemoryError::OutOfRange {
            size,
            max: layout::RAM_MAX,
        });
    }
    create_guest_ram_ranges(&[(0, size)], backing, node)
}

/// Guest RAM made of several `(guest address, size)` ranges (a Linux
/// guest's RAM below the 32-bit hole and above 4 GiB), each backed,
/// bound and prefaulted as [`create_guest_ram`] does; the hugepage pools
/// are checked once for all of it.
pub fn create_guest_ram_ranges(
    ranges: &[(u64, u64)],
    backing: RamBacking,
    node: Option<u32>,
) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(&(_, size)) = ranges
        .iter()
        .find(|(start, size)| *size == 0 || !(start | size).is_multiple_of(HUGEPAGE_SIZE))
    {
        return Err(MemoryError::Unaligned { size });
    }
    if let Some(node) = node {
        check_node(node)?;
    }
    let total: u64 = ranges.iter().map(|(_, size)| size).sum();
    if backing == RamBacking::Hugepages {
        let needed = total / HUGEPAGE_SIZE;
        // The node's pool first: its message names the node to reserve on.
        if let Some(node) = node {
            check_node_hugepages(node, total, needed)?;
        }
        check_hugepages(total, needed)?;
    }
    let regions = ranges
        .iter()
        .map(|&(start, size)| {
            let region = map_ram(size, backing, node)?;
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| MemoryError::Regions(format!("RAM region at {start:#x} wraps")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|error| MemoryError::Regions(error.to_string()))
}

/// One mapping of `size` bytes: backed, bound to `node` and prefaulted.
fn map_ram(size: u64, backing: RamBacking, node: Option<u32>) -> Result<MmapRegion, MemoryError> {
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
            // No MAP_NORESERVE: the kernel reserves every page now, so a
            // shortage fails here rather than as a SIGBUS in the middle of a run.
            let flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            MmapRegion::build(None, size as usize, prot, flags).map_err(|error| {
                MemoryError::HugepageMmap {
                    size_mib: size >> 20,
                    needed: size / HUGEPAGE_SIZE,
                    source: mmap_source(error),
                }
            })?
        }
    };
    if let Some(node) = node {
        bind(region.as_ptr(), size, node)?;
    }
    prefault(region.as_ptr(), size, backing).map_err(|source| MemoryError::Prefault {
        size_mib: size >> 20,
        node,
        hugepages: backing == RamBacking::Hugepages,
        source,
    })?;
    Ok(region)
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

/// The host's online NUMA nodes.
pub fn online_nodes() -> Vec<u32> {
    std::fs::read_to_string(Path::new(NODES_SYSFS).join("online"))
        .ok()
        .and_then(|text| crate::run::parse_cpu_list(text.trim()).ok())
        .map(|nodes| nodes.into_iter().map(|n| n as u32).collect())
        // No sysfs node directory: a kernel without NUMA, which has node 0.
        .unwrap_or_else(|| vec![0])
}

fn check_node(node: u32) -> Result<(), MemoryError> {
    let nodes = online_nodes();
    if node >= MAX_NODES || !nodes.contains(&node) {
        return Err(MemoryError::NoSuchNode {
            node,
            nodes: nodes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    Ok(())
}

/// The node's own pool: MPOL_BIND takes hugepages from it only.
fn check_node_hugepages(node: u32, size: u64, needed: u64) -> Result<(), MemoryError> {
    let dir = Path::new(NODES_SYSFS).join(format!("node{node}/hugepages/hugepages-2048kB"));
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(total), Some(free)) = (read("nr_hugepages"), read("free_hugepages")) else {
        return Ok(());
    };
    if free < needed {
        return Err(MemoryError::HugepagesShortOnNode {
            node,
            size_mib: size >> 20,
            needed,
            available: free,
            suggested: total + (needed - free),
        });
    }
    Ok(())
}

/// mbind(MPOL_BIND) of `[addr, addr + size)` to `node`, before the first touch.
fn bind(addr: *mut u8, size: u64, node: u32) -> Result<(), MemoryError> {
    const MPOL_BIND: libc::c_ulong = 2;
    const MPOL_MF_STRICT: libc::c_ulong = 1 << 0;
    const MPOL_MF_MOVE: libc::c_ulong = 1 << 1;
    let mut mask = [0 as libc::c_ulong; (MAX_NODES / libc::c_ulong::BITS) as usize];
    mask[(node / libc::c_ulong::BITS) as usize] |= 1 << (node % libc::c_ulong::BITS);
    // SAFETY: `addr..addr + size` is a mapping this module just created and
    // owns; mbind reads `MAX_NODES` bits from `mask`, which holds that many.
    // STRICT|MOVE: pages that already exist elsewhere (none, normally) move.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            size as libc::c_ulong,
            MPOL_BIND,
            mask.as_ptr(),
            MAX_NODES as libc::c_ulong,
            MPOL_MF_STRICT | MPOL_MF_MOVE,
        )
    };
    if result != 0 {
        return Err(MemoryError::Mbind {
            node,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Populates every page of `[addr, addr + size)` for writing:
/// MADV_POPULATE_WRITE (Linux 5.14) reports a shortage as an error; older
/// kernels get a write to each page.
fn prefault(addr: *mut u8, size: u64, backing: RamBacking) -> std::io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: the range is a private read-write mapping this module owns;
    // populating it changes no contents (fresh anonymous memory reads as zero).
    if unsafe { libc::madvise(addr.cast(), size as usize, MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EINVAL) {
        return Err(error);
    }
    let step = match backing {
        RamBacking::Anonymous => 4096,
        RamBacking::Hugepages => HUGEPAGE_SIZE as usize,
    };
    for offset in (0..size as usize).step_by(step) {
        // SAFETY: offset < size, inside the mapping; nothing else uses the
        // memory yet, and writing zero over zero keeps its contents.
        unsafe { addr.add(offset).write_volatile(0) };
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
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_sizes_are_checked() {
        assert!(matches!(
            create_guest_ram(3 << 20, RamBacking::Anonymous, None),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            create_guest_ram(2 << 20, RamBacking::Anonymous, None),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            create_guest_ram(8 << 20, RamBacking::Anonymous, Some(MAX_NODES + 1)),
            Err(MemoryError::NoSuchNode { .. })
        ));
        let ram = create_guest_ram(8 << 20, RamBacking::Anonymous, None).unwrap();
        assert_eq!(ram.last_addr(), GuestAddress((8 << 20) - 1));
        ram.write_obj(0xabcdu64, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xabcd);
    }

    /// Bound to node 0 (every Linux host has it) and populated: the mapping's
    /// resident size is its whole size before anything touches it.
    #[test]
    fn ram_is_bound_and_prefaulted() {
        let ram = create_guest_ram(8 << 20, RamBacking::Anonymous, Some(0)).unwrap();
        let region = ram.find_region(GuestAddress(0)).unwrap();
        let start = region.as_ptr() as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let header = lines
            .by_ref()
            .find(|line| {
                line.split('-')
                    .next()
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    == Some(start)
            })
            .expect("the RAM mapping is in smaps");
        let rss_kb: u64 = lines
            .find_map(|line| line.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(rss_kb, 8 << 10, "{header}: all 8 MiB resident");
        let numa_maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        let line = numa_maps
            .lines()
            .find(|line| line.starts_with(&format!("{start:x} ")))
            .expect("the RAM mapping is in numa_maps");
        assert!(line.contains("bind:0"), "{line}");
    }

    /// Several ranges (a Linux guest's RAM around the 32-bit hole): each its
    /// own mapping at its guest address, bound and populated.
    #[test]
    fn ram_ranges_are_each_bound_and_prefaulted() {
        let ram = create_guest_ram_ranges(
            &[(0, 4 << 20), (1 << 32, 2 << 20)],
            RamBacking::Anonymous,
            Some(0),
        )
        .unwrap();
        assert_eq!(ram.num_regions(), 2);
        ram.write_obj(7u64, GuestAddress(1 << 32)).unwrap();
        assert!(
            ram.read_obj::<u64>(GuestAddress(4 << 20)).is_err(),
            "a hole"
        );
        let numa_maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        for region in ram.iter() {
            let start = region.as_ptr() as u64;
            // Adjacent mappings with the same policy show as one area: the
            // one that starts last at or below this range holds it.
            let line = numa_maps
                .lines()
                .filter_map(|line| {
                    let area = u64::from_str_radix(line.split(' ').next()?, 16).ok()?;
                    (area <= start).then_some((area, line))
                })
                .max_by_key(|(area, _)| *area)
                .expect("each range is in numa_maps")
                .1;
            let anon: u64 = line
                .split(' ')
                .find_map(|field| field.strip_prefix("anon="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(
                line.contains("bind:0") && anon >= region.len() / 4096,
                "{line}"
            );
        }
        assert!(matches!(
            create_guest_ram_ranges(
                &[(0, 4 << 20), (1 << 32, 1 << 20)],
                RamBacking::Anonymous,
                None
            ),
            Err(MemoryError::Unaligned { .. })
        ));
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
