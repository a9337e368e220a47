//! Requests handed from the API thread to the VMM's thread, which owns the VM.
//!
//! The VMM polls [`ApiReceiver::eventfd`] in its event loop and answers each [`ApiCall`];
//! the API thread waits for the answer, so requests are served one at a time and in order.

use std::sync::mpsc;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::request::{ApiRequest, ApiResponse};
use crate::server::Handler;
use crate::{Error, Result};

/// A request waiting for the VMM's answer.
#[derive(Debug)]
pub struct ApiCall {
    /// What the client asked.
    pub request: ApiRequest,
    reply: mpsc::Sender<ApiResponse>,
}

impl ApiCall {
    /// Sends the answer back to the client.
    pub fn respond(self, response: ApiResponse) {
        // The API thread went away: nobody is left to answer.
        let _ = self.reply.send(response);
    }
}

/// The API thread's end: a [`Handler`] that forwards each request to the VMM's thread.
#[derive(Debug)]
pub struct ApiSender {
    calls: mpsc::Sender<ApiCall>,
    wake: EventFd,
}

/// The VMM's end.
#[derive(Debug)]
pub struct ApiReceiver {
    calls: mpsc::Receiver<ApiCall>,
    wake: EventFd,
}

/// A connected pair.
///
/// # Errors
///
/// [`Error::Io`] if the eventfd cannot be created.
pub fn channel() -> Result<(ApiSender, ApiReceiver)> {
    let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
    let (tx, rx) = mpsc::channel();
    let sender = ApiSender {
        calls: tx,
        wake: wake.try_clone().map_err(Error::Io)?,
    };
    Ok((sender, ApiReceiver { calls: rx, wake }))
}

impl Handler for ApiSender {
    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        let (tx, rx) = mpsc::channel();
        let call = ApiCall { request, reply: tx };
        if self.calls.send(call).is_err() || self.wake.write(1).is_err() {
            return ApiResponse::error(503, "the VMM is not taking requests");
        }
        rx.recv()
            .unwrap_or_else(|_| ApiResponse::error(503, "the VMM ended before it answered"))
    }
}

impl ApiReceiver {
    /// Readable when calls wait; poll it in the VMM's event loop.
    pub fn eventfd(&self) -> &EventFd {
        &self.wake
    }

    /// The calls waiting now (clears the eventfd).
    pub fn pending(&self) -> Vec<ApiCall> {
        let _ = self.wake.read();
        self.calls.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_crosses_to_the_vmm_and_its_answer_comes_back() {
        let (mut tx, rx) = channel().unwrap();
        let vmm = std::thread::spawn(move || loop {
            let calls = rx.pending();
            if let Some(call) = calls.into_iter().next() {
                assert_eq!(call.request, ApiRequest::GetVersion);
                call.respond(ApiResponse::error(400, "x"));
                return;
            }
            std::thread::yield_now();
        });
        assert_eq!(tx.handle(ApiRequest::GetVersion).status, 400);
        vmm.join().unwrap();
        // The VMM's end is gone: a clear 503, not a hang.
        assert_eq!(tx.handle(ApiRequest::GetVersion).status, 503);
    }

    #[test]
    fn a_call_the_vmm_drops_unanswered_gets_503_not_a_hang() {
        let (mut tx, rx) = channel().unwrap();
        let vmm = std::thread::spawn(move || loop {
            if let Some(call) = rx.pending().into_iter().next() {
                drop(call);
                return;
            }
            std::thread::yield_now();
        });
        assert_eq!(tx.handle(ApiRequest::GetInstanceInfo).status, 503);
        vmm.join().unwrap();
    }
}
