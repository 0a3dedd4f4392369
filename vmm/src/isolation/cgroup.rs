//! A cgroup per partition: cpuset (the partition's CPUs and NUMA node) and,
//! when the partition is the whole process, a memory limit.
//!
//! Where the cgroups go: under the cgroup this process is already in, for
//! each controller (`<current>/aivmm/<name>`), so that whatever limits the
//! process (a service manager's slice, a container) still limits the
//! partitions: nothing escapes to the root.
//!
//! What joins it ([`CgroupScope`]):
//! - `Threads` (the daemon: several partitions share one process): each of
//!   the partition's threads joins itself. cgroup v1: the TID goes into
//!   `tasks` of the cpuset hierarchy. cgroup v2: the partition's cgroup is a
//!   *threaded* child of the process's cgroup (cpuset is a threaded
//!   controller) and the TID goes into `cgroup.threads`. A memory limit is
//!   refused in this scope: memory is charged to the process (v1 charges the
//!   mm owner, v2's memory controller is not threaded), so a per-thread
//!   memory cgroup would limit nothing. A daemon partition's memory is
//!   bounded instead by being reserved and prefaulted up front.
//! - `Process` (`aivmm run`: the process is the partition): the whole
//!   process moves (`cgroup.procs`) before guest memory is allocated, so
//!   every page it allocates is charged to the partition's memory cgroup.
//!
//! v2 is used where `/sys/fs/cgroup` is a cgroup2 mount, v1 (the `cpuset`
//! and `memory` hierarchies) otherwise. The cgroup is removed when the
//! [`PartitionCgroup`] is dropped (after the partition's threads ended).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy with the {controller} controller is mounted (looked at /proc/self/mounts); \
         mount it, or run without a partition cgroup (--no-cgroup)"
    )]
    NoController { controller: &'static str },
    #[error(
        "cannot create the partition cgroup {path}: {source}{hint}",
        hint = permission_hint(source)
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write {value:?} to {path}: {source}{hint}",
        hint = permission_hint(source)
    )]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a memory limit needs the partition to be its own process: memory is charged per \
         process, not per thread (the daemon bounds partition memory by reserving it up front)"
    )]
    MemoryLimitNeedsProcess,
    #[error("partition cgroup name {0:?} must be 1 to 128 characters of a-z A-Z 0-9 - _")]
    BadName(String),
}

fn permission_hint(source: &std::io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            " (partition cgroups need root or a delegated cgroup; or run with --no-cgroup)"
        }
        _ => "",
    }
}

/// Which cgroup version this host uses, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One cgroup2 tree mounted at `root`.
    V2 { root: PathBuf },
    /// cgroup v1: the mount points of the cpuset and memory hierarchies.
    V1 {
        cpuset: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// From `/proc/self/mounts`.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let path = Path::new("/proc/self/mounts");
        let mounts = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })?;
        Ok(Self::from_mounts(&mounts))
    }

    pub fn from_mounts(mounts: &str) -> Hierarchy {
        let entries: Vec<(&str, &str, &str)> = mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let _device = fields.next()?;
                let point = fields.next()?;
                let kind = fields.next()?;
                let options = fields.next()?;
                Some((point, kind, options))
            })
            .collect();
        if let Some((point, _, _)) = entries
            .iter()
            .find(|(point, kind, _)| *kind == "cgroup2" && *point == "/sys/fs/cgroup")
        {
            return Hierarchy::V2 {
                root: PathBuf::from(point),
            };
        }
        let v1 = |controller: &str| {
            entries
                .iter()
                .find(|(_, kind, options)| {
                    *kind == "cgroup" && options.split(',').any(|option| option == controller)
                })
                .map(|(point, _, _)| PathBuf::from(point))
        };
        Hierarchy::V1 {
            cpuset: v1("cpuset"),
            memory: v1("memory"),
        }
    }
}

/// What joins the partition's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupScope {
    /// Each partition thread joins itself ([`PartitionCgroup::join_current_thread`]).
    Threads,
    /// The whole process joins at creation.
    Process,
}

