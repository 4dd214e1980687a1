//! Wiring: builds the store and every stage's threads from a `Config`, recovers unfinished
//! tasks, and stops it all gracefully, stage by stage in reverse order. Only `main.rs` uses it;
//! adapters get the narrow handles of [`Server`], never the server itself.

use crate::config::Config;
use crate::dispatch::Pool;
use crate::exec::mail::{MailError, MailExec};
use crate::exec::{http::HttpExec, Executors};
use crate::intake::{Cancelling, Submitter};
use crate::node::Registry;
use crate::outcome::{Announce, OutcomeStage, RetryPolicy};
use crate::results::{Answers, Results};
use crate::schedule::cron::{parse_file, CronError};
use crate::schedule::cron_runner::{self, CronCmd, CronStatus};
use crate::schedule::timer::Timer;
use crate::stage::Stage;
use crate::status::{KafkaStatus, Status, SysInfo};
use crate::store::redis::RedisStore;
use crate::store::{self, Store, StoreError};
use crate::task::Limits;
use crossbeam_channel::{unbounded, Sender};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long start-up waits for an unreachable Redis before giving up.
const REDIS_START_WAIT: Duration = Duration::from_secs(5);

/// A started server: the handles the adapters are built from, and its stages.
pub struct Server {
    pub config: Config,
    /// The one way in (HTTP, WebSocket, Kafka and cron all submit through it).
    pub submitter: Submitter,
    /// Finished results and waits for results to come.
    pub answers: Answers,
    /// `/sys_info`.
    pub sys_info: SysInfo,
    /// Tells the cron thread to reload (SIGHUP); `None` without `--cron`.
    cron_tx: Option<Sender<CronCmd>>,
    /// In start order; stopped in reverse.
    stages: Vec<Stage>,
    pool: Arc<Pool>,
}

/// Why the server could not start (exit code 2).
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// Recovering unfinished tasks failed.
    Store(StoreError),
    /// A thread could not be started.
    Thread(std::io::Error),
    /// `--dead` cannot be created.
    DeadDir(std::path::PathBuf, std::io::Error),
    /// The store named by `--data` or `--redis` cannot be opened (the flag, the reason).
    OpenStore(&'static str, StoreError),
    /// The SMTP relay settings are unusable.
    Mail(MailError),
    /// The Kafka clients cannot be created.
    #[cfg(feature = "kafka")]
    Kafka(crate::intake::kafka::KafkaError),
    /// The cron file is invalid.
    Cron(CronError),
    /// This node cannot join the others (`--node_id` held by a live node).
    Node(crate::node::JoinError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
            StartError::DeadDir(p, e) => write!(f, "--dead: cannot create {}: {e}", p.display()),
            // The flag says which store: "store unavailable" would only repeat it.
            StartError::OpenStore(flag, StoreError::Unavailable(why)) => write!(f, "{flag}: {why}"),
            StartError::OpenStore(flag, e) => write!(f, "{flag}: {e}"),
            StartError::Mail(e) => write!(f, "{e}"),
            #[cfg(feature = "kafka")]
            StartError::Kafka(e) => write!(f, "{e}"),
            StartError::Cron(e) => write!(f, "--cron: {e}"),
            StartError::Node(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Store(e) | StartError::OpenStore(_, e) => Some(e),
            StartError::Thread(e) | StartError::DeadDir(_, e) => Some(e),
            StartError::Cron(e) => Some(e),
            StartError::Node(e) => Some(e),
            StartError::Mail(e) => Some(e),
            #[cfg(feature = "kafka")]
            StartError::Kafka(e) => Some(e),
        }
    }
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> StartError {
        StartError::Thread(e)
    }
}

