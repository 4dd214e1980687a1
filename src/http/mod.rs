//! The HTTP/1.1 transport: accepts connections, reads requests with strict framing, size limits
//! and deadlines, and writes answers. It knows nothing of tasks: a [`Handler`] turns each
//! [`Request`] into a [`Reply`].
//!
//! One thread serves one connection, from its first byte to its close, and reads the next
//! request only once the previous answer is written. A request that waits for a result (a
//! `wait` submit, a long poll) blocks its own connection's thread and nothing else: the threads
//! that finish tasks only hand the answer over a channel, and no other client shares the
//! connection. A client that stops reading is dropped after `idle`; a client that sends its
//! request head slower than [`HEAD_DEADLINE`] gets 408.
//!
//! | file | owns |
//! |---|---|
//! | [`server`] | listening socket, accept loop, connection cap and its 503s, thread reuse |
//! | [`conn`] | one connection: request heads and bodies off the wire, answers onto it |
//! | [`message`] | the [`Request`], [`Response`] and [`Reply`] types |

pub(crate) mod conn;
pub(crate) mod message;
pub(crate) mod server;

pub(crate) use message::{percent_decode, query_param};
pub use message::{Reply, Request, Response};
pub use server::{listen, Listening};

use std::time::Duration;

/// How long a request head (request line and headers) may take to arrive from its first byte.
pub(crate) const HEAD_DEADLINE: Duration = Duration::from_secs(10);
/// Longest request line (the method, target and version), in bytes; longer gets 414.
pub(crate) const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Most bytes of header fields in one request; more gets 431.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields in one request; more gets 431.
pub(crate) const MAX_HEADERS: usize = 100;

/// What a connection may send and how long it may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request body; larger gets 413 and the connection is closed.
    pub max_body: usize,
    /// A connection that sends nothing between requests, or a body that does not arrive, or a
    /// client that does not read its answer, for this long, is closed.
    pub idle: Duration,
    /// Most connections served at once; one more is answered 503 and closed. WebSocket
    /// connections stop counting once upgraded.
    pub max_conns: usize,
}

/// Turns requests into answers. Called on the connection's own thread, so it may block (a
/// durable submit, a wait for a result) without stalling any other client.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Reply;
}

impl<F> Handler for F
where
    F: Fn(Request) -> Reply + Send + Sync + 'static,
{
    fn handle(&self, req: Request) -> Reply {
        self(req)
    }
}
