//! The ledger that keeps a run's counts exact across a lost checkpoint.
//!
//! Every destructive batch runs as one script that first adds what it is about to remove to a
//! ledger key of its run (`INCRBY`, before anything is deleted) and then removes it: the
//! record and the deletion are one atomic unit on the server. The cursor checkpointed with
//! the counts says how much of the ledger status already counts; the step that finishes a run
//! reads the ledger and reports the difference. A batch whose outcome was lost (the operator
//! killed, or fenced out, before its checkpoint) is thus counted once, by the end of the run,
//! and never twice. A run's ledger keys expire by themselves ([`TTL_SECS`]) and are removed
//! by the step after the one that read them, once that read is checkpointed.
//!
//! On a Redis Cluster a script may only touch keys of one slot, so a run has one ledger key
//! per slot it deleted in, each with a hash tag that maps to that slot ([`slot_tag`]).

use std::sync::LazyLock;

/// Every ledger key starts with this; sweeps and erasures never select such a key.
pub const PREFIX: &str = "tombstone:ledger:";

/// How long a ledger key outlives its last write: a crashed run's ledger goes away by itself.
pub const TTL_SECS: u64 = 7 * 24 * 3600;

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// Whether `key` is one of the operator's ledger keys.
pub fn is_ledger_key(key: &[u8]) -> bool {
    key.starts_with(PREFIX.as_bytes())
}

/// CRC16 (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key` (its hash tag's, when it has a non-empty one).
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = key.get(open + 1..)?;
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// For every slot, the smallest number whose decimal string hashes to it, computed once.
static TAGS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut n: u32 = 0;
    while missing > 0 && n < u32::MAX {
        let slot = usize::from(crc16(n.to_string().as_bytes()) % SLOTS);
        if let Some(tag) = tags.get_mut(slot) {
            if *tag == u32::MAX {
                *tag = n;
                missing -= 1;
            }
        }
        n += 1;
    }
    tags
});

/// The hash tag that maps to `slot` (taken modulo the number of slots): the smallest decimal
/// string whose CRC16 is that slot.
pub fn slot_tag(slot: u16) -> String {
    TAGS.get(usize::from(slot % SLOTS))
        .copied()
        .unwrap_or_default()
        .to_string()
}

/// The ledger key of `run`: one for a standalone server, one per slot on a cluster (in the
/// slot of the keys its scripts remove there).
pub fn key(run: &str, slot: Option<u16>) -> String {
    match slot {
        None => format!("{PREFIX}{run}"),
        Some(slot) => format!("{PREFIX}{run}:{{{}}}", slot_tag(slot)),
    }
}

/// A fresh run id: 12 hex digits of randomness (never derived from an identifier).
pub fn new_run() -> String {
    let mut bytes = [0u8; 6];
    // Without randomness, fall back to the clock: a run id only has to differ from the ids of
    // runs alive at the same time on the same store.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    hex::encode(bytes)
}

/// A run id is hex digits only, so it can sit in a key and a cursor unquoted.
pub fn valid_run(run: &str) -> bool {
    !run.is_empty() && run.len() <= 32 && run.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where a run's ledger stands, as its cursor carries it: the run, how much of the ledger
/// status already counts, and whether the ledger was already read for the run's end (the
/// next step only removes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    pub run: String,
    pub counted: u64,
    pub settled: bool,
}

/// A tally in a typed cursor: its text form ([`Tally::encode`]), read back through
/// [`Tally::parse`], so a run id is checked before it names a key.
pub mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Tally;

    pub fn serialize<S: Serializer>(tally: &Option<Tally>, s: S) -> Result<S::Ok, S::Error> {
        match tally {
            Some(t) => s.serialize_some(&t.encode()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tally>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => Tally::parse(&text)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("not a ledger tally")),
        }
    }
}

impl Tally {
    pub fn new(run: String) -> Self {
        Self {
            run,
            counted: 0,
            settled: false,
        }
    }

    /// Counts `n` more that a step reports.
    pub fn add(&mut self, n: u64) {
        self.counted = self.counted.saturating_add(n);
    }

    /// At the end of a run: what the ledger holds (`total`) and status does not count yet,
    /// counted from now on. Zero when the ledger holds less (it was lost, e.g. a server
    /// restarted without its data: then the deletions were lost with it).
    pub fn settle(&mut self, total: u64) -> u64 {
        let missing = total.saturating_sub(self.counted);
        self.counted = self.counted.max(total);
        self.settled = true;
        missing
    }

