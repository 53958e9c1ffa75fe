//! Learning BPE merges from chunk counts.
//!
//! Every distinct chunk is a "word": a sequence of token ids (initially its bytes) with a count.
//! The pair counts over all words are kept up to date incrementally: merging a pair only touches
//! the words that contain it, and only the pairs next to each merged occurrence change. A max-heap
//! holds candidate pairs; an entry whose count went stale is refreshed when it reaches the top.
//!
//! Tie-breaking (the same as the PyPI `rustbpe`, so both learn identical merges): the pair with
//! the highest count wins; among equal counts, the smallest pair (a, b) in numeric order of the
//! token ids. Occurrences are counted with overlaps ("aaa" holds (a, a) twice) and merged left to
//! right without overlaps.

use rustc_hash::FxHashMap;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub type Pair = (u32, u32);

/// Distinct chunks laid out in one flat array: word `w` is `ids[start[w]..start[w] + len[w]]`.
struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<usize>,
    count: Vec<i64>,
}

struct Candidate {
    count: i64,
    pair: Pair,
    /// Words that contained the pair when it was queued (ascending; a superset of where it is now,
    /// because a pair of existing tokens never gains occurrences: only pairs with the newest token do).
    words: Vec<u32>,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// Push `w` unless it is already the last entry (words are visited in ascending order).
#[inline]
fn note_word(list: &mut Vec<u32>, w: u32) {
    if list.last() != Some(&w) {
        list.push(w);
    }
}

/// Learn up to `num_merges` merges from `(chunk bytes, count)` pairs. Returns the merged pairs in
/// order; the i-th gets token id 256 + i. Stops early when no pair is left.
pub fn learn_merges<'a>(chunks: impl IntoIterator<Item = (&'a [u8], i64)>, num_merges: usize) -> Vec<Pair> {
    let mut words = Words { ids: vec![], start: vec![], len: vec![], count: vec![] };
    for (bytes, count) in chunks {
        if bytes.len() < 2 {
            continue; // a single byte has no pair to merge
        }
        words.start.push(words.ids.len());
        words.len.push(bytes.len());
        words.count.push(count);
        words.ids.extend(bytes.iter().map(|&b| b as u32));
    }

    // Initial pair counts, and where each pair occurs.
    let mut pair_counts: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut where_: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for w in 0..words.start.len() {
        let ids = &words.ids[words.start[w]..words.start[w] + words.len[w]];
        for p in ids.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_default() += words.count[w];
            note_word(where_.entry(pair).or_default(), w as u32);
        }
    }
    let mut heap: BinaryHeap<Candidate> =
        where_.into_iter().map(|(pair, words)| Candidate { count: pair_counts[&pair], pair, words }).collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut new_pairs: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    while merges.len() < num_merges {
        let Some(mut top) = heap.pop() else { break };
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != top.count {
            top.count = current; // stale: requeue with the true count
            heap.push(top);
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(top.pair);
        for &w in &top.words {
            merge_in_word(&mut words, w, top.pair, new_id, &mut pair_counts, &mut new_pairs);
        }
        for (pair, words) in new_pairs.drain() {
            let count = pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                heap.push(Candidate { count, pair, words });
            }
        }
    }
    merges
}

/// Replace every non-overlapping (a, b) in word `w` by `new_id`, left to right, updating the pair
/// counts for the pairs that disappear and appear, and noting where the new pairs are.
fn merge_in_word(
    words: &mut Words,
    w: u32,
    (a, b): Pair,
    new_id: u32,
    pair_counts: &mut FxHashMap<Pair, i64>,
    new_pairs: &mut FxHashMap<Pair, Vec<u32>>,
) {
    let wi = w as usize;
    let (start, len, count) = (words.start[wi], words.len[wi], words.count[wi]);
    let ids = &mut words.ids[start..start + len];
    let mut add = |pair: Pair, delta: i64| *pair_counts.entry(pair).or_default() += delta;
    let (mut read, mut write) = (0, 0);
    while read < len {
        if read + 1 < len && ids[read] == a && ids[read + 1] == b {
            if write > 0 {
                let left = ids[write - 1]; // already rewritten: may itself be new_id
                add((left, a), -count);
                add((left, new_id), count);
                note_word(new_pairs.entry((left, new_id)).or_default(), w);
            }
            add((a, b), -count);
            if read + 2 < len {
                let right = ids[read + 2];
                add((b, right), -count);
                add((new_id, right), count);
                note_word(new_pairs.entry((new_id, right)).or_default(), w);
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    words.len[wi] = write;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook algorithm: recount every pair each step, merge the best (same tie-breaking).
    fn naive_merges(chunks: &[(Vec<u8>, i64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> =
            chunks.iter().map(|(b, c)| (b.iter().map(|&x| x as u32).collect(), *c)).collect();
        let mut merges = vec![];
        while merges.len() < num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (ids, c) in &words {
                for p in ids.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            // max count, then smallest pair: BTreeMap iterates pairs ascending, keep the first max
            let Some((&best, _)) = counts.iter().filter(|(_, &c)| c > 0).rev().max_by_key(|(_, &c)| c) else { break };
            let new_id = 256 + merges.len() as u32;
            for (ids, _) in words.iter_mut() {
                let mut out = vec![];
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && (ids[i], ids[i + 1]) == best {
                        out.push(new_id);
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                *ids = out;
            }
            merges.push(best);
        }
        merges
    }

    fn learn(chunks: &[(Vec<u8>, i64)], n: usize) -> Vec<Pair> {
        learn_merges(chunks.iter().map(|(b, c)| (b.as_slice(), *c)), n)
    }

    #[test]
    fn overlapping_runs_and_ties() {
        let chunks = vec![(b"aaaa".to_vec(), 1), (b"abab".to_vec(), 1), (b"ba".to_vec(), 2)];
        assert_eq!(learn(&chunks, 10), naive_merges(&chunks, 10));
        // (a,a) x3, (a,b) x2, (b,a) x1+2=3: the tie (a,a) vs (b,a) goes to the smaller pair
        assert_eq!(learn(&chunks, 1), vec![(b'a' as u32, b'a' as u32)]);
    }

    #[test]
    fn empty_input_learns_nothing() {
        assert!(learn(&[], 100).is_empty());
        assert!(learn(&[(b"x".to_vec(), 5)], 100).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn equals_naive_reference(
            chunks in prop::collection::vec((prop::collection::vec(0u8..6, 0..12), 1i64..5), 0..40),
            n in 0usize..60,
        ) {
            prop_assert_eq!(learn(&chunks, n), naive_merges(&chunks, n));
        }
    }
}
