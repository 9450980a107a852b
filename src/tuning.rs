//! Process-wide settings that decide how fast the CPU paths run: glibc's allocator and candle's
//! thread pool. [`init_process`] runs first thing in `main`; [`keep_freed_memory`] once the
//! weights are loaded (by `main` and the benchmarks; never from the library, whose callers own
//! their process).

/// First thing in `main`, before any other thread exists: one malloc arena (see
/// [`use_one_malloc_arena`]) and candle's barrier-pool workers parked soon after each task.
/// candle 0.11 runs element-wise ops on its own pool, whose workers spin 25,000 times after
/// every op before parking: on a 2-core machine a spinning worker takes a core from the next
/// matrix product. With 100 (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set), measured on
/// blip2-opt-2.7b in one run each: ViT-g on 8 images 23.0 -> 22.2 s, prefill of 8 prompts
/// 8.51 -> 8.18 s, a decode step at batch 8 0.596 -> 0.586 s.
pub fn init_process() {
    use_one_malloc_arena();
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        // Before any other thread exists, so nothing reads the environment concurrently.
        std::env::set_var(SPIN, "100");
    }
}

/// Every thread allocates from glibc's main heap. Otherwise the model worker thread gets an
/// arena of its own, made of 64 MiB heaps that a batch's activations (35-50 MiB each for 8
/// images through ViT-g) do not share well: heaps are created and unmapped over and over, and
/// [`keep_freed_memory`] cannot keep them.
/// Measured through the HTTP server on blip2-opt-2.7b (2 cores, single runs): 8 concurrent
/// captions of 20 tokens took 48.6-49.5 s without this and 45.8 s with it. The tensors are large
/// and few, so one arena's lock costs nothing measurable.
fn use_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes an allocator parameter; 1 is in range.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
            tracing::debug!("mallopt refused M_ARENA_MAX");
        }
    }
}

/// Once the weights are in place: keep freed heap memory in the process for the next request
/// instead of handing it back. Every forward pass allocates and frees buffers of up to tens of
/// MiB (a batch of 8 images through ViT-g: 50 MiB for one MLP activation); with glibc's
/// defaults those above its mmap threshold are mapped and unmapped on each use, and the kernel
/// zeroes every page again. Measured on blip2-opt-2.7b (2 cores): the vision encoder on 8
/// images took 30-33 s that way and 24 s with this. Called after loading so that the weights
/// themselves stay in their own mappings (with huge-page advice). The cost: the process keeps
/// the peak of its working buffers (hundreds of MiB) rather than returning it between requests.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30),
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX),
            )
        };
        if mmap != 1 || trim != 1 {
            tracing::debug!("mallopt refused a setting; freed memory is returned as usual");
        }
    }
}
