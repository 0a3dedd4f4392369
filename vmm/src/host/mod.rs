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

/// A copy of a fixture tree to change.
#[cfg(test)]
pub(crate) struct Scratch(pub std::path::PathBuf);

#[cfg(test)]
impl Scratch {
    pub fn of(name: &str, test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("aivmm-host-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_tree(&fixture(name), &dir);
        Scratch(dir)
    }

    pub fn write(&self, rel: &str, content: &str) -> std::path::PathBuf {
        let path = self.0.join(rel);
        std::fs::write(&path, content).unwrap();
        path
    }

    pub fn remove(&self, rel: &str) -> std::path::PathBuf {
        let path = self.0.join(rel);
        std::fs::remove_file(&path).unwrap();
        path
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    use std::fs;
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}
