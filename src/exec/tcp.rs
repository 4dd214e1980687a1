//! The plain TCP transport under the HTTP executor's agent (TLS is layered on it as before).
//! ureq's own costs a worker ten system calls per request on a kept-alive connection: its
//! liveness probe (taking the connection from the pool, and giving it back) switches the
//! socket to non-blocking, reads and switches back, and both socket timeouts are set again
//! before every write and read, since the time left changes by microseconds. This one probes
//! with one non-blocking `MSG_PEEK` and leaves a timeout alone while it is within
//! [`SLACK`] of the one wanted: four calls per request.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};
use std::time::Duration;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};
use ureq::{Error, Timeout};

/// How far a socket timeout may be from the time an attempt has left before it is set again:
/// an attempt ends within this of its `timeout`.
const SLACK: Duration = Duration::from_millis(1);

/// An agent with `config` over ureq's default chain (a CONNECT proxy from the environment,
/// TCP, rustls) with [`PlainTcp`] in place of its TCP connector, and the caching resolver.
/// The HTTP executor, `poulpe replay` and `poulpe health` all make theirs here, so the binary
/// holds one connector chain, not also ureq's default one.
pub(crate) fn agent(config: ureq::config::Config) -> ureq::Agent {
    use ureq::unversioned::transport::{ConnectProxyConnector, RustlsConnector};
    ureq::Agent::with_parts(
        config,
        ().chain(ConnectProxyConnector::default())
            .chain(PlainTcp)
            .chain(RustlsConnector::default()),
        super::resolve::CachingResolver::default(),
    )
}

/// Opens plain TCP connections (in place of ureq's `TcpConnector`).
#[derive(Debug, Default)]
pub(crate) struct PlainTcp;

/// A connection and its buffers, with the socket timeouts set now.
pub(crate) struct Tcp {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    read: Option<Duration>,
    write: Option<Duration>,
}

impl std::fmt::Debug for Tcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tcp")
    }
}

impl<In: Transport> Connector<In> for PlainTcp {
    type Out = Either<In, Tcp>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        if chained.is_some() {
            // A proxy's connection, made earlier in the chain.
            return Ok(chained.map(Either::A));
        }
        let stream = Arc::new(open(details)?);
        let handle: Weak<dyn ShutdownHandle> = Arc::downgrade(&stream) as _;
        (details.register_shutdown)(handle)?;
        let config = details.config;
        Ok(Some(Either::B(Tcp {
            stream,
            buffers: LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            read: None,
            write: None,
        })))
    }
}

/// Connects to the first address that answers, each given the time left.
fn open(details: &ConnectionDetails) -> Result<TcpStream, Error> {
    let mut last = None;
    for addr in &details.addrs {
        let tried = match details.timeout.not_zero() {
            Some(t) => TcpStream::connect_timeout(addr, *t),
            None => TcpStream::connect(addr),
        };
        match tried {
            Ok(s) => {
                s.set_nodelay(details.config.no_delay())?;
                return Ok(s);
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                return Err(Error::Timeout(Timeout::Connect))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| ErrorKind::ConnectionRefused.into())
        .into())
}

/// Sets a socket timeout unless the one set is within [`SLACK`] of `want` (also used by
/// [`super::plain`], which keeps its own connections).
pub(crate) fn keep_within(
    set: &mut Option<Duration>,
    want: Option<Duration>,
    apply: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    let close = match (*set, want) {
        (Some(a), Some(b)) => a.abs_diff(b) <= SLACK,
        (a, b) => a == b,
    };
    if !close {
        apply(want)?;
        *set = want;
    }
    Ok(())
}

/// The time left, or the timeout error once there is none.
fn left(timeout: NextTimeout) -> Result<Option<Duration>, Error> {
    if timeout.after.is_zero() {
        return Err(Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|t| *t))
}

/// A timed-out socket call as ureq reports it.
fn timed_out(e: io::Error, reason: Timeout) -> Error {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Error::Timeout(reason),
        _ => e.into(),
    }
}

