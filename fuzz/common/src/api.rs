//! `vmkit-api`: a client's byte stream through the HTTP parser, the router and the
//! response renderer, as the API server's connection handling runs them, and the same
//! bytes as a `--config-file`.
//!
//! The input is a body limit, a list of chunk sizes and the stream. The stream arrives in
//! chunks of those sizes (cycled; mostly small, up to 8 KiB); after each chunk the
//! growing buffer is parsed with [`http::parse`] until it needs more, as
//! `server.rs`'s `Conn::answer` does: a complete request is drained from the buffer,
//! routed through [`ApiRequest::parse`], answered (a `GET` with a model value, a `PUT` or
//! `PATCH` with its own body echoed as JSON, an error with Firecracker's body) and
//! rendered with [`http::render`]; an error or a request without keep-alive ends the
//! connection. The stream, and the whole input, are also parsed with
//! [`VmConfig::from_json`].
//!
//! Oracles, besides "never panics":
//! - `Complete(req, n)`: `0 < n <= buf.len()` (0 would spin the server),
//!   `n <= MAX_HEAD_BYTES + max_body`, `req.body.len() <= max_body`;
//! - the same request (method, path, body, keep-alive) and length are parsed from the
//!   whole rest of the stream at once as from the chunks; a stream the chunks refuse is
//!   refused whole too;
//! - an error's status is 400 or 417;
//! - `Partial` only while the buffer is at most `MAX_HEAD_BYTES + max_body` bytes (past
//!   that the request must be complete or refused: the server relies on it);
//! - a request [`ApiRequest::parse`] accepts carries a path ID equal to its body's, and
//!   its model value serialised with `serde_json` parses back, through the same method and
//!   path, to an equal request;
//! - every rendered response parses as HTTP/1.1 (`httparse::Response`) with the status
//!   given, a `Content-Length` equal to its body's length, and the body given, nothing
//!   after it; the `100 Continue` interim response likewise;
//! - a config file that parses serialises and parses back to an equal value.

use arbitrary::{Arbitrary, Unstructured};
use vmkit_api::http::{self, Parsed, Request, DEFAULT_MAX_BODY_BYTES, MAX_HEAD_BYTES};
use vmkit_api::model::{
    InstanceAction, InstanceInfo, InstanceState, MachineConfig, Version, VmConfig, VmStateChange,
};
use vmkit_api::{ApiRequest, ApiResponse};

use crate::seeds::up_to;

/// The fuzzer's input.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input<'a> {
    /// The body limit: with bit 15 set, Firecracker's default
    /// ([`DEFAULT_MAX_BODY_BYTES`]); else the low 15 bits.
    pub max_body: u16,
    /// Chunk sizes, cycled (see [`chunk_len`]); none: the stream in one piece.
    #[arbitrary(with = up_to::<u8, 16>)]
    pub chunks: Vec<u8>,
    /// The rest of the input: the bytes the client sends.
    pub stream: &'a [u8],
}

impl Input<'_> {
    /// The body limit this input asks for.
    pub fn max_body(&self) -> usize {
        if self.max_body & 0x8000 != 0 {
            DEFAULT_MAX_BODY_BYTES
        } else {
            usize::from(self.max_body)
        }
    }

    /// The bytes that decode to this input (its inverse, for seeds).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.chunks.len() <= 16, "at most 16 chunk sizes");
        let mut out = self.max_body.to_le_bytes().to_vec();
        out.push(self.chunks.len() as u8);
        out.extend_from_slice(&self.chunks);
        out.extend_from_slice(self.stream);
        out
    }
}

/// The size of a chunk of code `c`: 1 to 8129 bytes, quadratic so that most codes give
/// a few bytes (heads split anywhere) and some give several KiB (whole bodies).
pub fn chunk_len(c: u8) -> usize {
    1 + usize::from(c) * usize::from(c) / 8
}

