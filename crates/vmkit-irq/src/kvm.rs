//! The in-kernel interrupt controllers of KVM (x86_64): PIC, IOAPIC, PIT, GSI routing, irqfd.

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_pit_config,
    kvm_pit_state2, KvmIrqRouting, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_IRQ_ROUTES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;

use crate::{EventFdLine, MsiMessage, IOAPIC_PINS};

/// Errors of the KVM side of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_CREATE_IRQCHIP` failed (it must come before the first vCPU is created).
    #[error("cannot create the in-kernel irqchip (create it before any vCPU): {0}")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT: {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_GSI_ROUTING` failed.
    #[error("cannot set the GSI routing table: {0}")]
    SetRouting(#[source] kvm_ioctls::Error),
    /// More routes than KVM accepts.
    #[error("too many GSI routes: {0} (KVM takes at most {KVM_MAX_IRQ_ROUTES})")]
    TooManyRoutes(usize),
    /// A GSI already has a route of another kind.
    #[error("GSI {0} is already routed")]
    GsiInUse(u32),
    /// `KVM_IRQFD` failed.
    #[error("cannot register an irqfd for GSI {gsi}: {source}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Reading the irqchip, PIT or clock state failed.
    #[error("cannot read the {0} state: {1}")]
    GetState(&'static str, #[source] kvm_ioctls::Error),
    /// KVM refused a saved irqchip, PIT or clock state.
    #[error("cannot restore the {0} state: {1}")]
    SetState(&'static str, #[source] kvm_ioctls::Error),
    /// A saved irqchip state that does not fit this irqchip.
    #[error("invalid irqchip state: {0}")]
    InvalidState(String),
}

/// Result of the KVM functions.
pub type Result<T> = std::result::Result<T, Error>;

/// What to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqchipConfig {
    /// Create the in-kernel i8254 PIT (ports 0x40–0x43, GSI 0). Guests calibrate clocks on it.
    pub pit: bool,
}

impl Default for IrqchipConfig {
    fn default() -> Self {
        Self { pit: true }
    }
}

/// The in-kernel PIC + IOAPIC (+ PIT) of a VM, with the PC's legacy GSI routing.
#[derive(Debug)]
pub struct Irqchip {
    routing: GsiRouting,
    pit: bool,
}

/// Bytes of a `kvm_irqchip`'s chip state (the PIC or IOAPIC registers, padded).
pub const IRQCHIP_STATE_BYTES: usize = 512;

/// The in-kernel interrupt controllers' state and the VM's clock, for snapshots. The PIC and
/// IOAPIC states are KVM's `kvm_irqchip` chip bytes ([`IRQCHIP_STATE_BYTES`] each).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IrqchipState {
    /// The master 8259 PIC.
    pub pic_master: Vec<u8>,
    /// The slave 8259 PIC.
    pub pic_slave: Vec<u8>,
    /// The IOAPIC.
    pub ioapic: Vec<u8>,
    /// The i8254 PIT, when the irqchip has one.
    pub pit: Option<kvm_pit_state2>,
    /// The KVM clock (`KVM_GET_CLOCK`), `KVM_CLOCK_TSC_STABLE` cleared (`KVM_SET_CLOCK`
    /// refuses it).
    pub clock: kvm_clock_data,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

fn get_chip(vm: &VmFd, chip_id: u32, name: &'static str) -> Result<Vec<u8>> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| Error::GetState(name, e))?;
    // SAFETY: every member of the union is plain bytes and integers, so any bit pattern is a
    // valid `dummy` byte array, which spans the whole union.
    let bytes = unsafe { chip.chip.dummy };
    Ok(bytes.iter().map(|b| *b as u8).collect())
}

fn set_chip(vm: &VmFd, chip_id: u32, name: &'static str, bytes: &[u8]) -> Result<()> {
    let mut dummy = [0; IRQCHIP_STATE_BYTES];
    if bytes.len() != dummy.len() {
        return Err(Error::InvalidState(format!(
            "the {name} state has {} bytes, not {IRQCHIP_STATE_BYTES}",
            bytes.len()
        )));
    }
    for (d, s) in dummy.iter_mut().zip(bytes) {
        *d = *s as _;
    }
    let chip = kvm_irqchip {
        chip_id,
        pad: 0,
        chip: kvm_irqchip__bindgen_ty_1 { dummy },
    };
    vm.set_irqchip(&chip).map_err(|e| Error::SetState(name, e))
}

impl Irqchip {
    /// Creates the irqchip (and the PIT) in `vm` and installs the legacy routing table.
    ///
    /// Call before creating vCPUs: KVM attaches each vCPU's LAPIC to the irqchip at creation.
    pub fn new(vm: &VmFd, config: IrqchipConfig) -> Result<Self> {
        vm.create_irq_chip().map_err(Error::CreateIrqchip)?;
        if config.pit {
            let pit = kvm_pit_config {
                // The speaker port (0x61) is emulated as a dummy in the kernel.
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(Error::CreatePit)?;
        }
        let routing = GsiRouting::legacy();
        routing.apply(vm)?;
        Ok(Self {
            routing,
            pit: config.pit,
        })
    }

    /// Reads the PICs, the IOAPIC, the PIT (when created) and the KVM clock, for a snapshot
    /// of a paused VM.
    pub fn save_state(&self, vm: &VmFd) -> Result<IrqchipState> {
        let [master, slave, ioapic] = CHIPS.map(|(id, name)| get_chip(vm, id, name));
        let pit = if self.pit {
            Some(vm.get_pit2().map_err(|e| Error::GetState("PIT", e))?)
        } else {
            None
        };
        let mut clock = vm
            .get_clock()
            .map_err(|e| Error::GetState("KVM clock", e))?;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(IrqchipState {
            pic_master: master?,
            pic_slave: slave?,
            ioapic: ioapic?,
            pit,
            clock,
        })
    }

    /// Writes `state` into this (freshly created) irqchip before any vCPU runs: the PICs, the
    /// IOAPIC, the PIT, and the KVM clock (with the flags KVM gave, as Firecracker does:
    /// where `KVM_CLOCK_REALTIME` is set, KVM moves the clock on by the wall time elapsed
    /// since the save). A state with a PIT for an irqchip without one, or the other way
    /// round, or chip states of the wrong size are errors.
    pub fn restore_state(&self, vm: &VmFd, state: &IrqchipState) -> Result<()> {
        if state.pit.is_some() != self.pit {
            return Err(Error::InvalidState(format!(
                "the state {} a PIT, this irqchip {}",
                if state.pit.is_some() { "has" } else { "lacks" },
                if self.pit { "has one" } else { "has none" }
            )));
        }
        let chips = [&state.pic_master, &state.pic_slave, &state.ioapic];
        for ((id, name), bytes) in CHIPS.iter().zip(chips) {
            set_chip(vm, *id, name, bytes)?;
        }
        if let Some(pit) = &state.pit {
            vm.set_pit2(pit).map_err(|e| Error::SetState("PIT", e))?;
        }
        let mut clock = state.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        vm.set_clock(&clock)
            .map_err(|e| Error::SetState("KVM clock", e))
    }

    /// The routing table as installed.
    pub fn routing(&self) -> &GsiRouting {
        &self.routing
    }

    /// Adds an MSI route for `gsi` and installs the updated table.
    pub fn set_msi_route(&mut self, vm: &VmFd, gsi: u32, msi: MsiMessage) -> Result<()> {
        self.routing.set_msi(gsi, msi)?;
        self.routing.apply(vm)
    }

    /// Removes the MSI route of `gsi` (if any) and installs the updated table.
    pub fn remove_msi_route(&mut self, vm: &VmFd, gsi: u32) -> Result<()> {
        self.routing.remove_msi(gsi);
        self.routing.apply(vm)
    }

    /// Creates an interrupt line for `gsi`: an eventfd registered as a KVM irqfd, so a device
    /// raising it injects the interrupt in the kernel without a VMM exit.
    pub fn line(&self, vm: &VmFd, gsi: u32) -> Result<EventFdLine> {
        let line = EventFdLine::new().map_err(Error::EventFd)?;
        vm.register_irqfd(line.eventfd(), gsi)
            .map_err(|source| Error::Irqfd { gsi, source })?;
        Ok(line)
    }
}

/// A GSI routing table (`KVM_SET_GSI_ROUTING`), kept in the VMM because KVM only takes whole
/// tables.
#[derive(Debug, Clone)]
pub struct GsiRouting {
    entries: Vec<kvm_irq_routing_entry>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouting {
    /// The PC's legacy table: GSIs 0–15 to the two PICs (but GSI 2, the cascade) and GSIs
    /// 0–23 to the IOAPIC, with GSI 0 (the PIT) on IOAPIC pin 2 — the wiring a MADT interrupt
    /// source override "ISA IRQ 0 → GSI 2" describes, as on real PCs and in QEMU.
    pub fn legacy() -> Self {
        let mut entries = Vec::with_capacity(40);
        for gsi in 0..16u32 {
            if gsi == 2 {
                continue;
            }
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_entry(gsi, chip, gsi % 8));
        }
        for gsi in 0..IOAPIC_PINS {
            match gsi {
                0 => entries.push(irqchip_entry(0, KVM_IRQCHIP_IOAPIC, 2)),
                2 => {}
                _ => entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
            }
        }
        Self { entries }
    }

    /// Routes `gsi` to an MSI message, replacing an earlier MSI route for it. A GSI routed to
    /// an irqchip pin cannot become an MSI.
    pub fn set_msi(&mut self, gsi: u32, msi: MsiMessage) -> Result<()> {
        if self
            .entries
            .iter()
            .any(|e| e.gsi == gsi && e.type_ != KVM_IRQ_ROUTING_MSI)
        {
            return Err(Error::GsiInUse(gsi));
        }
        self.entries.retain(|e| e.gsi != gsi);
        if self.entries.len() >= KVM_MAX_IRQ_ROUTES {
            return Err(Error::TooManyRoutes(self.entries.len() + 1));
        }
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msi.address as u32;
        e.u.msi.address_hi = (msi.address >> 32) as u32;
        e.u.msi.data = msi.data;
        self.entries.push(e);
        Ok(())
    }

    /// Removes the MSI route of `gsi`, if any.
    pub fn remove_msi(&mut self, gsi: u32) {
        self.entries
            .retain(|e| !(e.gsi == gsi && e.type_ == KVM_IRQ_ROUTING_MSI));
    }

    /// The (irqchip, pin) routes of `gsi`.
    pub fn irqchip_pins(&self, gsi: u32) -> Vec<(u32, u32)> {
        self.entries
            .iter()
            .filter(|e| e.gsi == gsi && e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: entries of type KVM_IRQ_ROUTING_IRQCHIP are only ever built by
            // `irqchip_entry`, which initialises the `irqchip` member of the union.
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect()
    }

    /// The MSI message of `gsi`, if it has one.
    pub fn msi(&self, gsi: u32) -> Option<MsiMessage> {
        self.entries
            .iter()
            .find(|e| e.gsi == gsi && e.type_ == KVM_IRQ_ROUTING_MSI)
            // SAFETY: entries of type KVM_IRQ_ROUTING_MSI are only ever built by `set_msi`,
            // which initialises the `msi` member of the union.
            .map(|e| unsafe {
                MsiMessage {
                    address: u64::from(e.u.msi.address_lo) | (u64::from(e.u.msi.address_hi) << 32),
                    data: e.u.msi.data,
                }
            })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Installs the table in `vm`.
    pub fn apply(&self, vm: &VmFd) -> Result<()> {
        let table = KvmIrqRouting::from_entries(&self.entries)
            .map_err(|_| Error::TooManyRoutes(self.entries.len()))?;
        vm.set_gsi_routing(&table).map_err(Error::SetRouting)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn legacy_table_wires_the_pit_to_pin_2() {
        let r = GsiRouting::legacy();
        assert_eq!(
            r.irqchip_pins(0),
            vec![(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_IOAPIC, 2)]
        );
        assert!(r.irqchip_pins(2).is_empty());
        assert_eq!(
            r.irqchip_pins(4),
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        assert_eq!(
            r.irqchip_pins(9),
            vec![(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]
        );
        assert_eq!(r.irqchip_pins(23), vec![(KVM_IRQCHIP_IOAPIC, 23)]);
        assert!(r.irqchip_pins(24).is_empty());
        // 15 PIC routes + 23 IOAPIC routes.
        assert_eq!(r.len(), 38);
    }

    #[test]
    fn msi_routes_replace_but_never_steal_pins() {
        let mut r = GsiRouting::legacy();
        let m1 = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        let m2 = MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x22,
        };
        assert!(matches!(r.set_msi(4, m1), Err(Error::GsiInUse(4))));
        r.set_msi(24, m1).unwrap();
        r.set_msi(24, m2).unwrap();
        assert_eq!(r.msi(24), Some(m2));
        assert_eq!(r.len(), 39);
        r.remove_msi(24);
        assert_eq!(r.msi(24), None);
        assert_eq!(r.len(), 38);
    }

    pub(crate) fn vm() -> VmFd {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm exists but cannot be opened");
        kvm.create_vm().expect("KVM_CREATE_VM")
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn irqchip_routes_and_irqfd_on_kvm() {
        let vm = vm();
        let mut chip = Irqchip::new(&vm, IrqchipConfig::default()).unwrap();
        chip.set_msi_route(
            &vm,
            30,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x30,
            },
        )
        .unwrap();
        assert!(chip.routing().msi(30).is_some());
        chip.remove_msi_route(&vm, 30).unwrap();
        assert!(chip.routing().msi(30).is_none());
        let line = chip.line(&vm, 4).unwrap();
        crate::InterruptLine::trigger(&line).unwrap();
        // A second irqchip in the same VM is refused with a clear error.
        let e = Irqchip::new(&vm, IrqchipConfig::default()).unwrap_err();
        assert!(e.to_string().contains("irqchip"), "{e}");
    }

    /// The IOAPIC's redirection entry `pin` in its chip bytes (after base address, IOREGSEL,
    /// ID, IRR and padding: 24 bytes).
    fn redirection(bytes: &mut [u8], pin: usize) -> &mut [u8] {
        &mut bytes[24 + pin * 8..32 + pin * 8]
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn irqchip_state_moves_to_a_fresh_vm() {
        let a = vm();
        let chip_a = Irqchip::new(&a, IrqchipConfig::default()).unwrap();
        // The guest programmed IOAPIC pin 5: vector 0x35, unmasked, level-triggered.
        let mut ioapic = get_chip(&a, KVM_IRQCHIP_IOAPIC, "IOAPIC").unwrap();
        redirection(&mut ioapic, 5).copy_from_slice(&(0x35u64 | 1 << 15).to_le_bytes());
        set_chip(&a, KVM_IRQCHIP_IOAPIC, "IOAPIC", &ioapic).unwrap();
        let saved = chip_a.save_state(&a).unwrap();
        assert_eq!(saved.ioapic, ioapic);
        assert_eq!(saved.clock.flags & KVM_CLOCK_TSC_STABLE, 0);
        let pit = saved.pit.expect("a PIT");

        let b = vm();
        let chip_b = Irqchip::new(&b, IrqchipConfig::default()).unwrap();
        let fresh = chip_b.save_state(&b).unwrap();
        assert_ne!(fresh.ioapic, saved.ioapic);
        chip_b.restore_state(&b, &saved).unwrap();
        let back = chip_b.save_state(&b).unwrap();
        assert_eq!(
            (&back.pic_master, &back.pic_slave, &back.ioapic),
            (&saved.pic_master, &saved.pic_slave, &saved.ioapic)
        );
        let back_pit = back.pit.unwrap();
        for (x, y) in back_pit.channels.iter().zip(pit.channels.iter()) {
            assert_eq!((x.count, x.mode, x.gate), (y.count, y.mode, y.gate));
        }
        assert!(
            back.clock.clock >= saved.clock.clock,
            "the clock goes on from the saved time"
        );
    }

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn a_mismatched_irqchip_state_is_refused() {
        let a = vm();
        let chip = Irqchip::new(&a, IrqchipConfig::default()).unwrap();
        let good = chip.save_state(&a).unwrap();
        let mut short = good.clone();
        short.ioapic.pop();
        assert_eq!(
            chip.restore_state(&a, &short).unwrap_err().to_string(),
            "invalid irqchip state: the IOAPIC state has 511 bytes, not 512"
        );
        let no_pit = IrqchipState {
            pit: None,
            ..good.clone()
        };
        assert_eq!(
            chip.restore_state(&a, &no_pit).unwrap_err().to_string(),
            "invalid irqchip state: the state lacks a PIT, this irqchip has one"
        );
        let b = vm();
        let pitless = Irqchip::new(&b, IrqchipConfig { pit: false }).unwrap();
        assert!(pitless.save_state(&b).unwrap().pit.is_none());
        assert!(pitless.restore_state(&b, &good).is_err());
    }
}
