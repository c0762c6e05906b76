//! One history per device across replicas: the Redis side of fencing and ownership
//! (`docs/architecture.md`, "Snapshot protocol", "Replicas").
//!
//! Beside a device's snapshot key live, in the same hash slot, its version
//! (`{<snapshot key>}:version`, bumped by every write) and its owner
//! (`{<snapshot key>}:owner`, the replica that holds it in memory). Each replica has a
//! liveness key (`tidewatch:v1:replica:<id>`) that every flush renews for
//! [`lease`]. Every write and every take-over is one Lua script, so the check and the
//! change are atomic in Redis:
//!
//! - [`FLUSH`] writes a snapshot only if nobody else owns the device and the stored
//!   version is the one this replica started from (or there is none); it returns the
//!   new version, or -1 when the write lost (the replica then drops its copy).
//! - [`ACQUIRE`] makes the caller the owner unless another replica is, and returns
//!   the version and the snapshot in the same round trip as the old `MGET`.
//! - [`RELEASE`] gives ownership up; [`TAKE_OVER`] clears the owner a dead replica left.
//! - [`DELETE`] deletes a device its caller owns (or nobody does), leaving its version
//!   bumped behind as a tombstone so that no older copy can be written back.
//! - [`READ`] reads a snapshot without owning it (`Analyze`).
//!
//! Reads check the key's type and length in the script first: a value above
//! `SNAPSHOT_MAX_BYTES` or a key of another type is reported, never sent.
//!
//! Scripts are sent by `EVALSHA`; their SHA-1 is computed here ([`sha1_hex`]) so
//! that a batch can be packed before it has a connection, and every write connection
//! loads them when it opens (a restarted Redis has forgotten them).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use super::KEY_PREFIX;

/// `KEYS`: snapshot, version, owner. `ARGV`: value, ttl seconds, base version, this
/// replica, `1` to give ownership up with the write. Returns the new version, or -1.
///
/// A stored version below the base means Redis lost writes this replica made (it
/// restarted from an older state, or a Redis Cluster failover promoted a replica that
/// had not received them): like a version that is gone, it does not stop the write.
pub const FLUSH: &str = r"local v = redis.call('GET', KEYS[2])
local o = redis.call('GET', KEYS[3])
if o and o ~= ARGV[4] then return -1 end
if v and tonumber(v) > tonumber(ARGV[3]) then return -1 end
local n = tonumber(ARGV[3]) + 1
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], n, 'EX', ARGV[2])
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[2])
end
return n";

/// `KEYS`: snapshot, version, owner. `ARGV`: this replica, ttl seconds, the largest
/// value read (`SNAPSHOT_MAX_BYTES`). Returns `{1, version, value or nil, problem or
/// nil, fixed}` when the caller owns the device now, `{0, owner}` when another replica
/// does. `problem` says why the value is not returned: `type:<type>` (the key holds a
/// hash, a list, ...), or `size:<bytes>` (above the cap, so a huge value never crosses
/// the network). `fixed` counts version and owner keys of another type than a string
/// that were deleted first (they would fail every script of the device).
pub const ACQUIRE: &str = r"local fixed = 0
for i = 2, 3 do
  local k = redis.call('TYPE', KEYS[i])['ok']
  if k ~= 'none' and k ~= 'string' then
    redis.call('DEL', KEYS[i])
    fixed = fixed + 1
  end
end
local o = redis.call('GET', KEYS[3])
if o and o ~= ARGV[1] then return {0, o} end
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
local v = redis.call('GET', KEYS[2]) or '0'
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return {1, v, false, false, fixed} end
if t ~= 'string' then return {1, v, false, 'type:' .. t, fixed} end
local n = redis.call('STRLEN', KEYS[1])
if n > tonumber(ARGV[3]) then return {1, v, false, 'size:' .. n, fixed} end
return {1, v, redis.call('GET', KEYS[1]), false, fixed}";

/// `KEYS`: snapshot. `ARGV`: the largest value read. Returns `{}` when there is no
/// snapshot, `{value}`, or `{false, problem}` as [`ACQUIRE`] says (`Analyze` of a
/// device not in memory).
pub const READ: &str = r"local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return {} end
if t ~= 'string' then return {false, 'type:' .. t} end
local n = redis.call('STRLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return {false, 'size:' .. n} end
return {redis.call('GET', KEYS[1])}";

/// `KEYS`: snapshot, version, owner. `ARGV`: this replica, ttl seconds. Deletes a
/// device (`DeleteDevice`) unless another replica owns it: removes the snapshot and
/// the owner and bumps the version, which stays behind as a tombstone for
/// `SNAPSHOT_TTL`, so that a write of any copy older than the deletion loses (its base
/// version is below it). Returns `{1, whether a snapshot existed, the new version}`,
/// or `{0, owner}`.
pub const DELETE: &str = r"local o = redis.call('GET', KEYS[3])
if o and o ~= ARGV[1] then return {0, o} end
local existed = redis.call('EXISTS', KEYS[1])
local n = (tonumber(redis.call('GET', KEYS[2])) or 0) + 1
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], n, 'EX', ARGV[2])
return {1, existed, n}";

