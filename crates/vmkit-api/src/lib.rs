//! A Firecracker-compatible REST API for KVM VMMs.
//!
//! - [`model`]: the request bodies and the `--config-file` layout of Firecracker's API, as
//!   serde types that refuse unknown fields.
//! - [`ApiRequest::parse`]: method, path and body to a typed request (or a 400 with
//!   Firecracker's `{"fault_message": ...}` body).
//! - [`ApiServer`]: HTTP/1.1 on a Unix socket, on its own thread, non-blocking: slow,
//!   half-closed and many clients cost a connection slot each and nothing more.
//! - [`mod@channel`]: hands each request to the VMM's thread, which owns the VM, and its answer
//!   back.
//!
//! The crate knows nothing of KVM or devices: a VMM maps [`ApiRequest`]s to its own
//! configuration.
//!
//! ```
//! use std::io::{Read, Write};
//! use vmkit_api::{ApiRequest, ApiResponse, ApiServer, Limits};
//!
//! let dir = std::env::temp_dir().join(format!("vmkit-api-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("api.sock");
//! let server = ApiServer::bind(&path, Limits::default()).unwrap();
//! let thread = server
//!     .spawn(|request: ApiRequest| match request {
//!         ApiRequest::GetVersion => ApiResponse::ok(&vmkit_api::model::Version {
//!             firecracker_version: "0.1.0".into(),
//!         }),
//!         other => ApiResponse::error(400, format!("not here: {other:?}")),
//!     })
//!     .unwrap();
//! let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
//! client
//!     .write_all(b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
//!     .unwrap();
//! let mut answer = String::new();
//! client.read_to_string(&mut answer).unwrap();
//! assert!(answer.starts_with("HTTP/1.1 200 OK"));
//! assert!(answer.ends_with(r#"{"firecracker_version":"0.1.0"}"#));
//! thread.stop();
//! ```

pub mod channel;
mod error;
pub mod http;
pub mod model;
mod request;
mod server;
mod strict_json;

pub use channel::{channel, ApiCall, ApiReceiver, ApiSender};
pub use error::{Error, Result};
pub use request::{ApiError, ApiRequest, ApiResponse};
pub use server::{ApiServer, Handler, Limits, ServerThread, MAX_PENDING_OUTPUT};
