//! Unit tests of the scheduler, driven through its public API on a virtual clock.

use super::*;

fn bits(n: u32, set: &[u32]) -> Bitfield {
    let mut b = Bitfield::new(n);
    for &i in set {
        b.set(i);
    }
    b
}

fn cfg() -> Config {
    Config {
        window: 0,
        peer_pipeline: 2,
        seeder_pipeline: 2,
        shared_origin_pipeline: 8,
        max_pipeline: 4,
        max_in_flight: 64,
        start_in_flight: 64,
        min_in_flight: 2,
        max_peers: 8,
        timeout_floor: Duration::from_secs(2),
        min_rate: 1 << 20,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        endgame_copies: 2,
        busy_pause: Duration::from_millis(250),
        max_busy_pause: Duration::from_millis(250),
    }
}

const T0: Duration = Duration::ZERO;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn poll(s: &mut Scheduler<u8>, now: Duration) -> Vec<Action<u8>> {
    let mut out = Vec::new();
    s.poll(now, &mut out);
    out
}

fn requests(actions: &[Action<u8>]) -> Vec<(u8, u32)> {
    actions.iter().filter_map(Action::as_request).collect()
}

fn cancels(actions: &[Action<u8>]) -> Vec<(u8, u32)> {
    actions.iter().filter_map(Action::as_cancel).collect()
}

#[test]
fn rarest_first_and_pipeline_depth() {
    let mut s = Scheduler::new(&Bitfield::new(6), 1 << 20, 7, cfg());
    s.add_peer(1, false, bits(6, &[0, 1, 2, 3, 4]), T0).expect("add");
    s.add_peer(2, false, Bitfield::full(6), T0).expect("add");
    s.add_peer(3, false, bits(6, &[0, 1, 2, 3, 4]), T0).expect("add");
    let got = requests(&poll(&mut s, T0));
    // Piece 5 is held by one peer only: peer 2 asks for it first. Each peer gets 2.
    assert_eq!(got[0], (2, 5), "{got:?}");
    assert_eq!(got.len(), 6, "three peers, six pieces: {got:?}");
    for peer in 1..=3 {
        assert!(got.iter().filter(|(p, _)| *p == peer).count() <= 2, "depth 2: {got:?}");
    }
    let mut pieces: Vec<u32> = got.iter().map(|&(_, i)| i).collect();
    pieces.sort();
    assert_eq!(pieces, vec![0, 1, 2, 3, 4, 5], "no duplicates outside the endgame");
}

#[test]
fn random_tie_break_spreads_downloads_starting_together() {
    // Ten downloaders facing the same seeder pick different first pieces.
    let firsts: std::collections::HashSet<u32> = (0..10u64)
        .map(|k| {
            let mut s = Scheduler::new(
                &Bitfield::new(1000),
                1 << 20,
                2 * k + 1,
                Config { peer_pipeline: 1, seeder_pipeline: 1, ..cfg() },
            );
            s.add_peer(1, false, Bitfield::full(1000), T0).expect("add");
            requests(&poll(&mut s, T0))[0].1
        })
        .collect();
    assert!(firsts.len() >= 8, "{firsts:?}");
}

#[test]
fn front_window_goes_in_order() {
    let mut s =
        Scheduler::new(&Bitfield::new(20), 1 << 20, 3, Config { window: 3, seeder_pipeline: 3, ..cfg() });
    s.add_peer(1, false, Bitfield::full(20), T0).expect("add");
    assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 0), (1, 1), (1, 2)]);
    s.on_piece(1, 0, secs(1));
    s.on_piece(1, 1, secs(1));
    assert_eq!(requests(&poll(&mut s, secs(1))), vec![(1, 3), (1, 4)], "the window slid to [2, 5)");
}

