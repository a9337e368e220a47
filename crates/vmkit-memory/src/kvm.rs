//! Guest memory as KVM memory slots.

use std::any::Any;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{DirtyPages, Error, Result};

/// The memory slots registered with a VM, holding a reference to each mapping so that it
/// stays mapped while the slots exist.
///
/// Keep it alive as long as the VM file descriptor: dropping it early releases this
/// reference (the mappings live on while a [`GuestMemoryMmap`] clone holds them).
#[derive(Debug)]
pub struct MemorySlots {
    // The regions' `Arc<MmapRegion<B>>`, whatever their bitmap type `B`.
    regions: Vec<Arc<dyn Any + Send + Sync>>,
    // Each slot's size in bytes (slot `i` is region `i`).
    sizes: Vec<u64>,
    // The layout the dirty pages are reported in.
    empty: DirtyPages,
    log_dirty: bool,
}

impl MemorySlots {
    /// Number of slots registered (slot numbers are `0..count`).
    pub fn count(&self) -> usize {
        self.regions.len()
    }

    /// Whether the slots were registered with KVM's dirty log on.
    pub fn logs_dirty_pages(&self) -> bool {
        self.log_dirty
    }

    /// The pages the guest wrote since the slots were registered or since the last call, from
    /// KVM's dirty log (`KVM_GET_DIRTY_LOG`, which also clears it), for the `vm` the slots
    /// were registered with. [`Error::DirtyLogOff`] when the slots were registered without it.
    pub fn take_dirty_log(&self, vm: &VmFd) -> Result<DirtyPages> {
        if !self.log_dirty {
            return Err(Error::DirtyLogOff);
        }
        let mut dirty = self.empty.clone();
        for (i, &size) in self.sizes.iter().enumerate() {
            // Slot numbers are bounded by the number of regions, a handful; the sizes were
            // mapped, so they fit in usize.
            let slot = i as u32;
            let bits = vm
                .get_dirty_log(slot, size as usize)
                .map_err(|source| Error::GetDirtyLog { slot, source })?;
            dirty.merge(i, &bits)?;
        }
        Ok(dirty)
    }
}

/// Registers every region of `mem` with `vm` as a memory slot, slots numbered from 0.
pub fn register_memory_slots<B>(vm: &VmFd, mem: &GuestMemoryMmap<B>) -> Result<MemorySlots>
where
    B: Bitmap + Send + Sync + 'static,
{
    register_memory_slots_with(vm, mem, false)
}

/// As [`register_memory_slots`], with KVM's dirty log on every slot when `log_dirty`
/// (`KVM_MEM_LOG_DIRTY_PAGES`; read with [`MemorySlots::take_dirty_log`]). Logging makes KVM
/// write-protect the guest's pages and fault on the first write after each read of the log.
pub fn register_memory_slots_with<B>(
    vm: &VmFd,
    mem: &GuestMemoryMmap<B>,
    log_dirty: bool,
) -> Result<MemorySlots>
where
    B: Bitmap + Send + Sync + 'static,
{
    let mut regions = Vec::with_capacity(mem.num_regions());
    let mut sizes = Vec::with_capacity(mem.num_regions());
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in mem.iter().enumerate() {
        // Slot numbers are bounded by the number of regions, a handful.
        let slot = slot as u32;
        let mapping = region.get_mmap();
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags,
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
        sizes.push(region.len());
    }
    Ok(MemorySlots {
        regions,
        sizes,
        empty: DirtyPages::empty(mem),
        log_dirty,
    })
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
