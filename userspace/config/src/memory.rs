//! Returning the translation's memory to the system.
//!
//! Reading a configuration allocates millions of small blocks (the protobuf JSON mapping's
//! maps and values, transcoding) that are all freed once the model is built. glibc's
//! allocator keeps freed blocks in its heap for reuse, so without help the process's RSS
//! stays at the peak of the largest configuration it ever read: for 1,000 services with
//! 10,000 endpoints that is 138 MiB, of which 32 MiB are live.
//! [`release_free_memory`] hands the free pages back (`malloc_trim`); callers run it after
//! a configuration has been applied and its intermediates dropped.

/// Returns freed heap memory to the system. A no-op on allocators without `malloc_trim`.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no
    // preconditions and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
