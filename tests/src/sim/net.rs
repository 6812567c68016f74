//! Links: each host has an uplink and a downlink of fixed capacity, shared among the
//! transfers crossing it (a fluid, processor-sharing model, as TCP or QUIC flows sharing a
//! bottleneck roughly behave).
//!
//! A transfer's rate is the smaller of its two ports' shares. Each port shares its capacity
//! max-min fairly (water-filling) among its flows, bounding each flow by what it can get at
//! its other end (at least the equal share there); so capacity left over by a flow held back
//! elsewhere goes to the others. Two rounds of this approximate global max-min fairness. Rates are recomputed only around the ports a transfer starts or ends at (and
//! their neighbours' ports one hop away), which keeps an event O(flows near it), never
//! O(hosts). Shares a further hop away may lag until their ports next change; that can
//! only leave capacity unused, never exceed it, since a port's shares always sum to at most
//! its capacity.

use super::queue::{Nanos, SEC};

/// A transfer in progress, by index.
pub type FlowId = u32;

#[derive(Debug, Clone)]
struct Flow {
    src: u32,
    dst: u32,
    /// Bytes still to send.
    remaining: f64,
    /// Bytes sent so far.
    sent: f64,
    /// Bytes per second.
    rate: f64,
    up_share: f64,
    down_share: f64,
    /// When `remaining` was last brought up to date.
    updated: Nanos,
    /// Bumped whenever the finish time changes, so earlier finish events can be ignored.
    version: u32,
    live: bool,
    /// The caller's identifier for the transfer.
    tag: u32,
    mark: u64,
}

/// A finish time to (re)schedule: the flow ends at `at` unless its version moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub flow: FlowId,
    pub version: u32,
    pub at: Nanos,
}

/// A transfer that ended, with the bytes that crossed the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ended {
    pub tag: u32,
    pub src: u32,
    pub sent: f64,
}

/// Every host's ports and the flows crossing them.
#[derive(Debug, Default)]
pub struct Net {
    up_cap: Vec<f64>,
    down_cap: Vec<f64>,
    up: Vec<Vec<FlowId>>,
    down: Vec<Vec<FlowId>>,
    flows: Vec<Flow>,
    free: Vec<FlowId>,
    /// Most one flow can carry whatever the links (the loss model's cap; infinite without).
    flow_cap: f64,
    mark: u64,
    touched: Vec<FlowId>,
    scratch: Vec<(f64, FlowId)>,
}

impl Net {
    /// `hosts` hosts, each with `up` and `down` bytes per second.
    pub fn new(hosts: usize, up: f64, down: f64) -> Self {
        Self {
            up_cap: vec![up; hosts],
            down_cap: vec![down; hosts],
            up: vec![Vec::new(); hosts],
            down: vec![Vec::new(); hosts],
            flow_cap: f64::INFINITY,
            ..Self::default()
        }
    }

    /// Sets one host's link capacities (before any flow starts).
    pub fn set_capacity(&mut self, host: u32, up: f64, down: f64) {
        self.up_cap[host as usize] = up;
        self.down_cap[host as usize] = down;
    }

    /// Caps every flow at `cap` bytes per second, whatever its links could give it.
    pub fn with_flow_cap(mut self, cap: f64) -> Self {
        self.flow_cap = cap;
        self
    }

    /// Flows currently crossing `host`'s uplink.
    pub fn uploads(&self, host: u32) -> usize {
        self.up[host as usize].len()
    }

    /// Flows currently crossing `host`'s downlink.
    pub fn downloads(&self, host: u32) -> usize {
        self.down[host as usize].len()
    }

    /// The current rate of a live flow, bytes per second.
    pub fn rate(&self, flow: FlowId) -> f64 {
        self.flows[flow as usize].rate
    }

