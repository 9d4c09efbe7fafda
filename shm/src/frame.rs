//! Length-prefixed frames: a little-endian `u32` length, then a postcard
//! payload. The length is checked against [`MAX_FRAME`] before allocating.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ShmError;

/// Largest frame either side accepts (inline inputs are far below this).
pub const MAX_FRAME: usize = config::MAX_FRAME_BYTES;

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ShmError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(ShmError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

fn check_len(len: u32) -> Result<usize, ShmError> {
    let len = len as usize;
    if len > MAX_FRAME {
        return Err(ShmError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Blocking write of one frame.
pub fn write_frame<T: Serialize>(w: &mut impl std::io::Write, msg: &T) -> Result<(), ShmError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl std::io::Read) -> Result<Option<T>, ShmError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut buf = vec![0u8; check_len(u32::from_le_bytes(len))?];
    r.read_exact(&mut buf)?;
    Ok(Some(postcard::from_bytes(&buf)?))
}

/// Async write of one frame.
pub async fn send<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), ShmError> {
    w.write_all(&encode(msg)?).await?;
    Ok(())
}

/// Async read of one frame; `Ok(None)` on a clean end of stream.
pub async fn recv<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<Option<T>, ShmError> {
    let len = match r.read_u32_le().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut buf = vec![0u8; check_len(len)?];
    r.read_exact(&mut buf).await?;
    Ok(Some(postcard::from_bytes(&buf)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FromWorker, Hello};

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused() {
        let msg = FromWorker::Hello(Hello {
            proto_version: 1,
            pid: 42,
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &FromWorker::Ready).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<FromWorker>(&mut r).unwrap(), Some(msg));
        assert_eq!(
            read_frame::<FromWorker>(&mut r).unwrap(),
            Some(FromWorker::Ready)
        );
        assert_eq!(read_frame::<FromWorker>(&mut r).unwrap(), None);
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let err = read_frame::<FromWorker>(&mut &huge[..]).unwrap_err();
        assert!(matches!(err, ShmError::FrameTooLarge { .. }));
    }

    #[tokio::test]
    async fn async_frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        send(&mut a, &FromWorker::Ready).await.unwrap();
        drop(a);
        assert_eq!(
            recv::<FromWorker>(&mut b).await.unwrap(),
            Some(FromWorker::Ready)
        );
        assert_eq!(recv::<FromWorker>(&mut b).await.unwrap(), None);
    }
}
