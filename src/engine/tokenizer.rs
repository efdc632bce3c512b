//! The model's tokenizer, built from the GGUF metadata (`tokenizer.ggml.*`) with the
//! `tokenizers` crate, or read from a `tokenizer.json` beside the model.
//!
//! - `gpt2` (byte-level BPE): vocabulary and merges from the file; the pre-tokenizer named by
//!   `tokenizer.ggml.pre` (llama.cpp's names: `smollm` splits single digits first, then the GPT-2
//!   byte-level split; `llama-bpe`/`llama3`, `qwen2` use their own regexes).
//! - `llama` (SentencePiece): pieces and scores as a Unigram model with byte fallback.
//!
//! Control tokens (`token_type` 3) are special: parsed in text, never rendered in output.
//! Decoding goes through a per-token byte table, so a stream can be decoded token by token.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value as Json};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

use crate::gguf::{Gguf, GgufError, Value};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model {0:?} (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("tokenizer metadata: {0}")]
    Bad(String),
    #[error("tokenizer: {0}")]
    Library(String),
}

const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// llama.cpp's pre-tokenizer regexes, by `tokenizer.ggml.pre` name.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// As llama.cpp does: control tokens that end a turn in common chat formats.
const END_TEXTS: [&str; 8] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Bytes each token stands for in output (empty for control tokens).
    pieces: Table,
    /// Text of each token as stored (for special-token lookups).
    texts: Table,
    special: Vec<bool>,
    /// Control tokens by their text, longest first, for [`Tokenizer::encode_marked`].
    controls: Vec<(String, u32)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end a generation.
    pub eog: Vec<u32>,
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.pieces.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF model; a `tokenizer.json` in `dir`, when given and present,
    /// takes precedence for encoding.
    pub fn from_gguf(g: &Gguf, dir: Option<&Path>) -> Result<Tokenizer, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?.to_string();
        let tokens: Vec<String> = strings(g.get_array("tokenizer.ggml.tokens")?, "tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::Bad("tokenizer.ggml.tokens is empty".into()));
        }
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_i64().unwrap_or(TYPE_NORMAL))
                .collect(),
            _ => vec![TYPE_NORMAL; n],
        };
        if types.len() != n {
            return Err(TokenizerError::Bad(format!(
                "{} token types for {} tokens",
                types.len(),
                n
            )));
        }
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match g.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                    _ => Err(TokenizerError::Bad(format!(
                        "{key} = {v:?} is not a token id below {n}"
                    ))),
                },
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        let special: Vec<bool> = types.iter().map(|&t| t == TYPE_CONTROL).collect();

        // A byte-level BPE's vocabulary and merges (150,000 of each on Qwen2.5) go to the
        // library as a model built here (its merges: `bpe`): through its JSON they took a third
        // of the load.
        let mut bpe = None;
        let (inner_json, pieces) = match model.as_str() {
            "gpt2" => {
                let merges = match g.get("tokenizer.ggml.merges") {
                    Some(Value::Array(a)) => a,
                    _ => return Err(TokenizerError::Bad("gpt2 tokenizer without merges".into())),
                };
                let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
                bpe = Some(merges);
                (gpt2_json(pre), byte_level_pieces(&tokens, &types))
            }
            "llama" => {
                let scores: Vec<f64> = match g.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                    _ => vec![0.0; n],
                };
                let add_space = match g.get("tokenizer.ggml.add_space_prefix") {
                    Some(Value::Bool(b)) => *b,
                    _ => true,
                };
                let unk = id("tokenizer.ggml.unknown_token_id")?.unwrap_or(0);
                (
                    spm_json(&tokens, &scores, unk, add_space),
                    spm_pieces(&tokens, &types),
                )
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let inner = match dir
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file())
        {
            Some(p) => tokenizers::Tokenizer::from_file(&p)
                .map_err(|e| TokenizerError::Library(format!("{}: {e}", p.display())))?,
            None => {
                let mut t = inner_json
                    .to_string()
                    .parse::<tokenizers::Tokenizer>()
                    .map_err(|e| TokenizerError::Library(e.to_string()))?;
                if let Some(merges) = bpe {
                    t.with_model(bpe_model(&tokens, merges)?);
                }
                // After the model, as the library's own reader does: each added token keeps
                // the model's id for its text.
                t.add_tokens(&added_tokens(&tokens, &types));
                t
            }
        };

        let mut eog: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(t) = id(key)? {
                eog.push(t);
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if special[i] && END_TEXTS.contains(&t.as_str()) && !eog.contains(&(i as u32)) {
                eog.push(i as u32);
            }
        }
        Ok(Tokenizer {
            inner,
            pieces: Table::new(&pieces),
            controls: controls(&tokens, &special),
            texts: Table::new(&tokens),
            special,
            bos,
            eos,
            eog,
            add_bos,
        })
    }

    /// Reads a Hugging Face `tokenizer.json` (byte-level BPE) for a model that carries no GGUF
    /// metadata, such as an ONNX folder; special tokens are its added tokens marked `special`.
    /// `bos` and `eos` come from the model's config; the usual end-of-turn tokens end generation
    /// too, as for GGUF models.
    pub fn from_json(
        path: &Path,
        bos: Option<u32>,
        eos: &[u32],
    ) -> Result<Tokenizer, TokenizerError> {
        let lib = |e: String| TokenizerError::Library(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| lib(e.to_string()))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| lib(e.to_string()))?;
        let kind = json["model"]["type"].as_str().unwrap_or("?");
        let byte_level = json["decoder"]["type"] == "ByteLevel"
            || json["pre_tokenizer"].to_string().contains("ByteLevel");
        if kind != "BPE" || !byte_level {
            return Err(TokenizerError::UnsupportedModel(format!(
                "{kind} in {} (supported: byte-level BPE)",
                path.display()
            )));
        }
        let inner = text
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| lib(e.to_string()))?;
        let vocab = inner.get_vocab(true);
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n == 0 {
            return Err(lib("empty vocabulary".into()));
        }
        let mut tokens = vec![String::new(); n];
        for (t, &i) in &vocab {
            tokens[i as usize] = t.clone();
        }
        let mut types = vec![TYPE_NORMAL; n];
        if let Some(added) = json["added_tokens"].as_array() {
            for a in added {
                if let Some(i) = a["id"].as_u64().filter(|&i| (i as usize) < n) {
                    types[i as usize] = if a["special"] == true {
                        TYPE_CONTROL
                    } else {
                        TYPE_USER
                    };
                }
            }
        }
        let check = |id: u32| -> Result<u32, TokenizerError> {
            if (id as usize) < n {
                Ok(id)
            } else {
                Err(TokenizerError::Bad(format!(
                    "special token id {id} is outside the vocabulary of {n}"
                )))
            }
        };
        let bos = bos.map(check).transpose()?;
        let mut eog: Vec<u32> = eos.iter().map(|&e| check(e)).collect::<Result<_, _>>()?;
        let special: Vec<bool> = types.iter().map(|&t| t == TYPE_CONTROL).collect();
        for (i, t) in tokens.iter().enumerate() {
            if special[i] && END_TEXTS.contains(&t.as_str()) && !eog.contains(&(i as u32)) {
                eog.push(i as u32);
            }
        }
        Ok(Tokenizer {
            inner,
            pieces: Table::new(&byte_level_pieces(&tokens, &types)),
            controls: controls(&tokens, &special),
            texts: Table::new(&tokens),
            special,
            bos,
            eos: eos.first().copied(),
            eog,
            add_bos: false,
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (what `export-onnx` writes beside the
    /// graph).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(true)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    pub fn n_vocab(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids of `text`, special tokens parsed (as `llama-tokenize --ids` with parse_special).
    /// BOS is not added here; see [`Tokenizer::encode_prompt`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` where control tokens are parsed only outside `content` (byte ranges, in
    /// order): chat content is text, whatever it spells. Also the byte offset in `text` where
    /// each token starts. `stop` is asked between sections of text; `None` when it said stop.
    /// With `prompt` (the text starts a prompt) BOS comes first when the model asks for it.
    pub fn encode_marked(
        &mut self,
        text: &str,
        content: &[std::ops::Range<usize>],
        prompt: bool,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Marked>, TokenizerError> {
        // Sections: text between the control tokens found outside content.
        let mut cuts: Vec<(usize, usize, u32)> = Vec::new();
        let mut structure = Vec::with_capacity(content.len() + 1);
        let mut at = 0;
        for r in content {
            if r.start > at {
                structure.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < text.len() {
            structure.push(at..text.len());
        }
        let bytes = text.as_bytes();
        for r in structure {
            let mut p = r.start;
            while p < r.end {
                let hit = self.controls.iter().find(|(t, _)| {
                    bytes[p] == t.as_bytes()[0]
                        && p + t.len() <= r.end
                        && &bytes[p..p + t.len()] == t.as_bytes()
                });
                match hit {
                    Some((t, id)) => {
                        cuts.push((p, p + t.len(), *id));
                        p += t.len();
                    }
                    None => p += 1,
                }
            }
        }
        self.inner.set_encode_special_tokens(true);
        let out = self.encode_sections(text, &cuts, stop);
        self.inner.set_encode_special_tokens(false);
        let Some((mut ids, mut starts)) = out? else {
            return Ok(None);
        };
        if let Some(b) = self.missing_bos(&ids).filter(|_| prompt) {
            ids.insert(0, b);
            starts.insert(0, 0);
        }
        Ok(Some((ids, starts)))
    }

    fn encode_sections(
        &self,
        text: &str,
        cuts: &[(usize, usize, u32)],
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Marked>, TokenizerError> {
        let mut ids = Vec::new();
        let mut starts = Vec::new();
        let mut at = 0;
        let ends =
            cuts.iter()
                .map(|&(s, e, id)| (s, e, Some(id)))
                .chain([(text.len(), text.len(), None)]);
        for (s, e, id) in ends {
            if s > at {
                if stop() {
                    return Ok(None);
                }
                // Cuts fall on the ASCII bytes of control tokens' texts, or the end: char
                // boundaries, so the slice is whole text.
                let part = text.get(at..s).unwrap_or_default();
                let enc = self
                    .inner
                    .encode(part, false)
                    .map_err(|e| TokenizerError::Library(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
                starts.extend(enc.get_offsets().iter().map(|&(o, _)| at + o));
            }
            if let Some(id) = id {
                ids.push(id);
                starts.push(s);
            }
            at = e;
        }
        Ok(Some((ids, starts)))
    }

    /// Ids of a prompt, with BOS first when the model asks for it and the text lacks it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text)?;
        if let Some(b) = self.missing_bos(&ids) {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    /// The BOS a prompt starting with `ids` lacks, when the model asks for one.
    fn missing_bos(&self, ids: &[u32]) -> Option<u32> {
        self.bos
            .filter(|&b| self.add_bos && ids.first() != Some(&b))
    }

    /// Bytes the token stands for in output text (empty for control tokens).
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).unwrap_or(&[])
    }

    /// The token's text as stored in the vocabulary.
    pub fn text(&self, id: u32) -> Option<&str> {
        // Every entry was a `String`.
        self.texts
            .get(id as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Text of a sequence of tokens (control tokens omitted, invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Byte strings, one per token, in one allocation: a vocabulary of 151,936 tokens as
/// `Vec<Vec<u8>>` takes 8.5 MiB in headers and allocator overhead, this 1.2 MiB plus the bytes.
struct Table {
    bytes: Vec<u8>,
    /// End of entry i in `bytes` (its start is the end of entry i - 1).
    ends: Vec<usize>,
}

impl Table {
    fn new<S: AsRef<[u8]>>(items: &[S]) -> Table {
        let mut bytes = Vec::with_capacity(items.iter().map(|s| s.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(items.len());
        for s in items {
            bytes.extend_from_slice(s.as_ref());
            ends.push(bytes.len());
        }
        Table { bytes, ends }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }
}

/// Token ids, and the byte offset in the text where each starts.
pub type Marked = (Vec<u32>, Vec<usize>);

/// Control tokens with a text, longest first (the longest match wins where texts overlap).
fn controls(texts: &[String], special: &[bool]) -> Vec<(String, u32)> {
    let mut c: Vec<(String, u32)> = texts
        .iter()
        .zip(special)
        .enumerate()
        .filter(|(_, (t, &s))| s && !t.is_empty())
        .map(|(i, (t, _))| (t.clone(), i as u32))
        .collect();
    c.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    c
}

fn strings(a: &[Value], what: &str) -> Result<Vec<String>, TokenizerError> {
    a.iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(TokenizerError::Bad(format!(
                "tokenizer {what}: element of type {}",
                other.type_name()
            ))),
        })
        .collect()
}

/// The byte-level BPE model of a GGUF's `tokens` and `merges` ("left right" strings, in
/// rank order), as the library reads them from a `tokenizer.json`.
fn bpe_model(tokens: &[String], merges: &[Value]) -> Result<BPE, TokenizerError> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for (rank, m) in merges.iter().enumerate() {
        let Value::String(m) = m else {
            return Err(TokenizerError::Bad(format!(
                "tokenizer merges: element {rank} of type {}",
                m.type_name()
            )));
        };
        if m.starts_with("#version") {
            continue;
        }
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => pairs.push((a.to_string(), b.to_string())),
            _ => {
                return Err(TokenizerError::Bad(format!(
                    "tokenizer merges: element {rank} ({m:?}) is not two pieces and a space"
                )))
            }
        }
    }
    BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| TokenizerError::Library(e.to_string()))
}

/// The special and user-defined tokens, which the tokenizer matches whole before splitting.
fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == TYPE_CONTROL || t == TYPE_USER)
        .map(|(s, &t)| {
            AddedToken::from(s.clone(), t == TYPE_CONTROL)
                .single_word(false)
                .lstrip(false)
                .rstrip(false)
                .normalized(false)
        })
        .collect()
}

/// A byte-level BPE tokenizer with GGUF pre-tokenizer `pre`, the model (vocabulary and merges)
/// and the added tokens left empty: [`bpe_model`] and [`added_tokens`] give them.
fn gpt2_json(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        "default" | "gpt2" | "gpt-2" => {
            json!({"type": "Sequence", "pretokenizers": [split(GPT2_SPLIT), byte_level(false)]})
        }
        other => {
            tracing::warn!(pre = other, "unknown pre-tokenizer, using the GPT-2 split");
            json!({"type": "Sequence", "pretokenizers": [split(GPT2_SPLIT), byte_level(false)]})
        }
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {}, "merges": [],
        }
    })
}

/// A SentencePiece (Unigram) tokenizer; its added tokens come after, from [`added_tokens`].
fn spm_json(tokens: &[String], scores: &[f64], unk: u32, add_space: bool) -> Json {
    let vocab: Vec<Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| json!([t, scores.get(i).copied().unwrap_or(0.0)]))
        .collect();
    let mut norms =
        vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    if add_space {
        norms.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": norms},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true}
    })
}

/// GPT-2's byte → printable character table (the alphabet of byte-level BPE vocabularies):
/// bytes that are printable map to themselves, the others to U+0100 onwards in order.
pub fn byte_level_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    out
}

