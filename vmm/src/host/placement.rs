//! Admission and placement of partitions on host cores and NUMA memory.
//!
//! Rules:
//! - CPUs are handed out in whole physical cores: SMT siblings go together and
//!   are never split between partitions. A vCPU count that does not fill its
//!   last core (3 vCPUs on a 2-thread machine) still takes the whole core; the
//!   spare sibling stays reserved to the partition but idle
//!   ([`Placement::reserved_cpus`] lists it, [`Placement::host_cpus`] does not).
//! - CPUs and memory come from one NUMA node when one node can hold the
//!   partition: the node preferring isolated cores, then the fewest idle
//!   siblings, then the lowest id. Only when no single node can (and no node
//!   was asked for) are cores taken from several nodes, with the memory on the
//!   node that gives the most of them.
//! - Cores the operator kept for the host (`aivmm serve --host-cpus`) and
//!   cores outside the daemon's CPU affinity are never handed out.
//! - No CPU is handed out twice, and a node's free hugepages (or free memory,
//!   without hugepages) are never overcommitted: what placements took is
//!   subtracted from the counts of the topology the placer was made with (a
//!   snapshot taken when the daemon starts, before it boots any partition).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::topology::{format_cpulist, Core, Node, Topology, TopologyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugepageSize {
    #[serde(rename = "2MiB")]
    TwoMiB,
    #[serde(rename = "1GiB")]
    OneGiB,
}

impl HugepageSize {
    pub fn bytes(self) -> u64 {
        self.kib() * 1024
    }

    pub fn kib(self) -> u64 {
        match self {
            HugepageSize::TwoMiB => 2048,
            HugepageSize::OneGiB => 1024 * 1024,
        }
    }
}

impl fmt::Display for HugepageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugepageSize::TwoMiB => "2 MiB",
            HugepageSize::OneGiB => "1 GiB",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRequest {
    /// How many vCPUs; the placer picks the host CPUs.
    pub vcpus: Option<u32>,
    /// Explicit host CPUs, one per vCPU in order (their SMT siblings are
    /// reserved too). `vcpus`, if also given, must match the count.
    pub cores: Option<Vec<usize>>,
    pub memory_bytes: u64,
    /// Back the memory with hugepages of this size (rounded up to whole pages).
    pub hugepages: Option<HugepageSize>,
    /// Place on this node only.
    pub numa_node: Option<u32>,
}

/// Hugepages a placement holds on its memory node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugepageAllocation {
    pub size: HugepageSize,
    pub pages: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The host CPU of each vCPU, in vCPU order.
    pub host_cpus: Vec<usize>,
    /// Every CPU held by the partition: `host_cpus` and their SMT siblings
    /// (siblings not in `host_cpus` stay idle), sorted.
    pub reserved_cpus: Vec<usize>,
    /// The node of the memory (and of the CPUs, unless they span nodes).
    pub node: u32,
    /// The nodes of the reserved CPUs, sorted (one, whenever possible).
    pub cpu_nodes: Vec<u32>,
    pub memory_bytes: u64,
    /// When the memory is hugepage-backed: from `node`'s pool.
    pub hugepages: Option<HugepageAllocation>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("a partition id must not be empty")]
    EmptyPartitionId,
    #[error("partition {0:?} is already placed; release it first")]
    AlreadyPlaced(String),
    #[error("partition {0:?} has no placement")]
    UnknownPartition(String),
    #[error("a placement needs a vCPU count or explicit host CPUs")]
    NoCpusRequested,
    #[error("a partition needs at least one vCPU")]
    ZeroVcpus,
    #[error(
        "{vcpus} vCPUs were requested with {cpus} explicit host CPUs; give one host CPU per vCPU"
    )]
    VcpuCountMismatch { vcpus: u32, cpus: usize },
    #[error("host CPU {0} is listed twice")]
    DuplicateCpu(usize),
    #[error("a partition needs memory; 0 bytes were requested")]
    ZeroMemory,
    #[error("NUMA node {node} does not exist (nodes: {existing})")]
    NoSuchNode { node: u32, existing: String },
    #[error("host CPU {cpu} does not exist (online CPUs: {online})")]
    NoSuchCpu { cpu: usize, online: String },
    #[error("host CPU {cpu} is offline (online CPUs: {online})")]
    CpuOffline { cpu: usize, online: String },
    #[error("{why}")]
    CpuExcluded { cpu: usize, why: String },
    #[error("{}", busy_message(*.cpu, *.requested, .owner))]
    CpuBusy {
        cpu: usize,
        requested: usize,
        owner: String,
    },
    #[error("host CPU {cpu} is on NUMA node {cpu_node}, not on the requested node {node}")]
    CpuOffNode {
        cpu: usize,
        cpu_node: u32,
        node: u32,
    },
    /// Not enough free whole cores; the message has the per-node counts.
    #[error("{0}")]
    OutOfCores(String),
    /// No node with the CPUs has enough free hugepages or memory.
    #[error("{0}")]
    OutOfMemory(String),
}

impl PlacementError {
    /// The request asks for more than is free now (as opposed to a request
    /// that could never be satisfied as written on this host).
    pub fn is_exhaustion(&self) -> bool {
        matches!(
            self,
            PlacementError::CpuBusy { .. }
                | PlacementError::OutOfCores(_)
                | PlacementError::OutOfMemory(_)
        )
    }
}

fn busy_message(cpu: usize, requested: usize, owner: &str) -> String {
    if cpu == requested {
        format!("host CPU {cpu} belongs to partition {owner:?}")
    } else {
        format!(
            "host CPU {requested}'s SMT sibling {cpu} belongs to partition {owner:?}; \
             siblings are never split between partitions"
        )
    }
}

/// Why a CPU is kept from partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exclusion {
    /// The operator kept it (or a sibling of it) for the host.
    Host,
    /// Outside the daemon's CPU affinity: its threads could not be pinned there.
    Affinity,
}

