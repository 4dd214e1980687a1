//! Raw HTTP/1.1 over a socket, for the connection and framing tests.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::time::Duration;

/// Reads one HTTP/1.1 response with a Content-Length body; returns the status and the body.
pub fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            // An interim answer (100 Continue) comes before the real one.
            if buf.starts_with(b"HTTP/1.1 1") {
                buf.drain(..p + 4);
                continue;
            }
            break p + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let (status, len) = status_and_length(&head);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((
        status,
        String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string(),
    ))
}

/// Sends `request` on a new connection and reads the answer, waiting at most `wait` for each
/// read; gives back the connection for later use.
pub fn ask(port: u16, request: &[u8], wait: Duration) -> std::io::Result<(TcpStream, u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(wait))?;
    c.write_all(request)?;
    let (code, body) = read_response(&mut c)?;
    Ok((c, code, body))
}

/// The status code and `Content-Length` (0 when absent) of an answer's head.
fn status_and_length(head: &str) -> (u16, usize) {
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (status, len)
}

/// A raw HTTP/1.1 client connection that keeps what it read past one answer, for pipelining.
pub struct Raw {
    pub reader: std::io::BufReader<TcpStream>,
}

/// One answer read by [`Raw`].
#[derive(Debug)]
pub struct RawAnswer {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone()))
    }
}

impl Raw {
    /// Connects to 127.0.0.1:`port`; reads wait at most `wait`.
    pub fn connect(port: u16, wait: Duration) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        Raw::from_stream(s, wait)
    }

    pub fn from_stream(s: TcpStream, wait: Duration) -> Raw {
        s.set_read_timeout(Some(wait)).expect("read timeout");
        Raw {
            reader: std::io::BufReader::new(s),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// Writes `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream().write_all(bytes)
    }

    /// Reads the next final answer (interim 1xx answers are skipped); the body by
    /// Content-Length.
    pub fn answer(&mut self) -> std::io::Result<RawAnswer> {
        use std::io::BufRead;
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let end = line == "\r\n";
                head.push_str(&line);
                if end {
                    break;
                }
            }
            let (code, len) = status_and_length(&head);
            if (100..200).contains(&code) {
                continue;
            }
            let mut body = vec![0u8; len];
            self.reader.read_exact(&mut body)?;
            return Ok(RawAnswer {
                code,
                head,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
    }

    /// True when the server has closed the connection (end of stream or reset) within the
    /// read timeout; false when it is still open (the read timed out) or sent more.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.reader.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A connection whose receive buffer is `rcvbuf` bytes, set before connecting so the window
/// stays small.
pub fn small_window_connect(port: u16, rcvbuf: i32) -> TcpStream {
    // SAFETY: a new socket, options set with valid pointers and sizes, connected to a valid
    // sockaddr_in; the descriptor is handed to TcpStream, which owns it from then on.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF");
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}
