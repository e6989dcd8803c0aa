//! How the server asks glibc's allocator to hand memory back.
//!
//! Uploads allocate in bursts: a 15 MiB body, its decoded structs and its payload, on any of a few
//! hundred worker threads. Left to its defaults glibc keeps what a burst took: it gives each busy
//! thread an arena of its own (up to 8 per core), and it raises its mmap threshold to the size of
//! the largest block freed, so later large buffers come from the arenas' heaps and are never
//! unmapped. After the trial's 64 concurrent worst-case uploads the server stayed at 1.6 GB. So:
//! a few arenas, a fixed mmap threshold (large buffers are mapped and unmapped), and a trim when
//! the upload memory gate goes idle after a large reservation. musl's allocator returns memory on
//! its own and has none of these knobs, so they apply to glibc builds only.

/// Arenas for the whole process: enough that the cores do not contend on one lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 4;

/// Blocks from this size up are mapped on their own and returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Sets the allocator up; call once at start, before the worker threads start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is called before the server
    // starts its threads, and any value is valid for these two parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns the free pages of every arena to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' own locks and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
