//! The VMM's logger: the `log` facade of every crate, to stderr or a file (or FIFO), its
//! level and format changeable while the VM runs (`PUT /logger`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How lines look and where they go.
struct Sink {
    out: Box<dyn Write + Send>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

/// The installed logger; cloning gives another handle on it.
#[derive(Clone)]
pub struct Logger {
    sink: Arc<Mutex<Sink>>,
}

struct Facade(Arc<Mutex<Sink>>);

impl log::Log for Facade {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = &sink.module {
            if !record.target().starts_with(m.as_str()) {
                return;
            }
        }
        let mut line = String::from("vmkit: ");
        if sink.show_level {
            line.push_str(&format!("{} ", record.level()));
        }
        line.push_str(record.target());
        if sink.show_origin {
            let file = record.file().unwrap_or("?");
            line.push_str(&format!(" {file}:{}", record.line().unwrap_or(0)));
        }
        line.push_str(&format!(": {}\n", record.args()));
        // A log that cannot be written is dropped: logging must never stop the VM.
        let _ = sink.out.write_all(line.as_bytes());
        let _ = sink.out.flush();
    }

    fn flush(&self) {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = sink.out.flush();
    }
}

/// Opens a log or metrics destination: appended to if it is a file (created if missing),
/// written without blocking if it is a FIFO (opened for reading too, as Firecracker does, so
/// that opening succeeds while nobody reads it yet; what does not fit is dropped).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

impl Logger {
    /// Installs the logger for the whole process, at `level`, to `file` or stderr.
    pub fn install(level: log::LevelFilter, file: Option<&Path>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match file {
            Some(p) => Box::new(open_append(p)?),
            None => Box::new(std::io::stderr()),
        };
        let sink = Arc::new(Mutex::new(Sink {
            out,
            show_level: true,
            show_origin: false,
            module: None,
        }));
        // Fails only if a logger is installed already (a second call): keep that one.
        let _ = log::set_boxed_logger(Box::new(Facade(sink.clone())));
        log::set_max_level(level);
        Ok(Self { sink })
    }

    /// `PUT /logger`: what the request gives changes, the rest stays.
    pub fn configure(&self, c: &vmkit_api::model::Logger) -> std::io::Result<()> {
        let out = c
            .log_path
            .as_deref()
            .map(|p| open_append(Path::new(p)))
            .transpose()?;
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(out) = out {
            sink.out = Box::new(out);
        }
        if let Some(level) = c.level {
            log::set_max_level(level.filter());
        }
        if let Some(show) = c.show_level {
            sink.show_level = show;
        }
        if let Some(show) = c.show_log_origin {
            sink.show_origin = show;
        }
        if c.module.is_some() {
            sink.module = c.module.clone();
        }
        Ok(())
    }
}