fn byte_decoder() -> HashMap<char, u8> {
    byte_level_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

fn byte_level_pieces(tokens: &[String], types: &[i64]) -> Vec<Vec<u8>> {
    let dec = byte_decoder();
    tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match ty {
            TYPE_CONTROL => Vec::new(),
            TYPE_USER => t.as_bytes().to_vec(),
            _ => {
                let mut out = Vec::with_capacity(t.len());
                for ch in t.chars() {
                    match dec.get(&ch) {
                        Some(&b) => out.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            }
        })
        .collect()
}

fn spm_pieces(tokens: &[String], types: &[i64]) -> Vec<Vec<u8>> {
    tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match ty {
            TYPE_CONTROL => Vec::new(),
            TYPE_BYTE => {
                let hex = t.trim_start_matches("<0x").trim_end_matches('>');
                u8::from_str_radix(hex, 16)
                    .map(|b| vec![b])
                    .unwrap_or_default()
            }
            _ => t.replace('\u{2581}', " ").into_bytes(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<Value> {
        v.iter().map(|s| Value::String(s.to_string())).collect()
    }

    /// Merges go to the library as pairs, in rank order; one that is not two pieces and a
    /// space, or not a string, is named in the error, not dropped.
    #[test]
    fn bpe_merges_are_pairs_or_named_errors() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc"].map(String::from).to_vec();
        let m = bpe_model(&tokens, &strs(&["#version: 0.2", "a b", "ab c"])).expect("model");
        let ids: Vec<u32> = tokenizers::Model::tokenize(&m, "abc")
            .expect("tokenize")
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [4]);
        // Rank decides: with "b c" first, "a" stays alone.
        let tokens2: Vec<String> = ["a", "b", "c", "ab", "bc"].map(String::from).to_vec();
        let m = bpe_model(&tokens2, &strs(&["b c", "a b"])).expect("model");
        let ids: Vec<u32> = tokenizers::Model::tokenize(&m, "abc")
            .expect("tokenize")
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [0, 4]);
        for (bad, says) in [
            (strs(&["a b", "ab c d"]), "element 1"),
            (strs(&["abc"]), "element 0"),
            (vec![Value::U32(7)], "element 0 of type"),
        ] {
            match bpe_model(&tokens, &bad) {
                Err(TokenizerError::Bad(e)) => assert!(e.contains(says), "{e}"),
                other => panic!("{bad:?}: {:?}", other.map(|_| ())),
            }
        }
        // A merge of pieces the vocabulary lacks is the library's error.
        assert!(bpe_model(&tokens, &strs(&["x y"])).is_err());
    }
}
