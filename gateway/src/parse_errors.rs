//! hyper answers a request head it cannot parse (400), one with too many
//! or too large headers (431) or a URI past 64 KiB (414) itself, with an
//! empty body, before the app sees it. mmgate promises a JSON error with a
//! stable code for every failure, so the connection's writer recognises
//! those canned answers (the only ones with `content-length: 0`: every
//! answer of the app carries a body) and writes the same failure from the
//! error table instead. hyper closes the connection after them, and that
//! close lingers like the app's refusals (the client may still be sending
//! the rest of its request).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use config::HttpLimits;

use crate::error::{ApiError, Code};

/// The longest request target hyper accepts.
const MAX_URI_BYTES: usize = 65_534;

/// hyper's read buffer for `limits`: room for the longest request target
/// and the allowed header bytes, plus line overhead (about 105 KiB with
/// the defaults, where hyper's own default is about 400 KiB). A head past
/// it is cut by hyper (431); one within it is parsed, and
/// `head_over_limit` holds it to `http.max_header_bytes`, so the limit
/// does not depend on how the head's bytes happened to arrive. hyper
/// strips the whitespace around header values before anything can count
/// it, so this buffer is what bounds a head padded with whitespace.
pub(crate) fn read_buffer_bytes(limits: &HttpLimits) -> usize {
    // hyper's smallest allowed buffer.
    const HYPER_MIN: usize = 8192;
    MAX_URI_BYTES
        .saturating_add(limits.max_header_bytes)
        .saturating_add(limits.max_headers.saturating_mul(4))
        .saturating_add(8192)
        .max(HYPER_MIN)
}

/// The error for a head over `http.max_headers` or `http.max_header_bytes`.
pub(crate) fn head_too_large(limits: &HttpLimits) -> ApiError {
    ApiError::new(
        Code::HeadersTooLarge,
        format!(
            "the request head is over the limit of {} headers or {} bytes of header lines \
             (http.max_headers, http.max_header_bytes)",
            limits.max_headers, limits.max_header_bytes
        ),
    )
}

/// The error for a parsed head whose header lines are over
/// `http.max_header_bytes` (each line counted as `name: value\r\n`).
pub(crate) fn head_over_limit(
    headers: &axum::http::HeaderMap,
    limits: &HttpLimits,
) -> Option<ApiError> {
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (bytes > limits.max_header_bytes).then(|| head_too_large(limits))
}

/// A connection whose writes of hyper's parse-error answers become JSON.
pub(crate) struct JsonParseErrors<T> {
    inner: T,
    limits: HttpLimits,
    /// Told when a refusal was written, so the close lingers.
    closing: std::sync::Arc<crate::http::Unwritten>,
    /// The JSON answer being written in place of hyper's.
    replacing: Option<Replacement>,
}

struct Replacement {
    bytes: Vec<u8>,
    written: usize,
    /// How much of hyper's buffer the replacement stands for (its head).
    consumed: usize,
}

impl<T> JsonParseErrors<T> {
    pub(crate) fn new(
        inner: T,
        limits: HttpLimits,
        closing: std::sync::Arc<crate::http::Unwritten>,
    ) -> Self {
        Self {
            inner,
            limits,
            closing,
            replacing: None,
        }
    }

    /// The JSON answer for `buf` if it starts with one of hyper's canned
    /// parse-error answers.
    fn replacement_for(&self, buf: &[u8]) -> Option<Replacement> {
        let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
        let err = match rest.get(..4)? {
            b"400 " => ApiError::new(
                Code::BadRequest,
                "the request head is not valid HTTP/1.1 (request line or a header line)",
            ),
            b"431 " => head_too_large(&self.limits),
            b"414 " => ApiError::new(
                Code::UriTooLong,
                format!("the request target is longer than {MAX_URI_BYTES} bytes"),
            ),
            _ => return None,
        };
        // hyper's canned answer is a head alone, the last thing it writes:
        // anything after the blank line means this is not one.
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        if end != buf.len() {
            return None;
        }
        let head = buf[..end].to_ascii_lowercase();
        let empty = head
            .windows(b"\r\ncontent-length: 0\r\n".len())
            .any(|w| w == b"\r\ncontent-length: 0\r\n");
        empty.then(|| Replacement {
            bytes: err.to_http1_closing(),
            written: 0,
            consumed: end,
        })
    }

    /// Writes the replacement (started for `first`, hyper's buffer) and
    /// reports hyper's head as written; `None` if `first` is not one.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
    ) -> Option<Poll<io::Result<usize>>>
    where
        T: AsyncWrite + Unpin,
    {
        if self.replacing.is_none() {
            self.replacing = Some(self.replacement_for(first)?);
            // The rest of the request may still be on its way.
            self.closing.linger_on_close();
        }
        let r = self.replacing.as_mut()?;
        while r.written < r.bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &r.bytes[r.written..]) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => r.written += n,
            }
        }
        let consumed = r.consumed;
        self.replacing = None;
        Some(Poll::Ready(Ok(consumed)))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(p) = self.poll_replace(cx, buf) {
            return p;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // A canned answer is one head-only buffer.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(first), None) = (filled.next(), filled.next())
            && let Some(p) = self.poll_replace(cx, first)
        {
            return p;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_empty_canned_answers_are_replaced() {
        let w = JsonParseErrors::new((), HttpLimits::default(), Default::default());
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let r = w.replacement_for(hyper).unwrap();
        assert_eq!(r.consumed, hyper.len());
        let text = String::from_utf8(r.bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(text.contains("\"headers_too_large\""), "{text}");
        // The app's own answers always carry a body.
        let app = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 80\r\n\r\n{";
        assert!(w.replacement_for(app).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(w.replacement_for(ok).is_none());
        // A canned head with more after it (another answer's bytes) is
        // left alone.
        let mut more = hyper.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK");
        assert!(w.replacement_for(&more).is_none());
    }
}
