//! Decoding with a KV cache: greedy or sampled continuation of token ids, and the cached
//! workloads (prefill, decode steps, whole generations) the latency profiler times.

use super::modules::KvCache;
use super::Llama;
use crate::error::{Error, Result};
use crate::model::{Masks, Workload};
use tch::{Kind, Tensor};

impl Llama {
    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let options = (self.embed_tokens.kind(), self.embed_tokens.device());
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.attention.as_ref().map(|a| {
                        let shape = [batch, a.self_attn.kv_heads, capacity, self.cfg.head_dim()];
                        (Tensor::zeros(shape, options), Tensor::zeros(shape, options))
                    })
                })
                .collect(),
        }
    }

    /// Greedy continuation of `prompt` by up to `new_tokens` tokens (stops after `eos`).
    pub fn generate(&self, prompt: &[i64], new_tokens: usize, eos: Option<i64>) -> Vec<i64> {
        let device = self.vs.device();
        let prompt_ids = Tensor::from_slice(prompt).view([1, -1]).to_device(device);
        // One row stops right after its end of text, as a chat would.
        let ids = self.continue_tokens(&prompt_ids, new_tokens as i64, 0.0, eos);
        let generated = ids.size()[1] - prompt.len() as i64;
        Vec::try_from(ids.select(0, 0).narrow(0, prompt.len() as i64, generated))
            .expect("token ids are i64 on the host")
    }

    /// `prompts` `[batch, prompt]` (i64) continued by up to `new_tokens` tokens each through the
    /// KV cache: greedy at `temperature` 0, else sampled from `softmax(logits / temperature)`
    /// by the global (seeded) generator. Stops early once every row has produced `eos`.
    /// Returns `[batch, prompt + generated]`, prompts included.
    pub fn continue_tokens(
        &self,
        prompts: &Tensor,
        new_tokens: i64,
        temperature: f64,
        eos: Option<i64>,
    ) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (batch, prompt) = prompts.size2().expect("prompts are [batch, prompt]");
        let masks = Masks::none(self.groups.len());
        let cache = self.new_cache(batch, prompt + new_tokens);
        let mut ids = prompts.shallow_clone();
        let mut pieces = vec![prompts.shallow_clone()];
        let mut ended = Tensor::zeros([batch], (Kind::Bool, prompts.device()));
        let mut position = 0;
        for _ in 0..new_tokens {
            let h = self.hidden_states(&ids, &masks, Some((&cache, position)));
            position += ids.size()[1];
            let last = self
                .logits(&h.narrow(1, h.size()[1] - 1, 1))
                .select(1, 0)
                .to_kind(Kind::Float);
            let next = if temperature > 0.0 {
                (last / temperature)
                    .softmax(-1, Kind::Float)
                    .multinomial(1, true)
            } else {
                last.argmax(-1, true)
            };
            pieces.push(next.shallow_clone());
            ids = next;
            if let Some(eos) = eos {
                ended = ended.logical_or(&ids.select(1, 0).eq(eos));
                // A host read per token: only where a caller asked to stop at the end of text.
                if ended.all().int64_value(&[]) == 1 {
                    break;
                }
            }
        }
        Tensor::cat(&pieces, 1)
    }

    /// The closure that runs `workload` once through the KV cache (see
    /// `Family::cached_workload`).
    pub(super) fn cached_workload_run(
        &self,
        workload: Workload,
    ) -> Result<Box<dyn FnMut() -> Tensor + '_>> {
        let (batch, prompt, steps, prefill) = match workload {
            Workload::Prefill { batch, tokens } => (batch, tokens, 0, true),
            Workload::Decode { batch, context } => (batch, context, 1, false),
            Workload::Generate {
                batch,
                prompt,
                new_tokens,
            } => (batch, prompt, new_tokens, true),
            Workload::Forward { .. } => {
                return Err(Error::Invalid(
                    "a forward workload runs without a cache".into(),
                ))
            }
        };
        let cache = self.new_cache(batch, prompt + steps);
        if !prefill {
            // A decoding step reads what a prefill would have cached: random, never zeros.
            for (k, v) in cache.layers.iter().flatten() {
                let _ = k.shallow_clone().normal_(0.0, 1.0);
                let _ = v.shallow_clone().normal_(0.0, 1.0);
            }
        }
        let device = self.vs.device();
        let vocab = self.cfg.vocab_size;
        let prompt_ids = Tensor::randint(vocab, [batch, prompt], (Kind::Int64, device));
        let step_ids = Tensor::randint(vocab, [batch, 1], (Kind::Int64, device));
        let masks = Masks::none(self.groups.len());
        Ok(Box::new(move || {
            let mut logits = Tensor::new();
            if prefill {
                // A generation prefill needs the last position's logits only.
                let h = self.hidden_states(&prompt_ids, &masks, Some((&cache, 0)));
                logits = self.logits(&h.narrow(1, prompt - 1, 1));
            }
            for step in 0..steps {
                logits = self.forward_cached(&step_ids, &masks, Some((&cache, prompt + step)));
            }
            logits
        }))
    }
}