/// Opens the store, starts the pipeline (timer, workers, outcome), recovers unfinished tasks,
/// then starts the adapters that feed it by themselves (Kafka, cron). HTTP is started by the
/// caller from the handles in [`Server`].
pub fn start(config: Config) -> Result<Server, StartError> {
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
    crate::node::set_own(&config.node_id);
    let (store, registry) = open_store(&config)?;
    if let Some(reg) = &registry {
        crate::node::join(&**reg, &config.node_id, config.workers).map_err(StartError::Node)?;
    }
    let mut stages = vec![Stage::new(
        "store",
        {
            let store = store.clone();
            move || store.close()
        },
        Vec::new(),
    )];
    let pool = Arc::new(Pool::new(config.workers));
    let status = Arc::new(Status::default());
    let (results, results_h) = Results::start()?;
    stages.push(Stage::new(
        "results",
        {
            let results = results.clone();
            move || results.stop()
        },
        vec![results_h],
    ));
    let (timer, timer_h) = Timer::start(store.clone(), pool.clone())?;
    // Beats until the store closes (after the workers' grace, so that no other node adopts
    // the tasks still running here); adopts once recovery has run (which takes the dead
    // nodes' tasks found at start itself) and until the timer stops.
    let adopting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nodes = crate::node::Nodes {
        own: Arc::from(config.node_id.as_str()),
        live: registry.as_ref().map(|_| Default::default()),
    };
    let answers = Answers::new(results.clone(), store.clone());
    let steal_from = registry.clone();
    if let (Some(registry), Some(live)) = (registry, &nodes.live) {
        stages.push(
            crate::node::heartbeat::Heartbeat {
                registry: registry.clone(),
                own: nodes.own.clone(),
                pool: pool.clone(),
                timer: timer.clone(),
                live: live.clone(),
                adopting: adopting.clone(),
                every: Duration::from_millis(config.node_ttl * 1000 / 3),
            }
            .start()?,
        );
        // Stops before the heartbeat, after the workers: results other nodes record during
        // the grace still reach the clients waiting here.
        stages.push(
            crate::node::listen::Listen {
                registry,
                answers: answers.clone(),
                own: nodes.own.clone(),
            }
            .start()?,
        );
    }
    let kafka_status = config
        .kafka
        .as_ref()
        .map(|_| Arc::new(KafkaStatus::default()));
    let kafka = kafka::Kafka::new(&config, kafka_status.clone())?;
    // Stops after the workers and the outcome stage: results of the last attempts still go out.
    stages.extend(kafka.producer_stage());
    let (otx, orx) = unbounded();
    let announce = Announce {
        results: results.clone(),
        status: status.clone(),
        forward: kafka.forward(),
    };
    let outcome = OutcomeStage {
        store: store.clone(),
        timer: timer.clone(),
        announce: announce.clone(),
        policy: RetryPolicy {
            interval_s: config.retry_interval,
            max_retry: config.max_retry,
            backoff: config.backoff,
            result_ttl_s: config.result_ttl,
            dead_dir: config.dead.clone(),
        },
    }
    .start(orx)?;
    // The outcome thread ends by itself once every worker has gone (their senders drop).
    stages.push(Stage::joined("outcome", vec![outcome]));
    let executors = executors(&config)?;
    // Before any worker takes a task: a pause stored before a restart holds.
    if store
        .get_meta(crate::intake::PAUSED_KEY)
        .map_err(StartError::Store)?
        == Some("true".into())
    {
        pool.set_paused(true);
        log::info!("the server starts paused: workers take no task until POST /resume");
    }
    let mut workers = Vec::with_capacity(config.workers);
    for w in 0..config.workers {
        workers.push(crate::worker::start(
            w,
            config.worker_nice,
            pool.clone(),
            store.clone(),
            executors.clone(),
            otx.clone(),
        )?);
    }
    drop(otx);
    stages.push(
        Stage::new(
            "workers",
            {
                let pool = pool.clone();
                move || pool.stop()
            },
            workers,
        )
        .taking_grace(),
    );
    stages.push(Stage::new(
        "timer",
        {
            let timer = timer.clone();
            move || timer.stop()
        },
        vec![timer_h],
    ));
    recover(&*store, &timer)?;
    adopting.store(true, std::sync::atomic::Ordering::Release);
    stages.push(Stage::new(
        "adoption",
        move || adopting.store(false, std::sync::atomic::Ordering::Release),
        Vec::new(),
    ));
    stages.push(store::start_gc(
        store.clone(),
        Duration::from_secs(1),
        config.result_max,
    )?);

    let submitter = Submitter::new(
        limits,
        store.clone(),
        pool.clone(),
        timer,
        status.clone(),
        Cancelling {
            announce,
            result_ttl_s: config.result_ttl,
        },
        config.dead.clone(),
    );
    let cron = CronStatus::default();
    stages.extend(kafka.start(&config, &submitter)?);
    let (cron_tx, cron_rx) = unbounded();
    let cron_tx = match (cron_lines, &config.cron) {
        (Some(lines), Some(path)) => {
            log::info!(
                "cron: {} lines from {}, times in {} (from {})",
                lines.len(),
                path.display(),
                config.tz,
                config.tz_from
            );
            let deps = cron_runner::CronDeps {
                submitter: submitter.clone(),
                store: store.clone(),
                tz: config.tz,
                status: cron.clone(),
            };
            let h = cron_runner::start(deps, path.clone(), lines, config.cron_catchup, cron_rx)?;
            let tx = cron_tx.clone();
            stages.push(Stage::new(
                "cron",
                move || {
                    let _ = tx.send(CronCmd::Stop);
                },
                vec![h],
            ));
            Some(cron_tx)
        }
        _ => None,
    };
    // Last to start, first to stop: no new task once shutdown begins.
    stages.push(Stage::new(
        "intake",
        {
            let submitter = submitter.clone();
            move || submitter.refuse_new()
        },
        Vec::new(),
    ));
    // Stops first: a node shutting down takes no other node's task.
    if let (Some(registry), Some(live)) = (steal_from, &nodes.live) {
        stages.push(
            crate::node::steal::Steal {
                registry,
                pool: pool.clone(),
                live: live.clone(),
                own: nodes.own.clone(),
            }
            .start()?,
        );
    }
    Ok(Server {
        answers,
        sys_info: SysInfo {
            status,
            pool: pool.clone(),
            store,
            cron,
            kafka: kafka_status,
            tz: (config.tz, config.tz_from.clone()),
            nodes,
        },
        submitter,
        config,
        cron_tx,
        stages,
        pool,
    })
}