    /// Starts sending `bytes` from `src` to `dst`; finish times that changed (the new
    /// flow's included) are appended to `out`.
    pub fn start(
        &mut self,
        now: Nanos,
        src: u32,
        dst: u32,
        bytes: f64,
        tag: u32,
        out: &mut Vec<Finish>,
    ) -> FlowId {
        let flow = Flow {
            src,
            dst,
            remaining: bytes.max(0.0),
            sent: 0.0,
            rate: 0.0,
            up_share: 0.0,
            down_share: 0.0,
            updated: now,
            version: 0,
            live: true,
            tag,
            mark: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                // Versions carry on across reuse so a finish event of the slot's previous
                // flow can never match the new one.
                let version = self.flows[id as usize].version;
                self.flows[id as usize] = Flow { version, ..flow };
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as FlowId
            }
        };
        self.up[src as usize].push(id);
        self.down[dst as usize].push(id);
        self.reshare(now, src, dst, Some(id), out);
        id
    }

    /// Ends `flow` if `version` is still its current one (otherwise the event is stale).
    pub fn finish(&mut self, now: Nanos, flow: FlowId, version: u32, out: &mut Vec<Finish>) -> Option<Ended> {
        let f = self.flows.get(flow as usize)?;
        if !f.live || f.version != version {
            return None;
        }
        let sent = f.sent + f.remaining;
        Some(self.remove(now, flow, sent, out))
    }

    /// Cuts `flow` short (a peer left or a request was given up on).
    pub fn abort(&mut self, now: Nanos, flow: FlowId, out: &mut Vec<Finish>) -> Option<Ended> {
        let f = self.flows.get_mut(flow as usize)?;
        if !f.live {
            return None;
        }
        settle(f, now);
        let sent = f.sent;
        Some(self.remove(now, flow, sent, out))
    }

    fn remove(&mut self, now: Nanos, flow: FlowId, sent: f64, out: &mut Vec<Finish>) -> Ended {
        let f = &mut self.flows[flow as usize];
        f.live = false;
        let (src, dst, tag) = (f.src, f.dst, f.tag);
        let up = &mut self.up[src as usize];
        if let Some(i) = up.iter().position(|&x| x == flow) {
            up.swap_remove(i);
        }
        let down = &mut self.down[dst as usize];
        if let Some(i) = down.iter().position(|&x| x == flow) {
            down.swap_remove(i);
        }
        self.free.push(flow);
        self.reshare(now, src, dst, None, out);
        Ended { tag, src, sent }
    }

    /// Recomputes the shares of the ports a flow between `src` and `dst` crossed (whose flow
    /// count changed) and of the ports one hop away (whose bounds changed).
    fn reshare(&mut self, now: Nanos, src: u32, dst: u32, new: Option<FlowId>, out: &mut Vec<Finish>) {
        self.mark += 1;
        self.touched.clear();
        let mut ups: Vec<u32> = vec![src];
        let mut downs: Vec<u32> = vec![dst];
        for &f in &self.up[src as usize] {
            downs.push(self.flows[f as usize].dst);
        }
        for &f in &self.down[dst as usize] {
            ups.push(self.flows[f as usize].src);
        }
        ups.sort_unstable();
        ups.dedup();
        downs.sort_unstable();
        downs.dedup();
        // Two rounds: the second bounds each flow by the share the first gave it at its
        // other end, which passes capacity one side leaves unused on to the other.
        for _ in 0..2 {
            for &h in &ups {
                self.fill(now, h, true);
            }
            for &h in &downs {
                self.fill(now, h, false);
            }
        }
        for i in 0..self.touched.len() {
            let id = self.touched[i];
            let f = &mut self.flows[id as usize];
            let rate = f.up_share.min(f.down_share);
            if rate != f.rate || Some(id) == new {
                f.rate = rate;
                f.version = f.version.wrapping_add(1);
                out.push(Finish { flow: id, version: f.version, at: finish_at(f, now) });
            }
        }
    }

    /// Water-fills one port's capacity over its flows, each bounded by what it can get at
    /// the other end.
    fn fill(&mut self, now: Nanos, host: u32, uplink: bool) {
        let h = host as usize;
        let (cap, ids) =
            if uplink { (self.up_cap[h], &self.up[h]) } else { (self.down_cap[h], &self.down[h]) };
        self.scratch.clear();
        for &id in ids {
            let f = &self.flows[id as usize];
            let other = if uplink {
                self.down_cap[f.dst as usize] / self.down[f.dst as usize].len() as f64
            } else {
                self.up_cap[f.src as usize] / self.up[f.src as usize].len() as f64
            };
            // At least the equal share there (a share computed when that port was more
            // crowded must not hold the flow back), more if that port's filling gave more.
            let known = if uplink { f.down_share } else { f.up_share };
            let bound = other.max(known).min(self.flow_cap);
            self.scratch.push((bound, id));
        }
        self.scratch.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut left, mut k) = (cap, self.scratch.len());
        for &(bound, id) in &self.scratch {
            let share = bound.min(left / k as f64);
            left -= share;
            k -= 1;
            let f = &mut self.flows[id as usize];
            if f.mark != self.mark {
                f.mark = self.mark;
                settle(f, now);
                self.touched.push(id);
            }
            if uplink {
                f.up_share = share;
            } else {
                f.down_share = share;
            }
        }
    }
}

