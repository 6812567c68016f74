//! The raw QUIC ceiling of this machine: bytes pushed over one connection between two
//! endpoints with Shoal's own TLS and transport configuration, with no pieces, disk or
//! hashing. The loopback benchmark reports it next to the cold pull, so a miss can be split
//! into "the transport's ceiling" and "Shoal's overhead on top of it".

use std::net::UdpSocket;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use shoal_shared::tls::{self, TlsIdentity, PEER_SERVER_NAME};

/// Streams sent in parallel, like a download's pipeline.
const STREAMS: u64 = 4;
const CHUNK: usize = 1 << 20;

/// Sends `bytes` over one mTLS QUIC connection on loopback; returns bytes per second.
pub async fn measure(bytes: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    tls::init_ca(&ca)?;
    let mut endpoints = Vec::new();
    for name in ["sender", "receiver"] {
        let out = dir.path().join(name);
        tls::issue(&ca, name, tls::Role::Agent, &out)?;
        let identity = TlsIdentity::load(&out)?;
        endpoints.push(tls::endpoint(UdpSocket::bind("127.0.0.1:0")?, &identity)?);
    }
    let receiver = endpoints.pop().context("receiver")?;
    let sender = endpoints.pop().context("sender")?;
    let addr = receiver.local_addr()?;

    let sink = tokio::spawn(async move {
        let conn = receiver.accept().await.context("accept")?.await?;
        let mut readers = Vec::new();
        for _ in 0..STREAMS {
            let mut recv = conn.accept_uni().await?;
            readers.push(tokio::spawn(async move {
                let mut total = 0u64;
                while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
                    total += chunk.bytes.len() as u64;
                }
                anyhow::Ok(total)
            }));
        }
        let mut total = 0;
        for r in readers {
            total += r.await??;
        }
        anyhow::Ok((total, conn))
    });

    let conn = sender.connect(addr, PEER_SERVER_NAME)?.await?;
    let data = Bytes::from(vec![0x5a; CHUNK]);
    let per_stream = bytes / STREAMS;
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..STREAMS {
        let mut send = conn.open_uni().await?;
        let data = data.clone();
        writers.push(tokio::spawn(async move {
            let mut left = per_stream;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                send.write_chunk(data.slice(..n)).await?;
                left -= n as u64;
            }
            send.finish()?;
            send.stopped().await?;
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let (received, _conn) = sink.await??;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(received == per_stream * STREAMS, "received {received} bytes");
    Ok(received as f64 / secs)
}