impl Transport for Tcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let timeout = timeout.for_write();
        let want = left(timeout)?;
        let stream = &*self.stream;
        keep_within(&mut self.write, want, |t| stream.set_write_timeout(t))?;
        let output = &self.buffers.output()[..amount];
        (&*self.stream)
            .write_all(output)
            .map_err(|e| timed_out(e, timeout.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let timeout = timeout.for_read();
        let want = left(timeout)?;
        let stream = &*self.stream;
        keep_within(&mut self.read, want, |t| stream.set_read_timeout(t))?;
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&*self.stream).read(input) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| timed_out(e, timeout.reason))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// Open and quiet: nothing to read (unasked bytes or an end of stream mean it cannot be
    /// used again).
    fn is_open(&mut self) -> bool {
        quiet(&self.stream)
    }
}

/// Whether an idle connection is open and quiet: nothing to read, without consuming anything
/// (one non-blocking `MSG_PEEK`; unasked bytes or an end of stream mean it cannot be used again).
pub(crate) fn quiet(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most one byte into `byte`, which outlives the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (Tcp, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let tcp = Tcp {
            stream: Arc::new(client),
            buffers: LazyBuffers::new(1024, 1024),
            read: None,
            write: None,
        };
        (tcp, server)
    }

    /// Waits until the bytes or the end the server sent have reached the client's socket.
    fn arrived(tcp: &Tcp) {
        let mut fds = libc::pollfd {
            fd: tcp.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut fds, 1, 5000) }, 1);
    }

    #[test]
    fn a_quiet_connection_is_open_and_stays_usable() {
        let (mut tcp, mut server) = pair();
        assert!(tcp.is_open());
        assert!(
            tcp.is_open(),
            "the probe consumes nothing and leaves the socket blocking"
        );
        server.write_all(b"hi").unwrap();
        let t = NextTimeout {
            after: Duration::from_secs(5).into(),
            ..NextTimeout::default()
        };
        assert!(tcp.await_input(t).unwrap());
        assert_eq!(tcp.buffers.input(), b"hi");
    }

    #[test]
    fn unasked_bytes_or_a_close_from_the_server_end_its_use() {
        let (mut tcp, mut server) = pair();
        server.write_all(b"x").unwrap();
        arrived(&tcp);
        assert!(!tcp.is_open(), "bytes nobody asked for");
        let (mut tcp, server) = pair();
        drop(server);
        arrived(&tcp);
        assert!(!tcp.is_open(), "closed by the server");
    }

    #[test]
    fn a_read_that_gets_nothing_in_time_is_a_timeout() {
        let (mut tcp, _server) = pair();
        let t = NextTimeout {
            after: Duration::from_millis(50).into(),
            ..NextTimeout::default()
        };
        assert!(matches!(tcp.await_input(t), Err(Error::Timeout(_))));
        let spent = NextTimeout {
            after: Duration::ZERO.into(),
            ..NextTimeout::default()
        };
        assert!(matches!(tcp.await_input(spent), Err(Error::Timeout(_))));
    }

    #[test]
    fn a_timeout_is_set_again_only_beyond_the_slack() {
        let mut set = None;
        let mut calls = Vec::new();
        let mut want = |set: &mut Option<Duration>, d: Option<Duration>| {
            keep_within(set, d, |t| {
                calls.push(t);
                Ok(())
            })
            .unwrap()
        };
        let s = Duration::from_secs(30);
        want(&mut set, Some(s));
        want(&mut set, Some(s - SLACK));
        want(&mut set, Some(s + SLACK));
        want(&mut set, Some(s - SLACK * 2));
        want(&mut set, None);
        want(&mut set, None);
        assert_eq!(calls, [Some(s), Some(s - SLACK * 2), None]);
        assert_eq!(set, None);
    }
}