/// A store and its registry of nodes, when it has one (Redis).
type Opened = (Arc<dyn Store>, Option<Arc<dyn Registry>>);

/// The store the flags ask for, and its registry of nodes when it has one (Redis).
fn open_store(config: &Config) -> Result<Opened, StartError> {
    std::fs::create_dir_all(&config.dead)
        .map_err(|e| StartError::DeadDir(config.dead.clone(), e))?;
    Ok(match &config.redis {
        Some(url) => {
            let redis = Arc::new(
                RedisStore::open(
                    url,
                    &config.redis_prefix,
                    &config.node_id,
                    config.node_ttl,
                    REDIS_START_WAIT,
                )
                .map_err(|e| StartError::OpenStore("--redis", e))?,
            );
            (redis.clone(), Some(redis))
        }
        None => (
            Arc::new(
                store::embedded::open(
                    &config.data,
                    std::time::Duration::from_millis(config.checkpoint_ms),
                )
                .map_err(|e| StartError::OpenStore("--data", e))?,
            ),
            None,
        ),
    })
}

fn executors(config: &Config) -> Result<Arc<Executors>, StartError> {
    let timeout = Duration::from_secs(config.task_timeout);
    let mail = match &config.smtp {
        Some(smtp) => Some(MailExec::new(smtp, config.workers, timeout).map_err(StartError::Mail)?),
        None => None,
    };
    Ok(Arc::new(Executors {
        http: HttpExec::new(config.workers, config.ca_file.as_deref(), timeout),
        mail,
        exec: config.exec.clone(),
        spawner: crate::exec::program::Spawner::start(),
        default_timeout: timeout,
    }))
}

/// Hands every unfinished task in the store to the timer (running ones run again).
fn recover(store: &dyn Store, timer: &Timer) -> Result<(), StartError> {
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
    Ok(())
}

/// The Kafka adapter's parts, or nothing without the `kafka` feature or flags.
mod kafka {
    use super::*;