#[derive(Debug, Clone)]
pub struct Placer {
    topology: Topology,
    excluded: BTreeMap<usize, Exclusion>,
    allocations: BTreeMap<String, Placement>,
}

/// Cores chosen for a vCPU count.
struct CoreChoice<'a> {
    cores: Vec<&'a Core>,
    non_isolated: usize,
    idle: usize,
}

impl Placer {
    pub fn new(topology: Topology) -> Self {
        Placer {
            topology,
            excluded: BTreeMap::new(),
            allocations: BTreeMap::new(),
        }
    }

    /// Keeps these CPUs, with their whole cores, for the host.
    pub fn reserve_for_host(&mut self, cpus: &[usize]) -> Result<(), PlacementError> {
        for &cpu in cpus {
            let core = self.online_core(cpu)?.cpus.clone();
            for sibling in core {
                self.excluded.insert(sibling, Exclusion::Host);
            }
        }
        Ok(())
    }

    /// Keeps the cores with a CPU outside `allowed` (the daemon's affinity)
    /// from partitions.
    pub fn restrict_to(&mut self, allowed: &[usize]) {
        for core in &self.topology.cores {
            if core.cpus.iter().any(|cpu| !allowed.contains(cpu)) {
                for &cpu in &core.cpus {
                    self.excluded.entry(cpu).or_insert(Exclusion::Affinity);
                }
            }
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Takes in hugepage pools resized since the topology was read: a pool
    /// an operator grew by k pages has k more free pages, one shrunk by k
    /// has k fewer (the kernel only ever removes free pages). What else
    /// happened to the pools meanwhile is not seen: pages taken by other
    /// programs than this daemon's partitions still count as free.
    pub fn refresh_hugepages(&mut self) -> Result<(), TopologyError> {
        for (id, pools) in self.topology.current_hugepages()? {
            let Some(node) = self.topology.nodes.iter_mut().find(|node| node.id == id) else {
                continue;
            };
            for pool in pools {
                match node
                    .hugepages
                    .iter_mut()
                    .find(|known| known.size_kib == pool.size_kib)
                {
                    Some(known) => {
                        if pool.total >= known.total {
                            known.free += pool.total - known.total;
                        } else {
                            known.free = known.free.saturating_sub(known.total - pool.total);
                        }
                        known.total = pool.total;
                    }
                    None => node.hugepages.push(pool),
                }
            }
            node.hugepages.sort_by_key(|pool| pool.size_kib);
        }
        Ok(())
    }

    pub fn allocations(&self) -> &BTreeMap<String, Placement> {
        &self.allocations
    }

    /// The CPUs kept for the host, with their SMT siblings, sorted.
    pub fn host_cpus(&self) -> Vec<usize> {
        self.excluded
            .iter()
            .filter(|(_, why)| **why == Exclusion::Host)
            .map(|(&cpu, _)| cpu)
            .collect()
    }

    /// The partition holding a CPU.
    pub fn owner_of(&self, cpu: usize) -> Option<&str> {
        self.allocations
            .iter()
            .find(|(_, placement)| placement.reserved_cpus.contains(&cpu))
            .map(|(partition, _)| partition.as_str())
    }

    /// Cores of a node that partitions may have and none holds, isolated first.
    pub fn free_cores(&self, node: u32) -> Vec<&Core> {
        let mut cores: Vec<&Core> = self
            .topology
            .cores
            .iter()
            .filter(|core| core.node == node)
            .filter(|core| {
                core.cpus
                    .iter()
                    .all(|&cpu| self.owner_of(cpu).is_none() && !self.excluded.contains_key(&cpu))
            })
            .collect();
        cores.sort_by_key(|core| (!core.isolated, core.cpus[0]));
        cores
    }

    /// Free hugepages of a size on a node, after what placements took.
    pub fn free_hugepages(&self, node: &Node, size: HugepageSize) -> u64 {
        let free = node
            .hugepages
            .iter()
            .find(|pool| pool.size_kib == size.kib())
            .map_or(0, |pool| pool.free);
        let taken: u64 = self
            .allocations
            .values()
            .filter(|placement| placement.node == node.id)
            .filter_map(|placement| placement.hugepages)
            .filter(|taken| taken.size == size)
            .map(|taken| taken.pages)
            .sum();
        free.saturating_sub(taken)
    }

    /// Available memory of a node (not hugepages), after what placements took.
    pub fn free_memory(&self, node: &Node) -> u64 {
        let taken: u64 = self
            .allocations
            .values()
            .filter(|placement| placement.node == node.id && placement.hugepages.is_none())
            .map(|placement| placement.memory_bytes)
            .sum();
        node.mem_available_bytes.saturating_sub(taken)
    }

    pub fn place(
        &mut self,
        partition: &str,
        request: &PlacementRequest,
    ) -> Result<Placement, PlacementError> {
        if partition.is_empty() {
            return Err(PlacementError::EmptyPartitionId);
        }
        if self.allocations.contains_key(partition) {
            return Err(PlacementError::AlreadyPlaced(partition.into()));
        }
        let placement = self.compute(request)?;
        self.allocations
            .insert(partition.to_string(), placement.clone());
        Ok(placement)
    }

    /// Frees a partition's CPUs and memory.
    pub fn release(&mut self, partition: &str) -> Result<Placement, PlacementError> {
        self.allocations
            .remove(partition)
            .ok_or_else(|| PlacementError::UnknownPartition(partition.into()))
    }

    /// Changes the memory of a placed partition (a model swap), on its node
    /// and with its CPUs; on refusal the placement stays as it was.
    pub fn resize_memory(
        &mut self,
        partition: &str,
        memory_bytes: u64,
    ) -> Result<Placement, PlacementError> {
        if memory_bytes == 0 {
            return Err(PlacementError::ZeroMemory);
        }
        let old = self.release(partition)?;
        let request = PlacementRequest {
            memory_bytes,
            hugepages: old.hugepages.map(|taken| taken.size),
            ..PlacementRequest::default()
        };
        let result = self.node(old.node).and_then(|node| {
            let hugepages = self
                .check_memory(node, &request)
                .map_err(|shortage| out_of_memory(&[shortage]))?;
            Ok(Placement {
                memory_bytes,
                hugepages,
                ..old.clone()
            })
        });
        let kept = result.as_ref().map_or(&old, |new| new).clone();
        self.allocations.insert(partition.to_string(), kept);
        result
    }

    /// Takes back a placement made before a restart, if it still fits this
    /// topology as it was made: its node and CPUs exist, its cores have the
    /// same CPUs, no other partition or the host holds them, and its node
    /// still has the memory or hugepages. Otherwise says why not.
    pub fn restore(&mut self, partition: &str, placement: &Placement) -> Result<(), String> {
        if self.allocations.contains_key(partition) {
            return Err(format!("partition {partition:?} is placed twice"));
        }
        let Some(node) = self.topology.node(placement.node) else {
            return Err(format!("NUMA node {} no longer exists", placement.node));
        };
        let mut cpu_nodes = BTreeSet::new();
        for &cpu in placement.host_cpus.iter().chain(&placement.reserved_cpus) {
            let core = self.online_core(cpu).map_err(|error| error.to_string())?;
            if let Some(missing) = core
                .cpus
                .iter()
                .find(|sibling| !placement.reserved_cpus.contains(sibling))
            {
                return Err(format!(
                    "host CPU {cpu}'s core now also has CPU {missing}, which the partition did not hold"
                ));
            }
            if let Some(why) = self.excluded.get(&cpu) {
                return Err(exclusion_message(cpu, cpu, *why));
            }
            if let Some(owner) = self.owner_of(cpu) {
                return Err(format!(
                    "host CPU {cpu} is also held by partition {owner:?}"
                ));
            }
            cpu_nodes.insert(core.node);
        }
        if placement.host_cpus.is_empty() {
            return Err("the placement has no host CPUs".into());
        }
        let cpu_nodes: Vec<u32> = cpu_nodes.into_iter().collect();
        if cpu_nodes != placement.cpu_nodes {
            return Err(format!(
                "its CPUs are now on NUMA nodes {}, not {}",
                join(&cpu_nodes),
                join(&placement.cpu_nodes)
            ));
        }
        let request = PlacementRequest {
            memory_bytes: placement.memory_bytes,
            hugepages: placement.hugepages.map(|taken| taken.size),
            ..PlacementRequest::default()
        };
        let hugepages = self
            .check_memory(node, &request)
            .map_err(|shortage| shortage.to_string())?;
        if hugepages != placement.hugepages {
            return Err(format!(
                "its hugepage count does not match its memory ({:?} for {} bytes)",
                placement.hugepages, placement.memory_bytes
            ));
        }
        self.allocations
            .insert(partition.to_string(), placement.clone());
        Ok(())
    }

    /// The placement a request gets now, without taking it.
    pub fn compute(&self, request: &PlacementRequest) -> Result<Placement, PlacementError> {
        if request.memory_bytes == 0 {
            return Err(PlacementError::ZeroMemory);
        }
        if let Some(node) = request.numa_node {
            self.node(node)?;
        }
        match (&request.cores, request.vcpus) {
            (Some(cpus), vcpus) => self.place_explicit(cpus, vcpus, request),
            (None, Some(0)) => Err(PlacementError::ZeroVcpus),
            (None, Some(vcpus)) => self.place_automatic(vcpus as usize, request),
            (None, None) => Err(PlacementError::NoCpusRequested),
        }
    }

    fn node(&self, id: u32) -> Result<&Node, PlacementError> {
        self.topology
            .node(id)
            .ok_or_else(|| PlacementError::NoSuchNode {
                node: id,
                existing: join(&self.topology.nodes.iter().map(|n| n.id).collect::<Vec<_>>()),
            })
    }

    /// The core of an online CPU, or why the CPU is not one.
    fn online_core(&self, cpu: usize) -> Result<&Core, PlacementError> {
        let online =
            || format_cpulist(&self.topology.cpus.iter().map(|c| c.id).collect::<Vec<_>>());
        if self.topology.offline_cpus.contains(&cpu) {
            return Err(PlacementError::CpuOffline {
                cpu,
                online: online(),
            });
        }
        self.topology
            .core_of(cpu)
            .ok_or_else(|| PlacementError::NoSuchCpu {
                cpu,
                online: online(),
            })
    }

    /// Checks explicit CPUs (existing, not excluded, their cores free, on
    /// `node` if given) and returns every CPU of their cores.
    fn explicit_cpus(
        &self,
        cpus: &[usize],
        vcpus: Option<u32>,
        node: Option<u32>,
    ) -> Result<BTreeSet<usize>, PlacementError> {
        match vcpus {
            Some(vcpus) if vcpus as usize != cpus.len() => {
                return Err(PlacementError::VcpuCountMismatch {
                    vcpus,
                    cpus: cpus.len(),
                })
            }
            _ if cpus.is_empty() => return Err(PlacementError::ZeroVcpus),
            _ => {}
        }
        let mut seen = BTreeSet::new();
        let mut reserved = BTreeSet::new();
        for &cpu in cpus {
            if !seen.insert(cpu) {
                return Err(PlacementError::DuplicateCpu(cpu));
            }
            let core = self.online_core(cpu)?;
            if let Some(node) = node.filter(|&node| node != core.node) {
                return Err(PlacementError::CpuOffNode {
                    cpu,
                    cpu_node: core.node,
                    node,
                });
            }
            for &sibling in &core.cpus {
                if let Some(why) = self.excluded.get(&sibling) {
                    return Err(PlacementError::CpuExcluded {
                        cpu,
                        why: exclusion_message(cpu, sibling, *why),
                    });
                }
                if let Some(owner) = self.owner_of(sibling) {
                    return Err(PlacementError::CpuBusy {
                        cpu: sibling,
                        requested: cpu,
                        owner: owner.into(),
                    });
                }
                reserved.insert(sibling);
            }
        }
        Ok(reserved)
    }

    fn place_explicit(
        &self,
        cpus: &[usize],
        vcpus: Option<u32>,
        request: &PlacementRequest,
    ) -> Result<Placement, PlacementError> {
        let reserved = self.explicit_cpus(cpus, vcpus, request.numa_node)?;
        // Memory on the node with most of the CPUs (the lowest on a tie) that
        // has it.
        let mut per_node: BTreeMap<u32, usize> = BTreeMap::new();
        for &cpu in cpus {
            if let Some(core) = self.topology.core_of(cpu) {
                *per_node.entry(core.node).or_default() += 1;
            }
        }
        let mut candidates: Vec<(u32, usize)> = per_node.into_iter().collect();
        candidates.sort_by_key(|&(node, count)| (std::cmp::Reverse(count), node));
        let mut shortages = Vec::new();
        for &(node, _) in &candidates {
            let node = self.node(node)?;
            match self.check_memory(node, request) {
                Ok(hugepages) => {
                    return Ok(Placement {
                        host_cpus: cpus.to_vec(),
                        reserved_cpus: reserved.into_iter().collect(),
                        node: node.id,
                        cpu_nodes: self.nodes_of(cpus),
                        memory_bytes: request.memory_bytes,
                        hugepages,
                    })
                }
                Err(shortage) => shortages.push(shortage),
            }
        }
        Err(out_of_memory(&shortages))
    }

    fn place_automatic(
        &self,
        vcpus: usize,
        request: &PlacementRequest,
    ) -> Result<Placement, PlacementError> {
        let nodes: Vec<&Node> = match request.numa_node {
            Some(id) => vec![self.node(id)?],
            None => self.topology.nodes.iter().collect(),
        };
        let memory: Vec<(&Node, Result<Option<HugepageAllocation>, Shortage>)> = nodes
            .iter()
            .map(|&node| (node, self.check_memory(node, request)))
            .collect();

        // One node with both the cores and the memory, best first.
        let mut best: Option<(CoreChoice, &Node, Option<HugepageAllocation>)> = None;
        for (node, hugepages) in &memory {
            let (Ok(hugepages), Some(choice)) = (hugepages, self.choose_cores(&[node], vcpus))
            else {
                continue;
            };
            let key = |c: &CoreChoice, n: &Node| (c.non_isolated, c.idle, n.id);
            if best
                .as_ref()
                .is_none_or(|(b, bn, _)| key(&choice, node) < key(b, bn))
            {
                best = Some((choice, node, *hugepages));
            }
        }
        if let Some((choice, node, hugepages)) = best {
            return Ok(self.placement_of(&choice, vcpus, node.id, request, hugepages));
        }

        // Cores first: a node-by-node account of what is free.
        let free_cpus: usize = nodes
            .iter()
            .flat_map(|node| self.free_cores(node.id))
            .map(|core| core.cpus.len())
            .sum();
        if free_cpus < vcpus {
            return Err(self.out_of_cores(vcpus, &nodes, request.numa_node));
        }
        let single_node = request.numa_node.is_some() || nodes.len() == 1;
        // Spread over nodes: memory on the node with the most free cores
        // (then the lowest id), its cores first, then the others'.
        let memory_node = memory
            .iter()
            .filter_map(|(node, result)| result.as_ref().ok().map(|h| (*node, *h)))
            .max_by_key(|(node, _)| {
                let cpus: usize = self.free_cores(node.id).iter().map(|c| c.cpus.len()).sum();
                (cpus, std::cmp::Reverse(node.id))
            });
        let (node, hugepages) = match memory_node {
            Some(found) if !single_node => found,
            _ => {
                let shortages: Vec<Shortage> = memory
                    .into_iter()
                    .filter_map(|(_, result)| result.err())
                    .collect();
                return Err(out_of_memory(&shortages));
            }
        };
        let mut order: Vec<&Node> = vec![node];
        order.extend(nodes.iter().copied().filter(|other| other.id != node.id));
        let choice = self
            .choose_cores(&order, vcpus)
            .ok_or_else(|| self.out_of_cores(vcpus, &nodes, None))?;
        Ok(self.placement_of(&choice, vcpus, node.id, request, hugepages))
    }

    fn placement_of(
        &self,
        choice: &CoreChoice,
        vcpus: usize,
        node: u32,
        request: &PlacementRequest,
        hugepages: Option<HugepageAllocation>,
    ) -> Placement {
        let cpus: Vec<usize> = choice
            .cores
            .iter()
            .flat_map(|core| core.cpus.iter().copied())
            .collect();
        let mut reserved = cpus.clone();
        reserved.sort_unstable();
        Placement {
            host_cpus: cpus[..vcpus].to_vec(),
            cpu_nodes: self.nodes_of(&reserved),
            reserved_cpus: reserved,
            node,
            memory_bytes: request.memory_bytes,
            hugepages,
        }
    }

    /// Free cores covering `vcpus`, from the nodes in order (isolated ones
    /// first within a node).
    fn choose_cores<'a>(&'a self, nodes: &[&Node], vcpus: usize) -> Option<CoreChoice<'a>> {
        let mut cores = Vec::new();
        let mut cpus = 0;
        for node in nodes {
            for core in self.free_cores(node.id) {
                if cpus >= vcpus {
                    break;
                }
                cores.push(core);
                cpus += core.cpus.len();
            }
        }
        (cpus >= vcpus).then(|| CoreChoice {
            non_isolated: cores.iter().filter(|core| !core.isolated).count(),
            idle: cpus - vcpus,
            cores,
        })
    }

