//! Batched sampling built for throughput. Requests wait in a queue; a fixed number of slots
//! decode together, one token per step for every slot, over a slot cache in which each row
//! has its own length (blocks.rs). Everything a step decides — the token (from uniforms each
//! request drew from its own seeded RNG and uploaded once when it joined), its log-prob, EOS,
//! whether the row is done — stays on the device; the host reads the tokens back every
//! `readback_every` steps (and when every row must be done), checks stop strings on what it
//! read, hands finished rows to the caller, and fills their slots from the queue: the joiners
//! are prefilled together, once per distinct prompt (n samples of a prompt share one prefill,
//! their keys and values copied into n slots). When the queue is empty and half the slots or
//! more are free, the live rows are compacted into fewer slots so the tail decodes a smaller
//! batch. This is continuous batching at the granularity of a readback.
//!
//! A row's completion depends only on its prompt, its seed and the model — not on the batch,
//! the slot it took, when it joined or `readback_every` — up to the float noise of batched
//! matrix products.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use prefloop_core::Finish;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::blocks::SlotCache;
use crate::error::{ModelError, Result};
use crate::generator::{Generator, InProcess};
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

/// How the sampler batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Rows decoded together; a finished row's slot is filled from the queue.
    pub slots: usize,
    /// Decode steps between reads of the sampled tokens back to the host (a host sync each).
    /// Default 16.
    pub readback_every: usize,
}

impl Batching {
    /// `slots` rows at a time, reading back every 16 steps.
    pub fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            readback_every: 16,
        }
    }

    pub fn with_readback_every(self, steps: usize) -> Self {
        Self {
            readback_every: steps.max(1),
            ..self
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
    /// one per token of `tokens` (the EOS token has none; a stop string's tokens have theirs).
    pub logprobs: Vec<f32>,
    pub finish: Finish,
    /// The end-of-sequence token the policy sampled to finish (`finish` is Stop), not in
    /// `tokens`; None when it ran out of budget (Length) or a stop string ended it
    /// (StopString).
    pub eos: Option<u32>,
}

/// What a call did, counted as it ran.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateStats {
    /// Decode steps (one token for every slot each).
    pub decode_steps: u64,
    /// Reads of the sampling state back to the host: the only host syncs of decoding.
    pub readbacks: u64,
    /// Prefill passes, and the distinct prompts they ran.
    pub prefills: u64,
    pub prefilled_prompts: u64,
    /// Wall time of the whole call, and of the prefills and the readbacks within it (each
    /// waits for the device): the rest is decoding.
    pub seconds: f64,
    pub prefill_seconds: f64,
    pub readback_seconds: f64,
}

impl GenerateStats {
    /// Seconds per decode step, readbacks included, prefills not.
    pub fn seconds_per_step(&self) -> f64 {
        (self.seconds - self.prefill_seconds) / self.decode_steps.max(1) as f64
    }
}

/// How many trailing tokens are decoded to look for a stop string.
const STOP_WINDOW: usize = 16;

/// Samples one completion for each request, all in one batch; in request order.
pub fn generate(
    model: &Model,
    requests: &[Request],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    collect(model, requests, params, Batching::new(requests.len()))
}

/// Samples one completion for each request, `batching.slots` at a time; in request order.
pub fn collect(
    model: &Model,
    requests: &[Request],
    params: &SamplingParams,
    batching: Batching,
) -> Result<Vec<Generation>> {
    InProcess::new(model, batching).collect(requests, params)
}

/// Samples one completion for each request, `batching.slots` at a time, handing each to
/// `on_done(request index, completion)` as it finishes (roughly in request order: the queue
/// is). Returns what it counted.
pub fn generate_each<E: From<ModelError>>(
    model: &Model,
    requests: &[Request],
    params: &SamplingParams,
    batching: Batching,
    mut on_done: impl FnMut(usize, Generation) -> std::result::Result<(), E>,
) -> std::result::Result<GenerateStats, E> {
    if requests.is_empty() {
        return Ok(GenerateStats::default());
    }
    if params.max_new_tokens == 0 {
        for i in 0..requests.len() {
            on_done(
                i,
                finished(model, Vec::new(), Vec::new(), Finish::Length, None, params)?,
            )?;
        }
        return Ok(GenerateStats::default());
    }
    tch::no_grad(|| {
        let mut engine = Engine::new(model, requests, params, batching);
        engine.run(&mut on_done)?;
        Ok(engine.stats)
    })
}

