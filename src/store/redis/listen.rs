//! The subscription to `<p>done` on a connection of its own (a subscribed connection can do
//! nothing else, so it is never one of the pool's): what the other nodes finish or cancel,
//! handed to [`crate::node::listen`]. This node's own messages are skipped here (it answered
//! its clients when it recorded them).

use super::{down, RedisStore, IO_TIMEOUT};
use crate::store::StoreError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long one read waits before the stop flag is looked at again.
const READ_WAIT: Duration = Duration::from_secs(1);
/// Quiet time after which a `PING` checks that the connection still works (a Redis that went
/// away without closing the socket would otherwise look like a quiet one forever).
const PING_AFTER: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Subscribes, calls `on("")` once subscribed, then `on(ids)` with the space-separated ids
    /// of each message from another node, until `stop` is set (`Ok`) or the connection or `on`
    /// fails (`Err`: the caller subscribes again).
    pub(super) fn listen_done(
        &self,
        stop: &AtomicBool,
        on: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self
            .client
            .get_connection_with_timeout(IO_TIMEOUT)
            .map_err(down)?;
        conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(down)?;
        conn.set_read_timeout(Some(READ_WAIT)).map_err(down)?;
        let mut sub = conn.as_pubsub();
        sub.subscribe(format!("{}done", self.prefix))
            .map_err(down)?;
        on("")?;
        let mine = format!("{} ", self.node);
        let mut heard = Instant::now();
        while !stop.load(Ordering::Acquire) {
            match sub.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    let text = std::str::from_utf8(msg.get_payload_bytes()).unwrap_or_default();
                    if let Some((_, ids)) = text.split_once(' ') {
                        if !text.starts_with(&mine) {
                            on(ids)?;
                        }
                    }
                }
                // A quiet channel; now and then make sure the connection is still there.
                Err(e) if e.is_timeout() => {
                    if heard.elapsed() >= PING_AFTER {
                        sub.ping::<redis::Value>().map_err(down)?;
                        heard = Instant::now();
                    }
                }
                Err(e) => return Err(down(e)),
            }
        }
        Ok(())
    }
}
