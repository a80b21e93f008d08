"""The eager PyTorch decoder `prefloop bench generate --eager-python` times against prefloop's
sampler: a model's Hugging Face weights in plain PyTorch, a preallocated KV cache per layer,
SDPA with grouped-query heads, top-k sampling, all rows the same length (no mask) — a user's
best plain PyTorch. Times NEW decode steps after a prefill and a warm-up; prints milliseconds
per step.

    python eager_decoder.py MODEL_DIR DTYPE BATCH PROMPT_LEN NEW TOP_K
"""
import json, sys, time, torch
import torch.nn.functional as F
from safetensors.torch import load_file
model_dir, dtype = sys.argv[1], getattr(torch, sys.argv[2])
bs, plen, new, topk = map(int, sys.argv[3:7])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_grad_enabled(False)
cfg = json.load(open(f"{model_dir}/config.json"))
W = {k: v.to(device, dtype) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
KV = cfg.get("num_key_value_heads") or H
D = cfg.get("head_dim") or cfg["hidden_size"] // H
eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
emb = W["model.embed_tokens.weight"]
head = W.get("lm_head.weight", emb)
norm = W["model.norm.weight"]
p = lambda i, n: W[f"model.layers.{i}.{n}"]
layers = [{n: p(i, n + ".weight") for n in ["input_layernorm", "post_attention_layernorm",
          "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]} for i in range(L)]
bias = {i: {n: W.get(f"model.layers.{i}.self_attn.{n}.bias") for n in "qkv"} for i in range(L)}
C = plen + new + 8
inv = 1.0 / theta ** (torch.arange(0, D, 2, device=device).float() / D)
freqs = torch.arange(C, device=device).float()[:, None] * inv[None]
cos, sin = (torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype))
kc = [torch.zeros(bs, KV, C, D, device=device, dtype=dtype) for _ in range(L)]
vc = [torch.zeros(bs, KV, C, D, device=device, dtype=dtype) for _ in range(L)]

def rms(x, w):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

def rot(x, c, s):
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat([-x2, x1], -1) * s

def lin(x, w, b=None):
    return F.linear(x, w, b)

def forward(ids, start):
    B, T = ids.shape
    x = emb[ids]
    c, s = cos[start:start + T], sin[start:start + T]
    for i, l in enumerate(layers):
        h = rms(x, l["input_layernorm"])
        q = lin(h, l["self_attn.q_proj"], bias[i]["q"]).view(B, T, H, D).transpose(1, 2)
        k = lin(h, l["self_attn.k_proj"], bias[i]["k"]).view(B, T, KV, D).transpose(1, 2)
        v = lin(h, l["self_attn.v_proj"], bias[i]["v"]).view(B, T, KV, D).transpose(1, 2)
        q, k = rot(q, c, s), rot(k, c, s)
        kc[i][:, :, start:start + T] = k
        vc[i][:, :, start:start + T] = v
        a = F.scaled_dot_product_attention(q, kc[i][:, :, :start + T], vc[i][:, :, :start + T],
                                           is_causal=T > 1, enable_gqa=True)
        x = x + lin(a.transpose(1, 2).reshape(B, T, H * D), l["self_attn.o_proj"])
        h = rms(x, l["post_attention_layernorm"])
        x = x + lin(F.silu(lin(h, l["mlp.gate_proj"])) * lin(h, l["mlp.up_proj"]), l["mlp.down_proj"])
    return lin(rms(x[:, -1], norm), head).float()

def sample(logits):
    top, idx = logits.topk(topk, -1)
    return idx.gather(1, torch.multinomial(top.softmax(-1), 1))

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

ids = torch.randint(100, cfg["vocab_size"] - 100, (bs, plen), device=device)
warm = 4
tok = sample(forward(ids, 0))
for t in range(warm):
    tok = sample(forward(tok, plen + t))
sync()
began = time.perf_counter()
for t in range(new):
    tok = sample(forward(tok, plen + warm + t))
sync()
elapsed = time.perf_counter() - began
print(f"{elapsed / new * 1000:.4f}")