/// The sampler's state: per slot on the device, per slot and request on the host.
struct Engine<'a> {
    model: &'a Model,
    requests: &'a [Request],
    params: &'a SamplingParams,
    batching: Batching,
    device: Device,
    /// Token budget N per row.
    budget: i64,
    /// End-of-sequence ids, (E,); None when EOS is ignored.
    eos: Option<Tensor>,
    queue: VecDeque<usize>,
    cache: SlotCache,
    /// (S,): cached positions per slot; a step writes at lens[r] and attends to 0..=lens[r].
    lens: Tensor,
    /// (S,): tokens taken so far.
    step: Tensor,
    /// (S,): still sampling.
    live: Tensor,
    /// (S,): the EOS id the row finished with, -1 if none.
    eos_hit: Tensor,
    /// (S, N + 1): the row's uniforms, one per step; the last column pads done rows' reads.
    uniform: Tensor,
    /// (S, N + 1) and (S, N + 1): tokens and log-probs taken; the last column takes done
    /// rows' writes.
    tokens: Tensor,
    logprobs: Tensor,
    /// (S, V): each slot's next-token logits, in f32.
    logits: Tensor,
    /// Per slot: the request it holds, its prompt length, and what the host has read of it.
    slots: Vec<Option<Slot>>,
    /// Steps since the last readback.
    unread: i64,
    stats: GenerateStats,
}

struct Slot {
    request: usize,
    prompt_len: i64,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
}

impl<'a> Engine<'a> {
    fn new(
        model: &'a Model,
        requests: &'a [Request],
        params: &'a SamplingParams,
        batching: Batching,
    ) -> Self {
        let device = model.vs.device();
        let slots = batching.slots.min(requests.len()) as i64;
        let budget = params.max_new_tokens as i64;
        let longest = requests
            .iter()
            .map(|r| r.prompt.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let capacity = longest as i64 + budget;
        let eos_ids: Vec<i64> = model
            .tokenizer
            .eos_ids()
            .iter()
            .map(|&e| e as i64)
            .collect();
        let eos = (!params.ignore_eos && !eos_ids.is_empty())
            .then(|| Tensor::from_slice(&eos_ids).to_device(device));
        let cfg = model.decoder.config();
        let vocab = cfg.vocab_size as i64;
        let long = |fill: i64| Tensor::full([slots], fill, (Kind::Int64, device));
        Self {
            model,
            requests,
            params,
            batching,
            device,
            budget,
            eos,
            queue: (0..requests.len()).collect(),
            cache: SlotCache::new(cfg, slots, capacity, model.kind(), device),
            lens: long(0),
            step: long(0),
            live: Tensor::zeros([slots], (Kind::Bool, device)),
            eos_hit: long(-1),
            uniform: Tensor::zeros([slots, budget + 1], (Kind::Float, device)),
            tokens: Tensor::zeros([slots, budget + 1], (Kind::Int64, device)),
            logprobs: Tensor::zeros([slots, budget + 1], (Kind::Float, device)),
            logits: Tensor::zeros([slots, vocab], (Kind::Float, device)),
            slots: (0..slots).map(|_| None).collect(),
            unread: 0,
            stats: GenerateStats::default(),
        }
    }

    fn run<E: From<ModelError>>(
        &mut self,
        on_done: &mut impl FnMut(usize, Generation) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let began = Instant::now();
        self.join()?;
        while self.slots.iter().any(Option::is_some) {
            // No row can take more than its remaining budget: read back no later than that.
            let left = self
                .slots
                .iter()
                .flatten()
                .map(|s| self.budget - s.tokens.len() as i64)
                .max()
                .unwrap_or(1);
            for _ in 0..left.min(self.batching.readback_every as i64).max(1) {
                self.decode_step();
            }
            for (request, generation) in self.read_back()? {
                on_done(request, generation)?;
            }
            if !self.queue.is_empty() {
                self.join()?;
            } else {
                self.compact();
            }
        }
        self.stats.seconds = began.elapsed().as_secs_f64();
        Ok(())
    }

    /// One token for every slot: sampled, recorded, and fed through the model for the next
    /// step's logits. Rows that are done (or empty) ride along and record nothing.
    fn decode_step(&mut self) {
        let budget = self.budget;
        let at = self.step.unsqueeze(1); // (S, 1)
        let uniform = self.uniform.gather(1, &at, false).squeeze_dim(1);
        let next = sample(&self.logits, self.params, &uniform); // (S,)
        // log π(next) = logit − logsumexp: one pass over the vocabulary, no (S, V) log-softmax.
        let logprob =
            self.logits.gather(1, &next.unsqueeze(1), false) - self.logits.logsumexp([-1], true); // (S, 1)
        let is_eos = match &self.eos {
            Some(eos) => Tensor::isin(&next, eos, false, false),
            None => next.zeros_like().to_kind(Kind::Bool),
        };
        let took = self.live.logical_and(&is_eos.logical_not());
        let _ = self.tokens.scatter_(1, &at, &next.unsqueeze(1));
        let _ = self.logprobs.scatter_(1, &at, &logprob);
        self.eos_hit = next.where_self(&self.live.logical_and(&is_eos), &self.eos_hit);
        self.step += took.to_kind(Kind::Int64);
        self.live = took.logical_and(&self.step.lt(budget));
        // Every slot's token is written at its length; only live rows keep theirs.
        let width = self.width();
        let hidden = self
            .model
            .decoder
            .decode_step(&next, &self.lens, width, &mut self.cache);
        self.logits = self.model.decoder.logits(&hidden).to_kind(Kind::Float);
        self.lens += self.live.to_kind(Kind::Int64);
        self.unread += 1;
        self.stats.decode_steps += 1;
    }

    /// Key columns a step reads: past every row's length, which the host bounds by what it
    /// read and the steps since.
    fn width(&self) -> i64 {
        let capacity = self.cache.capacity();
        let longest = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.prompt_len + s.tokens.len() as i64)
            .max()
            .unwrap_or(0);
        (longest + self.unread).min(capacity - 1) + 1
    }

