//! Just enough of WebSocket and graphql-transport-ws for a subscriber that never is the bottleneck:
//! the opening handshake, masked client frames, and a scanner that finds the benchmark's marks in the
//! raw byte stream without decoding frames (server frames are unmasked, so every mark is readable as is).

use memchr::memmem::Finder;

/// What every benchmark message's text starts with, as it appears in a result frame.
pub const MARK: &str = "\"text\":\"bench ";

/// The text of a benchmark message of `phase`, sent at `nanos` since the epoch.
pub fn text(phase: u32, nanos: u64) -> String {
    format!("bench {phase}:{nanos}")
}

/// The HTTP request that opens a graphql-transport-ws WebSocket on `path` at `host`.
pub fn upgrade_request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
    )
}

/// Whether `response` (everything read so far) holds the end of the handshake's answer; `Err` when it
/// is not `101 Switching Protocols`. Returns the bytes after the headers.
pub fn handshake_done(response: &[u8]) -> Result<Option<usize>, String> {
    let Some(end) = Finder::new(b"\r\n\r\n").find(response) else {
        return Ok(None);
    };
    if !response.starts_with(b"HTTP/1.1 101") {
        return Err(String::from_utf8_lossy(&response[..end]).into_owned());
    }
    Ok(Some(end + 4))
}

/// A masked text frame, as a client must send it.
pub fn client_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The frames a subscriber sends after the handshake: `connection_init`, then (after the ack) `subscribe`.
pub fn init_frame() -> Vec<u8> {
    client_frame(r#"{"type":"connection_init","payload":{}}"#)
}

pub fn subscribe_frame(query: &str, chat: &str) -> Vec<u8> {
    let message =
        serde_json::json!({"type": "subscribe", "id": "1", "payload": {"query": query, "variables": {"chatId": chat}}});
    client_frame(&message.to_string())
}

/// What the scanner found in the bytes it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// (phase, sent nanos) of every benchmark message received.
    pub marks: Vec<(u32, u64)>,
    pub acked: bool,
    /// The server ended the subscription (`complete` or `error`).
    pub ended: bool,
}

/// Finds marks in a byte stream read in arbitrary pieces.
pub struct Scanner {
    carry: Vec<u8>,
    mark: Finder<'static>,
    ack: Finder<'static>,
    complete: Finder<'static>,
    error: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            carry: Vec::new(),
            mark: Finder::new(MARK.as_bytes()),
            ack: Finder::new(br#""type":"connection_ack""#),
            complete: Finder::new(br#""type":"complete""#),
            error: Finder::new(br#""type":"error""#),
        }
    }
}

/// Longest tail kept between reads: a mark and its two numbers.
const CARRY: usize = MARK.len() + 32;

impl Scanner {
    /// Scans `chunk`, the next bytes of the stream, into `found`.
    pub fn scan(&mut self, chunk: &[u8], found: &mut Found) {
        let joined;
        let data: &[u8] = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(chunk);
            joined = std::mem::take(&mut self.carry);
            &joined
        };
        let mut keep_from = data.len().saturating_sub(CARRY);
        let mut at = 0;
        while let Some(offset) = self.mark.find(&data[at..]) {
            let start = at + offset + MARK.len();
            match parse_mark(&data[start..]) {
                Some((mark, used)) => {
                    found.marks.push(mark);
                    at = start + used;
                    keep_from = keep_from.max(at);
                }
                None => {
                    // Cut off by the end of this read: keep it for the next.
                    keep_from = at + offset;
                    break;
                }
            }
        }
        found.acked |= self.ack.find(data).is_some();
        found.ended |= self.complete.find(data).is_some() || self.error.find(data).is_some();
        self.carry = data[keep_from.min(data.len())..].to_vec();
    }
}

/// `<phase>:<nanos>` followed by a non-digit; `None` when the bytes end first.
fn parse_mark(bytes: &[u8]) -> Option<((u32, u64), usize)> {
    let colon = bytes.iter().position(|b| !b.is_ascii_digit())?;
    if bytes[colon] != b':' {
        return Some(((u32::MAX, 0), colon));
    }
    let digits = &bytes[colon + 1..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    let phase = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
    let nanos = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    Some(((phase, nanos), colon + 1 + end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &str) -> String {
        format!(r#"{{"type":"next","id":"1","payload":{{"data":{{"messages":{{"id":"x","text":"{text}"}}}}}}}}"#)
    }

    #[test]
    fn marks_are_found_across_any_split_of_the_stream() {
        let stream = [frame(&text(3, 1_000)), frame("hello"), frame(&text(3, 2_000))].concat();
        for split in 0..stream.len() {
            let mut scanner = Scanner::default();
            let mut found = Found::default();
            scanner.scan(&stream.as_bytes()[..split], &mut found);
            scanner.scan(&stream.as_bytes()[split..], &mut found);
            assert_eq!(found.marks, vec![(3, 1_000), (3, 2_000)], "split at {split}");
        }
    }

    #[test]
    fn acknowledgement_and_the_end_of_a_subscription_are_seen() {
        let mut found = Found::default();
        Scanner::default().scan(br#"{"type":"connection_ack"}{"type":"complete","id":"1"}"#, &mut found);
        assert!(found.acked && found.ended);
    }

    #[test]
    fn client_frames_are_masked_text_frames_with_their_length() {
        let frame = client_frame("hi");
        assert_eq!(&frame[..2], &[0x81, 0x82]);
        let mask = &frame[2..6];
        let unmasked: Vec<u8> = frame[6..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(unmasked, b"hi");
        assert_eq!(client_frame(&"x".repeat(300))[1], 0x80 | 126);
    }

    #[test]
    fn a_handshake_answer_other_than_101_is_an_error() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nA: b\r\n\r\nrest";
        assert_eq!(handshake_done(answer), Ok(Some(answer.len() - 4)));
        assert_eq!(handshake_done(b"HTTP/1.1 101 Switching"), Ok(None));
        assert!(handshake_done(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
    }
}
