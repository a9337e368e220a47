//! HTTP/1.1 requests and responses, as far as a REST API on a Unix socket needs them.
//!
//! The request head is parsed by `httparse`; this module adds what it leaves to its user:
//! the body (by `Content-Length` only), limits on head and body size, keep-alive and
//! `Expect: 100-continue` (which curl sends for bodies over 1 KiB).

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most headers a request may have.
pub const MAX_HEADERS: usize = 32;
/// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 51_200;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT`...).
    pub method: String,
    /// The path, as sent (`/drives/rootfs`).
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// What [`parse`] found at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request, and how many bytes of the buffer it took.
    Complete(Request, usize),
    /// More bytes are needed; `expect_continue` says the client waits for a
    /// `100 Continue` before it sends the body.
    Partial {
        /// The head is complete and asks for `100 Continue`.
        expect_continue: bool,
    },
}

/// A request that cannot be served, with the status to answer: 400, as Firecracker
/// answers every malformed or oversized request (417 for an `Expect` it cannot meet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    /// The status code.
    pub status: u16,
    /// What is wrong, for the `fault_message`.
    pub message: String,
}

fn bad(status: u16, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

fn content_length(value: &[u8]) -> Result<usize, HttpError> {
    let text = std::str::from_utf8(value).map_err(|_| bad(400, "invalid Content-Length"))?;
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(400, format!("invalid Content-Length '{text}'")));
    }
    // All digits: the only error left is overflow, which is "too large" anyway.
    Ok(text.parse().unwrap_or(usize::MAX))
}

/// What the headers say about the body and the connection.
struct Head {
    len: usize,
    body_len: usize,
    keep_alive: bool,
    expect_continue: bool,
}

fn read_headers(
    req: &httparse::Request,
    head_len: usize,
    max_body: usize,
) -> Result<Head, HttpError> {
    let mut head = Head {
        len: head_len,
        body_len: 0,
        keep_alive: req.version == Some(1),
        expect_continue: false,
    };
    let mut seen_length = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if seen_length {
                    return Err(bad(400, "Content-Length given twice"));
                }
                seen_length = true;
                head.body_len = content_length(h.value)?;
            }
            "transfer-encoding" => {
                return Err(bad(
                    400,
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            "connection" if value.contains("close") => head.keep_alive = false,
            "connection" if value.contains("keep-alive") => head.keep_alive = true,
            "expect" if value.trim() == "100-continue" => head.expect_continue = true,
            "expect" => return Err(bad(417, format!("cannot meet Expect: {value}"))),
            _ => {}
        }
    }
    if head.body_len > max_body {
        return Err(bad(
            400,
            format!(
                "the request body of {} bytes is larger than the limit of {max_body} bytes",
                head.body_len
            ),
        ));
    }
    Ok(head)
}

/// Parses the request at the front of `buf`, whose body may be at most `max_body` bytes.
///
/// # Errors
///
/// A malformed head, a head over [`MAX_HEAD_BYTES`], a body over `max_body`, or a chunked
/// body: the [`HttpError`] gives the status to answer before closing the connection.
pub fn parse(buf: &[u8], max_body: usize) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => bad(400, format!("more than {MAX_HEADERS} headers")),
        e => bad(400, format!("malformed HTTP request: {e}")),
    })?;
    let head_len = match status {
        httparse::Status::Complete(n) if n <= MAX_HEAD_BYTES => n,
        httparse::Status::Partial if buf.len() <= MAX_HEAD_BYTES => {
            return Ok(Parsed::Partial {
                expect_continue: false,
            })
        }
        _ => {
            return Err(bad(
                400,
                format!("request head over {MAX_HEAD_BYTES} bytes"),
            ))
        }
    };
    let head = read_headers(&req, head_len, max_body)?;
    let total = head.len.saturating_add(head.body_len);
    if buf.len() < total {
        return Ok(Parsed::Partial {
            expect_continue: head.expect_continue,
        });
    }
    let request = Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        body: buf[head.len..total].to_vec(),
        keep_alive: head.keep_alive,
    };
    Ok(Parsed::Complete(request, total))
}

/// The interim response that lets a client waiting on `Expect: 100-continue` send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Renders a response with `status` and an optional JSON `body`.
pub fn render(status: u16, body: Option<&str>, keep_alive: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\nServer: vmkit\r\n", reason(status));
    if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else {
        out.push_str("Content-Length: 0\r\n");
    }
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body.unwrap_or(""));
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, DEFAULT_MAX_BODY_BYTES) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_with_a_body_and_the_next_one_pipelined() {
        let buf = b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}GET / HTTP/1.1\r\n\r\n";
        let (r, n) = complete(buf);
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/vm"));
        assert_eq!(r.body, b"{\"state\":\"Paused\"}");
        assert!(r.keep_alive);
        let (r2, n2) = complete(&buf[n..]);
        assert_eq!((r2.method.as_str(), r2.body.len()), ("GET", 0));
        assert_eq!(n + n2, buf.len());
    }

    #[test]
    fn partial_heads_and_bodies_wait_for_more() {
        let buf = b"PUT /vm HTTP/1.1\r\nContent-Length: 18\r\nExpect: 100-continue\r\n\r\n{\"st";
        for cut in 0..buf.len() {
            let got = parse(&buf[..cut], DEFAULT_MAX_BODY_BYTES).unwrap();
            assert!(matches!(got, Parsed::Partial { .. }), "{cut}: {got:?}");
        }
        assert_eq!(
            parse(buf, DEFAULT_MAX_BODY_BYTES).unwrap(),
            Parsed::Partial {
                expect_continue: true
            }
        );
    }

    #[test]
    fn limits_and_malformed_heads_get_their_status() {
        let status = |buf: &[u8]| parse(buf, 100).unwrap_err().status;
        let too_big = parse(b"PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100).unwrap_err();
        assert_eq!(too_big.status, 400);
        assert!(too_big.message.contains("limit of 100 bytes"), "{too_big}");
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            400
        );
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(status(b"G\0T / HTTP/1.1\r\n\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 10, b'a');
        assert_eq!(status(&long), 400);
        let many = "GET / HTTP/1.1\r\n".to_string() + &"A: b\r\n".repeat(MAX_HEADERS + 1) + "\r\n";
        assert!(parse(many.as_bytes(), 100)
            .unwrap_err()
            .message
            .contains("headers"));
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
    }

    #[test]
    fn responses_carry_their_length() {
        let r = String::from_utf8(render(400, Some("{\"a\":1}"), false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        assert!(r.contains("Content-Length: 7\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"a\":1}"));
        let r = String::from_utf8(render(204, None, true)).unwrap();
        assert!(r.contains("Content-Length: 0\r\n") && !r.contains("Connection"));
    }
}
