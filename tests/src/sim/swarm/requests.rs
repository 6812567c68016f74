//! A request's life in the model: the server's admission (upload budget, line, Busy, the
//! origin's first copies first), the transfer, its delivery or refusal, cancels, and a host
//! leaving with its uploads.

use super::*;

impl World {
    pub(super) fn request_arrive(&mut self, r: u32) {
        let req = &self.reqs[r as usize];
        if req.state != ReqState::Sent {
            return;
        }
        let (server, piece) = (req.server, req.piece);
        let now = self.now();
        let receiving = self.receiving(server, piece);
        let s = &mut self.hosts[server as usize];
        // The real server's order: upload budget (or a place in line) first, then the
        // origin's first-copies-first check as the piece is read.
        let free = s.uploading < s.slots;
        if s.gone() {
            self.reqs[r as usize].state = ReqState::Lost;
        } else if s.failed || (!s.bits.get(piece) && !receiving) {
            self.reset(r);
        } else if !free && s.line.len() >= self.cfg.server_queue as usize {
            self.reqs[r as usize].state = ReqState::Busy;
            self.busy += 1;
            self.q.after(self.one_way, Ev::Refused(r));
        } else if s.first_copies.as_mut().is_some_and(|w| !w.admit(piece, now)) {
            self.reqs[r as usize].state = ReqState::Declined;
            self.q.after(self.one_way, Ev::Refused(r));
        } else if free {
            self.start_flow(r);
        } else {
            s.line.push_back(r);
            self.reqs[r as usize].state = ReqState::Queued;
        }
    }

    pub(super) fn start_flow(&mut self, r: u32) {
        let now = self.now();
        let (client, server, piece) = {
            let q = &self.reqs[r as usize];
            (q.client, q.server, q.piece)
        };
        let bytes = self.piece_bytes(piece);
        let s = &mut self.hosts[server as usize];
        s.uploading += 1;
        s.serving.push(r);
        let flow = self.net.start(now, server, client, bytes, r, &mut self.finishes);
        self.reqs[r as usize].state = ReqState::Flowing(flow);
        self.schedule_finishes();
        if self.cfg.cut_through > 0 {
            let rate = self.net.rate(flow);
            let rate = if rate > 0.0 { rate } else { self.cfg.rate };
            // The agent decides whether to offer a piece still arriving once its first
            // EARLY_OFFER_BLOCKS blocks have passed.
            let blocks = (self.cfg.cut_through as f64 * f64::from(EARLY_OFFER_BLOCKS)).min(bytes);
            let at = self.one_way + (blocks / rate * SEC as f64) as Nanos;
            self.q.after(at, Ev::FirstBlock(r));
        }
    }

    pub(super) fn schedule_finishes(&mut self) {
        for f in self.finishes.drain(..) {
            if f.at != Nanos::MAX {
                self.q.schedule(f.at, Ev::FlowDone { flow: f.flow, version: f.version });
            }
        }
    }

    /// Frees an upload slot on `server` and serves the next request in line.
    pub(super) fn release_slot(&mut self, server: u32, r: u32) {
        let s = &mut self.hosts[server as usize];
        s.uploading = s.uploading.saturating_sub(1);
        if let Some(i) = s.serving.iter().position(|&x| x == r) {
            s.serving.swap_remove(i);
        }
        while self.hosts[server as usize].uploading < self.hosts[server as usize].slots {
            let Some(next) = self.hosts[server as usize].line.pop_front() else { break };
            if self.reqs[next as usize].state != ReqState::Queued {
                continue;
            }
            let piece = self.reqs[next as usize].piece;
            if self.hosts[server as usize].bits.get(piece) || self.receiving(server, piece) {
                self.start_flow(next);
            } else {
                self.reset(next);
            }
        }
    }

    pub(super) fn account(&mut self, server: u32, sent: f64) {
        if self.hosts[server as usize].origin {
            self.origin_egress += sent;
        }
    }

    pub(super) fn flow_done(&mut self, flow: FlowId, version: u32) {
        let now = self.now();
        let Some(e) = self.net.finish(now, flow, version, &mut self.finishes) else { return };
        self.schedule_finishes();
        self.account(e.src, e.sent);
        let piece = self.reqs[e.tag as usize].piece;
        if self.hosts[e.src as usize].bits.get(piece) {
            self.reqs[e.tag as usize].state = ReqState::InTransit;
            let delay = self.message_delay();
            self.q.after(delay, Ev::Deliver(e.tag));
        } else if !self.receiving(e.src, piece) {
            // Its relay ended under it: the stream is reset.
            self.wasted += e.sent;
            self.reset(e.tag);
        } else {
            // Cut-through: everything the server had is sent; its last block follows its own.
            self.reqs[e.tag as usize].state = ReqState::Waiting;
            self.hosts[e.src as usize].waiters.push(e.tag);
        }
        self.release_slot(e.src, e.tag);
    }

