//! What a benchmark phase cost each server process, read from `/proc`: CPU time (user +
//! system), peak resident set size and bytes written.
//!
//! The machines the benchmarks run on are shared and noisy, so wall-clock rates are reported as
//! ratios against a baseline of the same run; CPU-seconds per GiB moved are the other figure
//! that survives contention, since a process waiting for a core is not charged for it.

use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`), fixed at 100 by
/// the kernel's ABI on every architecture Shoal runs on.
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of `process` (a pid or `self`) so far.
pub fn cpu_time(process: &str) -> anyhow::Result<Duration> {
    let path = format!("/proc/{process}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_time(&text).with_context(|| format!("parsing {path}"))
}

/// `utime + stime` of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself, so the fields are counted from
/// the last `)`: utime and stime are fields 14 and 15.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

/// Resets the peak resident set size (`VmHWM`) of `pid` to its current RSS, so that a later
/// [`peak_rss_kib`] measures one phase rather than the whole life of the process.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// Peak resident set size (`VmHWM`) of `pid` in KiB, since it started or since the last
/// [`reset_peak_rss`].
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    crate::load::status_kib(&pid.to_string(), "VmHWM").with_context(|| format!("no VmHWM for pid {pid}"))
}

/// Bytes `pid` has passed to `write`-family calls (`wchar` of `/proc/<pid>/io`), whether or
/// not they have reached the disk yet: how much page cache it has filled.
pub fn bytes_written(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no wchar in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_name() {
        let stat = "4242 (tokio) runtime (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_secs_f64(3.25)));
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_time("self").is_ok());
        assert!(bytes_written(std::process::id()).is_ok());
    }
}