/// Brings a flow's byte counts up to `now` at its current rate.
fn settle(f: &mut Flow, now: Nanos) {
    let dt = now.saturating_sub(f.updated) as f64 / SEC as f64;
    let moved = (f.rate * dt).min(f.remaining);
    f.remaining -= moved;
    f.sent += moved;
    f.updated = now;
}

fn finish_at(f: &Flow, now: Nanos) -> Nanos {
    if f.remaining <= 0.0 {
        return now;
    }
    if f.rate <= 0.0 {
        return Nanos::MAX;
    }
    now.saturating_add((f.remaining / f.rate * SEC as f64).ceil() as Nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    /// Runs the finish events in time order until every flow ended; returns end times by tag.
    fn drain(net: &mut Net, mut pending: Vec<Finish>) -> Vec<(u32, Nanos, f64)> {
        let mut done = Vec::new();
        while !pending.is_empty() {
            pending.sort_by_key(|f| std::cmp::Reverse(f.at));
            let next = pending.pop().expect("an event");
            let mut out = Vec::new();
            if let Some(e) = net.finish(next.at, next.flow, next.version, &mut out) {
                done.push((e.tag, next.at, e.sent));
            }
            pending.extend(out);
        }
        done
    }

    #[test]
    fn one_flow_runs_at_the_link_rate() {
        let mut net = Net::new(2, 10.0 * MB, 10.0 * MB);
        let mut out = Vec::new();
        net.start(0, 0, 1, 10.0 * MB, 7, &mut out);
        assert_eq!(drain(&mut net, out), vec![(7, SEC, 10.0 * MB)]);
        assert_eq!((net.uploads(0), net.downloads(1)), (0, 0));
    }

    #[test]
    fn two_downloads_sharing_an_uplink_each_take_twice_as_long() {
        let mut net = Net::new(3, 10.0 * MB, 10.0 * MB);
        let mut out = Vec::new();
        net.start(0, 0, 1, 10.0 * MB, 1, &mut out);
        net.start(0, 0, 2, 10.0 * MB, 2, &mut out);
        let mut done = drain(&mut net, out);
        done.sort_by_key(|d| d.0);
        assert_eq!(done, vec![(1, 2 * SEC, 10.0 * MB), (2, 2 * SEC, 10.0 * MB)]);
    }

    #[test]
    fn a_flow_ending_gives_its_share_back() {
        // 5 MB and 10 MB share a 10 MB/s uplink: both at 5 MB/s until 1 s, then the second
        // alone at 10 MB/s for its last 5 MB: ends at 1.5 s.
        let mut net = Net::new(3, 10.0 * MB, 10.0 * MB);
        let mut out = Vec::new();
        net.start(0, 0, 1, 5.0 * MB, 1, &mut out);
        net.start(0, 0, 2, 10.0 * MB, 2, &mut out);
        let done = drain(&mut net, out);
        assert_eq!(done[0].0, 1);
        assert_eq!(done[0].1, SEC);
        assert_eq!(done[1].0, 2);
        assert!(done[1].1.abs_diff(SEC + SEC / 2) <= 1, "{done:?}");
    }

    #[test]
    fn capacity_held_back_elsewhere_goes_to_the_other_flows() {
        // Host 2 downloads from 0 and 1. Host 0 also uploads to 3 and 4, so it can give 2
        // only a third of its uplink; 2's downlink gives the rest to the flow from 1.
        let mut net = Net::new(5, 9.0 * MB, 9.0 * MB);
        let mut out = Vec::new();
        let a = net.start(0, 0, 2, 100.0 * MB, 1, &mut out);
        net.start(0, 0, 3, 100.0 * MB, 2, &mut out);
        net.start(0, 0, 4, 100.0 * MB, 3, &mut out);
        let b = net.start(0, 1, 2, 100.0 * MB, 4, &mut out);
        assert_eq!(net.rate(a), 3.0 * MB);
        assert_eq!(net.rate(b), 6.0 * MB);
    }

    #[test]
    fn an_aborted_flow_reports_what_it_sent() {
        let mut net = Net::new(2, 10.0 * MB, 10.0 * MB);
        let mut out = Vec::new();
        let f = net.start(0, 0, 1, 10.0 * MB, 9, &mut out);
        let e = net.abort(SEC / 4, f, &mut out).expect("live flow");
        assert_eq!((e.tag, e.src), (9, 0));
        assert!((e.sent - 2.5 * MB).abs() < 1.0);
        // Its pending finish event is now stale.
        assert!(net.finish(SEC, f, out[0].version, &mut out).is_none());
    }
}
