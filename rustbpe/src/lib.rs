//! rustbpe: byte-level BPE tokenizer training for nanochat.
//!
//! The pure-Rust core lives in this crate; `python.rs` (feature `python`) wraps it for Python.

#[cfg(feature = "python")]
mod python;

/// Version of the crate, also exported to Python as `rustbpe.__version__`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_set() {
        assert!(!super::VERSION.is_empty());
    }
}
