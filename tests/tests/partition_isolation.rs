//! Partitions kept to themselves on one host: two partitions at once, each
//! pinned to its own core, guest RAM on prefaulted 2 MiB hugepages bound to
//! NUMA node 0, each in a cgroup of its own, every partition thread under
//! its seccomp filter; both generate the host engine's greedy tokens at the
//! same time. What is checked comes from the kernel's own view:
//! /proc/self/task/*/status (Cpus_allowed_list, Seccomp), /proc/self/smaps
//! and numa_maps, /proc/self/task/*/cgroup.
//!
//! The hugepages are reserved by tests/setup-hugepages.sh: tests/run.sh runs
//! it, and the test runs it when too few are free (it needs root then; if
//! it cannot, the test fails and says so).

mod common;

use common::host::{hugepage_mappings, read_number, tasks, Task};

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use aivmm::host_engine::MappedModel;
use aivmm::inference::{plan_memory, Completion, GenerationRequest, InferencePartition, Prompt};
use aivmm::isolation::{CgroupScope, IsolationConfig};
use aivmm::partition::{self, PartitionConfig, PartitionError};
use aivmm::stats::LatencyStats;
use aivmm::vstate::memory::{MemoryError, RamBacking};
use aivmm_engine::generate::Flow;
use aivmm_engine::sampling::SamplerConfig;

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const N_CTX: usize = 512;
const TOKENS: usize = 24;