/// What a run reached, for the tests.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// The requests the router accepted, in order.
    pub accepted: Vec<ApiRequest>,
    /// Complete requests the router refused.
    pub refused: usize,
    /// The HTTP parser's refusal's status, if it refused the stream.
    pub http_error: Option<u16>,
    /// Whether `100 Continue` was sent.
    pub continued: bool,
    /// Whether the stream or the whole input parsed as a config file.
    pub config: bool,
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode), and parses the bytes as a config file.
pub fn fuzz(data: &[u8]) {
    run_bytes(data);
}

fn run_bytes(data: &[u8]) -> Outcome {
    let mut outcome = match Input::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => run(&input),
        Err(_) => Outcome::default(),
    };
    outcome.config |= config_file(data);
    outcome
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input<'_>) -> Outcome {
    let mut outcome = connection(input);
    outcome.config = config_file(input.stream);
    outcome
}

/// The stream through a connection, chunk by chunk.
fn connection(input: &Input<'_>) -> Outcome {
    let max_body = input.max_body();
    let stream = input.stream;
    let mut outcome = Outcome::default();
    let mut buf: Vec<u8> = Vec::new();
    // Where `buf` starts in the stream, and how much of the stream was received.
    let mut start = 0;
    let mut received = 0;
    let mut sizes = input.chunks.iter().copied().cycle();
    while received < stream.len() {
        let n = sizes
            .next()
            .map_or(stream.len(), chunk_len)
            .min(stream.len() - received);
        buf.extend_from_slice(&stream[received..received + n]);
        received += n;
        // `Conn::answer`: every complete request in the buffer.
        loop {
            match http::parse(&buf, max_body) {
                Ok(Parsed::Complete(request, used)) => {
                    check_complete(&request, used, buf.len(), max_body);
                    check_at_once(&stream[start..], max_body, &request, used);
                    buf.drain(..used);
                    start += used;
                    let response = answer(&request, &mut outcome);
                    let bytes = http::render(response.status, response.body.as_deref(), true);
                    check_rendered(&bytes, &response);
                    if !request.keep_alive {
                        return outcome;
                    }
                }
                Ok(Parsed::Partial { expect_continue }) => {
                    assert!(
                        buf.len() <= MAX_HEAD_BYTES + max_body,
                        "Partial for a buffer of {} bytes, over the head limit {MAX_HEAD_BYTES} \
                         plus the body limit {max_body}",
                        buf.len()
                    );
                    if expect_continue && !outcome.continued {
                        outcome.continued = true;
                        check_rendered_bytes(http::CONTINUE, 100, None);
                    }
                    break;
                }
                Err(e) => {
                    assert!(
                        e.status == 400 || e.status == 417,
                        "HTTP error with status {}: {}",
                        e.status,
                        e.message
                    );
                    assert!(
                        http::parse(&stream[start..], max_body).is_err(),
                        "the chunks' buffer is refused ({e}), the whole stream is not"
                    );
                    outcome.http_error = Some(e.status);
                    let response = ApiResponse::error(e.status, e.message);
                    let bytes = http::render(response.status, response.body.as_deref(), false);
                    check_rendered(&bytes, &response);
                    return outcome;
                }
            }
        }
    }
    outcome
}

/// What a `Complete` promises about its request and length.
fn check_complete(request: &Request, used: usize, buf_len: usize, max_body: usize) {
    assert!(
        used > 0 && used <= buf_len,
        "Complete took {used} bytes of a buffer of {buf_len}"
    );
    assert!(
        used <= MAX_HEAD_BYTES + max_body,
        "Complete took {used} bytes, over the head limit plus the body limit {max_body}"
    );
    assert!(
        request.body.len() <= max_body,
        "a body of {} bytes passed the limit of {max_body}",
        request.body.len()
    );
}