    pub(crate) struct Kafka {
        #[cfg(feature = "kafka")]
        parts: Option<(
            crate::config::KafkaConfig,
            Arc<KafkaStatus>,
            Option<Arc<crate::intake::kafka::Replier>>,
        )>,
    }

    impl Kafka {
        /// Creates the result producer (when a result topic is set).
        #[cfg(feature = "kafka")]
        pub(crate) fn new(
            config: &Config,
            status: Option<Arc<KafkaStatus>>,
        ) -> Result<Kafka, StartError> {
            let parts = match (&config.kafka, status) {
                (Some(k), Some(st)) => {
                    let replier = crate::intake::kafka::Replier::start(k, st.clone())
                        .map_err(StartError::Kafka)?;
                    Some((k.clone(), st, replier))
                }
                _ => None,
            };
            Ok(Kafka { parts })
        }

        #[cfg(not(feature = "kafka"))]
        pub(crate) fn new(_: &Config, _: Option<Arc<KafkaStatus>>) -> Result<Kafka, StartError> {
            Ok(Kafka {})
        }

        /// Where results of Kafka tasks also go.
        pub(crate) fn forward(&self) -> Option<Arc<dyn crate::results::Forward>> {
            #[cfg(feature = "kafka")]
            if let Some((_, _, Some(r))) = &self.parts {
                return Some(r.clone() as Arc<dyn crate::results::Forward>);
            }
            None
        }

        /// The result producer's stage, when there is one.
        pub(crate) fn producer_stage(&self) -> Option<Stage> {
            #[cfg(feature = "kafka")]
            if let Some((_, _, Some(r))) = &self.parts {
                return Some(r.stage());
            }
            None
        }

        /// Starts the consumer; its stage.
        #[cfg(feature = "kafka")]
        pub(crate) fn start(
            self,
            config: &Config,
            submitter: &Submitter,
        ) -> Result<Vec<Stage>, StartError> {
            let Some((k, st, replier)) = self.parts else {
                return Ok(Vec::new());
            };
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
            let mut stages = Vec::new();
            let feed = crate::intake::kafka::Feed {
                submitter: submitter.clone(),
                invalid_dir: config.dead.join("invalid"),
            };
            let h = crate::intake::kafka::start(feed, k, st, replier).map_err(StartError::Kafka)?;
            // It ends by itself once the intake refuses new tasks.
            stages.push(Stage::joined("kafka-poll", vec![h]));
            Ok(stages)
        }

        #[cfg(not(feature = "kafka"))]
        pub(crate) fn start(self, _: &Config, _: &Submitter) -> Result<Vec<Stage>, StartError> {
            Ok(Vec::new())
        }
    }
}

impl Server {
    /// Tells the cron thread to read its file again (SIGHUP).
    pub fn reload_cron(&self) {
        match &self.cron_tx {
            Some(tx) => {
                let _ = tx.send(CronCmd::Reload);
            }
            None => log::info!("SIGHUP: no cron file to reload"),
        }
    }

    /// Graceful stop: refuse new tasks, let running attempts finish (up to `grace`), record
    /// their outcomes, answer parked clients, close the store. Each stage is stopped in the
    /// reverse of its start order. Pending tasks stay in the store for the next start.
    pub fn shutdown(mut self, grace: Duration) {
        log::info!(
            "shutting down: {} running attempts may finish (up to {grace:?})",
            self.pool.running()
        );
        while let Some(stage) = self.stages.pop() {
            let within = if stage.takes_grace() {
                grace
            } else {
                STAGE_STOP
            };
            stage.stop_and_join(within);
        }
        if self.pool.running() > 0 {
            log::warn!(
                "{} attempts still running at the deadline; they run again at the next start",
                self.pool.running()
            );
            let killed = crate::exec::program::kill_running();
            if killed > 0 {
                log::warn!("{killed} programs still running were killed (process groups)");
            }
        }
    }
}

/// How long a stage other than the workers may take to stop.
const STAGE_STOP: Duration = Duration::from_secs(5);
