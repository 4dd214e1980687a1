//! The HTTP/1.1 transport: accepts connections, reads requests with strict framing, size limits
//! and deadlines, and writes answers. It knows nothing of tasks: a [`Handler`] turns each
//! [`Request`] into a [`Reply`].
//!
//! One loop thread watches every keep-alive connection (epoll): each wake-up it reads what
//! arrived, takes at most one whole request per connection, and gives them to the handler
//! together ([`Handler::handle_quick`]), so that the submits of many clients are made durable
//! in one write and no thread waits per connection. A request that may wait (a `wait` submit,
//! a long poll, a WebSocket upgrade) or that is unusual (chunked, `Expect`, malformed) goes
//! with its connection to a thread of its own, which serves it from then on and reads the
//! next request only once the previous answer is written: a wait blocks its own connection
//! and nothing else. A client that stops reading is dropped after `idle`; a client that sends
//! its request head slower than [`HEAD_DEADLINE`] gets 408.
//!
//! | file | owns |
//! |---|---|
//! | [`server`] | listening socket, accept loop, connection cap and its 503s, thread reuse |
//! | [`reactor`] | the loop thread: keep-alive connections, quick requests in batches |
//! | [`conn`] | one connection on its own thread: requests off the wire, answers onto it |
//! | [`message`] | the [`Request`], [`Response`] and [`Reply`] types |

pub(crate) mod conn;
pub(crate) mod message;
pub(crate) mod reactor;
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

/// What the loop thread does with a request it read.
pub enum Quick {
    /// Answered at once.
    Answered(Response),
    /// It may wait (for a result, a long poll, a WebSocket): it goes with its connection to a
    /// thread of its own, which serves that connection from then on.
    Slow(Request),
}

/// Turns requests into answers.
pub trait Handler: Send + Sync + 'static {
    /// Called on a connection's own thread, so it may block (a wait for a result) without
    /// stalling any other client.
    fn handle(&self, req: Request) -> Reply;

    /// Called on the loop thread with the requests of one wake-up (at most one per
    /// connection): answers those that need no wait but a durable write, all together (one
    /// write for all), and gives the others back as [`Quick::Slow`]. One answer per request,
    /// in order. By default every request is slow.
    fn handle_quick(&self, reqs: Vec<Request>) -> Vec<Quick> {
        reqs.into_iter().map(Quick::Slow).collect()
    }
}

impl<F> Handler for F
where
    F: Fn(Request) -> Reply + Send + Sync + 'static,
{
    fn handle(&self, req: Request) -> Reply {
        self(req)
    }
}
