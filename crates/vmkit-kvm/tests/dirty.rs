//! Dirty page tracking and memory files on this host's KVM: the pages a guest writes (KVM's
//! dirty log) and those written through vm-memory (the regions' bitmaps) come back from
//! `Machine::take_dirty_pages`, exactly, once; a full memory file plus the diff of those
//! pages rebuilds the RAM; a machine whose RAM is mapped from a memory file runs a guest
//! without writing to the file. Reported as ignored where there is no /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::fs::File;
use vmm_sys_util::tempfile::TempFile;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_boot::EntryPoint;
use vmkit_bus::pio_range;
use vmkit_kvm::{Error, Machine, MachineConfig, VcpuConfig, Vcpus};
use vmkit_legacy::{ExitReason, I8042, I8042_GSI, I8042_PORT, I8042_PORT_COUNT};
use vmkit_memory::snapshot::{overlay, write_dirty, write_full};
use vmkit_memory::GuestRam;
use vmkit_vcpu::CpuTemplate;

fn tracked_machine() -> Machine {
    let config = MachineConfig {
        track_dirty_pages: true,
        ..MachineConfig::new(64 << 20)
    };
    Machine::new(&config).expect("a VM on this host's KVM")
}

/// One vCPU of `m` starting at `code`, placed at 1 MiB (32-bit protected mode, as a PVH
/// entry), with the i8042 on the bus so that the code can end the VM with a reset pulse.
fn one_vcpu_running(m: &Machine, code: &[u8]) -> Vcpus {
    let config = VcpuConfig {
        count: 1,
        template: CpuTemplate::Host,
    };
    let vcpus = Vcpus::create(m.kvm(), m.vm(), &config).unwrap();
    let i8042 = I8042::new(m.exit().clone(), m.line(I8042_GSI).unwrap());
    m.bus()
        .register_pio(
            pio_range(I8042_PORT, I8042_PORT_COUNT).unwrap(),
            Arc::new(Mutex::new(i8042)),
        )
        .unwrap();
    let entry = GuestAddress(0x10_0000);
    m.memory().write_slice(code, entry).unwrap();
    let pvh = EntryPoint::Pvh {
        entry,
        start_info: GuestAddress(0x6000),
    };
    vcpus.set_entry(m.memory(), pvh).unwrap();
    vcpus
}

/// A new file in the temporary directory (vmm-sys-util's `TempFile`, removed when dropped)
/// and a handle on it.
fn temp_file(name: &str) -> (TempFile, File) {
    let prefix = std::env::temp_dir().join(format!("vmkit-kvm-dirty-{name}-"));
    let tmp = TempFile::new_with_prefix(prefix).unwrap();
    let file = tmp.as_file().try_clone().unwrap();
    (tmp, file)
}

/// Every byte of `mem`, regions concatenated (as a memory file lays them out).
fn ram_bytes(mem: &GuestRam) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// Waits for the guest to end the VM with a reset, and stops the vCPU threads.
fn run_to_reset(m: &Machine, vcpus: Vcpus) {
    let threads = vcpus.start(m.bus().clone(), m.exit().clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.exit().reason().is_none() {
        assert!(Instant::now() < deadline, "the guest never reset");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(m.exit().reason(), Some(ExitReason::Reset));
    threads.stop();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_and_device_writes_are_the_dirty_pages_and_are_taken_once() {
    let m = tracked_machine();
    // 32-bit code: mov dword [0x200000], 1; mov dword [0x305ffe], 2 (across a page
    // boundary: two pages); mov al, 0xFE; out 0x64, al (reset); jmp $.
    let code = [
        0xC7, 0x05, 0x00, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0x00, //
        0xC7, 0x05, 0xFE, 0x5F, 0x30, 0x00, 0x02, 0x00, 0x00, 0x00, //
        0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE,
    ];
    let vcpus = one_vcpu_running(&m, &code);
    // The set-up wrote the code, the page tables, the GDT: taken away before the run.
    let setup = m.take_dirty_pages().unwrap();
    assert!(
        setup.is_dirty(GuestAddress(0x10_0000)),
        "the code was written"
    );
    assert_eq!(m.take_dirty_pages().unwrap().count(), 0, "cleared");

    // A full memory file of the state before the run.
    let (base_path, base) = temp_file("base");
    write_full(m.memory(), &base).unwrap();
    run_to_reset(&m, vcpus);
    // A device-style write through vm-memory.
    m.memory().write_obj(3u8, GuestAddress(0x40_0000)).unwrap();

    let dirty = m.take_dirty_pages().unwrap();
    assert_eq!(
        dirty.file_ranges(),
        vec![
            0x20_0000..0x20_1000,
            0x30_5000..0x30_7000,
            0x40_0000..0x40_1000
        ],
        "exactly the pages written"
    );
    assert_eq!(
        m.take_dirty_pages().unwrap().count(),
        0,
        "both logs cleared"
    );

    // The base file plus a diff of exactly those pages is the RAM as it is now.
    let (_diff_path, diff) = temp_file("diff");
    let stats = write_dirty(m.memory(), &diff, &dirty).unwrap();
    assert_eq!(stats.pages_written, 4);
    let restored = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig {
        file: Some(base_path.as_path().to_path_buf()),
        ..vmkit_memory::MemoryConfig::new(64 << 20)
    })
    .unwrap();
    assert_eq!(
        restored.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
        0
    );
    overlay(&restored, &diff, &stats.ranges).unwrap();
    assert_eq!(
        restored.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
        1
    );
    assert!(
        ram_bytes(&restored) == ram_bytes(m.memory()),
        "RAM rebuilt exactly"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_machine_on_a_memory_file_runs_its_guest_privately() {
    // The guest's code and a counter at 0x200000, in a memory file.
    let code = [
        0xFF, 0x05, 0x00, 0x00, 0x20, 0x00, // inc dword [0x200000]
        0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE, // mov al, 0xFE; out 0x64, al; jmp $
    ];
    let first = Machine::new(&MachineConfig::new(64 << 20)).unwrap();
    first
        .memory()
        .write_slice(&code, GuestAddress(0x10_0000))
        .unwrap();
    first
        .memory()
        .write_obj(41u32, GuestAddress(0x20_0000))
        .unwrap();
    let (path, file) = temp_file("machine");
    write_full(first.memory(), &file).unwrap();
    drop(first);

    let mut config = MachineConfig::new(64 << 20);
    config.memory.file = Some(path.as_path().to_path_buf());
    let m = Machine::new(&config).unwrap();
    assert_eq!(
        m.memory().read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
        41
    );
    // The code comes again with the entry state (the same bytes as in the file).
    let vcpus = one_vcpu_running(&m, &code);
    run_to_reset(&m, vcpus);
    assert_eq!(
        m.memory().read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
        42
    );
    let mut word = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut word, 0x20_0000).unwrap();
    assert_eq!(u32::from_le_bytes(word), 41, "the file is untouched");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dirty_pages_without_tracking_are_an_error() {
    let m = Machine::new(&MachineConfig::new(64 << 20)).unwrap();
    let e = m.take_dirty_pages().unwrap_err();
    assert!(
        matches!(e, Error::Memory(vmkit_memory::Error::DirtyLogOff)),
        "{e}"
    );
    assert!(e.to_string().contains("tracking is off"), "{e}");
}
