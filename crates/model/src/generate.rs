//! Batched sampling: prompts left-padded into one batch, one prefill, then one token per step
//! for every row over a preallocated KV cache, until each row hits EOS, a stop string or the
//! token budget.

use prefloop_core::Finish;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::llama::KvCache;
use crate::load::Model;

/// How to sample. Defaults are the paper's rollout settings (temperature 1, top-k 200).
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1: no limit).
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Generation stops once the completion contains one of these; it is cut before it.
    pub stop: Vec<String>,
    /// Keep sampling past EOS (benchmarks, which need a fixed number of tokens).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 200,
            top_p: 1.0,
            max_new_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            max_new_tokens,
            ..Self::default()
        }
    }
}

/// One prompt to complete. Each row draws from its own RNG seeded with `seed`, so a sample
/// does not depend on which other prompts share its batch (up to float noise of batching).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

/// One completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    /// log π(token | prefix) under the model's own distribution (temperature 1, no top-k/p),
    /// one per token: what PPO and DPO need as the sampling policy's log-probs.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
    /// The end-of-sequence token the policy sampled to finish (`finish` is Stop), not in
    /// `tokens`; None when it ran out of budget or a stop string ended it.
    pub eos: Option<u32>,
}

/// How many trailing tokens are decoded to look for a stop string.
const STOP_WINDOW: usize = 16;

/// Samples one completion for each prompt (token ids) in one batch.
pub fn generate(
    model: &Model,
    requests: &[Request],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let device = model.vs.device();
    tch::no_grad(|| run(model, requests, params, device))
}

fn run(
    model: &Model,
    requests: &[Request],
    params: &SamplingParams,
    device: Device,
) -> Result<Vec<Generation>> {
    let batch = requests.len();
    let prompts: Vec<&[u32]> = requests.iter().map(|r| r.prompt.as_slice()).collect();
    let prompt_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
    let capacity = (prompt_len + params.max_new_tokens) as i64;
    let pad = model.tokenizer.pad_id() as i64;
    let eos: Vec<i64> = match params.ignore_eos {
        true => Vec::new(),
        false => model
            .tokenizer
            .eos_ids()
            .iter()
            .map(|&e| e as i64)
            .collect(),
    };

    // Left padding: every row's last prompt token sits at column prompt_len - 1.
    let mut ids = vec![pad; batch * prompt_len];
    let mut valid = vec![false; batch * capacity as usize];
    for (row, prompt) in prompts.iter().enumerate() {
        let start = prompt_len - prompt.len();
        for (j, &tok) in prompt.iter().enumerate() {
            ids[row * prompt_len + start + j] = tok as i64;
            valid[row * capacity as usize + start + j] = true;
        }
    }
    let input = Tensor::from_slice(&ids)
        .view([batch as i64, prompt_len as i64])
        .to_device(device);
    let key_valid = Tensor::from_slice(&valid)
        .view([batch as i64, capacity])
        .to_device(device);
    let prompt_valid = key_valid.narrow(1, 0, prompt_len as i64);
    // Positions count real tokens only, so a padded row sees the same positions as alone.
    let positions = (prompt_valid.cumsum(1, Kind::Int64) - 1).clamp_min(0); // (B, T)
    let mut next_position = positions.select(1, -1) + 1; // (B,)

    let cfg = model.llama.config();
    let mut cache = KvCache::new(cfg, batch as i64, capacity, model.kind(), device);
    let hidden = model
        .llama
        .forward_hidden(&input, &positions, &prompt_valid, Some(&mut cache));
    let mut logits = model
        .llama
        .logits(&hidden.select(1, -1))
        .to_kind(Kind::Float); // (B, V)

    let mut out: Vec<Generation> = (0..batch)
        .map(|_| Generation {
            tokens: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish: Finish::Length,
            eos: None,
        })
        .collect();
    let mut done = vec![false; batch];
    // Our own RNGs, not torch's global one: a seed then gives the same sample whatever else the
    // process runs, on any device.
    let mut rngs: Vec<StdRng> = requests
        .iter()
        .map(|r| StdRng::seed_from_u64(r.seed))
        .collect();
    for step in 0..params.max_new_tokens {
        let uniform: Vec<f32> = rngs.iter_mut().map(|rng| rng.random::<f32>()).collect();
        let next = sample(
            &logits,
            params,
            &Tensor::from_slice(&uniform).to_device(device),
        ); // (B,)
        let logprob = logits
            .log_softmax(-1, Kind::Float)
            .gather(1, &next.unsqueeze(1), false)
            .squeeze_dim(1);
        let next_host: Vec<i64> = Vec::try_from(&next.to_device(Device::Cpu))?;
        let logprob_host: Vec<f32> = Vec::try_from(&logprob.to_device(Device::Cpu))?;
        for row in 0..batch {
            if done[row] {
                continue;
            }
            let tok = next_host[row];
            if eos.contains(&tok) {
                out[row].finish = Finish::Stop;
                out[row].eos = Some(tok as u32);
                done[row] = true;
                continue;
            }
            out[row].tokens.push(tok as u32);
            out[row].logprobs.push(logprob_host[row]);
            if !params.stop.is_empty() && hits_stop(model, &out[row].tokens, &params.stop)? {
                out[row].finish = Finish::Stop;
                done[row] = true;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        // Finished rows keep running on padding; their outputs are ignored.
        let fed: Vec<i64> = (0..batch)
            .map(|r| if done[r] { pad } else { next_host[r] })
            .collect();
        let input = Tensor::from_slice(&fed)
            .view([batch as i64, 1])
            .to_device(device);
        let _ = key_valid.narrow(1, cache.len(), 1).fill_(1);
        let valid_so_far = key_valid.narrow(1, 0, cache.len() + 1);
        let hidden = model.llama.forward_hidden(
            &input,
            &next_position.unsqueeze(1),
            &valid_so_far,
            Some(&mut cache),
        );
        logits = model
            .llama
            .logits(&hidden.select(1, 0))
            .to_kind(Kind::Float);
        next_position += 1;
    }
    for generation in &mut out {
        let mut text = model.tokenizer.decode(&generation.tokens)?;
        if let Some(cut) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        generation.text = text;
    }
    Ok(out)
}

fn hits_stop(model: &Model, tokens: &[u32], stop: &[String]) -> Result<bool> {
    let tail = &tokens[tokens.len().saturating_sub(STOP_WINDOW)..];
    let text = model.tokenizer.decode(tail)?;
    Ok(stop.iter().any(|s| text.contains(s.as_str())))
}

/// Next token per row from logits (B, V): greedy, or temperature / top-k / top-p sampling by
/// inverting each row's CDF at `uniform` (B,), draws in [0, 1).
fn sample(logits: &Tensor, params: &SamplingParams, uniform: &Tensor) -> Tensor {
    if params.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let mut scores = logits / params.temperature;
    let vocab = scores.size()[1];
    if params.top_k > 0 && params.top_k < vocab {
        let (top, _) = scores.topk(params.top_k, -1, true, true);
        let kth = top.narrow(1, params.top_k - 1, 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if params.top_p < 1.0 {
        let (sorted, order) = scores.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token once the mass before it already reaches p (the first always stays).
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.gt(params.top_p);
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        scores = scores.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let cdf = scores.softmax(-1, Kind::Float).cumsum(-1, Kind::Float); // (B, V)
    let total = cdf.narrow(1, vocab - 1, 1); // ≈ 1: the CDF's own end
    let target = uniform.unsqueeze(1) * total; // (B, 1)
    target
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .squeeze_dim(1)
        .clamp_max(vocab - 1)
}