#[test]
fn resumed_pieces_are_never_requested() {
    let mut s = Scheduler::new(&bits(3, &[0, 2]), 1 << 20, 1, cfg());
    assert_eq!(s.have_count(), 2);
    s.add_peer(1, false, Bitfield::full(3), T0).expect("add");
    assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 1)]);
    s.on_piece(1, 1, T0);
    assert!(s.is_complete());
    assert!(poll(&mut s, T0).is_empty());
}

#[test]
fn pieces_of_a_backing_off_seeder_come_from_the_origin() {
    let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { seeder_pipeline: 2, ..cfg() });
    s.add_peer(1, false, Bitfield::full(4), T0).expect("seeder");
    s.add_peer(9, true, Bitfield::new(4), T0).expect("origin");
    let first = requests(&poll(&mut s, T0));
    assert!(first.iter().all(|(p, _)| *p == 1), "the seeder first, the origin not at all: {first:?}");
    // The seeder stalls: its requests time out, it backs off, and the origin takes over.
    let later = requests(&poll(&mut s, secs(10)));
    assert!(!later.is_empty() && later.iter().all(|(p, _)| *p == 9), "{later:?}");
    // Once its back-off ends, the seeder counts again: the origin is not asked for more.
    for (p, i) in later {
        s.on_piece(p, i, secs(11));
    }
    let resumed = requests(&poll(&mut s, secs(60)));
    assert!(!resumed.is_empty() && resumed.iter().all(|(p, _)| *p == 1), "{resumed:?}");
}

#[test]
fn a_piece_that_timed_out_at_an_agent_may_come_from_the_origin_whoever_offers_it() {
    // Agents 2 and 3 offer piece 0 too (say, relays fed by one slow host) but are busy with
    // pieces only they hold; the request to agent 1 times out. The origin is asked for
    // piece 0, though two agents still offer it, and only while the time-out is recent.
    let one = Config { seeder_pipeline: 1, peer_pipeline: 1, endgame_copies: 1, ..cfg() };
    let mut s = Scheduler::new(&Bitfield::new(3), 1 << 20, 3, one);
    s.add_peer(1, false, bits(3, &[0]), T0).expect("agent");
    assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 0)]);
    let t1 = secs(1);
    s.add_peer(2, false, bits(3, &[0, 1]), t1).expect("agent");
    s.add_peer(3, false, bits(3, &[0, 2]), t1).expect("agent");
    let mut busy = requests(&poll(&mut s, t1));
    busy.sort();
    assert_eq!(busy, vec![(2, 1), (3, 2)]);
    let t = Duration::from_millis(2500);
    s.add_peer(9, true, Bitfield::full(3), t).expect("origin");
    let again = poll(&mut s, t);
    assert_eq!(cancels(&again), vec![(1, 0)], "timed out");
    assert_eq!(requests(&again), vec![(9, 0)], "the origin, though agents 2 and 3 offer it");
}

#[test]
fn deadlines_grow_with_the_downloads_pieces_in_flight() {
    // Eight requests to four peers share one downlink: at 1 MiB/s the k-th cannot be due
    // before k seconds, whatever its own peer's depth (2).
    let mut s = Scheduler::new(&Bitfield::new(8), 1 << 20, 3, cfg());
    for p in 1..=4 {
        s.add_peer(p, false, Bitfield::full(8), T0).expect("agent");
    }
    assert_eq!(requests(&poll(&mut s, T0)).len(), 8);
    assert_eq!(s.next_wakeup(T0), Some(secs(2)), "the first two at the floor");
    let late = poll(&mut s, Duration::from_millis(2500));
    assert_eq!(cancels(&late).len(), 2, "only the first two are overdue: {late:?}");
    let later = poll(&mut s, Duration::from_millis(8500));
    assert_eq!(cancels(&later).len(), 6, "the other six by 8 s: {later:?}");
}

