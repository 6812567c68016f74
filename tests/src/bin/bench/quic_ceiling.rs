//! `shoal-bench quic-ceiling`: `pull`'s raw QUIC measurement alone, repeated, for comparing
//! transport settings quickly.

use crate::MB;

/// Runs the raw QUIC ceiling `runs` times and prints each rate and CPU cost.
pub(crate) async fn quic_ceiling(size: u64, runs: u32) -> anyhow::Result<()> {
    let gib = size as f64 / (1u64 << 30) as f64;
    for run in 1..=runs {
        let cpu_before = shoal_tests::procfs::cpu_time("self")?;
        let rate = shoal_tests::quic_ceiling::measure(size).await? / MB;
        let cpu = (shoal_tests::procfs::cpu_time("self")? - cpu_before).as_secs_f64();
        println!("run {run}/{runs}: {rate:.0} MB/s, {:.2} CPU-s/GiB (both ends)", cpu / gib);
    }
    Ok(())
}
