//! Splits a byte stream into lines of at most `max` bytes, for the Unix socket front end.
//!
//! A pure state machine (no I/O) so its edge cases are unit-tested: a line longer than the
//! limit is reported once and skipped up to its newline without being buffered, so a client
//! can neither make the service hold unbounded memory nor lose the requests after it.

/// One complete line, or the report that a line was too long (its bytes are dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Line(Vec<u8>),
    TooLong,
}

#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    buf: Vec<u8>,
    /// Inside a too-long line: drop bytes until the next newline.
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            discarding: false,
        }
    }

    /// Bytes of an unfinished line held right now.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feeds bytes; complete lines (without `\n` or a trailing `\r`, blank ones skipped)
    /// and too-long reports are appended to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Piece>) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    let segment = &data[..nl];
                    data = &data[nl + 1..];
                    if self.discarding {
                        self.discarding = false;
                        continue;
                    }
                    if self.buf.len() + segment.len() > self.max {
                        self.buf.clear();
                        out.push(Piece::TooLong);
                        continue;
                    }
                    self.buf.extend_from_slice(segment);
                    let mut line = std::mem::take(&mut self.buf);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        out.push(Piece::Line(line));
                    }
                }
                None => {
                    if !self.discarding {
                        if self.buf.len() + data.len() > self.max {
                            self.buf.clear();
                            self.discarding = true;
                            out.push(Piece::TooLong);
                        } else {
                            self.buf.extend_from_slice(data);
                        }
                    }
                    data = &[];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    fn line(s: &str) -> Piece {
        Piece::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_across_chunks() {
        assert_eq!(
            split(100, &[b"ab", b"c\nde", b"f\r\n\n  \ng"]),
            vec![line("abc"), line("def")]
        );
    }

    #[test]
    fn too_long_line_reported_once_then_skipped() {
        assert_eq!(
            split(4, &[b"12345", b"678", b"9\nok\n"]),
            vec![Piece::TooLong, line("ok")]
        );
        assert_eq!(
            split(4, &[b"123456\nab\n"]),
            vec![Piece::TooLong, line("ab")]
        );
        assert_eq!(split(4, &[b"1234\n"]), vec![line("1234")]);
    }

    #[test]
    fn memory_stays_bounded_while_discarding() {
        let mut s = LineSplitter::new(8);
        let mut out = Vec::new();
        for _ in 0..1000 {
            s.push(&[b'x'; 1000], &mut out);
            assert!(s.pending() <= 8);
        }
        assert_eq!(out, vec![Piece::TooLong]);
    }
}