    /// `run.counted` or `run.counted.s` once settled.
    pub fn encode(&self) -> String {
        if self.settled {
            format!("{}.{}.s", self.run, self.counted)
        } else {
            format!("{}.{}", self.run, self.counted)
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('.');
        let run = parts.next()?;
        let counted = parts.next()?.parse().ok()?;
        let settled = match parts.next() {
            None => false,
            Some("s") => true,
            Some(_) => return None,
        };
        if parts.next().is_some() || !valid_run(run) {
            return None;
        }
        Some(Self {
            run: run.to_string(),
            counted,
            settled,
        })
    }
}

/// The Lua function every destructive script starts with: `settle(n)` adds `n` to the ledger
/// (`KEYS[1]`, expiring after `ARGV[1]` seconds) before the script removes anything, so a
/// refused ledger write (an ACL without the ledger pattern: `NOPERM`) removes nothing.
pub const LUA_SETTLE: &str = r"
local function settle(n)
  if n > 0 then
    redis.call('INCRBY', KEYS[1], n)
    redis.call('EXPIRE', KEYS[1], ARGV[1])
  end
end
";

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn slots_are_redis_clusters() {
        // Known slots from the Redis Cluster specification and redis-cli.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        for key in [
            "a",
            "user:u-7c1:17",
            "x{y}z",
            "{}",
            "{a",
            "tombstone:ledger:ab:{7}",
        ] {
            assert_eq!(
                Slot::for_key(key.as_bytes()),
                Slot::new(slot_of(key.as_bytes())).expect("a slot"),
                "{key}"
            );
        }
    }

    #[test]
    fn every_slot_has_the_smallest_tag_that_maps_to_it() {
        for slot in [0u16, 1, 866, 5061, 12182, 16383] {
            let tag = slot_tag(slot);
            assert_eq!(slot_of(tag.as_bytes()), slot, "tag {tag}");
            let n: u32 = tag.parse().unwrap();
            assert!((0..n).all(|m| slot_of(m.to_string().as_bytes()) != slot));
            let key = key("0a1b2c", Some(slot));
            assert_eq!(key, format!("tombstone:ledger:0a1b2c:{{{tag}}}"));
            assert_eq!(
                Slot::for_key(key.as_bytes()),
                Slot::new(slot).expect("a slot")
            );
        }
        assert!((0..SLOTS).all(|s| slot_of(slot_tag(s).as_bytes()) == s));
        assert_eq!(key("0a1b2c", None), "tombstone:ledger:0a1b2c");
    }

    #[test]
    fn ledger_keys_are_told_apart() {
        assert!(is_ledger_key(b"tombstone:ledger:0a1b2c"));
        assert!(is_ledger_key(b"tombstone:ledger:0a1b2c:{12}"));
        assert!(!is_ledger_key(b"tombstone:ledge"));
        assert!(!is_ledger_key(b"old:tombstone:ledger:x"));
    }

    #[test]
    fn runs_are_random_hex() {
        let a = new_run();
        assert!(valid_run(&a) && a.len() == 12, "{a}");
        assert_ne!(a, new_run());
        assert!(!valid_run("") && !valid_run("ab:cd") && !valid_run("ab.cd"));
    }

    #[test]
    fn a_tally_counts_what_status_lacks_once() {
        let mut t = Tally::new("ab12".into());
        t.add(5000);
        t.add(u64::MAX);
        assert_eq!(t.counted, u64::MAX, "saturates, never panics");
        let mut t = Tally::new("ab12".into());
        t.add(5000);
        // A batch of 3000 was deleted and its checkpoint lost: the ledger holds 8000.
        assert_eq!(t.settle(8000), 3000);
        assert_eq!((t.counted, t.settled), (8000, true));
        // A ledger that holds less than was counted (lost with a server's data) adds nothing.
        let mut t = Tally::new("ab12".into());
        t.add(10);
        assert_eq!(t.settle(4), 0);
        assert_eq!(t.counted, 10);
    }

    #[test]
    fn tallies_round_trip_and_reject_garbage() {
        let mut t = Tally::new("0a1b2c".into());
        t.add(42);
        assert_eq!(t.encode(), "0a1b2c.42");
        assert_eq!(Tally::parse("0a1b2c.42"), Some(t.clone()));
        t.settle(50);
        assert_eq!(t.encode(), "0a1b2c.50.s");
        assert_eq!(Tally::parse("0a1b2c.50.s"), Some(t));
        for bad in [
            "",
            "0a1b2c",
            "0a1b2c.",
            "0a1b2c.-1",
            "0a1b2c.1.x",
            "0a1b2c.1.s.s",
            "zz.1",
            ".1",
            "0a.99999999999999999999999",
        ] {
            assert_eq!(Tally::parse(bad), None, "{bad}");
        }
    }
}