/// `KEYS`: owner. `ARGV`: this replica. Deletes the owner if it is this replica.
pub const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// `KEYS`: owner. `ARGV`: the dead owner seen before. Clears the owner if it is
/// still that one (compare-and-delete: a new owner is never cleared).
pub const TAKE_OVER: &str = RELEASE;

/// `KEYS`: this replica's liveness key. `ARGV`: lease in milliseconds. Renews it and
/// returns whether it existed (0 after Redis lost its data, or after the lease ran
/// out).
pub const RENEW: &str = r"local e = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return e";

/// Every script, for `SCRIPT LOAD` on a new connection.
pub const SCRIPTS: [&str; 6] = [FLUSH, ACQUIRE, RELEASE, RENEW, READ, DELETE];

/// Prefix of the replicas' liveness keys.
pub const REPLICA_PREFIX: &str = "tidewatch:v1:replica:";

/// Prefix of the hand-off channels, one per replica: a replica that finds another
/// live owner publishes the device id there, and the owner writes and releases it.
pub const HANDOFF_PREFIX: &str = "tidewatch:v1:handoff:";

/// The channel every replica listens on for deletions: `<version> <device id>`, the
/// tombstone version [`DELETE`] left. A replica drops a copy of that device that
/// started from an older version (one it held without owning it, say after Redis
/// lost the owner key); a copy taken since is newer and stays.
pub const DELETED_CHANNEL: &str = "tidewatch:v1:deleted";

/// How long a replica's ownership lasts without a flush renewing it: three flush
/// intervals, at least two seconds. A replica killed without a drain keeps its
/// devices this long; samples sent elsewhere meanwhile are answered `moved`.
pub fn lease(interval: Duration) -> Duration {
    (interval * 3).max(Duration::from_secs(2))
}

/// The key of a device's snapshot version: `{<snapshot key>}:version`, which hashes
/// to the snapshot key's slot (a snapshot key holds no brace: see
/// [`super::key`]).
pub fn version_key(device_id: &str) -> String {
    format!("{{{}}}:version", super::key(device_id))
}

/// The key of a device's owner: `{<snapshot key>}:owner`.
pub fn owner_key(device_id: &str) -> String {
    format!("{{{}}}:owner", super::key(device_id))
}

/// The liveness key of a replica.
pub fn replica_key(replica: &str) -> String {
    format!("{REPLICA_PREFIX}{replica}")
}

/// The hand-off channel of a replica.
pub fn handoff_channel(replica: &str) -> String {
    format!("{HANDOFF_PREFIX}{replica}")
}

/// A fresh replica id: the host name, the process id and the start time, so a
/// restarted process never inherits the devices its previous life owned.
pub fn new_replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "replica".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{host}-{}-{nanos:x}", std::process::id())
}

/// What a replica knows of one device's snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fence {
    /// The version this copy started from, or last wrote (0: none in Redis).
    pub version: u64,
    /// Writes of this device sent and not answered yet.
    pub in_flight: u32,
    /// Which taking of the device this is: a reply to a write of an earlier copy
    /// must not touch a copy taken since.
    pub token: u64,
}

/// The [`Fence`] of each device in memory. A device missing here has version 0.
#[derive(Debug, Default)]
pub struct Versions {
    map: Mutex<HashMap<Box<str>, Fence>>,
    tokens: std::sync::atomic::AtomicU64,
}

impl Versions {
    /// The fence of `device_id`.
    pub fn get(&self, device_id: &str) -> Fence {
        self.lock().get(device_id).copied().unwrap_or_default()
    }

    /// Runs `f` with the table locked (the flusher takes a chunk of writes at a time).
    pub fn with<T>(&self, f: impl FnOnce(&mut HashMap<Box<str>, Fence>) -> T) -> T {
        f(&mut self.lock())
    }

    /// Records that this replica took `device_id` at `version` (a restore, or a
    /// fresh start): a new token, nothing in flight.
    pub fn taken(&self, device_id: &str, version: u64) {
        let token = self
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.lock().insert(
            device_id.into(),
            Fence {
                version,
                in_flight: 0,
                token,
            },
        );
    }

