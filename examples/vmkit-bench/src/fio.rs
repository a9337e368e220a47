//! Host `fio` on the benchmark image: the ceiling the virtio-blk figures are read against.

use std::path::Path;
use std::process::Command;

/// One fio run of `secs` seconds on `img`: (IOPS, MiB/s). `rw` is fio's `--rw`, `bs` its
/// `--bs`; one request at a time runs on psync, more on io_uring.
pub fn run(
    img: &Path,
    (rw, bs, qd): (&str, &str, u32),
    secs: u64,
    direct: bool,
) -> Result<(f64, f64), String> {
    // One request at a time: plain preadv (io_uring would punt buffered reads to its worker
    // threads); more: io_uring. `--invalidate=0` keeps fio from dropping the page cache.
    let engine = if qd == 1 { "psync" } else { "io_uring" };
    let out = Command::new("fio")
        .args(["--name=ceiling", "--invalidate=0", "--time_based"])
        .arg("--output-format=terse")
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--filename={}", img.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--direct={}", u8::from(direct)))
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("fio failed: {err}"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // Terse v3: field 6 is the read bandwidth (KiB/s), field 7 the read IOPS.
    let fields: Vec<&str> = text.trim().split(';').collect();
    let field = |i: usize| -> Result<f64, String> {
        let err = || format!("fio output: {text}{}", String::from_utf8_lossy(&out.stderr));
        fields.get(i).and_then(|v| v.parse().ok()).ok_or_else(err)
    };
    Ok((field(7)?, field(6)? / 1024.0))
}