    fn nodes_of(&self, cpus: &[usize]) -> Vec<u32> {
        let nodes: BTreeSet<u32> = cpus
            .iter()
            .filter_map(|&cpu| self.topology.cpu(cpu).map(|c| c.node))
            .collect();
        nodes.into_iter().collect()
    }

    fn out_of_cores(&self, vcpus: usize, nodes: &[&Node], asked: Option<u32>) -> PlacementError {
        let per_node: Vec<String> = nodes
            .iter()
            .map(|node| {
                let mut free: Vec<usize> = self
                    .free_cores(node.id)
                    .iter()
                    .flat_map(|core| core.cpus.iter().copied())
                    .collect();
                free.sort_unstable();
                if free.is_empty() {
                    format!("node {}: none", node.id)
                } else {
                    format!("node {}: CPUs {}", node.id, format_cpulist(&free))
                }
            })
            .collect();
        let free: usize = nodes
            .iter()
            .flat_map(|node| self.free_cores(node.id))
            .map(|core| core.cpus.len())
            .sum();
        let scope = match asked {
            Some(node) => format!(" on NUMA node {node}"),
            None => String::new(),
        };
        let mut held: Vec<String> = self
            .allocations
            .iter()
            .map(|(id, p)| format!("{id} has {}", format_cpulist(&p.reserved_cpus)))
            .collect();
        let host = self.host_cpus();
        if !host.is_empty() {
            held.push(format!("the host keeps {}", format_cpulist(&host)));
        }
        let held = if held.is_empty() {
            String::new()
        } else {
            format!("; {}", held.join(", "))
        };
        PlacementError::OutOfCores(format!(
            "not enough free cores{scope}: {vcpus} vCPU(s) need {vcpus} CPU(s) in whole cores, \
             {free} free ({}){held}",
            per_node.join("; ")
        ))
    }

