//! This process as the kernel shows it (/proc/self: threads, mappings) and
//! the host's 2 MiB hugepage pool, for the isolation checks.

pub const HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

pub fn read_number(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes sure `needed` 2 MiB hugepages are free (not reserved), running
/// tests/setup-hugepages.sh when they are not (tests/run.sh runs it before
/// the tests; it needs root); fails saying so when it cannot.
pub fn ensure_free_hugepages(needed: u64, what: &str) {
    let free = || {
        read_number(&format!("{HUGEPAGES}/free_hugepages"))
            .saturating_sub(read_number(&format!("{HUGEPAGES}/resv_hugepages")))
    };
    if free() < needed {
        // tests/run.sh reserves them before the tests; a plain `cargo test`
        // runs the same script here.
        let script = super::repo_root().join("tests/setup-hugepages.sh");
        let out = std::process::Command::new(&script)
            .arg(needed.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success() && free() >= needed,
            "{what} need(s) {needed} free 2 MiB hugepages, {} are, and \
             tests/setup-hugepages.sh could not reserve them (run it as root):\n{}",
            free(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One of this process's threads as the kernel shows it.
#[derive(Debug)]
pub struct Task {
    pub tid: u32,
    pub name: String,
    pub cpus_allowed: String,
    pub seccomp_mode: String,
    pub cgroups: String,
}

pub fn tasks() -> Vec<Task> {
    let mut tasks = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        // A thread may end while it is being read: skip it.
        let (Ok(status), Ok(cgroups)) = (
            std::fs::read_to_string(dir.join("status")),
            std::fs::read_to_string(dir.join("cgroup")),
        ) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_string())
                .unwrap_or_default()
        };
        tasks.push(Task {
            tid,
            name: field("Name:"),
            cpus_allowed: field("Cpus_allowed_list:"),
            seccomp_mode: field("Seccomp:"),
            cgroups,
        });
    }
    tasks
}

/// Mappings of this process of exactly `bytes` on 2 MiB pages, with how
/// much of each is populated (Private_Hugetlb, kB).
pub fn hugepage_mappings(bytes: u64) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut found = Vec::new();
    let mut current: Option<(u64, u64, u64, u64)> = None; // start, size kB, page kB, hugetlb kB
    let mut flush = |entry: Option<(u64, u64, u64, u64)>| {
        if let Some((start, size, page, hugetlb)) = entry {
            if size == bytes >> 10 && page == 2048 {
                found.push((start, hugetlb));
            }
        }
    };
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-') {
            if let Ok(start) = u64::from_str_radix(start, 16) {
                flush(current.take());
                current = Some((start, 0, 0, 0));
                continue;
            }
        }
        let kb = |prefix: &str| {
            line.strip_prefix(prefix)
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        if let Some(entry) = current.as_mut() {
            if let Some(v) = kb("Size:") {
                entry.1 = v;
            } else if let Some(v) = kb("KernelPageSize:") {
                entry.2 = v;
            } else if let Some(v) = kb("Private_Hugetlb:") {
                entry.3 = v;
            }
        }
    }
    flush(current);
    found
}
