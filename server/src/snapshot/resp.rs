//! The Redis protocol (RESP2) as the flusher speaks it: `SET key value EX ttl` packed
//! straight into one reused buffer per batch, and the replies read back one by one.
//!
//! Building a `redis::Pipeline` copied every value into the command's own storage and
//! then again into the packed request, and allocated per command; a flush of 1M
//! devices spent most of its time in `memmove` and the allocator. Here the device is
//! encoded directly where it goes on the wire: the only copy left is the kernel's.

/// Appends `SET <prefix><id> <value> EX <ttl>` commands to a batch buffer.
#[derive(Debug, Clone)]
pub struct SetCommands {
    /// `$2\r\nEX\r\n$<n>\r\n<ttl>\r\n`: the same for every command of a flush.
    tail: Vec<u8>,
    /// Digits of the previous value's length: the space left in front of a value
    /// before it is encoded. Values of one flush nearly always have as many digits
    /// (about 1,000 bytes for two metrics), so the length is then written in place
    /// without moving the value.
    length_digits: usize,
}

impl SetCommands {
    /// Commands with a TTL of `ttl_secs` seconds.
    pub fn new(ttl_secs: u64) -> Self {
        let mut tail = Vec::with_capacity(24);
        put_bulk(&mut tail, b"EX");
        let mut digits = [0; 20];
        put_bulk(&mut tail, decimal(ttl_secs, &mut digits));
        Self {
            tail,
            length_digits: 4,
        }
    }

    /// Appends one `SET` whose key is `prefix` then `id`, and whose value is what
    /// `encode` appends to the buffer it is given.
    pub fn push(
        &mut self,
        out: &mut Vec<u8>,
        prefix: &[u8],
        id: &[u8],
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        out.extend_from_slice(b"*5\r\n$3\r\nSET\r\n");
        let mut digits = [0; 20];
        out.push(b'$');
        out.extend_from_slice(decimal((prefix.len() + id.len()) as u64, &mut digits));
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(prefix);
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
        // `$<length>\r\n<value>\r\n`, the length written once the value is there.
        out.push(b'$');
        let length_at = out.len();
        out.resize(length_at + self.length_digits + 2, 0);
        let value_at = out.len();
        encode(out);
        let length = decimal((out.len() - value_at) as u64, &mut digits);
        if length.len() == self.length_digits {
            out[length_at..length_at + length.len()].copy_from_slice(length);
        } else {
            // Rare: this value's length has another number of digits. Moving the
            // value is correct, just slower; the next value starts from this one.
            out.splice(
                length_at..length_at + self.length_digits,
                length.iter().copied(),
            );
            self.length_digits = length.len();
        }
        let crlf_at = length_at + self.length_digits;
        out[crlf_at..crlf_at + 2].copy_from_slice(b"\r\n");
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.tail);
    }
}

/// Appends a bulk string.
fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut digits = [0; 20];
    out.push(b'$');
    out.extend_from_slice(decimal(bytes.len() as u64, &mut digits));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, without leading zeros (as RESP lengths must be).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// One reply to a command the flusher sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`: the key was written.
    Ok,
    /// `-...`: Redis refused the command (out of memory, read-only replica, ...); the
    /// connection is still usable.
    Error(String),
    /// `:n`: what a fenced write returns (the new version, or -1 when it lost).
    Integer(i64),
    /// `$n`: what `SCRIPT LOAD` returns (the script's SHA-1).
    Bulk(Vec<u8>),
}

/// Redis answered something a `SET ... EX` (or `AUTH`/`SELECT`) cannot answer, or a
/// connection is out of step: it must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// These bytes arrived where no reply (or another one) was expected.
    #[error("unexpected reply {0:?}")]
    Unexpected(String),
    /// The connection was offered for a request before the last one was answered.
    #[error("the previous request on this connection was not fully answered")]
    Unfinished,
}

impl ProtocolError {
    /// `bytes` arrived where no reply (or another one) was expected.
    pub fn unexpected(bytes: &[u8]) -> Self {
        Self::Unexpected(String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned())
    }
}

/// Replies longer than this without a line end are not replies to `SET`.
const MAX_LINE: usize = 64 * 1024;

