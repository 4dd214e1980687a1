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

#[cfg(test)]
mod tests {
    use super::super::tests::{node_store, redis_server};
    use crate::store::{contract, Cancel, Change, Store};
    use crate::task::State;
    use crossbeam_channel::unbounded;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn finish(st: &dyn Store, id: &str) {
        st.insert(&[contract::task(id, State::Ready, 0)])
            .expect("insert");
        st.record(&[Change::Finish {
            result: contract::result(id),
            expires_ms: crate::clock::now_ms() + 60_000,
            task: None,
        }])
        .expect("record");
    }

    /// Node n1 hears the results node n2 records (a batch of two in one message) and the tasks
    /// n2 cancels, each in the call that stores them, and not its own results.
    #[test]
    fn a_node_hears_the_results_and_cancels_of_the_others_not_its_own() {
        let s = redis_server();
        let n1 = Arc::new(node_store(&s, "n1"));
        let n2 = node_store(&s, "n2");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = unbounded();
        let listening = {
            let (n1, stop) = (n1.clone(), stop.clone());
            std::thread::spawn(move || {
                n1.listen_done(&stop, &mut |ids| {
                    let _ = tx.send(ids.to_string());
                    Ok(())
                })
            })
        };
        let next = || rx.recv_timeout(Duration::from_secs(10)).expect("heard");
        assert_eq!(next(), "", "subscribed");
        finish(&*n1, "mine");
        n2.insert(&[
            contract::task("a", State::Ready, 0),
            contract::task("b", State::Ready, 0),
            contract::task("c", State::Delayed, 99),
        ])
        .expect("insert");
        let done = |id: &str| Change::Finish {
            result: contract::result(id),
            expires_ms: crate::clock::now_ms() + 60_000,
            task: None,
        };
        n2.record(&[done("a"), done("b")]).expect("record");
        assert_eq!(next(), "a b");
        let cancelled = n2.cancel("c", crate::clock::now_ms() + 60_000);
        assert!(
            matches!(cancelled, Ok(Cancel::Cancelled { .. })),
            "{cancelled:?}"
        );
        assert_eq!(next(), "c");
        assert!(rx.try_recv().is_err(), "n1's own result is not heard");
        stop.store(true, Ordering::Release);
        listening.join().expect("join").expect("stopped cleanly");
    }
}