/// The request parsed from the chunks is the one parsed from the whole rest at once.
fn check_at_once(rest: &[u8], max_body: usize, request: &Request, used: usize) {
    match http::parse(rest, max_body) {
        Ok(Parsed::Complete(whole, n)) => {
            assert_eq!(
                (&whole, n),
                (request, used),
                "the whole stream parses to another request than its chunks"
            );
        }
        other => {
            panic!("the chunks parse to {request:?} ({used} bytes), the whole stream to {other:?}")
        }
    }
}

/// Routes a complete request and answers it as a VMM would.
fn answer(request: &Request, outcome: &mut Outcome) -> ApiResponse {
    match ApiRequest::parse(&request.method, &request.path, &request.body) {
        Ok(api) => {
            check_request(&request.method, &request.path, &api);
            let response = respond(&api);
            outcome.accepted.push(api);
            response
        }
        Err(e) => {
            outcome.refused += 1;
            let response = ApiResponse::from(e);
            assert_eq!(response.status, 400, "{response:?}");
            response
        }
    }
}

/// A VMM's answer: model values for `GET`s, the request's own value echoed for the
/// configuration requests (so that fuzzed strings reach the response body), 204 for the
/// actions.
fn respond(api: &ApiRequest) -> ApiResponse {
    match api {
        ApiRequest::GetInstanceInfo => ApiResponse::ok(&InstanceInfo {
            app_name: "vmkit".into(),
            id: "fuzz".into(),
            state: InstanceState::NotStarted,
            vmm_version: "0.1.0".into(),
        }),
        ApiRequest::GetVersion => ApiResponse::ok(&Version {
            firecracker_version: "0.1.0".into(),
        }),
        ApiRequest::GetMachineConfig => ApiResponse::ok(&MachineConfig::default()),
        ApiRequest::Action(_) | ApiRequest::PatchVm(_) => ApiResponse::no_content(),
        other => match model_json(other) {
            Some(json) => ApiResponse {
                status: 200,
                body: Some(json),
            },
            None => ApiResponse::error(500, "no model value"),
        },
    }
}

/// The body that states `api` again: its model value as JSON (the wrapper object for
/// actions and state changes); `None` for the `GET`s.
pub fn model_json(api: &ApiRequest) -> Option<String> {
    let json = match api {
        ApiRequest::GetInstanceInfo | ApiRequest::GetVersion | ApiRequest::GetMachineConfig => {
            return None
        }
        ApiRequest::PutMachineConfig(v) => serde_json::to_string(v),
        ApiRequest::PutBootSource(v) => serde_json::to_string(v),
        ApiRequest::PutDrive(v) => serde_json::to_string(v),
        ApiRequest::PatchDrive(v) => serde_json::to_string(v),
        ApiRequest::PutNetworkInterface(v) => serde_json::to_string(v),
        ApiRequest::PatchNetworkInterface(v) => serde_json::to_string(v),
        ApiRequest::PutVsock(v) => serde_json::to_string(v),
        ApiRequest::PutEntropy(v) => serde_json::to_string(v),
        ApiRequest::Action(a) => serde_json::to_string(&InstanceAction { action_type: *a }),
        ApiRequest::PatchVm(s) => serde_json::to_string(&VmStateChange { state: *s }),
        ApiRequest::PutLogger(v) => serde_json::to_string(v),
        ApiRequest::PutMetrics(v) => serde_json::to_string(v),
        ApiRequest::CreateSnapshot(v) => serde_json::to_string(v),
        ApiRequest::LoadSnapshot(v) => serde_json::to_string(v),
    };
    Some(json.unwrap_or_else(|e| panic!("{api:?} does not serialise: {e}")))
}

