// One recurrent acting step of MambaDM's whole stack of GLoMa layers on the CPU, in one call.
//
// At one env per call an action costs the number of ops, not their size: the readable step (`GLoMaBlock.step`,
// mambadm/model/gloma.py, over `Mamba.step` in mambadm/ssm/mixer.py) makes dozens of PyTorch calls per layer at
// a few microseconds of interpreter and dispatch each. Here the matmuls and norms are ATen calls made from C++, the
// causal conv, the segment masks and the copies are plain loops, and the recurrence is the fused scan kernel
// (mamba_cpu.cpp). tests/test_model.py checks the result against `GLoMaBlock.step` and `GLoMaBlock.forward`.
//
// Per layer, for a chunk x (B, L, d) of tokens whose first token has index token_index[b] in its episode:
//
//     h = LN1(x);  [u_g z_g u_l z_l] = in_proj(h);  per branch c (0 = global, 1 = local):
//     u_c = silu(causal_conv_c(u_c)),  (dt, B, C) = x_proj_c(u_c),
//     y_c = scan_c(u_c, softplus(dt_proj_c(dt) + dt_bias_c), B, C, A_c, D_c, z_c),
//     x = x + fuse(out_proj_g(y_g), out_proj_l(y_l), h);  x = x + FFN(LN2(x))
//
// The global branch's segment starts at token index 0 (the episode start), the local branch's at every multiple of
// window_tokens; a segment start resets the SSM state before its token, and the conv never reads across one.
// Dropout is not applied (acting runs in eval mode).
//
// States, all layers in one tensor each, updated in place: conv (n_layer, 2, B, d_conv, d_inner), the newest input
// last; ssm (n_layer, 2, B, d_inner, d_state). Weights: kPerLayer tensors per layer in the order of `Weight`
// (the layouts are noted there); the optional ones may be None. float32 throughout.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "mamba_cpu.h"