#[test]
fn a_deferred_piece_is_not_asked_of_the_origin_again_for_a_while() {
    let mut s = Scheduler::new(&Bitfield::new(3), 1 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
    s.add_peer(9, true, Bitfield::new(3), T0).expect("origin");
    let (_, first) = requests(&poll(&mut s, T0))[0];
    s.on_failure(9, first, T0, Failure::Deferred);
    assert!(s.admits(9, T0), "no back-off");
    let next = requests(&poll(&mut s, T0));
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].1, first, "another piece meanwhile");
    assert_eq!(s.next_wakeup(T0), Some(DEFER), "wakes when the deferral ends");
    s.on_piece(9, next[0].1, T0);
    let third = requests(&poll(&mut s, T0));
    assert!(third.iter().all(|(_, i)| *i != first), "{third:?}");
    for (p, i) in third {
        s.on_piece(p, i, T0);
    }
    assert!(requests(&poll(&mut s, T0)).is_empty(), "only the deferred piece is left");
    assert_eq!(requests(&poll(&mut s, DEFER)), vec![(9, first)]);
}

#[test]
fn origin_is_asked_only_for_pieces_no_peer_holds() {
    let mut s = Scheduler::new(&Bitfield::new(6), 1 << 20, 5, Config { seeder_pipeline: 8, ..cfg() });
    s.add_peer(9, true, Bitfield::new(6), T0).expect("origin");
    s.add_peer(1, false, bits(6, &[0, 1]), T0).expect("add");
    let got = requests(&poll(&mut s, T0));
    let from_origin: Vec<u32> = got.iter().filter(|(p, _)| *p == 9).map(|&(_, i)| i).collect();
    let mut from_origin_sorted = from_origin.clone();
    from_origin_sorted.sort();
    assert_eq!(from_origin_sorted, vec![2, 3, 4, 5], "{got:?}");
    // The peer learns piece 3 before anyone asks: the origin is not used for it later.
    let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 5, cfg());
    s.add_peer(9, true, Bitfield::new(2), T0).expect("origin");
    s.add_peer(1, false, Bitfield::new(2), T0).expect("add");
    s.on_have(1, 1);
    let got = requests(&poll(&mut s, T0));
    assert!(got.contains(&(9, 0)) && got.contains(&(1, 1)) && got.len() == 2, "{got:?}");
}

#[test]
fn agents_sharing_an_origin_take_disjoint_runs_at_a_shallow_depth() {
    let shared = Config { window: 4, seeder_pipeline: 8, shared_origin_pipeline: 3, ..cfg() };
    let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 11, shared);
    s.add_peer(9, true, Bitfield::new(100), T0).expect("origin");
    // Alone with the origin: the front window in order, at full depth.
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 8);
    assert_eq!(&got[..4], &[(9, 0), (9, 1), (9, 2), (9, 3)]);
    // Another agent appears: no more than 3 in flight to the origin, in one run.
    let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 11, shared);
    s.add_peer(9, true, Bitfield::new(100), T0).expect("origin");
    s.add_peer(1, false, Bitfield::new(100), T0).expect("agent");
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 3, "{got:?}");
    let first = got[0].1;
    let run: Vec<(u8, u32)> = (0..3).map(|k| (9, (first + k) % 100)).collect();
    assert_eq!(got, run);
    // Pieces the other agent holds are skipped.
    s.on_have(1, (first + 3) % 100);
    s.on_piece(9, first, T0);
    let origin: Vec<(u8, u32)> = requests(&poll(&mut s, T0)).into_iter().filter(|r| r.0 == 9).collect();
    assert_eq!(origin, vec![(9, (first + 4) % 100)]);
}

