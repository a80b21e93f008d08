//! The compute dtype, as a setting. `auto` is the one place where the device decides: bf16 on
//! CUDA, fp32 elsewhere. Everything else (KV cache, heads, optimiser state, EMA shadows) takes
//! the dtype of the model it belongs to, so a CPU test that asks for bf16 runs the exact code a
//! GPU runs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Precision of a model's weights and activations. Default `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a CUDA device, fp32 on the CPU.
    #[default]
    Auto,
    /// bf16 weights and activations on any device (trainers keep fp32 master weights).
    Bf16,
    /// fp32 everywhere.
    Fp32,
}

impl Precision {
    /// The dtype weights are held in on `device`.
    pub fn kind(self, device: Device) -> Kind {
        match self {
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp32 => Kind::Float,
            Precision::Auto if device.is_cuda() => Kind::BFloat16,
            Precision::Auto => Kind::Float,
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp32" | "float32" | "f32" => Ok(Self::Fp32),
            other => Err(format!("unknown dtype {other:?} (auto, bf16, fp32)")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Bf16 => "bf16",
            Self::Fp32 => "fp32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_device_and_the_others_do_not() {
        assert_eq!(Precision::Auto.kind(Device::Cpu), Kind::Float);
        assert_eq!(Precision::Auto.kind(Device::Cuda(0)), Kind::BFloat16);
        assert_eq!(Precision::Bf16.kind(Device::Cpu), Kind::BFloat16);
        assert_eq!(Precision::Fp32.kind(Device::Cuda(0)), Kind::Float);
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("fp8".parse::<Precision>().unwrap_err().contains("fp8"));
        let parsed: Precision = serde_json::from_str("\"fp32\"").unwrap();
        assert_eq!(parsed.to_string(), "fp32");
    }
}