fn is_root() -> bool {
    // "Uid: real effective saved fs"
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

fn host_greedy(model_path: &Path, prompt: &[u32]) -> Vec<u32> {
    common::with_greedy_host_engine(model_path, N_CTX, TOKENS, true, |engine| {
        engine.complete(prompt, &mut |_| {}).unwrap().tokens
    })
}

fn generate(partition: &mut InferencePartition, prompt: &[u32]) -> Completion {
    partition
        .generate(
            &GenerationRequest {
                prompt: Prompt::Tokens(prompt),
                max_tokens: TOKENS,
                sampling: SamplerConfig::greedy(),
                stop_at_eog: false,
            },
            &mut |_| Flow::Continue,
        )
        .unwrap_or_else(|error| panic!("generation in the partition failed: {error}"))
}

#[test]
fn two_pinned_hugepage_partitions_generate_the_host_tokens_at_once() {
    if !common::kvm_available("two_pinned_hugepage_partitions_generate_the_host_tokens_at_once") {
        return;
    }
    let cpus = aivmm::run::allowed_cpus().unwrap();
    assert!(
        cpus.len() >= 2,
        "this test needs two host CPUs this process may use, it has {cpus:?}"
    );
    let model_path = common::default_model();
    let mapped = MappedModel::open(&model_path).unwrap();
    let gguf = mapped.parse().unwrap();
    let model = mapped.load(&gguf).unwrap();
    let plan = plan_memory(&model, N_CTX, 32, 1).unwrap();
    let memory_bytes = plan.default_bytes;
    let needed = 2 * memory_bytes / (2 << 20);
    common::host::ensure_free_hugepages(
        needed,
        &format!("two partitions of {} MiB", memory_bytes >> 20),
    );
    // A cgroup needs root (or a delegated hierarchy); the rest does not.
    let cgroups = is_root();
    if !cgroups {
        eprintln!("not root: the partitions run without cgroups (cgroup checks not done)");
    }

    let texts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
    ];
    let tokenized: Vec<Vec<u32>> = texts
        .iter()
        .map(|text| model.tokenizer.encode(text, true, true))
        .collect();
    let prompts: [&[u32]; 2] = [&tokenized[0], &tokenized[1]];
    let host: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| host_greedy(&model_path, p))
        .collect();

    let boot = |cpu: usize, name: &str| {
        let config = PartitionConfig {
            vcpus: 1,
            memory_bytes,
            backing: RamBacking::Hugepages,
            host_cpus: Some(vec![cpu]),
            numa_node: Some(0),
            isolation: IsolationConfig {
                cgroup: IsolationConfig::enforced(name, CgroupScope::Threads)
                    .cgroup
                    .filter(|_| cgroups),
                seccomp: true,
            },
            stack_bytes: aivmm::inference::STACK_BYTES,
            model: Some(model_path.clone()),
            inference: Some(plan.setup()),
            ..PartitionConfig::default()
        };
        InferencePartition::start(config, READY_TIMEOUT)
            .unwrap_or_else(|error| panic!("partition {name} did not get ready: {error}"))
    };
    let tag = std::process::id();
    let names = [format!("iso-test-{tag}-a"), format!("iso-test-{tag}-b")];
    let mut partitions = [boot(cpus[0], &names[0]), boot(cpus[1], &names[1])];

    // Pinning, one to one: each partition's vCPU and event threads on its CPU.
    let threads = tasks();
    for (name, cpu) in [("vcpu0", cpus[0]), ("vcpu0", cpus[1])] {
        let pinned: Vec<&Task> = threads
            .iter()
            .filter(|t| t.name == name && t.cpus_allowed == cpu.to_string())
            .collect();
        assert_eq!(
            pinned.len(),
            1,
            "one {name} thread on CPU {cpu}: {threads:#?}"
        );
        assert_eq!(
            pinned[0].seccomp_mode, "2",
            "{name} is filtered: {:?}",
            pinned[0]
        );
    }
    for cpu in [cpus[0], cpus[1]] {
        let events: Vec<&Task> = threads
            .iter()
            .filter(|t| t.name.starts_with("inference-even") && t.cpus_allowed == cpu.to_string())
            .collect();
        assert_eq!(
            events.len(),
            1,
            "one event thread on CPU {cpu}: {threads:#?}"
        );
        assert_eq!(events[0].seccomp_mode, "2", "{:?}", events[0]);
    }
    if cgroups {
        for (name, cpu) in names.iter().zip([cpus[0], cpus[1]]) {
            let members: Vec<&Task> = threads
                .iter()
                .filter(|t| {
                    t.cgroups.lines().any(|l| {
                        l.ends_with(&format!("/aivmm/{name}"))
                            || l.ends_with(&format!("/aivmm-{name}"))
                    })
                })
                .collect();
            // The vCPU and event threads, and the partition's KVM worker
            // (kvm-nx-lpage-recovery, started by its first KVM_RUN).
            for thread in ["vcpu0", "inference-even"] {
                assert_eq!(
                    members
                        .iter()
                        .filter(|t| t.name.starts_with(thread))
                        .count(),
                    1,
                    "{thread} in cgroup {name}: {members:#?}"
                );
            }
            assert!(members.iter().all(|t| t.cpus_allowed == cpu.to_string()));
            eprintln!(
                "cgroup {name}: threads {:?}",
                members.iter().map(|t| t.tid).collect::<Vec<_>>()
            );
        }
    }

    // Guest RAM: two mappings on 2 MiB pages, fully populated, bound to node 0.
    let mappings = hugepage_mappings(memory_bytes);
    assert!(
        mappings.len() >= 2,
        "two hugepage guest RAM mappings: {mappings:?}"
    );
    let numa_maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    for (start, hugetlb_kb) in &mappings {
        assert_eq!(*hugetlb_kb, memory_bytes >> 10, "prefaulted in full");
        let line = numa_maps
            .lines()
            .find(|line| line.starts_with(&format!("{start:x} ")))
            .unwrap_or_else(|| panic!("{start:x} not in numa_maps"));
        assert!(line.contains("bind:0") && line.contains("huge"), "{line}");
        assert!(
            line.contains(&format!("N0={}", memory_bytes / (2 << 20))),
            "every page on node 0: {line}"
        );
    }

    // Both generate at the same time.
    let barrier = Barrier::new(2);
    let results: Vec<(Completion, Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = partitions
            .iter_mut()
            .zip(prompts)
            .map(|(partition, prompt)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    let completion = generate(partition, prompt);
                    (completion, started, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((completion, _, _), host_tokens)) in results.iter().zip(&host).enumerate() {
        assert_eq!(
            &completion.tokens, host_tokens,
            "partition {i} differs from the host engine"
        );
        let stats = LatencyStats::of_token_times(&completion.token_ms);
        eprintln!(
            "partition {i} on CPU {}: {:.1} tok/s; token latency p50 {:.2} ms, p99 {:.2} ms, jitter {:.2} ms",
            cpus[i],
            completion.gen_tok_s(),
            stats.p50_ms,
            stats.p99_ms,
            stats.jitter_ms
        );
    }
    let overlap = results[0]
        .2
        .min(results[1].2)
        .saturating_duration_since(results[0].1.max(results[1].1));
    eprintln!("the two generations overlapped for {overlap:?}");

    // Each one alone gives the same tokens.
    let alone = generate(&mut partitions[0], prompts[0]);
    assert_eq!(alone.tokens, results[0].0.tokens);

    for partition in partitions {
        let outcome = partition.exit(Duration::from_secs(10)).unwrap();
        assert!(matches!(outcome.result, Ok(0)), "{:?}", outcome.result);
    }
    // The cgroups are gone with their partitions.
    if cgroups {
        let cpuset = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.contains("cpuset"));
        for name in &names {
            let leftover = tasks().iter().any(|t| t.cgroups.contains(name.as_str()));
            assert!(!leftover, "a thread is still in cgroup {name}");
            if cpuset {
                let dir = Path::new("/sys/fs/cgroup/cpuset/aivmm").join(name);
                assert!(!dir.exists(), "{} was not removed", dir.display());
            }
        }
    }
}

