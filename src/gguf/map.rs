//! The bytes behind a GGUF image: a read-only memory mapping of the file (the normal case, so
//! weights are paged in on use and shared with the page cache, never copied) or an owned buffer
//! (tests, files written in memory).

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

pub enum Bytes {
    Mapped(Mmap),
    /// Stored as u64 words so the buffer is 8-byte aligned like a mapping is page aligned:
    /// block structs with f16 fields can then be viewed in place.
    Owned {
        words: Vec<u64>,
        len: usize,
    },
}

impl Bytes {
    /// Maps `path` read-only.
    pub fn map_file(path: &Path) -> std::io::Result<Bytes> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            // mmap of an empty file fails with EINVAL; an empty image parses to a clear error.
            return Ok(Bytes::from_vec(Vec::new()));
        }
        // SAFETY: the mapping is read-only and private to this process; edgellm never writes the
        // model file. Another process truncating the file while it is mapped would fault on
        // access (SIGBUS), which is the documented limit of any mmap-based loader (llama.cpp
        // shares it); model files are installed, not edited in place.
        let map = unsafe { map_readonly(&file)? };
        Ok(Bytes::Mapped(map))
    }

    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        for (w, chunk) in words.iter_mut().zip(v.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        Bytes::Owned { words, len }
    }
}

/// Maps a whole file read-only.
///
/// # Safety
/// The caller must ensure the file is not truncated or modified while the mapping lives: the
/// returned slice would then change under Rust's aliasing rules, or fault.
unsafe fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: forwarded to the caller's contract above.
    let map = unsafe { MmapOptions::new().map(file)? };
    #[cfg(unix)]
    {
        // Weights are read front to back once per token: tell the kernel so it reads ahead.
        let _ = map.advise(memmap2::Advice::WillNeed);
    }
    Ok(map)
}

impl Bytes {
    /// See `Gguf::release_range`.
    pub fn release_range(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = self {
            // SAFETY: sysconf has no preconditions.
            let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
                p if p > 0 => p as usize,
                _ => return,
            };
            let end = (offset + len).min(m.len());
            let start = offset.next_multiple_of(page);
            let stop = end / page * page;
            if stop > start {
                // SAFETY: a private, read-only file mapping: dropping its pages loses nothing,
                // a later read faults them in from the file again. The range lies inside the
                // mapping (clamped above) and starts on a page.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        stop - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned { words, len } => {
                // SAFETY: `words` holds at least `len` initialised bytes (len.div_ceil(8) words);
                // u8 has no alignment or validity requirements.
                unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, *len) }
            }
        }
    }
}
