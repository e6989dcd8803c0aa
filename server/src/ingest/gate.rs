//! The gate an upload passes before its CPU work and before it holds memory: a weighted,
//! first-come-first-served counting semaphore (one for CPU units, one for bytes).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
    /// `state.free` as last set under the lock, read without it by a waiter that yields.
    free_hint: AtomicUsize,
    /// How long a waiter that would be first in line yields and tries again before it sleeps.
    yield_for: Duration,
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
        Gate::yielding(total, Duration::ZERO)
    }

    /// A gate of `total` units whose waiters, when none is in line before them, give their core
    /// away (`sched_yield`) and try again for up to `yield_for` before they sleep in line.
    ///
    /// Why: under load the CPU gate is full at most entries, and a waiter that sleeps costs two
    /// context switches and a futex wake-up by whoever gives a unit back (~7 µs each on the
    /// shared VM); a unit is usually free again within a decode (~50 µs). Yielding rather than
    /// spinning, because on 2 cores shared with other processes a spinner would hold the core a
    /// holder needs. Bound: a waiter yields for at most `yield_for` (then sleeps as before, so a
    /// long wait costs no CPU), only while nobody is in line (it never takes a unit from the
    /// head of the line, and at most one `yield_for` of CPU per entry goes to this); the waiters
    /// that yield are the threads already admitted to wait here.
    pub fn yielding(total: usize, yield_for: Duration) -> Gate {
        let total = total.max(1);
        Gate {
            total,
            state: Mutex::new(GateState {
                free: total,
                line: VecDeque::new(),
            }),
            free_hint: AtomicUsize::new(total),
            yield_for,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        telemeter_common::sync::lock(&self.state)
    }

    /// Takes `units` when nobody is in line and they are free: entering without waiting.
    fn enter_now(&self, state: &mut GateState, units: usize) -> bool {
        if state.line.is_empty() && state.free >= units {
            state.free -= units;
            self.free_hint.store(state.free, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Waits for `units` (at most the whole gate), after every earlier waiter. The holders only
    /// run work that ends (CPU work, or a store commit, which answers or fails), so the wait is
    /// bounded.
    pub fn enter(&self, units: usize) -> Permit<'_> {
        let units = units.clamp(1, self.total);
        let mut state = self.state();
        if self.enter_now(&mut state, units) {
            return Permit(self, units);
        }
        if !self.yield_for.is_zero() && state.line.is_empty() {
            drop(state);
            let until = Instant::now() + self.yield_for;
            state = loop {
                std::thread::yield_now();
                if self.free_hint.load(Ordering::Relaxed) < units && Instant::now() < until {
                    continue;
                }
                let mut state = self.state();
                if self.enter_now(&mut state, units) {
                    return Permit(self, units);
                }
                if !state.line.is_empty() || Instant::now() >= until {
                    break state;
                }
            };
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
        self.free_hint.store(state.free, Ordering::Relaxed);
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
            self.free_hint.store(state.free, Ordering::Relaxed);
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

/// Units held from a [`Gate`] through a handle on it rather than a borrow, so they can be held
/// past the call that took them (an upload answered where its commit ends, on another thread);
/// given back on drop.
pub struct OwnedPermit(Arc<Gate>, usize);

impl Permit<'_> {
    /// The same units, held through `gate`, the gate they were taken from.
    pub fn into_owned(self, gate: &Arc<Gate>) -> OwnedPermit {
        assert!(
            std::ptr::eq(self.0, Arc::as_ptr(gate)),
            "a permit is held only through its own gate"
        );
        let units = self.1;
        // Not given back: the owned permit holds them now.
        std::mem::forget(self);
        OwnedPermit(gate.clone(), units)
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        self.0.give_back(self.1);
    }
}

/// How long an upload (or a remote-write request) that finds its CPU gate full yields before it
/// sleeps in line (see [`Gate::yielding`]). About one upload's decode. Measured at 64 senders (release, the shared
/// 2-core VM): 20, 50 and 100 µs all took the context switches an upload from ~3.2 to ~2.7 for
/// the same or less CPU; sleeping at once was the 3.2.
pub const CPU_GATE_YIELD: std::time::Duration = std::time::Duration::from_micros(50);

/// Puts the calling thread (a connection thread running `/upload` or `/metrics/v1/receive`) under
/// SCHED_BATCH, once per thread. Same CPU share as any other thread, but its wake-ups do not
/// preempt the thread running: the committer answering a batch, a unit given back at the CPU
/// gate or the loopback peer no longer hand the core to each upload they wake (0.3–0.7
/// involuntary switches an upload at 64 senders), and `/federate`'s workers, still normal
/// threads, do preempt uploads when they wake.
pub fn run_as_batch() {
    thread_local!(static BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    BATCH.with(|batch| {
        if !batch.get() {
            batch.set(true);
            #[cfg(target_os = "linux")]
            // SAFETY: `sched_param` is plain integers, for which all zeros is a valid value (musl's
            // has more fields than glibc's, so it is not written as a literal); the system call
            // reads that one struct; pid 0 is the calling thread. The system call itself, because
            // musl's `sched_setscheduler` is a stub that fails with ENOSYS. Its result is not looked
            // at: refused (a seccomp policy), the thread stays as it was, which is only slower.
            unsafe {
                let param: libc::sched_param = std::mem::zeroed();
                libc::syscall(
                    libc::SYS_sched_setscheduler,
                    0,
                    libc::SCHED_BATCH,
                    &param as *const libc::sched_param,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use testkit::cpu::thread_cpu;

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
    fn an_owned_permit_holds_the_units_until_it_is_dropped_on_another_thread() {
        let gate = Arc::new(Gate::new(100));
        let owned = gate.enter(40).into_owned(&gate);
        assert_eq!(gate.state().free, 60, "moved, not given back");
        std::thread::spawn(move || drop(owned)).join().unwrap();
        assert_eq!(gate.state().free, 100);
    }

    #[test]
    #[should_panic(expected = "its own gate")]
    fn a_permit_is_not_held_through_another_gate() {
        let (gate, other) = (Arc::new(Gate::new(10)), Arc::new(Gate::new(10)));
        let _owned = gate.enter(1).into_owned(&other);
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

    #[test]
    fn a_yielding_waiter_yields_at_most_its_time_then_sleeps() {
        let gate = Arc::new(Gate::yielding(1, Duration::from_millis(20)));
        let held = gate.enter(1);
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let cpu = thread_cpu();
                drop(gate.enter(1));
                thread_cpu() - cpu
            })
        };
        // After its 20 ms it sleeps in line (a waiter that kept yielding never would): waited
        // for with a bound, whatever else the machine runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.state().line.is_empty() {
            assert!(Instant::now() < deadline, "the waiter never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Held a while longer: asleep, it costs nothing more.
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        let spent = waiter.join().unwrap();
        assert!(
            spent < Duration::from_millis(120),
            "the waiter used {spent:?} of CPU"
        );
        assert_eq!(gate.state().free, 1);
    }

    #[test]
    fn a_yielding_waiter_enters_when_a_unit_frees_within_its_time() {
        let gate = Arc::new(Gate::yielding(1, Duration::from_secs(10)));
        let held = gate.enter(1);
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || drop(gate.enter(1)))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        waiter.join().unwrap();
        // It entered by yielding: nobody ever queued.
        assert!(gate.state().line.is_empty());
        assert_eq!(gate.state().free, 1);
    }

    #[test]
    fn a_yielding_waiter_does_not_overtake_the_line() {
        let gate = Arc::new(Gate::yielding(1, Duration::from_secs(10)));
        let held = gate.enter(1);
        // Someone asleep in line (a stand-in: it never takes its turn).
        let head = Arc::new(Condvar::new());
        gate.state().line.push_back(head.clone());
        // With someone in line, an arrival does not yield (it could take the unit given back
        // for the head): it queues behind at once, long before its 10 s would end.
        let arrival = {
            let gate = gate.clone();
            std::thread::spawn(move || drop(gate.enter(1)))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.state().line.len() < 2 {
            assert!(Instant::now() < deadline, "the arrival did not queue");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The stand-in leaves the line; the unit goes to the arrival, now first.
        gate.state()
            .line
            .retain(|waiter| !Arc::ptr_eq(waiter, &head));
        drop(held);
        arrival.join().unwrap();
        assert_eq!(gate.state().free, 1);
        assert!(gate.state().line.is_empty());
    }
}
