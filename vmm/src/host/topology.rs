//! What the host offers to partitions: online CPUs grouped into physical cores
//! and NUMA nodes, isolated CPUs, per-node memory and hugepage pools, and PCI
//! devices with their node. Everything is read from sysfs/procfs under a root
//! directory, so tests run on fixture trees (tests/fixtures/topology/).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aivmm_passthrough::preflight::driver_allows_vfio;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot parse {content:?}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        content: String,
        reason: String,
    },
    #[error("inconsistent topology under {}: {reason}", root.display())]
    Inconsistent { root: PathBuf, reason: String },
}

/// One online logical CPU (hardware thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub id: usize,
    pub package: u32,
    pub core_id: u32,
    pub node: u32,
    /// In at least one of: cpu/isolated, cpu/nohz_full, isolcpus= on the kernel command line.
    pub isolated: bool,
}

/// One physical core: the online SMT siblings that share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Core {
    pub package: u32,
    pub core_id: u32,
    pub node: u32,
    /// Sorted; the first is the core's lowest-numbered CPU.
    pub cpus: Vec<usize>,
    /// Every CPU of the core is isolated.
    pub isolated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugepagePool {
    pub size_kib: u64,
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: u32,
    /// Online CPUs of the node, sorted (may be empty: memory-only nodes).
    pub cpus: Vec<usize>,
    pub mem_total_bytes: u64,
    pub mem_free_bytes: u64,
    /// Free plus what the kernel can reclaim at once (page cache, reclaimable
    /// slab): what a new partition's memory can come from.
    pub mem_available_bytes: u64,
    /// Sorted by page size.
    pub hugepages: Vec<HugepagePool>,
}

/// Where the isolated CPUs come from; `Cpu::isolated` is their union.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Isolation {
    /// /sys/devices/system/cpu/isolated
    pub isolated: Vec<usize>,
    /// /sys/devices/system/cpu/nohz_full (absent or "(null)" means none)
    pub nohz_full: Vec<usize>,
    /// The CPU list of isolcpus= in /proc/cmdline.
    pub isolcpus: Vec<usize>,
    /// The flags of isolcpus= (e.g. "domain", "managed_irq").
    pub isolcpus_flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciDevice {
    /// Domain:bus:device.function, e.g. "0000:17:00.0".
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// None when the kernel reports -1 (no affinity) or has no NUMA.
    pub numa_node: Option<u32>,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// Whether the device can be passed through to a partition as the host
    /// is now; otherwise [`PciDevice::not_assignable`] says why.
    pub assignable: bool,
    pub not_assignable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Online CPUs, sorted by id.
    pub cpus: Vec<Cpu>,
    /// Present but offline CPUs (cpu/offline), sorted.
    pub offline_cpus: Vec<usize>,
    /// Physical cores, sorted by their first CPU.
    pub cores: Vec<Core>,
    /// Sorted by id.
    pub nodes: Vec<Node>,
    /// False when the machine has no /sys/devices/system/node: one node 0
    /// described by /proc/meminfo and /sys/kernel/mm/hugepages.
    pub numa: bool,
    pub isolation: Isolation,
    /// Sorted by address.
    pub pci_devices: Vec<PciDevice>,
    /// Where it was read from ("/" for this machine).
    #[serde(skip)]
    pub root: PathBuf,
}

/// The largest CPU number a list may name (the kernel's NR_CPUS tops out at 8192).
const MAX_CPU: usize = 65_535;

/// Parses a kernel CPU list: "0-3,8,10-11", with the command line's stride
/// form "0-15:2/4" (2 CPUs out of every group of 4). Whitespace around the
/// list is ignored; an empty list is empty. The result is sorted and unique.
pub fn parse_cpulist(text: &str) -> Result<Vec<usize>, String> {
    let text = text.trim();
    let mut cpus = BTreeSet::new();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    for item in text.split(',') {
        let (range, stride) = match item.split_once(':') {
            Some((range, stride)) => (range, Some(stride)),
            None => (item, None),
        };
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (parse_cpu(first)?, parse_cpu(last)?),
            None => {
                let cpu = parse_cpu(range)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(format!("range {range:?} runs backwards"));
        }
        let (used, group) = match stride {
            None => (1, 1),
            Some(stride) => {
                let (used, group) = stride
                    .split_once('/')
                    .ok_or_else(|| format!("stride {stride:?} is not USED/GROUP"))?;
                let (used, group) = (parse_count(used)?, parse_count(group)?);
                if used == 0 || group == 0 || used > group {
                    return Err(format!("stride {stride:?} needs 0 < USED <= GROUP"));
                }
                (used, group)
            }
        };
        let mut cpu = first;
        while cpu <= last {
            cpus.extend(cpu..(cpu + used).min(last + 1));
            cpu += group;
        }
    }
    Ok(cpus.into_iter().collect())
}

