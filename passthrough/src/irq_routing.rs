//! Routing a passed-through device's MSI/MSI-X vectors to KVM.
//!
//! Each vector gets its own GSI and eventfd: VFIO signals the eventfd when
//! the device fires the vector, and KVM (irqfd) injects the GSI's MSI
//! message into the guest without a VMM exit. This module keeps the model:
//! which GSI each vector owns, the VM-wide routing table KVM is given (it is
//! replaced whole on every change), and which irqfds to attach or detach.

use std::collections::BTreeMap;

use kvm_ioctls::VmFd;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};

/// An MSI write: what the guest programmed for one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A pin of the in-kernel PIC or IOAPIC (the default routes).
    Irqchip {
        chip: u32,
        pin: u32,
    },
    Msi(MsiMessage),
}

/// GSIs 0-23 are the IOAPIC pins; MSI vectors get GSIs above them.
pub const FIRST_MSI_GSI: u32 = 24;
/// The IOAPIC pin the PIT (ISA IRQ 0, GSI 0) is wired to.
pub const PIT_IOAPIC_PIN: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("no free GSI for {wanted} more MSI vectors: the VM's {limit} GSIs are in use (fewer devices or vectors per partition)")]
    OutOfGsis { wanted: usize, limit: u32 },
    #[error("vector {vector} is out of range: the device has {count} vectors")]
    NoSuchVector { vector: usize, count: usize },
    #[error("KVM refused the GSI routing table ({entries} entries): {source}")]
    Kvm {
        entries: usize,
        source: vmm_sys_util::errno::Error,
    },
}

/// The VM-wide routing table and GSI allocator.
#[derive(Debug, Clone)]
pub struct GsiRoutingTable {
    routes: BTreeMap<u32, Route>,
    /// GSIs handed to devices, routed or not.
    allocated: Vec<u32>,
    limit: u32,
}

impl GsiRoutingTable {
    /// A table with the in-kernel irqchip's routes (PIC pins on GSIs 0-15,
    /// IOAPIC pins on 0-23), as on a PC (and as QEMU routes it): GSI 0,
    /// which KVM's PIT raises, reaches IOAPIC pin 2, and GSI 2 (the PIC
    /// cascade) has no route, so that pin 2 maps back to GSI 0 alone and
    /// the PIT's interrupt acknowledgements reach it. KVM's own default is
    /// pin 0; the VMM installs this table before the guest runs, so that
    /// ACPI's IRQ0 -> GSI 2 override holds. KVM_SET_GSI_ROUTING replaces the whole table, so
    /// these routes stay in every table given to it.
    /// `limit` is the number of GSIs (KVM_CAP_IRQ_ROUTING's answer).
    pub fn with_irqchip(limit: u32) -> GsiRoutingTable {
        let mut routes = BTreeMap::new();
        for gsi in (0..FIRST_MSI_GSI).filter(|&gsi| gsi != PIT_IOAPIC_PIN) {
            let pin = if gsi == 0 { PIT_IOAPIC_PIN } else { gsi };
            routes.insert(
                gsi,
                Route::Irqchip {
                    chip: KVM_IRQCHIP_IOAPIC,
                    pin,
                },
            );
        }
        GsiRoutingTable {
            routes,
            allocated: Vec::new(),
            limit,
        }
    }

    /// Reserves one GSI per vector for a device.
    pub fn allocate(&mut self, vectors: usize) -> Result<DeviceVectors, RoutingError> {
        let free: Vec<u32> = (FIRST_MSI_GSI..self.limit)
            .filter(|gsi| !self.allocated.contains(gsi))
            .take(vectors)
            .collect();
        if free.len() < vectors {
            return Err(RoutingError::OutOfGsis {
                wanted: vectors,
                limit: self.limit,
            });
        }
        self.allocated.extend(&free);
        Ok(DeviceVectors {
            gsis: free,
            routes: vec![None; vectors],
        })
    }

    /// Gives a device's GSIs back (the device was removed).
    pub fn release(&mut self, device: &DeviceVectors) {
        self.allocated.retain(|gsi| !device.gsis.contains(gsi));
        for gsi in &device.gsis {
            self.routes.remove(gsi);
        }
    }

