//! Cut-through in the model: which hosts are receiving a piece (through a chain of relays
//! that reaches a holder), the first blocks that make a piece relayed and, if they came fast
//! enough, offered, and the relayed requests that wait for the relay's own last block.

use std::time::Duration;

use super::*;

impl World {
    /// Cut-through: whether `host` is receiving `piece` now: a request for it under way
    /// whose first blocks passed, from a server that holds the piece or is itself receiving
    /// it. A relay sends only bytes it has received, so a chain of relays that does not
    /// reach a holder (its source ended, or it loops back on itself) carries nothing.
    pub(super) fn receiving(&self, host: u32, piece: u32) -> bool {
        let mut seen = vec![host];
        let mut next = vec![host];
        while let Some(h) = next.pop() {
            for &x in &self.hosts[h as usize].outstanding {
                let q = &self.reqs[x as usize];
                if q.piece != piece || !q.relaying {
                    continue;
                }
                match q.state {
                    // Sent in full by a server that holds the piece.
                    ReqState::InTransit => return true,
                    ReqState::Flowing(_) | ReqState::Waiting => {}
                    _ => continue,
                }
                if self.hosts[q.server as usize].bits.get(piece) {
                    return true;
                }
                if !seen.contains(&q.server) {
                    seen.push(q.server);
                    next.push(q.server);
                }
            }
        }
        false
    }

    /// Cut-through: `host`'s transfer of `piece` ended without the piece (cancelled, timed
    /// out, its download failed). As the agent's relay, the requests it served from that
    /// transfer end with it: their streams are reset and the requesters look elsewhere.
    pub(super) fn end_relay(&mut self, host: u32, piece: u32) {
        if self.hosts[host as usize].bits.get(piece) || self.receiving(host, piece) {
            return;
        }
        let now = self.now();
        let serving: Vec<u32> = self.hosts[host as usize]
            .serving
            .iter()
            .copied()
            .filter(|&r| self.reqs[r as usize].piece == piece)
            .collect();
        for r in serving {
            let ReqState::Flowing(flow) = self.reqs[r as usize].state else { continue };
            if let Some(e) = self.net.abort(now, flow, &mut self.finishes) {
                self.account(e.src, e.sent);
                self.wasted += e.sent;
            }
            self.reset(r);
            self.release_slot(host, r);
        }
        self.schedule_finishes();
        let waiters = std::mem::take(&mut self.hosts[host as usize].waiters);
        let mut kept = Vec::with_capacity(waiters.len());
        for w in waiters {
            let q = &mut self.reqs[w as usize];
            if q.piece == piece && q.state == ReqState::Waiting {
                self.wasted += self.piece_bytes(piece);
                self.reset(w);
            } else if q.state == ReqState::Waiting {
                kept.push(w);
            }
        }
        self.hosts[host as usize].waiters = kept;
    }

    /// Ends request `r` at its server as the agent's server ends a stream it cannot serve
    /// (no piece, or its relay ended): the requester hears `NotFound` a one-way delay later.
    pub(super) fn reset(&mut self, r: u32) {
        self.reqs[r as usize].state = ReqState::Lost;
        self.q.after(self.one_way, Ev::Refused(r));
    }

    /// Cut-through: the first [`EARLY_OFFER_BLOCKS`] blocks of request `r`'s piece passed at
    /// its requester, which relays the piece from now on and, if they came fast enough (the
    /// agent's rule, [`EarlyOffer`]), offers it to its followers as if it held it. The
    /// judgement also grows or shrinks the requester's cap on requests in flight, as the
    /// agent's download loop does.
    pub(super) fn first_block(&mut self, r: u32) {
        let (client, piece, state) = {
            let q = &self.reqs[r as usize];
            (q.client, q.piece, q.state)
        };
        if !matches!(state, ReqState::Flowing(_) | ReqState::InTransit | ReqState::Waiting) {
            return;
        }
        self.reqs[r as usize].relaying = true;
        if let ReqState::Flowing(flow) = state {
            let fast = self.offers_early(piece, self.net.rate(flow));
            if let Some(s) = self.hosts[client as usize].sched.as_mut() {
                s.on_first_blocks(fast);
            }
            if !fast {
                return;
            }
            // The cap grew: the agent's loop polls on every event.
            self.dispatch(client);
        }
        let c = &mut self.hosts[client as usize];
        if c.gone() || !c.downloading() || c.bits.get(piece) || c.early.get(piece) {
            return;
        }
        c.early.set(piece);
        self.offer(client, piece, false);
    }

    /// The agent's offer rule ([`EarlyOffer`]) fed the first blocks of `piece` as they come
    /// at `rate` bytes per second: whether the piece is offered before it is whole.
    fn offers_early(&self, piece: u32, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        let len = self.piece_bytes(piece) as u64;
        let block = self.cfg.cut_through;
        let mut rule = EarlyOffer::new(len);
        let mut decision = None;
        for k in 0..len.div_ceil(block).min(u64::from(EARLY_OFFER_BLOCKS)) {
            let at = Duration::from_secs_f64((k * block) as f64 / rate);
            decision = decision.or(rule.on_block(at, block.min(len - k * block) as usize));
        }
        decision == Some(true)
    }

    /// Tells `host`'s followers it has `piece` (their Have arrives a one-way delay later);
    /// with `last`, its Have streams end there.
    pub(super) fn offer(&mut self, host: u32, piece: u32, last: bool) {
        let arrival = self.now() + self.one_way;
        let batch = self.cfg.have_batch;
        let subscribers = std::mem::take(&mut self.hosts[host as usize].subscribers);
        let mut kept = Vec::with_capacity(subscribers.len());
        for sub in subscribers {
            let h = &mut self.hosts[sub as usize];
            if h.gone() || !h.downloading() {
                continue;
            }
            kept.push(sub);
            h.haves.push((arrival, host, piece));
            if last {
                h.following.retain(|&x| x != host);
            }
            if h.flush_at.is_none() {
                h.flush_at = Some(arrival + batch);
                self.q.schedule(arrival + batch, Ev::HaveFlush(sub));
            }
        }
        self.hosts[host as usize].subscribers = if last { Vec::new() } else { kept };
    }

    /// Cut-through: `host` now holds `piece`; requests served from it while it arrived get
    /// their last block, one block time and a one-way delay later.
    pub(super) fn release_waiters(&mut self, host: u32, piece: u32) {
        let block = (self.cfg.cut_through as f64).min(self.piece_bytes(piece));
        let tail = (block / self.cfg.rate * SEC as f64) as Nanos;
        let waiters = std::mem::take(&mut self.hosts[host as usize].waiters);
        let mut kept = Vec::with_capacity(waiters.len());
        for w in waiters {
            let q = &mut self.reqs[w as usize];
            if q.state != ReqState::Waiting {
                continue;
            }
            if q.piece != piece {
                kept.push(w);
                continue;
            }
            q.state = ReqState::InTransit;
            let delay = tail + self.message_delay();
            self.q.after(delay, Ev::Deliver(w));
        }
        self.hosts[host as usize].waiters = kept;
    }
}
