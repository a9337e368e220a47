//! `cfg(not_root)` when the tests do not run as root (or without /dev/net/tun): the tests that
//! create TAP interfaces in a network namespace of their own then report as ignored.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(not_root)");
    println!("cargo::rerun-if-changed=build.rs");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|uids| uids.split_whitespace().nth(1) == Some("0"));
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        println!("cargo::rustc-cfg=not_root");
    }
}
