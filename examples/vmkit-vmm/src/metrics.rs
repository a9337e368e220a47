//! Metrics, written as one JSON object a line to a file or FIFO: on the API's
//! `FlushMetrics`, every `--metrics-interval` seconds, and when the VM ends.
//!
//! The counters live where they are counted (each device's, injected into it when it is
//! built; the VMM's own here); this module only reads and writes them.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// A group of counters, read when a line is written.
pub trait MetricsSource: Send + Sync {
    /// The counters now, as JSON (an object of numbers).
    fn read(&self) -> Value;
}

impl<F: Fn() -> Value + Send + Sync> MetricsSource for F {
    fn read(&self) -> Value {
        self()
    }
}

/// The metrics writer.
pub struct Metrics {
    out: Option<File>,
    interval: Option<Duration>,
    next: Option<Instant>,
    sources: Vec<(String, Arc<dyn MetricsSource>)>,
}

impl Metrics {
    /// Writes every `interval` (none: only when asked) once a destination is set.
    pub fn new(interval: Option<Duration>) -> Self {
        Self {
            out: None,
            interval,
            next: None,
            sources: Vec::new(),
        }
    }

    /// Where the lines go (`--metrics-file`, `PUT /metrics`); a second destination is
    /// refused, as Firecracker does.
    pub fn set_destination(&mut self, path: &Path) -> Result<(), String> {
        if self.out.is_some() {
            return Err("metrics are already configured".into());
        }
        let file = crate::logger::open_append(path)
            .map_err(|e| format!("cannot open metrics file {}: {e}", path.display()))?;
        self.out = Some(file);
        self.next = self.interval.map(|i| Instant::now() + i);
        Ok(())
    }

    /// Adds a group, written under `name`.
    pub fn add(&mut self, name: impl Into<String>, source: Arc<dyn MetricsSource>) {
        self.sources.push((name.into(), source));
    }

    /// One line now (nothing without a destination).
    pub fn flush(&mut self) -> Result<(), String> {
        let Some(out) = self.out.as_mut() else {
            return Err("metrics are not configured (PUT /metrics or --metrics-file)".into());
        };
        let mut line = Map::new();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        line.insert("utc_timestamp_ms".into(), Value::from(ms));
        for (name, source) in &self.sources {
            line.insert(name.clone(), source.read());
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        // A FIFO nobody reads (EAGAIN) loses this line, never stalls the VMM.
        out.write_all(text.as_bytes())
            .map_err(|e| format!("cannot write metrics: {e}"))
    }

    /// Milliseconds until the next periodic line (`None`: none is due).
    pub fn due_in(&self) -> Option<Duration> {
        self.next
            .map(|n| n.saturating_duration_since(Instant::now()))
    }

    /// Writes the periodic line if it is due.
    pub fn tick(&mut self) {
        let (Some(next), Some(interval)) = (self.next, self.interval) else {
            return;
        };
        if Instant::now() >= next {
            if let Err(e) = self.flush() {
                log::warn!("{e}");
            }
            self.next = Some(Instant::now() + interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_writes_one_line_with_every_group() {
        let dir = std::env::temp_dir().join(format!("vmkit-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let _ = std::fs::remove_file(&path);
        let mut m = Metrics::new(None);
        assert!(m.flush().unwrap_err().contains("not configured"));
        m.add("blk0", Arc::new(|| serde_json::json!({"requests": 3})));
        m.set_destination(&path).unwrap();
        assert!(m.set_destination(&path).is_err());
        m.flush().unwrap();
        m.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["blk0"]["requests"], 3);
        assert!(lines[0]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert_eq!(m.due_in(), None);
    }

    #[test]
    fn a_line_every_interval() {
        let dir = std::env::temp_dir().join(format!("vmkit-metrics-tick-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let _ = std::fs::remove_file(&path);
        let mut m = Metrics::new(Some(Duration::from_millis(20)));
        m.set_destination(&path).unwrap();
        m.tick();
        assert!(
            std::fs::read_to_string(&path).unwrap().is_empty(),
            "not due yet"
        );
        assert!(m.due_in().unwrap() <= Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(25));
        m.tick();
        m.tick();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert!(
            m.due_in().unwrap() > Duration::from_millis(10),
            "the next one is an interval away"
        );
    }
}
