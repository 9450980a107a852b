//! Memory for large read-mostly buffers (the weights): advice for the ones we allocate, and
//! views of the ones mapped from a checkpoint's files.

/// Asks the kernel to back `len` bytes at `ptr` (a fresh, untouched allocation) with 2 MiB
/// pages where it can: decode streams gigabytes of weights per step, and with 4 KiB pages the
/// hardware prefetchers stop at every page boundary. Advice only: failure changes nothing.
pub fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    if let Some((start, len)) = whole_pages(ptr as usize, len) {
        // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes no
        // contents and no mapping we rely on.
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// The 4 KiB pages that lie wholly inside `len` bytes at `ptr`: their start and length.
#[cfg(target_os = "linux")]
fn whole_pages(ptr: usize, len: usize) -> Option<(usize, usize)> {
    const PAGE: usize = 4096;
    let start = ptr.div_ceil(PAGE) * PAGE;
    let end = (ptr + len) / PAGE * PAGE;
    (end > start).then(|| (start, end - start))
}

/// f32 values that live in a read-only mapping of a checkpoint file: the weights are the page
/// cache's pages, not a copy (no second copy in memory, nothing to read at start-up when the
/// files are cached). The mapping stays while any `MappedF32` of it is alive.
#[derive(Clone)]
pub struct MappedF32 {
    map: std::sync::Arc<memmap2::Mmap>,
    start: usize,
    len: usize,
}

impl MappedF32 {
    /// `len` values at byte `start` of `map`; `None` when they fall outside it or are not
    /// 4-byte aligned (safetensors does not promise alignment; such a tensor is copied).
    pub fn new(map: std::sync::Arc<memmap2::Mmap>, start: usize, len: usize) -> Option<Self> {
        let end = len.checked_mul(4)?.checked_add(start)?;
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(std::mem::align_of::<f32>());
        (end <= map.len() && aligned).then_some(Self { map, start, len })
    }

    /// Tells the kernel this process no longer needs the pages that lie wholly inside these
    /// values (a weight quantised from the mapping): they leave the process's resident memory
    /// and stay in the page cache. Reading them again is still correct (they fault back in).
    pub fn release(&self) {
        #[cfg(target_os = "linux")]
        if let Some((start, len)) =
            whole_pages(self.map.as_ptr() as usize + self.start, self.len * 4)
        {
            // SAFETY: the range lies inside a read-only file mapping we own; MADV_DONTNEED on it
            // only drops page-table entries, which later reads fault back in from the file, so
            // no value anyone reads changes.
            unsafe {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
            }
        }
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `new` checked that the range lies inside the mapping and is aligned for f32;
        // every bit pattern is an f32; the mapping is read-only and lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start) as *const f32, self.len)
        }
    }
}

impl std::fmt::Debug for MappedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedF32({} values at byte {})", self.len, self.start)
    }
}