fn parse_cpu(text: &str) -> Result<usize, String> {
    let cpu = parse_count(text)?;
    if cpu > MAX_CPU {
        return Err(format!(
            "CPU {cpu} is beyond the largest possible CPU {MAX_CPU}"
        ));
    }
    Ok(cpu)
}

fn parse_count(text: &str) -> Result<usize, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a CPU number"));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is not a CPU number"))
}

/// Formats sorted CPUs as a kernel CPU list: [0,1,2,3,8] -> "0-3,8".
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

impl Topology {
    /// Reads the topology of the machine whose filesystem is at `root` ("/"
    /// for this machine).
    pub fn discover(root: &Path) -> Result<Self, TopologyError> {
        let cpu_dir = root.join("sys/devices/system/cpu");
        let online = read_cpulist(&cpu_dir.join("online"))?;
        let offline = read_optional_cpulist(&cpu_dir.join("offline"))?;
        let isolation = read_isolation(root)?;
        let isolated: BTreeSet<usize> = isolation
            .isolated
            .iter()
            .chain(&isolation.nohz_full)
            .chain(&isolation.isolcpus)
            .copied()
            .collect();

        let node_dir = root.join("sys/devices/system/node");
        let numa = node_dir.is_dir();
        let mut nodes = if numa {
            read_nodes(&node_dir)?
        } else {
            vec![read_single_node(root, &online)?]
        };
        for node in &mut nodes {
            node.cpus.retain(|cpu| online.binary_search(cpu).is_ok());
        }
        let node_of: BTreeMap<usize, u32> = nodes
            .iter()
            .flat_map(|node| node.cpus.iter().map(move |&cpu| (cpu, node.id)))
            .collect();

        let inconsistent = |reason: String| TopologyError::Inconsistent {
            root: root.to_path_buf(),
            reason,
        };
        let mut cpus = Vec::with_capacity(online.len());
        let mut siblings_of = BTreeMap::new();
        for &id in &online {
            let dir = cpu_dir.join(format!("cpu{id}/topology"));
            let node = *node_of.get(&id).ok_or_else(|| {
                inconsistent(format!("CPU {id} is online but no nodeN/cpulist lists it"))
            })?;
            let siblings_path = if dir.join("core_cpus_list").exists() {
                dir.join("core_cpus_list")
            } else {
                dir.join("thread_siblings_list")
            };
            let mut siblings = read_cpulist(&siblings_path)?;
            siblings.retain(|cpu| online.binary_search(cpu).is_ok());
            if !siblings.contains(&id) {
                return Err(inconsistent(format!(
                    "{} does not list CPU {id} itself",
                    siblings_path.display()
                )));
            }
            siblings_of.insert(id, siblings);
            cpus.push(Cpu {
                id,
                package: read_number(&dir.join("physical_package_id"))?,
                core_id: read_number(&dir.join("core_id"))?,
                node,
                isolated: isolated.contains(&id),
            });
        }

        let mut cores: Vec<Core> = Vec::new();
        for cpu in &cpus {
            let siblings = &siblings_of[&cpu.id];
            if siblings[0] != cpu.id {
                continue; // the core was made at its first CPU
            }
            for &sibling in siblings {
                if siblings_of[&sibling] != *siblings {
                    return Err(inconsistent(format!(
                        "CPU {} has SMT siblings {} but CPU {sibling} has {}",
                        cpu.id,
                        format_cpulist(siblings),
                        format_cpulist(&siblings_of[&sibling])
                    )));
                }
                if node_of[&sibling] != cpu.node {
                    return Err(inconsistent(format!(
                        "SMT siblings {} and {sibling} are on nodes {} and {}",
                        cpu.id, cpu.node, node_of[&sibling]
                    )));
                }
            }
            cores.push(Core {
                package: cpu.package,
                core_id: cpu.core_id,
                node: cpu.node,
                cpus: siblings.clone(),
                isolated: siblings.iter().all(|cpu| isolated.contains(cpu)),
            });
        }

        Ok(Topology {
            cpus,
            offline_cpus: offline,
            cores,
            nodes,
            numa,
            isolation,
            pci_devices: read_pci_devices(&root.join("sys/bus/pci/devices"))?,
            root: root.to_path_buf(),
        })
    }

