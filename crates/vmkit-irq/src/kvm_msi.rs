//! MSI vectors as KVM MSI routes, each with its own irqfd.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;

use crate::{EventFdLine, InterruptLine, Irqchip, MsiGsiAllocator, MsiMessage, MsiVectorSink};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An [`MsiVectorSink`] for one PCI function: each vector gets a GSI (from a shared
/// [`MsiGsiAllocator`]) on its first route, a KVM MSI route to the message the guest
/// programmed, and an irqfd, so a device sending the vector injects it in the kernel with no
/// exit to the VMM. A vector the guest has not programmed yet delivers nothing.
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
    irqchip: Arc<Mutex<Irqchip>>,
    gsis: Arc<Mutex<MsiGsiAllocator>>,
    /// vector → (GSI, line); created on the vector's first route.
    vectors: Mutex<HashMap<u16, (u32, EventFdLine)>>,
}

impl std::fmt::Debug for KvmMsiSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vectors = lock(&self.vectors);
        let mut routed: Vec<(u16, u32)> = vectors.iter().map(|(v, (g, _))| (*v, *g)).collect();
        routed.sort_unstable();
        f.debug_struct("KvmMsiSink")
            .field("vector_gsis", &routed)
            .finish_non_exhaustive()
    }
}

impl KvmMsiSink {
    /// A sink routing through `irqchip` of `vm`, taking GSIs from `gsis` (shared by every
    /// function of the VM).
    pub fn new(
        vm: Arc<VmFd>,
        irqchip: Arc<Mutex<Irqchip>>,
        gsis: Arc<Mutex<MsiGsiAllocator>>,
    ) -> Self {
        Self {
            vm,
            irqchip,
            gsis,
            vectors: Mutex::new(HashMap::new()),
        }
    }

    /// The GSI vector `vector` was given, once it has been routed.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        lock(&self.vectors).get(&vector).map(|(gsi, _)| *gsi)
    }
}

impl MsiVectorSink for KvmMsiSink {
    fn update(&self, vector: u16, message: Option<MsiMessage>, _masked: bool) -> io::Result<()> {
        let mut vectors = lock(&self.vectors);
        let gsi = match vectors.get(&vector) {
            Some(&(gsi, _)) => gsi,
            None => {
                // Nothing to remove for a vector that was never routed.
                if message.is_none() {
                    return Ok(());
                }
                let gsi = lock(&self.gsis).allocate().map_err(io::Error::other)?;
                let line = lock(&self.irqchip)
                    .line(&self.vm, gsi)
                    .map_err(io::Error::other)?;
                vectors.insert(vector, (gsi, line));
                gsi
            }
        };
        let mut chip = lock(&self.irqchip);
        match message {
            Some(m) => chip.set_msi_route(&self.vm, gsi, m),
            None => chip.remove_msi_route(&self.vm, gsi),
        }
        .map_err(io::Error::other)
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        match lock(&self.vectors).get(&vector) {
            Some((_, line)) => line.trigger(),
            // No route yet: the guest has not programmed this vector; nothing to deliver.
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IrqchipConfig;

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn vectors_become_routes_with_their_own_gsi() {
        let vm = Arc::new(crate::kvm::tests::vm());
        let chip = Arc::new(Mutex::new(
            Irqchip::new(&vm, IrqchipConfig::default()).unwrap(),
        ));
        let gsis = Arc::new(Mutex::new(MsiGsiAllocator::new(4095)));
        let a = KvmMsiSink::new(vm.clone(), chip.clone(), gsis.clone());
        let b = KvmMsiSink::new(vm, chip.clone(), gsis);
        let m = MsiMessage {
            address: 0xFEE0_0000,
            data: 0x41,
        };
        // Nothing routed, nothing delivered, no GSI spent.
        a.trigger(0).unwrap();
        a.update(0, None, true).unwrap();
        assert_eq!(a.gsi(0), None);
        a.update(0, Some(m), true).unwrap();
        b.update(0, Some(m), false).unwrap();
        // Two functions, two GSIs from the shared allocator, above the IOAPIC pins.
        assert_eq!((a.gsi(0), b.gsi(0)), (Some(24), Some(25)));
        assert_eq!(lock(&chip).routing().msi(24), Some(m));
        a.trigger(0).unwrap();
        // MSI-X disabled: the route goes, the GSI stays the vector's.
        a.update(0, None, true).unwrap();
        assert_eq!(lock(&chip).routing().msi(24), None);
        assert_eq!(a.gsi(0), Some(24));
    }
}
