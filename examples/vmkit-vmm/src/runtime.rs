//! The running VM: the event loop, and what the host does to the VM while it runs — the
//! API's calls, pause and resume, shutdown signals and their grace period, metrics.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmkit_api::model::{
    ActionType, DriveUpdate, InstanceState, MachineConfig, NetworkInterfaceUpdate, SnapshotCreate,
    VmStateRequest,
};
use vmkit_api::{ApiCall, ApiRequest, ApiResponse};
use vmkit_kvm::VcpuThreads;
use vmkit_legacy::{EventFdExit, ExitNotifier, ExitReason, Ged, I8042};
use vmkit_memory::GuestRam;
use vmkit_virtio::VirtioDevice;
use vmm_sys_util::epoll::EventSet;

use crate::devices::{SharedBlock, SharedNet, Subscriber};
use crate::host::Host;
use crate::signals;

/// How long a pause may take before it is given up (the VM then runs on).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Wakes the event loop when an fd becomes readable; the loop then reads it itself (the
/// API's eventfd, the signalfd), before it waits again.
struct Doorbell(RawFd);

impl MutEventSubscriber for Doorbell {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.0, EventSet::IN)) {
            log::error!("cannot watch fd {}: {e}", self.0);
        }
    }
}

/// What the loop drives, besides the host.
pub struct Parts {
    /// The event loop, with the exit watcher in it.
    pub events: EventManager<Subscriber>,
    /// The subscribers that touch guest memory (the queue handlers), taken out of the loop
    /// while the VM is paused.
    pub guest_facing: Vec<Subscriber>,
    /// The operator's input into the serial port and the console (it only buffers) and the
    /// drains of the guest's output: they stay in the loop (the console escape works, and
    /// output written before a pause keeps flowing, while paused).
    pub host_input: Vec<Subscriber>,
    /// The virtio devices, quiesced at a pause.
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice<GuestRam>>>>,
    /// The vCPU threads.
    pub threads: VcpuThreads,
    /// Where the VM's end is reported.
    pub exit: Arc<EventFdExit>,
    /// The keyboard controller, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI Generic Event Device, for the power button.
    pub ged: Arc<Mutex<Ged>>,
    /// What `GET /machine-config` reports.
    pub machine: MachineConfig,
    /// The disks by `drive_id`, for `PATCH /drives/{id}`.
    pub drives: Vec<(String, SharedBlock)>,
    /// The network cards by `iface_id`, for `PATCH /network-interfaces/{id}`.
    pub nets: Vec<(String, SharedNet)>,
    /// `--landlock` restricts what may be opened.
    pub landlocked: bool,
    /// What a snapshot reads.
    pub sources: crate::snapshot::Sources,
}

/// A running VM.
pub struct Running {
    parts: Parts,
    /// The guest-facing subscribers' IDs while they are in the loop (`None`: paused).
    guest_ids: Option<Vec<SubscriberId>>,
    /// A shutdown signal being served.
    shutdown: Option<Shutdown>,
}

/// How long after the power button Ctrl-Alt-Del follows, for a guest that did not act on
/// the button (no ACPI, or nothing handling it).
const CTRL_ALT_DEL_AFTER: Duration = Duration::from_secs(2);

/// A shutdown signal being served.
#[derive(Debug, Clone, Copy)]
struct Shutdown {
    /// Which signal.
    signal: libc::c_int,
    /// When Ctrl-Alt-Del is due (`None`: sent).
    ctrl_alt_del: Option<Instant>,
    /// When the grace period ends.
    deadline: Instant,
}

impl Running {
    /// Puts the host's fds and, unless the VM starts `paused`, the guest-facing
    /// subscribers into the loop.
    pub fn new(mut parts: Parts, host: &Host, paused: bool) -> Self {
        parts.events.add_subscriber(Arc::new(Mutex::new(Doorbell(
            std::os::fd::AsRawFd::as_raw_fd(&host.signals),
        ))));
        if let Some(fd) = host.api_fd() {
            parts
                .events
                .add_subscriber(Arc::new(Mutex::new(Doorbell(fd))));
        }
        for input in &parts.host_input {
            parts.events.add_subscriber(input.clone());
        }
        let mut running = Self {
            parts,
            guest_ids: None,
            shutdown: None,
        };
        if paused {
            // A restored device served what its queues held as it started: finish that, as
            // a pause does, before anything reads guest memory.
            running.quiesce_devices();
            log::info!("paused: resume with PATCH /vm {{\"state\": \"Resumed\"}}");
        } else {
            running.readd();
        }
        running
    }

    /// Runs until the VM ends; returns why, the vCPU threads to stop, and the machine (to
    /// drop once they are stopped).
    pub fn until_end(
        mut self,
        host: &mut Host,
    ) -> (ExitReason, VcpuThreads, crate::snapshot::Sources) {
        let end = loop {
            if let Some(end) = self.parts.exit.reason() {
                break end;
            }
            let timeout = self.timeout(host);
            if let Err(e) = self.parts.events.run_with_timeout(timeout) {
                self.end(ExitReason::Failed(format!("event loop: {e}")));
            }
            for call in host.pending_calls() {
                self.serve(call, host);
            }
            while let Some(sig) = host.signals.take() {
                self.on_signal(sig, host);
            }
            self.check_grace_period(host);
            host.metrics.tick();
        };
        (end, self.parts.threads, self.parts.sources)
    }

