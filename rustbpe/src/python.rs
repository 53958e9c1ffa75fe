//! The Python module `rustbpe`, API-compatible with the PyPI package of the same name.

use crate::split::GPT4_PATTERN;
use crate::tokenizer::{ChunkCounter, Tokenizer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

#[pyclass(name = "Tokenizer", module = "rustbpe")]
struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new() -> Self {
        PyTokenizer { inner: Tokenizer::new() }
    }

    /// Train on the texts of `iterator`, pulled `buffer_size` at a time; each buffer is split and
    /// counted in parallel with the GIL released. Learns `vocab_size - 256` merges (fewer if the
    /// text runs out of pairs). `pattern` defaults to the GPT-4 split pattern.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!("vocab_size must be at least 256 (the byte tokens), got {vocab_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_owned());
        let empty = Tokenizer::from_merges(&pattern, vec![]).map_err(PyValueError::new_err)?;
        let mut counter = ChunkCounter::new();
        let mut texts = iterator.try_iter()?;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.max(1));
        loop {
            buffer.clear();
            for item in texts.by_ref() {
                buffer.push(to_string(&item?)?);
                if buffer.len() >= buffer_size.max(1) {
                    break;
                }
            }
            if buffer.is_empty() {
                break;
            }
            py.detach(|| counter.add(empty.splitter(), &buffer));
        }
        drop(buffer);
        self.inner = py.detach(|| Tokenizer::train(&pattern, &counter, vocab_size as usize)).map_err(PyValueError::new_err)?;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.inner.pattern().to_owned()
    }

    /// `[(token bytes, token id), ...]` for every token: the ranks tiktoken needs.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        let bytes = self.inner.token_bytes();
        bytes.iter().enumerate().map(|(id, b)| (PyBytes::new(py, b), id as u32)).collect()
    }

    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let text = to_string(text)?;
        Ok(py.detach(|| self.inner.encode(&text)))
    }

    /// Encode many texts in parallel, with the GIL released.
    fn batch_encode(&self, py: Python<'_>, texts: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u32>>> {
        let texts: Vec<String> = texts.try_iter()?.map(|t| to_string(&t?)).collect::<PyResult<_>>()?;
        Ok(py.detach(|| self.inner.batch_encode(&texts)))
    }
}

fn to_string(item: &Bound<'_, PyAny>) -> PyResult<String> {
    match item.cast::<PyString>() {
        Ok(s) => Ok(s.to_str()?.to_owned()),
        Err(_) => Err(PyTypeError::new_err(format!("expected str, got {}", item.get_type().name()?))),
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
