//! A scalar head on the decoder trunk: the PPO critic's value at every token, and the
//! Bradley–Terry reward model's score at the last real token of each sequence.

use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

/// Linear (C → 1). Named `score` as in transformers' `LlamaForSequenceClassification`, so a
/// reward model saved with it loads there.
#[derive(Debug)]
pub struct ScalarHead {
    proj: nn::Linear,
}

impl ScalarHead {
    /// Declares the head under `path` (e.g. `vs.root() / "score"`), zero-initialised: a new
    /// critic or reward model starts out predicting 0 for everything.
    pub fn new(path: nn::Path, hidden_size: usize) -> Self {
        let config = nn::LinearConfig {
            ws_init: Init::Const(0.0),
            bs_init: None,
            bias: false,
        };
        Self {
            proj: nn::linear(path, hidden_size as i64, 1, config),
        }
    }

    /// One scalar per position: (B, T, C) → (B, T), in the head's dtype (fp32 beside a LoRA
    /// trunk in bf16, the trunk's own otherwise).
    pub fn per_token(&self, hidden: &Tensor) -> Tensor {
        self.proj
            .forward(&hidden.to_kind(self.proj.ws.kind()))
            .squeeze_dim(-1)
    }

    /// The scalar at the last position where `valid` (B, T) is true, whichever side the
    /// padding is on: (B, T, C) → (B,).
    pub fn at_last_token(&self, hidden: &Tensor, valid: &Tensor) -> Tensor {
        let (b, t, c) = hidden.size3().expect("(B, T, C)");
        let positions = Tensor::arange(t, (Kind::Int64, hidden.device()));
        let last = (valid.to_kind(Kind::Int64) * positions).argmax(-1, true); // (B, 1)
        let index = last.view([b, 1, 1]).expand([b, 1, c], false);
        self.per_token(&hidden.gather(1, &index, false))
            .squeeze_dim(-1)
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, nn::VarStore};

    use super::*;

    #[test]
    fn the_score_is_read_at_the_last_real_token_on_either_padding_side() {
        let vs = VarStore::new(Device::Cpu);
        let head = ScalarHead::new(vs.root() / "score", 3);
        let mut variables = vs.variables();
        let weight = variables.get_mut("score.weight").unwrap();
        tch::no_grad(|| weight.copy_(&Tensor::from_slice(&[1.0f32, 10.0, 100.0]).view([1, 3])));
        let hidden = Tensor::arange(2 * 4 * 3, (Kind::Float, Device::Cpu)).view([2, 4, 3]);
        let per_token = head.per_token(&hidden);
        assert_eq!(per_token.size(), [2, 4]);
        // Row 0 right-padded (last real token at 1), row 1 left-padded (last at 3).
        let valid =
            Tensor::from_slice(&[true, true, false, false, false, true, true, true]).view([2, 4]);
        let scores: Vec<f32> = Vec::try_from(&head.at_last_token(&hidden, &valid)).unwrap();
        let expect = |row: i64, pos: i64| per_token.double_value(&[row, pos]) as f32;
        assert_eq!(scores, [expect(0, 1), expect(1, 3)]);
        assert_eq!(scores[0], 3.0 + 40.0 + 500.0);
    }
}