    pub(super) fn deliver(&mut self, r: u32) {
        let now = self.now();
        let (client, server, piece, state) = {
            let q = &self.reqs[r as usize];
            (q.client, q.server, q.piece, q.state)
        };
        if state != ReqState::InTransit {
            return;
        }
        self.reqs[r as usize].state = ReqState::Done;
        let bytes = self.piece_bytes(piece);
        let c = &mut self.hosts[client as usize];
        if c.gone() || !c.downloading() {
            self.wasted += bytes;
            return;
        }
        if let Some(i) = c.outstanding.iter().position(|&x| x == r) {
            c.outstanding.swap_remove(i);
        }
        if let Some(s) = c.sched.as_mut() {
            s.on_piece(server, piece, now);
        }
        if c.bits.get(piece) {
            // An endgame copy that arrived before its cancel.
            self.wasted += bytes;
            self.dispatch(client);
            return;
        }
        c.bits.set(piece);
        c.have += 1;
        if !c.waiters.is_empty() {
            self.release_waiters(client, piece);
        }
        let complete = self.hosts[client as usize].have == self.pieces;
        self.offer(client, piece, complete);
        if complete {
            self.finish(client);
        } else {
            self.dispatch(client);
        }
    }

    /// Ends request `r` at its client as `state`, out of the client's outstanding requests;
    /// its client, server, piece and the state it was in.
    fn settle(&mut self, r: u32, state: ReqState) -> (u32, u32, u32, ReqState) {
        let q = &mut self.reqs[r as usize];
        let (client, server, piece, was) = (q.client, q.server, q.piece, q.state);
        q.state = state;
        let c = &mut self.hosts[client as usize];
        if let Some(i) = c.outstanding.iter().position(|&x| x == r) {
            c.outstanding.swap_remove(i);
        }
        (client, server, piece, was)
    }

    /// The server refused (Busy, or NotFound from a failed download): the request fails.
    pub(super) fn refused(&mut self, r: u32) {
        let now = self.now();
        // What the real server answers; the agent's rule maps it to a failure.
        let miss = match self.reqs[r as usize].state {
            ReqState::Declined | ReqState::Lost => Miss::Refused(Refusal::NotFound),
            ReqState::Busy => Miss::Refused(Refusal::Busy),
            _ => return,
        };
        let (client, server, piece, _) = self.settle(r, ReqState::Done);
        if self.reqs[r as usize].relaying {
            // A relayed stream reset under a relay: the relay's own readers are reset too.
            self.end_relay(client, piece);
        }
        let Some(s) = self.hosts[client as usize].sched.as_mut() else { return };
        let failure = miss.failure(s.is_origin(server));
        s.on_failure(server, piece, now, failure);
        self.dispatch(client);
    }

    /// Gives up on a request wherever it is; bytes already sent for it are wasted.
    pub(super) fn cancel(&mut self, r: u32) {
        let now = self.now();
        let (client, server, piece, state) = self.settle(r, ReqState::Cancelled);
        match state {
            ReqState::Flowing(flow) => {
                if let Some(e) = self.net.abort(now, flow, &mut self.finishes) {
                    self.schedule_finishes();
                    self.account(e.src, e.sent);
                    self.wasted += e.sent;
                }
                self.release_slot(server, r);
            }
            ReqState::InTransit | ReqState::Waiting => self.wasted += self.piece_bytes(piece),
            _ => {}
        }
        if self.reqs[r as usize].relaying {
            self.end_relay(client, piece);
        }
    }

    pub(super) fn leave(&mut self, host: u32) {
        let now = self.now();
        let h = &mut self.hosts[host as usize];
        if h.gone() {
            return;
        }
        h.left_at = Some(now);
        if h.downloading() {
            h.sched = None;
            self.active -= 1;
            self.departed += 1;
        }
        let serving = std::mem::take(&mut h.serving);
        let line = std::mem::take(&mut h.line);
        let outstanding = std::mem::take(&mut h.outstanding);
        h.uploading = 0;
        let subscribers = std::mem::take(&mut h.subscribers);
        h.haves.clear();
        h.connecting.clear();
        h.following.clear();
        // Its Have streams end.
        for sub in subscribers {
            self.hosts[sub as usize].following.retain(|&x| x != host);
        }
        // Its uploads stop dead; their requesters find out by timing out.
        for r in serving.into_iter().chain(line) {
            if let ReqState::Flowing(flow) = self.reqs[r as usize].state {
                if let Some(e) = self.net.abort(now, flow, &mut self.finishes) {
                    self.account(e.src, e.sent);
                    self.wasted += e.sent;
                }
            }
            if self.reqs[r as usize].state != ReqState::Cancelled {
                self.reqs[r as usize].state = ReqState::Lost;
            }
        }
        self.schedule_finishes();
        for r in outstanding {
            self.cancel(r);
        }
    }
}
