//! When a download announces itself to the tracker (and so learns of new peers).
//!
//! A download announces at once, then again a while after each answer: a quarter of its
//! age, between [`Schedule::first`] and [`Schedule::longest`], so agents that start together
//! find each other within a fraction of a second and an old download does not flood the
//! tracker. At most one announce is in flight (a slow tracker must not pile them up); a
//! re-plan asks for one at once, or as soon as the one in flight answers.

use std::time::Duration;

/// The re-announce intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The shortest interval, for a download just started.
    pub first: Duration,
    /// The longest interval, for an old download.
    pub longest: Duration,
}

impl Schedule {
    /// The agent's: from 250 ms to 3 s.
    pub const AGENT: Self = Self { first: Duration::from_millis(250), longest: Duration::from_secs(3) };

    /// When a download `age` old that has just heard from the tracker announces next.
    pub fn next(&self, age: Duration) -> Duration {
        age.saturating_add((age / 4).clamp(self.first, self.longest.max(self.first)))
    }
}

/// The announce timer of one download; `now` is the download's age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announces {
    schedule: Schedule,
    next: Duration,
    in_flight: bool,
    /// A re-plan asked for an announce while one was in flight: due when it answers.
    again: bool,
}

impl Announces {
    /// A download that has not announced yet: its first announce is due at once.
    pub fn new(schedule: Schedule) -> Self {
        Self { schedule, next: Duration::ZERO, in_flight: false, again: false }
    }

    /// Whether an announce is due at `now`; if so it counts as sent, and no other is due
    /// before [`on_answer`](Self::on_answer).
    pub fn poll(&mut self, now: Duration) -> bool {
        if self.in_flight || now < self.next {
            return false;
        }
        self.in_flight = true;
        true
    }

    /// The announce in flight was answered (or failed) at `now`.
    pub fn on_answer(&mut self, now: Duration) {
        self.in_flight = false;
        self.next = if std::mem::take(&mut self.again) { now } else { self.schedule.next(now) };
    }

    /// The download was re-planned at `now`: announce at once, or as soon as the announce in
    /// flight answers.
    pub fn replan(&mut self, now: Duration) {
        self.next = now;
        self.again = self.in_flight;
    }

    /// When the next announce is due, unless one is in flight (then its answer comes first).
    pub fn next_wakeup(&self) -> Option<Duration> {
        (!self.in_flight).then_some(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn the_interval_grows_with_age_between_its_bounds() {
        let s = Schedule::AGENT;
        assert_eq!(s.next(ms(0)), ms(250));
        assert_eq!(s.next(ms(4_000)), ms(5_000));
        assert_eq!(s.next(ms(100_000)), ms(103_000));
        let odd = Schedule { first: ms(500), longest: ms(100) };
        assert_eq!(odd.next(ms(0)), ms(500), "a longest below first is first");
    }

    #[test]
    fn one_announce_at_a_time_the_next_after_the_answer() {
        let mut a = Announces::new(Schedule::AGENT);
        assert_eq!(a.next_wakeup(), Some(ms(0)));
        assert!(a.poll(ms(0)), "the first announce is due at once");
        assert!(!a.poll(ms(0)));
        assert_eq!(a.next_wakeup(), None, "the answer comes first");
        assert!(!a.poll(ms(10_000)), "still in flight");
        // Answered at 40 ms: the next is due 250 ms later, counted from the answer.
        a.on_answer(ms(40));
        assert_eq!(a.next_wakeup(), Some(ms(290)));
        assert!(!a.poll(ms(289)));
        assert!(a.poll(ms(290)));
        a.on_answer(ms(8_000));
        assert_eq!(a.next_wakeup(), Some(ms(10_000)));
    }

    #[test]
    fn a_replan_announces_at_once_or_right_after_the_answer() {
        let mut a = Announces::new(Schedule::AGENT);
        assert!(a.poll(ms(0)));
        a.on_answer(ms(10));
        // Idle: due at once.
        a.replan(ms(100));
        assert_eq!(a.next_wakeup(), Some(ms(100)));
        assert!(a.poll(ms(100)));
        // In flight: due when it answers, not a quarter of the age later.
        a.replan(ms(150));
        assert!(!a.poll(ms(150)));
        a.on_answer(ms(200));
        assert_eq!(a.next_wakeup(), Some(ms(200)));
        assert!(a.poll(ms(200)));
        a.on_answer(ms(210));
        assert_eq!(a.next_wakeup(), Some(ms(460)), "back to the schedule");
    }
}
