//! The swarm model's tests: completion, sharing, cut-through, churn and loss, stalls.

use super::*;

const MIB: u64 = 1 << 20;

fn config(hosts: u32, size: u64, piece: u64) -> Config {
    Config { seed: 7, ..Config::new(hosts, size, piece, 12.5e6) }
}

#[test]
fn one_host_alone_finishes_at_exactly_size_over_rate_plus_rtt() {
    // One piece: one request out, one flow, the last byte back.
    let cfg = config(1, 4 * MIB, 4 * MIB);
    let r = run(&cfg).expect("valid");
    // The announce round trip and the bitfield round trip come first.
    let setup = 2.0 * cfg.rtt as f64 / SEC as f64;
    assert_eq!(r.completed(), 1);
    let t = r.ratios[0] * r.limit - setup;
    assert!((t - cfg.limit()).abs() < 1e-6, "{t} vs {}", cfg.limit());
    assert_eq!(r.origin_egress, 1.0);
    assert_eq!(r.wasted, 0.0);
}

#[test]
fn fifty_hosts_all_finish_and_the_origin_sends_far_less_than_n_blobs() {
    let cfg = config(50, 16 * MIB, MIB);
    let r = run(&cfg).expect("valid");
    assert_eq!(r.completed(), 50, "{r}");
    assert_eq!((r.departed, r.unfinished), (0, 0));
    assert!(r.origin_egress >= 1.0, "the origin sent at least one copy: {r}");
    assert!(r.origin_egress < 50.0, "{r}");
    assert!(r.quantile(0.5).expect("ratios") >= 1.0, "nobody beats the physical limit: {r}");
    assert!(r.ratios.iter().all(|&x| x >= 1.0), "nobody beats the physical limit: {r}");
    // Without sharing the origin would send 50 copies and the last host would finish
    // near 50x the limit. This run gives an egress of 3.65 blobs and a p99 of 4.21x
    // (p50 3.98x); the bounds leave about 35% and 30% for tuning.
    assert!(r.origin_egress <= 5.0, "the hosts shared too little: {r}");
    let p99 = r.quantile(0.99).expect("ratios");
    assert!(p99 <= 5.5, "p99 {p99:.2}x: the hosts shared too little: {r}");
    // Deterministic: the same seed gives the same run.
    let again = run(&cfg).expect("valid");
    assert_eq!(
        (r.ratios.clone(), r.origin_egress, r.events),
        (again.ratios, again.origin_egress, again.events)
    );
}

#[test]
fn cut_through_takes_the_piece_time_out_of_every_hop() {
    // A piece that moves on only once whole costs each hop of the tree a piece time;
    // passed on block by block, a hop costs a block time.
    let whole = run(&Config { cut_through: 0, ..config(100, 32 * MIB, 4 * MIB) }).expect("valid");
    let cut = run(&config(100, 32 * MIB, 4 * MIB)).expect("valid");
    assert_eq!((cut.completed(), cut.failed), (100, 0), "{cut}");
    assert!(cut.ratios.iter().all(|&x| x >= 1.0), "nobody beats the physical limit: {cut}");
    let (w, c) = (whole.quantile(0.5).expect("ratios"), cut.quantile(0.5).expect("ratios"));
    assert!(c < 0.85 * w, "cut-through p50 {c:.3}x, whole pieces {w:.3}x");
}

#[test]
fn first_copies_first_lowers_the_origins_egress() {
    let on = run(&config(20, 32 * MIB, MIB)).expect("valid");
    let off = run(&Config { origin_wave: 0, ..config(20, 32 * MIB, MIB) }).expect("valid");
    assert_eq!((on.completed(), off.completed()), (20, 20));
    assert!(on.origin_egress < off.origin_egress, "on: {on}\noff: {off}");
}

#[test]
fn churn_and_loss_still_complete_every_host_that_stays() {
    let cfg = Config { churn: 0.2, loss: 0.01, ..config(40, 8 * MIB, MIB) };
    let r = run(&cfg).expect("valid");
    assert_eq!(r.departed + r.completed() as u32, 40, "{r}");
    assert!(r.departed > 0, "{r}");
    assert_eq!(r.unfinished, 0, "{r}");
}

#[test]
fn a_run_that_cannot_finish_in_time_says_so() {
    let cfg = Config { max_time: SEC, ..config(20, 64 * MIB, 4 * MIB) };
    let r = run(&cfg).expect("valid");
    assert_eq!(r.unfinished, 20);
    assert_eq!(r.quantile(0.5), None);
}

#[test]
fn a_download_without_progress_is_re_planned_then_fails() {
    // One 64 MiB piece takes 5.4 s; the progress timeout is 2 s: the re-plan at 1 s
    // cancels the transfer (its bytes are wasted), the download fails at 2 s.
    let mut cfg = config(1, 64 * MIB, 64 * MIB);
    cfg.policy.progress_timeout = 2 * SEC;
    let r = run(&cfg).expect("valid");
    assert_eq!((r.completed(), r.failed, r.unfinished), (0, 1, 0), "{r}");
    assert!(r.wasted > 0.1, "{r}");
    assert!(r.virtual_secs < 3.0, "{r}");
    // With the agent's 60 s it completes.
    let r = run(&config(1, 64 * MIB, 64 * MIB)).expect("valid");
    assert_eq!((r.completed(), r.failed), (1, 0), "{r}");
}