    /// Reads every slot's new tokens, ends rows at EOS, the budget or a stop string, and
    /// frees their slots; returns them with their request's index.
    fn read_back(&mut self) -> Result<Vec<(usize, Generation)>> {
        let began = Instant::now();
        let state = Tensor::stack(
            &[&self.step, &self.live.to_kind(Kind::Int64), &self.eos_hit],
            0,
        );
        let state: Vec<i64> = Vec::try_from(&state.to_device(Device::Cpu).flatten(0, 1))?;
        let tokens: Vec<i64> = Vec::try_from(&self.tokens.to_device(Device::Cpu).flatten(0, 1))?;
        let logprobs: Vec<f32> =
            Vec::try_from(&self.logprobs.to_device(Device::Cpu).flatten(0, 1))?;
        self.stats.readbacks += 1;
        self.unread = 0;
        let (slots, width) = (self.slots.len(), self.budget as usize + 1);
        let (mut stopped, mut done) = (Vec::new(), Vec::new());
        for r in 0..slots {
            let Some(slot) = &mut self.slots[r] else {
                continue;
            };
            let (taken, live, eos) = (
                state[r] as usize,
                state[slots + r] != 0,
                state[2 * slots + r],
            );
            let mut finish = (!live).then_some(Finish::Length);
            for i in slot.tokens.len()..taken {
                slot.tokens.push(tokens[r * width + i] as u32);
                slot.logprobs.push(logprobs[r * width + i]);
                if !self.params.stop.is_empty()
                    && hits_stop(self.model, &slot.tokens, &self.params.stop)?
                {
                    finish = Some(Finish::StopString);
                    stopped.push(r as i64);
                    break;
                }
            }
            let Some(mut finish) = finish else {
                continue;
            };
            let eos = (finish == Finish::Length && eos >= 0).then_some(eos as u32);
            if eos.is_some() {
                finish = Finish::Stop;
            }
            let slot = self.slots[r].take().expect("held");
            let generation = finished(
                self.model,
                slot.tokens,
                slot.logprobs,
                finish,
                eos,
                self.params,
            )?;
            done.push((slot.request, generation));
        }
        if !stopped.is_empty() {
            // Rows a stop string ended are still live on the device.
            let stopped = Tensor::from_slice(&stopped).to_device(self.device);
            let _ = self.live.index_fill_(0, &stopped, 0);
        }
        self.stats.readback_seconds += began.elapsed().as_secs_f64();
        Ok(done)
    }

