//! The provider without a server: the node-wide bound, and an unreachable server (the request tests
//! against a double speaking the API are the server's `stt_openai::`).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::stt::provider::results_channel;
use crate::stt::types::SttEvent;

fn provider(url: &str, queue_chunks: usize) -> OpenAiProvider {
    let cfg = OpenAiConfig {
        url: protocol::transcriptions_url(url),
        queue_chunks,
        timeout: Duration::from_secs(5),
        ..OpenAiConfig::default()
    };
    let outbound = Outbound::new(None).unwrap_or_else(|e| panic!("{e}"));
    OpenAiProvider::start(cfg, outbound).unwrap_or_else(|e| panic!("{e}"))
}

/// An address nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    format!("http://{addr}")
}

#[test]
fn a_batch_without_room_in_the_node_queue_is_refused_queue_full() {
    let p = provider(&closed_port(), 2);
    // 25 s of speech in three runs: three chunks, one more than the queue holds.
    let samples: Arc<[f32]> = vec![0.1f32; 400_000].into();
    let request = BatchRequest {
        samples,
        speech: vec![(0, 100_000), (150_000, 250_000), (300_000, 400_000)],
        language: "en".into(),
    };
    match p.transcribe_batch(request) {
        Err(SttError::QueueFull { dropped_samples }) => assert_eq!(dropped_samples, 300_000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreachable_server_fails_the_chunk_drops_its_audio_and_the_stream_still_closes() {
    let p = provider(&closed_port(), 8);
    let (sink, mut rx) = results_channel(16);
    let mut stream = p
        .open_stream(StreamOptions::default(), sink)
        .unwrap_or_else(|e| panic!("{e}"));
    let pcm = vec![1_000i16; 16_000];
    stream
        .push(32_000, Pcm::I16(&pcm))
        .unwrap_or_else(|e| panic!("{e}"));
    stream.end_of_run().unwrap_or_else(|e| panic!("{e}"));
    stream.close();
    let mut events = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        let closed = e == SttEvent::Closed;
        events.push(e);
        if closed {
            break;
        }
    }
    assert!(
        matches!(
            events.first(),
            Some(SttEvent::Error {
                reason: "network",
                ..
            })
        ),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&SttEvent::Closed));
    let stats = stream.stats();
    assert_eq!(stats.forwarded_samples, 0, "never handed over");
    assert_eq!(stats.dropped_samples, 16_000);
}
