//! Memory advice for large read-mostly buffers (the weights).

/// Asks the kernel to back `len` bytes at `ptr` (a fresh, untouched allocation) with 2 MiB
/// pages where it can: decode streams gigabytes of weights per step, and with 4 KiB pages the
/// hardware prefetchers stop at every page boundary. Advice only: failure changes nothing.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).div_ceil(PAGE) * PAGE;
        let end = (ptr as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes no
            // contents and no mapping we rely on.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}
