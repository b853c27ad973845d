//! Tokenization with the `tokenizers` crate, plus an exact fast path for
//! byte-level BPE tokenizers of the GPT-2 family (GPT-Neo uses GPT-2's).
//!
//! The fast path does what the Hugging Face pipeline does, in the same order:
//! split out added tokens (`<|endoftext|>`) as literals, split each remaining
//! segment with the GPT-2 pre-tokenizer pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! (implemented here as a scanner, character classes from Unicode), map the
//! bytes of each piece to the byte-level alphabet, and run the crate's BPE
//! model on it. Pieces repeat a lot (TinyStories has a small vocabulary), so
//! their ids are cached per thread; BPE itself still always comes from the
//! crate. The fast path is only enabled for tokenizers whose configuration it
//! reproduces (no normaliser, ByteLevel pre-tokenizer with the GPT-2 regex and
//! no prefix space, BPE model, plain added tokens); any other `tokenizer.json`
//! goes through the crate's full `encode`. Tests compare both paths on whole
//! corpus files.

use std::cell::RefCell;
use std::collections::HashMap;

use rustc_hash::FxHashMap;
use tokenizers::{Model, Tokenizer};

use crate::error::{Error, Result};

/// Character classes of the GPT-2 pre-tokenizer pattern.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Number,
    /// U+0020, the only character ` ?` attaches.
    Space,
    /// Any other `\s`.
    Whitespace,
    Other,
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Added tokens matched literally in raw text (content, id), longest first.
    specials: Vec<(String, u32)>,
    /// Byte-level alphabet: byte -> char.
    byte_chars: [char; 256],
    fast: bool,
    /// Fingerprint of the vocabulary (token -> id, added tokens included).
    fingerprint: String,
    /// Distinguishes instances so per-thread caches never mix tokenizers.
    instance: u64,
    vocab_size: usize,
    pub name: String,
}

