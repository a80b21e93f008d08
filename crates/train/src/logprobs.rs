//! Log-probabilities of completion tokens under the policy, computed in chunks of positions so
//! the fp32 (batch, time, vocab) tensor of log-softmax values is never held in memory at once.
//!
//! The gradient uses the same trick in reverse ("fused linear cross-entropy" style): the
//! per-token log-probs are first computed without a graph and handed to the loss as a leaf;
//! once the loss has been differentiated with respect to them, each chunk's logits are
//! recomputed with a graph and differentiated with respect to the LM head and a detached copy
//! of the chunk's hidden states. The LM head's gradient is summed over the chunks in fp32 (a
//! bf16 `.grad` would round at every chunk), and one final backward pushes the hidden-state
//! gradient through the trunk and the summed head gradient into the head. The price is one
//! extra LM-head matmul per chunk; the saving is every chunk's logits but one.
//!
//! Only the actions are scored (OpenRLHF's `action_log_probs`): the LM head runs from the
//! batch's first completion target on, so the columns that are prompt in every row, which no
//! loss reads, cost no logits. Their log-probs read 0.
//!
//! Log-probs are of the distribution the completions were sampled from: the logits divided by
//! the batch's sampling temperature (TRL, veRL and OpenRLHF do the same), so that at T ≠ 1 the
//! ratio, the KL and the entropy are of π_T, not of π_1.

use prefloop_model::Decoder;
use tch::{Device, Kind, Tensor};

/// Budget for one chunk's fp32 logits: positions per chunk = budget / (B · V · 4 bytes).
const LOGITS_CHUNK_BYTES: i64 = 256 << 20;

/// Prompt-plus-completion sequences, right-padded, ready for a forward pass.
#[derive(Debug)]
pub struct TokenBatch {
    /// (B, T) token ids; padding positions hold the pad id.
    pub input_ids: Tensor,
    /// (B, T) bool: true on real tokens.
    pub attention_mask: Tensor,
    /// (B, T-1) f32: 1.0 where the target token `input_ids[:, t+1]` belongs to the completion,
    /// 0.0 on prompt and padding targets.
    pub loss_mask: Tensor,
    /// Real tokens in the batch (prompt and completion), for throughput figures.
    pub tokens: usize,
    /// The first target column that is a completion token in some row: every column before
    /// it is prompt (or padding) in every row.
    pub first_action: i64,
    /// The temperature the completions were sampled at: log-probs are of `logits / T`.
    /// 1 unless set with [`TokenBatch::at_temperature`].
    pub temperature: f64,
}

impl TokenBatch {
    /// Packs `(prompt, completion)` token sequences; every sequence must be non-empty.
    pub fn new(sequences: &[(&[u32], &[u32])], pad_id: u32, device: Device) -> Self {
        let b = sequences.len();
        let t = sequences
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let mut ids = vec![pad_id as i64; b * t];
        let mut valid = vec![false; b * t];
        let mut loss = vec![0f32; b * (t - 1)];
        let mut tokens = 0;
        let mut first_action = t - 1;
        for (row, (prompt, completion)) in sequences.iter().enumerate() {
            let n = prompt.len() + completion.len();
            tokens += n;
            for (i, &id) in prompt.iter().chain(completion.iter()).enumerate() {
                ids[row * t + i] = id as i64;
                valid[row * t + i] = true;
            }
            // Target t+1 is a completion token when t+1 >= prompt.len().
            for target in prompt.len().max(1)..n {
                loss[row * (t - 1) + target - 1] = 1.0;
            }
            if !completion.is_empty() {
                first_action = first_action.min(prompt.len().max(1) - 1);
            }
        }
        let (b, t) = (b as i64, t as i64);
        Self {
            input_ids: Tensor::from_slice(&ids).view([b, t]).to_device(device),
            attention_mask: Tensor::from_slice(&valid).view([b, t]).to_device(device),
            loss_mask: Tensor::from_slice(&loss).view([b, t - 1]).to_device(device),
            tokens,
            first_action: first_action as i64,
            temperature: 1.0,
        }
    }

    /// The batch scored as sampled at `temperature` (rollouts drawn at T ≠ 1).
    pub fn at_temperature(self, temperature: f64) -> Self {
        Self {
            temperature,
            ..self
        }
    }

