//! How a download finds its peers in the model, as the agent's does: announces to the
//! tracker, probes (a Subscribe to an agent still downloading, a bitfield request
//! otherwise), the lead a subscription gives the server, and the bitfield that adds a peer.

use super::*;

impl World {
    /// Sends an announce if the download's timer says one is due (several wake-ups may be
    /// pending; the timer sends at most one at a time).
    pub(super) fn announce(&mut self, host: u32) {
        let now = self.now();
        let h = &mut self.hosts[host as usize];
        if h.gone() {
            return;
        }
        // Every download starts at 0: its age is the virtual time.
        let Some(s) = h.sched.as_mut() else { return };
        if !s.announce_due(now) {
            return;
        }
        if !h.announced {
            h.announced = true;
            self.tracker.members.push(host);
        }
        let delay = self.message_delay() + self.one_way;
        self.q.after(delay, Ev::AnnounceReply { host });
    }

    /// Like the agent: probes the listed peers the scheduler would take and that it is not
    /// probing or following, seeders and origins first, up to `max_peers` less the peers
    /// known (at least one, so that a seeder may displace an agent when the cap is reached).
    pub(super) fn announce_reply(&mut self, host: u32) {
        let now = self.now();
        if self.hosts[host as usize].gone() {
            return;
        }
        let Some(s) = self.hosts[host as usize].sched.as_mut() else { return };
        s.on_announce_answer(now);
        if let Some(at) = s.next_announce() {
            self.q.schedule(at, Ev::Announce { host });
        }
        let max = self.cfg.tracker_peers as usize;
        let listed = self.tracker.sample(host, &self.hosts, now, max, &mut self.rng);
        let h = &self.hosts[host as usize];
        let Some(s) = h.sched.as_ref() else { return };
        let listed = listed.into_iter().map(|p| {
            let peer = &self.hosts[p as usize];
            Listed { peer: p, complete: peer.origin || peer.done_at.is_some(), origin: peer.origin }
        });
        let chosen = s.to_probe(listed, now, |p| h.connecting.contains(&p) || h.following.contains(&p));
        for l in chosen {
            self.probe(host, l.peer, !l.complete && !l.origin);
        }
    }

    /// `client` asks `server` what it holds: a Subscribe to an agent still downloading (as
    /// the tracker listed it), a bitfield request otherwise.
    pub(super) fn probe(&mut self, client: u32, server: u32, subscribe: bool) {
        self.hosts[client as usize].connecting.push(server);
        let delay = self.message_delay();
        self.q.after(delay, Ev::BitfieldArrive { client, server, subscribe });
        self.q.after(PROBE_TIMEOUT, Ev::BitfieldTimeout { client, server });
    }

    pub(super) fn probe_arrive(&mut self, client: u32, server: u32, subscribe: bool) {
        let s = &mut self.hosts[server as usize];
        if s.gone() || s.failed {
            return;
        }
        let mut delay = self.one_way;
        if subscribe {
            if s.downloading() {
                if !s.subscribers.contains(&client) {
                    s.subscribers.push(client);
                }
                // The server's download learns of its follower and probes it back.
                self.lead(server, client);
            } else {
                // Refused (NotFound): the client asks for the bitfield instead.
                delay += self.cfg.rtt;
            }
        }
        self.q.after(delay, Ev::BitfieldReply { client, server });
    }

    /// `host`'s download hears of `peer` (it subscribed to `host`): the agent's lead.
    pub(super) fn lead(&mut self, host: u32, peer: u32) {
        let now = self.now();
        let h = &self.hosts[host as usize];
        let Some(s) = h.sched.as_ref() else { return };
        if s.takes_lead(peer, now, h.connecting.contains(&peer) || h.following.contains(&peer)) {
            self.probe(host, peer, true);
        }
    }

    pub(super) fn bitfield_reply(&mut self, client: u32, server: u32) {
        let now = self.now();
        let (origin, bits, streaming) = {
            let s = &self.hosts[server as usize];
            let mut bits = s.bits.clone();
            for i in s.early.iter() {
                bits.set(i);
            }
            (s.origin, bits, s.downloading() && s.subscribers.contains(&client))
        };
        let c = &mut self.hosts[client as usize];
        let Some(i) = c.connecting.iter().position(|&s| s == server) else { return };
        c.connecting.swap_remove(i);
        let Some(s) = c.sched.as_mut() else { return };
        let full = bits.is_complete();
        if s.add_peer(server, origin, bits, now) {
            if streaming && !full {
                c.following.push(server);
            }
        } else if streaming {
            // Not taken: the client drops the stream.
            self.hosts[server as usize].subscribers.retain(|&x| x != client);
        }
        self.dispatch(client);
    }
}
