//! The host as partitions see it: topology discovery (CPUs, cores, NUMA
//! nodes, memory, hugepages, PCI devices), placement of partitions on cores
//! and node memory with admission control, and the `aivmm topology` command.

pub mod cli;
pub mod placement;
pub mod topology;

pub use placement::{
    HugepageAllocation, HugepageSize, Placement, PlacementError, PlacementRequest, Placer,
};
pub use topology::{Topology, TopologyError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cannot write the topology report: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the topology as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[cfg(test)]
pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/topology")
        .join(name)
}