    /// Final hidden states of `decoder` over the batch, (B, T, C). Right padding needs only the
    /// causal mask: real tokens never attend to the padding after them.
    pub fn hidden(&self, decoder: &Decoder) -> Tensor {
        decoder.forward_hidden_causal(&self.input_ids)
    }

    /// The rows `rows` of the batch, as a batch of their own.
    pub fn select(&self, rows: &Tensor) -> TokenBatch {
        let attention_mask = self.attention_mask.index_select(0, rows);
        let loss_mask = self.loss_mask.index_select(0, rows);
        // The first column with an action in any of these rows: the argmax of the column
        // flags is their first true. Read back with the token count in one copy.
        let columns = loss_mask
            .amax([0].as_slice(), false)
            .gt(0.0)
            .to_kind(Kind::Int64); // (T-1,)
        let counts = Tensor::stack(
            &[
                attention_mask.sum(Kind::Int64),
                columns.sum(Kind::Int64),
                columns.argmax(0, false),
            ],
            0,
        );
        let counts = Vec::<i64>::try_from(&counts.to_device(Device::Cpu)).expect("host i64");
        let tokens = counts[0] as usize;
        let first_action = match counts[1] {
            0 => columns.size()[0],
            _ => counts[2],
        };
        TokenBatch {
            input_ids: self.input_ids.index_select(0, rows),
            attention_mask,
            loss_mask,
            tokens,
            first_action,
            temperature: self.temperature,
        }
    }

    /// Targets of the next-token predictions, (B, T-1).
    pub fn targets(&self) -> Tensor {
        self.input_ids.narrow(1, 1, self.input_ids.size()[1] - 1)
    }
}

/// The fp32 logits of one chunk at the sampling temperature: hidden (B, c, C) → (B, c, V).
fn chunk_logits(decoder: &Decoder, hidden: &Tensor, temperature: f64) -> Tensor {
    let logits = decoder.logits(hidden).to_kind(Kind::Float);
    if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    }
}

/// log π_T(target | prefix) of one chunk: hidden (B, c, C), targets (B, c) → (B, c) fp32.
fn chunk_logprobs(
    decoder: &Decoder,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Tensor {
    let logits = chunk_logits(decoder, hidden, temperature); // (B, c, V)
    let picked = logits
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1);
    picked - logits.logsumexp([-1], false)
}

/// log π_T(target | prefix) and π_T's entropy at each position of one chunk: hidden
/// (B, c, C), targets (B, c) → two (B, c) fp32.
fn chunk_logprobs_and_entropy(
    decoder: &Decoder,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> (Tensor, Tensor) {
    let logits = chunk_logits(decoder, hidden, temperature);
    let log_p = logits.log_softmax(-1, Kind::Float); // (B, c, V)
    let picked = log_p
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1);
    let entropy = -(log_p.exp() * &log_p).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
    (picked, entropy)
}

/// Positions per chunk for `b` rows of a `vocab`-wide head.
fn chunk_len(b: i64, vocab: i64) -> i64 {
    (LOGITS_CHUNK_BYTES / (b * vocab * 4)).max(1)
}

/// Calls `f(start, len)` over consecutive chunks of the positions `from..t`.
fn for_chunks(from: i64, t: i64, chunk: i64, mut f: impl FnMut(i64, i64)) {
    let mut start = from;
    while start < t {
        let len = chunk.min(t - start);
        f(start, len);
        start += len;
    }
}

/// Per-token log-probs of the batch's targets, (B, T-1) fp32, without a graph.
pub fn token_logprobs(decoder: &Decoder, batch: &TokenBatch) -> Tensor {
    tch::no_grad(|| {
        let hidden = batch.hidden(decoder);
        let b = hidden.size()[0];
        let chunk = chunk_len(b, decoder.config().vocab_size as i64);
        logprobs_of_hidden(decoder, &hidden, &batch.targets(), batch, chunk)
    })
}

/// `parts`, the values of the columns `first..`, with zeros before them: (B, T-1).
fn after_zeros(parts: Vec<Tensor>, b: i64, first: i64, like: &Tensor) -> Tensor {
    let zeros = Tensor::zeros([b, first], (Kind::Float, like.device()));
    let columns: Vec<Tensor> = std::iter::once(zeros).chain(parts).collect();
    Tensor::cat(&columns, 1)
}

