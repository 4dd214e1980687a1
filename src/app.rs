//! Wiring: builds the store and every stage's threads from a `Config`, recovers unfinished
//! tasks, and stops it all gracefully.

use crate::config::Config;
use crate::dispatch::Pool;
use crate::exec::{http::HttpExec, mail::MailExec, Executors};
use crate::outcome::{OutcomeStage, RetryPolicy};
use crate::results::Results;
use crate::schedule::cron::{parse_file, CronError};
use crate::schedule::cron_runner::{self, CronCmd, CronStatus};
use crate::schedule::timer::Timer;
use crate::status::{KafkaStatus, Status};
use crate::store::redis::RedisStore;
use crate::store::{self, Store, StoreError};
use crate::task::Limits;
use crossbeam_channel::{unbounded, Sender};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long start-up waits for an unreachable Redis before giving up.
const REDIS_START_WAIT: Duration = Duration::from_secs(5);

/// Everything the adapters need, shared by all threads.
pub struct App {
    pub config: Config,
    pub limits: Limits,
    pub store: Arc<dyn Store>,
    pub pool: Arc<Pool>,
    pub timer: Timer,
    pub results: Arc<Results>,
    pub status: Arc<Status>,
    /// False once shutdown has begun: submits answer 503.
    pub accepting: AtomicBool,
    /// The cron schedule as `/sys_info` shows it (empty without `--cron`).
    pub cron: CronStatus,
    /// Tells the cron thread to reload (SIGHUP) or stop.
    pub cron_tx: Option<Sender<CronCmd>>,
    /// Open WebSocket connections (capped by `--max_ws`).
    pub ws_open: AtomicUsize,
    /// The Kafka adapter's state, when Kafka is configured.
    pub kafka: Option<Arc<KafkaStatus>>,
}

/// Threads to wait for at shutdown.
pub struct Running {
    workers: Vec<JoinHandle<()>>,
    outcome: JoinHandle<()>,
    timer: JoinHandle<()>,
    cron: Option<JoinHandle<()>>,
    #[cfg(feature = "kafka")]
    kafka: Option<JoinHandle<()>>,
    #[cfg(feature = "kafka")]
    replier: Option<Arc<crate::intake::kafka::Replier>>,
}