    /// Fills free slots from the queue: the joiners' distinct prompts prefilled in one pass,
    /// their keys and values copied into the slots, their state reset.
    fn join(&mut self) -> Result<()> {
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&r| self.slots[r].is_none())
            .collect();
        let joiners: Vec<(usize, usize)> = free
            .into_iter()
            .zip(std::iter::from_fn(|| self.queue.pop_front()))
            .collect();
        if joiners.is_empty() {
            return Ok(());
        }
        let mut distinct: HashMap<&[u32], i64> = HashMap::new();
        let mut prompts: Vec<&[u32]> = Vec::new();
        let of: Vec<i64> = joiners
            .iter()
            .map(|&(_, q)| {
                let prompt = self.requests[q].prompt.as_slice();
                *distinct.entry(prompt).or_insert_with(|| {
                    prompts.push(prompt);
                    prompts.len() as i64 - 1
                })
            })
            .collect();
        let (hidden, kv) = self.prefill(&prompts);
        let device = self.device;
        let of = Tensor::from_slice(&of).to_device(device); // (J,) → distinct prompt
        let at: Vec<i64> = joiners.iter().map(|&(r, _)| r as i64).collect();
        let at = Tensor::from_slice(&at).to_device(device); // (J,) → slot
        for (cache, kv) in self.cache.layers.iter_mut().zip(kv) {
            let len = kv.size()[2];
            let _ = cache
                .narrow(2, 0, len)
                .index_copy_(0, &at, &kv.index_select(0, &of));
        }
        let logits = self.model.decoder.logits(&hidden).to_kind(Kind::Float);
        let _ = self
            .logits
            .index_copy_(0, &at, &logits.index_select(0, &of));
        let lens: Vec<i64> = joiners
            .iter()
            .map(|&(_, q)| self.requests[q].prompt.len().max(1) as i64)
            .collect();
        let _ = self
            .lens
            .index_copy_(0, &at, &Tensor::from_slice(&lens).to_device(device));
        let _ = self.step.index_fill_(0, &at, 0);
        let _ = self.live.index_fill_(0, &at, 1);
        let _ = self.eos_hit.index_fill_(0, &at, -1);
        // Each request's own draws, one per step, uploaded once.
        let budget = self.budget as usize;
        let mut uniform = Vec::with_capacity(joiners.len() * (budget + 1));
        for &(_, q) in &joiners {
            let mut rng = StdRng::seed_from_u64(self.requests[q].seed);
            uniform.extend((0..budget).map(|_| rng.random::<f32>()));
            uniform.push(0.0);
        }
        let uniform = Tensor::from_slice(&uniform)
            .view([joiners.len() as i64, budget as i64 + 1])
            .to_device(device);
        let _ = self.uniform.index_copy_(0, &at, &uniform);
        for (&(r, q), len) in joiners.iter().zip(lens) {
            self.slots[r] = Some(Slot {
                request: q,
                prompt_len: len,
                tokens: Vec::new(),
                logprobs: Vec::new(),
            });
        }
        Ok(())
    }

    /// Right-padded prompts through the model: the hidden state at each prompt's last token,
    /// (U, C), and every layer's keys and values, (U, 2 KV, P, D).
    fn prefill(&mut self, prompts: &[&[u32]]) -> (Tensor, Vec<Tensor>) {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
        let pad = self.model.tokenizer.pad_id() as i64;
        let mut ids = vec![pad; prompts.len() * longest];
        let mut last = Vec::with_capacity(prompts.len());
        for (row, prompt) in prompts.iter().enumerate() {
            for (j, &tok) in prompt.iter().enumerate() {
                ids[row * longest + j] = tok as i64;
            }
            last.push((row * longest + prompt.len().max(1) - 1) as i64);
        }
        let (u, p) = (prompts.len() as i64, longest as i64);
        let input = Tensor::from_slice(&ids).view([u, p]).to_device(self.device);
        let began = Instant::now();
        let (hidden, kv) = self.model.decoder.prefill(&input); // (U, P, C)
        let last = Tensor::from_slice(&last).to_device(self.device);
        let hidden = hidden.flatten(0, 1).index_select(0, &last); // (U, C)
        self.stats.prefill_seconds += began.elapsed().as_secs_f64();
        self.stats.prefills += 1;
        self.stats.prefilled_prompts += prompts.len() as u64;
        (hidden, kv)
    }

    /// With nothing left to join, moves the rows still sampling into the first slots once
    /// half the slots are free, so the tail decodes a smaller batch.
    fn compact(&mut self) {
        let held: Vec<i64> = (0..self.slots.len())
            .filter(|&r| self.slots[r].is_some())
            .map(|r| r as i64)
            .collect();
        if held.is_empty() || held.len() * 2 > self.slots.len() {
            return;
        }
        let keep = Tensor::from_slice(&held).to_device(self.device);
        for kv in &mut self.cache.layers {
            *kv = kv.index_select(0, &keep);
        }
        for state in [
            &mut self.lens,
            &mut self.step,
            &mut self.live,
            &mut self.eos_hit,
            &mut self.uniform,
            &mut self.tokens,
            &mut self.logprobs,
            &mut self.logits,
        ] {
            *state = state.index_select(0, &keep);
        }
        self.slots = held
            .iter()
            .map(|&r| self.slots[r as usize].take())
            .collect();
    }
}

