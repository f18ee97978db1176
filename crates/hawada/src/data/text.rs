//! Text corpora (a folder of `.txt` documents) tokenised into fixed-length sequences for
//! next-token prediction, and the tokenizer: an HF `tokenizer.json`, or the byte-level BPE
//! embedded in a GGUF file, rebuilt with the `tokenizers` crate.

use super::{Examples, Metric};
use crate::error::{Error, Result};
use crate::io::gguf::{Gguf, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior::Isolated;
use tokenizers::{AddedToken, Tokenizer};

fn tokenizer_error(file: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Data {
        file: file.to_path_buf(),
        reason: format!("tokenizer: {reason}"),
    }
}

/// The pre-tokenizer split of `tokenizer.ggml.pre = qwen2` (llama.cpp `llama-vocab.cpp`, Qwen2's
/// tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The GGUF's `gpt2`-style byte-level BPE (`tokenizer.ggml.tokens` + `.merges`) as a
/// `tokenizers` tokenizer. Control tokens (type 3, e.g. `<|im_start|>`) are special tokens,
/// never split. The `smollm` and `gpt2` pre-tokenizers differ only in splitting digits one by one.
pub fn tokenizer_from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
    let file = gguf.file();
    let model = gguf.get("tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" {
        return Err(tokenizer_error(
            file,
            format!("model `{model}`; only byte-level BPE (`gpt2`) is supported"),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        gguf.get(key)?
            .as_array()
            .ok_or_else(|| Error::config(file, key, "expected an array of strings"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::config(file, key, "expected strings"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tokenizer_error(file, format!("merge `{m}` is not `a b`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tokenizer_error(file, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = gguf
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str);
    let split_digits = pre.is_some_and(|pre| pre != "gpt2");
    let byte_level = ByteLevel::new(false, true, true);
    if pre == Some("qwen2") {
        // Qwen2's tokenizer.json: its own split regex, then byte-level without GPT-2's regex.
        let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), Isolated, false)
            .map_err(|e| tokenizer_error(file, e))?;
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
    } else if split_digits {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.into(),
        ])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let types = gguf
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .unwrap_or(&[]);
    let special: Vec<AddedToken> = types
        .iter()
        .zip(&tokens)
        .filter(|(t, _)| t.as_i64() == Some(3))
        .map(|(_, tok)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| tokenizer_error(file, e))?;
    Ok(tokenizer)
}

/// A language model's tokenizer and its end-of-text token id.
pub struct Vocabulary {
    pub tokenizer: Tokenizer,
    pub eos: Option<i64>,
}

/// The vocabulary of a model, each file read once: from a GGUF file (its BPE and
/// `tokenizer.ggml.eos_token_id`), from an HF directory (`tokenizer.json` and `config.json`'s
/// `eos_token_id`, the first when it is a list), or from a bare `tokenizer.json` (no end of text).
pub fn load_vocabulary(model: &Path) -> Result<Vocabulary> {
    if model.extension().is_some_and(|e| e == "gguf") {
        let gguf = Gguf::open(model)?;
        return Ok(Vocabulary {
            tokenizer: tokenizer_from_gguf(&gguf)?,
            eos: gguf
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(Value::as_i64),
        });
    }
    if model.extension().is_some_and(|e| e == "json") {
        let tokenizer = Tokenizer::from_file(model).map_err(|e| tokenizer_error(model, e))?;
        return Ok(Vocabulary {
            tokenizer,
            eos: None,
        });
    }
    let file = model.join("tokenizer.json");
    if !file.exists() {
        return Err(tokenizer_error(
            &file,
            "missing; a language model directory needs its tokenizer.json",
        ));
    }
    let tokenizer = Tokenizer::from_file(&file).map_err(|e| tokenizer_error(&file, e))?;
    let config = crate::io::json::read_value(&model.join("config.json"))?;
    let eos = match config.get("eos_token_id") {
        Some(serde_json::Value::Array(ids)) => ids.first().and_then(|v| v.as_i64()),
        Some(v) => v.as_i64(),
        None => None,
    };
    Ok(Vocabulary { tokenizer, eos })
}

/// Sequences of `seq_len + 1` token ids `[n, seq_len + 1]` (i64): inputs are the first
/// `seq_len`, targets the last `seq_len` (next-token prediction). Sequences are cut from the
/// documents concatenated in order, each document ending with the end-of-text token.
pub struct TextDataset {
    pub sequences: Tensor,
}

impl TextDataset {
    /// Tokenises every `.txt` in `dir` (name order) and returns `(train, test)`: the last
    /// `test_documents` documents form the test split.
    pub fn load_dir(
        dir: &Path,
        tokenizer: &Tokenizer,
        seq_len: i64,
        test_documents: usize,
        eos: Option<i64>,
        device: Device,
    ) -> Result<(TextDataset, TextDataset)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        if files.len() <= test_documents {
            return Err(Error::Data {
                file: dir.to_path_buf(),
                reason: format!(
                    "{} .txt documents; need more than the {test_documents} held out for test",
                    files.len()
                ),
            });
        }
        let split = files.len() - test_documents;
        let stream = |files: &[PathBuf]| -> Result<Vec<i64>> {
            let mut ids = Vec::new();
            for file in files {
                let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
                let encoding = tokenizer
                    .encode(text.as_str(), false)
                    .map_err(|e| tokenizer_error(file, e))?;
                ids.extend(encoding.get_ids().iter().map(|&i| i as i64));
                ids.extend(eos);
            }
            Ok(ids)
        };
        let train = Self::from_stream(&stream(&files[..split])?, seq_len, device);
        let test = Self::from_stream(&stream(&files[split..])?, seq_len, device);
        for (name, part) in [("train", &train), ("test", &test)] {
            if part.is_empty() {
                return Err(Error::Data {
                    file: dir.to_path_buf(),
                    reason: format!("the {name} split holds fewer than {} tokens", seq_len + 1),
                });
            }
        }
        tracing::info!(
            train_sequences = train.len(),
            test_sequences = test.len(),
            seq_len,
            "text corpus tokenised"
        );
        Ok((train, test))
    }

    /// Non-overlapping windows of `seq_len + 1` tokens (consecutive windows share no token).
    pub fn from_stream(ids: &[i64], seq_len: i64, device: Device) -> TextDataset {
        let window = (seq_len + 1) as usize;
        let n = ids.len() / window;
        TextDataset {
            sequences: Tensor::from_slice(&ids[..n * window])
                .view([n as i64, window as i64])
                .to_device(device),
        }
    }

    /// Sequences `[start, start + n)` (a view).
    pub fn slice(&self, start: i64, n: i64) -> TextDataset {
        let n = n.min(self.len() - start).max(0);
        TextDataset {
            sequences: self.sequences.narrow(0, start, n),
        }
    }

    /// These sequences followed by `other`'s (same length; a copy).
    pub fn concat(&self, other: &TextDataset) -> TextDataset {
        TextDataset {
            sequences: Tensor::cat(&[&self.sequences, &other.sequences], 0),
        }
    }

    fn split_targets(rows: Tensor) -> (Tensor, Tensor) {
        let width = rows.size()[1];
        (rows.narrow(1, 0, width - 1), rows.narrow(1, 1, width - 1))
    }
}

impl Examples for TextDataset {
    fn len(&self) -> i64 {
        self.sequences.size()[0]
    }

    fn random_batch(&self, batch: i64, _kind: Kind) -> (Tensor, Tensor) {
        let idx = Tensor::randint(self.len(), [batch], (Kind::Int64, self.sequences.device()));
        Self::split_targets(self.sequences.index_select(0, &idx))
    }

    fn batches(&self, batch: i64, _kind: Kind) -> Box<dyn Iterator<Item = (Tensor, Tensor)> + '_> {
        let n = self.len();
        Box::new((0..n).step_by(batch.max(1) as usize).map(move |start| {
            Self::split_targets(self.sequences.narrow(0, start, batch.min(n - start)))
        }))
    }

    fn metric(&self) -> Metric {
        Metric::Perplexity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_give_next_token_targets() {
        let ids: Vec<i64> = (0..11).collect();
        let data = TextDataset::from_stream(&ids, 4, Device::Cpu);
        assert_eq!(data.len(), 2);
        let (x, y) = data.batches(2, Kind::Float).next().unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&x.flatten(0, -1)).unwrap(),
            vec![0, 1, 2, 3, 5, 6, 7, 8]
        );
        assert_eq!(
            Vec::<i64>::try_from(&y.flatten(0, -1)).unwrap(),
            vec![1, 2, 3, 4, 6, 7, 8, 9]
        );
    }
}
