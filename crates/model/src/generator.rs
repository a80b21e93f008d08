//! The Generator seam: whoever wants completions (a round's generate stage, an online
//! trainer's rollouts) asks a `Generator` and not a model, so another way of sampling (a
//! user's inference server) plugs in where this crate's own continuous-batching sampler does.

use crate::error::{ModelError, Result};
use crate::generate::{Batching, GenerateStats, Generation, Request, SamplingParams};
use crate::generate_each;
use crate::load::Model;

/// Samples completions for requests: token ids in (each with its own seed), for each request
/// one completion out with its token ids, per-token log-probs and how it ended.
pub trait Generator {
    /// Samples one completion per request, handing each to `on_done(request index,
    /// completion)` as it finishes (in any order). Returns what it counted.
    fn generate_each<E: From<ModelError>>(
        &mut self,
        requests: &[Request],
        params: &SamplingParams,
        on_done: impl FnMut(usize, Generation) -> std::result::Result<(), E>,
    ) -> std::result::Result<GenerateStats, E>;

    /// Between rounds: `policy` is the policy to sample from from now on (a generator that
    /// samples elsewhere loads its weights there).
    fn sync_policy(&mut self, policy: &Model) -> Result<()>;

    /// One completion per request, in request order.
    fn collect(
        &mut self,
        requests: &[Request],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>> {
        let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
        self.generate_each(requests, params, |i, g| {
            out[i] = Some(g);
            Ok::<(), ModelError>(())
        })?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("every request finishes"))
            .collect())
    }
}

/// This crate's sampler over a model in this process (generate.rs).
#[derive(Debug, Clone, Copy)]
pub struct InProcess<'m> {
    model: &'m Model,
    batching: Batching,
}

impl<'m> InProcess<'m> {
    /// Samples from `model`, `batching.slots` rows decoding together.
    pub fn new(model: &'m Model, batching: Batching) -> Self {
        Self { model, batching }
    }
}

impl Generator for InProcess<'_> {
    fn generate_each<E: From<ModelError>>(
        &mut self,
        requests: &[Request],
        params: &SamplingParams,
        on_done: impl FnMut(usize, Generation) -> std::result::Result<(), E>,
    ) -> std::result::Result<GenerateStats, E> {
        generate_each(self.model, requests, params, self.batching, on_done)
    }

    /// Nothing to do where the policy is the model this samples from (an online trainer's
    /// actor, whose weights each update changes in place); another model is refused, as this
    /// generator cannot sample from it.
    fn sync_policy(&mut self, policy: &Model) -> Result<()> {
        if std::ptr::eq(policy, self.model) {
            return Ok(());
        }
        Err(ModelError::Generator(
            "an in-process generator samples from the model it was made with; make a new \
             one for another policy"
                .into(),
        ))
    }
}