/// Log-probs of `targets` (B, T) and the entropy at each position from `hidden` (B, T, C),
/// from `batch`'s first action column on, at its temperature, `chunk` positions at a time:
/// both (B, T) fp32, 0 before the first action.
fn logprobs_and_entropy_of_hidden(
    decoder: &Decoder,
    hidden: &Tensor,
    targets: &Tensor,
    batch: &TokenBatch,
    chunk: i64,
) -> (Tensor, Tensor) {
    let (b, t) = targets.size2().expect("(B, T)");
    let first = batch.first_action;
    let (mut logprobs, mut entropies) = (Vec::new(), Vec::new());
    for_chunks(first, t, chunk, |start, len| {
        let (picked, entropy) = chunk_logprobs_and_entropy(
            decoder,
            &hidden.narrow(1, start, len),
            &targets.narrow(1, start, len),
            batch.temperature,
        );
        logprobs.push(picked);
        entropies.push(entropy);
    });
    (
        after_zeros(logprobs, b, first, hidden),
        after_zeros(entropies, b, first, hidden),
    )
}

/// Per-token log-probs and the policy's entropy at each position, both (B, T-1) fp32,
/// without a graph (PPO's rollout statistics).
pub fn token_logprobs_and_entropy(decoder: &Decoder, batch: &TokenBatch) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let hidden = batch.hidden(decoder);
        let targets = batch.targets();
        let (b, _) = targets.size2().expect("(B, T-1)");
        let chunk = chunk_len(b, decoder.config().vocab_size as i64);
        logprobs_and_entropy_of_hidden(decoder, &hidden, &targets, batch, chunk)
    })
}

/// Per-token log-probs of `targets` (B, T-1) given the trunk's `hidden` (B, T, C), from
/// `batch`'s first action column on (0 before it), at its temperature.
fn logprobs_of_hidden(
    decoder: &Decoder,
    hidden: &Tensor,
    targets: &Tensor,
    batch: &TokenBatch,
    chunk: i64,
) -> Tensor {
    let (b, t) = targets.size2().expect("(B, T-1)");
    let first = batch.first_action;
    let mut parts = Vec::new();
    for_chunks(first, t, chunk, |start, len| {
        parts.push(chunk_logprobs(
            decoder,
            &hidden.narrow(1, start, len),
            &targets.narrow(1, start, len),
            batch.temperature,
        ));
    });
    after_zeros(parts, b, first, hidden)
}

/// Per-token log-probs with a gradient path back to the policy's parameters.
///
/// `values` is a leaf: build the loss from it, call `backward()` on the loss, then
/// [`TokenLogprobs::backward`] to carry the gradient into the LM head and the trunk.
#[derive(Debug)]
pub struct TokenLogprobs {
    /// (B, T-1) fp32 log π(target | prefix), requiring grad.
    pub values: Tensor,
    /// (B, T-1) fp32 entropy of the policy at each position, requiring grad, when asked for
    /// ([`TokenLogprobs::with_entropy`]): an entropy bonus flows back like the log-probs.
    pub entropy: Option<Tensor>,
    /// (B, T, C) the trunk's output, with its graph.
    hidden: Tensor,
    /// (B, T-1, C) `hidden` without the last position and without a graph.
    detached: Tensor,
    /// (B, T-1)
    targets: Tensor,
    /// The batch's first action column: the head runs from here on.
    first: i64,
    /// The batch's sampling temperature.
    temperature: f64,
    /// Positions per chunk.
    chunk: i64,
}

impl TokenLogprobs {
    pub fn forward(decoder: &Decoder, batch: &TokenBatch) -> Self {
        let b = batch.input_ids.size()[0];
        Self::forward_in_chunks(
            decoder,
            batch,
            chunk_len(b, decoder.config().vocab_size as i64),
            false,
        )
    }

    /// As [`TokenLogprobs::forward`], with the entropy at each position too (twice the
    /// chunk's fp32 logits in memory).
    pub fn with_entropy(decoder: &Decoder, batch: &TokenBatch) -> Self {
        let b = batch.input_ids.size()[0];
        Self::forward_in_chunks(
            decoder,
            batch,
            chunk_len(b, decoder.config().vocab_size as i64),
            true,
        )
    }

