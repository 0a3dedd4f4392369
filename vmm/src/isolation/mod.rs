//! What keeps a partition to itself on the host: its threads pinned to its
//! CPUs, a cgroup per partition ([`cgroup`]) and per-thread seccomp filters
//! ([`seccomp`]). Guest memory's NUMA binding and prefault are in
//! `vstate::memory`.
//!
//! Every partition thread runs [`ThreadIsolation::enter`] first: pin, join
//! the cgroup, then install its filter (last: the filter forbids the
//! system calls the two others make).

pub mod cgroup;
pub mod seccomp;

use std::sync::Arc;

pub use cgroup::{CgroupError, CgroupScope, CgroupSpec, PartitionCgroup};
pub use seccomp::{SeccompError, ThreadKind};

/// How a partition is isolated beyond pinning and memory binding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IsolationConfig {
    /// The partition's cgroup (None: the partition runs in this process's cgroup).
    pub cgroup: Option<CgroupRequest>,
    /// Per-thread seccomp filters on the partition's threads.
    pub seccomp: bool,
}

impl IsolationConfig {
    /// Everything on: a cgroup of `scope` named `name`, and seccomp.
    pub fn enforced(name: &str, scope: CgroupScope) -> IsolationConfig {
        IsolationConfig {
            cgroup: Some(CgroupRequest {
                name: name.into(),
                scope,
                memory_limit: None,
            }),
            seccomp: true,
        }
    }
}

/// The parts of the cgroup the partition does not decide itself (it adds
/// its CPUs and NUMA node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRequest {
    pub name: String,
    pub scope: CgroupScope,
    pub memory_limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("cannot pin the {kind} thread to host CPU(s) {cpus}: {source}")]
    Pin {
        kind: &'static str,
        cpus: String,
        source: std::io::Error,
    },
    #[error("cannot put the {kind} thread in the partition cgroup: {source}")]
    Cgroup {
        kind: &'static str,
        source: CgroupError,
    },
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// What each thread of one partition does before its work.
#[derive(Debug, Clone, Default)]
pub struct ThreadIsolation {
    pub cgroup: Option<Arc<PartitionCgroup>>,
    pub seccomp: bool,
}

impl ThreadIsolation {
    /// Pins the calling thread to `cpus` (if any), puts it in the cgroup and
    /// installs `kind`'s filter.
    pub fn enter(&self, kind: ThreadKind, cpus: Option<&[usize]>) -> Result<(), IsolationError> {
        if let Some(cpus) = cpus {
            pin_current_thread(cpus).map_err(|source| IsolationError::Pin {
                kind: kind.name(),
                cpus: cpus
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                source,
            })?;
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup
                .join_current_thread()
                .map_err(|source| IsolationError::Cgroup {
                    kind: kind.name(),
                    source,
                })?;
        }
        if self.seccomp {
            seccomp::apply(kind)?;
        }
        Ok(())
    }
}

/// sched_setaffinity of the calling thread to exactly `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() || cpus.iter().any(|&cpu| cpu >= libc::CPU_SETSIZE as usize) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "CPU number out of range",
        ));
    }
    // SAFETY: cpu_set_t is plain bits, zero is the empty set; CPU_SET stays in
    // bounds (checked above); sched_setaffinity(0, ..) affects only this thread
    // and reads exactly size_of::<cpu_set_t>() bytes from `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