/// What an accepted request promises: the path's ID is the body's, and its value
/// serialised parses back to it through the same method and path.
pub fn check_request(method: &str, path: &str, api: &ApiRequest) {
    let id = match api {
        ApiRequest::PutDrive(d) => Some(&d.drive_id),
        ApiRequest::PatchDrive(d) => Some(&d.drive_id),
        ApiRequest::PutNetworkInterface(n) => Some(&n.iface_id),
        ApiRequest::PatchNetworkInterface(n) => Some(&n.iface_id),
        _ => None,
    };
    if let Some(id) = id {
        let segment = path.strip_suffix('/').unwrap_or(path).rsplit('/').next();
        assert_eq!(
            segment,
            Some(id.as_str()),
            "{method} {path} accepted with the ID {id:?}"
        );
    }
    if let Some(json) = model_json(api) {
        let again = ApiRequest::parse(method, path, json.as_bytes());
        assert_eq!(
            again.as_ref(),
            Ok(api),
            "{method} {path}: {api:?} serialised as {json} parses back to another value"
        );
    }
}

/// The rendered `response` is HTTP with its status, length and body.
fn check_rendered(bytes: &[u8], response: &ApiResponse) {
    check_rendered_bytes(bytes, response.status, response.body.as_deref());
}

/// `bytes` parse as one HTTP/1.1 response with `status`, a `Content-Length` equal to the
/// body's length, and `body` (none: empty) after the head, nothing more.
pub fn check_rendered_bytes(bytes: &[u8], status: u16, body: Option<&str>) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "rendered response {:?} does not parse: {other:?}",
            String::from_utf8_lossy(bytes)
        ),
    };
    assert_eq!(parsed.version, Some(1), "not HTTP/1.1");
    assert_eq!(parsed.code, Some(status), "status");
    let lengths: Vec<&[u8]> = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    let body = body.unwrap_or("").as_bytes();
    if status != 100 {
        let length = std::str::from_utf8(lengths.first().copied().unwrap_or_default())
            .ok()
            .and_then(|s| s.parse::<usize>().ok());
        assert!(
            lengths.len() == 1 && length == Some(body.len()),
            "Content-Length {:?} for a body of {} bytes",
            lengths,
            body.len()
        );
    }
    assert_eq!(&bytes[head..], body, "the response's body");
}

/// `text` as a config file; on success, its value serialised parses back to it. Returns
/// whether it parsed.
pub fn config_file(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    let Ok(config) = VmConfig::from_json(text) else {
        return false;
    };
    let json = serde_json::to_string(&config)
        .unwrap_or_else(|e| panic!("{config:?} does not serialise: {e}"));
    match VmConfig::from_json(&json) {
        Ok(again) => assert_eq!(
            again, config,
            "the config file serialised as {json} parses back to another value"
        ),
        Err(e) => panic!("the config file serialised as {json} does not parse: {e}"),
    }
    true
}

/// One well-formed request of every endpoint (the examples of `vmkit-api`'s router
/// tests): method, path and body.
pub const ENDPOINTS: &[(&str, &str, &str)] = &[
    ("GET", "/", ""),
    ("GET", "/version", ""),
    ("GET", "/machine-config/", ""),
    (
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":64}"#,
    ),
    ("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
    (
        "PUT",
        "/drives/root",
        r#"{"drive_id":"root","path_on_host":"/d","is_root_device":true}"#,
    ),
    (
        "PATCH",
        "/drives/root",
        r#"{"drive_id":"root","path_on_host":"/e"}"#,
    ),
    (
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#,
    ),
    ("PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v"}"#),
    ("PUT", "/entropy", "{}"),
    ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
    ("PATCH", "/vm", r#"{"state":"Resumed"}"#),
    ("PUT", "/logger", r#"{"log_path":"/l","level":"Debug"}"#),
    ("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
    (
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path":"/s/vmstate","mem_file_path":"/s/memory","snapshot_type":"Diff"}"#,
    ),
    (
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path":"/s/vmstate","mem_backend":{"backend_type":"File","backend_path":"/s/memory"},"track_dirty_pages":true,"resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],"drive_overrides":[{"drive_id":"root","path_on_host":"/r"}],"vsock_override":{"uds_path":"/v"}}"#,
    ),
];

/// A config file in Firecracker's layout, with every section.
pub const CONFIG_FILE: &str = r#"{
  "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "huge_pages": "2M",
                     "track_dirty_pages": true},
  "drives": [{"drive_id": "rootfs", "path_on_host": "/d", "is_root_device": true,
              "is_read_only": false,
              "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}],
  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                          "guest_mac": "06:00:00:00:00:01"}],
  "vsock": {"guest_cid": 3, "uds_path": "/v"},
  "entropy": {},
  "logger": {"log_path": "/l", "level": "Info"},
  "metrics": {"metrics_path": "/m"}
}"#;

