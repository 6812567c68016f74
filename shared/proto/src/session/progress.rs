//! The progress rule: a download without a new verified piece for half the progress
//! timeout is re-planned (once per stall), and for the whole of it, it fails.
//!
//! Progress itself is measured by the scheduler ([`Scheduler::last_progress`], moved only
//! by a piece the download did not hold yet), so there is one record of it; this type only
//! remembers whether the current stall was already re-planned. A stall is identified by the
//! last progress it started from: a new piece starts a new one, which may be re-planned
//! again.
//!
//! [`Scheduler::last_progress`]: crate::scheduler::Scheduler::last_progress

use std::time::Duration;

/// What a stalled download must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Half the timeout without progress: cancel every request, forgive back-offs
    /// ([`Scheduler::replan`](crate::scheduler::Scheduler::replan)) and ask the tracker
    /// again. Said once per stall.
    Replan,
    /// The whole timeout without progress: the download fails.
    Fail,
}

/// The progress timer of one download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    timeout: Duration,
    /// The last progress of the stall that was re-planned, if one was.
    replanned: Option<Duration>,
}

impl Progress {
    /// A timer that re-plans after `timeout / 2` without progress and fails after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, replanned: None }
    }

    /// The whole progress timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What the download must do at `now`, its last progress being at `last`: fail once
    /// the whole timeout has passed, re-plan once half of it has (only the first time this
    /// is asked during one stall), else nothing.
    pub fn check(&mut self, now: Duration, last: Duration) -> Option<Stall> {
        let idle = now.saturating_sub(last);
        if idle >= self.timeout {
            return Some(Stall::Fail);
        }
        if idle >= self.timeout / 2 && self.replanned != Some(last) {
            self.replanned = Some(last);
            return Some(Stall::Replan);
        }
        None
    }

    /// When [`check`](Self::check) next has something to say if `last` does not move:
    /// half the timeout after `last`, or the whole of it once this stall was re-planned.
    pub fn next_check(&self, last: Duration) -> Duration {
        let wait = if self.replanned == Some(last) { self.timeout } else { self.timeout / 2 };
        last.saturating_add(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitfield::Bitfield;
    use crate::scheduler::{Action, Config, Scheduler};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn replans_once_at_half_then_fails_at_the_whole() {
        let mut p = Progress::new(secs(60));
        assert_eq!(p.next_check(secs(0)), secs(30));
        assert_eq!(p.check(secs(29), secs(0)), None);
        assert_eq!(p.check(secs(30), secs(0)), Some(Stall::Replan));
        assert_eq!(p.check(secs(31), secs(0)), None, "once per stall");
        assert_eq!(p.check(secs(59), secs(0)), None);
        assert_eq!(p.next_check(secs(0)), secs(60));
        assert_eq!(p.check(secs(60), secs(0)), Some(Stall::Fail));
        assert_eq!(p.check(secs(61), secs(0)), Some(Stall::Fail), "a failed download stays failed");
    }

    #[test]
    fn progress_starts_a_new_stall() {
        let mut p = Progress::new(secs(10));
        assert_eq!(p.check(secs(5), secs(0)), Some(Stall::Replan));
        // A piece at 7 s: the clock starts again from there, and may re-plan again.
        assert_eq!(p.next_check(secs(7)), secs(12));
        assert_eq!(p.check(secs(11), secs(7)), None);
        assert_eq!(p.check(secs(12), secs(7)), Some(Stall::Replan));
        assert_eq!(p.check(secs(16), secs(7)), None);
        assert_eq!(p.check(secs(17), secs(7)), Some(Stall::Fail));
    }

    #[test]
    fn failing_wins_over_a_replan_never_made() {
        // A driver that was not woken at half the timeout fails at once.
        let mut p = Progress::new(secs(10));
        assert_eq!(p.check(secs(10), secs(0)), Some(Stall::Fail));
        let mut zero = Progress::new(Duration::ZERO);
        assert_eq!(zero.check(Duration::ZERO, Duration::ZERO), Some(Stall::Fail));
    }

    #[test]
    fn a_scheduler_without_pieces_is_replanned_then_fails() {
        // Driven as the agent and the simulator drive it: poll, then sleep to the earlier of
        // the scheduler's wake-up and the progress timer.
        let mut s: Scheduler<u32> =
            Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config::for_agent(1 << 20, 10));
        s.add_peer(9, false, Bitfield::full(4), Duration::ZERO).expect("taken");
        let mut p = Progress::new(secs(600));
        let (mut now, mut out, mut seen) = (Duration::ZERO, Vec::new(), Vec::new());
        for _ in 0..10_000 {
            match p.check(now, s.last_progress()) {
                Some(Stall::Fail) => break,
                Some(Stall::Replan) => {
                    s.replan();
                    seen.push(now);
                }
                None => {}
            }
            s.poll(now, &mut out);
            let timer = p.next_check(s.last_progress());
            now = s.next_wakeup(now).unwrap_or(timer).min(timer);
        }
        assert_eq!(seen, vec![secs(300)], "one re-plan, at half the timeout");
        assert_eq!(now, secs(600));
        assert!(out.iter().any(|a| matches!(a, Action::Cancel { .. })), "the peer never answered: {out:?}");
    }
}
