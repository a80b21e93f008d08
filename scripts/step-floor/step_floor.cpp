// How fast one decode step of a model can be with libtorch's kernels on this machine, whoever
// issues them: a decode step's ops run from C++ (no Python, no Rust bindings) on random tensors
// of the model's shape, at batch S with W cached columns, timed over STEPS steps. Prints one
// line per variant, "NAME MS" (milliseconds per step):
//   prefloop  prefloop's decode step op for op (crates/model/src/llama.rs, generate.rs):
//             rms_norm, fused qkv, RoPE by roll, one cache scatter, folded-GQA SDPA under a key
//             mask, o_proj + residual, rms_norm, fused gate_up, SiLU·mul, down_proj + residual;
//             the LM head, top-k and logsumexp
//   fused-norm, fused-norm+math
//             the same step with layer_norm (one kernel) in place of rms_norm (on the CPU a
//             composite of about 7 kernels): what a fused RMSNorm kernel would cost; and also
//             with attention as matmul, softmax, matmul instead of SDPA
//   floor, floor+math
//             only what no decoder can skip, each as one call: per layer two norms (layer_norm's
//             one kernel), four matmuls and attention (SDPA; or matmul-softmax-matmul); then the
//             LM head and top-k. A lower bound: RoPE, the cache write, SiLU·mul, the log-prob
//             and sampling are left out.
// scripts/decode-floor builds and runs it.
//
//   step_floor LAYERS HIDDEN HEADS KV_HEADS HEAD_DIM INTERMEDIATE VOCAB S W STEPS
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

using at::Tensor;

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr,
                 "usage: step_floor LAYERS HIDDEN HEADS KV_HEADS HEAD_DIM INTERMEDIATE VOCAB S W "
                 "STEPS\n");
    return 2;
  }
  const long L = atol(argv[1]), C = atol(argv[2]), H = atol(argv[3]), G = atol(argv[4]),
             D = atol(argv[5]), I = atol(argv[6]), V = atol(argv[7]), S = atol(argv[8]),
             W = atol(argv[9]), steps = atol(argv[10]);
  at::NoGradGuard no_grad;
  const auto f = at::TensorOptions().dtype(at::kFloat);
  const double eps = 1e-5, scale = 1.0 / std::sqrt(double(D));
  const long top_k = std::min(200L, V);  // bench generate's top-k

  std::vector<Tensor> qkv_w, o_w, gate_up_w, down_w, norm_w, cache;
  for (long l = 0; l < L; l++) {
    qkv_w.push_back(at::randn({(H + 2 * G) * D, C}, f) * 0.1);
    o_w.push_back(at::randn({C, H * D}, f) * 0.1);
    gate_up_w.push_back(at::randn({2 * I, C}, f) * 0.1);
    down_w.push_back(at::randn({C, I}, f) * 0.1);
    norm_w.push_back(at::ones({C}, f));
    cache.push_back(at::randn({S, 2 * G, W + 64, D}, f));  // (S, 2 KV, capacity, D)
  }
  const Tensor lm_head = at::randn({V, C}, f) * 0.1;
  const Tensor x0 = at::randn({S, C}, f);
  const Tensor at_column = at::full({S, 1, 1, 1}, W - 1, at::kLong).expand({S, 2 * G, 1, D});
  const Tensor mask = at::zeros({S, 1, 1, W}, f);
  const Tensor cos = at::rand({S, H + 2 * G, 1, D}, f), sin = at::rand({S, H + 2 * G, 1, D}, f);

  auto norm = [&](const Tensor& x, long l, bool fused) {
    return fused ? at::layer_norm(x, {C}, norm_w[l], {}, eps)
                 : at::rms_norm(x, {C}, norm_w[l], eps);
  };
  // q (S, KV, G, D) against the layer's first W cached columns.
  auto attention = [&](const Tensor& q, long l, bool math) {
    auto kv = cache[l].narrow(2, 0, W).chunk(2, 1);  // (S, KV, W, D) each
    if (!math) return at::scaled_dot_product_attention(q, kv[0], kv[1], mask);
    Tensor scores = at::matmul(q, kv[0].transpose(-1, -2));
    scores.mul_(scale).add_(mask);
    return at::matmul(scores.softmax(-1), kv[1]);
  };
  auto step = [&](bool fused, bool math) {
    Tensor x = x0;
    for (long l = 0; l < L; l++) {
      Tensor qkv = at::linear(norm(x, l, fused), qkv_w[l]).view({S, H + 2 * G, 1, D});
      Tensor rotated = qkv.roll({D / 2}, {-1});
      rotated.mul_(sin);
      rotated.addcmul_(qkv, cos);
      auto heads = rotated.split_with_sizes({H, 2 * G}, 1);
      cache[l].scatter_(2, at_column, heads[1]);
      Tensor y = attention(heads[0].view({S, G, H / G, D}), l, math).reshape({S, H * D});
      x = at::linear(y, o_w[l], x);
      auto gate_up = at::linear(norm(x, l, fused), gate_up_w[l]).chunk(2, -1);
      Tensor h = at::silu(gate_up[0]);
      h.mul_(gate_up[1]);
      x = at::linear(h, down_w[l], x);
    }
    Tensor logits = at::linear(norm(x, 0, fused), lm_head);
    auto top = logits.topk(top_k, -1, true, true);
    return std::get<0>(top).select(1, 0) - logits.logsumexp({-1});
  };
  const Tensor q = at::randn({S, G, H / G, D}, f), y = at::randn({S, H * D}, f),
               h = at::randn({S, I}, f);
  auto floor = [&](bool math) {
    Tensor x = x0;
    for (long l = 0; l < L; l++) {
      at::linear(norm(x, l, true), qkv_w[l]);
      attention(q, l, math);
      x = at::linear(y, o_w[l], x);
      at::linear(norm(x, l, true), gate_up_w[l]);
      x = at::linear(h, down_w[l], x);
    }
    return std::get<0>(at::linear(norm(x, 0, true), lm_head).topk(top_k, -1, true, true));
  };
  auto time = [&](const char* name, auto&& run) {
    for (int i = 0; i < 8; i++) run();
    const auto began = std::chrono::steady_clock::now();
    for (long i = 0; i < steps; i++) run();
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - began;
    std::printf("%s %.4f\n", name, took.count() / steps);
  };
  time("prefloop", [&] { return step(false, false); });
  time("fused-norm", [&] { return step(true, false); });
  time("fused-norm+math", [&] { return step(true, true); });
  time("floor", [&] { return floor(false); });
  time("floor+math", [&] { return floor(true); });
  return 0;
}