/// A finished row as the caller gets it: the text decoded and cut before a stop string.
fn finished(
    model: &Model,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Finish,
    eos: Option<u32>,
    params: &SamplingParams,
) -> Result<Generation> {
    let mut text = model.tokenizer.decode(&tokens)?;
    if let Some(cut) = params
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        text.truncate(cut);
    }
    Ok(Generation {
        tokens,
        text,
        logprobs,
        finish,
        eos,
    })
}

fn hits_stop(model: &Model, tokens: &[u32], stop: &[String]) -> Result<bool> {
    let tail = &tokens[tokens.len().saturating_sub(STOP_WINDOW)..];
    let text = model.tokenizer.decode(tail)?;
    Ok(stop.iter().any(|s| text.contains(s.as_str())))
}

/// Next token per row from logits (B, V): greedy, or temperature / top-k / top-p sampling by
/// inverting each row's CDF at `uniform` (B,), draws in [0, 1). With top-k the CDF runs over
/// the k kept tokens, most likely first, so no pass but `topk` itself reads the whole vocabulary;
/// without it, over the vocabulary in id order.
fn sample(logits: &Tensor, params: &SamplingParams, uniform: &Tensor) -> Tensor {
    if params.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let vocab = logits.size()[1];
    let (mut scores, ids) = if params.top_k > 0 && params.top_k < vocab {
        let (top, ids) = logits.topk(params.top_k, -1, true, true); // (B, k), descending
        (top / params.temperature, Some(ids))
    } else {
        (logits / params.temperature, None)
    };
    if params.top_p < 1.0 {
        // Top-k's scores are sorted already; the whole vocabulary's must be.
        let (sorted, order) = match ids {
            Some(_) => (scores.shallow_clone(), None),
            None => {
                let (sorted, order) = scores.sort(-1, true);
                (sorted, Some(order))
            }
        };
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token once the mass before it already reaches p (the first always stays):
        // at p = 0.5, of [0.5, 0.3, 0.2] only the first is kept, as in transformers and vLLM.
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let mut drop = before.ge(params.top_p);
        if let Some(order) = order {
            drop = drop.scatter(1, &order, &drop);
        }
        scores = scores.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let kept = scores.size()[1];
    let cdf = scores.softmax(-1, Kind::Float).cumsum(-1, Kind::Float); // (B, kept)
    let total = cdf.narrow(1, kept - 1, 1); // ≈ 1: the CDF's own end
    let target = uniform.unsqueeze(1) * total; // (B, 1)
    let at = target
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .clamp_max(kept - 1); // (B, 1)
    match ids {
        Some(ids) => ids.gather(1, &at, false).squeeze_dim(1),
        None => at.squeeze_dim(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tokens of probability 0.5 each (exactly: equal logits): top-p 0.5 is reached by
    /// the first of them alone, so every draw, even one near 1, takes that one.
    #[test]
    fn top_p_keeps_one_token_where_the_first_reaches_p_exactly() {
        let logits = Tensor::from_slice(&[0.0f32, 0.0])
            .view([1, 2])
            .repeat([5, 1]);
        let uniform = Tensor::from_slice(&[0.0f32, 0.3, 0.6, 0.9, 0.999]);
        for top_k in [0, 2, 200] {
            let params = SamplingParams {
                top_k,
                top_p: 0.5,
                ..SamplingParams::default()
            };
            let picked: Vec<i64> = Vec::try_from(&sample(&logits, &params, &uniform)).unwrap();
            assert!(
                picked.iter().all(|&t| t == picked[0]),
                "top_k {top_k}: both tied tokens were kept ({picked:?})"
            );
        }
    }
}
