//! `cfg(no_kvm)` where this machine has no /dev/kvm: tests needing KVM then report as ignored.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("cargo::rustc-cfg=no_kvm")
    }
}