    /// The hugepage pools of each node as they are now (the rest of the
    /// topology does not change while the machine runs; the pools do).
    pub fn current_hugepages(&self) -> Result<Vec<(u32, Vec<HugepagePool>)>, TopologyError> {
        self.nodes
            .iter()
            .map(|node| {
                let dir = if self.numa {
                    self.root
                        .join(format!("sys/devices/system/node/node{}/hugepages", node.id))
                } else {
                    self.root.join("sys/kernel/mm/hugepages")
                };
                Ok((node.id, read_hugepage_pools(&dir)?))
            })
            .collect()
    }

    pub fn cpu(&self, id: usize) -> Option<&Cpu> {
        self.cpus
            .binary_search_by_key(&id, |cpu| cpu.id)
            .ok()
            .map(|i| &self.cpus[i])
    }

    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|node| node.id == id)
    }

    /// The physical core an online CPU belongs to.
    pub fn core_of(&self, cpu: usize) -> Option<&Core> {
        self.cores.iter().find(|core| core.cpus.contains(&cpu))
    }

    /// Hardware threads per core on this machine (the largest core).
    pub fn threads_per_core(&self) -> usize {
        self.cores
            .iter()
            .map(|core| core.cpus.len())
            .max()
            .unwrap_or(1)
    }
}

