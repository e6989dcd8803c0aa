//! Sharing between threads: a poison-tolerant [`lock`], and hand-offs that park at once (a FIFO
//! work queue and a one-shot reply).
//!
//! Why one `lock`: every mutex in telemeter guards state that stays consistent if a holder panics
//! (no code holding one leaves it half-updated across a panic point), so a poisoned lock is taken
//! as it is rather than spreading the panic to every later user. Written once here, that
//! decision is made in one place instead of at each call site.
//!
//! Why not crossbeam-channel here: its `recv` spins and then calls `sched_yield` in a loop before
//! it parks. That is cheap with a few receivers, but the HTTP front has hundreds of workers waiting
//! on one queue and a reply waited for on every request: under load on 2 cores a profile of the
//! server spent a fifth of its CPU in those yields (and the context switches they cause) instead
//! of handling uploads. These wait on a `Condvar` straight away, so a waiting thread costs nothing
//! until it is woken, and a push wakes one waiter.
//!
//! Semantics follow the channels they replace: a receiver gets what was sent before the last
//! sender went away, then `None`; a reply whose sender is dropped unsent answers `None`.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, LockResult, Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking it as it is if a holder panicked (see the module doc for why).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoison(mutex.lock())
}

/// The guard of a [`Condvar`] wait, taken as it is if a holder panicked, as [`lock`] does.
pub fn unpoison<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(PoisonError::into_inner)
}

struct QueueState<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
}

struct Queue<T> {
    state: Mutex<QueueState<T>>,
    ready: Condvar,
}

/// The sending side of a [`queue`]; clone it for more producers.
pub struct Sender<T> {
    queue: Arc<Queue<T>>,
}

/// The receiving side of a [`queue`]; clone it for more consumers (each item goes to one).
pub struct Receiver<T> {
    queue: Arc<Queue<T>>,
}

/// An unbounded multi-producer, multi-consumer FIFO queue.
pub fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let queue = Arc::new(Queue {
        state: Mutex::new(QueueState {
            items: VecDeque::new(),
            senders: 1,
            receivers: 1,
        }),
        ready: Condvar::new(),
    });
    (
        Sender {
            queue: queue.clone(),
        },
        Receiver { queue },
    )
}

impl<T> Sender<T> {
    /// Queues `item` and wakes one waiting receiver. Never blocks. With no receiver left the
    /// item is given back.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut state = lock(&self.queue.state);
        if state.receivers == 0 {
            return Err(item);
        }
        state.items.push_back(item);
        drop(state);
        self.queue.ready.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        lock(&self.queue.state).senders += 1;
        Sender {
            queue: self.queue.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.queue.state);
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            // The receivers drain what is left, then see the queue closed.
            self.queue.ready.notify_all();
        }
    }
}

impl<T> Receiver<T> {
    /// The oldest item, waiting for one; `None` once every sender is gone and the queue is empty.
    pub fn recv(&self) -> Option<T> {
        let mut state = lock(&self.queue.state);
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.senders == 0 {
                return None;
            }
            state = unpoison(self.queue.ready.wait(state));
        }
    }

    /// Items as [`Receiver::recv`] gives them, until the queue is closed and empty.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.recv())
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        lock(&self.queue.state).receivers += 1;
        Receiver {
            queue: self.queue.clone(),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.queue.state);
        state.receivers -= 1;
        if state.receivers == 0 {
            // Nobody will take these: drop them now (outside the lock), so a reply sender among
            // them answers its waiter at once.
            let orphans = std::mem::take(&mut state.items);
            drop(state);
            drop(orphans);
        }
    }
}

enum Slot<T> {
    Empty,
    Sent(T),
    /// The sender went away without sending.
    Dropped,
}

struct Reply<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

/// Sends the one answer of a [`oneshot`].
pub struct ReplySender<T> {
    reply: Arc<Reply<T>>,
}

/// Waits for the one answer of a [`oneshot`].
pub struct ReplyReceiver<T> {
    reply: Arc<Reply<T>>,
}

/// A single answer from one thread to another (a request's reply).
pub fn oneshot<T>() -> (ReplySender<T>, ReplyReceiver<T>) {
    let reply = Arc::new(Reply {
        slot: Mutex::new(Slot::Empty),
        ready: Condvar::new(),
    });
    (
        ReplySender {
            reply: reply.clone(),
        },
        ReplyReceiver { reply },
    )
}

impl<T> ReplySender<T> {
    /// Answers; the first answer counts. The receiver may already be gone, then the answer is
    /// dropped.
    pub fn send(&self, value: T) {
        let mut slot = lock(&self.reply.slot);
        if matches!(*slot, Slot::Empty) {
            *slot = Slot::Sent(value);
            drop(slot);
            self.reply.ready.notify_one();
        }
    }
}

impl<T> Drop for ReplySender<T> {
    fn drop(&mut self) {
        let mut slot = lock(&self.reply.slot);
        if matches!(*slot, Slot::Empty) {
            *slot = Slot::Dropped;
            drop(slot);
            self.reply.ready.notify_one();
        }
    }
}

