//! A consistent hash ring with virtual nodes over member names.
//!
//! Pure and deterministic: the same members give the same ring in every process, so every server
//! of a cluster agrees on who owns a key without talking. Lookups are a binary search, O(log n).

/// Virtual nodes per member: enough for a max/mean load near 1.1 with a handful of members.
pub const DEFAULT_VNODES: usize = 256;

/// The position of a key (or a virtual node) on the ring: the first 8 bytes of its SHA-256, big endian.
pub fn hash_key(key: &str) -> u64 {
    todo!()
}

/// A ring over a fixed set of members.
#[derive(Clone, Debug)]
pub struct HashRing {
    members: Vec<String>,
    points: Vec<(u64, u32)>,
}

impl HashRing {
    /// A ring over `members` (duplicates ignored), each with `vnodes` points named `"<member>#<i>"`.
    pub fn new<S: AsRef<str>>(members: &[S], vnodes: usize) -> HashRing {
        todo!()
    }

    /// The members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The member that owns `key`: the first point clockwise from the key's hash. `None` when empty.
    pub fn owner(&self, key: &str) -> Option<&str> {
        todo!()
    }

    /// Every member in the order the ring prefers them for `key`: the owner first, then each next
    /// distinct member clockwise. Used to fail over when the owner cannot be reached.
    pub fn preference(&self, key: &str) -> Vec<&str> {
        todo!()
    }

    /// Each member's share of the hash space, between 0 and 1, in member order.
    pub fn shares(&self) -> Vec<(String, f64)> {
        todo!()
    }
}