    fn end(&self, reason: ExitReason) {
        self.parts.exit.notify_exit(reason);
    }

    /// Milliseconds until the next deadline (Ctrl-Alt-Del, the grace period, the metrics),
    /// or -1.
    fn timeout(&self, host: &Host) -> i32 {
        let now = Instant::now();
        let grace = self.shutdown.map(|s| {
            let next = s.ctrl_alt_del.map_or(s.deadline, |c| c.min(s.deadline));
            next.saturating_duration_since(now)
        });
        let next = match (grace, host.metrics.due_in()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map_or(-1, |d| i32::try_from(d.as_millis() + 1).unwrap_or(i32::MAX))
    }

    fn state(&self) -> InstanceState {
        match self.guest_ids {
            Some(_) => InstanceState::Running,
            None => InstanceState::Paused,
        }
    }

    fn serve(&mut self, call: ApiCall, host: &mut Host) {
        let answer = match host.answer_common(&call.request) {
            Some(a) => a,
            None => self.answer(&call.request, host),
        };
        host.respond(call, answer);
    }

    fn answer(&mut self, request: &ApiRequest, host: &Host) -> ApiResponse {
        let refused = |e: String| ApiResponse::error(400, e);
        let done = |r: Result<(), String>| r.map_or_else(refused, |()| ApiResponse::no_content());
        match request {
            ApiRequest::GetInstanceInfo => host.info(self.state()),
            ApiRequest::GetMachineConfig => ApiResponse::ok(&self.parts.machine),
            ApiRequest::PatchVm(VmStateRequest::Paused) => done(self.pause()),
            ApiRequest::PatchVm(VmStateRequest::Resumed) => done(self.resume()),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => done(self.ctrl_alt_del()),
            ApiRequest::Action(ActionType::InstanceStart) => {
                refused("the microVM is already running".into())
            }
            ApiRequest::PatchDrive(update) => done(self.patch_drive(update)),
            ApiRequest::PatchNetworkInterface(update) => done(self.patch_net(update)),
            ApiRequest::CreateSnapshot(request) => done(self.create_snapshot(request)),
            ApiRequest::LoadSnapshot(_) => refused(
                "a snapshot can only be loaded into a new vmkit process, before it is configured"
                    .into(),
            ),
            _ => refused(
                "the requested operation is not supported after starting the microVM".into(),
            ),
        }
    }

    /// Stops the guest where it is: first its devices' events (no guest memory is touched
    /// from then on, once in-flight I/O is completed), then the vCPUs.
    pub fn pause(&mut self) -> Result<(), String> {
        let Some(ids) = self.guest_ids.take() else {
            return Ok(());
        };
        for id in ids {
            // Each ID was returned by add_subscriber and removed only here.
            let _ = self.parts.events.remove_subscriber(id);
        }
        if let Err(e) = self.parts.threads.pause(PAUSE_TIMEOUT) {
            self.readd();
            return Err(format!("cannot pause the vCPUs: {e}"));
        }
        self.quiesce_devices();
        log::info!("paused");
        Ok(())
    }

    /// Every virtio device completes what it has in flight (nothing touches guest memory
    /// afterwards until it is served again).
    fn quiesce_devices(&self) {
        for device in &self.parts.devices {
            device.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    fn readd(&mut self) {
        let ids = self
            .parts
            .guest_facing
            .iter()
            .map(|s| self.parts.events.add_subscriber(s.clone()))
            .collect();
        self.guest_ids = Some(ids);
    }

    /// Runs the guest again: the devices' events first (what the guest queued while paused is
    /// served), then the vCPUs.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.guest_ids.is_some() {
            return Ok(());
        }
        self.readd();
        self.parts.threads.resume();
        log::info!("resumed");
        Ok(())
    }

    /// `PATCH /drives/{id}` on the running VM: the disk gets a new rate limiter (the buckets
    /// given replace its own), and serves a new image (the guest gets a configuration-change
    /// interrupt with its capacity).
    fn patch_drive(&mut self, update: &DriveUpdate) -> Result<(), String> {
        let id = &update.drive_id;
        if self.guest_ids.is_none() {
            // The swap completes requests and takes new ones: guest memory would change.
            return Err(format!(
                "drive {id}: resume the microVM before changing its drive"
            ));
        }
        let (_, disk) = self
            .parts
            .drives
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| format!("drive {id}: no such drive"))?;
        let mut disk = disk.lock().unwrap_or_else(|p| p.into_inner());
        // The image first: a PATCH that fails changes nothing (the limiter is not applied
        // when the new image cannot be opened).
        if let Some(path) = &update.path_on_host {
            let landlocked = self.parts.landlocked;
            disk.replace_disk(std::path::PathBuf::from(path))
                .map_err(|e| crate::landlock::drive_error(landlocked, id, path, &e))?;
            log::info!("drive {id} now serves {path}");
        }
        let limiter = crate::limits::update(update.rate_limiter.as_ref());
        if !limiter.is_keep() {
            disk.update_rate_limiter(limiter);
            let now = disk.rate_limiter().config();
            log::info!("drive {id}: rate limiter {now:?}");
        }
        // What a snapshot taken from now on records.
        let snapshots = &mut self.parts.sources.snapshots;
        let image = update.path_on_host.as_ref().map(|p| snapshots.cwd.join(p));
        let limiter = disk.rate_limiter().config();
        snapshots.spec.patch_drive(id, image, limiter);
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` on the running VM: new rate limiters (the buckets
    /// given replace the card's own); what they held is served at once.
    fn patch_net(&mut self, update: &NetworkInterfaceUpdate) -> Result<(), String> {
        let id = &update.iface_id;
        if self.guest_ids.is_none() {
            return Err(format!(
                "interface {id}: resume the microVM before changing its interface"
            ));
        }
        let (_, net) = self
            .parts
            .nets
            .iter()
            .find(|(n, _)| n == id)
            .ok_or_else(|| format!("interface {id}: no such interface"))?;
        let mut net = net.lock().unwrap_or_else(|p| p.into_inner());
        // Only the directions, and in them the buckets, the PATCH gives change.
        let rx = crate::limits::update(update.rx_rate_limiter.as_ref());
        let tx = crate::limits::update(update.tx_rate_limiter.as_ref());
        net.update_rate_limiters(rx, tx);
        let (rx, tx) = (
            net.rx_rate_limiter().config(),
            net.tx_rate_limiter().config(),
        );
        log::info!("interface {id}: rate limiters rx {rx:?} tx {tx:?}");
        self.parts.sources.snapshots.spec.patch_net(id, rx, tx);
        Ok(())
    }

    /// `PUT /snapshot/create`: only while paused (no device or vCPU changes memory).
    fn create_snapshot(&mut self, request: &SnapshotCreate) -> Result<(), String> {
        if self.guest_ids.is_some() {
            return Err("pause the microVM before creating a snapshot".into());
        }
        self.quiesce_devices();
        let created =
            crate::snapshot::create(&mut self.parts.sources, &self.parts.threads, request)?;
        log::info!(
            "snapshot {} created: {} bytes of memory written in {} µs",
            request.snapshot_path,
            created.memory_bytes,
            created.micros
        );
        Ok(())
    }

    fn ctrl_alt_del(&mut self) -> Result<(), String> {
        let mut i8042 = self.parts.i8042.lock().unwrap_or_else(|p| p.into_inner());
        i8042
            .send_ctrl_alt_del()
            .map_err(|e| format!("cannot send Ctrl-Alt-Del: {e}"))
    }

    /// The first shutdown signal asks the guest to shut down (resuming it if paused): the
    /// ACPI power button at once, for guests that handle it, then Ctrl-Alt-Del on the i8042
    /// (after [`CTRL_ALT_DEL_AFTER`], or half the grace period if shorter), for guests without
    /// ACPI. The second signal, or the end of the grace period, stops it.
    fn on_signal(&mut self, sig: libc::c_int, host: &Host) {
        let name = signals::name(sig);
        if self.shutdown.is_some() {
            self.end(ExitReason::Stopped(format!(
                "{name}, a second shutdown signal"
            )));
            return;
        }
        let grace = host.shutdown_timeout;
        log::warn!(
            "{name}: asking the guest to shut down (ACPI power button, then Ctrl-Alt-Del), {} s before it is stopped",
            grace.as_secs()
        );
        let _ = self.resume();
        let pressed = self
            .parts
            .ged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .power_button();
        if let Err(e) = pressed {
            log::warn!("cannot press the power button: {e}");
        }
        let now = Instant::now();
        self.shutdown = Some(Shutdown {
            signal: sig,
            ctrl_alt_del: Some(now + CTRL_ALT_DEL_AFTER.min(grace / 2)),
            // `--shutdown-timeout` is bounded (a day), so this does not overflow.
            deadline: now + grace,
        });
    }

    /// Sends the delayed Ctrl-Alt-Del, and stops the VM at the end of the grace period.
    fn check_grace_period(&mut self, host: &Host) {
        let Some(shutdown) = self.shutdown.as_mut() else {
            return;
        };
        let now = Instant::now();
        if shutdown.ctrl_alt_del.is_some_and(|at| now >= at) {
            shutdown.ctrl_alt_del = None;
            if let Err(e) = self.ctrl_alt_del() {
                log::warn!("{e}");
            }
        }
        if let Some(s) = &self.shutdown {
            if now >= s.deadline {
                self.end(ExitReason::Stopped(format!(
                    "{}: the guest did not shut down within {} s",
                    signals::name(s.signal),
                    host.shutdown_timeout.as_secs()
                )));
            }
        }
    }
}
