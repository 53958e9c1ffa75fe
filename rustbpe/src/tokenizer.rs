//! The tokenizer: count chunks of training text, learn merges, encode with them.

use crate::split::{Splitter, GPT4_PATTERN};
use crate::train::{learn_merges, Pair};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// Counts distinct chunks over batches of texts; each batch is split and counted in parallel.
pub struct ChunkCounter {
    counts: FxHashMap<String, i64>,
}

impl ChunkCounter {
    pub fn new() -> Self {
        ChunkCounter { counts: FxHashMap::default() }
    }

    pub fn add(&mut self, splitter: &Splitter, texts: &[String]) {
        // Per-thread maps borrow the chunks from `texts`; only new distinct chunks are copied.
        let local = texts
            .par_iter()
            .fold(FxHashMap::<&str, i64>::default, |mut map, text| {
                splitter.split(text, |chunk| *map.entry(chunk).or_default() += 1);
                map
            })
            .reduce(FxHashMap::default, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (chunk, n) in small {
                    *big.entry(chunk).or_default() += n;
                }
                big
            });
        for (chunk, n) in local {
            match self.counts.get_mut(chunk) {
                Some(total) => *total += n,
                None => {
                    self.counts.insert(chunk.to_owned(), n);
                }
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], i64)> {
        self.counts.iter().map(|(chunk, &n)| (chunk.as_bytes(), n))
    }
}

impl Default for ChunkCounter {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<Pair>,
    rank: FxHashMap<Pair, u32>, // pair -> index of its merge (token id 256 + index)
}

impl Tokenizer {
    /// A tokenizer with no merges (256 byte tokens) and the GPT-4 split pattern.
    pub fn new() -> Self {
        Self::from_merges(GPT4_PATTERN, vec![]).expect("the GPT-4 pattern is valid")
    }

    pub fn from_merges(pattern: &str, merges: Vec<Pair>) -> Result<Self, String> {
        let splitter = Splitter::new(pattern)?;
        let rank = merges.iter().enumerate().map(|(i, &p)| (p, i as u32)).collect();
        Ok(Tokenizer { pattern: pattern.to_owned(), splitter, merges, rank })
    }

    /// Learn `vocab_size - 256` merges from counted chunks.
    pub fn train(pattern: &str, counter: &ChunkCounter, vocab_size: usize) -> Result<Self, String> {
        if vocab_size < 256 {
            return Err(format!("vocab_size must be at least 256 (the byte tokens), got {vocab_size}"));
        }
        Self::from_merges(pattern, learn_merges(counter.iter(), vocab_size - 256))
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    pub fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// The bytes of every token, indexed by token id (tiktoken's "mergeable ranks").
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            let merged = [bytes[a as usize].as_slice(), bytes[b as usize].as_slice()].concat();
            bytes.push(merged);
        }
        bytes
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.split(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out));
        out
    }

    pub fn batch_encode(&self, texts: &[String]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Apply merges in the order they were learned: repeatedly merge the earliest-learned pair
    /// present (all its occurrences, left to right), as training did.
    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        while ids.len() >= 2 {
            let best = ids.windows(2).filter_map(|p| self.rank.get(&(p[0], p[1])).copied()).min();
            let Some(rank) = best else { break };
            let (a, b) = self.merges[rank as usize];
            let (mut read, mut write) = (0, 0);
            while read < ids.len() {
                if read + 1 < ids.len() && ids[read] == a && ids[read + 1] == b {
                    ids[write] = 256 + rank;
                    read += 2;
                } else {
                    ids[write] = ids[read];
                    read += 1;
                }
                write += 1;
            }
            ids.truncate(write);
        }
        out.extend_from_slice(&ids);
    }
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained(texts: &[&str], vocab_size: usize) -> Tokenizer {
        let mut counter = ChunkCounter::new();
        let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        let tok = Tokenizer::new();
        counter.add(tok.splitter(), &texts);
        Tokenizer::train(GPT4_PATTERN, &counter, vocab_size).unwrap()
    }

    #[test]
    fn encode_round_trips_and_compresses() {
        let text = "the cat sat on the mat; the cat sat on the hat. 123456 ünïcødé 日本語 😀";
        let tok = trained(&[text, text, "the theme of the thesis"], 300);
        let ids = tok.encode(text);
        assert!(ids.len() < text.len());
        let bytes = tok.token_bytes();
        let decoded: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone()).collect();
        assert_eq!(decoded, text.as_bytes());
    }

    #[test]
    fn counting_in_batches_equals_counting_at_once() {
        let texts: Vec<String> = (0..200).map(|i| format!("doc {i}: the quick brown fox {}", i % 7)).collect();
        let splitter = Splitter::new(GPT4_PATTERN).unwrap();
        let mut once = ChunkCounter::new();
        once.add(&splitter, &texts);
        let mut batched = ChunkCounter::new();
        for batch in texts.chunks(17) {
            batched.add(&splitter, batch);
        }
        let sorted = |c: &ChunkCounter| {
            let mut v: Vec<(Vec<u8>, i64)> = c.iter().map(|(b, n)| (b.to_vec(), n)).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&once), sorted(&batched));
    }

    #[test]
    fn vocab_size_below_256_is_an_error() {
        assert!(Tokenizer::train(GPT4_PATTERN, &ChunkCounter::new(), 255).is_err());
        assert_eq!(Tokenizer::train(GPT4_PATTERN, &ChunkCounter::new(), 256).unwrap().vocab_size(), 256);
    }
}
