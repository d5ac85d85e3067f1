//! Shared helpers of the fair-use and supervisor tests: scripted classifiers, a supervisor harness on
//! virtual time, and log capture.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use voicegate_engine::fair_use::{
    CapBreached, CapSupervisor, Classifier, ClassifierError, FairUseLedger, GetSupervisorStats,
    LogNotifier, NoSessions, SupervisorDeps, SupervisorStats, UsageSnapshot,
};
use voicegate_engine::policy::{
    CapKind, CapTrigger, FairUseConfig, RollingTotals, SoftCaps, Stage, UsageType, Verdict,
};
use voicegate_engine::store::fair_use::{MemoryCooldownLock, MemoryFairUseStore};
use voicegate_engine::time::{Clock, TokioClock};

pub const T0: u64 = 1_790_000_000_000;
pub const HOUR_MS: u64 = 3_600_000;

pub fn verdict(score: f64) -> Verdict {
    Verdict {
        misuse_score: score,
        usage_type: UsageType::Audiobook,
        confidence: 0.9,
        evidence: Vec::new(),
        reasoning: "scripted".into(),
        model: "scripted".into(),
        classifier_failed: None,
    }
}

/// What a scripted classifier does on one call.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Score(f64),
    Error,
    Panic,
    Hang,
}

/// A classifier that plays a script (the last step repeats), counting calls per uid and peak concurrency.
#[derive(Clone, Default)]
pub struct Scripted(Arc<ScriptState>);

#[derive(Default)]
pub struct ScriptState {
    pub script: Vec<Step>,
    pub work: Duration,
    pub calls: Mutex<HashMap<String, usize>>,
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
}

impl std::ops::Deref for Scripted {
    type Target = ScriptState;
    fn deref(&self) -> &ScriptState {
        &self.0
    }
}

impl Scripted {
    pub fn new(script: Vec<Step>) -> Arc<Self> {
        Arc::new(Scripted(Arc::new(ScriptState {
            script,
            ..Default::default()
        })))
    }

    pub fn with_work(script: Vec<Step>, work: Duration) -> Arc<Self> {
        Arc::new(Scripted(Arc::new(ScriptState {
            script,
            work,
            ..Default::default()
        })))
    }
}

impl ScriptState {
    pub fn calls(&self, uid: &str) -> usize {
        self.calls.lock().unwrap().get(uid).copied().unwrap_or(0)
    }

    pub fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
}

struct Running<'a>(&'a AtomicUsize);
impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Classifier for Scripted {
    fn classify(
        &self,
        snapshot: UsageSnapshot,
    ) -> BoxFuture<'static, Result<Verdict, ClassifierError>> {
        let me = self.0.clone();
        Box::pin(async move {
            let n = {
                let mut calls = me.calls.lock().unwrap();
                let c = calls.entry(snapshot.uid.clone()).or_default();
                *c += 1;
                *c
            };
            let now = me.running.fetch_add(1, Ordering::SeqCst) + 1;
            me.peak.fetch_max(now, Ordering::SeqCst);
            let _guard = Running(&me.running);
            if !me.work.is_zero() {
                tokio::time::sleep(me.work).await;
            }
            let step = me
                .script
                .get(n - 1)
                .or(me.script.last())
                .copied()
                .unwrap_or(Step::Score(0.0));
            match step {
                Step::Score(s) => Ok(verdict(s)),
                Step::Error => Err(ClassifierError::Transport("connection refused".into())),
                Step::Panic => panic!("classifier exploded for {}", snapshot.uid),
                Step::Hang => {
                    tokio::time::sleep(Duration::from_secs(86_400)).await;
                    Ok(verdict(0.0))
                }
            }
        })
    }
}

pub fn breach(uid: &str, stage: Stage) -> CapBreached {
    CapBreached {
        uid: uid.to_owned(),
        stage,
        triggered: vec![CapTrigger {
            cap: CapKind::Daily,
            speech_ms: 7_300_000,
            threshold_ms: 7_200_000,
        }],
        totals: RollingTotals {
            daily_ms: 7_300_000,
            three_day_ms: 7_300_000,
            weekly_ms: 7_300_000,
        },
        caps: SoftCaps::default(),
    }
}

/// A supervisor over in-memory state and lock, on tokio's (virtual) clock.
pub struct Harness {
    pub addr: Addr<CapSupervisor>,
    pub ledger: FairUseLedger,
    pub lock: MemoryCooldownLock,
    pub notifier: LogNotifier,
    pub clock: Arc<TokioClock>,
    pub cfg: FairUseConfig,
}

impl Harness {
    pub fn start(classifier: Arc<dyn Classifier>) -> Harness {
        Self::start_with(classifier, FairUseConfig::default())
    }

    pub fn start_with(classifier: Arc<dyn Classifier>, cfg: FairUseConfig) -> Harness {
        let store = MemoryFairUseStore::new();
        let ledger = FairUseLedger::new(Arc::new(store), Arc::new(cfg.clone()));
        let lock = MemoryCooldownLock::new();
        let notifier = LogNotifier::new();
        let clock = TokioClock::new(T0);
        let deps = SupervisorDeps {
            classifier,
            lock: Arc::new(lock.clone()),
            sink: Arc::new(ledger.clone()),
            notifier: Arc::new(notifier.clone()),
            sessions: Arc::new(NoSessions),
            totals: None,
            clock: clock.clone(),
        };
        let addr = CapSupervisor::new(&cfg, deps).start();
        Harness {
            addr,
            ledger,
            lock,
            notifier,
            clock,
            cfg,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    pub async fn stats(&self) -> SupervisorStats {
        self.addr.send(GetSupervisorStats).await.unwrap()
    }

    /// Wait (virtual time, 10 ms steps) until nothing is queued or running.
    pub async fn settle(&self) -> SupervisorStats {
        for _ in 0..100_000 {
            let s = self.stats().await;
            if s.in_flight == 0 && s.queued == 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("supervisor did not settle");
    }

    pub async fn stage(&self, uid: &str) -> Stage {
        self.ledger.read(uid, self.now()).await.unwrap().stage
    }
}

/// Captured log output (fmt layer, no ANSI) for the current thread while the guard lives.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}