fn read_text(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_optional_text(path: &Path) -> Result<Option<String>, TopologyError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse_error(path: &Path, content: &str, reason: impl Into<String>) -> TopologyError {
    TopologyError::Parse {
        path: path.to_path_buf(),
        content: content.trim_end().to_string(),
        reason: reason.into(),
    }
}

fn read_cpulist(path: &Path) -> Result<Vec<usize>, TopologyError> {
    let text = read_text(path)?;
    parse_cpulist(&text).map_err(|reason| parse_error(path, &text, reason))
}

/// A CPU list that may be missing; kernels print "(null)" for an unset nohz_full.
fn read_optional_cpulist(path: &Path) -> Result<Vec<usize>, TopologyError> {
    match read_optional_text(path)? {
        None => Ok(Vec::new()),
        Some(text) if text.trim() == "(null)" => Ok(Vec::new()),
        Some(text) => parse_cpulist(&text).map_err(|reason| parse_error(path, &text, reason)),
    }
}

fn read_number<T: std::str::FromStr>(path: &Path) -> Result<T, TopologyError> {
    let text = read_text(path)?;
    text.trim()
        .parse()
        .map_err(|_| parse_error(path, &text, "expected a non-negative integer"))
}

fn read_hex<T>(
    path: &Path,
    from_str_radix: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> Result<T, TopologyError> {
    let text = read_text(path)?;
    let digits = text.trim().strip_prefix("0x").unwrap_or(text.trim());
    from_str_radix(digits, 16).map_err(|error| {
        parse_error(
            path,
            &text,
            format!("expected a hex number like 0x8086: {error}"),
        )
    })
}

fn read_isolation(root: &Path) -> Result<Isolation, TopologyError> {
    let cpu_dir = root.join("sys/devices/system/cpu");
    let cmdline_path = root.join("proc/cmdline");
    let cmdline = read_optional_text(&cmdline_path)?.unwrap_or_default();
    let (isolcpus, isolcpus_flags) =
        parse_isolcpus(&cmdline).map_err(|reason| parse_error(&cmdline_path, &cmdline, reason))?;
    Ok(Isolation {
        isolated: read_optional_cpulist(&cpu_dir.join("isolated"))?,
        nohz_full: read_optional_cpulist(&cpu_dir.join("nohz_full"))?,
        isolcpus,
        isolcpus_flags,
    })
}

/// The last isolcpus= of a kernel command line (the kernel keeps the last):
/// "isolcpus=[flag,...,]cpulist", e.g. "isolcpus=domain,managed_irq,2-5".
/// Flags are the leading items that start with a letter: the kernel's
/// `nohz`, `domain` and `managed_irq`.
pub fn parse_isolcpus(cmdline: &str) -> Result<(Vec<usize>, Vec<String>), String> {
    const FLAGS: [&str; 3] = ["nohz", "domain", "managed_irq"];
    let Some(value) = cmdline
        .split_whitespace()
        .take_while(|word| *word != "--") // the rest goes to init
        .filter_map(|word| word.strip_prefix("isolcpus="))
        .last()
    else {
        return Ok((Vec::new(), Vec::new()));
    };
    let items: Vec<&str> = value.split(',').collect();
    let flag_count = items
        .iter()
        .take_while(|item| item.starts_with(|c: char| c.is_ascii_alphabetic()))
        .count();
    let flags = &items[..flag_count];
    if let Some(unknown) = flags.iter().find(|flag| !FLAGS.contains(flag)) {
        return Err(format!(
            "isolcpus={value}: unknown flag {unknown:?} (known: {})",
            FLAGS.join(", ")
        ));
    }
    let cpus = parse_cpulist(&items[flag_count..].join(","))
        .map_err(|reason| format!("isolcpus={value}: {reason}"))?;
    Ok((cpus, flags.iter().map(|flag| flag.to_string()).collect()))
}

fn node_number(name: &str) -> Option<u32> {
    name.strip_prefix("node")?.parse().ok()
}

fn read_nodes(node_dir: &Path) -> Result<Vec<Node>, TopologyError> {
    let mut nodes = Vec::new();
    for name in dir_names(node_dir)? {
        let Some(id) = node_number(&name) else {
            continue; // "online", "possible", "has_cpu", ...
        };
        let dir = node_dir.join(&name);
        let meminfo_path = dir.join("meminfo");
        let meminfo = read_text(&meminfo_path)?;
        let memory = parse_meminfo(&meminfo, Some(id))
            .map_err(|reason| parse_error(&meminfo_path, &meminfo, reason))?;
        nodes.push(Node {
            id,
            cpus: read_cpulist(&dir.join("cpulist"))?,
            mem_total_bytes: memory.total,
            mem_free_bytes: memory.free,
            mem_available_bytes: memory.available,
            hugepages: read_hugepage_pools(&dir.join("hugepages"))?,
        });
    }
    nodes.sort_by_key(|node| node.id);
    if nodes.is_empty() {
        return Err(TopologyError::Inconsistent {
            root: node_dir.to_path_buf(),
            reason: "no nodeN directory".into(),
        });
    }
    Ok(nodes)
}

/// A machine without NUMA: one node 0 with every online CPU.
fn read_single_node(root: &Path, online: &[usize]) -> Result<Node, TopologyError> {
    let meminfo_path = root.join("proc/meminfo");
    let meminfo = read_text(&meminfo_path)?;
    let memory = parse_meminfo(&meminfo, None)
        .map_err(|reason| parse_error(&meminfo_path, &meminfo, reason))?;
    Ok(Node {
        id: 0,
        cpus: online.to_vec(),
        mem_total_bytes: memory.total,
        mem_free_bytes: memory.free,
        mem_available_bytes: memory.available,
        hugepages: read_hugepage_pools(&root.join("sys/kernel/mm/hugepages"))?,
    })
}

struct Meminfo {
    total: u64,
    free: u64,
    available: u64,
}

/// Memory of a node's meminfo ("Node 0 MemTotal: 15163972 kB") or, with
/// `node` None, of /proc/meminfo ("MemTotal: ... kB"). Available is
/// MemAvailable where the kernel gives it (/proc/meminfo), else free plus
/// the file pages and reclaimable slab (node meminfo has no MemAvailable).
fn parse_meminfo(text: &str, node: Option<u32>) -> Result<Meminfo, String> {
    let mut total = None;
    let mut free = None;
    let mut available = None;
    let mut reclaimable = [None; 3];
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let Some(node) = node {
            let (Some("Node"), Some(number)) = (words.next(), words.next()) else {
                return Err(format!("line {line:?} does not start with \"Node {node}\""));
            };
            if number != node.to_string() {
                return Err(format!("line {line:?} is not about node {node}"));
            }
        }
        let slot = match words.next() {
            Some("MemTotal:") => &mut total,
            Some("MemFree:") => &mut free,
            Some("MemAvailable:") => &mut available,
            Some("Active(file):") => &mut reclaimable[0],
            Some("Inactive(file):") => &mut reclaimable[1],
            Some("SReclaimable:") => &mut reclaimable[2],
            _ => continue,
        };
        let kib = match (words.next(), words.next(), words.next()) {
            (Some(value), Some("kB"), None) => value.parse::<u64>().ok(),
            _ => None,
        };
        let kib = kib.ok_or_else(|| format!("line {line:?} is not \"KEY: NUMBER kB\""))?;
        *slot = Some(kib.saturating_mul(1024));
    }
    match (total, free) {
        (Some(total), Some(free)) => Ok(Meminfo {
            total,
            free,
            available: available
                .unwrap_or_else(|| free + reclaimable.iter().flatten().sum::<u64>())
                .min(total),
        }),
        _ => Err("MemTotal or MemFree is missing".into()),
    }
}

/// The pools of a hugepages directory (hugepages-2048kB/, hugepages-1048576kB/);
/// a missing directory has none.
fn read_hugepage_pools(dir: &Path) -> Result<Vec<HugepagePool>, TopologyError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut pools = Vec::new();
    for name in dir_names(dir)? {
        let Some(size) = name
            .strip_prefix("hugepages-")
            .and_then(|rest| rest.strip_suffix("kB"))
        else {
            continue;
        };
        let size_kib = size.parse().map_err(|_| {
            parse_error(
                &dir.join(&name),
                &name,
                "directory name is not hugepages-<size>kB",
            )
        })?;
        let pool = dir.join(&name);
        pools.push(HugepagePool {
            size_kib,
            total: read_number(&pool.join("nr_hugepages"))?,
            free: read_number(&pool.join("free_hugepages"))?,
        });
    }
    pools.sort_by_key(|pool| pool.size_kib);
    Ok(pools)
}