#[test]
fn slow_hosts_are_spread_evenly_and_measured_against_their_own_link() {
    let cfg = Config { slow_hosts: 0.1, ..config(20, 8 * MIB, MIB) };
    assert_eq!((0..20).filter(|&a| cfg.is_slow(a)).collect::<Vec<_>>(), vec![9, 19]);
    let r = run(&cfg).expect("valid");
    assert_eq!((r.ratios.len(), r.slow_ratios.len(), r.failed), (18, 2, 0), "{r}");
    // A slow host cannot beat its own link: 8 MiB at 1.25 MB/s is 6.7 s.
    assert!(r.slow_ratios.iter().all(|&x| x >= 1.0), "{r}");
    assert!(r.slow_ratios[0] * cfg.slow_limit() > 6.7, "{r}");
    assert!(r.to_string().contains("slow agents (2 at 10.0 Mbit/s)"), "{r}");
}

#[test]
fn requests_in_flight_follow_how_fast_pieces_come() {
    // The agent's rule, driven as its loop drives it: each piece whose first blocks came
    // fast enough to offer early (whole within a few seconds at their pace) allows one more
    // request in flight, each slow one one fewer. The fast agents end at their most (16 of
    // 1 MiB); the slow ones, on a tenth of the link, where a piece shares it with few
    // enough others to be fast (7 in this run).
    let cfg = Config { slow_hosts: 0.1, ..config(20, 32 * MIB, MIB) };
    let (start, most) = (cfg.policy.scheduler.start_in_flight, cfg.policy.scheduler.max_in_flight);
    let r = run(&cfg).expect("valid");
    assert_eq!((r.caps.len(), r.slow_caps.len()), (18, 2), "{r}");
    let fast = r.caps[r.caps.len() / 2];
    assert!(fast > start && fast <= most, "{r}");
    assert!(r.slow_caps.iter().all(|&c| c < fast), "{r}");
}

#[test]
fn a_relay_whose_transfer_ends_resets_the_requests_it_served() {
    // A fifth of the hosts leave mid-download. A relay whose own transfer is cut ends the
    // requests it served from it (the agent resets those streams), and so on down the
    // chain; otherwise hosts wait on relays that will never have the piece, relays end up
    // feeding each other, and every host that stays fails (all 80 did, modelled without it).
    let r = run(&Config { churn: 0.2, ..config(100, 128 * MIB, 4 * MIB) }).expect("valid");
    assert_eq!(r.departed + r.completed() as u32, 100, "{r}");
    assert_eq!((r.failed, r.unfinished), (0, 0), "{r}");
}

#[test]
fn a_piece_arriving_slowly_is_not_offered_before_it_is_whole() {
    // A tenth of the hosts on a tenth of the link. Offered while still arriving there, a
    // piece reaches every host that relays it at the slow host's pace (4 MiB pieces: the
    // fast hosts took 2.30x the limit, p50, against 1.41x without slow hosts). The agent's
    // rule offers such a piece only once whole (its first blocks came too slowly for it to
    // be whole within 4 s), and a host whose pieces come slowly keeps fewer requests in
    // flight, so it does not hold the servers' upload slots (default 1 MiB pieces: 1.19x
    // against 1.16x).
    let fast = run(&config(200, 64 * MIB, MIB)).expect("valid");
    let mixed = run(&Config { slow_hosts: 0.1, ..config(200, 64 * MIB, MIB) }).expect("valid");
    assert_eq!((mixed.completed(), mixed.failed), (200, 0), "{mixed}");
    let (f, m) = (fast.quantile(0.5).expect("ratios"), mixed.quantile(0.5).expect("ratios"));
    eprintln!("fast hosts' p50 with slow hosts {m:.3}x, without {f:.3}x");
    assert!(m <= 1.10 * f, "fast hosts' p50 with slow hosts {m:.3}x, without {f:.3}x");
}

#[test]
fn a_piece_whose_first_copies_do_not_spread_goes_out_again_from_the_origin() {
    // A 10 MiB blob in 1 MiB pieces, a tenth of the hosts slow. In this run every fast host
    // ends up waiting on one piece whose copies all come through relays fed from a slow
    // link; the origin declined it for the rest of its wave (every other piece being held,
    // nobody asked for them and the wave lasted its 30 s), so the fast hosts took 72x the
    // limit. The origin now sends a piece again once its last copy had time to be offered
    // (`PIECE_HOLD`): 5.5x.
    let cfg = Config { slow_hosts: 0.1, seed: 1, ..Config::new(100, 10 * MIB, MIB, 12.5e6) };
    let r = run(&cfg).expect("valid");
    assert_eq!((r.completed(), r.failed), (100, 0), "{r}");
    let p50 = r.quantile(0.5).expect("ratios");
    assert!(p50 < 10.0, "fast hosts' p50 {p50:.2}x: {r}");
}

#[test]
fn a_relay_carries_nothing_unless_its_chain_reaches_a_holder() {
    // Host 0 is the origin; agents 1, 2 and 3 relay piece 0 from each other.
    let mut w = World::new(config(3, 4 * MIB, 4 * MIB));
    let ask = |w: &mut World, client: u32, server: u32| {
        let id = w.reqs.len() as u32;
        w.reqs.push(Req { client, server, piece: 0, state: ReqState::Waiting, relaying: true });
        w.hosts[client as usize].outstanding.push(id);
        id
    };
    ask(&mut w, 1, 2);
    ask(&mut w, 2, 3);
    let loop_back = ask(&mut w, 3, 1);
    assert!(!w.receiving(1, 0), "a loop of relays has no bytes to pass on");
    assert!(!w.receiving(3, 0));
    w.reqs[loop_back as usize].state = ReqState::Cancelled;
    ask(&mut w, 3, 0);
    assert!((1..=3).all(|h| w.receiving(h, 0)), "the chain now reaches the origin");
}

#[test]
fn invalid_configs_are_refused() {
    assert!(run(&Config { hosts: 0, ..config(1, MIB, MIB) }).is_err());
    assert!(run(&Config { slow_hosts: 1.5, ..config(1, MIB, MIB) }).is_err());
}
