//! `aivmm topology`: what this host offers to partitions, as a table or JSON.

use std::io::Write;
use std::path::PathBuf;

use super::placement::format_bytes;
use super::topology::{format_cpulist, Topology};
use super::Error;

#[derive(Debug, Clone, clap::Args)]
pub struct TopologyArgs {
    /// Print the topology as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read sysfs and procfs under this directory instead of / (for tests and
    /// trees captured by tests/fixtures/topology/capture.sh).
    #[arg(long, default_value = "/", hide = true)]
    pub sysfs_root: PathBuf,
}

pub fn cmd_topology(args: &TopologyArgs, out: &mut dyn Write) -> Result<(), Error> {
    let topology = Topology::discover(&args.sysfs_root)?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &topology).map_err(|error| {
            if error.is_io() {
                Error::Output(error.into())
            } else {
                Error::Json(error)
            }
        })?;
        writeln!(out)?;
        return Ok(());
    }

    for node in &topology.nodes {
        let cores: Vec<_> = topology
            .cores
            .iter()
            .filter(|c| c.node == node.id)
            .collect();
        let pools: Vec<String> = node
            .hugepages
            .iter()
            .map(|pool| {
                format!(
                    "{} {}/{} free",
                    page_size(pool.size_kib),
                    pool.free,
                    pool.total
                )
            })
            .collect();
        writeln!(
            out,
            "{} {}: {} cores, {} CPUs; memory {} total, {} available; hugepages: {}",
            if topology.numa {
                "NUMA node"
            } else {
                "node (no NUMA)"
            },
            node.id,
            cores.len(),
            node.cpus.len(),
            format_bytes(node.mem_total_bytes),
            format_bytes(node.mem_available_bytes),
            if pools.is_empty() {
                "none".into()
            } else {
                pools.join(", ")
            },
        )?;
        for core in cores {
            let note = if core.isolated { "  isolated" } else { "" };
            let line = format!(
                "  package {} core {:<4} cpus {:<10}{note}",
                core.package,
                core.core_id,
                format_cpulist(&core.cpus)
            );
            writeln!(out, "{}", line.trim_end())?;
        }
    }

    let isolation = &topology.isolation;
    let mut isolated: Vec<usize> = topology
        .cpus
        .iter()
        .filter(|c| c.isolated)
        .map(|c| c.id)
        .collect();
    isolated.sort_unstable();
    if !isolated.is_empty() {
        let mut isolcpus = isolation.isolcpus_flags.clone();
        isolcpus.push(format_cpulist(&isolation.isolcpus));
        writeln!(
            out,
            "isolated CPUs: {} (cpu/isolated: {}; nohz_full: {}; isolcpus={})",
            format_cpulist(&isolated),
            or_none(format_cpulist(&isolation.isolated)),
            or_none(format_cpulist(&isolation.nohz_full)),
            isolcpus.join(","),
        )?;
    }
    if !topology.offline_cpus.is_empty() {
        writeln!(
            out,
            "offline CPUs: {}",
            format_cpulist(&topology.offline_cpus)
        )?;
    }

    if !topology.pci_devices.is_empty() {
        writeln!(out, "PCI devices:")?;
        writeln!(
            out,
            "  {:<13} {:<9} {:<6} {:<4} {:<12} {:<11} assignable",
            "address", "id", "class", "node", "driver", "iommu group"
        )?;
        for device in &topology.pci_devices {
            writeln!(
                out,
                "  {:<13} {:04x}:{:04x} {:06x} {:<4} {:<12} {:<11} {}",
                device.address,
                device.vendor,
                device.device,
                device.class,
                device.numa_node.map_or("-".into(), |n| n.to_string()),
                device.driver.as_deref().unwrap_or("-"),
                device.iommu_group.map_or("-".into(), |g| g.to_string()),
                match &device.not_assignable {
                    None => "yes".to_string(),
                    Some(why) => format!("no: {why}"),
                },
            )?;
        }
    }

    let isolated_cores = topology.cores.iter().filter(|core| core.isolated).count();
    writeln!(
        out,
        "{} cores, {} CPUs ({isolated_cores} cores isolated); `aivmm serve --host-cpus` keeps cores for the host",
        topology.cores.len(),
        topology.cpus.len()
    )?;
    Ok(())
}

fn page_size(kib: u64) -> String {
    match kib {
        kib if kib % (1024 * 1024) == 0 => format!("{} GiB", kib / (1024 * 1024)),
        kib if kib % 1024 == 0 => format!("{} MiB", kib / 1024),
        kib => format!("{kib} KiB"),
    }
}

fn or_none(list: String) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fixture;

    fn run(name: &str, json: bool) -> String {
        let args = TopologyArgs {
            json,
            sysfs_root: fixture(name),
        };
        let mut out = Vec::new();
        cmd_topology(&args, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_table_shows_nodes_cores_isolation_and_devices() {
        let table = run("isolated", false);
        assert!(
            table.starts_with(
                "NUMA node 0: 8 cores, 15 CPUs; memory 31.2 GiB total, 28.6 GiB available; \
             hugepages: 2 MiB 2000/2048 free, 1 GiB 2/2 free\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("  package 0 core 2    cpus 2,10        isolated\n"),
            "{table}"
        );
        assert!(table.contains("  package 0 core 7    cpus 7\n"), "{table}");
        assert!(table.contains("isolated CPUs: 2-5,10-13 (cpu/isolated: 2-5,10-13; nohz_full: 2-5,10-13; isolcpus=domain,managed_irq,2-5,10-13)\n"), "{table}");
        assert!(table.contains("offline CPUs: 15\n"), "{table}");
        assert!(
            table.contains("  0000:00:1f.0  8086:7a06 060100 -    -            -           no: no IOMMU group (is the IOMMU on?)\n"),
            "{table}"
        );
        let table = run("two-socket-smt", false);
        assert!(table.contains("NUMA node 1: 8 cores, 16 CPUs"), "{table}");
        assert!(
            table.contains("  0000:17:00.0  15b3:101d 020000 0    vfio-pci     21          yes\n"),
            "{table}"
        );
        let table = run("no-numa", false);
        assert!(
            table.starts_with("node (no NUMA) 0: 4 cores, 4 CPUs"),
            "{table}"
        );
    }

    #[test]
    fn the_json_is_the_topology() {
        let json: serde_json::Value = serde_json::from_str(&run("four-node", true)).unwrap();
        assert_eq!(json["nodes"].as_array().unwrap().len(), 4);
        assert_eq!(json["cores"][10]["cpus"], serde_json::json!([20, 21]));
        assert_eq!(json["cores"][10]["node"], 2);
        assert_eq!(json["nodes"][3]["hugepages"][0]["free"], 768);
        assert_eq!(json["pci_devices"][1]["driver"], "ice");
        assert_eq!(json["pci_devices"][1]["assignable"], false);
        assert_eq!(
            json["pci_devices"][1]["not_assignable"],
            "bound to ice, not vfio-pci"
        );
        assert_eq!(json["numa"], true);
    }
}