    /// As [`TokenLogprobs::forward`], `chunk` positions at a time.
    pub(crate) fn forward_in_chunks(
        decoder: &Decoder,
        batch: &TokenBatch,
        chunk: i64,
        entropy: bool,
    ) -> Self {
        let hidden = batch.hidden(decoder);
        let t = hidden.size()[1] - 1;
        let detached = hidden.narrow(1, 0, t).detach();
        let targets = batch.targets();
        let first = batch.first_action;
        let (values, entropy) = tch::no_grad(|| {
            if !entropy {
                return (
                    logprobs_of_hidden(decoder, &detached, &targets, batch, chunk),
                    None,
                );
            }
            let (values, entropy) =
                logprobs_and_entropy_of_hidden(decoder, &detached, &targets, batch, chunk);
            (values, Some(entropy))
        });
        Self {
            values: values.set_requires_grad(true),
            entropy: entropy.map(|e| e.set_requires_grad(true)),
            hidden,
            detached,
            targets,
            first,
            temperature: batch.temperature,
            chunk,
        }
    }

    /// Back-propagates the gradient the loss left on `values` through the LM head and the
    /// trunk, accumulating into the parameters' `.grad`.
    pub fn backward(self, decoder: &Decoder) {
        let grad = self.values.grad();
        let entropy_grad = self
            .entropy
            .as_ref()
            .map(Tensor::grad)
            .filter(Tensor::defined);
        if !grad.defined() {
            return;
        }
        let t = self.targets.size()[1];
        let head = decoder.lm_head();
        let train_head = head.requires_grad();
        let mut head_grad: Option<Tensor> = None; // (V, C) fp32
        let mut hidden_grads = Vec::new();
        for_chunks(self.first, t, self.chunk, |start, len| {
            let hidden = self
                .detached
                .narrow(1, start, len)
                .detach()
                .set_requires_grad(true);
            let targets = self.targets.narrow(1, start, len);
            let objective = match &entropy_grad {
                None => (chunk_logprobs(decoder, &hidden, &targets, self.temperature)
                    * grad.narrow(1, start, len))
                .sum(Kind::Float),
                Some(entropy_grad) => {
                    let (logprobs, entropy) =
                        chunk_logprobs_and_entropy(decoder, &hidden, &targets, self.temperature);
                    (logprobs * grad.narrow(1, start, len)
                        + entropy * entropy_grad.narrow(1, start, len))
                    .sum(Kind::Float)
                }
            };
            let inputs: Vec<&Tensor> = if train_head {
                vec![&hidden, head]
            } else {
                vec![&hidden]
            };
            let mut grads = Tensor::run_backward(&[objective], &inputs, false, false);
            if train_head {
                let g = grads.pop().expect("one per input").to_kind(Kind::Float);
                head_grad = Some(match head_grad.take() {
                    Some(sum) => sum + g,
                    None => g,
                });
            }
            hidden_grads.push(grads.pop().expect("one per input"));
        });
        if hidden_grads.is_empty() {
            return;
        }
        let trunk = self.hidden.narrow(1, self.first, t - self.first);
        let hidden_grad = Tensor::cat(&hidden_grads, 1).to_kind(self.hidden.kind());
        let mut objective = (trunk * hidden_grad).sum(Kind::Float);
        if let Some(sum) = head_grad {
            objective += (head * sum.to_kind(head.kind())).sum(Kind::Float);
        }
        objective.backward();
    }
}

/// Sums per-token values over the completion: (B, T-1) → (B,).
pub fn sequence_sum(per_token: &Tensor, loss_mask: &Tensor) -> Tensor {
    (per_token * loss_mask).sum_dim_intlist([1].as_slice(), false, Kind::Float)
}