    /// Applies one vector's change to the table.
    pub fn apply(&mut self, change: &IrqfdChange) {
        match *change {
            IrqfdChange::Attach { gsi, message, .. }
            | IrqfdChange::Retarget { gsi, message, .. } => {
                self.routes.insert(gsi, Route::Msi(message));
            }
            IrqfdChange::Detach { gsi, .. } => {
                self.routes.remove(&gsi);
            }
        }
    }

    pub fn route(&self, gsi: u32) -> Option<Route> {
        self.routes.get(&gsi).copied()
    }

    /// Gives KVM the whole table (KVM_SET_GSI_ROUTING).
    pub fn install(&self, vm: &VmFd) -> Result<(), RoutingError> {
        let entries = self.kvm_entries();
        let error = |source| RoutingError::Kvm {
            entries: entries.len(),
            source,
        };
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| error(vmm_sys_util::errno::Error::new(libc::E2BIG)))?;
        vm.set_gsi_routing(&routing).map_err(error)
    }

    /// The table as KVM_SET_GSI_ROUTING takes it. The IOAPIC routes of GSIs
    /// 0-15 are doubled with PIC pin GSI % 8, as KVM's default table has them.
    pub fn kvm_entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::new();
        for (&gsi, route) in &self.routes {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                ..Default::default()
            };
            match *route {
                Route::Irqchip { chip, pin } => {
                    entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                    entry.u.irqchip.irqchip = chip;
                    entry.u.irqchip.pin = pin;
                    if chip == KVM_IRQCHIP_IOAPIC && gsi < 16 && gsi != 2 {
                        let mut pic = entry;
                        pic.u.irqchip.irqchip = if gsi < 8 {
                            KVM_IRQCHIP_PIC_MASTER
                        } else {
                            KVM_IRQCHIP_PIC_SLAVE
                        };
                        pic.u.irqchip.pin = gsi % 8;
                        entries.push(pic);
                    }
                }
                Route::Msi(message) => {
                    entry.type_ = KVM_IRQ_ROUTING_MSI;
                    entry.u.msi.address_lo = message.address as u32;
                    entry.u.msi.address_hi = (message.address >> 32) as u32;
                    entry.u.msi.data = message.data;
                }
            }
            entries.push(entry);
        }
        entries
    }
}

/// What to do with one vector's irqfd after the guest reprogrammed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqfdChange {
    /// The vector can fire: route its GSI and attach its eventfd to the GSI.
    Attach {
        vector: usize,
        gsi: u32,
        message: MsiMessage,
    },
    /// The vector moved (new address/data): reroute the GSI, the irqfd stays.
    Retarget {
        vector: usize,
        gsi: u32,
        message: MsiMessage,
    },
    /// The vector was masked or disabled: detach its eventfd (interrupts then
    /// wait in it, and the VMM reports them in the PBA) and drop the route.
    Detach { vector: usize, gsi: u32 },
}

/// The GSIs of one device's vectors and what each is routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceVectors {
    gsis: Vec<u32>,
    routes: Vec<Option<MsiMessage>>,
}

impl DeviceVectors {
    pub fn gsi(&self, vector: usize) -> Option<u32> {
        self.gsis.get(vector).copied()
    }

    pub fn len(&self) -> usize {
        self.gsis.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gsis.is_empty()
    }

    /// Sets vector `vector`'s route (None: cannot fire); returns the change
    /// to make, if any.
    pub fn update(
        &mut self,
        vector: usize,
        route: Option<MsiMessage>,
    ) -> Result<Option<IrqfdChange>, RoutingError> {
        let count = self.gsis.len();
        let (Some(&gsi), Some(current)) = (self.gsis.get(vector), self.routes.get_mut(vector))
        else {
            return Err(RoutingError::NoSuchVector { vector, count });
        };
        let change = match (*current, route) {
            (None, Some(message)) => Some(IrqfdChange::Attach {
                vector,
                gsi,
                message,
            }),
            (Some(old), Some(message)) if old != message => Some(IrqfdChange::Retarget {
                vector,
                gsi,
                message,
            }),
            (Some(_), None) => Some(IrqfdChange::Detach { vector, gsi }),
            _ => None,
        };
        *current = route;
        Ok(change)
    }

