//! The host's side of a VM: the ways an operator reaches the VMM (the API socket, signals,
//! the log, metrics), and the API's answers that do not depend on the VM's state.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmkit_api::model::{ActionType, InstanceInfo, InstanceState, Version};
use vmkit_api::{ApiCall, ApiReceiver, ApiRequest, ApiResponse, ApiServer, Limits, ServerThread};

use crate::config::Args;
use crate::error::{Error, Result};
use crate::logger::Logger;
use crate::metrics::Metrics;
use crate::sandbox::Sandbox;
use crate::signals::Signals;

/// The API: its server thread and the VMM's end of its channel.
struct Api {
    server: ServerThread,
    calls: ApiReceiver,
}

/// Counters of the API, for the metrics.
#[derive(Debug, Default)]
struct ApiCounters {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// What the operator side brings to a run.
pub struct Host {
    api: Option<Api>,
    api_counters: Arc<ApiCounters>,
    /// SIGTERM, SIGINT, SIGHUP.
    pub signals: Signals,
    /// The log.
    pub logger: Logger,
    /// The metrics.
    pub metrics: Metrics,
    /// `--id`.
    pub id: String,
    /// `--shutdown-timeout`.
    pub shutdown_timeout: Duration,
    /// The seccomp filters and `--user`, for the VM's start.
    pub sandbox: Sandbox,
}

impl Host {
    /// Opens the API socket (`--api-sock`) and the metrics file; `signals` must have been
    /// blocked before any thread started. The API thread installs its filter from
    /// `sandbox` first.
    pub fn open(args: &Args, signals: Signals, logger: Logger, sandbox: Sandbox) -> Result<Self> {
        let interval =
            (args.metrics_interval > 0).then(|| Duration::from_secs(args.metrics_interval));
        let mut host = Self {
            api: None,
            api_counters: Arc::default(),
            signals,
            logger,
            metrics: Metrics::new(interval),
            id: args.id.clone(),
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            sandbox,
        };
        let counters = host.api_counters.clone();
        host.metrics.add(
            "api",
            Arc::new(move || {
                serde_json::json!({
                    "requests": counters.requests.load(Ordering::Relaxed),
                    "errors": counters.errors.load(Ordering::Relaxed),
                })
            }),
        );
        if let Some(path) = &args.metrics_file {
            host.metrics.set_destination(path).map_err(Error::Metrics)?;
        }
        if let Some(path) = &args.api_sock {
            let (sender, calls) = vmkit_api::channel()?;
            let prologue = host.sandbox.api_prologue();
            let server = ApiServer::bind(path, Limits::default())?.spawn_with(sender, prologue)?;
            log::info!("API on {}", path.display());
            host.api = Some(Api { server, calls });
        }
        Ok(host)
    }

    /// Whether the API is served.
    pub fn has_api(&self) -> bool {
        self.api.is_some()
    }

    /// The fd that becomes readable when API calls wait (none without the API).
    pub fn api_fd(&self) -> Option<std::os::fd::RawFd> {
        self.api.as_ref().map(|a| a.calls.eventfd().as_raw_fd())
    }

    /// The API calls waiting now.
    pub fn pending_calls(&self) -> Vec<ApiCall> {
        let calls = self
            .api
            .as_ref()
            .map(|a| a.calls.pending())
            .unwrap_or_default();
        let n = calls.len() as u64;
        self.api_counters.requests.fetch_add(n, Ordering::Relaxed);
        calls
    }

    /// Sends `response` to `call`, counting errors.
    pub fn respond(&self, call: ApiCall, response: ApiResponse) {
        if response.status >= 400 {
            self.api_counters.errors.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "API {:?}: {} {}",
                call.request,
                response.status,
                response.body.as_deref().unwrap_or("")
            );
        }
        call.respond(response);
    }

    /// `GET /` for a VM in `state`.
    pub fn info(&self, state: InstanceState) -> ApiResponse {
        ApiResponse::ok(&InstanceInfo {
            app_name: "vmkit".into(),
            id: self.id.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// The answer to `request` when it does not depend on the VM (the version, the logger,
    /// the metrics); `None` for the others.
    pub fn answer_common(&mut self, request: &ApiRequest) -> Option<ApiResponse> {
        let refused = |e: String| ApiResponse::error(400, e);
        Some(match request {
            ApiRequest::GetVersion => ApiResponse::ok(&Version {
                firecracker_version: env!("CARGO_PKG_VERSION").into(),
            }),
            ApiRequest::PutLogger(c) => match self.logger.configure(c) {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => refused(format!("cannot open the log: {e}")),
            },
            ApiRequest::PutMetrics(m) => {
                match self.metrics.set_destination(m.metrics_path.as_ref()) {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => refused(e),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) => match self.metrics.flush() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => refused(e),
            },
            _ => return None,
        })
    }
}

impl Drop for Host {
    /// Stops the API server (its socket file is removed) and writes the last metrics line.
    /// Calls still waiting get a 503 and the VMM's end of the channel goes first, so that the
    /// server's thread, which may be waiting for an answer, can finish.
    fn drop(&mut self) {
        if let Some(Api { server, calls }) = self.api.take() {
            for call in calls.pending() {
                call.respond(ApiResponse::error(503, "the microVM has ended"));
            }
            drop(calls);
            server.stop();
        }
        // Without a destination there is nothing to write.
        let _ = self.metrics.flush();
    }
}