#[test]
fn endgame_duplicates_then_cancels_the_loser() {
    let mut s = Scheduler::new(
        &Bitfield::new(2),
        1 << 20,
        1,
        Config { peer_pipeline: 1, seeder_pipeline: 1, ..cfg() },
    );
    s.add_peer(1, false, Bitfield::full(2), T0).expect("add");
    let first = requests(&poll(&mut s, T0));
    assert_eq!(first.len(), 1);
    s.add_peer(2, false, Bitfield::full(2), T0).expect("add");
    let second = requests(&poll(&mut s, T0));
    assert_eq!(second.len(), 1);
    assert_ne!(first[0].1, second[0].1);
    s.add_peer(3, false, Bitfield::full(2), T0).expect("add");
    // Every missing piece is in flight: peer 3 duplicates one of them.
    let dup = requests(&poll(&mut s, T0));
    assert_eq!(dup.len(), 1, "{dup:?}");
    let index = dup[0].1;
    let original = if first[0].1 == index { 1 } else { 2 };
    s.on_piece(3, index, secs(1));
    assert_eq!(cancels(&poll(&mut s, secs(1))), vec![(original, index)]);
    // The loser's late answer is ignored.
    s.on_failure(original, index, secs(1), Failure::Unavailable);
    assert!(s.admits(original, secs(1)), "a cancelled request does not back the peer off");
    assert_eq!(s.have_count(), 1);
}

#[test]
fn endgame_never_exceeds_copies_nor_asks_a_peer_twice() {
    let mut s = Scheduler::new(&Bitfield::new(1), 1 << 20, 1, cfg());
    for peer in 1..=4 {
        s.add_peer(peer, false, Bitfield::full(1), T0).expect("add");
    }
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 2, "two copies at most: {got:?}");
    assert_ne!(got[0].0, got[1].0);
    assert!(requests(&poll(&mut s, T0)).is_empty());
}

#[test]
fn timeouts_re_dispatch_and_back_off_the_slow_peer() {
    let mut s = Scheduler::new(&Bitfield::new(1), 1 << 20, 1, Config { endgame_copies: 1, ..cfg() });
    s.add_peer(1, false, Bitfield::full(1), T0).expect("add");
    assert_eq!(requests(&poll(&mut s, T0)), vec![(1, 0)]);
    // Deadline: max(2 s floor, 1 MiB * depth 2 / 1 MiB/s) = 2 s.
    assert_eq!(s.next_wakeup(T0), Some(secs(2)));
    s.add_peer(2, false, Bitfield::full(1), T0).expect("add");
    assert!(requests(&poll(&mut s, secs(1))).is_empty(), "one copy only");
    let at_deadline = poll(&mut s, secs(2));
    assert_eq!(cancels(&at_deadline), vec![(1, 0)]);
    assert_eq!(requests(&at_deadline), vec![(2, 0)], "re-dispatched to another peer");
    assert!(!s.admits(1, secs(2)), "the slow peer backs off");
    assert!(s.admits(1, secs(3)));
    s.on_piece(2, 0, secs(3));
    assert!(s.is_complete());
    assert_eq!(s.last_progress(), secs(3));
}

#[test]
fn wakeups_are_never_in_the_past() {
    let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 1, cfg());
    s.add_peer(1, false, bits(2, &[0]), T0).expect("add");
    let r = requests(&poll(&mut s, T0));
    assert_eq!(r, vec![(1, 0)]);
    s.on_failure(1, 0, T0, Failure::Unavailable);
    assert_eq!(s.next_wakeup(T0), Some(secs(1)), "the back-off ends");
    // Past the back-off, with nothing in flight and nothing to ask: nothing to wake for.
    poll(&mut s, secs(1));
    s.on_failure(1, 0, secs(1), Failure::Unavailable);
    assert_eq!(s.next_wakeup(secs(5)), None);
}

