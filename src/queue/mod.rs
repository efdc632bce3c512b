//! The bounded priority queue with deadlines that carries jobs from the tokio front-ends to the
//! engine thread, and their replies back. It speaks the vocabulary of [`crate::api`] and imports
//! nothing else of this crate.
//!
//! The queue is the one place that knows every accepted request until its terminal reply: it
//! answers `queue_full` and `shutting_down` at submission, `deadline` for a job whose deadline
//! passes while it waits, `cancelled` for one cancelled before it starts, and counts all of it
//! for the status reply. Replies travel on a per-front-end channel ([`ReplyTx`]) whose `send`
//! never blocks, so neither the engine nor the queue waits on a slow client.

mod jobs;
mod latency;

pub use jobs::{Caller, Job, Owner, Queue, QueueStatus, Reply, ReplyTx, Submit};
pub use latency::{Histogram, Latency};
