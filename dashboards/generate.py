#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/grafana/ (run after editing; commit both).

Every query uses only metrics listed in docs/metrics.md; server/tests/integration/dashboards_prometheus.rs runs each one
against a real Prometheus scraping a real `voicegate serve` and fails when a query does not parse or returns
no data. Counters that stay absent until their first event (errors, drops) end in `or on() vector(0)`, so a panel
shows 0 rather than "No data" on a healthy node.
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent / "grafana"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = "$__rate_interval"


def q(expr, legend=""):
    return {"expr": expr, "legendFormat": legend}


def panel(title, targets, unit="short", kind="timeseries", desc="", w=12, h=8, stack=False):
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [dict(t, refId=chr(ord("A") + i), datasource=DS) for i, t in enumerate(targets)],
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "stacking": {"mode": "normal" if stack else "none"},
        }
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}
    return p


def stat(title, expr, unit="short", desc="", w=6):
    return panel(title, [q(expr)], unit=unit, kind="stat", desc=desc, w=w, h=4)


def quantiles(metric, by="", unit="s", extra=""):
    sel = "{" + extra + "}" if extra else ""
    grp = f"le{', ' + by if by else ''}"
    legend_sfx = " {{" + by + "}}" if by else ""
    return [
        q(f"histogram_quantile({p}, sum by ({grp}) (rate({metric}_bucket{sel}[{R}])))", f"p{int(p * 100)}{legend_sfx}")
        for p in (0.5, 0.99)
    ]


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def layout(panels):
    x = y = 0
    line_h = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        g = p["gridPos"]
        if p["type"] == "row" or x + g["w"] > 24:
            x, y = 0, y + line_h
            line_h = 0
        g["x"], g["y"] = x, y
        x += g["w"]
        line_h = max(line_h, g["h"])
        if p["type"] == "row":
            x, y, line_h = 0, y + 1, 0
    return panels