    /// The hugepages the request takes on a node, or the node's shortage.
    fn check_memory(
        &self,
        node: &Node,
        request: &PlacementRequest,
    ) -> Result<Option<HugepageAllocation>, Shortage> {
        match request.hugepages {
            Some(size) => {
                let pages = request.memory_bytes.div_ceil(size.bytes());
                let free = self.free_hugepages(node, size);
                if free < pages {
                    return Err(Shortage::Hugepages {
                        node: node.id,
                        size,
                        free,
                        needed: pages,
                    });
                }
                Ok(Some(HugepageAllocation { size, pages }))
            }
            None => {
                let free = self.free_memory(node);
                if free < request.memory_bytes {
                    return Err(Shortage::Memory {
                        node: node.id,
                        free,
                        needed: request.memory_bytes,
                    });
                }
                Ok(None)
            }
        }
    }
}

/// What a node lacks for a request's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shortage {
    Hugepages {
        node: u32,
        size: HugepageSize,
        free: u64,
        needed: u64,
    },
    Memory {
        node: u32,
        free: u64,
        needed: u64,
    },
}

impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Shortage::Hugepages {
                node,
                size,
                free,
                needed,
            } => write!(
                f,
                "not enough {size} hugepages on NUMA node {node}: {free} free, the partition needs {needed}"
            ),
            Shortage::Memory { node, free, needed } => write!(
                f,
                "not enough memory on NUMA node {node}: {} free, the partition needs {}",
                format_bytes(free),
                format_bytes(needed)
            ),
        }
    }
}

