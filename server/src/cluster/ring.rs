//! A consistent hash ring with virtual nodes over member names.
//!
//! Pure and deterministic: the same members give the same ring in every process, so every server
//! of a cluster agrees on who owns a key without talking. Lookups are a binary search, O(log n).
//!
//! Only the cluster uses it, so it lives here (it was `telemeter_common::hashring`).

use ::ring::digest;

/// Virtual nodes per member: enough for a max/mean load near 1.1 with a handful of members.
pub const DEFAULT_VNODES: usize = 256;

/// The position of a key (or a virtual node) on the ring: the first 8 bytes of its SHA-256, big endian.
pub fn hash_key(key: &str) -> u64 {
    let digest = digest::digest(&digest::SHA256, key.as_bytes());
    let mut first = [0u8; 8];
    // SHA-256 output is 32 bytes, so the copy is always full; `zip` keeps it panic-free regardless.
    for (dst, src) in first.iter_mut().zip(digest.as_ref()) {
        *dst = *src;
    }
    u64::from_be_bytes(first)
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
        let mut members: Vec<String> = members.iter().map(|m| m.as_ref().to_string()).collect();
        members.sort();
        members.dedup();
        let mut points = Vec::with_capacity(members.len().saturating_mul(vnodes));
        for (index, member) in members.iter().enumerate() {
            // Member indices index `members`, so they fit u32 for any ring we could build in memory.
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            for i in 0..vnodes {
                points.push((hash_key(&format!("{member}#{i}")), index));
            }
        }
        // Sorting on (hash, member index) makes ties resolve the same way everywhere.
        points.sort_unstable();
        HashRing { members, points }
    }

    /// The members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Index into `points` of the first point clockwise from `key`.
    fn start(&self, key: &str) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash_key(key);
        let i = self.points.partition_point(|&(p, _)| p < h);
        Some(if i == self.points.len() { 0 } else { i })
    }

    fn member(&self, index: u32) -> Option<&str> {
        self.members.get(index as usize).map(String::as_str)
    }

    /// The member that owns `key`: the first point clockwise from the key's hash. `None` when empty.
    pub fn owner(&self, key: &str) -> Option<&str> {
        let start = self.start(key)?;
        let &(_, index) = self.points.get(start)?;
        self.member(index)
    }

    /// Every member in the order the ring prefers them for `key`: the owner first, then each next
    /// distinct member clockwise. Used to fail over when the owner cannot be reached.
    pub fn preference(&self, key: &str) -> Vec<&str> {
        let Some(start) = self.start(key) else {
            return Vec::new();
        };
        let mut seen = vec![false; self.members.len()];
        let mut order = Vec::with_capacity(self.members.len());
        let (after, before) = (
            self.points.get(start..).unwrap_or_default(),
            self.points.get(..start).unwrap_or_default(),
        );
        for &(_, index) in after.iter().chain(before) {
            if let Some(flag) = seen.get_mut(index as usize) {
                if !*flag {
                    *flag = true;
                    if let Some(m) = self.member(index) {
                        order.push(m);
                    }
                    if order.len() == self.members.len() {
                        break;
                    }
                }
            }
        }
        order
    }

    /// Each member's share of the hash space, between 0 and 1, in member order.
    pub fn shares(&self) -> Vec<(String, f64)> {
        let mut owned = vec![0u128; self.members.len()];
        let space = 1u128 << 64;
        if self.points.len() == 1 {
            if let Some(slot) = owned.first_mut() {
                *slot = space;
            }
        } else if let Some(&(last, _)) = self.points.last() {
            // A point owns the keys after the previous point up to and including itself; the first
            // point also owns the wrap-around arc past the last point.
            let mut prev = last;
            for &(hash, index) in &self.points {
                let arc = hash.wrapping_sub(prev);
                if let Some(slot) = owned.get_mut(index as usize) {
                    *slot += u128::from(arc);
                }
                prev = hash;
            }
        }
        self.members
            .iter()
            .zip(owned)
            .map(|(m, o)| (m.clone(), o as f64 / space as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("server-{i}")).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cluster-{i}")).collect()
    }

    #[test]
    fn hash_key_is_sha256_prefix() {
        // SHA-256("") = e3b0c44298fc1c14 9afbf4c8...
        assert_eq!(hash_key(""), 0xe3b0_c442_98fc_1c14);
        // SHA-256("abc") = ba7816bf8f01cfea 414140de...
        assert_eq!(hash_key("abc"), 0xba78_16bf_8f01_cfea);
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = HashRing::new::<&str>(&[], DEFAULT_VNODES);
        assert_eq!(ring.owner("x"), None);
        assert!(ring.preference("x").is_empty());
        assert!(ring.shares().is_empty());
        assert!(ring.members().is_empty());
    }

    #[test]
    fn zero_vnodes_has_no_owner() {
        let ring = HashRing::new(&["a"], 0);
        assert_eq!(ring.owner("x"), None);
        assert_eq!(ring.shares(), vec![("a".to_string(), 0.0)]);
    }

    #[test]
    fn single_member_owns_everything() {
        for vnodes in [1, DEFAULT_VNODES] {
            let ring = HashRing::new(&["only"], vnodes);
            for k in keys(100) {
                assert_eq!(ring.owner(&k), Some("only"));
            }
            assert_eq!(ring.shares(), vec![("only".to_string(), 1.0)]);
        }
    }

    #[test]
    fn members_sorted_and_deduplicated() {
        let ring = HashRing::new(&["c", "a", "b", "a", "c"], 8);
        assert_eq!(ring.members(), ["a", "b", "c"]);
        assert_eq!(ring.points.len(), 24);
        let same = HashRing::new(&["a", "b", "c"], 8);
        assert_eq!(ring.points, same.points);
    }

    #[test]
    fn owner_is_first_point_at_or_after_the_key() {
        let ring = HashRing::new(&["a", "b", "c"], 4);
        // A key whose hash is exactly a point's hash belongs to that point's member.
        for &(hash, index) in &ring.points {
            let i = ring.points.partition_point(|&(p, _)| p < hash);
            assert_eq!(ring.points[i], (hash, index));
        }
        // Past the last point the ring wraps to the first.
        let (_, first_member) = ring.points[0];
        let last = ring.points[ring.points.len() - 1].0;
        let mut wrapped = 0;
        for k in keys(2000) {
            if hash_key(&k) > last {
                assert_eq!(ring.owner(&k), ring.member(first_member));
                wrapped += 1;
            }
        }
        assert!(wrapped > 0, "no key landed past the last point");
    }

    #[test]
    fn determinism_across_versions() {
        // Computed once with this implementation. A change here means servers running different
        // versions would disagree on owners: that is a protocol change, not a refactor.
        let ring = HashRing::new(&["a", "b", "c"], DEFAULT_VNODES);
        let expected = [
            ("cluster-0", "c"),
            ("cluster-1", "a"),
            ("cluster-2", "c"),
            ("cluster-3", "a"),
            ("0b7b9cd4-8f1e-4f4e-9d7c-1d0e5f3a2b6c", "a"),
            ("", "b"),
        ];
        for (key, owner) in expected {
            assert_eq!(ring.owner(key), Some(owner), "owner of {key:?}");
        }
    }

    fn max_over_mean(ring: &HashRing, keys: &[String]) -> f64 {
        let mut load: HashMap<&str, usize> = HashMap::new();
        for k in keys {
            *load.entry(ring.owner(k).unwrap()).or_default() += 1;
        }
        assert_eq!(load.len(), ring.members().len(), "a member owns no key");
        let max = *load.values().max().unwrap() as f64;
        max / (keys.len() as f64 / ring.members().len() as f64)
    }

    #[test]
    fn balance() {
        let keys = keys(100_000);
        for n in [3, 5, 10] {
            let ring = HashRing::new(&names(n), DEFAULT_VNODES);
            let ratio = max_over_mean(&ring, &keys);
            let max_share = ring.shares().iter().map(|s| s.1).fold(0.0, f64::max);
            println!(
                "members={n} vnodes={DEFAULT_VNODES} keys=100000 max/mean load={ratio:.4} max share*n={:.4}",
                max_share * n as f64
            );
            assert!(ratio <= 1.15, "{n} members: max/mean {ratio:.4}");
        }
    }

    #[test]
    fn shares_sum_to_one_and_match_load() {
        let ring = HashRing::new(&names(5), DEFAULT_VNODES);
        let shares = ring.shares();
        let total: f64 = shares.iter().map(|s| s.1).sum();
        assert!((total - 1.0).abs() < 1e-9, "total {total}");
        let keys = keys(50_000);
        for (member, share) in shares {
            let owned = keys
                .iter()
                .filter(|k| ring.owner(k) == Some(&member))
                .count() as f64
                / keys.len() as f64;
            assert!((owned - share).abs() < 0.02, "{member}: {owned} vs {share}");
        }
    }

    #[test]
    fn adding_a_member_moves_only_keys_to_it() {
        let keys = keys(100_000);
        let before = HashRing::new(&names(3), DEFAULT_VNODES);
        let after = HashRing::new(&names(4), DEFAULT_VNODES);
        let newcomer = "server-3";
        let mut moved = 0;
        for k in &keys {
            let (old, new) = (before.owner(k).unwrap(), after.owner(k).unwrap());
            if old != new {
                assert_eq!(new, newcomer, "{k} moved from {old} to {new}");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        println!("adding a 4th member moved {fraction:.4} of keys");
        assert!((0.15..=0.35).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn removing_a_member_moves_only_its_keys() {
        let keys = keys(100_000);
        let before = HashRing::new(&names(5), DEFAULT_VNODES);
        let remaining: Vec<String> = names(5).into_iter().filter(|n| n != "server-2").collect();
        let after = HashRing::new(&remaining, DEFAULT_VNODES);
        let mut moved = 0;
        for k in &keys {
            let (old, new) = (before.owner(k).unwrap(), after.owner(k).unwrap());
            if old != new {
                assert_eq!(old, "server-2", "{k} moved from {old} to {new}");
                moved += 1;
            } else {
                assert_ne!(old, "server-2");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn preference_lists_every_member_once_owner_first() {
        let members = names(5);
        let ring = HashRing::new(&members, DEFAULT_VNODES);
        let mut second_choices = HashMap::new();
        for k in keys(2000) {
            let pref = ring.preference(&k);
            assert_eq!(pref.len(), members.len());
            assert_eq!(Some(pref[0]), ring.owner(&k));
            let mut sorted = pref.clone();
            sorted.sort();
            assert_eq!(sorted, members);
            *second_choices.entry(pref[1]).or_insert(0) += 1;
        }
        // Fail-over spreads over several members, not one fixed successor.
        assert!(second_choices.len() > 1);
    }

    #[test]
    fn preference_falls_back_to_the_owner_of_the_smaller_ring() {
        // When the owner is gone, the next member in the preference list is who owns the key in a
        // ring without it: fail-over agrees with a rebuilt ring.
        let members = names(4);
        let ring = HashRing::new(&members, DEFAULT_VNODES);
        for k in keys(500) {
            let pref = ring.preference(&k);
            let without: Vec<&str> = members
                .iter()
                .map(String::as_str)
                .filter(|m| *m != pref[0])
                .collect();
            let smaller = HashRing::new(&without, DEFAULT_VNODES);
            assert_eq!(smaller.owner(&k), Some(pref[1]), "{k}");
        }
    }
}