/// GPT-2's byte -> printable character table.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).expect("valid code point");
            n += 1;
            c
        };
    }
    table
}

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl TextTokenizer {
    /// Load a `tokenizer.json`; `name` is used in messages.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        let bad = |p: String| Error::Tokenizer {
            path: name.to_string(),
            problem: p,
        };
        // tokenizers 0.23 panics on malformed JSON inside `decoder`
        // (`DecoderHelper::deserialize(..).expect("Helper")`): the JSON is
        // read first, every string decoded (a lone surrogate escape is an
        // error only then), for an error with its line and column; any other
        // panic of the library while reading becomes this file's error.
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| bad(format!("not a valid tokenizer.json: not JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
            .map_err(|_| bad("not a valid tokenizer.json: the tokenizers library failed reading it".into()))?
            .map_err(|e| bad(format!("not a valid tokenizer.json: {e}")))?;
        let vocab = inner.get_vocab(true);
        if vocab.is_empty() {
            return Err(bad("the vocabulary is empty".into()));
        }
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut pairs: Vec<(&String, &u32)> = vocab.iter().collect();
        pairs.sort_by_key(|(_, id)| **id);
        let mut h = blake3::Hasher::new();
        for (tok, id) in &pairs {
            h.update(&id.to_le_bytes());
            h.update(tok.as_bytes());
            h.update(&[0xff]);
        }
        let fingerprint = h.finalize().to_hex().to_string();

        let added = inner.get_added_tokens_decoder();
        let mut specials: Vec<(String, u32)> = added.iter().map(|(id, t)| (t.content.clone(), *id)).collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let plain_added = added
            .values()
            .all(|t| !t.single_word && !t.lstrip && !t.rstrip && !t.content.is_empty());
        let byte_level = matches!(
            inner.get_pre_tokenizer(),
            Some(tokenizers::PreTokenizerWrapper::ByteLevel(bl)) if !bl.add_prefix_space && bl.use_regex
        );
        let bpe = matches!(inner.get_model(), tokenizers::ModelWrapper::BPE(_));
        let fast = plain_added && byte_level && bpe && inner.get_normalizer().is_none();
        if !fast {
            tracing::info!(
                tokenizer = name,
                "tokenizer is not plain byte-level BPE; using the general encoder"
            );
        }
        Ok(TextTokenizer {
            inner,
            specials,
            byte_chars: byte_chars(),
            fast,
            fingerprint,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            vocab_size,
            name: name.to_string(),
        })
    }

    /// Number of ids (largest id + 1, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn uses_fast_path(&self) -> bool {
        self.fast
    }

    /// The id of a token string (e.g. `<|endoftext|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encode with the crate's full pipeline (no special tokens added).
    pub fn encode_reference(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.name.clone(),
                problem: format!("encoding failed: {e}"),
            })
    }

    /// Encode one document, appending its ids to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if !self.fast {
            out.extend(self.encode_reference(text)?);
            return Ok(());
        }
        CACHE.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.instance != self.instance {
                cache.reset(self.instance);
            }
            // Added tokens are literal delimiters matched before pre-tokenization.
            let mut rest = text;
            while !rest.is_empty() {
                match self.next_special(rest) {
                    Some((at, len, id)) => {
                        self.encode_segment(&rest[..at], &mut cache, out)?;
                        out.push(id);
                        rest = &rest[at + len..];
                    }
                    None => {
                        self.encode_segment(rest, &mut cache, out)?;
                        break;
                    }
                }
            }
            Ok(())
        })
    }

    /// Encode a whole document and return its ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (content, id) in &self.specials {
            if let Some(at) = memchr::memmem::find(text.as_bytes(), content.as_bytes()) {
                // Earliest match wins; at equal positions the longest (sorted first).
                if best.is_none_or(|b| at < b.0) {
                    best = Some((at, content.len(), *id));
                }
            }
        }
        best
    }

    fn encode_segment(&self, segment: &str, cache: &mut PieceCache, out: &mut Vec<u32>) -> Result<()> {
        let mut err = None;
        for_each_piece(segment, &mut cache.classes, |piece| {
            if err.is_some() {
                return;
            }
            if let Some(ids) = cache.pieces.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
            let mapped: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
            match self.inner.get_model().tokenize(&mapped) {
                Ok(tokens) => {
                    let ids: Box<[u32]> = tokens.iter().map(|t| t.id).collect();
                    out.extend_from_slice(&ids);
                    if cache.pieces.len() >= MAX_CACHED_PIECES {
                        cache.pieces.clear();
                    }
                    cache.pieces.insert(piece.into(), ids);
                }
                Err(e) => err = Some(e.to_string()),
            }
        });
        match err {
            None => Ok(()),
            Some(e) => Err(Error::Tokenizer {
                path: self.name.clone(),
                problem: format!("BPE failed: {e}"),
            }),
        }
    }

    /// The text of one token on its own (byte-level pieces that are not whole
    /// UTF-8 characters are shown with U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) => s,
            Err(_) => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    /// Vocabulary as token -> id (added tokens included).
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }
}

const MAX_CACHED_PIECES: usize = 1 << 20;

struct PieceCache {
    instance: u64,
    pieces: FxHashMap<Box<str>, Box<[u32]>>,
    classes: FxHashMap<char, Class>,
}

impl PieceCache {
    fn reset(&mut self, instance: u64) {
        self.instance = instance;
        self.pieces.clear();
    }
}

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(PieceCache {
        instance: 0,
        pieces: FxHashMap::default(),
        classes: FxHashMap::default(),
    });
}