/// `method path` with `body` as an HTTP/1.1 request, with `extra` header lines.
pub fn http_request(method: &str, path: &str, body: &str, extra: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}");
    if !body.is_empty() {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// Seeds built from well-formed traffic: each endpoint's request alone (in one piece,
/// byte by byte, and in small chunks, with `Expect: 100-continue` or `Connection: close`
/// on some), every request pipelined on one connection, and the config file (as the
/// stream and as the whole input).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let default_limit = 0x8000;
    for (i, (method, path, body)) in ENDPOINTS.iter().enumerate() {
        let extra = match i % 3 {
            0 => "",
            1 => "Expect: 100-continue\r\n",
            _ => "Connection: close\r\n",
        };
        let stream = http_request(method, path, body, extra);
        let chunkings: [&[u8]; 3] = [&[], &[0], &[3, 7, 20]];
        for chunks in chunkings {
            out.push(
                Input {
                    max_body: default_limit,
                    chunks: chunks.to_vec(),
                    stream: &stream,
                }
                .encode(),
            );
        }
    }
    let pipelined: Vec<u8> = ENDPOINTS
        .iter()
        .flat_map(|(m, p, b)| http_request(m, p, b, ""))
        .collect();
    for (max_body, chunks) in [(default_limit, vec![]), (40, vec![5, 30, 90])] {
        out.push(
            Input {
                max_body,
                chunks,
                stream: &pipelined,
            }
            .encode(),
        );
    }
    out.push(
        Input {
            max_body: default_limit,
            chunks: vec![],
            stream: CONFIG_FILE.as_bytes(),
        }
        .encode(),
    );
    out.push(CONFIG_FILE.as_bytes().to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn encode_is_the_inverse_of_decoding() {
        let input = Input {
            max_body: 0x1234,
            chunks: vec![1, 2, 255],
            stream: b"GET / HTTP/1.1\r\n\r\n",
        };
        let bytes = input.encode();
        let decoded = Input::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
        assert_eq!(decoded, input);
        assert_eq!(decoded.max_body(), 0x1234);
        assert_eq!(
            Input {
                max_body: 0x8000,
                ..input
            }
            .max_body(),
            DEFAULT_MAX_BODY_BYTES
        );
    }

    /// The generated seeds reach every endpoint, 100-continue, a closing request, the
    /// body limit, and a config file with every section.
    #[test]
    fn seeds_reach_every_endpoint_and_the_config_file() {
        let seeds = seeds::for_target("api");
        let mut accepted = Vec::new();
        let (mut continued, mut http_error, mut config) = (false, false, false);
        for s in &seeds {
            let o = run_bytes(s);
            accepted.extend(o.accepted);
            continued |= o.continued;
            http_error |= o.http_error.is_some();
            config |= o.config;
        }
        for (method, path, body) in ENDPOINTS {
            let api = ApiRequest::parse(method, path, body.as_bytes()).unwrap();
            let n = accepted.iter().filter(|a| **a == api).count();
            // One seed of each chunking, and the pipelined seed in its default-limit run.
            assert!(n >= 4, "{method} {path}: accepted {n} times");
        }
        assert!(
            continued && config,
            "continued {continued}, config {config}"
        );
        // The pipelined seed with a 40-byte limit stops at the first body over it.
        assert!(http_error);
        let c = VmConfig::from_json(CONFIG_FILE).unwrap();
        assert!(c.boot_source.is_some() && c.machine_config.is_some() && c.vsock.is_some());
        assert!(c.entropy.is_some() && c.logger.is_some() && c.metrics.is_some());
        assert!(!c.drives.is_empty() && !c.network_interfaces.is_empty());
    }

    /// Chunked byte by byte, a pipelined stream gives the same requests as in one piece.
    #[test]
    fn chunking_does_not_change_the_requests() {
        let stream: Vec<u8> = ENDPOINTS
            .iter()
            .flat_map(|(m, p, b)| http_request(m, p, b, ""))
            .collect();
        let whole = run(&Input {
            max_body: 0x8000,
            chunks: vec![],
            stream: &stream,
        });
        let bytewise = run(&Input {
            max_body: 0x8000,
            chunks: vec![0],
            stream: &stream,
        });
        assert_eq!(whole.accepted.len(), ENDPOINTS.len());
        assert_eq!(whole.accepted, bytewise.accepted);
    }

    #[test]
    fn chunk_lengths_span_a_byte_to_8_kib() {
        assert_eq!(chunk_len(0), 1);
        assert_eq!(chunk_len(8), 9);
        assert_eq!(chunk_len(255), 8129);
    }

    // The oracles fail when what they check is wrong.

    #[test]
    #[should_panic(expected = "Content-Length")]
    fn a_response_whose_length_is_not_its_body_s_fails() {
        check_rendered_bytes(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}",
            200,
            Some("{}"),
        );
    }

    #[test]
    #[should_panic(expected = "does not parse")]
    fn a_response_that_is_not_http_fails() {
        check_rendered_bytes(b"HTTP/1.1 2000 OK\r\n\r\n", 200, None);
    }

    #[test]
    #[should_panic(expected = "the response's body")]
    fn a_response_with_bytes_after_its_body_fails() {
        check_rendered_bytes(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\nx",
            204,
            None,
        );
    }

    #[test]
    #[should_panic(expected = "accepted with the ID")]
    fn a_drive_accepted_under_another_id_fails() {
        let api = ApiRequest::parse(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"a","path_on_host":"/d","is_root_device":false}"#,
        )
        .unwrap();
        check_request("PUT", "/drives/b", &api);
    }

    #[test]
    #[should_panic(expected = "parses back to another value")]
    fn a_value_that_does_not_round_trip_fails() {
        // An action checked as if it came from `PATCH /vm`: its JSON does not parse there.
        let api = ApiRequest::Action(vmkit_api::model::ActionType::InstanceStart);
        check_request("PATCH", "/vm", &api);
    }

    #[test]
    #[should_panic(expected = "another request than its chunks")]
    fn a_request_that_differs_from_the_whole_stream_s_fails() {
        let stream = http_request("PUT", "/vsock", r#"{"guest_cid":3,"uds_path":"/v"}"#, "");
        let Ok(Parsed::Complete(mut request, n)) = http::parse(&stream, 100) else {
            panic!("the request parses");
        };
        check_at_once(&stream, 100, &request, n);
        request.body.pop();
        check_at_once(&stream, 100, &request, n);
    }

    #[test]
    #[should_panic(expected = "Complete took")]
    fn a_complete_longer_than_the_buffer_fails() {
        let request = Request {
            method: "GET".into(),
            path: "/".into(),
            body: Vec::new(),
            keep_alive: true,
        };
        check_complete(&request, 20, 19, 100);
    }

    #[test]
    #[should_panic(expected = "passed the limit")]
    fn a_body_over_the_limit_fails() {
        let request = Request {
            method: "PUT".into(),
            path: "/".into(),
            body: vec![b'x'; 11],
            keep_alive: true,
        };
        check_complete(&request, 40, 40, 10);
    }
}