#[test]
fn a_busy_peer_is_paused_briefly_and_its_pieces_stay_off_the_origin() {
    let ms = Duration::from_millis;
    let mut s = Scheduler::new(&Bitfield::new(8), 1 << 20, 3, Config { seeder_pipeline: 4, ..cfg() });
    s.add_peer(1, false, Bitfield::full(8), T0).expect("add");
    s.add_peer(9, true, Bitfield::new(8), T0).expect("origin");
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 4, "the agent's pipeline fills; the origin holds nothing rare: {got:?}");
    assert!(got.iter().all(|(p, _)| *p == 1));
    // Two are refused Busy: the peer accepted two, so its pipeline is two.
    s.on_failure(1, got[2].1, T0, Failure::Busy);
    s.on_failure(1, got[3].1, T0, Failure::Busy);
    assert!(requests(&poll(&mut s, ms(100))).is_empty(), "paused, and not sent to the origin");
    assert_eq!(s.next_wakeup(ms(100)), Some(ms(250)), "the pause ends");
    assert!(s.admits(1, ms(250)), "a pause is not a back-off");
    s.on_piece(1, got[0].1, ms(200));
    let again = requests(&poll(&mut s, ms(250)));
    // Depth two, plus one for a piece that came back fast: three in flight again.
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(again.iter().all(|(p, _)| *p == 1));
    // Busy again and again: never longer than the longest pause (here the first).
    let mut outstanding = vec![got[1], again[0], again[1]];
    for k in 0..6u64 {
        let t = ms(1000 * (k + 1));
        for (p, i) in outstanding.drain(..) {
            s.on_failure(p, i, t, Failure::Busy);
        }
        assert!(!s.admits(1, t + ms(249)) && s.admits(1, t + ms(250)), "round {k}");
        let r = requests(&poll(&mut s, t + ms(250)));
        assert_eq!(r.len(), 1, "back to one in flight: {r:?}");
        outstanding = r;
    }
}

#[test]
fn busy_pauses_double_until_the_peer_delivers() {
    let ms = Duration::from_millis;
    let config = Config { busy_pause: ms(10), max_busy_pause: ms(40), seeder_pipeline: 2, ..cfg() };
    let mut s = Scheduler::new(&Bitfield::new(8), 1 << 20, 3, config);
    s.add_peer(1, false, Bitfield::full(8), T0).expect("add");
    let mut out = requests(&poll(&mut s, T0));
    assert_eq!(out.len(), 2);
    // Both answers to one round of requests: one refusal, one 10 ms pause.
    s.on_failure(1, out[0].1, T0, Failure::Busy);
    s.on_failure(1, out[1].1, ms(1), Failure::Busy);
    assert_eq!(s.next_wakeup(ms(1)), Some(ms(11)), "answers to one round are one 10 ms pause");
    // Each further refusal doubles the pause, up to the longest.
    let mut t = ms(11);
    for pause in [20, 40, 40] {
        out = requests(&poll(&mut s, t));
        assert_eq!(out.len(), 1, "one in flight after a refusal: {out:?}");
        s.on_failure(1, out[0].1, t, Failure::Busy);
        assert!(!s.admits(1, t + ms(pause - 1)), "paused {pause} ms at {t:?}");
        assert_eq!(s.next_wakeup(t), Some(t + ms(pause)));
        t += ms(pause);
    }
    // A delivered piece starts the pauses over.
    out = requests(&poll(&mut s, t));
    s.on_piece(1, out[0].1, t + ms(1));
    out = requests(&poll(&mut s, t + ms(1)));
    s.on_failure(1, out[0].1, t + ms(2), Failure::Busy);
    assert_eq!(s.next_wakeup(t + ms(2)), Some(t + ms(12)), "back to the first pause");
}

#[test]
fn deadlines_scale_with_piece_size() {
    let mut s = Scheduler::new(&Bitfield::new(1), 16 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
    s.add_peer(1, false, bits(1, &[0]), T0).expect("add");
    poll(&mut s, T0);
    assert_eq!(s.next_wakeup(T0), Some(secs(16)), "16 MiB at 1 MiB/s");
}

#[test]
fn banned_peers_are_never_asked_again() {
    let mut s = Scheduler::new(&Bitfield::new(3), 1 << 20, 1, cfg());
    s.add_peer(1, false, Bitfield::full(3), T0).expect("add");
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 2);
    s.on_failure(1, got[0].1, T0, Failure::Bad);
    // Its other request is cancelled, and it cannot come back.
    assert_eq!(cancels(&poll(&mut s, T0)), vec![got[1]]);
    assert_eq!(s.add_peer(1, false, Bitfield::full(3), secs(100)), Err(AddPeerError::Banned));
    assert!(!s.admits(1, secs(1000)));
    s.replan();
    assert_eq!(s.add_peer(1, false, Bitfield::full(3), secs(100)), Err(AddPeerError::Banned));
    s.add_peer(2, false, Bitfield::full(3), secs(100)).expect("add");
    assert!(requests(&poll(&mut s, secs(100))).iter().all(|(p, _)| *p == 2));
}

