//! The Kafka adapter (cargo feature `kafka`): a poll thread reads task JSON from the task topic
//! in a consumer group and submits it, committing each offset only once its task is durable;
//! invalid messages go to `<dead>/invalid/` with a Fail result. Final results of Kafka tasks are
//! produced to the result topic, keyed by task id. librdkafka is used only through its
//! synchronous `BaseConsumer`/`BaseProducer`, from plain threads. While the brokers fail, their
//! errors (tens a second) are folded into a few log lines ([`fold`]).

mod fold;

use super::{Origin, SubmitError, Submitter};
use crate::clock::now_ms;
use crate::config::KafkaConfig;
use crate::deadletter::write_atomic;
use crate::results::{Forward, TaskResult};
use crate::status::KafkaStatus;
use fold::{ErrorFold, Line};
use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError as RdKafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Why the Kafka clients cannot be started; rdkafka's error is kept as the cause.
#[derive(Debug)]
pub enum KafkaError {
    /// The result producer cannot be created (`--kafka_servers`).
    Producer(RdKafkaError),
    /// The task consumer cannot be created (`--kafka_servers`).
    Consumer(RdKafkaError),
    /// The consumer cannot subscribe to the task topic (`--kafka_topic`).
    Subscribe(String, RdKafkaError),
    /// A Kafka thread cannot be started.
    Thread(io::Error),
}

impl fmt::Display for KafkaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KafkaError::Producer(e) => {
                write!(f, "--kafka_servers: cannot create a producer: {e}")
            }
            KafkaError::Consumer(e) => {
                write!(f, "--kafka_servers: cannot create a consumer: {e}")
            }
            KafkaError::Subscribe(topic, e) => {
                write!(f, "--kafka_topic: cannot subscribe to {topic:?}: {e}")
            }
            KafkaError::Thread(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for KafkaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KafkaError::Producer(e) | KafkaError::Consumer(e) | KafkaError::Subscribe(_, e) => {
                Some(e)
            }
            KafkaError::Thread(e) => Some(e),
        }
    }
}

/// The Kafka clients' context, one shared by the consumer and the result producer: remembers
/// client errors for `/sys_info` and logs them, folded.
#[derive(Clone)]
struct Ctx(Arc<Shared>);

struct Shared {
    status: Arc<KafkaStatus>,
    errors: Mutex<ErrorFold>,
}

/// Least time between two lines about failing brokers, but for the one saying they answer again.
const ERROR_LINE_EVERY: Duration = Duration::from_secs(60);

impl Ctx {
    fn new(status: Arc<KafkaStatus>) -> Ctx {
        Ctx(Arc::new(Shared {
            status,
            errors: Mutex::new(ErrorFold::new(ERROR_LINE_EVERY)),
        }))
    }

    /// A client error: shown as `last_error`, and logged as a warning when it begins a run of
    /// errors or a minute has passed since the last line; otherwise only at debug level.
    fn failed(&self, error: String) {
        let line = self.0.errors.lock().error(Instant::now());
        match line {
            None => log::debug!("kafka: {error}"),
            Some(Line::Failing { folded }) => log::warn!(
                "kafka: broker unreachable or failing: {error} (further Kafka errors are \
                 counted and logged at most once a minute until it answers{})",
                folded_before(folded)
            ),
            Some(Line::Still { folded, lasted }) => log::warn!(
                "kafka: still failing after {} s, {folded} errors folded since the last line; \
                 the latest: {error}",
                lasted.as_secs()
            ),
        }
        self.0.status.error(error);
    }

    /// A sign that the brokers answer (a message read, metadata fetched, a result delivered):
    /// ends a run of errors, with a line when one told it.
    fn answered(&self) {
        let line = self.0.errors.lock().ok(Instant::now());
        if let Some(fold::Back { folded, lasted }) = line {
            log::info!(
                "kafka: broker reachable again after {} s ({folded} errors folded since the \
                 last line)",
                lasted.as_secs()
            );
        }
    }
}

/// `; N errors folded before this one` when N > 0.
fn folded_before(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} errors folded before this one")
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: RdKafkaError, reason: &str) {
        if reason.contains("brokers are down") || reason.contains("Connection refused") {
            self.0.status.connected.store(false, Ordering::Relaxed);
        }
        self.failed(format!("{error}: {reason}"));
    }

    /// librdkafka's own lines, at their level, but for its `FAIL` lines (a broker connection
    /// failed): the error callback reports the same failure, folded, so they go to debug.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let level = match level {
            _ if fac == "FAIL" => log::Level::Debug,
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => log::Level::Error,
            RDKafkaLogLevel::Warning => log::Level::Warn,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => log::Level::Info,
            RDKafkaLogLevel::Debug => log::Level::Debug,
        };
        log::log!(target: "librdkafka", level, "librdkafka: {fac} {message}");
    }
}

