//! Fix candle's CPU thread count once, at startup.
//!
//! candle 0.11 asks `get_num_threads()` at every matmul and conv, and without `RAYON_NUM_THREADS`
//! that call counts physical cores by parsing `/proc/cpuinfo` again each time: about a tenth of
//! the CPU time of an LPO training step on the shapes model went to the kernel formatting that
//! file. Setting the variable to the same count candle would choose keeps its behaviour and
//! skips the parsing.

/// Set `RAYON_NUM_THREADS` to the physical core count unless the user already set it (or
/// `CANDLE_NUM_THREADS`, which candle reads first). Call before other threads start.
pub fn pin_thread_count() {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("RAYON_NUM_THREADS") || set("CANDLE_NUM_THREADS") || set("CANDLE_CPU_MASK") {
        return;
    }
    std::env::set_var(
        "RAYON_NUM_THREADS",
        num_cpus::get_physical().max(1).to_string(),
    );
}