namespace {

enum Weight : int64_t {
  kNorm1W, kNorm1B,  // (d,) each
  kInW, kInB,        // (4 d_inner, d), rows [u_g, z_g, u_l, z_l]; bias (4 d_inner,) or None
  kConvW, kConvB,    // (2, d_conv, d_inner), (2, d_inner)
  kXW,               // (2, d_inner, dt_rank + 2 d_state): x_proj transposed, columns [dt, B, C]
  kDtW, kDtB,        // (2, dt_rank, d_inner): dt_proj transposed; bias (2, d_inner)
  kA, kD,            // (2, d_inner, d_state): the continuous A = -exp(A_log); (2, d_inner)
  kOutW, kOutB,      // (2, d_inner, d): out_proj transposed; bias (2, d) or None
  kFuseW, kFuseB,    // gate: (d, d), (d,); concat: (d, 2 d), (d,); add: None
  kNorm2W, kNorm2B,  // (d,) each
  kFfn1W, kFfn1B,    // (f, d), (f,)
  kFfn2W, kFfn2B,    // (d, f), (d,)
  kPerLayer
};

enum Fusion : int64_t { kAdd = 0, kGate = 1, kConcat = 2 };

constexpr int64_t kScanChunk = 64;

// The causal conv + SiLU of both branches over the chunk, from and into the conv state, with the segment masks:
// u and z (2, B, L, d_inner) contiguous (branch-major, as the batched matmuls want them), keep (2, B, L, 1) 0 where
// a token starts a segment, any_start whether some token does.
void conv_step(const at::Tensor& xz, const int64_t* token_index, int64_t window_tokens, const at::Tensor& conv_w,
               const at::Tensor& conv_b, at::Tensor& conv_state, at::Tensor& u, at::Tensor& z, at::Tensor& keep,
               bool& any_start) {
  const int64_t B = xz.size(0), L = xz.size(1), Di = u.size(3), K = conv_w.size(1);
  const float* xzp = xz.data_ptr<float>();
  const float* w = conv_w.data_ptr<float>();
  const float* bias = conv_b.data_ptr<float>();
  float* state = conv_state.data_ptr<float>();
  float* up = u.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  float* kp = keep.data_ptr<float>();
  std::vector<int64_t> seg(L);
  std::vector<float> new_state(K * Di);
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t b = 0; b < B; ++b) {
      float* st = state + (c * B + b) * K * Di;  // (K, Di), newest last
      int64_t count = 0;
      for (int64_t j = 0; j < L; ++j) {
        const int64_t idx = token_index[b] + j;
        const bool start = c == 0 ? idx == 0 : idx % window_tokens == 0;
        count += start;
        seg[j] = count;  // the cached history is segment 0
        kp[(c * B + b) * L + j] = start ? 0.0f : 1.0f;
      }
      any_start = any_start || count > 0;
      // input p of the chunk (p < 0: the state's entry K + p) and its segment
      auto input = [&](int64_t p) { return p >= 0 ? xzp + (b * L + p) * 4 * Di + 2 * c * Di : st + (K + p) * Di; };
      auto seg_at = [&](int64_t p) { return p >= 0 ? seg[p] : int64_t(0); };
      for (int64_t j = 0; j < L; ++j) {
        float* o = up + ((c * B + b) * L + j) * Di;
        std::copy(bias + c * Di, bias + (c + 1) * Di, o);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t p = j - (K - 1) + k;
          if (seg_at(p) != seg[j]) continue;  // tap reads across a segment start: zero, as in a fresh sequence
          const float* in = input(p);
          const float* wk = w + (c * K + k) * Di;
#pragma omp simd
          for (int64_t i = 0; i < Di; ++i) o[i] += wk[i] * in[i];
        }
#pragma omp simd
        for (int64_t i = 0; i < Di; ++i) o[i] = o[i] / (1.0f + std::exp(-o[i]));
        const float* zs = xzp + (b * L + j) * 4 * Di + (2 * c + 1) * Di;
        std::copy(zs, zs + Di, zp + ((c * B + b) * L + j) * Di);
      }
      for (int64_t m = 0; m < K; ++m) {  // the last K inputs of the last token's segment become the state
        const int64_t p = L - K + m;
        float* dst = new_state.data() + m * Di;
        if (seg_at(p) == seg[L - 1]) {
          const float* in = input(p);
          std::copy(in, in + Di, dst);
        } else {
          std::fill(dst, dst + Di, 0.0f);
        }
      }
      std::copy(new_state.begin(), new_state.end(), st);
    }
  }
}

// LayerNorm over the rows of x (rows, d) -> a new tensor: a loop, for the few rows of an acting step (the ATen
// call's fixed cost is several times its arithmetic here).
at::Tensor layer_norm_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t rows = x.size(0), d = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float* o = op + r * d;
    float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += xr[i];
    const float mean = sum / d;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < d; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const float rstd = 1.0f / std::sqrt(sq / d + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] - mean) * rstd * w[i] + b[i];
  }
  return out;
}

// GELU in place, exact (erf) or with the tanh approximation, as torch's; a loop for the same reason.
void gelu_inplace(at::Tensor& a, bool tanh_approximation) {
  float* p = a.data_ptr<float>();
  const int64_t n = a.numel();
  if (tanh_approximation) {
    const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      p[i] = 0.5f * p[i] * (1.0f + std::tanh(k * (p[i] + 0.044715f * p[i] * p[i] * p[i])));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = 0.5f * p[i] * (1.0f + std::erf(p[i] * static_cast<float>(M_SQRT1_2)));
  }
}

// One layer's weights, with the per-branch parts split off once when the stack is made (a select per call costs
// about a microsecond, and an acting step at one env is made of such microseconds).
struct LayerWeights {
  at::Tensor norm1_w, norm1_b, in_w, conv_w, conv_b, x_w, dt_w, norm2_w, norm2_b, ffn1_w, ffn1_b, ffn2_wt, ffn2_b;
  std::optional<at::Tensor> in_b, fuse_w, fuse_b, out_b_sum;
  at::Tensor A, D, dt_b, out_w[2];  // A (2, Di, N), D and dt_b (2, Di): grouped per branch for the scan
  std::optional<at::Tensor> out_b[2];
  double eps1, eps2;
};