fn classify(c: char, memo: &mut FxHashMap<char, Class>) -> Class {
    if c.is_ascii() {
        return match c {
            ' ' => Class::Space,
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' => Class::Whitespace,
            _ => Class::Other,
        };
    }
    *memo.entry(c).or_insert_with(|| {
        static LETTER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        let letter = LETTER.get_or_init(|| regex::Regex::new(r"^\p{L}$").expect("static regex"));
        let number = NUMBER.get_or_init(|| regex::Regex::new(r"^\p{N}$").expect("static regex"));
        let mut buf = [0u8; 4];
        let s = c.encode_utf8(&mut buf);
        if c.is_whitespace() {
            Class::Whitespace
        } else if letter.is_match(s) {
            Class::Letter
        } else if number.is_match(s) {
            Class::Number
        } else {
            Class::Other
        }
    })
}

/// Split `text` into GPT-2 pre-tokens, calling `f` on each in order.
fn for_each_piece(text: &str, memo: &mut FxHashMap<char, Class>, mut f: impl FnMut(&str)) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let classes: Vec<Class> = chars.iter().map(|&(_, c)| classify(c, memo)).collect();
    let n = chars.len();
    let byte_at = |i: usize| if i < n { chars[i].0 } else { text.len() };
    let is_ws = |k: Class| matches!(k, Class::Space | Class::Whitespace);
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // 's 't 're 've 'm 'll 'd
        if c == '\'' && i + 1 < n {
            let next = chars[i + 1].1;
            let next2 = if i + 2 < n { Some(chars[i + 2].1) } else { None };
            let len = match (next, next2) {
                ('s' | 't' | 'm' | 'd', _) => 2,
                ('r', Some('e')) | ('v', Some('e')) | ('l', Some('l')) => 3,
                _ => 0,
            };
            if len > 0 {
                f(&text[byte_at(i)..byte_at(i + len)]);
                i += len;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let j = if classes[i] == Class::Space { i + 1 } else { i };
        if j < n && !is_ws(classes[j]) {
            let k = classes[j];
            let mut e = j + 1;
            while e < n && classes[e] == k {
                e += 1;
            }
            f(&text[byte_at(i)..byte_at(e)]);
            i = e;
            continue;
        }
        // Whitespace: `\s+(?!\S)` then `\s+`.
        let mut e = i;
        while e < n && is_ws(classes[e]) {
            e += 1;
        }
        if e == n || e - i == 1 {
            f(&text[byte_at(i)..byte_at(e)]);
            i = e;
        } else {
            // Leave the last whitespace character for the next piece.
            f(&text[byte_at(i)..byte_at(e - 1)]);
            i = e - 1;
        }
    }
}

/// The GPT-Neo (= GPT-2) tokenizer shipped in `data/tokenizer.json`, compiled
/// in so the default works from any directory and on machines without the
/// repository.
pub const GPT2_TOKENIZER_JSON: &[u8] = include_bytes!("../../data/tokenizer.json");

/// The name that selects [`GPT2_TOKENIZER_JSON`] wherever a tokenizer file is
/// expected.
pub const BUILTIN_GPT2: &str = "gpt2";

/// The bytes of a tokenizer named by `spec` (a path, `s3://` URL, `lake:KEY`,
/// or `gpt2` for the built-in one) and the name to show for it.
pub fn read_tokenizer_json(lake: &lc_lake::lake::Lake, spec: &str) -> Result<(bytes::Bytes, String)> {
    if spec == BUILTIN_GPT2 {
        return Ok((
            bytes::Bytes::from_static(GPT2_TOKENIZER_JSON),
            "built-in GPT-2 tokenizer".to_string(),
        ));
    }
    let src = lc_lake::source::Source::open(lake, spec)?;
    Ok((src.bytes()?, src.name))
}

/// Lake key of a stored tokenizer copy.
pub fn tokenizer_key(fingerprint: &str) -> String {
    format!("tokenizers/{fingerprint}.json")
}

