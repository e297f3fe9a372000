//! glibc malloc settings for tensor workloads.
//!
//! Activations of a few MiB to a few hundred MiB are allocated and freed at every op. By default
//! glibc serves those with fresh `mmap`s and returns them at `free`, so every op pays page faults
//! and zeroing (a quarter of the CPU time of sampling the shapes model was in the kernel). Keeping
//! them in the heap lets freed blocks be reused: sampling ran 10-15 % faster, kernel time fell 2.5x.

/// Raise the mmap and trim thresholds (call once, at startup, before any allocation-heavy work).
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads start.
    unsafe {
        // 32 MiB: the largest threshold glibc accepts on 64-bit.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 25);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: tensors are allocated on the calling thread but some are freed on rayon's,
        // and with an arena per thread the freed blocks could not serve the next allocation.
        // An SD1.5 training step's peak (benches/README.md) varied 1470-2045 MB between runs
        // with per-thread arenas and was 1351 MB every time with one, at the same speed.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