#[test]
fn a_missing_numa_node_and_a_cpu_given_twice_are_refused() {
    if !common::kvm_available("a_missing_numa_node_and_a_cpu_given_twice_are_refused") {
        return;
    }
    let error = partition::start(PartitionConfig {
        numa_node: Some(1000),
        ..PartitionConfig::default()
    })
    .err()
    .expect("node 1000 does not exist");
    match &error {
        PartitionError::Memory(MemoryError::NoSuchNode { node: 1000, .. }) => {}
        other => panic!("expected NoSuchNode, got {other}"),
    }
    assert!(error.to_string().contains("NUMA node 1000"), "{error}");
    let error = partition::start(PartitionConfig {
        vcpus: 2,
        host_cpus: Some(vec![0, 0]),
        ..PartitionConfig::default()
    })
    .err()
    .expect("CPU 0 twice");
    assert!(
        matches!(error, PartitionError::HostCpuTwice { cpu: 0 }),
        "{error}"
    );

    // More hugepages than node 0 has free (by far: the other test may be
    // reserving some meanwhile): the error names the node and how to reserve
    // there (nothing is mapped before the check).
    let node_pool = "/sys/devices/system/node/node0/hugepages/hugepages-2048kB";
    let free = read_number(&format!("{node_pool}/free_hugepages"));
    if Path::new(node_pool).exists()
        && (free + 1024) * (2 << 20) <= aivmm_guest_abi::layout::RAM_MAX
    {
        let error = partition::start(PartitionConfig {
            memory_bytes: (free + 1024) * (2 << 20),
            backing: RamBacking::Hugepages,
            numa_node: Some(0),
            ..PartitionConfig::default()
        })
        .err()
        .expect("more hugepages than node 0 has");
        let message = error.to_string();
        assert!(
            matches!(
                error,
                PartitionError::Memory(MemoryError::HugepagesShortOnNode { node: 0, .. })
            ),
            "{message}"
        );
        assert!(
            message.contains(&format!("{node_pool}/nr_hugepages")),
            "{message}"
        );
        eprintln!("reported: {message}");
    }
}