/// The partition's cgroup, as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSpec {
    /// Leaf name (the partition id, or `run-<pid>`).
    pub name: String,
    pub scope: CgroupScope,
    /// Host CPUs (cpuset.cpus).
    pub cpus: Vec<usize>,
    /// NUMA nodes (cpuset.mems).
    pub mems: Vec<u32>,
    /// Memory limit in bytes (only with [`CgroupScope::Process`]).
    pub memory_limit: Option<u64>,
}

/// One controller's cgroup of the partition.
#[derive(Debug)]
struct Group {
    dir: PathBuf,
    /// Where this process was before it moved in (Process scope), to move it back.
    previous: Option<PathBuf>,
    /// The file a TID is written to (Threads scope).
    threads_file: &'static str,
}

/// A created partition cgroup; removed on drop.
#[derive(Debug)]
pub struct PartitionCgroup {
    groups: Vec<Group>,
    scope: CgroupScope,
    /// v2, Process scope: the `cgroup.subtree_control` files (innermost
    /// first) and what was enabled in them, to disable on drop so that the
    /// process may move back.
    v2_enabled: Vec<(PathBuf, &'static str)>,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.into(),
        value: value.into(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })
}

fn mkdir(path: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CgroupError::Create {
            path: path.into(),
            source,
        }),
    }
}

fn list<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// This process's cgroup path (relative to the hierarchy root) for a v1
/// controller, or for v2 (`controller` None), from `/proc/self/cgroup`.
fn current_path(controller: Option<&str>) -> Result<PathBuf, CgroupError> {
    let file = Path::new("/proc/self/cgroup");
    let text = read(file)?;
    let found = text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(name) => controllers.split(',').any(|c| c == name),
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    });
    // Not listed (unusual): the root.
    Ok(found.unwrap_or_default())
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

impl PartitionCgroup {
    /// Creates the cgroup on this host's hierarchy (and, in Process scope,
    /// moves this process into it).
    pub fn create(spec: &CgroupSpec) -> Result<PartitionCgroup, CgroupError> {
        Self::create_in(&Hierarchy::detect()?, spec)
    }

