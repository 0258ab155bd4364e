//! One accepted request as the HTTP front end holds it: the events coming from the scheduler,
//! a guard that cancels the request when the client goes away, and the server-sent events body
//! of a streamed reply.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

use super::openai::ChunkWriter;
use crate::service::protocol::Event;
use crate::service::scheduler::{CancelReason, EventSink, Ticket};
use crate::service::serving::Serving;

/// Delivers a request's events to its handler (or streamed body).
pub struct Sink(pub mpsc::UnboundedSender<Event>);

impl EventSink for Sink {
    fn send(&self, event: Event) {
        // Fails only once the handler is gone (the client left), when nobody wants it.
        let _ = self.0.send(event);
    }
}

/// An accepted request until its terminal event has been read: dropped before that (the
/// handler's future dropped because the client closed the connection, or the streamed body
/// dropped because writing to it failed), it cancels the request.
pub struct Pending {
    pub serving: Arc<Serving>,
    pub ticket: Ticket,
    pub events: mpsc::UnboundedReceiver<Event>,
    ended: bool,
}

impl Pending {
    pub fn new(
        serving: Arc<Serving>,
        ticket: Ticket,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        Self {
            serving,
            ticket,
            events,
            ended: false,
        }
    }

    /// The next event; None only if the scheduler broke its promise of a terminal event.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        self.note(event.as_ref());
        event
    }

    fn note(&mut self, event: Option<&Event>) {
        if event.is_none_or(Event::is_terminal) {
            self.ended = true;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.ended {
            self.serving.cancel(self.ticket, CancelReason::Disconnect);
        }
    }
}

/// Most bytes gathered into one body frame when events are already waiting.
const FRAME_BYTES: usize = 64 * 1024;

/// The `text/event-stream` body of a streamed reply: each event becomes its chunks as it
/// arrives; those already waiting go out in one frame.
pub struct EventStream {
    pending: Pending,
    writer: ChunkWriter,
    /// The event that was awaited before the response began.
    first: Option<Event>,
    finished: bool,
}

impl EventStream {
    pub fn new(pending: Pending, writer: ChunkWriter, first: Event) -> Self {
        Self {
            pending,
            writer,
            first: Some(first),
            finished: false,
        }
    }

    fn push(&mut self, event: &Event, out: &mut Vec<u8>) {
        if self.writer.push(event, out) {
            self.finished = true;
        }
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let mut out = Vec::new();
        if let Some(first) = this.first.take() {
            this.push(&first, &mut out);
        }
        while !this.finished && out.len() < FRAME_BYTES {
            match this.pending.events.poll_recv(cx) {
                Poll::Ready(event) => {
                    this.pending.note(event.as_ref());
                    match event {
                        Some(e) => this.push(&e, &mut out),
                        None => {
                            let lost = Event::error(
                                None,
                                crate::service::protocol::ErrorCode::Internal,
                                "the request ended without a final event",
                            );
                            this.push(&lost, &mut out);
                        }
                    }
                }
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
        } else if this.finished {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.first.is_none()
    }
}

/// For `Arc<dyn EventSink>` from a `Sink`.
pub fn sink(tx: mpsc::UnboundedSender<Event>) -> Arc<dyn EventSink> {
    Arc::new(Sink(tx))
}
