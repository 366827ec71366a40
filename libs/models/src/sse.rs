//! Server-sent events (the `text/event-stream` format of the HTML standard) read with
//! every buffer bounded and every byte looked at once.
//!
//! A model server is not trusted to end its lines. `eventsource-stream`, used here
//! before, scans its whole buffer from the start again for each chunk that arrives,
//! and holds any amount: one unterminated 10 MB line cost a dispatcher 46 CPU-seconds
//! (quadratic in the line's length), and 16 MiB a debug build 54. Here a line, an
//! event and a whole stream each have a limit ([`MAX_LINE_BYTES`],
//! [`MAX_EVENT_BYTES`], [`MAX_STREAM_BYTES`]), and the search for a line's end starts
//! where the last chunk ended. Only the `data` field is kept: a chat completion uses
//! no other (`event`, `id` and `retry` are read and dropped).

use std::collections::VecDeque;

/// The longest line of an event stream, in bytes, its end not counted. A chunk of a
/// chat completion is one line of a few hundred bytes; a server that sends its whole
/// answer in one (at most [`crate::openai::MAX_ANSWER_BYTES`] of text, escaped as
/// JSON) stays well below this.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// The most data one event may carry, in bytes (its `data:` lines together).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The most bytes one stream may send. An answer of at most
/// [`crate::openai::MAX_ANSWER_BYTES`] streamed one token a chunk is a few MiB at most;
/// this bounds what a server sending chunks that add nothing costs to read.
pub const MAX_STREAM_BYTES: usize = 32 * 1024 * 1024;

/// Turns bytes, as they arrive, into the data of whole events.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The line so far, without its end.
    line: Vec<u8>,
    /// The current event's data: its `data:` values, each followed by a line feed.
    data: String,
    /// The last line ended with a carriage return: a line feed right after it is part
    /// of that end (CR LF), not an empty line.
    after_cr: bool,
    /// Whether the first line has ended (a byte-order mark may open it).
    started: bool,
    /// Bytes read in all.
    read: usize,
    /// Events complete and not yet taken.
    ready: VecDeque<String>,
}

impl Decoder {
    /// Takes the next bytes of the stream. An error names the limit passed; the
    /// stream is not to be read further.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        self.read = self.read.saturating_add(bytes.len());
        if self.read > MAX_STREAM_BYTES {
            return Err(format!(
                "the event stream is longer than {MAX_STREAM_BYTES} bytes"
            ));
        }
        while !bytes.is_empty() {
            if std::mem::take(&mut self.after_cr) && bytes[0] == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.extend_line(bytes)?;
                    break;
                }
                Some(end) => {
                    self.extend_line(&bytes[..end])?;
                    self.after_cr = bytes[end] == b'\r';
                    bytes = &bytes[end + 1..];
                    self.end_line()?;
                }
            }
        }
        Ok(())
    }

    /// The data of the next whole event, if one has arrived.
    pub fn next_event(&mut self) -> Option<String> {
        self.ready.pop_front()
    }

    fn extend_line(&mut self, part: &[u8]) -> Result<(), String> {
        if self.line.len() + part.len() > MAX_LINE_BYTES {
            return Err(format!(
                "a line of the event stream is longer than {MAX_LINE_BYTES} bytes"
            ));
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), String> {
        let mut line = &self.line[..];
        if !std::mem::replace(&mut self.started, true) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            // An empty line ends the event; one without data is none.
            if !self.data.is_empty() {
                let mut data = std::mem::take(&mut self.data);
                data.pop();
                self.ready.push_back(data);
            }
        } else if line[0] != b':' {
            // `field: value` (one space after the colon is not part of the value), or a
            // field alone; a line opening with a colon is a comment.
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            if field == b"data" {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    return Err(format!(
                        "an event of the event stream is longer than {MAX_EVENT_BYTES} bytes"
                    ));
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
        }
        self.line.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Result<Vec<String>, String> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk)?;
            while let Some(event) = decoder.next_event() {
                out.push(event);
            }
        }
        Ok(out)
    }

    #[test]
    fn events_are_read_as_the_standard_says() {
        // The standard's own examples, and every line end.
        assert_eq!(
            events(&[b"data: YHOO\ndata: +2\ndata: 10\n\n"]).unwrap(),
            ["YHOO\n+2\n10"]
        );
        assert_eq!(
            events(&[b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"]).unwrap(),
            ["first event", "second event", " third event"]
        );
        assert_eq!(
            events(&[b"data\n\ndata\ndata\n\ndata:\n"]).unwrap(),
            ["", "\n"]
        );
        assert_eq!(
            events(&[b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]).unwrap(),
            ["a", "b", "c"]
        );
        // A byte-order mark opens the stream only; an event not ended is not one.
        assert_eq!(
            events(&[b"\xEF\xBB\xBFdata: x\n\n\xEF\xBB\xBFdata: y\n\ndata: z"]).unwrap(),
            ["x"]
        );
    }

    #[test]
    fn however_the_bytes_are_cut_the_events_are_the_same() {
        let stream: &[u8] =
            b"\xEF\xBB\xBFdata: {\"a\": 1}\r\n\r\n: ping\r\ndata: two\rdata: lines\r\revent: x\ndata: \xC3\xA9t\xC3\xA9\n\ndata: [DONE]\n\n";
        let whole = events(&[stream]).unwrap();
        assert_eq!(
            whole,
            ["{\"a\": 1}", "two\nlines", "\u{e9}t\u{e9}", "[DONE]"]
        );
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(events(&[a, b]).unwrap(), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes).unwrap(), whole);
    }

    #[test]
    fn a_line_an_event_and_a_stream_each_have_a_limit() {
        // A line that never ends fails once it passes the limit, however it arrives.
        let mut decoder = Decoder::default();
        let piece = vec![b'x'; 64 * 1024];
        let mut fed = 0;
        let err = loop {
            match decoder.feed(&piece) {
                Ok(()) => fed += piece.len(),
                Err(e) => break e,
            }
        };
        assert_eq!(fed, MAX_LINE_BYTES);
        assert_eq!(
            err,
            format!("a line of the event stream is longer than {MAX_LINE_BYTES} bytes")
        );
        // A line just at the limit is one.
        let mut line = b"data:".to_vec();
        line.resize(MAX_LINE_BYTES, b'y');
        line.extend_from_slice(b"\n\n");
        let read = events(&[&line]).unwrap();
        assert_eq!(read[0].len(), MAX_LINE_BYTES - 5);

        // Lines each short, one event too long.
        let line = format!("data: {}\n", "z".repeat(1000));
        let err = events(&[line.repeat(MAX_EVENT_BYTES / 1000 + 1).as_bytes()]).unwrap_err();
        assert!(
            err.contains("an event of the event stream is longer than"),
            "{err}"
        );

        // Events each short, a stream too long.
        let mut decoder = Decoder::default();
        let chunk = b"data: {}\n\n".repeat(6554);
        let mut events_read = 0;
        let err = loop {
            if let Err(e) = decoder.feed(&chunk) {
                break e;
            }
            while decoder.next_event().is_some() {
                events_read += 1;
            }
        };
        assert_eq!(
            err,
            format!("the event stream is longer than {MAX_STREAM_BYTES} bytes")
        );
        assert!(events_read > 3_000_000, "{events_read}");
    }
}
