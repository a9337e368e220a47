//! A snapshot's guest memory: the memory file written under a temporary name and published
//! (renamed into place) only once the state file that names it is written; the layers a
//! diff builds on; the diffs read over a restored base; memory files opened as untrusted
//! paths (a FIFO or a device there is an error, not a hang).

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmkit_api::model::{SnapshotCreate, SnapshotType};
use vmkit_kvm::Machine;
use vmkit_snapshot::vm::{MemoryLayer, MemoryRecord, MAX_LAYERS, PAGE_SIZE};

use super::Sources;

/// A memory file written under its temporary name, not yet in place.
pub struct Written {
    /// The layers the snapshot's memory is made of, this one last.
    pub record: MemoryRecord,
    /// Bytes of guest memory written.
    pub bytes: u64,
    temporary: PathBuf,
    path: PathBuf,
}

impl Written {
    /// Renames the file into place and syncs its directory (the state file naming it is
    /// written: a crash before this leaves the old pair, after it the new one).
    pub fn publish(self) -> Result<MemoryRecord, String> {
        let bad = |e: std::io::Error| format!("memory file {}: {e}", self.path.display());
        std::fs::rename(&self.temporary, &self.path).map_err(bad)?;
        sync_directory(&self.path).map_err(bad)?;
        Ok(self.record)
    }

    /// Removes the temporary file (the snapshot failed).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.temporary);
    }
}

/// Syncs the directory holding `path`, so a rename into it survives a crash.
fn sync_directory(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Whether `a` and `b` name the same file (the same path, or the same inode).
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What a request may not do: a diff without tracking, without a snapshot to build on, on
/// too many layers, or over a file it is layered on; the state and memory in one file.
fn check(src: &Sources, request: &SnapshotCreate, path: &Path, state: &Path) -> Result<(), String> {
    let layers = &src.snapshots.layers;
    if same_file(path, state) {
        return Err("snapshot_path and mem_file_path name the same file".into());
    }
    if request.snapshot_type != SnapshotType::Diff {
        return Ok(());
    }
    if !src.snapshots.track_dirty {
        return Err("a diff snapshot needs dirty page tracking (track_dirty_pages)".into());
    }
    if layers.is_empty() {
        return Err("a diff snapshot needs a snapshot before it: take a full one first".into());
    }
    if layers.len() >= MAX_LAYERS {
        return Err(format!(
            "{} memory files already layered: take a full snapshot",
            layers.len()
        ));
    }
    match layers.iter().find(|l| same_file(&l.path, path)) {
        Some(l) => Err(format!(
            "mem_file_path {} is a memory file this diff builds on",
            l.path.display()
        )),
        None => Ok(()),
    }
}

/// A temporary name beside `path` no one else uses (this process's id, the time).
fn temporary_name(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{nanos}.tmp", std::process::id()));
    PathBuf::from(name)
}

/// Creates a new file (never an existing one, never through a symbolic link).
fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes guest memory for `request` (a full memory file, or the pages dirtied since the
/// last snapshot) under a temporary name beside `mem_file_path`; `state` is the state
/// file's path. Paths are made absolute against `src`'s directory (as they are recorded).
pub fn write(src: &Sources, request: &SnapshotCreate) -> Result<Written, String> {
    let cwd = &src.snapshots.cwd;
    let path = cwd.join(&request.mem_file_path);
    check(src, request, &path, &cwd.join(&request.snapshot_path))?;
    let diff = request.snapshot_type == SnapshotType::Diff;
    // Cleared at every snapshot: a diff holds what changed since the last one.
    let dirty = src
        .snapshots
        .track_dirty
        .then(|| src.machine.take_dirty_pages())
        .transpose()
        .map_err(|e| format!("dirty pages: {e}"))?;
    let temporary = temporary_name(&path);
    let bad = |e: &dyn std::fmt::Display| format!("memory file {}: {e}", path.display());
    let file = create_new(&temporary).map_err(|e| bad(&e))?;
    let memory = src.machine.memory();
    let stats = match (diff, &dirty) {
        (true, Some(dirty)) => vmkit_memory::snapshot::write_dirty(memory, &file, dirty),
        _ => vmkit_memory::snapshot::write_full(memory, &file),
    };
    let stats = stats.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        bad(&e)
    })?;
    let mut layers = match diff {
        true => src.snapshots.layers.clone(),
        false => Vec::new(),
    };
    layers.push(MemoryLayer {
        path: path.clone(),
        ranges: diff.then_some(stats.ranges),
    });
    Ok(Written {
        record: MemoryRecord {
            size: vmkit_memory::snapshot::file_size(memory),
            layers,
        },
        bytes: stats.pages_written * PAGE_SIZE,
        temporary,
        path,
    })
}

/// Opens a file a snapshot names for reading: a regular file only (a FIFO would block the
/// open, a device is not a memory file).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads the diffs above the base layer (mapped by the machine) into `machine`'s memory,
/// in order.
pub fn overlay_diffs(machine: &Machine, layers: &[MemoryLayer]) -> Result<(), String> {
    for layer in layers.iter().skip(1) {
        let path = layer.path.display();
        let file = open_regular(&layer.path).map_err(|e| format!("memory file {path}: {e}"))?;
        let ranges = layer.ranges.as_deref().unwrap_or_default();
        vmkit_memory::snapshot::overlay(machine.memory(), &file, ranges)
            .map_err(|e| format!("memory file {path}: {e}"))?;
    }
    Ok(())
}