#[test]
fn backoff_grows_and_expires() {
    let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { seeder_pipeline: 1, ..cfg() });
    s.add_peer(1, false, Bitfield::full(4), T0).expect("add");
    let r = requests(&poll(&mut s, T0))[0];
    s.on_failure(1, r.1, T0, Failure::Unavailable);
    assert!(requests(&poll(&mut s, Duration::from_millis(999))).is_empty(), "1 s back-off");
    let r = requests(&poll(&mut s, secs(1)))[0];
    s.on_failure(1, r.1, secs(1), Failure::Unavailable);
    assert!(requests(&poll(&mut s, Duration::from_millis(2999))).is_empty(), "2 s back-off");
    let r = requests(&poll(&mut s, secs(3)))[0];
    // A delivered piece clears the failures: the next back-off is 1 s again.
    s.on_piece(1, r.1, secs(3));
    let r = requests(&poll(&mut s, secs(3)))[0];
    s.on_failure(1, r.1, secs(3), Failure::Unavailable);
    assert_eq!(requests(&poll(&mut s, secs(4))).len(), 1);
    // A removed peer that is backing off is refused until its back-off ends.
    let r = requests(&poll(&mut s, secs(4)));
    assert!(r.is_empty());
    s.remove_peer(1);
    s.back_off(1, secs(4));
    assert_eq!(s.add_peer(1, false, Bitfield::full(4), secs(4)), Err(AddPeerError::BackingOff));
    assert!(s.add_peer(1, false, Bitfield::full(4), secs(60)).is_ok());
}

#[test]
fn fast_peers_get_deeper_pipelines_and_timeouts_shrink_them() {
    let mut s = Scheduler::new(&Bitfield::new(100), 1 << 20, 1, Config { max_pipeline: 6, ..cfg() });
    s.add_peer(1, false, Bitfield::full(100), T0).expect("add");
    let mut now = T0;
    for _ in 0..6 {
        for (peer, index) in requests(&poll(&mut s, now)) {
            s.on_piece(peer, index, now + Duration::from_millis(10));
        }
        now += Duration::from_millis(10);
    }
    assert_eq!(requests(&poll(&mut s, now)).len(), 6, "grew to the 6 maximum");
    let later = now + secs(60);
    let expired = cancels(&poll(&mut s, later));
    assert_eq!(expired.len(), 6);
    assert_eq!(requests(&poll(&mut s, later + secs(10))).len(), 3, "halved");
}

#[test]
fn peer_cap_prefers_seeders() {
    let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, Config { max_peers: 2, ..cfg() });
    s.add_peer(1, false, bits(4, &[0]), T0).expect("add");
    s.add_peer(2, false, bits(4, &[0, 1]), T0).expect("add");
    assert_eq!(s.add_peer(3, false, bits(4, &[2]), T0), Err(AddPeerError::Full));
    s.add_peer(4, false, Bitfield::full(4), T0).expect("a seeder displaces the weakest");
    assert_eq!(s.peer_count(), 2);
    assert!(s.is_seeder(4));
    let got = requests(&poll(&mut s, T0));
    assert!(got.iter().all(|(p, _)| *p != 1), "peer 1 was displaced: {got:?}");
    assert_eq!(got[0].0, 4, "seeders are asked first");
    assert_eq!(s.add_peer(5, false, bits(3, &[0]), T0), Err(AddPeerError::Misfit));
}

