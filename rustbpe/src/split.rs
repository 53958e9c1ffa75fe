//! Splitting text into chunks before BPE, as a regex split pattern prescribes.
//!
//! The GPT-4 family of patterns,
//!     '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! (K = 3 for GPT-4, 2 for nanochat), is recognised and run by a hand-written scanner: one pass,
//! no backtracking, a table lookup per character. Its output is exactly the regex's (proved by
//! property tests against fancy-regex below). Any other pattern runs through fancy-regex.

use fancy_regex::Regex;
use std::sync::OnceLock;

pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    /// The GPT-4 family scanner; the number is K, the longest run of digits in one chunk.
    Gpt4 { max_digits: usize },
    Regex(Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        for k in 1..=9 {
            if pattern == GPT4_PATTERN.replace("{1,3}", &format!("{{1,{k}}}")) {
                return Ok(Splitter::Gpt4 { max_digits: k });
            }
        }
        Regex::new(pattern).map(Splitter::Regex).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `f` with every chunk of `text`, in order. The chunks concatenate to `text`.
    pub fn split<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) {
        match self {
            Splitter::Gpt4 { max_digits } => split_gpt4(text, *max_digits, f),
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => f(m.as_str()),
                        // fancy-regex gives up on pathological backtracking; keep the rest whole
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

// ---- character classes, from the same Unicode tables fancy-regex uses (regex-syntax) ----

const OTHER: u8 = 0; // none of the below
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 3; // \s (White_Space)

fn class_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![OTHER; 0x110000];
        for (class, pattern) in [(LETTER, r"\p{L}"), (NUMBER, r"\p{N}"), (SPACE, r"\s")] {
            let hir = regex_syntax::Parser::new().parse(pattern).expect("valid class");
            let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(set)) = hir.kind() else {
                unreachable!("{pattern} is a Unicode class")
            };
            for range in set.ranges() {
                table[range.start() as usize..=range.end() as usize].fill(class);
            }
        }
        table
    })
}

/// The character starting at byte `i` (which must be < text.len()) and its length in bytes.
#[inline]
fn char_at(text: &str, i: usize) -> (char, usize) {
    let b = text.as_bytes()[i];
    if b < 0x80 {
        return (b as char, 1);
    }
    let c = text[i..].chars().next().unwrap();
    (c, c.len_utf8())
}

/// End of the run of characters of class `class` starting at byte `i`.
#[inline]
fn run_end(text: &str, table: &[u8], mut i: usize, class: u8) -> usize {
    while i < text.len() {
        let (c, n) = char_at(text, i);
        if table[c as usize] != class {
            break;
        }
        i += n;
    }
    i
}

#[inline]
fn is_contraction_letter(c: char, letter: char) -> bool {
    // (?i) is Unicode-aware: 's' also matches the long s 'ſ' (U+017F).
    c.to_ascii_lowercase() == letter || (letter == 's' && c == 'ſ')
}

/// Length of a contraction ('s 'd 'm 't 'll 've 're, any case) at byte `i`, or 0.
fn contraction_len(text: &str, i: usize) -> usize {
    let mut chars = text[i + 1..].chars();
    let Some(c1) = chars.next() else { return 0 };
    if "sdmt".chars().any(|l| is_contraction_letter(c1, l)) {
        return 1 + c1.len_utf8();
    }
    let Some(c2) = chars.next() else { return 0 };
    for (l1, l2) in [('l', 'l'), ('v', 'e'), ('r', 'e')] {
        if is_contraction_letter(c1, l1) && is_contraction_letter(c2, l2) {
            return 1 + c1.len_utf8() + c2.len_utf8();
        }
    }
    0
}

fn split_gpt4<'a>(text: &'a str, max_digits: usize, mut f: impl FnMut(&'a str)) {
    let table = class_table();
    let class = |i: usize| if i < text.len() { table[char_at(text, i).0 as usize] } else { u8::MAX };
    let mut i = 0;
    while i < text.len() {
        let (c, n) = char_at(text, i);
        let cls = table[c as usize];
        let end = if c == '\'' && contraction_len(text, i) > 0 {
            // '(?i:[sdmt]|ll|ve|re)
            i + contraction_len(text, i)
        } else if cls == LETTER {
            // \p{L}+
            run_end(text, table, i, LETTER)
        } else if cls != NUMBER && c != '\r' && c != '\n' && class(i + n) == LETTER {
            // [^\r\n\p{L}\p{N}]?+\p{L}+ with the optional character present
            run_end(text, table, i + n, LETTER)
        } else if cls == NUMBER {
            // \p{N}{1,K}
            let mut j = i;
            for _ in 0..max_digits {
                if class(j) != NUMBER {
                    break;
                }
                j += char_at(text, j).1;
            }
            j
        } else if cls == OTHER || (c == ' ' && class(i + 1) == OTHER) {
            // ' ?[^\s\p{L}\p{N}]++[\r\n]*'
            let j = run_end(text, table, if cls == OTHER { i } else { i + 1 }, OTHER);
            j + text[j..].bytes().take_while(|&b| b == b'\r' || b == b'\n').count()
        } else {
            whitespace_end(text, table, i)
        };
        f(&text[i..end]);
        i = end;
    }
}

