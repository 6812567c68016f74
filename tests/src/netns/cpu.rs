//! CPU accounting from `/proc`: one process's user + system seconds, and the machine-wide
//! split (user, system, softirq, idle) that tells the links' cost from the processes'.

use anyhow::{ensure, Context as _};

/// The kernel's USER_HZ: the unit of the CPU times in `/proc/*/stat`.
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds of `/proc/<pid>` (`self` for this process).
pub(super) fn proc_cpu_secs(pid: &str) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc/pid/stat")?.parse::<u64>()? as f64)
    };
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// Machine-wide CPU time from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuTimes {
    pub(super) user: u64,
    pub(super) system: u64,
    pub(super) softirq: u64,
    pub(super) idle: u64,
    pub(super) total: u64,
}

impl CpuTimes {
    pub(super) fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
        ensure!(v.len() >= 7, "short cpu line in /proc/stat");
        // user nice system idle iowait irq softirq steal ...
        let total = v.iter().take(8).sum();
        Ok(Self { user: v[0] + v[1], system: v[2] + v[5], softirq: v[6], idle: v[3] + v[4], total })
    }

    /// The ticks spent between `before` and `self`. Saturating: the kernel's counters are
    /// not all monotonic (iowait, part of `idle` and `total`, can go backwards).
    pub(super) fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
            softirq: self.softirq.saturating_sub(before.softirq),
            idle: self.idle.saturating_sub(before.idle),
            total: self.total.saturating_sub(before.total),
        }
    }

    pub(super) fn pct(self, part: u64) -> f64 {
        100.0 * part as f64 / self.total.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_that_go_backwards_count_as_zero() {
        let before = CpuTimes { user: 10, system: 10, softirq: 10, idle: 100, total: 130 };
        // iowait (in idle and total) dropped between the two reads.
        let after = CpuTimes { user: 15, system: 12, softirq: 10, idle: 90, total: 127 };
        let d = after.since(before);
        assert_eq!((d.user, d.system, d.softirq, d.idle, d.total), (5, 2, 0, 0, 0));
    }
}