/// Why the server could not start (exit code 2).
#[derive(Debug)]
pub enum StartError {
    Store(StoreError),
    Thread(std::io::Error),
    Dir(String),
    Cron(CronError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
            StartError::Dir(e) => write!(f, "{e}"),
            StartError::Cron(e) => write!(f, "--cron: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> StartError {
        StartError::Thread(e)
    }
}

/// Opens the store, starts timer, workers and outcome stage, and re-arms unfinished tasks.
pub fn start(config: Config) -> Result<(Arc<App>, Running), StartError> {
    let limits = Limits {
        workers: config.workers,
        exec: config.exec.clone(),
        mail_enabled: config.smtp.is_some(),
        mail_from: config.smtp.as_ref().and_then(|s| s.from.clone()),
    };
    // A bad cron file stops start-up before anything is opened.
    let cron_lines = match &config.cron {
        Some(path) => Some(parse_file(path, &limits, config.tz).map_err(StartError::Cron)?),
        None => None,
    };
    std::fs::create_dir_all(&config.dead).map_err(|e| {
        StartError::Dir(format!(
            "--dead: cannot create {}: {e}",
            config.dead.display()
        ))
    })?;
    let store: Arc<dyn Store> = match &config.redis {
        Some(url) => Arc::new(
            RedisStore::open(url, &config.redis_prefix, REDIS_START_WAIT)
                .map_err(|e| StartError::Dir(format!("--redis: {e}")))?,
        ),
        None => Arc::new(
            store::embedded::open(&config.data)
                .map_err(|e| StartError::Dir(format!("--data: {e}")))?,
        ),
    };
    let pool = Arc::new(Pool::new(config.workers));
    let (timer, timer_h) = Timer::start(store.clone(), pool.clone())?;
    let results = Results::start()?;
    let status = Arc::new(Status::default());
    let timeout = Duration::from_secs(config.task_timeout);
    let mail = match &config.smtp {
        Some(smtp) => Some(MailExec::new(smtp, config.workers, timeout).map_err(StartError::Dir)?),
        None => None,
    };
    let executors = Arc::new(Executors {
        http: HttpExec::new(config.workers, config.ca_file.as_deref()),
        mail,
        exec: config.exec.clone(),
        default_timeout: timeout,
    });
    let kafka_status = config
        .kafka
        .as_ref()
        .map(|_| Arc::new(KafkaStatus::default()));
    #[cfg(feature = "kafka")]
    let replier = match (&config.kafka, &kafka_status) {
        (Some(k), Some(st)) => {
            crate::intake::kafka::Replier::start(k, st.clone()).map_err(StartError::Dir)?
        }
        _ => None,
    };
    #[cfg(feature = "kafka")]
    let forward: Option<Arc<dyn crate::results::Forward>> = replier
        .clone()
        .map(|r| r as Arc<dyn crate::results::Forward>);
    #[cfg(not(feature = "kafka"))]
    let forward: Option<Arc<dyn crate::results::Forward>> = None;
    let (otx, orx) = unbounded();
    let mut workers = Vec::with_capacity(config.workers);
    for w in 0..config.workers {
        workers.push(crate::worker::start(
            w,
            pool.clone(),
            store.clone(),
            executors.clone(),
            otx.clone(),
        )?);
    }
    drop(otx);
    let outcome = OutcomeStage {
        store: store.clone(),
        timer: timer.clone(),
        results: results.clone(),
        status: status.clone(),
        policy: RetryPolicy {
            interval_s: config.retry_interval,
            max_retry: config.max_retry,
            backoff: config.backoff,
            result_ttl_s: config.result_ttl,
            dead_dir: config.dead.clone(),
        },
        forward,
    }
    .start(orx)?;

    let t0 = Instant::now();
    let recovered = store.recover().map_err(StartError::Store)?;
    let was_running = recovered.iter().filter(|r| r.was_running).count();
    let count = recovered.len();
    timer.schedule_all(recovered.into_iter().map(|r| (r.id, r.due_us)).collect());
    if count > 0 {
        log::info!(
            "recovered {count} unfinished tasks ({was_running} were running and run again) in {} ms",
            t0.elapsed().as_millis()
        );
    }
    store::start_gc(store.clone(), Duration::from_secs(1), config.result_max)?;

    let (cron_tx, cron_rx) = unbounded();
    let app = Arc::new(App {
        config,
        limits,
        store,
        pool,
        timer,
        results,
        status,
        accepting: AtomicBool::new(true),
        cron: CronStatus::default(),
        cron_tx: cron_lines.as_ref().map(|_| cron_tx),
        ws_open: AtomicUsize::new(0),
        kafka: kafka_status.clone(),
    });
    #[cfg(feature = "kafka")]
    let kafka = match (&app.config.kafka, &kafka_status) {
        (Some(k), Some(st)) => {
            log::info!(
                "kafka: consuming {:?} from {} in group {:?}{}",
                k.topic,
                k.servers,
                k.group,
                k.resp_topic
                    .as_ref()
                    .map(|t| format!(", results to {t:?}"))
                    .unwrap_or_default()
            );
            Some(
                crate::intake::kafka::start(app.clone(), k.clone(), st.clone(), replier.clone())
                    .map_err(StartError::Dir)?,
            )
        }
        _ => None,
    };
    let cron = match (cron_lines, &app.config.cron) {
        (Some(lines), Some(path)) => {
            log::info!("cron: {} lines from {}", lines.len(), path.display());
            Some(cron_runner::start(
                app.clone(),
                path.clone(),
                lines,
                app.config.cron_catchup,
                cron_rx,
            )?)
        }
        _ => None,
    };
    Ok((
        app,
        Running {
            workers,
            outcome,
            timer: timer_h,
            cron,
            #[cfg(feature = "kafka")]
            kafka,
            #[cfg(feature = "kafka")]
            replier,
        },
    ))
}

/// Graceful stop: refuse new tasks, let running attempts finish (up to `grace`), record their
/// outcomes, answer parked clients. Pending tasks stay in the store for the next start.
pub fn shutdown(app: &App, running: Running, grace: Duration) {
    if let Some(tx) = &app.cron_tx {
        let _ = tx.send(CronCmd::Stop);
    }
    app.accepting.store(false, Ordering::Release);
    let busy = app.pool.running();
    log::info!("shutting down: {busy} running attempts may finish (up to {grace:?})");
    app.pool.stop();
    app.timer.stop();
    let deadline = Instant::now() + grace;
    let mut all_done = true;
    for w in running.workers {
        while !w.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if w.is_finished() {
            let _ = w.join();
        } else {
            all_done = false;
        }
    }
    // The outcome thread ends once every worker has gone (their senders drop); it gets a few
    // seconds to record the last outcomes. A worker still running at the deadline keeps it
    // alive, so there is nothing to wait for then.
    let record_by = Instant::now() + Duration::from_secs(5);
    while all_done && !running.outcome.is_finished() && Instant::now() < record_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    if app.pool.running() > 0 {
        log::warn!(
            "{} attempts still running at the deadline; they run again at the next start",
            app.pool.running()
        );
    }
    #[cfg(feature = "kafka")]
    {
        if let Some(k) = running.kafka {
            let _ = k.join();
        }
        if let Some(r) = &running.replier {
            r.flush();
        }
    }
    let _ = running.timer.join();
    if let Some(c) = running.cron {
        let _ = c.join();
    }
    app.results.stop();
    app.store.close();
}
