//! Termination signals as a channel, so main loops can select on them like on any other event.

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts later)
/// and starts a thread that waits for them with `sigwait`, sending each signal number on the
/// returned channel. Call it first thing in `main`, before any other thread starts.
pub fn termination_channel() -> crossbeam_channel::Receiver<i32> {
    todo!()
}