impl ConsumerContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.status.produced.fetch_add(1, Ordering::Relaxed);
                self.answered();
            }
            Err((e, m)) => {
                let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                self.failed(format!("the result for {key} could not be produced: {e}"));
            }
        }
    }
}

/// Produces final results to the result topic.
pub(crate) struct Replier {
    producer: BaseProducer<Ctx>,
    topic: String,
    /// Set at shutdown: the poll thread ends.
    stopping: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.servers)
        .set("client.id", concat!("poulpe-", env!("CARGO_PKG_VERSION")));
    c
}

impl Replier {
    /// Creates the producer and its poll thread; `None` without a result topic.
    pub(crate) fn start(
        cfg: &KafkaConfig,
        status: Arc<KafkaStatus>,
    ) -> Result<Option<Arc<Replier>>, KafkaError> {
        let Some(topic) = cfg.resp_topic.clone() else {
            return Ok(None);
        };
        let producer: BaseProducer<Ctx> = base_config(cfg)
            .set("message.timeout.ms", "300000")
            .set("linger.ms", "5")
            .create_with_context(Ctx::new(status))
            .map_err(KafkaError::Producer)?;
        let r = Arc::new(Replier {
            producer,
            topic,
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let r2 = r.clone();
        let h = thread::Builder::new()
            .name("kafka-produce".into())
            .spawn(move || {
                while !r2.stopping.load(Ordering::Acquire) {
                    r2.producer.poll(Duration::from_millis(100));
                }
            })
            .map_err(KafkaError::Thread)?;
        *r.thread.lock() = Some(h);
        Ok(Some(r))
    }

    /// The producer's poll thread as a stage: stopping it flushes queued results first.
    pub(crate) fn stage(self: &Arc<Self>) -> crate::stage::Stage {
        let r = self.clone();
        let threads = self.thread.lock().take().into_iter().collect();
        crate::stage::Stage::new(
            "kafka-produce",
            move || {
                r.flush();
                r.stopping.store(true, Ordering::Release);
            },
            threads,
        )
    }

    fn send(&self, key: &str, body: &str) {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(body);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, back)) if Instant::now() < end => {
                    log::debug!("kafka: producer queue busy ({e}); retrying");
                    record = back;
                    thread::sleep(Duration::from_millis(20));
                }
                Err((e, _)) => {
                    log::error!("kafka: result for {key} dropped: {e}");
                    return;
                }
            }
        }
    }

    /// Waits (bounded) for queued results to leave, at shutdown.
    pub(crate) fn flush(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            log::warn!("kafka: results still queued at shutdown: {e}");
        }
    }
}

impl Forward for Replier {
    fn forward(&self, r: &TaskResult) {
        let mut v = json!(r);
        v["request_id"] = json!(r.id);
        self.send(&r.id, &v.to_string());
    }
}

/// What the poll thread submits through and where invalid messages go.
pub(crate) struct Feed {
    pub(crate) submitter: Submitter,
    /// `<dead>/invalid`.
    pub(crate) invalid_dir: std::path::PathBuf,
}

/// Starts the poll thread.
pub(crate) fn start(
    feed: Feed,
    cfg: KafkaConfig,
    status: Arc<KafkaStatus>,
    replier: Option<Arc<Replier>>,
) -> Result<JoinHandle<()>, KafkaError> {
    // One context for both clients, so that an outage both see is told once.
    let ctx = match &replier {
        Some(r) => Ctx::clone(r.producer.context()),
        None => Ctx::new(status),
    };
    let consumer: BaseConsumer<Ctx> = base_config(&cfg)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", cfg.offset_reset)
        .set("session.timeout.ms", "6000")
        .create_with_context(ctx)
        .map_err(KafkaError::Consumer)?;
    consumer
        .subscribe(&[cfg.topic.as_str()])
        .map_err(|e| KafkaError::Subscribe(cfg.topic.clone(), e))?;
    crate::stage::spawn_critical("kafka-poll", move || {
        poll_loop(&feed, &cfg, &consumer, replier.as_deref())
    })
    .map_err(KafkaError::Thread)
}

/// Most messages read before one submit: they share one durable write.
const BATCH: usize = 500;