impl<T> ReplyReceiver<T> {
    /// The answer, waiting for it; `None` when the sender was dropped without answering.
    pub fn recv(self) -> Option<T> {
        let mut slot = lock(&self.reply.slot);
        while matches!(*slot, Slot::Empty) {
            slot = unpoison(self.reply.ready.wait(slot));
        }
        // Taken out for good: the receiver is consumed, so nothing looks at the slot again.
        match std::mem::replace(&mut *slot, Slot::Dropped) {
            Slot::Sent(value) => Some(value),
            Slot::Empty | Slot::Dropped => None,
        }
    }
}

/// What a caught panic said (its `&str` or `String` payload), for a log line.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn items_arrive_in_order_and_the_queue_closes_after_the_last_sender() {
        let (tx, rx) = queue();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        drop(tx);
        tx2.send(3).unwrap();
        drop(tx2);
        // What was sent before the close is still received, then None.
        assert_eq!(rx.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn every_item_goes_to_exactly_one_of_many_waiting_receivers() {
        let (tx, rx) = queue::<u32>();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || rx.iter().map(u64::from).sum::<u64>())
            })
            .collect();
        drop(rx);
        // Let the workers block first, so sends must wake them.
        thread::sleep(Duration::from_millis(20));
        for i in 1..=10_000u32 {
            tx.send(i).unwrap();
        }
        drop(tx);
        let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(total, 10_000 * 10_001 / 2);
    }

    #[test]
    fn a_blocked_receiver_wakes_when_the_last_sender_goes() {
        let (tx, rx) = queue::<()>();
        let waiter = thread::spawn(move || rx.recv());
        thread::sleep(Duration::from_millis(20));
        drop(tx);
        assert_eq!(waiter.join().unwrap(), None);
    }

    #[test]
    fn a_reply_is_received_across_threads() {
        let (tx, rx) = oneshot();
        let answer = thread::spawn(move || rx.recv());
        thread::sleep(Duration::from_millis(20));
        tx.send("done");
        assert_eq!(answer.join().unwrap(), Some("done"));
    }

    #[test]
    fn a_reply_sent_before_the_wait_is_kept_and_the_first_answer_counts() {
        let (tx, rx) = oneshot();
        tx.send(7);
        tx.send(8);
        drop(tx);
        assert_eq!(rx.recv(), Some(7));
    }

    #[test]
    fn a_dropped_reply_sender_answers_none() {
        let (tx, rx) = oneshot::<u8>();
        let answer = thread::spawn(move || rx.recv());
        thread::sleep(Duration::from_millis(20));
        drop(tx);
        assert_eq!(answer.join().unwrap(), None);
    }

    #[test]
    fn a_reply_to_a_gone_receiver_is_dropped_quietly() {
        let (tx, rx) = oneshot::<String>();
        drop(rx);
        tx.send("nobody listens".to_string());
    }

    #[test]
    fn queued_replies_of_a_closed_queue_answer_none() {
        // Jobs still queued when the workers are gone drop their reply senders, so the
        // connection waiting for an answer does not hang.
        let (tx, rx) = queue();
        let (reply, answer) = oneshot::<u8>();
        assert!(tx.send(reply).is_ok());
        drop(rx);
        assert_eq!(answer.recv(), None);
        // And a send with no receiver left is given back.
        let (reply, answer) = oneshot::<u8>();
        assert!(tx.send(reply).is_err());
        assert_eq!(answer.recv(), None);
    }
}

/// A value read by many threads and replaced whole now and then (a reloaded tokens file or
/// whitelist): readers take the current `Arc` under a brief lock and keep using it, so a
/// replacement never waits for them and they never see half of one. Clones share the value.
pub struct Swap<T: ?Sized> {
    current: Arc<Mutex<Arc<T>>>,
}

impl<T: ?Sized> Swap<T> {
    /// A holder of `value`.
    pub fn new(value: Arc<T>) -> Swap<T> {
        Swap {
            current: Arc::new(Mutex::new(value)),
        }
    }

    /// The value now.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&lock(&self.current))
    }

    /// Replaces the value; readers holding the old one keep it until they drop it.
    pub fn replace(&self, value: Arc<T>) {
        *lock(&self.current) = value;
    }
}

impl<T: ?Sized> Clone for Swap<T> {
    fn clone(&self) -> Self {
        Swap {
            current: Arc::clone(&self.current),
        }
    }
}

impl<T: ?Sized + std::fmt::Debug> std::fmt::Debug for Swap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().fmt(f)
    }
}

#[cfg(test)]
mod swap_tests {
    use super::*;

    #[test]
    fn a_replacement_is_seen_by_every_clone_and_old_readers_keep_theirs() {
        let swap = Swap::new(Arc::new(vec![1]));
        let other = swap.clone();
        let old = swap.current();
        other.replace(Arc::new(vec![2, 3]));
        assert_eq!(*swap.current(), vec![2, 3]);
        assert_eq!(*old, vec![1]);
    }
}
