//! A counting global allocator for the bench binaries that measure allocations per request
//! (`telemeter-allocs`): every allocation is counted, on the client's side when the thread that
//! makes it was marked with [`mark_client_thread`] (the load generator's senders are), else on
//! the server's. It is a type here and a `#[global_allocator]` only in the binary that wants
//! it: the server never counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    /// Whether this thread is the load generator's, not the server's.
    static CLIENT: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a client's: its allocations are not the server's.
pub fn mark_client_thread() {
    CLIENT.with(|client| client.set(true));
}

/// Counts per side: allocations (a `realloc` is one) and bytes asked for.
struct Side {
    allocations: AtomicU64,
    bytes: AtomicU64,
}

static SERVER: Side = Side {
    allocations: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};
static CLIENT_SIDE: Side = Side {
    allocations: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
};

/// Allocation counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Allocations (and reallocations) by the server's threads.
    pub server_allocations: u64,
    /// Bytes they asked for.
    pub server_bytes: u64,
    /// Allocations by threads marked as the client's.
    pub client_allocations: u64,
}

/// The counts so far.
pub fn counts() -> Counts {
    Counts {
        server_allocations: SERVER.allocations.load(Ordering::Relaxed),
        server_bytes: SERVER.bytes.load(Ordering::Relaxed),
        client_allocations: CLIENT_SIDE.allocations.load(Ordering::Relaxed),
    }
}

/// The system allocator, counting.
pub struct CountingAllocator;

impl CountingAllocator {
    fn count(size: usize) {
        // `try_with`: a thread being torn down may still free and allocate.
        let client = CLIENT.try_with(Cell::get).unwrap_or(false);
        let side = if client { &CLIENT_SIDE } else { &SERVER };
        side.allocations.fetch_add(1, Ordering::Relaxed);
        side.bytes.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to the system allocator; counting touches only
// atomics and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