    /// Sets every vector's route (the device's MSI/MSI-X control changed).
    pub fn update_all(
        &mut self,
        routes: &[Option<MsiMessage>],
    ) -> Result<Vec<IrqfdChange>, RoutingError> {
        let mut changes = Vec::new();
        for vector in 0..self.gsis.len() {
            let route = routes.get(vector).copied().flatten();
            changes.extend(self.update(vector, route)?);
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };
    const M2: MsiMessage = MsiMessage {
        address: 0x1_fee0_2000,
        data: 0x42,
    };

    #[test]
    fn vectors_get_distinct_gsis_above_the_ioapic() {
        let mut table = GsiRoutingTable::with_irqchip(32);
        let a = table.allocate(5).unwrap();
        let b = table.allocate(3).unwrap();
        assert_eq!(
            (a.gsi(0), a.gsi(4), b.gsi(0), b.gsi(2)),
            (Some(24), Some(28), Some(29), Some(31))
        );
        assert_eq!(
            table.allocate(1),
            Err(RoutingError::OutOfGsis {
                wanted: 1,
                limit: 32
            })
        );
        table.release(&a);
        assert_eq!(table.allocate(2).unwrap().gsi(1), Some(25));
    }

    #[test]
    fn changes_follow_mask_and_retarget() {
        let mut table = GsiRoutingTable::with_irqchip(64);
        let mut device = table.allocate(4).unwrap();
        let attach = device.update(1, Some(M1)).unwrap().unwrap();
        assert_eq!(
            attach,
            IrqfdChange::Attach {
                vector: 1,
                gsi: 25,
                message: M1
            }
        );
        table.apply(&attach);
        assert_eq!(table.route(25), Some(Route::Msi(M1)));
        assert_eq!(
            device.update(1, Some(M1)).unwrap(),
            None,
            "same message: nothing to do"
        );
        let retarget = device.update(1, Some(M2)).unwrap().unwrap();
        assert_eq!(
            retarget,
            IrqfdChange::Retarget {
                vector: 1,
                gsi: 25,
                message: M2
            }
        );
        table.apply(&retarget);
        let detach = device.update(1, None).unwrap().unwrap();
        assert_eq!(detach, IrqfdChange::Detach { vector: 1, gsi: 25 });
        table.apply(&detach);
        assert_eq!(table.route(25), None);
        assert_eq!(device.update(1, None).unwrap(), None);
        assert_eq!(
            device.update(4, None),
            Err(RoutingError::NoSuchVector {
                vector: 4,
                count: 4
            })
        );
        let all = device.update_all(&[Some(M1), None, Some(M2)]).unwrap();
        assert_eq!(
            all,
            vec![
                IrqfdChange::Attach {
                    vector: 0,
                    gsi: 24,
                    message: M1
                },
                IrqfdChange::Attach {
                    vector: 2,
                    gsi: 26,
                    message: M2
                },
            ]
        );
    }

    #[test]
    fn kvm_entries_keep_the_irqchip_and_carry_messages() {
        let mut table = GsiRoutingTable::with_irqchip(64);
        let mut device = table.allocate(1).unwrap();
        table.apply(&device.update(0, Some(M2)).unwrap().unwrap());
        let entries = table.kvm_entries();
        // 24 IOAPIC pins (GSI 0 to pin 2, no GSI 2), 15 PIC pins (no
        // cascade), one MSI.
        assert_eq!(entries.len(), 23 + 15 + 1);
        assert!(entries.iter().all(|e| e.gsi != 2));
        let msi = entries
            .iter()
            .find(|e| e.type_ == KVM_IRQ_ROUTING_MSI)
            .unwrap();
        assert_eq!(msi.gsi, 24);
        // SAFETY: an entry of type KVM_IRQ_ROUTING_MSI holds the msi member.
        let (lo, hi, data) =
            unsafe { (msi.u.msi.address_lo, msi.u.msi.address_hi, msi.u.msi.data) };
        assert_eq!((lo, hi, data), (0xfee0_2000, 1, 0x42));
        let pic_slave: Vec<u32> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries hold the irqchip member.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_PIC_SLAVE)
            .map(|e| e.gsi)
            .collect();
        assert_eq!(pic_slave, (8..16).collect::<Vec<_>>());
        // The PIT's GSI 0: IOAPIC pin 2 and PIC master pin 0.
        let gsi0: Vec<(u32, u32)> = entries
            .iter()
            .filter(|e| e.gsi == 0)
            // SAFETY: GSI 0's entries are irqchip entries.
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert_eq!(
            gsi0,
            vec![(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_IOAPIC, 2)]
        );
    }
}