fn poll_loop(
    feed: &Feed,
    cfg: &KafkaConfig,
    consumer: &BaseConsumer<Ctx>,
    replier: Option<&Replier>,
) {
    let ctx = consumer.context();
    let status = &ctx.0.status;
    let mut last_check = Instant::now() - Duration::from_secs(60);
    while feed.submitter.accepting() {
        // One blocking poll, then whatever else is already fetched, up to BATCH messages.
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
        let mut wait = Duration::from_millis(200);
        while batch.len() < BATCH {
            match consumer.poll(wait) {
                Some(Ok(msg)) => batch.push(msg),
                Some(Err(e)) => {
                    ctx.failed(format!("poll: {e}"));
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() {
            status.connected.store(true, Ordering::Relaxed);
            ctx.answered();
            status
                .consumed
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            if !handle_batch(feed, &batch, replier) {
                return; // shutting down: not committed, read again at the next start
            }
            if let Err(e) = commit(consumer, &batch) {
                ctx.failed(format!("commit of {} messages failed: {e}", batch.len()));
            }
        }
        if last_check.elapsed() > Duration::from_secs(5) {
            last_check = Instant::now();
            let ok = match consumer.fetch_metadata(Some(&cfg.topic), Duration::from_secs(2)) {
                Ok(_) => {
                    ctx.answered();
                    true
                }
                Err(e) => {
                    ctx.failed(format!("metadata of {:?}: {e}", cfg.topic));
                    false
                }
            };
            status.connected.store(ok, Ordering::Relaxed);
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        log::debug!("kafka: final commit: {e}");
    }
}

/// Commits, for each partition in `batch`, the offset after its last message.
fn commit(consumer: &BaseConsumer<Ctx>, batch: &[BorrowedMessage<'_>]) -> KafkaResult<()> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    consumer.commit(&tpl, CommitMode::Async)
}

/// Submits a batch of messages as one durable write when every message is valid; otherwise
/// (or on a duplicate id) one message at a time, so a bad one is set aside alone. True when
/// the batch's offsets may be committed.
fn handle_batch(feed: &Feed, batch: &[BorrowedMessage<'_>], replier: Option<&Replier>) -> bool {
    if batch.len() > 1 {
        let mut values = Vec::new();
        let mut all_json = true;
        for m in batch {
            match serde_json::from_slice::<Value>(m.payload().unwrap_or_default()) {
                Ok(Value::Array(items)) if !items.is_empty() => values.extend(items),
                Ok(Value::Array(_)) | Err(_) => all_json = false,
                Ok(v) => values.push(v),
            }
        }
        if all_json {
            match submit_retrying(feed, &values, batch[0].offset()) {
                Some(Ok(())) => return true,
                None => return false,
                Some(Err(_)) => {} // invalid or duplicate somewhere: sort it out one by one
            }
        }
    }
    batch.iter().all(|m| handle(feed, m, replier))
}

/// Submits until durable, retrying while the store is unavailable. `None` when shutting down;
/// `Some(Err)` for input errors.
fn submit_retrying(feed: &Feed, values: &[Value], offset: i64) -> Option<Result<(), SubmitError>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match feed.submitter.submit(values, Origin::Kafka, |_| {}) {
            Ok(_) => return Some(Ok(())),
            Err(SubmitError::ShuttingDown) => return None,
            Err(e @ SubmitError::Unavailable(_)) => {
                // Not committed and not skipped: the same messages are tried until durable.
                log::error!("kafka: offset {offset} not accepted yet: {e}");
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
                if !feed.submitter.accepting() {
                    return None;
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Submits one message; true when its offset may be committed.
fn handle(feed: &Feed, msg: &BorrowedMessage<'_>, replier: Option<&Replier>) -> bool {
    let payload = msg.payload().unwrap_or_default();
    let values = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Array(items)) => items,
        Ok(v) => vec![v],
        Err(e) => {
            invalid(
                feed,
                msg,
                None,
                &format!("message is not valid JSON: {e}"),
                replier,
            );
            return true;
        }
    };
    match submit_retrying(feed, &values, msg.offset()) {
        None => false,
        Some(Ok(())) => true,
        // Read again after a crash: what is stored stays, the rest of the array goes in now.
        Some(Err(SubmitError::Duplicate(_))) if values.len() > 1 => values
            .iter()
            .all(|v| submit_retrying(feed, std::slice::from_ref(v), msg.offset()).is_some()),
        Some(Err(SubmitError::Duplicate(_))) => true,
        Some(Err(e)) => {
            let id = values
                .first()
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string);
            invalid(feed, msg, id.as_deref(), &e.to_string(), replier);
            true
        }
    }
}

/// Keeps an invalid message in `<dead>/invalid/` and tells the result topic.
fn invalid(
    feed: &Feed,
    msg: &BorrowedMessage<'_>,
    id: Option<&str>,
    reason: &str,
    replier: Option<&Replier>,
) {
    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
    let record = json!({
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "payload": String::from_utf8_lossy(msg.payload().unwrap_or_default()),
        "reason": reason,
        "at": crate::clock::rfc3339_ms(now_ms()),
    });
    let name = format!("{topic}-{partition}-{offset}.json").replace('/', "_");
    match write_atomic(&feed.invalid_dir, &name, record.to_string().as_bytes()) {
        Ok(p) => log::warn!(
            "kafka: invalid message {topic}/{partition}/{offset}: {reason}; kept in {}",
            p.display()
        ),
        Err(e) => log::error!(
            "kafka: invalid message {topic}/{partition}/{offset} ({reason}) could not be kept: {e}"
        ),
    }
    if let Some(r) = replier {
        let key = id
            .map(str::to_string)
            .unwrap_or_else(|| format!("{topic}-{partition}-{offset}"));
        let body = json!({
            "id": id, "request_id": id, "result": "Fail", "reason": reason, "status": "invalid",
            "topic": topic, "partition": partition, "offset": offset,
        });
        r.send(&key, &body.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// A Replier whose producer queue holds one message, towards a broker that is not there
    /// (nothing is ever delivered: queued results stay queued until they time out).
    fn replier_with_a_queue_of_one() -> Arc<Replier> {
        replier_timing_out_after("300000")
    }

    fn replier_timing_out_after(message_timeout_ms: &str) -> Arc<Replier> {
        let producer: BaseProducer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("queue.buffering.max.messages", "1")
            .set("message.timeout.ms", message_timeout_ms)
            .create_with_context(Ctx::new(Arc::new(KafkaStatus::default())))
            .expect("producer");
        Arc::new(Replier {
            producer,
            topic: "results".into(),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        })
    }

    /// Whether the producer's queue (of one) is taken: a message offered now is refused.
    fn full(r: &Replier) -> bool {
        use rdkafka::types::RDKafkaErrorCode;
        let probe = BaseRecord::to(&r.topic).key("probe").payload("{}");
        matches!(
            r.producer.send(probe),
            Err((
                RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                _
            ))
        )
    }

    /// A result met by a full producer queue waits for room (up to 5 s), instead of being
    /// dropped at once; with no room by then it is dropped, and the caller (the results thread)
    /// goes on.
    #[test]
    fn a_result_met_by_a_full_producer_queue_waits_for_room_then_gives_up() {
        use rdkafka::producer::PurgeConfig;
        let r = replier_with_a_queue_of_one();
        r.send("first", "{}");
        assert!(full(&r), "the first result is queued");
        // Room is made half a second after the second send began.
        let r2 = r.clone();
        let freer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(500));
            r2.producer.purge(PurgeConfig::default().queue());
            // Serves the purged message's delivery report, which frees its place.
            r2.producer.poll(Duration::from_millis(100));
        });
        r.send("second", "{}");
        freer.join().expect("join");
        r.producer.poll(Duration::from_millis(100));
        assert!(
            full(&r),
            "the second result was dropped instead of waiting for room"
        );
        // The queue stays full: the third send gives up (a generous deadline for its 5 s).
        let (tx, rx) = crossbeam_channel::bounded(1);
        let r3 = r.clone();
        thread::spawn(move || {
            r3.send("third", "{}");
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "a send to a full queue still waits after 60 s"
        );
    }

    /// `flush` (the stop of the produce stage) returns once the queue is empty, its results
    /// delivered or, as here with no broker, timed out (after 1 s) and reported, not at once.
    #[test]
    fn flush_waits_until_queued_results_have_left() {
        let r = replier_timing_out_after("1000");
        r.send("queued", "{}");
        assert!(full(&r), "the result is queued");
        r.flush();
        assert!(
            !full(&r),
            "the result is still queued after the flush returned"
        );
    }

    /// A start-up error names the flag to fix (the line poulpe prints before exiting 2) and keeps
    /// rdkafka's error as its cause.
    #[test]
    fn start_errors_name_the_flag_and_keep_the_cause() {
        let cases = [
            (
                KafkaError::Producer(RdKafkaError::ClientCreation("no".into())),
                "--kafka_servers: cannot create a producer: ",
            ),
            (
                KafkaError::Consumer(RdKafkaError::ClientCreation("no".into())),
                "--kafka_servers: cannot create a consumer: ",
            ),
            (
                KafkaError::Subscribe("t".into(), RdKafkaError::Subscription("t".into())),
                "--kafka_topic: cannot subscribe to \"t\": ",
            ),
            (KafkaError::Thread(io::Error::other("no thread")), ""),
        ];
        for (e, head) in cases {
            let text = e.to_string();
            let cause = e.source().map(ToString::to_string);
            assert_eq!(
                Some(text.clone()),
                cause.map(|c| format!("{head}{c}")),
                "{e:?}"
            );
        }
    }
}
