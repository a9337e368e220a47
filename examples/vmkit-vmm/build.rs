//! `cfg(no_kvm)` where this machine has no /dev/kvm: tests needing KVM then report as ignored;
//! `cfg(not_root)` and `cfg(open_kvm)` (a /dev/kvm anyone may open) likewise for the test
//! that drops privileges to check the message for a /dev/kvm the user cannot open;
//! `cfg(no_landlock)` where the kernel has no Landlock, for the `--landlock` tests.
use std::os::unix::fs::PermissionsExt;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm, not_root, open_kvm, no_landlock)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    match std::fs::metadata("/dev/kvm") {
        Err(_) => println!("cargo::rustc-cfg=no_kvm"),
        Ok(m) if m.permissions().mode() & 0o006 != 0 => println!("cargo::rustc-cfg=open_kvm"),
        Ok(_) => {}
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|uids| uids.split_whitespace().nth(1) == Some("0"));
    if !root {
        println!("cargo::rustc-cfg=not_root");
    }
    if landlock_abi() < 1 {
        println!("cargo::rustc-cfg=no_landlock");
    }
}

/// The kernel's Landlock ABI version (`landlock_create_ruleset(NULL, 0, VERSION)`), or a
/// negative number when it has none (not built in, or not in the `lsm=` list).
fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute pointer and size 0, the VERSION flag only returns the ABI
    // version; nothing is read or written.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    }
}
