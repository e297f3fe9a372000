//! CLIP tokenizers from a diffusers `tokenizer/` folder, with the `tokenizers` crate.
//!
//! `tokenizer.json` is used when present. Otherwise the same pipeline the fast tokenizer
//! serializes is built from `vocab.json` + `merges.txt`: NFC, whitespace runs -> one space,
//! lowercase; the CLIP pre-tokenization regex split then byte-level mapping; BPE with the `</w>`
//! end-of-word suffix; `<|startoftext|>` ... `<|endoftext|>` around the text. Truncation to
//! `model_max_length` (77) keeps the eos last; padding uses the configured pad token
//! (`tokenizer_config.json` / `special_tokens_map.json`: `<|endoftext|>` for SD1.5, `!` for SD2.1
//! and SDXL's second tokenizer).
//!
//! Deliberate difference from transformers' *slow* `CLIPTokenizer`: the slow one runs
//! `ftfy.fix_text` and HTML unescaping before BPE, the fast one (`tokenizer.json`) does not. We
//! match the fast tokenizer on every prompt, so text with HTML entities or ligatures
//! (e.g. `&amp;`, `ﬁ`) tokenizes as CLIPTokenizerFast does, which may differ from the slow one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenization pattern (the fast tokenizer's `Split` regex).
pub const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LEN: usize = 77;

/// Which files the tokenizer was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    TokenizerJson(PathBuf),
    VocabMerges { vocab: PathBuf, merges: PathBuf },
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_token: String,
    source: TokenizerSource,
    dir: PathBuf,
}

/// Special tokens and lengths from `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Default)]
struct SpecialConfig {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    max_length: Option<usize>,
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(Some(v))
}

impl SpecialConfig {
    fn read(dir: &Path) -> Result<Self> {
        let mut cfg = SpecialConfig::default();
        // special_tokens_map first, tokenizer_config overrides (transformers' precedence).
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let Some(v) = read_json(&dir.join(name))? else {
                continue;
            };
            let get = |k: &str| v.get(k).and_then(token_content);
            cfg.bos = get("bos_token").or(cfg.bos);
            cfg.eos = get("eos_token").or(cfg.eos);
            cfg.pad = get("pad_token").or(cfg.pad);
            cfg.unk = get("unk_token").or(cfg.unk);
            if let Some(n) = v.get("model_max_length").and_then(|n| n.as_f64()) {
                // Some configs store a huge sentinel (1e30) meaning "no limit": CLIP's is 77.
                if (1.0..=1e6).contains(&n) {
                    cfg.max_length = Some(n as usize);
                }
            }
        }
        Ok(cfg)
    }
}

/// Parse `merges.txt`: skip the `#version` header and blank lines; each line is `left right`.
fn read_merges(path: &Path, vocab: &Vocab) -> Result<Merges> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut merges = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!(
                "{}: line {}: expected two symbols, got `{line}`",
                path.display(),
                lineno + 1
            );
        };
        // transformers' slow tokenizer keeps only merges whose parts and result are tokens
        // (it cuts the list at 49152-256-2 for the OpenAI file); the fast converter does likewise.
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            merges.push((a.to_string(), b.to_string()));
        }
    }
    Ok(merges)
}