/// The host's PCI devices as they are now, under `root` ("/" on a real host).
pub fn pci_devices(root: &Path) -> Result<Vec<PciDevice>, TopologyError> {
    read_pci_devices(&root.join("sys/bus/pci/devices"))
}

fn read_pci_devices(dir: &Path) -> Result<Vec<PciDevice>, TopologyError> {
    if !dir.is_dir() {
        return Ok(Vec::new()); // machines without PCI (some microVMs)
    }
    let mut devices = Vec::new();
    for address in dir_names(dir)? {
        let device = dir.join(&address);
        let numa_path = device.join("numa_node");
        let numa_node =
            match read_optional_text(&numa_path)? {
                None => None,
                Some(text) => match text.trim().parse::<i64>() {
                    Ok(-1) => None,
                    Ok(node) => Some(u32::try_from(node).map_err(|_| {
                        parse_error(&numa_path, &text, "expected a node number or -1")
                    })?),
                    Err(_) => {
                        return Err(parse_error(
                            &numa_path,
                            &text,
                            "expected a node number or -1",
                        ))
                    }
                },
            };
        let iommu_path = device.join("iommu_group");
        let iommu_group = match link_name(&iommu_path)? {
            None => None,
            Some(group) => Some(group.parse().map_err(|_| {
                parse_error(
                    &iommu_path,
                    &group,
                    "the link does not end in an IOMMU group number",
                )
            })?),
        };
        devices.push(PciDevice {
            vendor: read_hex(&device.join("vendor"), u16::from_str_radix)?,
            device: read_hex(&device.join("device"), u16::from_str_radix)?,
            class: read_hex(&device.join("class"), u32::from_str_radix)?,
            numa_node,
            driver: link_name(&device.join("driver"))?,
            iommu_group,
            address,
            assignable: false,
            not_assignable: None,
        });
    }
    devices.sort_by(|a, b| a.address.cmp(&b.address));
    for i in 0..devices.len() {
        let why = not_assignable(&devices[i], &devices);
        devices[i].assignable = why.is_none();
        devices[i].not_assignable = why;
    }
    Ok(devices)
}

/// Why VFIO cannot take `device` (the full check, with commands to fix
/// it, is the passthrough preflight); None when it can.
fn not_assignable(device: &PciDevice, all: &[PciDevice]) -> Option<String> {
    let Some(group) = device.iommu_group else {
        return Some("no IOMMU group (is the IOMMU on?)".into());
    };
    if !driver_allows_vfio(true, device.driver.as_deref()) {
        return Some(format!(
            "bound to {}, not vfio-pci",
            device.driver.as_deref().unwrap_or("no driver")
        ));
    }
    let blockers: Vec<String> = all
        .iter()
        .filter(|other| other.address != device.address && other.iommu_group == Some(group))
        .filter(|other| !driver_allows_vfio(false, other.driver.as_deref()))
        .map(|other| {
            format!(
                "{} ({})",
                other.address,
                other.driver.as_deref().unwrap_or("-")
            )
        })
        .collect();
    (!blockers.is_empty()).then(|| {
        format!(
            "IOMMU group {group} also holds {} not on vfio-pci",
            blockers.join(", ")
        )
    })
}

