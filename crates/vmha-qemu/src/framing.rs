//! Raw-byte line framing for QMP and QGA streams.
//!
//! Lines are split on `\n` as bytes (never decoded as UTF-8 here), a trailing `\r` is removed,
//! and a line longer than the cap is reported once and then skipped up to its end without
//! buffering it. With `reset_on_ff` ([`Framer::new`]) a `0xFF` byte anywhere discards the partial line:
//! that is the QGA resynchronisation delimiter, so a stale half-line from a guest can never be
//! glued to the reply that follows the delimiter.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A line exceeded the cap; its bytes up to the next `\n` are skipped.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The cap that was exceeded.
        max: usize,
    },
    /// The peer closed the stream (a partial last line is dropped).
    #[error("stream closed by peer")]
    Closed,
    /// The peer sent more bytes than the read was allowed (see [`Framer::next_line_within`]).
    #[error("more than the {budget} bytes allowed for this read")]
    OverBudget {
        /// The budget the read started with.
        budget: u64,
    },
    /// Reading the stream failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Incremental line splitter over raw bytes; memory use is bounded by `max_line`.
#[derive(Debug)]
pub struct Framer {
    max_line: usize,
    reset_on_ff: bool,
    partial: Vec<u8>,
    skipping: bool,
}

/// One step of feeding bytes to a [`Framer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n` (and without a trailing `\r`).
    Line(Vec<u8>),
    /// A line exceeded the cap; it is being skipped.
    TooLong,
}

impl Framer {
    /// A framer that yields lines of at most `max_line` bytes. With `reset_on_ff`, each `0xFF`
    /// byte discards the partial line (and ends a skip of an overlong line).
    pub fn new(max_line: usize, reset_on_ff: bool) -> Self {
        Self {
            max_line,
            reset_on_ff,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Changes the cap for lines not yet complete (a line being skipped stays skipped).
    pub fn set_max_line(&mut self, max_line: usize) {
        self.max_line = max_line;
    }

    /// The cap on line length now in force.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Consumes bytes from the front of `buf` until one frame is complete. Returns the number of
    /// bytes consumed and the frame, if one completed. Never holds more than `max_line` bytes.
    pub fn feed(&mut self, buf: &[u8]) -> (usize, Option<Frame>) {
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            let stop = rest
                .iter()
                .position(|&b| b == b'\n' || (b == 0xFF && self.reset_on_ff));
            let data = &rest[..stop.unwrap_or(rest.len())];
            if !self.skipping {
                let room = self.max_line.saturating_sub(self.partial.len());
                if data.len() > room {
                    self.partial = Vec::new();
                    self.skipping = true;
                    return (i + room + 1, Some(Frame::TooLong));
                }
                self.partial.extend_from_slice(data);
            }
            let Some(at) = stop.map(|p| i + p) else {
                return (buf.len(), None);
            };
            i = at + 1;
            if buf[at] == 0xFF || self.skipping {
                // A delimiter ends a partial line; a newline ends a skip.
                self.partial = Vec::new();
                self.skipping = false;
                continue;
            }
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return (i, Some(Frame::Line(line)));
        }
        (buf.len(), None)
    }

    /// Reads the next frame from `reader`. Cancel-safe: bytes already consumed stay in the
    /// framer's state, so a timed-out call can be retried on the same framer.
    pub async fn next_line<R: AsyncBufRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Vec<u8>, FrameError> {
        let mut unlimited = u64::MAX;
        self.next_line_within(reader, &mut unlimited).await
    }

    /// [`Framer::next_line`] consuming at most `budget` bytes (decremented by what is read,
    /// skipped lines included): once it is spent without a complete line, the read ends with
    /// [`FrameError::OverBudget`], so an endless stream costs a bounded amount of work.
    pub async fn next_line_within<R: AsyncBufRead + Unpin>(
        &mut self,
        reader: &mut R,
        budget: &mut u64,
    ) -> Result<Vec<u8>, FrameError> {
        let start = *budget;
        loop {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(FrameError::Closed);
            }
            let allowed = usize::try_from(*budget)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            if allowed == 0 {
                return Err(FrameError::OverBudget { budget: start });
            }
            let (used, frame) = self.feed(&buf[..allowed]);
            reader.consume(used);
            *budget -= used as u64;
            match frame {
                Some(Frame::Line(line)) => return Ok(line),
                Some(Frame::TooLong) => {
                    return Err(FrameError::LineTooLong { max: self.max_line });
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn all(framer: &mut Framer, mut buf: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (used, f) = framer.feed(buf);
            buf = &buf[used..];
            out.extend(f);
        }
        out
    }

    #[test]
    fn splits_lines_and_strips_cr() {
        let mut f = Framer::new(100, false);
        let frames = all(&mut f, b"{\"a\":1}\r\nxy\n");
        assert_eq!(
            frames,
            vec![
                Frame::Line(b"{\"a\":1}".to_vec()),
                Frame::Line(b"xy".to_vec())
            ]
        );
    }

    #[test]
    fn overlong_line_is_reported_once_then_skipped() {
        let mut f = Framer::new(4, false);
        let frames = all(&mut f, b"0123456789\nok\n");
        assert_eq!(frames, vec![Frame::TooLong, Frame::Line(b"ok".to_vec())]);
    }

    #[test]
    fn ff_discards_partial_line() {
        let mut f = Framer::new(100, true);
        let frames = all(&mut f, b"stale half\xff{\"return\":1}\n");
        assert_eq!(frames, vec![Frame::Line(b"{\"return\":1}".to_vec())]);
    }

    #[test]
    fn ff_is_data_without_reset() {
        let mut f = Framer::new(100, false);
        let frames = all(&mut f, b"a\xffb\n");
        assert_eq!(frames, vec![Frame::Line(b"a\xffb".to_vec())]);
    }

    #[test]
    fn ff_ends_a_skip() {
        let mut f = Framer::new(2, true);
        let frames = all(&mut f, b"abcdef\xffok\n");
        assert_eq!(frames, vec![Frame::TooLong, Frame::Line(b"ok".to_vec())]);
    }

    #[test]
    fn a_delimiter_in_a_skipped_line_and_cr_handling() {
        let mut f = Framer::new(3, true);
        let frames = all(&mut f, b"abcdefgh\nab\r\nxyz\xffq\n");
        assert_eq!(
            frames,
            vec![
                Frame::TooLong,
                Frame::Line(b"ab".to_vec()),
                Frame::Line(b"q".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn an_endless_line_ends_at_the_budget() {
        let data = vec![b'0'; 1 << 20];
        let mut r = tokio::io::BufReader::new(&data[..]);
        let mut f = Framer::new(1000, true);
        let mut budget = 10_000;
        assert!(matches!(
            f.next_line_within(&mut r, &mut budget).await,
            Err(FrameError::LineTooLong { .. })
        ));
        assert!(matches!(
            f.next_line_within(&mut r, &mut budget).await,
            Err(FrameError::OverBudget { .. })
        ));
        assert_eq!(budget, 0);
    }

    #[tokio::test]
    async fn next_line_reports_close() {
        let data: &[u8] = b"one\ntwo";
        let mut r = tokio::io::BufReader::new(data);
        let mut f = Framer::new(10, false);
        assert_eq!(f.next_line(&mut r).await.unwrap(), b"one");
        assert!(matches!(f.next_line(&mut r).await, Err(FrameError::Closed)));
    }
}