/// Parses the reply at the start of `buf`: the reply and the bytes it took, or `None`
/// when `buf` does not hold a whole reply yet.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    if buf.starts_with(b"+OK\r\n") {
        return Ok(Some((Reply::Ok, 5)));
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE
            || buf
                .first()
                .is_some_and(|&b| !matches!(b, b'+' | b'-' | b':' | b'$'))
        {
            return Err(ProtocolError::unexpected(buf));
        }
        return Ok(None);
    };
    let line = &buf[..end];
    match line.first() {
        Some(b'-') => Ok(Some((
            Reply::Error(String::from_utf8_lossy(&line[1..]).into_owned()),
            end + 2,
        ))),
        Some(b':') => std::str::from_utf8(&line[1..])
            .ok()
            .and_then(|n| n.parse().ok())
            .map(|n| Some((Reply::Integer(n), end + 2)))
            .ok_or_else(|| ProtocolError::unexpected(line)),
        Some(b'$') => {
            let len: usize = std::str::from_utf8(&line[1..])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ProtocolError::unexpected(line))?;
            let start = end + 2;
            if buf.len() < start + len + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(buf[start..start + len].to_vec()),
                start + len + 2,
            )))
        }
        _ => Err(ProtocolError::unexpected(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bb8_redis::redis;
    use proptest::prelude::*;

    /// What redis-rs sends for the same commands.
    fn redis_rs(commands: &[(Vec<u8>, Vec<u8>)], ttl: u64) -> Vec<u8> {
        let mut pipeline = redis::pipe();
        for (key, value) in commands {
            pipeline
                .cmd("SET")
                .arg(&key[..])
                .arg(&value[..])
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        pipeline.get_packed_pipeline()
    }

    fn packed(commands: &[(Vec<u8>, Vec<u8>)], ttl: u64, split: usize) -> Vec<u8> {
        let mut set = SetCommands::new(ttl);
        let mut out = b"left alone".to_vec();
        for (key, value) in commands {
            let (prefix, id) = key.split_at(split.min(key.len()));
            set.push(&mut out, prefix, id, |out| out.extend_from_slice(value));
        }
        out.split_off(10)
    }

    #[test]
    fn a_set_is_packed_as_redis_rs_packs_it() {
        let commands = vec![(b"tidewatch:v1:device:sensor-1".to_vec(), vec![7u8; 1005])];
        assert_eq!(packed(&commands, 3600, 20), redis_rs(&commands, 3600));
        let text = String::from_utf8_lossy(&packed(&commands, 3600, 20)).into_owned();
        assert!(
            text.starts_with("*5\r\n$3\r\nSET\r\n$28\r\ntidewatch:v1:device:sensor-1\r\n$1005\r\n")
        );
        assert!(text.ends_with("\r\n$2\r\nEX\r\n$4\r\n3600\r\n"));
    }

    #[test]
    fn value_lengths_of_any_width_are_written_exactly() {
        // Lengths with fewer and more digits than the first guess, back and forth.
        let commands: Vec<_> = [0usize, 9, 10, 99, 100, 999, 1000, 12_345, 5, 100_000, 1]
            .into_iter()
            .enumerate()
            .map(|(i, len)| (format!("k{i}").into_bytes(), vec![b'v'; len]))
            .collect();
        assert_eq!(packed(&commands, 1, 0), redis_rs(&commands, 1));
    }

    #[test]
    fn decimals_have_no_leading_zeros() {
        let mut buf = [0; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(10, &mut buf), b"10");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }

    #[test]
    fn replies_are_read_one_at_a_time() {
        let buf = b"+OK\r\n-OOM command not allowed\r\n+OK\r\n+O";
        let (reply, used) = parse_reply(buf).unwrap().unwrap();
        assert_eq!((reply, used), (Reply::Ok, 5));
        let (reply, used) = parse_reply(&buf[5..]).unwrap().unwrap();
        assert_eq!(reply, Reply::Error("OOM command not allowed".into()));
        assert_eq!(used, 26);
        assert_eq!(parse_reply(&buf[31..]).unwrap().unwrap().0, Reply::Ok);
        assert_eq!(parse_reply(&buf[36..]).unwrap(), None);
        assert_eq!(parse_reply(b"").unwrap(), None);
        assert_eq!(parse_reply(b"-ERR partial").unwrap(), None);
        assert_eq!(
            parse_reply(b":-1\r\n").unwrap(),
            Some((Reply::Integer(-1), 5))
        );
        assert_eq!(
            parse_reply(b"$3\r\nabc\r\n").unwrap(),
            Some((Reply::Bulk(b"abc".to_vec()), 9))
        );
        assert_eq!(parse_reply(b"$3\r\nab").unwrap(), None);
    }

    #[test]
    fn other_replies_are_protocol_errors() {
        for reply in [&b"*0\r\n"[..], b"+QUEUED\r\n", b"$-1\r\n", b":x\r\n"] {
            assert!(parse_reply(reply).is_err(), "{reply:?}");
        }
        assert!(parse_reply(&vec![b'-'; MAX_LINE + 1]).is_err());
    }

    proptest! {
        #[test]
        fn any_batch_is_packed_as_redis_rs_packs_it(
            ttl in 1u64..=u64::from(u32::MAX),
            split in 0usize..40,
            commands in prop::collection::vec(
                (
                    prop::collection::vec(any::<u8>(), 1..40),
                    prop::collection::vec(any::<u8>(), 0..3000),
                ),
                0..20,
            ),
        ) {
            prop_assert_eq!(packed(&commands, ttl, split), redis_rs(&commands, ttl));
        }
    }
}
