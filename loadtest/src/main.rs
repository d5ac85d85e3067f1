//! `voicegate-loadtest`: drives a VoiceGate server from a separate process and checks its accounting.
//!
//! - `realtime`: N devices streaming fixture audio to `/v4/listen` at real-time pace (or faster).
//! - `sync`: concurrent device-file uploads to `/v1/sync-local-files`.
//! - `mixed`: both at once.
//! - `--retry-storm N` beside any of them: restricted users over a cap retry a refused upload N times at
//!   once; the report gives the refusals' latency and, with `--server-pid`, the server's CPU per refusal.
//! - Every run is bounded in count and time, prints a report (table or `--json`) and ends with the
//!   accounting check; the exit code is 0 only when the run passed (1: accounting, 2: traffic errors,
//!   3: the harness could not run, 4: the `--max-p99-ms` latency objective was missed).

mod auth;
mod check;
mod cli;
mod corpus;
mod http1;
mod live;
mod pacer;
mod realtime;
mod report;
mod storm;
mod stt_check;
mod sync;
mod wsframe;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use crate::auth::{Authenticator, unix_now};
use crate::check::{Audio, UserTraffic};
use crate::cli::{Cli, Common, Nodes, RealtimeArgs, Scenario, SyncArgs};
use crate::corpus::{Corpus, FRAME_MS, fixtures_dir};
use crate::live::Live;
use crate::pacer::RealtimeCtx;
use crate::realtime::StreamOutcome;
use crate::report::{LatencyObjective, RealtimeReport, Report, SyncReport, quantiles};
use crate::storm::StormCtx;
use crate::sync::{SyncCtx, UploaderOutcome};
use crate::wsframe::Target;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("voicegate-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("voicegate-loadtest: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let common = &cli.common;
    let nodes = common.url.clone();
    let prefix = common
        .users_prefix
        .clone()
        .unwrap_or_else(|| format!("lt{}p{}u", unix_now(), std::process::id()));
    let corpus = Arc::new(Corpus::load(&fixtures_dir(common.fixtures.clone()))?);
    let (rt_args, sync_args, name, shared_users) = match &cli.scenario {
        Scenario::Realtime(r) => (Some(r.clone()), None, "realtime", false),
        Scenario::Sync(s) => (None, Some(s.clone()), "sync", false),
        Scenario::Mixed {
            realtime,
            sync,
            shared_users,
        } => (
            Some(realtime.clone()),
            Some(sync.clone()),
            "mixed",
            *shared_users,
        ),
    };
    let longest = rt_args
        .as_ref()
        .map_or(0.0, |r| r.ramp + r.duration / r.pace.max(0.001));
    let auth = Authenticator {
        mode: common.auth.clone(),
        audience: common.jwt_audience.clone(),
        issuer: common.jwt_issuer.clone(),
        ttl_secs: 3_600 + longest as u64,
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let live = Arc::new(Live::default());
    let streams = rt_args.as_ref().map_or(0, |r| r.streams);
    let rt_users = rt_args.as_ref().map_or(0, |r| r.users());
    let first_sync_user = if shared_users { 0 } else { rt_users };
    let uploads = sync_args
        .as_ref()
        .map_or(0, |s| (s.uploaders * s.rounds) as u64);
    let hidden = common.quiet || common.json || !std::io::stderr().is_terminal();
    // The storm users are armed before the scenario's traffic starts: that traffic runs beside the storm,
    // not beside the arming uploads.
    let armed = match common.storm.retry_storm {
        Some(_) => {
            let admin_key = common.storm.admin_key.clone().ok_or(
                "--retry-storm needs the server's admin key (--admin-key or ADMIN_KEY) to restrict its users",
            )?;
            if !hidden {
                eprintln!("retry storm: restricting its users and taking them over a cap…");
            }
            let ctx = StormCtx {
                corpus: corpus.clone(),
                nodes: nodes.clone(),
                auth: auth.clone(),
                admin_key,
                prefix: prefix.clone(),
                clients: usize::from(common.storm.storm_clients),
                files: usize::from(common.storm.storm_files),
                timeout: Duration::from_secs(60),
            };
            let armed = storm::arm(&ctx).await?;
            warn_if_streams_reach_the_cap(rt_args.as_ref(), &armed);
            Some(armed)
        }
        None => None,
    };
    let check_stt = rt_args.as_ref().is_some_and(|r| r.check_stt);
    if check_stt && sync_args.is_some() {
        return Err(
            "--check-stt needs the realtime scenario (sync spans are transcribed too)".into(),
        );
    }
    let stt_before = if check_stt {
        Some(stt_check::read(&client, &nodes).await?)
    } else {
        None
    };
    let progress = live::spawn_progress(live.clone(), hidden, streams, uploads);

    let scenario_started = Instant::now();
    let storm_task = armed.map(|armed| {
        let (retries, files) = (
            common.storm.retry_storm.unwrap_or(0),
            usize::from(common.storm.storm_files),
        );
        let (after, pid) = (common.storm.storm_after.max(0.0), common.storm.server_pid);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(after)).await;
            storm::fire(armed, retries, files, pid, scenario_started).await
        })
    });
    let rt_task = rt_args.clone().map(|args| {
        realtime_ctx(
            &args,
            &nodes,
            &corpus,
            &auth,
            &live,
            common.survive_node_loss,
        )
        .map(|ctx| tokio::spawn(run_realtime(ctx, args, prefix.clone(), common.threads)))
    });
    let sync_task = sync_args.clone().map(|args| {
        let ctx = Arc::new(SyncCtx {
            corpus: corpus.clone(),
            client: client.clone(),
            nodes: nodes.clone(),
            first_user: first_sync_user,
            auth: auth.clone(),
            files: args.files,
            rounds: args.rounds,
            request_timeout: Duration::from_secs_f64(args.request_timeout.max(1.0)),
            v2: args.v2,
            pipeline: args.pipeline,
            backdate_days: args.backdate_days,
            round_interval: Duration::from_secs_f64(args.round_interval.max(0.0)),
            survive_node_loss: common.survive_node_loss,
            live: live.clone(),
        });
        tokio::spawn(run_sync(ctx, args, prefix.clone(), first_sync_user))
    });
    let rt = match rt_task {
        Some(t) => Some(t?.await.map_err(|e| format!("realtime task: {e}"))?),
        None => None,
    };
    let sy = match sync_task {
        Some(t) => Some(t.await.map_err(|e| format!("sync task: {e}"))?),
        None => None,
    };
    let storm = match storm_task {
        Some(t) => Some(t.await.map_err(|e| format!("storm task: {e}"))?),
        None => None,
    };
    progress.abort();

    let mut report = Report {
        scenario: name.to_owned(),
        url: nodes.joined(),
        users_prefix: prefix,
        ..Report::default()
    };
    let mut traffic = Vec::new();
    // With --survive-node-loss: when connections broke (streams and uploads).
    let mut breaks = Vec::new();
    let survive = common.survive_node_loss;
    if let (Some((outcomes, wall)), Some(args)) = (&rt, &rt_args) {
        let mut r = realtime_report(outcomes, args, *wall, &mut report.errors);
        r.peak_concurrent = live.streams_peak.load(std::sync::atomic::Ordering::Relaxed);
        report.realtime = Some(r);
        for o in outcomes {
            let t = user_traffic(&mut traffic, &o.user);
            for part in &o.sessions {
                let audio = Audio::Session {
                    start: o.start_clip,
                    first: part.first_frame,
                    frames: part.frames,
                };
                match (part.metadata, part.broken_at) {
                    (Some((m, at)), _) => {
                        t.tell(audio, survive.then_some(at));
                        t.reported_ms += m.speech_ms;
                    }
                    (None, Some(at)) => {
                        t.broken.push(audio);
                        breaks.push(at);
                    }
                    // Failed without metadata and not survived: counted as sent (an error was recorded).
                    (None, None) => t.tell(audio, None),
                }
            }
        }
    }
    if let (Some((outcomes, wall)), Some(args)) = (&sy, &sync_args) {
        report.sync = Some(sync_report(outcomes, args, *wall, &mut report.errors));
        for o in outcomes {
            let t = user_traffic(&mut traffic, &o.user);
            for (f, at) in o.files_sent.iter().zip(&o.files_told_at) {
                t.tell(Audio::File(*f), survive.then_some(*at));
            }
            t.broken
                .extend(o.files_unanswered.iter().map(|f| Audio::File(*f)));
            breaks.extend(o.breaks.iter().copied());
            t.reported_ms += o.speech_ms;
        }
    }
    if let Some(s) = storm {
        for a in &s.arming {
            let t = user_traffic(&mut traffic, &a.user);
            for f in &a.files {
                t.tell(Audio::File(*f), None);
            }
            t.reported_ms += a.speech_ms;
        }
        for (kind, n) in &s.report.other_answers {
            *report.errors.entry(kind.clone()).or_insert(0) += n;
        }
        report.storm = Some(s.report);
    }
    if let (Some(before), Some((outcomes, _))) = (stt_before, &rt) {
        // Every session with metadata has handed all its audio over (the count is at the hand-off).
        let after = stt_check::read(&client, &nodes).await?;
        let told: Vec<u64> = outcomes
            .iter()
            .flat_map(|o| o.sessions.iter())
            .filter_map(|p| p.metadata.map(|(m, _)| m.stt_forwarded_ms))
            .collect();
        report.stt = Some(stt_check::judge(before, after, &told));
    }
    let traffic_ok = report.errors.is_empty()
        && report
            .realtime
            .as_ref()
            // A run whose every stream was shed measured nothing.
            .is_none_or(|r| {
                r.frames_lost == 0
                    && r.frames_dropped == 0
                    && (r.streams == 0 || r.streams_connected > 0)
            });
    if !common.no_check {
        if !hidden {
            eprintln!("accounting check: status API and offline pipeline…");
        }
        let settle = Duration::from_secs(common.settle_secs);
        report.accounting = Some(
            check::run(
                corpus.clone(),
                traffic,
                client,
                &nodes,
                &auth,
                settle,
                survive.then_some(breaks),
            )
            .await,
        );
    }
    let check_ok = report.accounting.as_ref().is_none_or(|c| c.passed)
        && report.stt.as_ref().is_none_or(|s| s.passed);
    let latency_ok = report
        .realtime
        .as_ref()
        .and_then(|r| r.latency_objective.as_ref())
        .is_none_or(|l| l.met);
    report.passed = traffic_ok && check_ok && latency_ok;
    emit(&report, common)?;
    Ok(if !check_ok {
        ExitCode::from(1)
    } else if !traffic_ok {
        ExitCode::from(2)
    } else if !latency_ok {
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    })
}