    pub fn create_in(
        hierarchy: &Hierarchy,
        spec: &CgroupSpec,
    ) -> Result<PartitionCgroup, CgroupError> {
        let name_ok = (1..=128).contains(&spec.name.len())
            && spec
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(CgroupError::BadName(spec.name.clone()));
        }
        if spec.memory_limit.is_some() && spec.scope == CgroupScope::Threads {
            return Err(CgroupError::MemoryLimitNeedsProcess);
        }
        let mut this = PartitionCgroup {
            groups: Vec::new(),
            scope: spec.scope,
            v2_enabled: Vec::new(),
        };
        // On an error, `this` drops and removes what was created so far.
        match hierarchy {
            Hierarchy::V1 { cpuset, memory } => {
                let cpuset = cpuset.as_ref().ok_or(CgroupError::NoController {
                    controller: "cpuset",
                })?;
                this.create_v1_cpuset(cpuset, spec)?;
                if let Some(limit) = spec.memory_limit {
                    let memory = memory.as_ref().ok_or(CgroupError::NoController {
                        controller: "memory",
                    })?;
                    this.create_v1_memory(memory, spec, limit)?;
                }
            }
            Hierarchy::V2 { root } => this.create_v2(root, spec)?,
        }
        // (v2 moved the process in already, before enabling its controllers.)
        if spec.scope == CgroupScope::Process && matches!(hierarchy, Hierarchy::V1 { .. }) {
            this.move_process_in()?;
        }
        Ok(this)
    }

    fn create_v1_cpuset(&mut self, mount: &Path, spec: &CgroupSpec) -> Result<(), CgroupError> {
        let current = mount.join(current_path(Some("cpuset"))?);
        let parent = current.join("aivmm");
        if mkdir(&parent)? {
            // A new v1 cpuset starts empty: give it everything its parent has.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                write(&parent.join(file), &read(&current.join(file))?)?;
            }
        }
        let dir = parent.join(&spec.name);
        mkdir(&dir)?;
        self.groups.push(Group {
            dir: dir.clone(),
            previous: Some(current),
            threads_file: "tasks",
        });
        write(&dir.join("cpuset.cpus"), &list(&spec.cpus))?;
        write(&dir.join("cpuset.mems"), &list(&spec.mems))
    }

    fn create_v1_memory(
        &mut self,
        mount: &Path,
        spec: &CgroupSpec,
        limit: u64,
    ) -> Result<(), CgroupError> {
        let current = mount.join(current_path(Some("memory"))?);
        let parent = current.join("aivmm");
        mkdir(&parent)?;
        let dir = parent.join(&spec.name);
        mkdir(&dir)?;
        self.groups.push(Group {
            dir: dir.clone(),
            previous: Some(current),
            threads_file: "tasks",
        });
        write(&dir.join("memory.limit_in_bytes"), &limit.to_string())
    }

    fn create_v2(&mut self, root: &Path, spec: &CgroupSpec) -> Result<(), CgroupError> {
        let current = root.join(current_path(None)?);
        match spec.scope {
            CgroupScope::Process => {
                // v2 allows no process in a cgroup that hands domain
                // controllers (memory) to its children: this process moves
                // into its leaf first, then the controllers are enabled down
                // to it. (Not exercised on the v1 development machines.)
                let parent = current.join("aivmm");
                mkdir(&parent)?;
                let dir = parent.join(&spec.name);
                mkdir(&dir)?;
                self.groups.push(Group {
                    dir: dir.clone(),
                    previous: Some(current.clone()),
                    threads_file: "cgroup.threads",
                });
                write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
                let (enable, disable) = if spec.memory_limit.is_some() {
                    ("+cpuset +memory", "-memory -cpuset")
                } else {
                    ("+cpuset", "-cpuset")
                };
                for dir in [&current, &parent] {
                    let control = dir.join("cgroup.subtree_control");
                    write(&control, enable)?;
                    self.v2_enabled.insert(0, (control, disable));
                }
                if let Some(limit) = spec.memory_limit {
                    write(&dir.join("memory.max"), &limit.to_string())?;
                }
            }
            CgroupScope::Threads => {
                // A threaded child of the process's own cgroup: threads may
                // move only within the process's threaded subtree.
                let dir = current.join(format!("aivmm-{}", spec.name));
                mkdir(&dir)?;
                self.groups.push(Group {
                    dir: dir.clone(),
                    previous: None,
                    threads_file: "cgroup.threads",
                });
                write(&dir.join("cgroup.type"), "threaded")?;
                write(&current.join("cgroup.subtree_control"), "+cpuset")?;
            }
        }
        let dir = &self.groups[self.groups.len() - 1].dir.clone();
        write(&dir.join("cpuset.cpus"), &list(&spec.cpus))?;
        write(&dir.join("cpuset.mems"), &list(&spec.mems))
    }

    fn move_process_in(&self) -> Result<(), CgroupError> {
        let pid = std::process::id().to_string();
        for group in &self.groups {
            write(&group.dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// Puts the calling thread in the cgroup (Threads scope; a no-op in
    /// Process scope, where the thread is already in it).
    pub fn join_current_thread(&self) -> Result<(), CgroupError> {
        if self.scope == CgroupScope::Process {
            return Ok(());
        }
        let tid = gettid().to_string();
        for group in &self.groups {
            write(&group.dir.join(group.threads_file), &tid)?;
        }
        Ok(())
    }

    /// The cgroup directories (one per controller on v1).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.groups.iter().map(|group| group.dir.as_path())
    }
}

impl Drop for PartitionCgroup {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        // Best effort: another aivmm process may still use them.
        for (control, disable) in self.v2_enabled.drain(..) {
            let _ = std::fs::write(control, disable);
        }
        for group in self.groups.drain(..).rev() {
            if self.scope == CgroupScope::Process {
                if let Some(previous) = &group.previous {
                    if let Err(error) = write(&previous.join("cgroup.procs"), &pid) {
                        eprintln!("aivmm: cannot move out of the partition cgroup: {error}");
                    }
                }
            }
            // A thread that was just joined may still be leaving the cgroup
            // (it leaves after its joiner is woken): retry EBUSY briefly.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match std::fs::remove_dir(&group.dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error)
                        if error.raw_os_error() == Some(libc::EBUSY)
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => {
                        eprintln!(
                            "aivmm: cannot remove the partition cgroup {}: {error}",
                            group.dir.display()
                        );
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchy_from_mounts() {
        let v1 = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                  cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0\n\
                  cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                  cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
                  cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            Hierarchy::from_mounts(v1),
            Hierarchy::V1 {
                cpuset: Some("/sys/fs/cgroup/cpuset".into()),
                memory: Some("/sys/fs/cgroup/memory".into()),
            }
        );
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            Hierarchy::from_mounts(v2),
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        let none = "proc /proc proc rw 0 0\n";
        let error = PartitionCgroup::create_in(
            &Hierarchy::from_mounts(none),
            &CgroupSpec {
                name: "p".into(),
                scope: CgroupScope::Threads,
                cpus: vec![0],
                mems: vec![0],
                memory_limit: None,
            },
        )
        .unwrap_err();
        assert!(error.to_string().contains("--no-cgroup"), "{error}");
    }

    #[test]
    fn refuses_bad_names_and_per_thread_memory_limits() {
        let hierarchy = Hierarchy::V1 {
            cpuset: None,
            memory: None,
        };
        let spec = CgroupSpec {
            name: "../escape".into(),
            scope: CgroupScope::Threads,
            cpus: vec![0],
            mems: vec![0],
            memory_limit: None,
        };
        assert!(matches!(
            PartitionCgroup::create_in(&hierarchy, &spec),
            Err(CgroupError::BadName(_))
        ));
        let spec = CgroupSpec {
            name: "p".into(),
            memory_limit: Some(1 << 30),
            ..spec
        };
        assert!(matches!(
            PartitionCgroup::create_in(&hierarchy, &spec),
            Err(CgroupError::MemoryLimitNeedsProcess)
        ));
    }

    /// A v1 cpuset tree in a temporary directory (the kernel's files are plain
    /// files there): the partition's group gets its CPUs and node, the
    /// calling thread's TID, and is removed on drop.
    #[test]
    fn v1_cpuset_in_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("aivmm-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // This process's own cpuset path under the fake mount.
        let own = root.join(current_path(Some("cpuset")).unwrap());
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("cpuset.cpus"), "0-3").unwrap();
        std::fs::write(own.join("cpuset.mems"), "0").unwrap();
        let hierarchy = Hierarchy::V1 {
            cpuset: Some(root.clone()),
            memory: None,
        };
        let spec = CgroupSpec {
            name: "tenant-a".into(),
            scope: CgroupScope::Threads,
            cpus: vec![1, 2],
            mems: vec![0],
            memory_limit: None,
        };
        let cgroup = PartitionCgroup::create_in(&hierarchy, &spec).unwrap();
        let dir = own.join("aivmm/tenant-a");
        assert_eq!(cgroup.dirs().collect::<Vec<_>>(), vec![dir.as_path()]);
        assert_eq!(read(&own.join("aivmm/cpuset.cpus")).unwrap(), "0-3");
        assert_eq!(read(&dir.join("cpuset.cpus")).unwrap(), "1,2");
        assert_eq!(read(&dir.join("cpuset.mems")).unwrap(), "0");
        cgroup.join_current_thread().unwrap();
        assert_eq!(read(&dir.join("tasks")).unwrap(), gettid().to_string());
        // A real cgroup directory holds only kernel files; here they go first.
        for file in ["cpuset.cpus", "cpuset.mems", "tasks"] {
            std::fs::remove_file(dir.join(file)).unwrap();
        }
        drop(cgroup);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Process scope on v1, in a fake tree: cpuset and memory groups, the
    /// limit written, the process moved in, and moved back out on drop.
    #[test]
    fn v1_process_scope_with_a_memory_limit_in_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("aivmm-cgroup-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mounts = [root.join("cpuset"), root.join("memory")];
        let own = [
            mounts[0].join(current_path(Some("cpuset")).unwrap()),
            mounts[1].join(current_path(Some("memory")).unwrap()),
        ];
        for dir in &own {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(own[0].join("cpuset.cpus"), "0-1").unwrap();
        std::fs::write(own[0].join("cpuset.mems"), "0").unwrap();
        let hierarchy = Hierarchy::V1 {
            cpuset: Some(mounts[0].clone()),
            memory: Some(mounts[1].clone()),
        };
        let cgroup = PartitionCgroup::create_in(
            &hierarchy,
            &CgroupSpec {
                name: "run-1".into(),
                scope: CgroupScope::Process,
                cpus: vec![1],
                mems: vec![0],
                memory_limit: Some(300 << 20),
            },
        )
        .unwrap();
        let pid = std::process::id().to_string();
        let dirs = [own[0].join("aivmm/run-1"), own[1].join("aivmm/run-1")];
        assert_eq!(read(&dirs[0].join("cpuset.cpus")).unwrap(), "1");
        assert_eq!(
            read(&dirs[1].join("memory.limit_in_bytes")).unwrap(),
            (300u64 << 20).to_string()
        );
        for dir in &dirs {
            assert_eq!(read(&dir.join("cgroup.procs")).unwrap(), pid);
        }
        // Threads are already in: joining is a no-op.
        cgroup.join_current_thread().unwrap();
        assert!(!dirs[0].join("tasks").exists());
        for dir in &dirs {
            for entry in std::fs::read_dir(dir).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        drop(cgroup);
        for (dir, own) in dirs.iter().zip(&own) {
            assert!(!dir.exists());
            assert_eq!(read(&own.join("cgroup.procs")).unwrap(), pid, "moved back");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// cgroup v2 in a fake tree: Process scope enables the controllers down
    /// to the leaf after moving in, and undoes it on drop; Threads scope
    /// makes a threaded child of the process's cgroup.
    #[test]
    fn v2_in_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("aivmm-cgroup-v2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let own = root.join(current_path(None).unwrap());
        std::fs::create_dir_all(&own).unwrap();
        let hierarchy = Hierarchy::V2 { root: root.clone() };
        let pid = std::process::id().to_string();

        let cgroup = PartitionCgroup::create_in(
            &hierarchy,
            &CgroupSpec {
                name: "run-2".into(),
                scope: CgroupScope::Process,
                cpus: vec![0],
                mems: vec![0],
                memory_limit: Some(1 << 30),
            },
        )
        .unwrap();
        let dir = own.join("aivmm/run-2");
        assert_eq!(read(&dir.join("cgroup.procs")).unwrap(), pid);
        assert_eq!(
            read(&dir.join("memory.max")).unwrap(),
            (1u64 << 30).to_string()
        );
        assert_eq!(read(&dir.join("cpuset.cpus")).unwrap(), "0");
        assert_eq!(
            read(&own.join("cgroup.subtree_control")).unwrap(),
            "+cpuset +memory"
        );
        assert_eq!(
            read(&own.join("aivmm/cgroup.subtree_control")).unwrap(),
            "+cpuset +memory"
        );
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        drop(cgroup);
        assert!(!dir.exists());
        assert_eq!(
            read(&own.join("cgroup.subtree_control")).unwrap(),
            "-memory -cpuset"
        );
        assert_eq!(read(&own.join("cgroup.procs")).unwrap(), pid, "moved back");

        let cgroup = PartitionCgroup::create_in(
            &hierarchy,
            &CgroupSpec {
                name: "tenant".into(),
                scope: CgroupScope::Threads,
                cpus: vec![1],
                mems: vec![0],
                memory_limit: None,
            },
        )
        .unwrap();
        let dir = own.join("aivmm-tenant");
        assert_eq!(read(&dir.join("cgroup.type")).unwrap(), "threaded");
        assert_eq!(
            read(&own.join("cgroup.subtree_control")).unwrap(),
            "+cpuset"
        );
        cgroup.join_current_thread().unwrap();
        assert_eq!(
            read(&dir.join("cgroup.threads")).unwrap(),
            gettid().to_string()
        );
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        drop(cgroup);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
