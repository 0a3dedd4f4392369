//! Host PCI devices in the daemon: which partition holds which. A device is
//! claimed together with its partition's placement, once the passthrough
//! preflight has passed; it is refused to a second partition, released when
//! its partition goes, and claimed again when a saved partition is restored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aivmm_api::types::DeviceInfo;
use aivmm_api::{ApiError, ErrorCode};
use aivmm_passthrough::bdf::Bdf;
use aivmm_passthrough::preflight::{preflight, PreflightRequest, ProcessLimits};

use crate::host::topology;

pub struct DeviceClaims {
    /// The host tree the preflight and the device list read ("/" on a real host).
    root: PathBuf,
    /// The process limits the preflight checks (None: this process's, read
    /// at each claim).
    limits: Option<ProcessLimits>,
    holders: BTreeMap<Bdf, String>,
}

impl DeviceClaims {
    pub fn new(root: PathBuf) -> DeviceClaims {
        DeviceClaims {
            root,
            limits: None,
            holders: BTreeMap::new(),
        }
    }

    /// Checks against fixed limits instead of this process's (tests).
    pub fn with_limits(root: PathBuf, limits: ProcessLimits) -> DeviceClaims {
        DeviceClaims {
            limits: Some(limits),
            ..DeviceClaims::new(root)
        }
    }

    pub fn holder(&self, bdf: &Bdf) -> Option<&str> {
        self.holders.get(bdf).map(String::as_str)
    }

    /// The devices `id` holds.
    pub fn held_by(&self, id: &str) -> Vec<Bdf> {
        self.holders
            .iter()
            .filter(|(_, holder)| holder.as_str() == id)
            .map(|(bdf, _)| *bdf)
            .collect()
    }

    /// The NUMA node the host reports for `bdf`, to place its partition next to it.
    pub fn node_of(&self, bdf: &Bdf) -> Option<u32> {
        let path = self
            .root
            .join("sys/bus/pci/devices")
            .join(bdf.to_string())
            .join("numa_node");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Whether each of `devices` is free (or already `id`'s), listed once.
    pub fn check_free(&self, id: &str, devices: &[Bdf]) -> Result<(), ApiError> {
        for (i, bdf) in devices.iter().enumerate() {
            if devices[..i].contains(bdf) {
                return Err(ApiError::invalid(
                    "devices",
                    format!("{bdf} is listed twice"),
                ));
            }
            if let Some(holder) = self.holder(bdf).filter(|holder| *holder != id) {
                return Err(ApiError {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "devices: {bdf} belongs to partition {holder}; delete that partition or pick another device (GET /devices lists their owners)"
                    ),
                    param: Some("devices".into()),
                });
            }
        }
        Ok(())
    }

    /// Gives all of `devices` to partition `id`, or none of them: each must
    /// be free (or already `id`'s) and pass the preflight for a partition of
    /// `guest_ram_bytes` on `node`.
    pub fn claim(
        &mut self,
        id: &str,
        devices: &[Bdf],
        guest_ram_bytes: u64,
        node: Option<u32>,
    ) -> Result<(), ApiError> {
        self.check_free(id, devices)?;
        if devices.is_empty() {
            return Ok(());
        }
        let limits = match self.limits {
            Some(limits) => limits,
            None => ProcessLimits::current()
                .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))?,
        };
        for bdf in devices {
            let request = PreflightRequest {
                bdf: *bdf,
                guest_ram_bytes,
                partition_node: node,
            };
            preflight(&self.root, &request, limits)
                .map_err(|error| ApiError::invalid("devices", error.to_string()))?;
        }
        for bdf in devices {
            self.holders.insert(*bdf, id.to_string());
        }
        Ok(())
    }

    /// Frees every device `id` holds.
    pub fn release(&mut self, id: &str) {
        self.holders.retain(|_, holder| holder != id);
    }

    /// The host's PCI devices as they are now, with their owners.
    pub fn list(&self) -> Result<Vec<DeviceInfo>, ApiError> {
        let devices = topology::pci_devices(&self.root)
            .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))?;
        Ok(devices
            .into_iter()
            .map(|device| DeviceInfo {
                owner: device
                    .address
                    .parse::<Bdf>()
                    .ok()
                    .and_then(|bdf| self.holder(&bdf).map(str::to_string)),
                address: device.address,
                vendor: device.vendor,
                device: device.device,
                class: device.class,
                numa_node: device.numa_node,
                driver: device.driver,
                iommu_group: device.iommu_group,
                assignable: device.assignable,
                not_assignable: device.not_assignable,
            })
            .collect())
    }
}
