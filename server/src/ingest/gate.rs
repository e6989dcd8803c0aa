//! The gate an upload passes before its CPU work and before it holds memory: a weighted,
//! first-come-first-served counting semaphore (one for CPU units, one for bytes).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

/// A weighted counting semaphore. Many workers wait for the store at once, but only as many decode
/// and validate at once as there are cores (one unit each), so a burst of uploads does not
/// oversubscribe the CPU; and the memory they hold is reserved from one in bytes
/// ([`crate::ingest::upload::MAX_UPLOAD_MEMORY_BYTES`]) before it is taken.
///
/// Waiters are served first come, first served: without that, a large reservation (which needs
/// most of the gate free at once) would wait for ever behind a steady stream of small ones. Each
/// waiter sleeps on a condition variable of its own and only the head of the line is woken, so a
/// gate with dozens of waiters (the CPU gate under load) does not wake them all at every change.
pub struct Gate {
    total: usize,
    state: Mutex<GateState>,
}

/// The units free, and the waiters in the order they came.
struct GateState {
    free: usize,
    /// Each waiter's wake-up, first in line first.
    line: VecDeque<Arc<Condvar>>,
}

impl GateState {
    /// The wake-up of the head of the line, if any: the only waiter that may enter. Woken once
    /// the lock is let go ([`wake_up`]): a waiter woken while the lock is held wakes only to block
    /// on it, one more sleep and wake-up per entry (with dozens waiting, most entries are a
    /// wake-up).
    fn head(&self) -> Option<Arc<Condvar>> {
        self.line.front().cloned()
    }
}

/// Wakes `head` (from [`GateState::head`], taken under the lock) after the lock was let go.
fn wake_up(head: Option<Arc<Condvar>>) {
    if let Some(head) = head {
        head.notify_one();
    }
}

/// Units held from a [`Gate`], given back on drop.
pub struct Permit<'a>(&'a Gate, usize);

impl Permit<'_> {
    /// The units held.
    pub fn units(&self) -> usize {
        self.1
    }

    /// Gives back what is held beyond `units` (never takes more).
    pub fn shrink_to(&mut self, units: usize) {
        let units = units.clamp(1, self.1);
        let freed = self.1 - units;
        if freed > 0 {
            self.1 = units;
            self.0.give_back(freed);
        }
    }
}

impl Gate {
    /// A gate of `total` units (at least one).
    pub fn new(total: usize) -> Gate {
        let total = total.max(1);
        Gate {
            total,
            state: Mutex::new(GateState {
                free: total,
                line: VecDeque::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        telemeter_common::sync::lock(&self.state)
    }

    /// Waits for `units` (at most the whole gate), after every earlier waiter. The holders only
    /// run work that ends (CPU work, or a store commit, which answers or fails), so the wait is
    /// bounded.
    pub fn enter(&self, units: usize) -> Permit<'_> {
        let units = units.clamp(1, self.total);
        let mut state = self.state();
        if state.line.is_empty() && state.free >= units {
            state.free -= units;
            return Permit(self, units);
        }
        let wake = Arc::new(Condvar::new());
        state.line.push_back(wake.clone());
        loop {
            let first = state
                .line
                .front()
                .is_some_and(|head| Arc::ptr_eq(head, &wake));
            if first && state.free >= units {
                break;
            }
            state = telemeter_common::sync::unpoison(wake.wait(state));
        }
        state.line.pop_front();
        state.free -= units;
        // The next in line may fit too.
        let next = if state.free > 0 { state.head() } else { None };
        drop(state);
        wake_up(next);
        Permit(self, units)
    }

    fn give_back(&self, units: usize) {
        let (idle, head) = {
            let mut state = self.state();
            state.free += units;
            (state.free == self.total, state.head())
        };
        wake_up(head);
        if idle && units >= TRIM_AFTER_BYTES && self.total > TRIM_AFTER_BYTES {
            // A large upload has just let go of its memory and nothing else holds any: hand the
            // freed pages back to the system rather than keep the peak for good.
            crate::allocator::trim();
        }
    }
}

/// A reservation at least this large, given back to an idle memory gate, trims the heap.
const TRIM_AFTER_BYTES: usize = 8 << 20;

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.give_back(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_large_reservation_is_not_starved_by_a_stream_of_small_ones() {
        let gate = Arc::new(Gate::new(100));
        let small = gate.enter(10);
        let entered = Arc::new(AtomicBool::new(false));
        let big = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let _all = gate.enter(100);
                entered.store(true, Ordering::SeqCst);
            })
        };
        // Wait (bounded) until the big one holds its ticket, then keep taking small units: they
        // queue behind it instead of overtaking it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.state().line.is_empty() {
            assert!(Instant::now() < deadline, "the big waiter never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
        let late = {
            let gate = gate.clone();
            std::thread::spawn(move || drop(gate.enter(10)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "entered while 10 units were held"
        );
        drop(small);
        big.join().unwrap();
        late.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(gate.state().free, 100);
    }

    #[test]
    fn shrinking_a_permit_gives_back_the_rest() {
        let gate = Gate::new(100);
        let mut permit = gate.enter(80);
        permit.shrink_to(30);
        assert_eq!((permit.units(), gate.state().free), (30, 70));
        permit.shrink_to(50); // never grows
        assert_eq!(permit.units(), 30);
        drop(permit);
        assert_eq!(gate.state().free, 100);
        // A reservation over the whole gate takes the whole gate, and still runs.
        assert_eq!(gate.enter(1000).units(), 100);
    }

    #[test]
    fn the_gate_hands_out_at_most_its_units_and_takes_them_back() {
        let gate = Gate::new(10);
        let big = gate.enter(1_000);
        assert_eq!((big.units(), gate.state().free), (10, 0));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let small = gate.enter(3);
                tx.send(small.units()).unwrap();
            });
            // The waiter cannot get in while the gate is empty.
            assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
            drop(big);
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 3);
        });
        assert_eq!(gate.state().free, 10);
    }
}