// The stack: weights, the conv and SSM states of every layer (updated in place by `step`) and the options.
class GLoMaStack : public torch::CustomClassHolder {
 public:
  GLoMaStack(const c10::List<std::optional<at::Tensor>>& weights, std::vector<double> eps, int64_t fusion,
             std::string approximate, int64_t window_tokens, at::Tensor conv_state, at::Tensor ssm_state)
      : fusion_(fusion), tanh_gelu_(approximate == "tanh"), window_tokens_(window_tokens),
        conv_state_(std::move(conv_state)), ssm_state_(std::move(ssm_state)) {
    const int64_t n_layer = conv_state_.size(0);
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layer * kPerLayer, "GLoMaStack: expected ",
                n_layer * kPerLayer, " weights for ", n_layer, " layers, got ", weights.size());
    TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * n_layer, "GLoMaStack: expected 2 eps per layer");
    TORCH_CHECK(window_tokens > 0, "GLoMaStack: window_tokens must be positive");
    TORCH_CHECK(fusion == kAdd || fusion == kGate || fusion == kConcat, "GLoMaStack: unknown fusion ", fusion);
    TORCH_CHECK(approximate == "none" || approximate == "tanh", "GLoMaStack: unknown GELU approximation ",
                approximate);
    TORCH_CHECK(conv_state_.is_contiguous() && ssm_state_.is_contiguous(), "GLoMaStack: states must be contiguous");
    for (int64_t i = 0; i < n_layer; ++i) {
      auto get = [&](Weight k) { return weights.get(i * kPerLayer + k); };
      auto need = [&](Weight k) {
        std::optional<at::Tensor> t = get(k);
        TORCH_CHECK(t && t->scalar_type() == at::kFloat && t->is_contiguous(), "GLoMaStack: weight ", k,
                    " of layer ", i, " must be a contiguous float32 tensor");
        return *t;
      };
      LayerWeights w;
      w.norm1_w = need(kNorm1W), w.norm1_b = need(kNorm1B), w.in_w = need(kInW), w.in_b = get(kInB);
      w.conv_w = need(kConvW), w.conv_b = need(kConvB), w.x_w = need(kXW), w.dt_w = need(kDtW);
      w.norm2_w = need(kNorm2W), w.norm2_b = need(kNorm2B), w.ffn1_w = need(kFfn1W), w.ffn1_b = need(kFfn1B);
      w.ffn2_wt = need(kFfn2W).t(), w.ffn2_b = need(kFfn2B), w.fuse_b = get(kFuseB);
      if (fusion != kAdd) w.fuse_w = need(kFuseW);  // the gate's or the merge's weight
      const std::optional<at::Tensor> out_b = get(kOutB);
      for (int64_t c = 0; c < 2; ++c) {
        w.out_w[c] = need(kOutW)[c];
        if (out_b) w.out_b[c] = (*out_b)[c];
      }
      if (out_b) w.out_b_sum = (*out_b)[0] + (*out_b)[1];
      w.A = need(kA), w.D = need(kD), w.dt_b = need(kDtB);
      w.eps1 = eps[2 * i], w.eps2 = eps[2 * i + 1];
      layers_.push_back(std::move(w));
    }
  }

  // x (B, L, d), the chunk whose first token has index token_index[b] -> the stack's output (B, L, d).
  at::Tensor step(const at::Tensor& x, const at::Tensor& token_index) {
    TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "GLoMaStack.step: x must be a float32 (B, L, d) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
    const int64_t B = x.size(0), L = x.size(1);
    TORCH_CHECK(B == conv_state_.size(2), "GLoMaStack.step: the states hold ", conv_state_.size(2), " envs, x ", B);
    TORCH_CHECK(token_index.scalar_type() == at::kLong && token_index.numel() == B && token_index.is_contiguous(),
                "GLoMaStack.step: token_index must be (B,) int64");
    at::Tensor x2 = x.reshape({B * L, x.size(2)}).clone();
    for (size_t i = 0; i < layers_.size(); ++i) {
      layer_step(layers_[i], x2, B, L, token_index.data_ptr<int64_t>(), conv_state_[i], ssm_state_[i]);
    }
    return x2.view({B, L, x.size(2)});
  }

 private:
  // One layer over x2 (B L, d), updated in place.
  void layer_step(const LayerWeights& w, at::Tensor& x2, int64_t B, int64_t L, const int64_t* token_index,
                  at::Tensor conv_state, at::Tensor ssm_state) const {
    const int64_t Di = w.dt_w.size(2), N = w.A.size(2), R = w.dt_w.size(1);
    const at::Tensor h = layer_norm_rows(x2, w.norm1_w, w.norm1_b, w.eps1);
    const at::Tensor xz = at::linear(h, w.in_w, w.in_b).view({B, L, 4 * Di});
    at::Tensor u = at::empty({2, B, L, Di}, x2.options());
    at::Tensor z = at::empty({2, B, L, Di}, x2.options());
    at::Tensor keep = at::empty({2, B, L, 1}, x2.options());
    bool any_start = false;
    conv_step(xz, token_index, window_tokens_, w.conv_w, w.conv_b, conv_state, u, z, keep, any_start);

    const at::Tensor dbc = at::bmm(u.view({2, B * L, Di}), w.x_w);  // (2, B L, R + 2N): [dt, B, C]
    const at::Tensor delta = at::bmm(dbc.narrow(2, 0, R), w.dt_w);  // (2, B L, Di), before bias and softplus
    // Both branches in one scan: rows (branch, env), the first B rows using the global branch's A, D and dt bias.
    const at::Tensor rows = dbc.view({2 * B, L, R + 2 * N});
    at::Tensor h0 = ssm_state.view({2 * B, Di, N});
    std::vector<at::Tensor> res = mambadm::selective_scan_forward(
        u.view({2 * B, L, Di}), delta.view({2 * B, L, Di}), w.A, rows.narrow(2, R, N), rows.narrow(2, R + N, N), w.D,
        z.view({2 * B, L, Di}), w.dt_b, /*softplus=*/true, h0,
        any_start ? std::optional<at::Tensor>(keep.view({2 * B, L, 1})) : std::nullopt, std::nullopt, kScanChunk,
        /*save_starts=*/false);
    h0.copy_(res[1]);
    const at::Tensor y = res[0].view({2, B * L, Di});

    if (fusion_ == kAdd) {  // x + out_g(y_g) + out_l(y_l)
      x2.addmm_(y[0], w.out_w[0]).addmm_(y[1], w.out_w[1]);
      if (w.out_b_sum) x2.add_(*w.out_b_sum);
    } else {
      at::Tensor g = at::mm(y[0], w.out_w[0]), l = at::mm(y[1], w.out_w[1]);
      if (w.out_b[0]) {
        g.add_(*w.out_b[0]);
        l.add_(*w.out_b[1]);
      }
      if (fusion_ == kGate) {  // s g + (1 - s) l = l + s (g - l)
        const at::Tensor s = at::linear(h, *w.fuse_w, w.fuse_b).sigmoid_();
        x2.add_(l).add_(s.mul_(g.sub_(l)));
      } else {
        x2.add_(at::linear(at::cat({g, l}, 1), *w.fuse_w, w.fuse_b));
      }
    }

    at::Tensor a = at::linear(layer_norm_rows(x2, w.norm2_w, w.norm2_b, w.eps2), w.ffn1_w, w.ffn1_b);
    gelu_inplace(a, tanh_gelu_);
    x2.addmm_(a, w.ffn2_wt).add_(w.ffn2_b);
  }

  std::vector<LayerWeights> layers_;
  int64_t fusion_;
  bool tanh_gelu_;
  int64_t window_tokens_;
  at::Tensor conv_state_, ssm_state_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(mambadm_cpu, m) {
  m.class_<GLoMaStack>("GLoMaStack")
      .def(torch::init<const c10::List<std::optional<at::Tensor>>&, std::vector<double>, int64_t, std::string,
                       int64_t, at::Tensor, at::Tensor>())
      .def("step", &GLoMaStack::step);
}