fn out_of_memory(shortages: &[Shortage]) -> PlacementError {
    let parts: Vec<String> = shortages.iter().map(Shortage::to_string).collect();
    PlacementError::OutOfMemory(parts.join("; "))
}

fn exclusion_message(cpu: usize, excluded: usize, why: Exclusion) -> String {
    let subject = if cpu == excluded {
        format!("host CPU {cpu}")
    } else {
        format!("host CPU {cpu}'s SMT sibling {excluded}")
    };
    match why {
        Exclusion::Host => format!("{subject} is kept for the host (aivmm serve --host-cpus)"),
        Exclusion::Affinity => format!(
            "{subject} is outside the daemon's CPU affinity (its threads could not be pinned there)"
        ),
    }
}

fn join(ids: &[u32]) -> String {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    ids.join(",")
}

/// "512.0 MiB", "1.5 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fixture;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn placer(name: &str) -> Placer {
        Placer::new(Topology::discover(&fixture(name)).unwrap())
    }

    fn vcpus(n: u32, memory_bytes: u64) -> PlacementRequest {
        PlacementRequest {
            vcpus: Some(n),
            memory_bytes,
            ..PlacementRequest::default()
        }
    }

    fn cores(cpus: &[usize], memory_bytes: u64) -> PlacementRequest {
        PlacementRequest {
            cores: Some(cpus.to_vec()),
            memory_bytes,
            ..PlacementRequest::default()
        }
    }

    fn hugepages(mut request: PlacementRequest, size: HugepageSize) -> PlacementRequest {
        request.hugepages = Some(size);
        request
    }

    fn on_node(mut request: PlacementRequest, node: u32) -> PlacementRequest {
        request.numa_node = Some(node);
        request
    }

    #[track_caller]
    fn refusal(placer: &mut Placer, id: &str, request: PlacementRequest) -> PlacementError {
        let before = placer.allocations().clone();
        let error = placer.place(id, &request).unwrap_err();
        assert_eq!(placer.allocations(), &before, "a refusal took something");
        error
    }

    #[test]
    fn this_machine_gives_two_partitions_a_core_each_and_refuses_a_third() {
        let mut p = placer("this-machine");
        let a = p.place("a", &vcpus(1, 512 * MIB)).unwrap();
        let b = p.place("b", &vcpus(1, 512 * MIB)).unwrap();
        assert_eq!(
            (a.host_cpus, a.reserved_cpus, a.node),
            (vec![0], vec![0], 0)
        );
        assert_eq!((b.host_cpus, b.cpu_nodes), (vec![1], vec![0]));
        let error = refusal(&mut p, "c", vcpus(1, 512 * MIB));
        assert!(error.is_exhaustion());
        assert_eq!(
            error.to_string(),
            "not enough free cores: 1 vCPU(s) need 1 CPU(s) in whole cores, 0 free \
             (node 0: none); a has 0, b has 1"
        );
        // Deleting a partition frees its core.
        p.release("a").unwrap();
        assert_eq!(
            p.place("c", &vcpus(1, 512 * MIB)).unwrap().host_cpus,
            vec![0]
        );
        assert_eq!(
            p.release("a").unwrap_err(),
            PlacementError::UnknownPartition("a".into())
        );
        assert_eq!(
            p.place("b", &vcpus(1, MIB)).unwrap_err(),
            PlacementError::AlreadyPlaced("b".into())
        );
    }

    #[test]
    fn host_cpus_and_the_affinity_are_kept_from_partitions() {
        let mut p = placer("this-machine");
        p.reserve_for_host(&[0]).unwrap();
        assert_eq!(p.host_cpus(), vec![0]);
        assert_eq!(p.place("a", &vcpus(1, MIB)).unwrap().host_cpus, vec![1]);
        let error = refusal(&mut p, "b", vcpus(1, MIB)).to_string();
        assert!(error.ends_with("a has 1, the host keeps 0"), "{error}");
        let error = refusal(&mut p, "b", cores(&[0], MIB));
        assert!(!error.is_exhaustion());
        assert!(error.to_string().contains("kept for the host"), "{error}");
        assert!(matches!(
            Placer::new(p.topology().clone()).reserve_for_host(&[2]),
            Err(PlacementError::NoSuchCpu { cpu: 2, .. })
        ));

        let mut p = placer("this-machine");
        p.restrict_to(&[1]);
        assert_eq!(p.place("a", &vcpus(1, MIB)).unwrap().host_cpus, vec![1]);
        let error = refusal(&mut p, "b", cores(&[0], MIB)).to_string();
        assert!(
            error.contains("outside the daemon's CPU affinity"),
            "{error}"
        );
    }

    #[test]
    fn requests_that_name_what_does_not_exist_are_refused() {
        let mut p = placer("this-machine");
        let cases = [
            (
                cores(&[7], MIB),
                "host CPU 7 does not exist (online CPUs: 0-1)",
            ),
            (
                on_node(vcpus(1, MIB), 3),
                "NUMA node 3 does not exist (nodes: 0)",
            ),
            (cores(&[1, 1], MIB), "host CPU 1 is listed twice"),
            (vcpus(0, MIB), "a partition needs at least one vCPU"),
            (cores(&[], MIB), "a partition needs at least one vCPU"),
            (
                vcpus(1, 0),
                "a partition needs memory; 0 bytes were requested",
            ),
            (
                PlacementRequest {
                    memory_bytes: MIB,
                    ..Default::default()
                },
                "a placement needs",
            ),
            (
                PlacementRequest {
                    vcpus: Some(2),
                    ..cores(&[0], MIB)
                },
                "2 vCPUs were requested with 1 explicit host CPUs",
            ),
        ];
        for (request, message) in cases {
            let error = refusal(&mut p, "a", request);
            assert!(!error.is_exhaustion(), "{error}");
            assert!(error.to_string().starts_with(message), "{error}");
        }
        let mut p = placer("isolated");
        let error = refusal(&mut p, "a", cores(&[15], MIB)).to_string();
        assert_eq!(error, "host CPU 15 is offline (online CPUs: 0-14)");
    }

    #[test]
    fn memory_and_hugepages_are_never_overcommitted() {
        let mut p = placer("this-machine");
        let error = refusal(
            &mut p,
            "a",
            hugepages(vcpus(1, 512 * MIB), HugepageSize::TwoMiB),
        );
        assert!(error.is_exhaustion());
        assert_eq!(
            error.to_string(),
            "not enough 2 MiB hugepages on NUMA node 0: 0 free, the partition needs 256"
        );
        // 13.7 GiB available (free, file pages, reclaimable slab): two
        // partitions of 8 GiB do not both fit.
        p.place("a", &vcpus(1, 8 * GIB)).unwrap();
        let error = refusal(&mut p, "b", vcpus(1, 8 * GIB)).to_string();
        assert!(
            error.starts_with("not enough memory on NUMA node 0: 5.7 GiB free"),
            "{error}"
        );
        // A model swap that needs more memory than is left keeps the old size.
        let error = p.resize_memory("a", 20 * GIB).unwrap_err().to_string();
        assert!(
            error.starts_with("not enough memory on NUMA node 0"),
            "{error}"
        );
        assert_eq!(p.allocations()["a"].memory_bytes, 8 * GIB);
        assert_eq!(p.resize_memory("a", GIB).unwrap().memory_bytes, GIB);
        assert_eq!(p.allocations()["a"].host_cpus, vec![0]);
    }

    #[test]
    fn two_sockets_whole_cores_and_siblings() {
        let mut p = placer("two-socket-smt");
        let a = p.place("a", &vcpus(2, GIB)).unwrap();
        assert_eq!(
            (a.host_cpus, a.reserved_cpus, a.node),
            (vec![0, 16], vec![0, 16], 0)
        );
        // Three vCPUs take two whole cores; the fourth thread stays idle.
        let b = p.place("b", &vcpus(3, GIB)).unwrap();
        assert_eq!(b.host_cpus, vec![1, 17, 2]);
        assert_eq!(b.reserved_cpus, vec![1, 2, 17, 18]);
        // A sibling of a held CPU is not given to anyone else.
        let error = refusal(&mut p, "c", cores(&[18], GIB));
        assert_eq!(
            error.to_string(),
            "host CPU 18's SMT sibling 2 belongs to partition \"b\"; siblings are never split between partitions"
        );
        let c = p.place("c", &cores(&[19], GIB)).unwrap();
        assert_eq!((c.host_cpus, c.reserved_cpus), (vec![19], vec![3, 19]));
        let d = p.place("d", &on_node(vcpus(2, GIB), 1)).unwrap();
        assert_eq!(
            (d.host_cpus, d.node, d.cpu_nodes),
            (vec![8, 24], 1, vec![1])
        );
        let error = refusal(&mut p, "e", on_node(cores(&[4], GIB), 1)).to_string();
        assert_eq!(
            error,
            "host CPU 4 is on NUMA node 0, not on the requested node 1"
        );
        let mut p = placer("two-socket-smt");
        p.reserve_for_host(&[16]).unwrap();
        assert_eq!(p.host_cpus(), vec![0, 16]);
        assert_eq!(
            p.place("a", &vcpus(1, GIB)).unwrap().reserved_cpus,
            vec![1, 17]
        );
    }

    #[test]
    fn two_sockets_one_node_when_possible_else_spread() {
        let mut p = placer("two-socket-smt");
        let a = p.place("a", &vcpus(12, GIB)).unwrap();
        assert_eq!((a.node, a.cpu_nodes.clone()), (0, vec![0]));
        // Node 0 has 4 CPUs left: 8 vCPUs go to node 1, whole.
        let b = p.place("b", &vcpus(8, GIB)).unwrap();
        assert_eq!(
            (b.node, b.cpu_nodes, b.host_cpus),
            (1, vec![1], vec![8, 24, 9, 25, 10, 26, 11, 27])
        );
        // 12 vCPUs fit on no single node (4 + 8 free): spread, memory on the
        // node giving the most cores.
        let c = p.place("c", &vcpus(12, GIB)).unwrap();
        assert_eq!((c.node, c.cpu_nodes.clone()), (1, vec![0, 1]));
        assert_eq!(&c.host_cpus[..8], &[12, 28, 13, 29, 14, 30, 15, 31]);
        let error = refusal(&mut p, "d", vcpus(1, GIB)).to_string();
        assert!(error.starts_with("not enough free cores: 1 vCPU(s) need 1 CPU(s) in whole cores, 0 free (node 0: none; node 1: none)"), "{error}");
        // Explicit CPUs may span nodes; the memory follows most of them.
        let mut p = placer("two-socket-smt");
        let e = p.place("e", &cores(&[8, 9, 0], GIB)).unwrap();
        assert_eq!((e.node, e.cpu_nodes), (1, vec![0, 1]));
        let error = refusal(&mut p, "f", on_node(vcpus(28, GIB), 0)).to_string();
        assert!(error.starts_with("not enough free cores on NUMA node 0: 28 vCPU(s) need 28 CPU(s) in whole cores, 14 free (node 0: CPUs 1-7,17-23)"), "{error}");
    }

    #[test]
    fn two_sockets_hugepages_per_node() {
        let mut p = placer("two-socket-smt");
        // Node 1 has 300 free 2 MiB pages: 1 GiB (512) must go to node 0.
        let error = refusal(
            &mut p,
            "a",
            on_node(hugepages(vcpus(1, GIB), HugepageSize::TwoMiB), 1),
        );
        assert_eq!(
            error.to_string(),
            "not enough 2 MiB hugepages on NUMA node 1: 300 free, the partition needs 512"
        );
        let a = p
            .place("a", &hugepages(vcpus(1, GIB), HugepageSize::TwoMiB))
            .unwrap();
        assert_eq!(
            (a.node, a.hugepages),
            (
                0,
                Some(HugepageAllocation {
                    size: HugepageSize::TwoMiB,
                    pages: 512
                })
            )
        );
        // 1 MiB more than 1 GiB rounds up to 513 pages; node 0 has 512 left.
        let error = refusal(
            &mut p,
            "b",
            on_node(hugepages(vcpus(1, GIB + MIB), HugepageSize::TwoMiB), 0),
        );
        assert!(
            error
                .to_string()
                .contains("512 free, the partition needs 513"),
            "{error}"
        );
        p.place("b", &hugepages(vcpus(1, GIB), HugepageSize::TwoMiB))
            .unwrap();
        // Both nodes short: both are named.
        let error = refusal(&mut p, "c", hugepages(vcpus(1, GIB), HugepageSize::TwoMiB));
        assert_eq!(
            error.to_string(),
            "not enough 2 MiB hugepages on NUMA node 0: 0 free, the partition needs 512; \
             not enough 2 MiB hugepages on NUMA node 1: 300 free, the partition needs 512"
        );
        // The 1 GiB pool of node 0 is separate: 4 pages.
        let d = p
            .place("d", &hugepages(vcpus(1, 3 * GIB), HugepageSize::OneGiB))
            .unwrap();
        assert_eq!(d.hugepages.unwrap().pages, 3);
        let error = refusal(
            &mut p,
            "e",
            hugepages(vcpus(1, 2 * GIB), HugepageSize::OneGiB),
        );
        assert!(
            error
                .to_string()
                .contains("1 GiB hugepages on NUMA node 0: 1 free, the partition needs 2"),
            "{error}"
        );
        p.release("a").unwrap();
        assert_eq!(
            p.place("e", &hugepages(vcpus(1, GIB), HugepageSize::TwoMiB))
                .unwrap()
                .node,
            0
        );
    }

    #[test]
    fn four_nodes_memory_decides_the_node() {
        let mut p = placer("four-node");
        // Node n has 256 * n free 2 MiB pages: node 0 none.
        let request = hugepages(vcpus(2, 512 * MIB), HugepageSize::TwoMiB);
        let nodes: Vec<u32> = (0..6)
            .map(|i| p.place(&format!("p{i}"), &request).unwrap().node)
            .collect();
        assert_eq!(nodes, vec![1, 2, 2, 3, 3, 3]);
        let error = refusal(&mut p, "p6", request).to_string();
        assert!(
            error.contains("NUMA node 0: 0 free") && error.contains("NUMA node 3: 0 free"),
            "{error}"
        );
        let a = p.place("a", &vcpus(4, GIB)).unwrap();
        assert_eq!((a.node, a.host_cpus), (0, vec![0, 1, 2, 3]));
        // Free: node 0 4 CPUs, node 1 6, node 2 4, node 3 2. 10 vCPUs fit on
        // no node: node 1's cores (with the memory), then node 0's.
        let b = p.place("b", &vcpus(10, GIB)).unwrap();
        assert_eq!((b.node, b.cpu_nodes), (1, vec![0, 1]));
        let error = refusal(&mut p, "c", on_node(vcpus(10, GIB), 3)).to_string();
        assert!(
            error.starts_with("not enough free cores on NUMA node 3"),
            "{error}"
        );
    }

    #[test]
    fn isolated_cores_come_first() {
        let mut p = placer("isolated");
        let placed: Vec<Vec<usize>> = (0..4)
            .map(|i| {
                p.place(&format!("p{i}"), &vcpus(2, GIB))
                    .unwrap()
                    .reserved_cpus
            })
            .collect();
        assert_eq!(
            placed,
            vec![vec![2, 10], vec![3, 11], vec![4, 12], vec![5, 13]]
        );
        // The isolated cores are gone: the next one is a housekeeping core.
        assert_eq!(
            p.place("p4", &vcpus(2, GIB)).unwrap().reserved_cpus,
            vec![0, 8]
        );
        let mut p = placer("isolated");
        // One vCPU: an isolated core (its sibling idle) beats CPU 7's lone core.
        assert_eq!(
            p.place("a", &vcpus(1, GIB)).unwrap().reserved_cpus,
            vec![2, 10]
        );
        let error = refusal(&mut p, "b", vcpus(15, GIB)).to_string();
        assert!(error.contains("13 free"), "{error}");
        let huge = p
            .place("c", &hugepages(vcpus(1, 2 * GIB), HugepageSize::OneGiB))
            .unwrap();
        assert_eq!(huge.hugepages.unwrap().pages, 2);
    }

    #[test]
    fn hugepages_reserved_after_the_start_are_seen() {
        let scratch = crate::host::Scratch::of("isolated", "refresh");
        let pool = "sys/devices/system/node/node0/hugepages/hugepages-2048kB";
        let mut p = Placer::new(Topology::discover(&scratch.0).unwrap());
        let request = hugepages(vcpus(1, 3 * GIB), HugepageSize::TwoMiB);
        p.place("a", &hugepages(vcpus(1, 2 * GIB), HugepageSize::TwoMiB))
            .unwrap();
        // 2000 free at the start, 1024 taken: 976 left, 1536 needed.
        let error = refusal(&mut p, "b", request.clone()).to_string();
        assert!(
            error.contains("976 free, the partition needs 1536"),
            "{error}"
        );
        // The operator adds 600 pages (the kernel shows them free, and a's
        // pages as used once a has booted).
        scratch.write(&format!("{pool}/nr_hugepages"), "2648\n");
        scratch.write(&format!("{pool}/free_hugepages"), "1576\n");
        p.refresh_hugepages().unwrap();
        assert_eq!(
            p.place("b", &request).unwrap().hugepages.unwrap().pages,
            1536
        );
        // Shrinking the pool takes free pages away.
        scratch.write(&format!("{pool}/nr_hugepages"), "2048\n");
        p.refresh_hugepages().unwrap();
        p.release("b").unwrap();
        let error = refusal(&mut p, "b", request).to_string();
        assert!(error.contains("976 free"), "{error}");
    }

    #[test]
    fn no_numa_machine() {
        let mut p = placer("no-numa");
        let a = p
            .place("a", &hugepages(vcpus(4, 256 * MIB), HugepageSize::TwoMiB))
            .unwrap();
        assert_eq!((a.host_cpus, a.node), (vec![0, 1, 2, 3], 0));
        let error = refusal(
            &mut p,
            "b",
            hugepages(cores(&[0], MIB), HugepageSize::TwoMiB),
        );
        assert!(
            error.to_string().contains("belongs to partition \"a\""),
            "{error}"
        );
    }

    #[test]
    fn placements_are_restored_when_they_still_fit() {
        let mut p = placer("two-socket-smt");
        p.place("a", &hugepages(vcpus(2, GIB), HugepageSize::TwoMiB))
            .unwrap();
        p.place("b", &on_node(vcpus(3, GIB), 1)).unwrap();
        let saved: BTreeMap<String, Placement> =
            serde_json::from_str(&serde_json::to_string(p.allocations()).unwrap()).unwrap();

        let mut q = placer("two-socket-smt");
        for (id, placement) in &saved {
            q.restore(id, placement).unwrap();
        }
        assert_eq!(q.allocations(), &saved);
        assert_eq!(q.place("c", &vcpus(2, GIB)).unwrap().host_cpus, vec![1, 17]);
        assert_eq!(
            q.restore("d", &saved["a"]).unwrap_err(),
            "host CPU 0 is also held by partition \"a\""
        );

        // The same placements on a smaller machine, or with the host keeping
        // their CPUs, are refused with the reason.
        let mut small = placer("this-machine");
        assert_eq!(
            small.restore("b", &saved["b"]).unwrap_err(),
            "NUMA node 1 no longer exists"
        );
        let error = small.restore("a", &saved["a"]).unwrap_err();
        assert_eq!(error, "host CPU 16 does not exist (online CPUs: 0-1)");
        let mut kept = placer("two-socket-smt");
        kept.reserve_for_host(&[0]).unwrap();
        let error = kept.restore("a", &saved["a"]).unwrap_err();
        assert!(error.contains("kept for the host"), "{error}");
        // Fewer hugepages than the placement holds: refused, not overcommitted.
        let mut full = placer("two-socket-smt");
        full.place(
            "x",
            &hugepages(cores(&[7], GIB + 512 * MIB), HugepageSize::TwoMiB),
        )
        .unwrap();
        let error = full.restore("a", &saved["a"]).unwrap_err();
        assert_eq!(
            error,
            "not enough 2 MiB hugepages on NUMA node 0: 256 free, the partition needs 512"
        );
        // A core whose shape changed (an SMT sibling came online) is refused.
        let mut other = placer("isolated");
        let lone = Placement {
            host_cpus: vec![2],
            reserved_cpus: vec![2],
            node: 0,
            cpu_nodes: vec![0],
            memory_bytes: GIB,
            hugepages: None,
        };
        let error = other.restore("x", &lone).unwrap_err();
        assert!(error.contains("also has CPU 10"), "{error}");
    }
}