fn build_from_vocab_merges(
    dir: &Path,
    special: &SpecialConfig,
) -> Result<(Tokenizer, TokenizerSource)> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    if !merges_path.is_file() {
        bail!(
            "tokenizer folder {}: no tokenizer.json and no merges.txt (expected {})",
            dir.display(),
            merges_path.display()
        );
    }
    if !vocab_path.is_file() {
        bail!(
            "tokenizer folder {}: no tokenizer.json and no vocab.json (expected {})",
            dir.display(),
            vocab_path.display()
        );
    }
    let text = std::fs::read_to_string(&vocab_path)
        .with_context(|| format!("cannot read {}", vocab_path.display()))?;
    let map: HashMap<String, u32> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON object token -> id",
            vocab_path.display()
        )
    })?;
    let vocab: Vocab = map.into_iter().collect();
    let merges = read_merges(&merges_path, &vocab)?;

    let bos = special.bos.clone().unwrap_or_else(|| DEFAULT_BOS.into());
    let eos = special.eos.clone().unwrap_or_else(|| DEFAULT_EOS.into());
    let unk = special.unk.clone().unwrap_or_else(|| eos.clone());
    let id_of = |t: &str| {
        vocab.get(t).copied().ok_or_else(|| {
            anyhow!(
                "{}: special token `{t}` is not in the vocabulary",
                vocab_path.display()
            )
        })
    };
    let (bos_id, eos_id) = (id_of(&bos)?, id_of(&eos)?);
    // A pad token outside the vocabulary is added as a special token; one inside it (`!`) is not.
    let extra_pad = special.pad.clone().filter(|p| !vocab.contains_key(p));

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(|e| anyhow!("{}: cannot build BPE: {e}", dir.display()))?;

    let mut tok = Tokenizer::new(bpe);
    let normalizer = NormSequence::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| anyhow!("whitespace normalizer: {e}"))?,
        ),
        NormalizerWrapper::Lowercase(Lowercase),
    ]);
    tok.with_normalizer(Some(normalizer));
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| anyhow!("CLIP pre-tokenizer regex: {e}"))?;
    let pre = PreSequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(
        true, true, true,
    )));
    let mut specials = vec![bos.clone(), eos.clone()];
    if let Some(pad) = extra_pad {
        if !specials.contains(&pad) {
            specials.push(pad);
        }
    }
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|t| AddedToken::from(t.clone(), true).normalized(true))
        .collect();
    tok.add_special_tokens(&added);
    Ok((
        tok,
        TokenizerSource::VocabMerges {
            vocab: vocab_path,
            merges: merges_path,
        },
    ))
}

impl ClipTokenizer {
    /// Load the tokenizer in `dir` (a diffusers `tokenizer/` folder).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let special = SpecialConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let (mut inner, source) = if json.is_file() {
            let tok = Tokenizer::from_file(&json)
                .map_err(|e| anyhow!("cannot load {}: {e}", json.display()))?;
            (tok, TokenizerSource::TokenizerJson(json.clone()))
        } else {
            build_from_vocab_merges(dir, &special)?
        };
        let id_of = |tok: &Tokenizer, t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                anyhow!(
                    "tokenizer {}: token `{t}` is not in the vocabulary",
                    dir.display()
                )
            })
        };
        let bos = special.bos.clone().unwrap_or_else(|| DEFAULT_BOS.into());
        let eos = special.eos.clone().unwrap_or_else(|| DEFAULT_EOS.into());
        let pad_token = special
            .pad
            .clone()
            .or_else(|| inner.get_padding().map(|p| p.pad_token.clone()))
            .unwrap_or_else(|| eos.clone());
        let bos_id = id_of(&inner, &bos)?;
        let eos_id = id_of(&inner, &eos)?;
        let pad_id = id_of(&inner, &pad_token)?;
        let max_length = special.max_length.unwrap_or(DEFAULT_MAX_LEN);
        if max_length < 2 {
            bail!(
                "tokenizer {}: model_max_length {max_length} leaves no room for bos/eos",
                dir.display()
            );
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow!("tokenizer {}: truncation: {e}", dir.display()))?;
        Ok(Self {
            inner,
            max_length,
            pad_id,
            bos_id,
            eos_id,
            pad_token,
            source,
            dir: dir.to_path_buf(),
        })
    }

    /// Ids of one prompt: bos, tokens (truncated), eos, then padding to `max_length`.
    pub fn encode_one(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(prompt, true).map_err(|e| {
            anyhow!(
                "tokenizer {}: cannot encode {prompt:?}: {e}",
                self.dir.display()
            )
        })?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_length {
            // Defensive: a post-processor that ignores truncation; keep eos last.
            ids.truncate(self.max_length);
            ids[self.max_length - 1] = self.eos_id;
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Token ids [B, max_length] as i64 on the CPU.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        self.encode_on(prompts, &Device::Cpu)
    }

    pub fn encode_on(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            flat.extend(self.encode_one(p)?.into_iter().map(|i| i as i64));
        }
        Ok(Tensor::from_vec(
            flat,
            (prompts.len(), self.max_length),
            device,
        )?)
    }

    /// Number of tokens of `prompt` before padding (bos and eos included, after truncation).
    pub fn token_count(&self, prompt: &str) -> Result<usize> {
        let enc = self.inner.encode(prompt, true).map_err(|e| {
            anyhow!(
                "tokenizer {}: cannot encode {prompt:?}: {e}",
                self.dir.display()
            )
        })?;
        Ok(enc.get_ids().len().min(self.max_length))
    }

    /// Text of `ids`, special tokens skipped; `</w>` word ends become spaces (as the slow
    /// CLIPTokenizer decodes).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer {}: cannot decode: {e}", self.dir.display()))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