/// End of the chunk for whitespace at byte `i`: \s*[\r\n] | \s+(?!\S) | \s+
fn whitespace_end(text: &str, table: &[u8], i: usize) -> usize {
    let run = run_end(text, table, i, SPACE);
    // \s*[\r\n]: backtracking finds the last newline of the run
    if let Some(k) = text[i..run].rfind(['\r', '\n']) {
        return i + k + 1;
    }
    // \s+(?!\S): the whole run at the end of text, else all but its last character
    if run == text.len() {
        return run;
    }
    let last = text[i..run].chars().next_back().unwrap().len_utf8();
    if run - last > i {
        run - last
    } else {
        run // \s+
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scanner_chunks(text: &str, k: usize) -> Vec<&str> {
        let mut out = vec![];
        Splitter::new(&GPT4_PATTERN.replace("{1,3}", &format!("{{1,{k}}}"))).unwrap().split(text, |c| out.push(c));
        out
    }

    fn regex_chunks(text: &str, k: usize) -> Vec<&str> {
        let re = Regex::new(&GPT4_PATTERN.replace("{1,3}", &format!("{{1,{k}}}"))).unwrap();
        re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

    #[test]
    fn recognises_the_gpt4_family_only() {
        assert!(matches!(Splitter::new(GPT4_PATTERN).unwrap(), Splitter::Gpt4 { max_digits: 3 }));
        assert!(matches!(Splitter::new(&GPT4_PATTERN.replace("{1,3}", "{1,2}")).unwrap(), Splitter::Gpt4 { max_digits: 2 }));
        assert!(matches!(Splitter::new(r"\w+|\s+").unwrap(), Splitter::Regex(_)));
        assert!(Splitter::new(r"(unclosed").is_err());
    }

    #[test]
    fn known_splits() {
        let text = "Hello world's  \n\n  12345 ok?!\r\n\tTHE'LL ſ'S  end  ";
        assert_eq!(
            scanner_chunks(text, 3),
            vec!["Hello", " world", "'s", "  \n\n", " ", " ", "123", "45", " ok", "?!\r\n", "\tTHE", "'LL", " ſ", "'S", " ", " end", "  "]
        );
        assert_eq!(scanner_chunks(text, 3), regex_chunks(text, 3));
    }

    // Characters where the pattern's branches meet: quotes, the letters of contractions and their
    // case variants (including the long s and the Kelvin sign), digits of several scripts, every
    // kind of whitespace, punctuation, combining marks, CJK and emoji.
    const TRICKY: &[char] = &[
        '\'', 's', 'S', 'ſ', 'd', 'D', 'm', 't', 'T', 'l', 'L', 'v', 'V', 'e', 'E', 'r', 'R', 'k', 'K', 'a', 'z',
        '0', '7', '٣', '²', 'Ⅻ', ' ', ' ', ' ', '\t', '\n', '\r', '\u{b}', '\u{c}', '\u{85}', '\u{2028}', '\u{3000}',
        '.', ',', '!', '-', '_', '"', '\u{301}', '\u{200d}', '日', '本', 'ー', 'é', 'ß', 'Ω', '😀', '🇫', '\u{0}', '\u{ffff}',
    ];

    fn tricky_text() -> impl Strategy<Value = String> {
        let tricky = prop::sample::select(TRICKY.to_vec());
        let any = any::<char>();
        prop::collection::vec(prop_oneof![4 => tricky, 1 => any], 0..60).prop_map(|cs| cs.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn scanner_equals_regex_on_tricky_text(text in tricky_text(), k in 1usize..=3) {
            prop_assert_eq!(scanner_chunks(&text, k), regex_chunks(&text, k));
        }

        #[test]
        fn scanner_equals_regex_on_any_unicode(text in "\\PC{0,40}|.{0,40}", k in 1usize..=3) {
            prop_assert_eq!(scanner_chunks(&text, k), regex_chunks(&text, k));
        }
    }
}
