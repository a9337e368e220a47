//! Host `fio` on the benchmark image: the ceiling the virtio-blk figures are read against.
//! For O_DIRECT it also runs with I/O buffers in huge pages (`--mem=shmhuge`) when the host
//! has a hugetlb pool: on some hosts buffers of 4 KiB pages (fio's default, malloc) cost
//! O_DIRECT enough that they are no ceiling.

use std::path::Path;
use std::process::Command;

/// Where fio's I/O buffers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// `--mem=malloc` (fio's default): 4 KiB pages.
    Malloc,
    /// `--mem=shmhuge`: SysV shared memory from the hugetlb pool.
    HugeTlb,
}

impl Buffers {
    /// The column heading.
    pub fn label(self) -> &'static str {
        match self {
            Buffers::Malloc => "host fio (malloc buffers)",
            Buffers::HugeTlb => "host fio (hugetlb buffers)",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Buffers::Malloc => "--mem=malloc",
            Buffers::HugeTlb => "--mem=shmhuge",
        }
    }
}

/// The largest buffer set a workload needs: 32 requests of 128 KiB, and a huge page of slack
/// for fio's alignment.
const LARGEST_BUFFERS: u64 = 32 * (128 << 10) + (2 << 20);

/// Free bytes in the host's hugetlb pool (`HugePages_Free` × `Hugepagesize`).
pub fn hugetlb_free() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") * 1024
}

/// The fio runs for O_DIRECT: malloc buffers, and huge-page buffers if the pool can hold
/// them; and a sentence saying which.
pub fn direct_buffers() -> (Vec<Buffers>, String) {
    let free = hugetlb_free();
    if free >= LARGEST_BUFFERS {
        let say = format!(
            "Host fio with O_DIRECT ran twice: with malloc'd buffers (4 KiB pages) and with \
             buffers from the hugetlb pool (`--mem=shmhuge`, {} MiB free).",
            free >> 20
        );
        return (vec![Buffers::Malloc, Buffers::HugeTlb], say);
    }
    let say = format!(
        "Host fio with O_DIRECT used malloc'd buffers (4 KiB pages): this host's hugetlb pool \
         has {} MiB free, less than the {} MiB `--mem=shmhuge` needs \
         (`/proc/sys/vm/nr_hugepages`); such buffers need not be a ceiling.",
        free >> 20,
        LARGEST_BUFFERS.div_ceil(1 << 20)
    );
    (vec![Buffers::Malloc], say)
}

/// One fio run of `secs` seconds on `img`: (IOPS, MiB/s). `rw` is fio's `--rw`, `bs` its
/// `--bs`; one request at a time runs on psync, more on io_uring.
pub fn run(
    img: &Path,
    (rw, bs, qd): (&str, &str, u32),
    secs: u64,
    direct: bool,
    buffers: Buffers,
) -> Result<(f64, f64), String> {
    // One request at a time: plain preadv (io_uring would punt buffered reads to its worker
    // threads); more: io_uring. `--invalidate=0` keeps fio from dropping the page cache.
    let engine = if qd == 1 { "psync" } else { "io_uring" };
    let out = Command::new("fio")
        .args(["--name=ceiling", "--invalidate=0", "--time_based"])
        .args(["--output-format=terse", buffers.arg()])
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
        return Err(format!("fio {} failed: {err}", buffers.arg()));
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
