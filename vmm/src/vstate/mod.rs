//! KVM VM state: the VM and its memslots, guest memory, the system structures
//! written before boot, and the vCPU entry state.

pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vm;