    /// Takes a write of `device_id` out: its base version and token.
    pub fn begin_write(map: &mut HashMap<Box<str>, Fence>, device_id: &str) -> Fence {
        let fence = match map.get_mut(device_id) {
            Some(fence) => fence,
            None => map.entry(device_id.into()).or_default(),
        };
        let before = *fence;
        fence.in_flight += 1;
        before
    }

    /// The answer to a write begun by [`Versions::begin_write`] with `token`:
    /// `Some(version)` when written, `None` when it failed or lost. Returns whether
    /// the copy it was about is still the one in memory.
    pub fn end_write(&self, device_id: &str, token: u64, written: Option<u64>) -> bool {
        let mut map = self.lock();
        let Some(fence) = map.get_mut(device_id) else {
            return false;
        };
        if fence.token != token {
            return false;
        }
        fence.in_flight = fence.in_flight.saturating_sub(1);
        if let Some(version) = written {
            fence.version = fence.version.max(version);
        }
        true
    }

    /// Forgets `device_id` (it left memory).
    pub fn remove(&self, device_id: &str) {
        self.lock().remove(device_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Fence>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends one RESP bulk string.
fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Packs `EVALSHA <FLUSH> 3 <keys> <value> <ttl> <base> <replica> <release>`.
#[derive(Debug, Clone)]
pub struct FlushCommands {
    /// The script's SHA-1, hex.
    sha: String,
    /// TTL in seconds, as text.
    ttl: String,
    /// This replica.
    replica: String,
    /// The value being encoded (reused).
    value: Vec<u8>,
}

impl FlushCommands {
    /// Commands with a TTL of `ttl_secs`, written by `replica`.
    pub fn new(ttl_secs: u64, replica: &str) -> Self {
        Self {
            sha: sha1_hex(FLUSH.as_bytes()),
            ttl: ttl_secs.to_string(),
            replica: replica.to_owned(),
            value: Vec::with_capacity(2048),
        }
    }

    /// The length of the value of the last write pushed.
    pub fn last_value_len(&self) -> usize {
        self.value.len()
    }

    /// Appends the write of `device_id`, expecting version `base`, with the value
    /// `encode` appends; `release` gives ownership up with it.
    pub fn push(
        &mut self,
        out: &mut Vec<u8>,
        device_id: &str,
        base: u64,
        release: bool,
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        self.value.clear();
        encode(&mut self.value);
        out.extend_from_slice(b"*11\r\n");
        put_bulk(out, b"EVALSHA");
        put_bulk(out, self.sha.as_bytes());
        put_bulk(out, b"3");
        let mut key = Vec::with_capacity(KEY_PREFIX.len() + device_id.len());
        super::write_key(&mut key, device_id);
        put_bulk(out, &key);
        put_bulk(out, version_key(device_id).as_bytes());
        put_bulk(out, owner_key(device_id).as_bytes());
        put_bulk(out, &self.value);
        put_bulk(out, self.ttl.as_bytes());
        put_bulk(out, base.to_string().as_bytes());
        put_bulk(out, self.replica.as_bytes());
        put_bulk(out, if release { b"1" } else { b"0" });
    }
}

/// `SCRIPT LOAD` of every script, packed, with the number of commands.
pub fn load_scripts() -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    for script in SCRIPTS {
        out.extend_from_slice(b"*3\r\n");
        put_bulk(&mut out, b"SCRIPT");
        put_bulk(&mut out, b"LOAD");
        put_bulk(&mut out, script.as_bytes());
    }
    (out, SCRIPTS.len())
}

/// SHA-1 of `data` in lowercase hex, as `EVALSHA` names a script.
pub fn sha1_hex(data: &[u8]) -> String {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut message = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bits.to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_matches_the_standard_vectors() {
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            sha1_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }

    #[test]
    fn companion_keys_share_the_snapshot_keys_slot() {
        assert_eq!(version_key("a"), "{tidewatch:v1:device:a}:version");
        assert_eq!(owner_key("a"), "{tidewatch:v1:device:a}:owner");
        use super::super::{cluster::key_slot, key};
        for id in ["a", "pump-7", "x{y}z", "{", "}", "{}", "a}b{c", "é{"] {
            let slot = key_slot(key(id).as_bytes());
            assert_eq!(key_slot(version_key(id).as_bytes()), slot, "{id}");
            assert_eq!(key_slot(owner_key(id).as_bytes()), slot, "{id}");
        }
    }

    #[test]
    fn the_lease_outlives_a_few_flushes() {
        assert_eq!(lease(Duration::from_millis(100)), Duration::from_secs(2));
        assert_eq!(lease(Duration::from_secs(5)), Duration::from_secs(15));
    }
}