/// The tokenizer a dataset was tokenized with (the lake copy named in the
/// manifest of its train tokens), with that manifest.
pub fn for_dataset(
    lake: &lc_lake::lake::Lake,
    dataset: &str,
) -> Result<(TextTokenizer, lc_lake::manifest::Manifest)> {
    let tokens = lc_lake::artifact::Artifact::new("tokens", &[("dataset", dataset), ("split", "train")])?;
    let m = lake.require(&tokens, "run stage=tokenize")?;
    let key = m
        .extra_str("tokenizer_key")
        .ok_or_else(|| Error::artifact(&m.artifact, "manifest names no tokenizer"))?
        .to_string();
    let bytes = lake.get(&key)?;
    let tok = TextTokenizer::from_bytes(&bytes, &lake.display(&key))?;
    Ok((tok, m))
}

/// Build a GPT-2 style `tokenizer.json` from `encoder.json` (vocab) and
/// `vocab.bpe` (merges): byte-level BPE, no prefix space, `<|endoftext|>` as
/// the special token. This is how `data/tokenizer.json` was made.
pub fn build_gpt2_tokenizer(vocab_json: &str, merges_txt: &str) -> Result<String> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper};
    let bad = |p: String| Error::Tokenizer {
        path: vocab_json.to_string(),
        problem: p,
    };
    let bpe = BPE::from_file(vocab_json, merges_txt).build().map_err(|e| {
        bad(format!(
            "cannot build BPE from {vocab_json} and {merges_txt}: {e}"
        ))
    })?;
    let mut tok = Tokenizer::new(bpe);
    let pre = ByteLevel::default().add_prefix_space(false).trim_offsets(true);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(pre)));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tok.with_post_processor(Some(PostProcessorWrapper::ByteLevel(
        ByteLevel::default().add_prefix_space(false).trim_offsets(false),
    )));
    tok.add_special_tokens([AddedToken::from("<|endoftext|>", true)])
        .map_err(|e| bad(e.to_string()))?;
    tok.to_string(false).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<String> {
        let mut memo = FxHashMap::default();
        let mut out = Vec::new();
        for_each_piece(text, &mut memo, |p| out.push(p.to_string()));
        out
    }

    #[test]
    fn pre_tokenizer_follows_the_gpt2_pattern() {
        assert_eq!(pieces("Hello world"), vec!["Hello", " world"]);
        assert_eq!(pieces("don't"), vec!["don", "'t"]);
        assert_eq!(pieces("a  b"), vec!["a", " ", " b"]);
        assert_eq!(pieces("a\n\nThe"), vec!["a", "\n", "\n", "The"]);
        assert_eq!(pieces("x \nY"), vec!["x", " ", "\n", "Y"]);
        assert_eq!(pieces("end.  "), vec!["end", ".", "  "]);
        assert_eq!(pieces("''s !'s"), vec!["''", "s", " !'", "s"]);
        assert_eq!(pieces("I'LL 12ab"), vec!["I", "'", "LL", " 12", "ab"]);
        assert_eq!(pieces("café naïve"), vec!["café", " naïve"]);
        assert_eq!(pieces(" \u{a0}x"), vec![" ", "\u{a0}", "x"]);
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }

    /// Found by the tokenizer fuzz target: a JSON syntax error inside
    /// `decoder` made tokenizers 0.23 panic instead of returning an error.
    #[test]
    fn malformed_decoder_json_is_an_error_naming_the_file() {
        let text = r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,
            "post_processor":null,"decoder":{"type":"Metaspace","replacement":"\u7"},
            "model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#;
        let err = TextTokenizer::from_bytes(text.as_bytes(), "x/tokenizer.json")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("x/tokenizer.json") && err.contains("not JSON") && err.contains("line 2"),
            "{err}"
        );
        // A lone surrogate escape is valid JSON syntax until decoded.
        let lone = text.replace(r"\u7", r"\ud800");
        let err = TextTokenizer::from_bytes(lone.as_bytes(), "x/tokenizer.json")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("not JSON") && err.contains("line 2"), "{err}");
    }
}