/// `log π(y|x) − log π_ref(y|x)` of each (prompt, answer, whether the policy ended it with
/// EOS), summed over the answer's tokens, `batch_size` sequences at a time. Averaged over
/// answers sampled from π it is the k1 estimate of KL(π ‖ π_ref), which is how the pipeline
/// measures how far the policy moved. An answer cut at the token budget is scored without an
/// EOS: the policy never sampled one there.
pub fn log_ratios(
    policy: &prefloop_model::Model,
    reference: &prefloop_model::Model,
    encoder: &crate::Encoder,
    texts: &[(&str, &str, bool)],
    batch_size: usize,
) -> crate::Result<Vec<f32>> {
    let mut ratios = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let sequences: Vec<crate::Sequence> = chunk
            .iter()
            .map(|(prompt, answer, ended)| {
                encoder.sampled(&encoder.prompt(prompt)?, answer, *ended)
            })
            .collect::<crate::Result<_>>()?;
        let parts: Vec<(&[u32], &[u32])> = sequences.iter().map(|s| s.parts()).collect();
        let logps = |model: &prefloop_model::Model| -> crate::Result<Vec<f32>> {
            let batch = TokenBatch::new(&parts, model.tokenizer.pad_id(), model.vs.device());
            let sums = sequence_sum(&token_logprobs(&model.decoder, &batch), &batch.loss_mask);
            Ok(Vec::try_from(&sums.to_device(Device::Cpu))?)
        };
        let (ours, theirs) = (logps(policy)?, logps(reference)?);
        ratios.extend(ours.iter().zip(&theirs).map(|(a, b)| a - b));
    }
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use prefloop_model::Config;
    use tch::nn::VarStore;

    use super::*;

    fn tiny_llama() -> (VarStore, Decoder) {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 50, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32,
            "tie_word_embeddings": true,
        }))
        .unwrap();
        let vs = VarStore::new(Device::Cpu);
        let decoder = Decoder::new(&vs, &config).unwrap();
        tch::manual_seed(7);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&(v.randn_like() * 0.3));
            }
        });
        (vs, decoder)
    }

    fn batch() -> TokenBatch {
        let sequences: [(&[u32], &[u32]); 3] = [
            (&[3, 4, 5], &[6, 7, 8, 9, 10]),
            (&[11], &[12, 13]),
            (&[14, 15, 16, 17], &[18, 19, 20, 21, 22, 23]),
        ];
        TokenBatch::new(&sequences, 0, Device::Cpu)
    }

    /// The batch above with per-row weights, and its rows 0 and 2 alone, whose prompts are
    /// three and four tokens long: there the head starts at column 2.
    fn cases() -> [(TokenBatch, Tensor); 2] {
        let whole = batch();
        let selected = whole.select(&Tensor::from_slice(&[0i64, 2]));
        assert_eq!((whole.first_action, selected.first_action), (0, 2));
        [
            (whole, Tensor::from_slice(&[1.0f32, -2.0, 0.5]).view([3, 1])),
            (selected, Tensor::from_slice(&[1.0f32, 0.5]).view([2, 1])),
        ]
    }

    /// Every parameter's gradient by name, then zeroed.
    fn take_grads(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, v)| (n, v.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut v) in vs.variables() {
            v.zero_grad();
        }
        grads
    }

    /// Gradients of Σ w·logπ (+ u·Σ entropy) through the chunked path, by name.
    fn chunked_grads(
        vs: &VarStore,
        decoder: &Decoder,
        batch: &TokenBatch,
        chunk: i64,
        w: &Tensor,
        entropy_weight: Option<f64>,
    ) -> (Tensor, Vec<(String, Tensor)>) {
        let logprobs =
            TokenLogprobs::forward_in_chunks(decoder, batch, chunk, entropy_weight.is_some());
        let mut objective = (&logprobs.values * &batch.loss_mask * w).sum(Kind::Float);
        if let (Some(u), Some(entropy)) = (entropy_weight, &logprobs.entropy) {
            objective += (entropy * &batch.loss_mask).sum(Kind::Float) * u;
        }
        objective.backward();
        let values = logprobs.values.detach();
        logprobs.backward(decoder);
        (values, take_grads(vs))
    }

    #[test]
    fn an_entropy_bonus_flows_back_through_the_chunks_as_through_the_whole_softmax() {
        let (vs, decoder) = tiny_llama();
        for (batch, w) in cases() {
            entropy_bonus_case(&vs, &decoder, &batch, &w);
        }
    }

    fn entropy_bonus_case(vs: &VarStore, decoder: &Decoder, batch: &TokenBatch, w: &Tensor) {
        let logits = decoder.forward(&batch.input_ids);
        let t = logits.size()[1] - 1;
        let log_p = logits.narrow(1, 0, t).log_softmax(-1, Kind::Float);
        let picked = log_p
            .gather(-1, &batch.targets().unsqueeze(-1), false)
            .squeeze_dim(-1);
        let entropy = -(log_p.exp() * &log_p).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
        ((&picked * &batch.loss_mask * w).sum(Kind::Float)
            + (entropy * &batch.loss_mask).sum(Kind::Float) * 0.3)
            .backward();
        let expected = take_grads(vs);
        for chunk in [1, 3, 100] {
            let (_, grads) = chunked_grads(vs, decoder, batch, chunk, w, Some(0.3));
            for ((name, g), (_, e)) in grads.iter().zip(&expected) {
                let diff = (g - e).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "chunk {chunk}: gradient of {name} differs by {diff}"
                );
            }
        }
    }

    /// Rollouts sampled at T = 0.7 are scored under π_T: log-probs, entropy and gradients of
    /// log_softmax(logits / 0.7), through the chunks as through the whole softmax. (They were
    /// of π_1, the distribution the samples did not come from.)
    #[test]
    fn log_probs_entropy_and_gradients_are_of_the_sampling_temperature() {
        let (vs, decoder) = tiny_llama();
        let batch_at_one = batch;
        let batch = batch_at_one().at_temperature(0.7);
        let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).view([3, 1]);
        let logits = decoder.forward(&batch.input_ids);
        let t = logits.size()[1] - 1;
        let log_p = (logits.narrow(1, 0, t) / 0.7).log_softmax(-1, Kind::Float);
        let picked = log_p
            .gather(-1, &batch.targets().unsqueeze(-1), false)
            .squeeze_dim(-1);
        let entropy = -(log_p.exp() * &log_p).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
        ((&picked * &batch.loss_mask * &w).sum(Kind::Float)
            + (&entropy * &batch.loss_mask).sum(Kind::Float) * 0.3)
            .backward();
        let expected = take_grads(&vs);
        let masked = |x: &Tensor| x * &batch.loss_mask;
        let diff = |a: &Tensor, b: &Tensor| (masked(a) - masked(b)).abs().max().double_value(&[]);
        let (plain, plain_entropy) = token_logprobs_and_entropy(&decoder, &batch);
        assert!(diff(&plain, &picked.detach()) < 1e-5, "log-probs at T");
        assert!(
            diff(&plain_entropy, &entropy.detach()) < 1e-5,
            "entropy at T"
        );
        assert!(diff(&token_logprobs(&decoder, &batch), &picked.detach()) < 1e-5);
        for chunk in [1, 100] {
            let (values, grads) = chunked_grads(&vs, &decoder, &batch, chunk, &w, Some(0.3));
            assert!(diff(&values, &picked.detach()) < 1e-5, "chunk {chunk}");
            for ((name, g), (_, e)) in grads.iter().zip(&expected) {
                let d = (g - e).abs().max().double_value(&[]);
                assert!(d < 1e-5, "chunk {chunk}: gradient of {name} differs by {d}");
            }
        }
        // And they are not π_1's.
        assert!(diff(&plain, &token_logprobs(&decoder, &batch_at_one())) > 1e-3);
    }

    #[test]
    fn chunked_log_probs_and_gradients_equal_the_whole_log_softmax() {
        let (vs, decoder) = tiny_llama();
        let batch = batch();
        assert_eq!(batch.tokens, 8 + 3 + 10);
        // Completion targets: row 1 has prompt [11] and answer [12, 13], targets 12 and 13.
        let mask: Vec<f32> = Vec::try_from(batch.loss_mask.get(1)).unwrap();
        assert_eq!(mask, [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        for (batch, w) in cases() {
            log_probs_case(&vs, &decoder, &batch, &w);
        }
    }

    fn log_probs_case(vs: &VarStore, decoder: &Decoder, batch: &TokenBatch, w: &Tensor) {
        // Direct: the whole (B, T-1, V) log-softmax with autograd.
        let logits = decoder.forward(&batch.input_ids);
        let t = logits.size()[1] - 1;
        let direct = logits
            .narrow(1, 0, t)
            .log_softmax(-1, Kind::Float)
            .gather(-1, &batch.targets().unsqueeze(-1), false)
            .squeeze_dim(-1);
        (&direct * &batch.loss_mask * w).sum(Kind::Float).backward();
        let expected = take_grads(vs);

        for chunk in [1, 3, 100] {
            let (values, grads) = chunked_grads(vs, decoder, batch, chunk, w, None);
            let masked = |x: &Tensor| x * &batch.loss_mask;
            let diff = (masked(&values) - masked(&direct.detach()))
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "chunk {chunk}: log-probs differ by {diff}");
            for ((name, g), (_, e)) in grads.iter().zip(&expected) {
                let diff = (g - e).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "chunk {chunk}: gradient of {name} differs by {diff}"
                );
            }
        }
        // The no-graph path agrees too.
        let plain = token_logprobs(decoder, batch);
        let diff = ((plain - direct.detach()) * &batch.loss_mask)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5);
    }
}
