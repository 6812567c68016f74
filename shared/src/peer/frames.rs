//! Reading and writing one length-prefixed frame on a QUIC stream (both sides).

use super::*;

#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error("{0}")]
    Io(String),
}

impl From<quinn::WriteError> for StreamError {
    fn from(e: quinn::WriteError) -> Self {
        StreamError::Io(e.to_string())
    }
}

pub(super) async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    let frame = wire::encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame; garbage or oversized frames are protocol errors, a closed stream is I/O.
pub(super) async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<T, StreamError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(|e| StreamError::Io(e.to_string()))?;
    let len = wire::frame_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| StreamError::Io(e.to_string()))?;
    Ok(wire::decode_body(&body)?)
}
