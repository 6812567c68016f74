//! Warm guest memory for a benchmark phase that fills the page cache.
//!
//! On a virtual machine the first touch of a guest page is slow: the hypervisor has to back
//! it with host memory first (on the VMs Shoal is benchmarked on, writing a 1 GiB file runs
//! at 250-400 MB/s the first time and at 2.6-4.4 GB/s when it reuses pages just freed). Worse,
//! the guest hands freed pages back to the host (virtio-balloon free page reporting) within
//! seconds, so "touch and free beforehand" does not last: the same 1 GiB write 3 s after the
//! free was back at ~400 MB/s.
//!
//! A cold pull through an agent writes the whole blob into the agent's page cache, while the
//! direct download it is compared with only reads pages the origin already has cached. To
//! compare the two paths rather than the hypervisor, [`ScratchMemory`] touches the pages the
//! pull will need before the clock starts (by writing a scratch file) and gives them back
//! just in time, truncating the file a little ahead of what the agent has written, so the
//! agent's writes reuse warm pages before the guest can report them to the host.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;

/// How far ahead of the agent's writes pages are freed: enough for the writes it has in
/// flight (a few pieces), little enough that the freed pages are reused long before the
/// guest reports them to the host.
const LEAD: u64 = 64 << 20;
/// How often the agent's written bytes are polled.
const POLL: Duration = Duration::from_millis(5);

/// A file whose pages stand in for the memory a phase is about to need; deleted on drop.
#[derive(Debug)]
pub struct ScratchMemory {
    file: File,
    path: PathBuf,
    len: u64,
}

impl ScratchMemory {
    /// Writes `len` bytes to a new file in `dir`, touching that much page cache.
    pub fn touch(dir: &Path, len: u64) -> anyhow::Result<Self> {
        let path = dir.join("pretouch.scratch");
        let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // Not zeros only by convention: the page cache does not deduplicate either way.
        let chunk = vec![0xa5u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n]).with_context(|| format!("writing {}", path.display()))?;
            left -= n as u64;
        }
        Ok(Self { file, path, len })
    }

    /// Frees the scratch pages in step with the bytes `pid` writes, [`LEAD`] ahead of them,
    /// until the returned guard is dropped (which frees the rest and deletes the file).
    pub fn release_ahead_of(self, pid: u32) -> anyhow::Result<Releaser> {
        let start = crate::procfs::bytes_written(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kept = self.len;
                while !stop.load(Ordering::Relaxed) {
                    let written = crate::procfs::bytes_written(pid).unwrap_or(u64::MAX).saturating_sub(start);
                    let keep = self.len.saturating_sub(written.saturating_add(LEAD));
                    if keep < kept {
                        // Truncating frees the pages past the new length at once.
                        if self.file.set_len(keep).is_err() {
                            break;
                        }
                        kept = keep;
                    }
                    std::thread::sleep(POLL);
                }
                kept
            })
        };
        Ok(Releaser { stop, thread: Some(thread) })
    }
}

impl Drop for ScratchMemory {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Stops releasing scratch memory when dropped; see [`ScratchMemory::release_ahead_of`].
#[derive(Debug)]
pub struct Releaser {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Releaser {
    /// Stops and returns how many scratch bytes were still held (the pages the phase did not
    /// need); the file is deleted.
    pub fn finish(mut self) -> u64 {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to 5 s for the scratch file to shrink to `len` or less.
    fn shrinks_to(path: &Path, len: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if std::fs::metadata(path).expect("scratch").len() <= len {
                return true;
            }
            std::thread::sleep(POLL);
        }
        false
    }

    #[test]
    fn releases_as_the_process_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let scratch = ScratchMemory::touch(dir.path(), 3 * LEAD).expect("touch");
        let path = dir.path().join("pretouch.scratch");
        let releaser = scratch.release_ahead_of(std::process::id()).expect("release");
        // The lead is freed at once (other tests may write too: bounds, not equalities).
        assert!(shrinks_to(&path, 2 * LEAD));
        std::fs::write(dir.path().join("other"), vec![0u8; LEAD as usize]).expect("write");
        assert!(shrinks_to(&path, LEAD));
        assert!(releaser.finish() <= LEAD);
        assert!(!path.exists());
    }
}