def dashboard(uid, title, desc, panels):
    return {
        "uid": uid,
        "title": title,
        "description": desc,
        "tags": ["voicegate"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "links": [{"title": "VoiceGate", "type": "dashboards", "tags": ["voicegate"], "asDropdown": True}],
        "panels": layout(panels),
    }


def streams():
    return dashboard(
        "voicegate-streams",
        "VoiceGate / Streams",
        "Realtime listen sessions, HTTP traffic, node state.",
        [
            stat("Active listen sessions", "sum(voicegate_listen_sessions_active)"),
            stat("Nodes ready", "count(voicegate_server_state == 1) or on() vector(0)",
                 desc="Server state: 0 starting, 1 ready, 2 draining."),
            stat("Nodes draining", "count(voicegate_server_state == 2) or on() vector(0)"),
            stat("Store reachable (min over nodes)", "min(voicegate_store_up)", unit="bool"),
            panel("Listen sessions per node", [q("sum by (instance) (voicegate_listen_sessions_active)", "{{instance}}")]),
            panel("Admission: measured capacity and load", [
                q("max by (instance) (voicegate_listen_capacity_sessions)", "capacity {{instance}}"),
                q("sum by (instance) (voicegate_listen_sessions_active)", "open {{instance}}"),
            ], desc="The sessions each node estimates it holds within VOICEGATE_ADMISSION_CPU_PERCENT of its CPU (from its own CPU per "
                    "session); past it, new sessions are refused 503 at_capacity (reason cpu). Empty while too few sessions to measure."),
            panel("Admission: CPU used and late session-seconds", [
                q("max by (instance) (voicegate_node_cpu_utilisation_ratio)", "CPU {{instance}}"),
                q("max by (instance) (voicegate_listen_late_session_seconds_ratio)", "late {{instance}}"),
            ], unit="percentunit", desc="The process's share of its cores, and the share of session-seconds whose tick ran later than "
                                        "VOICEGATE_ADMISSION_LAG_MS; above VOICEGATE_ADMISSION_LATE_PERCENT new sessions are refused (reason tick_lag)."),
            panel("Admission: cores the node can have", [
                q("max by (instance) (voicegate_node_cpu_available_cores)", "{{instance}}"),
            ], desc="The cores available to the process, bounded by what it used plus what its CPUs left idle: below the node's cores, "
                    "a neighbour (another process, the kernel) takes the rest. The CPU rule's capacity is VOICEGATE_ADMISSION_CPU_PERCENT of this."),
            panel("Sessions refused / closed", [
                q(f"sum by (reason) (rate(voicegate_listen_sessions_refused_total[{R}])) or on() vector(0)", "refused {{reason}}"),
                q(f"sum by (reason) (rate(voicegate_listen_sessions_closed_total[{R}])) or on() vector(0)", "closed {{reason}}"),
            ], unit="ops"),
            row("Frames"),
            panel("Frames received", [q(f"sum(rate(voicegate_listen_frames_total[{R}]))", "frames/s")], unit="ops",
                  desc="Binary websocket frames received (one 10 ms Opus packet each from a device)."),
            panel("Frames dropped (larger than the frame queue, or too large)", [
                q(f"sum by (reason) (rate(voicegate_listen_frames_dropped_total[{R}])) or on() vector(0)", "{{reason}}")
            ], unit="ops", desc="Frames that could never be queued. Any non-zero value is audio a user sent and the server did not analyse. A lagging pipeline does not drop: see the tick lag panel."),
            panel("Pipeline tick lag (overload)", quantiles("voicegate_listen_tick_lag_seconds"), unit="s",
                  desc="How late sessions' 50 ms pipeline ticks run (worst per session-second). On 2 cores: median ~70 ms, p99 ~0.4 s at "
                       "1,200 streams (within capacity); seconds once the node is saturated and events reach devices late."),
            panel("Events sent to clients", [
                q(f"sum by (type) (rate(voicegate_listen_events_total[{R}]))", "{{type}}")
            ], unit="ops", stack=True),
            panel("Ignored client text and session errors", [
                q(f"sum by (reason) (rate(voicegate_listen_text_ignored_total[{R}])) or on() vector(0)", "text ignored {{reason}}"),
                q(f"sum by (reason) (rate(voicegate_listen_meter_errors_total[{R}])) or on() vector(0)", "meter/stt record {{reason}}"),
                q(f"sum by (reason) (rate(voicegate_listen_conversation_errors_total[{R}])) or on() vector(0)", "conversation {{reason}}"),
            ], unit="ops"),
            row("HTTP"),
            panel("Requests by route and status", [
                q(f"sum by (route, status) (rate(voicegate_http_request_duration_seconds_count[{R}]))", "{{route}} {{status}}")
            ], unit="reqps"),
            panel("Request latency p99 by route",
                  [q(f"histogram_quantile(0.99, sum by (le, route) (rate(voicegate_http_request_duration_seconds_bucket[{R}])))", "{{route}}")],
                  unit="s", desc="For /v4/listen this is the upgrade handshake only."),
            panel("Auth rejections", [
                q(f"sum by (reason) (rate(voicegate_auth_rejections_total[{R}])) or on() vector(0)", "{{reason}}")
            ], unit="ops"),
            panel("Drain duration", [
                q("max by (outcome) (voicegate_drain_duration_seconds_sum / voicegate_drain_duration_seconds_count) or on() vector(0)", "{{outcome}}")
            ], unit="s", desc="Mean drain time per outcome (complete, timed_out) since the node started."),
        ],
    )


def pipeline():
    return dashboard(
        "voicegate-pipeline",
        "VoiceGate / Pipeline",
        "Audio analysed by realtime sessions and sync uploads: volume, processing time, failures.",
        [
            stat("Realtime audio (s per s)", f"sum(rate(voicegate_listen_audio_ms_total[{R}])) / 1000",
                 desc="Seconds of audio decoded per second by listen sessions (counted when a session ends)."),
            stat("Sync audio (s per s)", f"sum(rate(voicegate_sync_audio_seconds_total[{R}]))"),
            stat("Speech forwarded to STT (s per s)", f"sum(rate(voicegate_listen_stt_forwarded_ms_total[{R}])) / 1000 or on() vector(0)"),
            stat("Live pipeline failures (1h)", "sum(increase(voicegate_listen_pipeline_errors_total[1h])) or on() vector(0)"),
            panel("Audio analysed", [
                q(f"sum(rate(voicegate_listen_audio_ms_total[{R}])) / 1000", "realtime"),
                q(f"sum(rate(voicegate_sync_audio_seconds_total[{R}]))", "sync"),
            ], unit="s", desc="Audio seconds per wall second."),
            panel("Sync processing time (decode + VAD of one upload)",
                  quantiles("voicegate_sync_process_duration_seconds"), unit="s"),
            panel("Sync requests by outcome", [
                q(f"sum by (outcome) (rate(voicegate_sync_requests_total[{R}]))", "{{outcome}}")
            ], unit="reqps"),
            panel("Sync files by status", [
                q(f"sum by (status) (rate(voicegate_sync_files_total[{R}]))", "{{status}}")
            ], unit="ops"),
            panel("Upload rejections", [
                q(f"sum by (reason) (rate(voicegate_upload_rejections_total[{R}])) or on() vector(0)", "{{reason}}")
            ], unit="ops"),
            panel("Sync upload latency", quantiles("voicegate_http_request_duration_seconds",
                                                   extra='route="/v1/sync-local-files"'), unit="s"),
            panel("Live pipeline failures", [
                q(f"sum by (reason) (rate(voicegate_listen_pipeline_errors_total[{R}])) or on() vector(0)", "{{reason}}")
            ], unit="ops"),
            panel("Conversations", [
                q(f"sum(rate(voicegate_conversation_conflicts_total[{R}])) or on() vector(0)", "CAS conflicts (retried)"),
                q(f"sum(rate(voicegate_conversations_unlocked_total[{R}])) or on() vector(0)", "unlocked by payment"),
            ], unit="ops"),
            *speech_to_text(),
        ],
    )


def speech_to_text():
    """The "Speech-to-text" row (docs/stt.md, Telemetry): what goes to the provider and what it costs."""
    sent = f"sum by (provider) (rate(voicegate_stt_forwarded_samples_total[{R}]))"
    offered = f"sum by (provider) (rate(voicegate_stt_audio_in_samples_total[{R}]))"
    return [
        row("Speech-to-text"),
        panel("Audio sent to the provider", [
            q(f"{sent} / 16000 or on() vector(0)", "{{provider}}"),
        ], unit="s", stack=True, desc="Audio seconds handed to each provider per wall second (counted at the FFI call or "
                                      "socket write): what users are charged and what a paid provider bills."),
        panel("Seconds saved by the speech gate", [
            q(f"({offered} - {sent}) / 16000 or on() vector(0)", "{{provider}}"),
        ], unit="s", stack=True, desc="Audio offered to the gate (live sessions with a provider, sync spans) minus what "
                                      "was sent, per wall second: silence never sent, plus audio dropped or past the "
                                      "STT budget (see Dropped and late)."),
        panel("Speech end to final transcript", [
            q(f"histogram_quantile({p}, sum by (le, provider) (rate(voicegate_stt_final_latency_seconds_bucket[{R}]))) "
              "or on() vector(0)", f"p{int(p * 100)} {{{{provider}}}}")
            for p in (0.5, 0.95)
        ], unit="s", desc="From the detector's end of a speech run to the first final result covering it reaching the "
                          "session (0 on a node that never had one, e.g. STT off). Alert: VoiceGateSttFinalLatencyHigh (p95 over 5 s "
                          "for 10 minutes)."),
        panel("Provider errors by reason", [
            q(f"sum by (provider, reason) (rate(voicegate_stt_errors_total[{R}])) or on() vector(0)",
              "{{provider}} {{reason}}"),
            q(f"sum by (provider, outcome) (rate(voicegate_stt_connections_total{{outcome!=\"opened\"}}[{R}])) "
              "or on() vector(0)", "{{provider}} connection {{outcome}}"),
        ], unit="ops", desc="Alert: VoiceGateSttProviderErrors (over 0.05/s for 5 minutes). unauthorized / payment: "
                            "the key or the account; rate_limited / network: the provider or the path to it; "
                            "engine: the local engine (docs/stt.md)."),
        panel("Provider queue depth", [
            q("sum by (provider) (voicegate_stt_queue_depth) or on() vector(0)", "{{provider}}"),
        ], desc="local: chunks and sync spans waiting for a worker; deepgram: audio chunks waiting for their "
                "connection. A queue that stays up means the provider is behind."),
        panel("Dropped and late", [
            q(f"sum by (provider, reason) (rate(voicegate_stt_dropped_samples_total[{R}])) / 16000 or on() vector(0)",
              "dropped s/s {{provider}} {{reason}}"),
            q(f"sum by (provider) (rate(voicegate_stt_late_chunks_total[{R}])) or on() vector(0)",
              "late chunks/s {{provider}}"),
            q(f"sum by (provider) (rate(voicegate_stt_results_dropped_total[{R}])) or on() vector(0)",
              "results dropped/s {{provider}}"),
        ], desc="Audio that never reached the provider (queue_full, closed, ring, provider_down), chunks that "
                "waited past the lateness threshold, and results a session's channel had no room for."),
    ]


def metering():
    return dashboard(
        "voicegate-metering",
        "VoiceGate / Metering & write-behind",
        "Speech metered, the write-behind flush to the store, and anything held or dropped.",
        [
            stat("Speech metered (s per s)", f"sum(rate(voicegate_meter_speech_ms_total[{R}])) / 1000"),
            stat("Pending speech (not yet in the store)", "sum(voicegate_meter_pending_speech_ms) or on() vector(0)", unit="ms"),
            stat("Live meter actors", "sum(voicegate_meter_live_actors) or on() vector(0)"),
            stat("Records dropped (1h)", "sum(increase(voicegate_meter_records_dropped_total[1h])) or on() vector(0)"),
            panel("Speech metered by source", [
                q(f"sum by (source) (rate(voicegate_meter_speech_ms_total[{R}])) / 1000", "{{source}}")
            ], unit="s", stack=True, desc="Seconds of speech accepted by the meter per second."),
            panel("Pending speech per node", [
                q("sum by (instance) (voicegate_meter_pending_speech_ms) or on() vector(0)", "{{instance}}")
            ], unit="ms", desc="Recorded but not yet acknowledged by the store. Grows while the store is down."),
            panel("Flush round duration", quantiles("voicegate_meter_flush_duration_seconds"), unit="s"),
            panel("Flush errors and retries", [
                q(f"sum by (reason) (rate(voicegate_meter_flush_errors_total[{R}])) or on() vector(0)", "error {{reason}}"),
                q(f"sum(rate(voicegate_meter_flush_retries_total[{R}])) or on() vector(0)", "retries"),
            ], unit="ops"),
            panel("Deduplicated", [
                q(f"sum(rate(voicegate_meter_batches_deduplicated_total[{R}])) or on() vector(0)", "batches"),
                q(f"sum(rate(voicegate_meter_records_deduplicated_total[{R}])) or on() vector(0)", "records"),
            ], unit="ops", desc="Retries the store had already applied; re-uploads metered once."),
            panel("Dropped and hydration errors", [
                q(f"sum by (reason) (rate(voicegate_meter_records_dropped_total[{R}])) or on() vector(0)", "dropped {{reason}}"),
                q(f"sum by (reason) (rate(voicegate_meter_hydration_errors_total[{R}])) or on() vector(0)", "hydration {{reason}}"),
            ], unit="ops"),
            panel("Store reachable per node", [q("min by (instance) (voicegate_store_up)", "{{instance}}")], unit="bool"),
            panel("Live meter actors per node", [q("sum by (instance) (voicegate_meter_live_actors) or on() vector(0)", "{{instance}}")]),
        ],
    )


def fair_use():
    return dashboard(
        "voicegate-fair-use",
        "VoiceGate / Fair use",
        "Stage changes, cap breaches, the classifier, payments.",
        [
            stat("Stage changes (1h)", "sum(increase(voicegate_fair_use_stage_transitions_total[1h])) or on() vector(0)"),
            stat("Cap breaches (1h)", "sum(increase(voicegate_fair_use_breaches_total[1h])) or on() vector(0)"),
            stat("Classifier in flight", "sum(voicegate_fair_use_classifier_in_flight) or on() vector(0)"),
            stat("Classifier queued", "sum(voicegate_fair_use_classifier_queued) or on() vector(0)"),
            panel("Stage transitions", [
                q(f"sum by (to) (rate(voicegate_fair_use_stage_transitions_total[{R}])) or on() vector(0)", "to {{to}}")
            ], unit="ops"),
            panel("Cap breaches", [
                q(f"sum by (action) (rate(voicegate_fair_use_breaches_total[{R}])) or on() vector(0)", "{{action}}")
            ], unit="ops"),
            panel("Classifications", [
                q(f"sum by (result) (rate(voicegate_fair_use_classifications_total[{R}])) or on() vector(0)", "{{result}}")
            ], unit="ops"),
            panel("Classifier failures", [
                q(f"sum by (reason) (rate(voicegate_fair_use_classifier_failures_total[{R}])) or on() vector(0)", "{{reason}}")
            ], unit="ops", desc="Each failed run is retried later with backoff."),
            panel("Classifier backlog", [
                q("sum(voicegate_fair_use_classifier_in_flight) or on() vector(0)", "in flight"),
                q("sum(voicegate_fair_use_classifier_queued) or on() vector(0)", "queued"),
            ]),
            panel("Stripe webhooks", [
                q(f"sum by (outcome) (rate(voicegate_stripe_webhooks_total[{R}])) or on() vector(0)", "{{outcome}}")
            ], unit="ops"),
        ],
    )


def main():
    OUT.mkdir(exist_ok=True)
    for name, d in [("streams", streams()), ("pipeline", pipeline()), ("metering", metering()), ("fair-use", fair_use())]:
        (OUT / f"voicegate-{name}.json").write_text(json.dumps(d, indent=2) + "\n")


if __name__ == "__main__":
    main()
