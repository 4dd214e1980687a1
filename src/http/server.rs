//! The listening socket: accepts connections and gives them to the loop thread
//! ([`super::reactor`]), caps how many are served at once and answers the surplus with 503 on a
//! thread of its own; gives the connections that leave the loop a thread each (reusing idle
//! ones).

use super::conn::{Conn, RequestError};
use super::reactor::{self, Inbox};
use super::{Handler, Limits, Request};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a connection thread with nothing to do waits for a new connection before ending.
const THREAD_IDLE: Duration = Duration::from_secs(30);
/// Refused connections waiting for their 503 to be read; beyond, they are closed at once.
const REFUSE_BACKLOG: usize = 1024;
/// How long a refused connection is kept open so that its client can read the 503.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// Pause after `accept` fails for lack of descriptors or memory, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound listening socket, not yet serving: binding comes first at start-up, so that a busy
/// port stops the server before anything else starts.
pub struct Listening {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
}

/// Binds `addr`. Accepted connections inherit `TCP_NODELAY` from it (answers go out at once).
pub fn listen(addr: SocketAddr) -> std::io::Result<Listening> {
    let listener = TcpListener::bind(addr)?;
    no_delay(&listener);
    Ok(Listening {
        listener: Arc::new(listener),
        stop: Arc::new(AtomicBool::new(false)),
    })
}

/// Sets `TCP_NODELAY` on the listening socket; Linux gives it to every accepted connection.
fn no_delay(listener: &TcpListener) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this process owns, with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::warn!(
            "http: TCP_NODELAY not set: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An accepted connection with its place among the `max_conns` served ones, and what the loop
/// thread read of it when it hands it to a thread.
pub(super) struct Job {
    pub(super) stream: TcpStream,
    pub(super) slot: Slot,
    /// Bytes read and not used yet.
    pub(super) buf: Vec<u8>,
    /// The request to serve first (or why none could be read).
    pub(super) first: Option<Result<Request, RequestError>>,
}

/// One of the `max_conns` places; given back when dropped.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every connection thread shares.
struct Shared {
    handler: Arc<dyn Handler>,
    limits: Limits,
    /// Idle connection threads wait here; a send succeeds only when one is waiting.
    idle_rx: Receiver<Job>,
    refuse: Sender<Closing>,
}

/// A connection for the closing thread.
enum Closing {
    /// Over `--max_conns`: answered 503, then closed.
    Refused(TcpStream),
    /// Its last answer written: closed.
    Answered(TcpStream),
}

impl Listening {
    /// The bound address (its port, when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts the accept thread, the loop thread and the closing thread; connections are
    /// served by `handler`.
    pub fn serve(&self, limits: Limits, handler: Arc<dyn Handler>) -> std::io::Result<()> {
        let (idle_tx, idle_rx) = bounded::<Job>(0);
        let (refuse_tx, refuse_rx) = bounded::<Closing>(REFUSE_BACKLOG);
        thread::Builder::new()
            .name("http-close".into())
            .spawn(move || refuse_loop(refuse_rx))?;
        let shared = Arc::new(Shared {
            handler: handler.clone(),
            limits,
            idle_rx,
            refuse: refuse_tx.clone(),
        });
        let (shared2, idle_tx2) = (shared.clone(), idle_tx.clone());
        let inbox = reactor::start(
            handler,
            limits,
            self.stop.clone(),
            Box::new(move |job| to_thread(&shared2, &idle_tx2, job)),
            Box::new(move |stream| {
                let _ = refuse_tx.try_send(Closing::Answered(stream));
            }),
        )?;
        let listener = self.listener.clone();
        let stop = self.stop.clone();
        thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(&listener, &stop, &shared, &idle_tx, &inbox))?;
        Ok(())
    }

    /// Stops accepting. Connections being served go on until they end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: shutdown(2) on a socket this process owns; it wakes a blocked accept.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    idle_tx: &Sender<Job>,
    inbox: &Inbox,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut refusals_logged: Option<Instant> = None;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if stop.load(Ordering::Acquire) => return,
            Err(e) => {
                if out_of_resources(&e) {
                    log::warn!("http: cannot accept a connection: {e}; pausing 100 ms");
                    thread::sleep(ACCEPT_BACKOFF);
                } else {
                    log::debug!("http: accept: {e}");
                }
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        if live.fetch_add(1, Ordering::AcqRel) >= shared.limits.max_conns {
            live.fetch_sub(1, Ordering::AcqRel);
            if refusals_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                log::warn!(
                    "http: refusing connections: {} served at once already (--max_conns)",
                    shared.limits.max_conns
                );
                refusals_logged = Some(Instant::now());
            }
            let _ = shared.refuse.try_send(Closing::Refused(stream));
            continue;
        }
        let job = Job {
            stream,
            slot: Slot(live.clone()),
            buf: Vec::new(),
            first: None,
        };
        if let Some(job) = inbox.add(job) {
            to_thread(shared, idle_tx, job);
        }
    }
}

/// Gives `job` to an idle connection thread, or to a new one.
fn to_thread(shared: &Arc<Shared>, idle_tx: &Sender<Job>, job: Job) {
    match idle_tx.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => spawn(shared, job),
    }
}

/// Starts a connection thread for `job`; when no thread can be made, the client gets the 503.
fn spawn(shared: &Arc<Shared>, job: Job) {
    let cell = Arc::new(Mutex::new(Some(job)));
    let (cell2, shared2) = (cell.clone(), shared.clone());
    let started = thread::Builder::new().name("http".into()).spawn(move || {
        let mut next = cell2.lock().take();
        while let Some(job) = next {
            let Job {
                stream,
                slot,
                buf,
                first,
            } = job;
            let mut slot = Some(slot);
            Conn::resume(stream, shared2.limits, buf).serve(
                shared2.handler.as_ref(),
                || drop(slot.take()),
                first,
            );
            drop(slot);
            next = shared2.idle_rx.recv_timeout(THREAD_IDLE).ok();
        }
    });
    if let Err(e) = started {
        log::error!("http: cannot start a connection thread: {e}");
        if let Some(job) = cell.lock().take() {
            let _ = shared.refuse.try_send(Closing::Refused(job.stream));
        }
    }
}

fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == ErrorKind::OutOfMemory
}

/// Closes connections, several at a time: a refused one gets its 503 at once; each has its
/// writing side closed and is read (and dropped) until the client closes or a second passes,
/// so that the close does not reset the connection before the answer is read.
fn refuse_loop(rx: Receiver<Closing>) {
    let mut lingering: Vec<(TcpStream, Instant)> = Vec::new();
    let mut scratch = [0u8; 4096];
    let refusal = super::Response::fail(503, "too many open connections (--max_conns)")
        .encode(false, true, false);
    loop {
        let next = if lingering.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(Duration::from_millis(50))
        };
        match next {
            Ok(closing) => {
                let s = match closing {
                    Closing::Refused(mut s) => {
                        let _ = s.set_nonblocking(true);
                        crate::metrics::answered(503);
                        let _ = s.write(&refusal);
                        s
                    }
                    Closing::Answered(s) => {
                        let _ = s.set_nonblocking(true);
                        s
                    }
                };
                let _ = s.shutdown(Shutdown::Write);
                if lingering.len() < REFUSE_BACKLOG {
                    lingering.push((s, Instant::now() + REFUSE_LINGER));
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        lingering.retain_mut(|(s, until)| {
            if *until <= now {
                return false;
            }
            loop {
                match s.read(&mut scratch) {
                    Ok(0) => return false,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
    }
}
