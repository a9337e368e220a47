//! Guest memory as KVM memory slots.

use std::any::Any;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// The memory slots registered with a VM, holding a reference to each mapping so that it
/// stays mapped while the slots exist.
///
/// Keep it alive as long as the VM file descriptor: dropping it early releases this
/// reference (the mappings live on while a [`GuestMemoryMmap`] clone holds them).
#[derive(Debug)]
pub struct MemorySlots {
    // The regions' `Arc<MmapRegion<B>>`, whatever their bitmap type `B`.
    regions: Vec<Arc<dyn Any + Send + Sync>>,
}

impl MemorySlots {
    /// Number of slots registered (slot numbers are `0..count`).
    pub fn count(&self) -> usize {
        self.regions.len()
    }
}

/// Registers every region of `mem` with `vm` as a memory slot, slots numbered from 0.
pub fn register_memory_slots<B>(vm: &VmFd, mem: &GuestMemoryMmap<B>) -> Result<MemorySlots>
where
    B: Bitmap + Send + Sync + 'static,
{
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        // Slot numbers are bounded by the number of regions, a handful.
        let slot = slot as u32;
        let mapping = region.get_mmap();
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr` and `memory_size` describe a live mapping of exactly that
        // size owned by `mapping`, an `Arc` this function keeps in the returned `MemorySlots`;
        // the regions of a `GuestMemoryMmap` never overlap, so no two slots alias.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            Error::SetMemoryRegion {
                slot,
                addr: region.start_addr().0,
                size: region.len(),
                source,
            }
        })?;
        let mapping: Arc<dyn Any + Send + Sync> = mapping;
        regions.push(mapping);
    }
    Ok(MemorySlots { regions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MMIO_GAP_START;
    use crate::{create_guest_memory, MemoryConfig};

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn regions_become_slots() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm exists but cannot be opened");
        let vm = kvm.create_vm().unwrap();
        let mem = create_guest_memory(&MemoryConfig::new(MMIO_GAP_START + (2 << 20))).unwrap();
        let slots = register_memory_slots(&vm, &mem).unwrap();
        assert_eq!(slots.count(), 2);
    }
}