/// The last component of a symlink's target, or None if there is no link.
fn link_name(path: &Path) -> Result<Option<String>, TopologyError> {
    match fs::read_link(path) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Entry names of a directory, sorted.
fn dir_names(dir: &Path) -> Result<Vec<String>, TopologyError> {
    let read_error = |source| TopologyError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        names.push(
            entry
                .map_err(read_error)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{fixture, Scratch};

    fn discover(name: &str) -> Topology {
        Topology::discover(&fixture(name)).unwrap_or_else(|error| panic!("fixture {name}: {error}"))
    }

    fn ids(cpus: &[Cpu]) -> Vec<usize> {
        cpus.iter().map(|cpu| cpu.id).collect()
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist(" 5 ").unwrap(), vec![5]);
        assert_eq!(parse_cpulist("0-7:2/4").unwrap(), vec![0, 1, 4, 5]);
        assert_eq!(parse_cpulist("3,1,3").unwrap(), vec![1, 3]);
        for bad in ["3-1", "a", "1,,2", "-1", "0-3:3/2", "0-3:2", "99999"] {
            assert!(parse_cpulist(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[]), "");
    }

    #[test]
    fn isolcpus_flags_and_cpus_come_from_the_last_option() {
        let (cpus, flags) =
            parse_isolcpus("ro isolcpus=1 isolcpus=domain,managed_irq,2-3,6 quiet").unwrap();
        assert_eq!(cpus, vec![2, 3, 6]);
        assert_eq!(flags, vec!["domain", "managed_irq"]);
        assert_eq!(
            parse_isolcpus("ro quiet -- isolcpus=1").unwrap().0,
            Vec::<usize>::new()
        );
        assert!(parse_isolcpus("isolcpus=domain,x-y").is_err());
        assert!(parse_isolcpus("isolcpus=domain,1-").is_err());
    }

    #[test]
    fn assignable_devices_need_vfio_pci_across_their_group() {
        let device = |address: &str, driver: Option<&str>, group: Option<u32>| PciDevice {
            address: address.into(),
            vendor: 0x10de,
            device: 0x2331,
            class: 0x030200,
            numa_node: Some(1),
            driver: driver.map(String::from),
            iommu_group: group,
            assignable: false,
            not_assignable: None,
        };
        let gpu = device("0000:ca:00.0", Some("vfio-pci"), Some(70));
        let audio = device("0000:ca:00.1", Some("snd_hda_intel"), Some(70));
        let bridge = device("0000:c9:00.0", Some("pcieport"), Some(70));
        let all = [gpu.clone(), audio.clone(), bridge.clone()];
        assert_eq!(
            not_assignable(&gpu, &all).as_deref(),
            Some("IOMMU group 70 also holds 0000:ca:00.1 (snd_hda_intel) not on vfio-pci")
        );
        let audio_on_vfio = device("0000:ca:00.1", Some("vfio-pci"), Some(70));
        assert_eq!(
            not_assignable(&gpu, &[gpu.clone(), audio_on_vfio, bridge]),
            None
        );
        assert_eq!(
            not_assignable(&audio, &all).as_deref(),
            Some("bound to snd_hda_intel, not vfio-pci")
        );
        let no_group = device("0000:00:03.0", Some("virtio-pci"), None);
        assert_eq!(
            not_assignable(&no_group, &[no_group.clone()]).as_deref(),
            Some("no IOMMU group (is the IOMMU on?)")
        );
    }

    #[test]
    fn this_machine() {
        let t = discover("this-machine");
        assert_eq!(ids(&t.cpus), vec![0, 1]);
        assert!(t.offline_cpus.is_empty());
        assert_eq!(t.cores.len(), 2);
        assert_eq!(t.cores[0].cpus, vec![0]);
        assert_eq!(t.cores[1].cpus, vec![1]);
        assert_eq!(t.threads_per_core(), 1);
        assert!(t.numa);
        assert_eq!(t.nodes.len(), 1);
        let node = &t.nodes[0];
        assert_eq!(node.cpus, vec![0, 1]);
        assert_eq!(node.mem_total_bytes, 15_163_972 * 1024);
        assert_eq!(node.mem_free_bytes, 12_413_212 * 1024);
        let pools: Vec<(u64, u64, u64)> = node
            .hugepages
            .iter()
            .map(|p| (p.size_kib, p.total, p.free))
            .collect();
        assert_eq!(pools, vec![(2048, 0, 0), (1_048_576, 0, 0)]);
        assert!(t.cpus.iter().all(|cpu| !cpu.isolated));
        assert_eq!(t.pci_devices.len(), 6);
        let virtio = &t.pci_devices[1];
        assert_eq!(virtio.address, "0000:00:01.0");
        assert_eq!(
            (virtio.vendor, virtio.device, virtio.class),
            (0x1af4, 0x1045, 0xffff00)
        );
        assert_eq!(virtio.driver.as_deref(), Some("virtio-pci"));
        assert_eq!(virtio.numa_node, None);
    }

    #[test]
    fn two_sockets_with_smt() {
        let t = discover("two-socket-smt");
        assert_eq!(t.cpus.len(), 32);
        assert_eq!(t.cores.len(), 16);
        assert_eq!(t.threads_per_core(), 2);
        // Intel numbering: CPU n and n+16 share a core.
        assert_eq!(t.core_of(3).unwrap().cpus, vec![3, 19]);
        assert_eq!(t.core_of(19).unwrap().cpus, vec![3, 19]);
        let core = t.core_of(9).unwrap();
        assert_eq!((core.package, core.core_id, core.node), (1, 1, 1));
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].cpus, parse_cpulist("0-7,16-23").unwrap());
        assert_eq!(t.nodes[1].cpus, parse_cpulist("8-15,24-31").unwrap());
        assert_eq!(t.cpu(24).unwrap().node, 1);
        let pool = |node: usize, kib: u64| {
            let p = t.nodes[node]
                .hugepages
                .iter()
                .find(|p| p.size_kib == kib)
                .unwrap();
            (p.total, p.free)
        };
        assert_eq!(pool(0, 2048), (1024, 1024));
        assert_eq!(pool(0, 1_048_576), (4, 4));
        assert_eq!(pool(1, 2048), (512, 300));
        assert_eq!(pool(1, 1_048_576), (0, 0));
        assert_eq!(t.nodes[1].mem_free_bytes, 62_000_000 * 1024);
        let nic = &t.pci_devices[1];
        assert_eq!(nic.address, "0000:17:00.0");
        assert_eq!((nic.numa_node, nic.iommu_group), (Some(0), Some(21)));
        assert_eq!(nic.driver.as_deref(), Some("vfio-pci"));
        let gpu = &t.pci_devices[3];
        assert_eq!(
            (gpu.numa_node, gpu.driver.as_deref(), gpu.iommu_group),
            (Some(1), None, Some(70))
        );
    }

    #[test]
    fn four_nodes_on_an_older_kernel() {
        // No core_cpus_list: the siblings come from thread_siblings_list.
        let t = discover("four-node");
        assert_eq!(t.nodes.len(), 4);
        assert_eq!(t.cores.len(), 16);
        for (n, node) in t.nodes.iter().enumerate() {
            assert_eq!(node.id as usize, n);
            assert_eq!(node.cpus, (n * 8..n * 8 + 8).collect::<Vec<_>>());
            assert_eq!(node.hugepages.len(), 1);
            assert_eq!(node.hugepages[0].free, 256 * n as u64);
            assert_eq!(
                node.mem_free_bytes,
                (30_000_000 - n as u64 * 1_000_000) * 1024
            );
        }
        let core = t.core_of(21).unwrap();
        assert_eq!(core.cpus, vec![20, 21]);
        assert_eq!((core.package, core.node), (1, 2));
        assert_eq!(t.pci_devices[0].numa_node, Some(2));
        assert_eq!(t.pci_devices[1].iommu_group, Some(41));
        assert_eq!(t.pci_devices[1].driver.as_deref(), Some("ice"));
    }

    #[test]
    fn isolated_cores_and_an_offline_cpu() {
        let t = discover("isolated");
        assert_eq!(t.cpus.len(), 15);
        assert_eq!(t.offline_cpus, vec![15]);
        // CPU 15 is offline: its core has CPU 7 alone.
        assert_eq!(t.core_of(7).unwrap().cpus, vec![7]);
        let isolated = parse_cpulist("2-5,10-13").unwrap();
        assert_eq!(t.isolation.isolated, isolated);
        assert_eq!(t.isolation.nohz_full, isolated);
        assert_eq!(t.isolation.isolcpus, isolated);
        assert_eq!(t.isolation.isolcpus_flags, vec!["domain", "managed_irq"]);
        let isolated_cpus: Vec<usize> =
            t.cpus.iter().filter(|c| c.isolated).map(|c| c.id).collect();
        assert_eq!(isolated_cpus, isolated);
        let isolated_cores: Vec<usize> = t
            .cores
            .iter()
            .filter(|c| c.isolated)
            .map(|c| c.cpus[0])
            .collect();
        assert_eq!(isolated_cores, vec![2, 3, 4, 5]);
        let pool = &t.nodes[0].hugepages;
        assert_eq!((pool[0].size_kib, pool[0].free), (2048, 2000));
        assert_eq!((pool[1].size_kib, pool[1].free), (1_048_576, 2));
        assert_eq!(t.pci_devices[0].numa_node, None);
    }

    #[test]
    fn a_machine_without_numa_is_one_node() {
        let t = discover("no-numa");
        assert!(!t.numa);
        assert_eq!(t.nodes.len(), 1);
        assert_eq!(t.nodes[0].cpus, vec![0, 1, 2, 3]);
        assert_eq!(t.nodes[0].mem_total_bytes, 8_048_576 * 1024);
        assert_eq!(t.nodes[0].hugepages[0].free, 128);
        assert_eq!(t.cores.len(), 4);
        assert!(t.isolation.nohz_full.is_empty()); // "(null)"
        assert!(t.pci_devices.is_empty());
    }

    #[test]
    fn this_host_parses() {
        // The machine running the tests: whatever it is, discovery must
        // describe every online CPU once.
        let Ok(online) = std::fs::read_to_string("/sys/devices/system/cpu/online") else {
            eprintln!("this_host_parses: SKIPPED: no /sys/devices/system/cpu/online");
            return;
        };
        let t = Topology::discover(Path::new("/")).unwrap();
        assert_eq!(ids(&t.cpus), parse_cpulist(&online).unwrap());
        let in_cores: usize = t.cores.iter().map(|core| core.cpus.len()).sum();
        assert_eq!(in_cores, t.cpus.len());
    }

    #[test]
    fn errors_name_the_missing_or_malformed_file() {
        let cases: [(&str, &str, Option<&str>, &str); 7] = [
            (
                "online",
                "sys/devices/system/cpu/online",
                None,
                "cannot read",
            ),
            (
                "online-bad",
                "sys/devices/system/cpu/online",
                Some("0-x\n"),
                "not a CPU number",
            ),
            (
                "core-id",
                "sys/devices/system/cpu/cpu3/topology/core_id",
                Some("three\n"),
                "integer",
            ),
            (
                "package",
                "sys/devices/system/cpu/cpu3/topology/physical_package_id",
                None,
                "cannot read",
            ),
            (
                "meminfo",
                "sys/devices/system/node/node1/meminfo",
                Some("Node 1 MemTotal: lots kB\n"),
                "kB",
            ),
            (
                "hugepages",
                "sys/devices/system/node/node0/hugepages/hugepages-2048kB/free_hugepages",
                Some("-3\n"),
                "integer",
            ),
            (
                "pci",
                "sys/bus/pci/devices/0000:b1:00.0/vendor",
                Some("intel\n"),
                "hex",
            ),
        ];
        for (test, rel, content, why) in cases {
            let scratch = Scratch::of("two-socket-smt", test);
            let path = match content {
                Some(content) => scratch.write(rel, content),
                None => scratch.remove(rel),
            };
            let error = Topology::discover(&scratch.0).unwrap_err().to_string();
            assert!(
                error.contains(&path.display().to_string()) && error.contains(why),
                "{test}: {error}"
            );
        }
    }

    #[test]
    fn inconsistent_trees_are_refused() {
        let scratch = Scratch::of("two-socket-smt", "unlisted");
        scratch.write("sys/devices/system/node/node1/cpulist", "8-15,24-30\n");
        let error = Topology::discover(&scratch.0).unwrap_err().to_string();
        assert!(
            error.contains("CPU 31 is online but no nodeN/cpulist lists it"),
            "{error}"
        );

        let scratch = Scratch::of("two-socket-smt", "siblings");
        scratch.write(
            "sys/devices/system/cpu/cpu19/topology/core_cpus_list",
            "4,19\n",
        );
        let error = Topology::discover(&scratch.0).unwrap_err().to_string();
        assert!(error.contains("SMT siblings"), "{error}");
    }
}
