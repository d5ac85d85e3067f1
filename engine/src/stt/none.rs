//! `none`: metering only. Streams accept audio and send it nowhere; nothing is forwarded or charged.

use super::provider::{
    BatchOutput, BatchRequest, BatchTicket, ProviderKind, ResultSink, StreamHandle, StreamOptions,
    StreamStats, SttProvider, batch_ticket,
};
use super::types::{Pcm, SttError, SttEvent};

#[derive(Debug, Clone, Copy, Default)]
pub struct NoneProvider;

struct NoneStream {
    sink: ResultSink,
    closed: bool,
}

impl StreamHandle for NoneStream {
    fn push(&mut self, _start: u64, _pcm: Pcm<'_>) -> Result<(), SttError> {
        if self.closed {
            return Err(SttError::Closed);
        }
        Ok(())
    }

    fn end_of_run(&mut self) -> Result<(), SttError> {
        Ok(())
    }

    fn finalize(&mut self) -> Result<(), SttError> {
        Ok(())
    }

    fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.sink.send(SttEvent::Closed);
        }
    }

    fn stats(&self) -> StreamStats {
        self.sink.counters().stats()
    }
}

impl SttProvider for NoneProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::None
    }

    fn open_stream(
        &self,
        _options: StreamOptions,
        results: ResultSink,
    ) -> Result<Box<dyn StreamHandle>, SttError> {
        Ok(Box::new(NoneStream {
            sink: results.for_provider(ProviderKind::None),
            closed: false,
        }))
    }

    fn transcribe_batch(&self, _request: BatchRequest) -> Result<BatchTicket, SttError> {
        let (reply, ticket) = batch_ticket();
        reply.send(Ok(BatchOutput::default()));
        Ok(ticket)
    }
}
