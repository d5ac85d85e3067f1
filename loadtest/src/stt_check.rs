//! `--check-stt`: the audio the nodes' speech-to-text providers received during a realtime run
//! (`voicegate_stt_forwarded_samples_total`, summed over every node and provider, read before and after)
//! against what the sessions said they forwarded and charged (Σ `metadata.stt_forwarded_ms`). They must
//! agree to the rounding of each session's samples to milliseconds. Also reported: the audio that fell
//! behind (`voicegate_stt_dropped_samples_total`: the provider's queue was full, or the session ended
//! before its audio reached the engine), which was neither sent nor charged.

use serde::Serialize;

use crate::cli::Nodes;
use crate::sync::request_error_kind;

/// Samples per millisecond at the 16 kHz the providers receive.
const SAMPLES_PER_MS: u64 = 16;

/// The counters summed over every node.
#[derive(Debug, Clone, Copy, Default)]
pub struct SttCounters {
    pub forwarded_samples: u64,
    pub dropped_samples: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct SttCheck {
    /// Sessions with their final metadata (the ones counted).
    pub sessions: usize,
    /// Σ `metadata.stt_forwarded_ms`: charged as STT.
    pub told_ms: u64,
    /// What the providers received over the run (samples / 16).
    pub provider_ms: f64,
    /// What fell behind: dropped before reaching a provider.
    pub dropped_ms: f64,
    /// |provider samples − 16 × told ms|, and the rounding allowed (16 samples per session).
    pub diff_samples: u64,
    pub allowed_samples: u64,
    pub passed: bool,
}

/// Reads the counters from every node's `/metrics`.
pub async fn read(client: &reqwest::Client, nodes: &Nodes) -> Result<SttCounters, String> {
    let mut total = SttCounters::default();
    for url in nodes.all() {
        let body = client
            .get(format!("{url}/metrics"))
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("{url}/metrics: {}", request_error_kind(&e)))?
            .text()
            .await
            .map_err(|e| format!("{url}/metrics: {}", request_error_kind(&e)))?;
        let c = parse(&body);
        total.forwarded_samples += c.forwarded_samples;
        total.dropped_samples += c.dropped_samples;
    }
    Ok(total)
}

/// Sums the two counters' series in a Prometheus text exposition.
fn parse(text: &str) -> SttCounters {
    let mut c = SttCounters::default();
    for line in text.lines() {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let slot = match name {
            "voicegate_stt_forwarded_samples_total" => &mut c.forwarded_samples,
            "voicegate_stt_dropped_samples_total" => &mut c.dropped_samples,
            _ => continue,
        };
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *slot += v as u64;
        }
    }
    c
}

/// The judgement over a run, from the counters before and after and the sessions' told figures.
pub fn judge(before: SttCounters, after: SttCounters, told: &[u64]) -> SttCheck {
    let told_ms: u64 = told.iter().sum();
    let forwarded = after
        .forwarded_samples
        .saturating_sub(before.forwarded_samples);
    let dropped = after.dropped_samples.saturating_sub(before.dropped_samples);
    let diff_samples = forwarded.abs_diff(told_ms * SAMPLES_PER_MS);
    let allowed_samples = told.len() as u64 * SAMPLES_PER_MS;
    SttCheck {
        sessions: told.len(),
        told_ms,
        provider_ms: forwarded as f64 / SAMPLES_PER_MS as f64,
        dropped_ms: dropped as f64 / SAMPLES_PER_MS as f64,
        diff_samples,
        allowed_samples,
        passed: diff_samples <= allowed_samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_providers_and_reasons() {
        let text = "# TYPE voicegate_stt_forwarded_samples_total counter\n\
            voicegate_stt_forwarded_samples_total{provider=\"local\"} 32000\n\
            voicegate_stt_forwarded_samples_total{provider=\"deepgram\"} 0\n\
            voicegate_stt_dropped_samples_total{provider=\"local\",reason=\"queue_full\"} 1600\n\
            voicegate_stt_dropped_samples_total{provider=\"local\",reason=\"closed\"} 16\n\
            voicegate_stt_forwarded_samples_total_created 5\n";
        let c = parse(text);
        assert_eq!(c.dropped_samples, 1616);
        assert_eq!(
            c.forwarded_samples, 32000,
            "another series that starts with the name is not added"
        );
    }

    #[test]
    fn a_difference_beyond_one_ms_per_session_fails() {
        let before = SttCounters::default();
        let ok = judge(
            before,
            SttCounters {
                forwarded_samples: 2_000 * 16 + 20,
                dropped_samples: 0,
            },
            &[1_000, 1_000],
        );
        assert!(ok.passed, "{ok:?}");
        let bad = judge(
            before,
            SttCounters {
                forwarded_samples: 2_010 * 16,
                dropped_samples: 0,
            },
            &[1_000, 1_000],
        );
        assert!(!bad.passed, "{bad:?}");
    }
}