#[test]
fn replan_cancels_everything_and_forgives_backoffs() {
    let mut s = Scheduler::new(&Bitfield::new(4), 1 << 20, 1, cfg());
    s.add_peer(1, false, Bitfield::full(4), T0).expect("add");
    s.add_peer(2, false, Bitfield::full(4), T0).expect("add");
    let got = requests(&poll(&mut s, T0));
    assert_eq!(got.len(), 4);
    s.on_failure(2, got.iter().find(|(p, _)| *p == 2).expect("peer 2").1, T0, Failure::Unavailable);
    s.replan();
    let after = poll(&mut s, secs(1));
    assert_eq!(cancels(&after).len(), 3);
    assert_eq!(requests(&after).len(), 4, "both peers asked again, peer 2 forgiven");
}

#[test]
fn the_same_calls_give_the_same_actions() {
    // Two downloads fed identically: every cancel (timeouts, a displaced peer) comes out
    // in the same order, which a seeded simulation needs to be reproducible.
    let run = || {
        let mut s = Scheduler::new(&Bitfield::new(64), 1 << 20, 9, Config { max_peers: 6, ..cfg() });
        for peer in 1..=6 {
            s.add_peer(peer, false, bits(64, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), T0).expect("add");
        }
        let mut log = poll(&mut s, T0);
        log.extend(poll(&mut s, secs(60)));
        s.add_peer(7, false, Bitfield::full(64), secs(60)).expect("a seeder displaces one");
        log.extend(poll(&mut s, secs(61)));
        log
    };
    let first = run();
    assert!(cancels(&first).len() >= 10, "{first:?}");
    for _ in 0..8 {
        assert_eq!(run(), first);
    }
}

#[test]
fn out_of_range_reports_are_ignored() {
    let mut s = Scheduler::new(&Bitfield::new(2), 1 << 20, 1, cfg());
    s.on_have(1, 0);
    s.on_piece(1, 5, T0);
    s.on_failure(1, 0, T0, Failure::Bad);
    s.add_peer(1, false, Bitfield::new(2), T0).expect("unknown reports did not ban");
    s.on_have(1, 99);
    assert_eq!(s.have_count(), 0);
    assert!(requests(&poll(&mut s, T0)).is_empty());
}

#[test]
fn the_in_flight_cap_follows_how_fast_first_blocks_come() {
    let config = Config { start_in_flight: 3, min_in_flight: 2, max_in_flight: 5, max_pipeline: 8, ..cfg() };
    let mut s = Scheduler::new(&Bitfield::new(32), 1 << 20, 7, config);
    s.add_peer(1, false, Bitfield::full(32), T0).expect("add");
    s.add_peer(2, false, Bitfield::full(32), T0).expect("add");
    // Two seeders at depth 2 each could take 4; the download starts at 3.
    assert_eq!(requests(&poll(&mut s, T0)).len(), 3);
    assert_eq!(s.in_flight_cap(), 3);
    // A fast piece: one more may go out, up to the most.
    s.on_first_blocks(true);
    assert_eq!(requests(&poll(&mut s, T0)).len(), 1);
    for _ in 0..5 {
        s.on_first_blocks(true);
    }
    assert_eq!(s.in_flight_cap(), 5);
    // Slow pieces: nothing new goes out until requests come back under the cap, which
    // never goes below the least.
    for _ in 0..6 {
        s.on_first_blocks(false);
    }
    assert_eq!(s.in_flight_cap(), 2);
    let sent: Vec<(u8, u32)> = requests(&poll(&mut s, T0));
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(s.in_flight(), 4);
}

#[test]
fn a_cap_configured_out_of_order_stays_within_the_most() {
    let config = Config { start_in_flight: 9, min_in_flight: 7, max_in_flight: 3, ..cfg() };
    let mut s = Scheduler::<u8>::new(&Bitfield::new(8), 1 << 20, 7, config);
    assert_eq!(s.in_flight_cap(), 3);
    s.on_first_blocks(false);
    assert_eq!(s.in_flight_cap(), 3);
}
