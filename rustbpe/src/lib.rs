//! rustbpe: byte-level BPE tokenizer training for nanochat.
//!
//! `split` cuts text into chunks with the GPT-4-style split pattern, `train` learns the merges,
//! `encode` applies them; `python` (feature `python`) exposes them to Python with PyO3.

pub mod split;
pub mod tokenizer;
pub mod train;

#[cfg(feature = "python")]
mod python;
