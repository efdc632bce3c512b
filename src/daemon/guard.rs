//! The model file under a running daemon. The int4 engine maps its GGUF: a file truncated or
//! rewritten in place (`cp` over it) while mapped makes the next read of a vanished page fault
//! with SIGBUS, which would kill the daemon silently. Two guards:
//!
//! - [`ModelFile::check`], run every couple of seconds: the file at the path, if it is still the
//!   one mapped (same inode), must keep its size and modification time; if not, the daemon logs
//!   it by name and stops with an error, for systemd to restart it on the new file. A file
//!   *replaced by rename* (a new inode) is safe: the mapping keeps the old one alive.
//! - [`install_sigbus_handler`]: a fault that comes before the check notices writes one line
//!   naming the file to stderr (the journal under systemd) and exits with [`EXIT_MODEL_CHANGED`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The exit status when the model file changed under the daemon (EX_IOERR).
pub const EXIT_MODEL_CHANGED: i32 = 74;

/// The model file as it was when it was mapped.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl ModelFile {
    /// The file at `path` now; `None` when it cannot be read (then there is nothing to guard).
    pub fn new(path: &Path) -> Option<ModelFile> {
        let m = std::fs::metadata(path).ok()?;
        Some(ModelFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    /// Whether the mapped file is still as it was. Replaced by rename (another inode), or gone
    /// from the path, is fine: the mapping holds the original.
    pub fn check(&self) -> Result<(), String> {
        let Ok(m) = std::fs::metadata(&self.path) else {
            return Ok(());
        };
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Ok(());
        }
        if m.len() != self.len {
            return Err(format!(
                "the model file {} changed size while mapped ({} bytes, now {}): it was truncated or rewritten in place; replace model files by rename",
                self.path.display(),
                self.len,
                m.len()
            ));
        }
        if (m.mtime(), m.mtime_nsec()) != self.mtime {
            return Err(format!(
                "the model file {} was rewritten in place while mapped; replace model files by rename",
                self.path.display()
            ));
        }
        Ok(())
    }
}

static MODEL_MSG: OnceLock<Vec<u8>> = OnceLock::new();
static OTHER_MSG: OnceLock<Vec<u8>> = OnceLock::new();
static RANGE_START: AtomicUsize = AtomicUsize::new(0);
static RANGE_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: atomic loads, write(2), _exit(2).
    // SAFETY: the kernel passes a valid siginfo_t for a handler installed with SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, len) = (
        RANGE_START.load(Ordering::Relaxed),
        RANGE_LEN.load(Ordering::Relaxed),
    );
    let msg = if addr >= start && addr < start.wrapping_add(len) {
        MODEL_MSG.get()
    } else {
        OTHER_MSG.get()
    };
    if let Some(m) = msg {
        // SAFETY: `m` is a live static buffer of `m.len()` bytes.
        unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
    }
    // SAFETY: _exit ends the process at once, without running anything else.
    unsafe { libc::_exit(EXIT_MODEL_CHANGED) };
}

/// Installs the SIGBUS handler for the model at `path`, mapped at `range` (when it is).
pub fn install_sigbus_handler(path: &Path, range: Option<(usize, usize)>) -> std::io::Result<()> {
    // Under systemd the journal reads a `<N>` prefix on stderr as the priority: 2 is critical.
    let prefix = if std::env::var_os("JOURNAL_STREAM").is_some() {
        "<2>"
    } else {
        ""
    };
    let _ = MODEL_MSG.set(
        format!(
            "{prefix}edgellm: fatal: SIGBUS reading the model file {}: it was truncated or rewritten in place while mapped; exiting with status {EXIT_MODEL_CHANGED} for the service manager to restart. Replace model files by rename (mv), never by writing over them.\n",
            path.display()
        )
        .into_bytes(),
    );
    let _ = OTHER_MSG.set(
        format!(
            "{prefix}edgellm: fatal: SIGBUS (a mapped file changed under the daemon; its model is {}); exiting with status {EXIT_MODEL_CHANGED}.\n",
            path.display()
        )
        .into_bytes(),
    );
    if let Some((start, len)) = range {
        RANGE_START.store(start, Ordering::Relaxed);
        RANGE_LEN.store(len, Ordering::Relaxed);
    }
    // SAFETY: a zeroed sigaction with the handler and flags set is a valid argument; the
    // handler only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