/// A realtime user whose speech could reach the storm's cap would breach it too: its classification would
/// then be part of what a storm run measures.
fn warn_if_streams_reach_the_cap(rt: Option<&RealtimeArgs>, armed: &[storm::Armed]) {
    let cap_above_ms = armed
        .iter()
        .map(|a| a.arming.speech_before_last_ms)
        .max()
        .unwrap_or(0);
    let Some(r) = rt.filter(|r| r.streams > 0) else {
        return;
    };
    let audio_s = r.duration * f64::from(r.streams_per_user);
    if audio_s * 1_000.0 >= cap_above_ms as f64 {
        eprintln!(
            "retry storm: warning: a realtime user sends up to {audio_s:.0} s of audio and the cap lies above \
             {cap_above_ms} ms of speech only: streaming users may cross it too"
        );
    }
}

fn emit(report: &Report, common: &Common) -> Result<(), String> {
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    if let Some(path) = &common.report_file {
        std::fs::write(path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if common.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The traffic of `user`, added at the end the first time it is seen (users stay in order).
fn user_traffic<'a>(traffic: &'a mut Vec<UserTraffic>, user: &str) -> &'a mut UserTraffic {
    let at = match traffic.iter().position(|t| t.user == user) {
        Some(at) => at,
        None => {
            traffic.push(UserTraffic {
                user: user.to_owned(),
                ..UserTraffic::default()
            });
            traffic.len() - 1
        }
    };
    &mut traffic[at]
}

fn realtime_ctx(
    args: &RealtimeArgs,
    nodes: &Nodes,
    corpus: &Arc<Corpus>,
    auth: &Authenticator,
    live: &Arc<Live>,
    survive_node_loss: bool,
) -> Result<Arc<RealtimeCtx>, String> {
    let targets = nodes
        .all()
        .iter()
        .map(|url| {
            let ws_base = if let Some(rest) = url.strip_prefix("https://") {
                format!("wss://{rest}")
            } else if let Some(rest) = url.strip_prefix("http://") {
                format!("ws://{rest}")
            } else {
                url.to_owned()
            };
            Target::parse(&format!("{ws_base}/v4/listen?{}", args.query))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pace = if args.pace > 0.0 { args.pace } else { 1.0 };
    Ok(Arc::new(RealtimeCtx {
        corpus: corpus.clone(),
        targets,
        streams_per_user: usize::from(args.streams_per_user),
        auth: auth.clone(),
        pace,
        frames_per_stream: (args.duration.max(0.0) * 1_000.0 / FRAME_MS as f64).round() as u64,
        keepalive: Duration::from_secs_f64(args.keepalive.max(0.5)),
        close_timeout: Duration::from_secs_f64(args.close_timeout.max(1.0)),
        survive_node_loss,
        retry_refused: args
            .retry_refused
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
        live: live.clone(),
    }))
}

async fn run_realtime(
    ctx: Arc<RealtimeCtx>,
    args: RealtimeArgs,
    prefix: String,
    threads: usize,
) -> (Vec<StreamOutcome>, f64) {
    let started = Instant::now();
    let outcomes = realtime::run_streams(ctx, args.streams, &prefix, args.ramp, threads).await;
    (outcomes, started.elapsed().as_secs_f64())
}

async fn run_sync(
    ctx: Arc<SyncCtx>,
    args: SyncArgs,
    prefix: String,
    first_user: usize,
) -> (Vec<UploaderOutcome>, f64) {
    let started = Instant::now();
    let started_unix_ms = sync::unix_now_ms();
    let handles: Vec<_> = (0..args.uploaders)
        .map(|u| {
            let user = format!("{prefix}{}", first_user + u);
            tokio::spawn(sync::run_uploader(ctx.clone(), u, user))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(handles.len());
    for (u, h) in handles.into_iter().enumerate() {
        outcomes.push(h.await.unwrap_or_else(|_| UploaderOutcome {
            user: format!("{prefix}{}", first_user + u),
            errors: vec!["task_panicked".into()],
            ..UploaderOutcome::default()
        }));
    }
    let polled_until = started.elapsed().as_secs_f64();
    // Pipelined v2 jobs are polled every few seconds: the work ended when the server finished the last.
    match outcomes
        .iter()
        .filter_map(|o| o.last_finished_unix_ms)
        .max()
    {
        Some(last) if args.pipeline => {
            let wall = last.saturating_sub(started_unix_ms) as f64 / 1_000.0;
            (outcomes, wall.min(polled_until))
        }
        _ => (outcomes, polled_until),
    }
}

fn count_errors<'a>(errors: &mut BTreeMap<String, u64>, kinds: impl Iterator<Item = &'a String>) {
    for k in kinds {
        *errors.entry(k.clone()).or_insert(0) += 1;
    }
}

fn realtime_report(
    outcomes: &[StreamOutcome],
    args: &RealtimeArgs,
    wall_s: f64,
    errors: &mut BTreeMap<String, u64>,
) -> RealtimeReport {
    let mut r = RealtimeReport {
        streams: args.streams,
        pace: args.pace,
        duration_s: args.duration,
        wall_s,
        ..RealtimeReport::default()
    };
    for o in outcomes {
        count_errors(errors, o.errors.iter());
        r.streams_connected += usize::from(o.setup_us.is_some());
        r.streams_held += usize::from(o.held);
        r.frames_sent += o.frames_sent;
        r.events += o.events;
        r.reconnect_attempts += o.reconnect_attempts;
        r.upgrade_refusals += o.refusals;
        r.streams_refused += usize::from(o.refused);
        r.streams_admitted_after_refusal += usize::from(o.refusals > 0 && o.setup_us.is_some());
        for &after in &o.refusal_retry_after_s {
            let (lo, hi) = r.refusal_retry_after_s.get_or_insert((after, after));
            (*lo, *hi) = ((*lo).min(after), (*hi).max(after));
        }
        r.transcript_messages += o.transcript_messages;
        r.transcript_segments += o.transcript_segments;
        for part in &o.sessions {
            if let Some((m, _)) = part.metadata {
                r.frames_acknowledged += m.frames_received;
                r.frames_lost += part.frames.saturating_sub(m.frames_received);
                r.frames_dropped += m.frames_dropped;
            } else if part.broken_at.is_some() {
                r.sessions_broken += 1;
                r.frames_in_broken_sessions += part.frames;
            }
        }
    }
    r.audio_s_sent = (r.frames_sent * FRAME_MS) as f64 / 1_000.0;
    r.audio_s_per_s = r.audio_s_sent / wall_s.max(1e-9);
    r.latency = quantiles(outcomes.iter().flat_map(|o| o.latencies_us.iter()));
    for (k, kind) in realtime::EVENT_KINDS.iter().enumerate() {
        let of_kind = outcomes.iter().flat_map(|o| {
            o.latencies_us
                .iter()
                .zip(&o.latency_kinds)
                .filter(move |&(_, &i)| usize::from(i) == k)
                .map(|(us, _)| us)
        });
        let q = quantiles(of_kind);
        if q.count > 0 {
            r.latency_by_event.insert((*kind).to_owned(), q);
        }
    }
    r.connection_setup = quantiles(outcomes.iter().filter_map(|o| o.setup_us.as_ref()));
    r.close_to_metadata = quantiles(outcomes.iter().filter_map(|o| o.close_us.as_ref()));
    r.latency_objective = args
        .max_p99_ms
        .map(|max| LatencyObjective::judge(max, &r.latency));
    r
}

fn sync_report(
    outcomes: &[UploaderOutcome],
    args: &SyncArgs,
    wall_s: f64,
    errors: &mut BTreeMap<String, u64>,
) -> SyncReport {
    let mut s = SyncReport {
        uploaders: args.uploaders,
        files_per_upload: args.files,
        rounds: args.rounds,
        pipeline: args.pipeline,
        backdate_days: args.backdate_days,
        wall_s,
        ..SyncReport::default()
    };
    let mut audio_ms = 0;
    for o in outcomes {
        count_errors(errors, o.errors.iter());
        s.uploads_ok += o.requests_ok;
        s.files_ok += o.files_ok;
        s.files_failed += o.files_failed;
        s.uploads_resent += o.retries;
        s.uploads_refused_backfill += o.refused_uploads;
        s.files_refused_backfill += o.refused_files;
        audio_ms += o.audio_ms_ok;
    }
    s.uploads_failed = ((args.uploaders * args.rounds) as u64)
        .saturating_sub(s.uploads_ok + s.uploads_refused_backfill);
    let wall = wall_s.max(1e-9);
    s.uploads_per_s = s.uploads_ok as f64 / wall;
    s.files_per_s = s.files_ok as f64 / wall;
    s.audio_s = audio_ms as f64 / 1_000.0;
    s.audio_s_per_s = s.audio_s / wall;
    s.latency = quantiles(outcomes.iter().flat_map(|o| o.latencies_us.iter()));
    s
}
