//! Where the guest's output goes (stdout, `file=PATH`, the console's pty), behind
//! vmkit-legacy's bounded, non-blocking [`OutputSink`]: the sinks are made with the devices
//! and connected by the last stage of the build ([`Outputs::open`]), so a start that fails
//! earlier leaves an existing output file untouched; the event loop drains them
//! ([`OutputDrain`]) and the metrics count what they dropped.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmkit_legacy::{OutputSink, OutputSinkConfig};

use crate::config::OutputFile;
use crate::devices::Subscriber;
use crate::error::{Error, Result};
use crate::io::OutputDrain;
use crate::metrics::MetricsSource;

/// How long the end of the run waits for a reader that stopped reading.
const FINAL_STALL: Duration = Duration::from_secs(1);

/// Where a sink is connected by [`Outputs::open`].
enum Target {
    Stdout,
    File {
        what: &'static str,
        path: PathBuf,
    },
    /// Connected when made (the console's pty).
    Connected,
}

/// The VM's output sinks.
pub struct Outputs {
    capacity: usize,
    /// Each sink, its metrics group and where it goes.
    sinks: Vec<(String, OutputSink, Target)>,
}

impl Outputs {
    /// No sinks yet; each will buffer at most `capacity` bytes (`--output-buffer`).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            sinks: Vec::new(),
        }
    }

    fn sink(&mut self, name: &str, max_bytes: Option<u64>, target: Target) -> Result<OutputSink> {
        let sink = OutputSink::new(OutputSinkConfig {
            name: name.replace('_', " "),
            capacity: self.capacity,
            max_bytes,
        })
        .map_err(Error::EventFd)?;
        self.sinks.push((name.to_string(), sink.clone(), target));
        Ok(sink)
    }

    /// The sink for stdout, one for every device writing there (their output interleaves in
    /// order).
    pub fn stdout(&mut self) -> Result<OutputSink> {
        let shared = self
            .sinks
            .iter()
            .find(|(_, _, t)| matches!(t, Target::Stdout));
        match shared {
            Some((_, sink, _)) => Ok(sink.clone()),
            None => self.sink("stdout", None, Target::Stdout),
        }
    }

    /// A sink for `file`, opened by [`open`](Self::open); `name` is its metrics group
    /// (`serial_file`, `console_file`).
    pub fn file(
        &mut self,
        name: &str,
        what: &'static str,
        file: &OutputFile,
    ) -> Result<OutputSink> {
        let target = Target::File {
            what,
            path: file.path.clone(),
        };
        self.sink(name, file.max_size, target)
    }

    /// A sink connected to `fd` now (the console's pty master: non-blocking already).
    pub fn connected(&mut self, name: &str, fd: OwnedFd) -> Result<OutputSink> {
        let sink = self.sink(name, None, Target::Connected)?;
        sink.connect(fd).map_err(Error::Console)?;
        Ok(sink)
    }

    /// The last stage of the build: opens the output files (created if missing, never
    /// through a symbolic link) and stdout's own non-blocking description, then truncates the
    /// files, then connects the sinks. Every file is opened before any is truncated, so a file
    /// that cannot be opened leaves the others as they were. Nothing may fail after this but
    /// starting the vCPUs.
    pub fn open(&self) -> Result<()> {
        let mut opened = Vec::with_capacity(self.sinks.len());
        for (_, sink, target) in &self.sinks {
            let (what, path, fd) = match target {
                Target::Connected => continue,
                Target::Stdout => (
                    "stdout",
                    Path::new("-"),
                    vmkit_legacy::reopen_nonblocking(std::io::stdout().as_fd()),
                ),
                Target::File { what, path } => (*what, path.as_path(), open_output(path)),
            };
            let open_error = move |source| Error::Open {
                what,
                path: path.display().to_string(),
                source,
            };
            opened.push((sink, fd.map_err(open_error)?, open_error));
        }
        for (_, fd, open_error) in &opened {
            truncate(fd).map_err(open_error)?;
        }
        for (sink, fd, open_error) in opened {
            sink.connect(fd).map_err(open_error)?;
        }
        Ok(())
    }

    /// The event-loop subscribers that write what waits once the descriptors take it.
    pub fn drains(&self) -> Vec<Subscriber> {
        self.sinks
            .iter()
            .map(|(_, sink, _)| -> Subscriber {
                Arc::new(Mutex::new(OutputDrain::new(sink.clone())))
            })
            .collect()
    }

    /// Each sink's counters as a metrics group: `{"bytes", "dropped_bytes",
    /// "buffered_bytes", "would_block"}`.
    pub fn metrics(&self) -> Vec<(String, Arc<dyn MetricsSource>)> {
        self.sinks
            .iter()
            .map(|(name, sink, _)| {
                let sink = sink.clone();
                let source: Arc<dyn MetricsSource> = Arc::new(move || {
                    let s = sink.stats();
                    serde_json::json!({
                        "bytes": s.written, "dropped_bytes": s.dropped,
                        "buffered_bytes": s.buffered, "would_block": s.would_block,
                    })
                });
                (name.clone(), source)
            })
            .collect()
    }

    /// At the end of the run: writes what still waits while the readers make progress.
    pub fn finish(&self) {
        for (_, sink, _) in &self.sinks {
            sink.finish(FINAL_STALL);
        }
    }
}

/// Opens `path` for writing, created if missing, not truncated yet ([`truncate`]):
/// close-on-exec, a symbolic link refused (`O_NOFOLLOW`), non-blocking (a FIFO there never
/// blocks the start or the sink; one with no reader yet is an error, `ENXIO`).
fn open_output(path: &Path) -> std::io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::new(
                e.kind(),
                "it is a symbolic link, which is refused (name the file it points to)",
            ),
            Some(libc::ENXIO) => std::io::Error::new(
                e.kind(),
                "it is a FIFO nobody reads: start its reader first",
            ),
            _ => e,
        })?;
    Ok(file.into())
}

/// Empties `fd` if it is a regular file (a FIFO, a terminal or a device is written as is).
fn truncate(fd: &OwnedFd) -> std::io::Result<()> {
    let file = File::from(fd.try_clone()?);
    if file.metadata()?.is_file() {
        file.set_len(0)?;
    }
    Ok(())
}
