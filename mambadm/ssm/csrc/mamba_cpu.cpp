// The Mamba mixer's two sequence kernels for CPUs: the selective scan and the causal depthwise conv + SiLU.
//
// Selective scan: the recurrence of scan_ref.py as one loop over time per batch row, with the
// state (d_inner x d_state) kept in cache and every term of the forward and backward computed in the same pass.
//
// With delta' = softplus(delta + delta_bias) (or delta + delta_bias), a_t = keep_t exp(delta'_t A) and
// x_t = delta'_t u_t B_t, per batch row b, channel d and state n:
//
//     h_t = a_t * h_{t-1} + x_t,     y_t = <h_t, C_t>,     out_t = (y_t + D u_t) * silu(z_t)
//
// keep (optional, 0 or 1 per row and step) resets the state before a step, as a window start does in acting.
// A is (groups, d_inner, d_state): row b uses A[b % groups] (the two branches of a GLoMa layer stepped as one).
//
// The forward stores the state at the start of every chunk of `chunk` steps; the backward recomputes one chunk of
// one block of channels at a time into a small buffer and runs the adjoint recurrence
//
//     g_t = C_t * dy_t + a_{t+1} * g_{t+1}
//
// backwards through it, so no (L, d_inner, d_state) tensor is ever made. Rows are independent: the parallel loop
// runs over batch rows; the reductions over rows (dA, dD, d delta_bias) go to per-row partial sums that the caller
// adds up. Inputs may have any strides (channels are made contiguous if they are not). Per-channel terms
// (softplus, gates, the gradient epilogues) are computed in vectorised passes over channels, and the d_state
// loops of the recurrences in vectorised passes over states.
//
// Causal depthwise conv + SiLU over the time axis of (rows, L, channels), K taps, zeros before the start:
//
//     pre_t = bias + sum_k w[:, k] * x_{t-K+1+k},     out_t = silu(pre_t)
//
// one pass forward; the backward recomputes pre_t and returns the gradients of x, w and bias (w and bias as
// per-row partial sums), vectorised over channels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 32;  // channels recomputed together in the backward (buffers stay in L2)

template <typename T>
struct View3 {  // a (rows, steps, channels) view whose channels are contiguous
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0;
  View3() = default;
  explicit View3(const at::Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  const T* row(int64_t b, int64_t t) const { return data + b * s0 + t * s1; }
  explicit operator bool() const { return data != nullptr; }
};

template <typename T>
inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

struct Args {
  at::Tensor u, delta, A, B, C, D, z, delta_bias, h0, keep;
  bool softplus;
  int64_t chunk;
};

// Per-step terms of channels [d0, d0 + nd) of row b, steps [s, s + len), into (len, nd) buffers, vectorised over
// channels: delta' (dl), x = delta' u (x), and sigmoid(delta + bias) (sig, the softplus derivative) when asked.
template <typename T>
void step_terms(const View3<T>& u, const View3<T>& delta, const T* bias, bool sp, int64_t b, int64_t s,
                int64_t len, int64_t d0, int64_t nd, T* dl, T* x, T* sig) {
  for (int64_t j = 0; j < len; ++j) {
    const T* up = u.row(b, s + j) + d0;
    const T* dp = delta.row(b, s + j) + d0;
    const T* bp = bias ? bias + d0 : nullptr;
    T* dlj = dl + j * nd;
    T* xj = x + j * nd;
#pragma omp simd
    for (int64_t i = 0; i < nd; ++i) {
      const T pre = dp[i] + (bp ? bp[i] : T(0));
      const T v = sp ? softplus(pre) : pre;
      dlj[i] = v;
      xj[i] = v * up[i];
    }
    if (sig && sp) {
      T* sj = sig + j * nd;
#pragma omp simd
      for (int64_t i = 0; i < nd; ++i) sj[i] = sigmoid(dp[i] + (bp ? bp[i] : T(0)));
    }
  }
}

// NS: d_state known at compile time (16, the default, lets the compiler unroll the state loops), or 0: any.
template <typename T, int64_t NS>
std::vector<at::Tensor> forward_impl(const Args& a) {
  const int64_t rows = a.u.size(0), L = a.u.size(1), Dn = a.u.size(2), G = a.A.size(0);
  const int64_t N = NS ? NS : a.A.size(2);
  const int64_t chunk = a.chunk, n_chunks = (L + chunk - 1) / chunk;
  auto opts = a.u.options();
  at::Tensor out = at::empty({rows, L, Dn}, opts);
  at::Tensor last = at::empty({rows, Dn, N}, opts);
  at::Tensor starts = at::empty({rows, std::max<int64_t>(n_chunks, 1), Dn, N}, opts);
  View3<T> u(a.u), delta(a.delta), B(a.B), C(a.C), z, keep;
  if (a.z.defined()) z = View3<T>(a.z);
  if (a.keep.defined()) keep = View3<T>(a.keep);
  const T* A = a.A.data_ptr<T>();
  const T* Dv = a.D.defined() ? a.D.data_ptr<T>() : nullptr;
  const T* bias = a.delta_bias.defined() ? a.delta_bias.data_ptr<T>() : nullptr;
  const T* h0 = a.h0.defined() ? a.h0.data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  T* lst = last.data_ptr<T>();
  T* st = starts.data_ptr<T>();
  const bool sp = a.softplus;

  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    const int64_t T_max = std::min(chunk, L);
    std::vector<T> dl(T_max * Dn), x(T_max * Dn), y(T_max * Dn);
    for (int64_t b = r0; b < r1; ++b) {
      T* h = lst + b * Dn * N;  // the running state lives in the output `last`
      if (h0) std::copy(h0 + b * Dn * N, h0 + (b + 1) * Dn * N, h);
      else std::fill(h, h + Dn * N, T(0));
      const T* Ab = A + (b % G) * Dn * N;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t s = c * chunk, len = std::min(chunk, L - s);
        std::copy(h, h + Dn * N, st + (b * n_chunks + c) * Dn * N);
        step_terms(u, delta, bias, sp, b, s, len, 0, Dn, dl.data(), x.data(), static_cast<T*>(nullptr));
        for (int64_t j = 0; j < len; ++j) {
          const T* Bp = B.row(b, s + j);
          const T* Cp = C.row(b, s + j);
          const T k = keep ? keep.row(b, s + j)[0] : T(1);
          for (int64_t d = 0; d < Dn; ++d) {
            const T dld = dl[j * Dn + d], xd = x[j * Dn + d];
            T* hd = h + d * N;
            const T* Ad = Ab + d * N;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t n = 0; n < N; ++n) {
              const T hn = k * std::exp(dld * Ad[n]) * hd[n] + xd * Bp[n];
              hd[n] = hn;
              acc += hn * Cp[n];
            }
            y[j * Dn + d] = acc;
          }
          // out = (y + D u) * silu(z), vectorised over channels
          const T* up = u.row(b, s + j);
          const T* zp = z ? z.row(b, s + j) : nullptr;
          const T* yj = y.data() + j * Dn;
          T* oj = o + (b * L + s + j) * Dn;
#pragma omp simd
          for (int64_t d = 0; d < Dn; ++d) {
            T v = yj[d] + (Dv ? Dv[d] * up[d] : T(0));
            oj[d] = zp ? v * zp[d] * sigmoid(zp[d]) : v;
          }
        }
      }
    }
  });
  return {out, last, starts};
}

template <typename T, int64_t NS>
std::vector<at::Tensor> backward_impl(const Args& a, const at::Tensor& starts, const at::Tensor& grad_out_t,
                                      const std::optional<at::Tensor>& grad_last) {
  const int64_t rows = a.u.size(0), L = a.u.size(1), Dn = a.u.size(2), G = a.A.size(0);
  const int64_t N = NS ? NS : a.A.size(2);
  const int64_t chunk = a.chunk, n_chunks = starts.size(1);
  auto opts = a.u.options();
  at::Tensor g_u = at::empty({rows, L, Dn}, opts), g_delta = at::empty({rows, L, Dn}, opts);
  at::Tensor g_B = at::zeros({rows, L, N}, opts), g_C = at::zeros({rows, L, N}, opts);
  at::Tensor g_z = a.z.defined() ? at::empty({rows, L, Dn}, opts) : at::Tensor();
  at::Tensor g_A_rows = at::zeros({rows, Dn, N}, opts);  // summed over rows by the caller
  at::Tensor g_D_rows = at::zeros({rows, Dn}, opts);     // idem
  at::Tensor g_bias_rows = at::zeros({rows, Dn}, opts);  // idem
  at::Tensor g_h0 = grad_last.has_value() ? grad_last->contiguous().clone() : at::zeros({rows, Dn, N}, opts);

  View3<T> u(a.u), delta(a.delta), B(a.B), C(a.C), go(grad_out_t), z, keep;
  if (a.z.defined()) z = View3<T>(a.z);
  if (a.keep.defined()) keep = View3<T>(a.keep);
  const T* A = a.A.data_ptr<T>();
  const T* Dv = a.D.defined() ? a.D.data_ptr<T>() : nullptr;
  const T* bias = a.delta_bias.defined() ? a.delta_bias.data_ptr<T>() : nullptr;
  const T* st = starts.data_ptr<T>();
  T *gu = g_u.data_ptr<T>(), *gdelta = g_delta.data_ptr<T>(), *gB = g_B.data_ptr<T>(), *gC = g_C.data_ptr<T>();
  T* gz = g_z.defined() ? g_z.data_ptr<T>() : nullptr;
  T *gA = g_A_rows.data_ptr<T>(), *gD = g_D_rows.data_ptr<T>(), *gbias = g_bias_rows.data_ptr<T>();
  T* carry_all = g_h0.data_ptr<T>();  // gradient reaching each row's state from later steps; ends as d h0
  const bool sp = a.softplus;
  const int64_t blk = std::min(kChannelBlock, Dn);

  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    const int64_t T_max = std::min(chunk, L);
    std::vector<T> hbuf((T_max + 1) * blk * N), abuf(T_max * blk * N);
    std::vector<T> dl(T_max * blk), x(T_max * blk), sig(T_max * blk), y(T_max * blk), gy(T_max * blk);
    std::vector<T> gx(T_max * blk), gdl(T_max * blk), gBt(N), gCt(N);
    for (int64_t b = r0; b < r1; ++b) {
      const T* Ab = A + (b % G) * Dn * N;
      T* carry_b = carry_all + b * Dn * N;
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t s = c * chunk, len = std::min(chunk, L - s);
        for (int64_t d0 = 0; d0 < Dn; d0 += blk) {
          const int64_t nd = std::min(blk, Dn - d0);
          step_terms(u, delta, bias, sp, b, s, len, d0, nd, dl.data(), x.data(), sig.data());
          // recompute decays a_t and states (hbuf[j] = h_{s+j-1}) of this chunk and block, and y_t = <h_t, C_t>
          const T* h_start = st + ((b * n_chunks + c) * Dn + d0) * N;
          std::copy(h_start, h_start + nd * N, hbuf.begin());
          for (int64_t j = 0; j < len; ++j) {
            const T* Bp = B.row(b, s + j);
            const T* Cp = C.row(b, s + j);
            const T k = keep ? keep.row(b, s + j)[0] : T(1);
            for (int64_t i = 0; i < nd; ++i) {
              const T dli = dl[j * nd + i], xi = x[j * nd + i];
              const T* Ad = Ab + (d0 + i) * N;
              const T* hp = &hbuf[(j * nd + i) * N];
              T* hn = &hbuf[((j + 1) * nd + i) * N];
              T* an = &abuf[(j * nd + i) * N];
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t n = 0; n < N; ++n) {
                const T av = k * std::exp(dli * Ad[n]);
                an[n] = av;
                const T hv = av * hp[n] + xi * Bp[n];
                hn[n] = hv;
                acc += hv * Cp[n];
              }
              y[j * nd + i] = acc;
            }
          }
          // out = (y + D u) * silu(z): gradients of z and D, and gy, the gradient of y
          for (int64_t j = 0; j < len; ++j) {
            const int64_t t = s + j;
            const T* up = u.row(b, t) + d0;
            const T* gop = go.row(b, t) + d0;
            const T* zp = z ? z.row(b, t) + d0 : nullptr;
            T* gzp = gz ? gz + (b * L + t) * Dn + d0 : nullptr;
            const T* Dp = Dv ? Dv + d0 : nullptr;
            T* gDp = gD + b * Dn + d0;
            T* gyj = gy.data() + j * nd;
            const T* yj = y.data() + j * nd;
#pragma omp simd
            for (int64_t i = 0; i < nd; ++i) {
              T g = gop[i];
              if (zp) {
                const T yv = yj[i] + (Dp ? Dp[i] * up[i] : T(0));
                const T sg = sigmoid(zp[i]);
                gzp[i] = g * yv * sg * (T(1) + zp[i] * (T(1) - sg));
                g *= zp[i] * sg;
              }
              gyj[i] = g;
              if (Dp) gDp[i] += g * up[i];
            }
          }
          // adjoint recurrence, backwards through the chunk
          for (int64_t j = len - 1; j >= 0; --j) {
            const int64_t t = s + j;
            const T* Bp = B.row(b, t);
            const T* Cp = C.row(b, t);
            std::fill(gBt.begin(), gBt.end(), T(0));
            std::fill(gCt.begin(), gCt.end(), T(0));
            T *gBp = gBt.data(), *gCp = gCt.data();
            for (int64_t i = 0; i < nd; ++i) {
              const T dli = dl[j * nd + i], xi = x[j * nd + i], gyi = gy[j * nd + i];
              const T* hp = &hbuf[(j * nd + i) * N];         // h_{t-1}
              const T* hn = &hbuf[((j + 1) * nd + i) * N];  // h_t
              const T* an = &abuf[(j * nd + i) * N];
              const T* Ad = Ab + (d0 + i) * N;
              T* cr = carry_b + (d0 + i) * N;
              T* gAd = gA + (b * Dn + d0 + i) * N;
              T g_x = 0, g_a = 0;  // sum_n g B_t, sum_n g a h_{t-1} A
#pragma omp simd reduction(+ : g_x, g_a)
              for (int64_t n = 0; n < N; ++n) {
                const T g = gyi * Cp[n] + cr[n];
                gCp[n] += gyi * hn[n];
                gBp[n] += g * xi;
                g_x += g * Bp[n];
                const T gda = g * an[n] * hp[n];
                g_a += gda * Ad[n];
                gAd[n] += gda * dli;
                cr[n] = an[n] * g;
              }
              gx[j * nd + i] = g_x;
              gdl[j * nd + i] = g_a;
            }
            T* gBrow = gB + (b * L + t) * N;
            T* gCrow = gC + (b * L + t) * N;
            for (int64_t n = 0; n < N; ++n) { gBrow[n] += gBp[n]; gCrow[n] += gCp[n]; }
          }
          // x = delta' u and a = exp(delta' A): gradients of u, delta (through the softplus) and delta_bias
          for (int64_t j = 0; j < len; ++j) {
            const int64_t t = s + j;
            const T* up = u.row(b, t) + d0;
            const T* Dp = Dv ? Dv + d0 : nullptr;
            T* gup = gu + (b * L + t) * Dn + d0;
            T* gdp = gdelta + (b * L + t) * Dn + d0;
            T* gbp = gbias + b * Dn + d0;
            const int64_t o = j * nd;
#pragma omp simd
            for (int64_t i = 0; i < nd; ++i) {
              gup[i] = gx[o + i] * dl[o + i] + (Dp ? gy[o + i] * Dp[i] : T(0));
              T g_pre = gdl[o + i] + gx[o + i] * up[i];
              if (sp) g_pre *= sig[o + i];
              gdp[i] = g_pre;
              if (bias) gbp[i] += g_pre;
            }
          }
        }
      }
    }
  });
  return {g_u, g_delta, g_A_rows, g_B, g_C, g_D_rows, g_z, g_bias_rows, g_h0};
}

Args make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& delta_bias, bool softplus, const std::optional<at::Tensor>& h0,
               const std::optional<at::Tensor>& keep, int64_t chunk) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU, got ", u.device());
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (rows, L, d_inner), got ", u.sizes());
  const int64_t rows = u.size(0), L = u.size(1), Dn = u.size(2);
  TORCH_CHECK(A.dim() == 3 && A.size(1) == Dn && rows % A.size(0) == 0,
              "selective_scan_cpu: A must be (groups dividing rows, d_inner, d_state), got ", A.sizes());
  const int64_t N = A.size(2);
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, "selective_scan_cpu: ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), "selective_scan_cpu: ", name, " has dtype ", t.scalar_type(),
                ", expected ", u.scalar_type());
  };
  check(delta, "delta", {rows, L, Dn});
  check(B, "B", {rows, L, N});
  check(C, "C", {rows, L, N});
  check(A, "A", {A.size(0), Dn, N});
  TORCH_CHECK(chunk > 0, "selective_scan_cpu: chunk must be positive");
  auto unit_inner = [](const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); };
  Args a{unit_inner(u), unit_inner(delta), A.contiguous(), unit_inner(B), unit_inner(C), {}, {}, {}, {}, {},
         softplus, chunk};
  if (D) { check(*D, "D", {Dn}); a.D = D->contiguous(); }
  if (z) { check(*z, "z", {rows, L, Dn}); a.z = unit_inner(*z); }
  if (delta_bias) { check(*delta_bias, "delta_bias", {Dn}); a.delta_bias = delta_bias->contiguous(); }
  if (h0) { check(*h0, "h0", {rows, Dn, N}); a.h0 = h0->contiguous(); }
  if (keep) { check(*keep, "keep", {rows, L, 1}); a.keep = keep->contiguous(); }
  return a;
}

std::vector<at::Tensor> scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                     const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                                     bool softplus, const std::optional<at::Tensor>& h0,
                                     const std::optional<at::Tensor>& keep, int64_t chunk) {
  Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, chunk);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    result = a.A.size(2) == 16 ? forward_impl<scalar_t, 16>(a) : forward_impl<scalar_t, 0>(a);
  });
  return result;
}

std::vector<at::Tensor> scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                                      bool softplus, const std::optional<at::Tensor>& h0,
                                      const std::optional<at::Tensor>& keep, int64_t chunk, const at::Tensor& starts,
                                      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_last) {
  Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, chunk);
  TORCH_CHECK(grad_out.sizes() == u.sizes(), "selective_scan_cpu: grad_out must match u, got ", grad_out.sizes());
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    const at::Tensor go = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
    result = a.A.size(2) == 16 ? backward_impl<scalar_t, 16>(a, starts.contiguous(), go, grad_last)
                               : backward_impl<scalar_t, 0>(a, starts.contiguous(), go, grad_last);
  });
  return result;
}

template <typename T>
at::Tensor conv_forward_impl(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& bias_t) {
  const int64_t rows = x_t.size(0), L = x_t.size(1), Cn = x_t.size(2), K = w_t.size(0);
  at::Tensor out = at::empty({rows, L, Cn}, x_t.options());
  View3<T> x(x_t);
  const T* w = w_t.data_ptr<T>();  // (K, channels): tap k of every channel contiguous
  const T* bias = bias_t.defined() ? bias_t.data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t t = 0; t < L; ++t) {
        T* ot = o + (b * L + t) * Cn;
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) ot[c] = bias ? bias[c] : T(0);
        for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
          const T* xs = x.row(b, t - K + 1 + k);
          const T* wk = w + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) ot[c] += wk[c] * xs[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) ot[c] = ot[c] * sigmoid(ot[c]);
      }
    }
  });
  return out;
}

template <typename T>
std::vector<at::Tensor> conv_backward_impl(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& bias_t,
                                           const at::Tensor& go_t) {
  const int64_t rows = x_t.size(0), L = x_t.size(1), Cn = x_t.size(2), K = w_t.size(0);
  auto opts = x_t.options();
  at::Tensor g_x = at::zeros({rows, L, Cn}, opts);
  at::Tensor g_w_rows = at::zeros({rows, K, Cn}, opts);  // summed over rows by the caller
  at::Tensor g_bias_rows = at::zeros({rows, Cn}, opts);  // idem
  View3<T> x(x_t), go(go_t);
  const T* w = w_t.data_ptr<T>();
  const T* bias = bias_t.defined() ? bias_t.data_ptr<T>() : nullptr;
  T *gx = g_x.data_ptr<T>(), *gw = g_w_rows.data_ptr<T>(), *gb = g_bias_rows.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> g_pre(Cn);
    for (int64_t b = r0; b < r1; ++b) {
      T* gwb = gw + b * K * Cn;
      T* gbb = gb + b * Cn;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t k0 = std::max<int64_t>(0, K - 1 - t);
        // recompute pre_t, then g_pre = g_out * silu'(pre_t)
        T* gp = g_pre.data();
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) gp[c] = bias ? bias[c] : T(0);
        for (int64_t k = k0; k < K; ++k) {
          const T* xs = x.row(b, t - K + 1 + k);
          const T* wk = w + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) gp[c] += wk[c] * xs[c];
        }
        const T* gop = go.row(b, t);
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) {
          const T sg = sigmoid(gp[c]);
          gp[c] = gop[c] * sg * (T(1) + gp[c] * (T(1) - sg));
          gbb[c] += gp[c];
        }
        for (int64_t k = k0; k < K; ++k) {
          const int64_t s = t - K + 1 + k;
          const T* xs = x.row(b, s);
          const T* wk = w + k * Cn;
          T* gxs = gx + (b * L + s) * Cn;
          T* gwk = gwb + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) {
            gxs[c] += wk[c] * gp[c];
            gwk[c] += xs[c] * gp[c];
          }
        }
      }
    }
  });
  return {g_x, g_w_rows, g_bias_rows};
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "causal_conv_silu_cpu: tensors must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "causal_conv_silu_cpu: x must be (rows, L, channels), got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(2) && w.scalar_type() == x.scalar_type(),
              "causal_conv_silu_cpu: w must be (taps, channels=", x.size(2), ") of ", x.scalar_type(), ", got ",
              w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(!bias || (bias->sizes() == at::IntArrayRef{x.size(2)} && bias->scalar_type() == x.scalar_type()),
              "causal_conv_silu_cpu: bias must be (channels,) of the input dtype");
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_conv(x, w, bias);
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_silu_cpu_forward", [&] {
    out = conv_forward_impl<scalar_t>(xc, w.contiguous(), b);
  });
  return out;
}

std::vector<at::Tensor> conv_backward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& grad_out) {
  check_conv(x, w, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "causal_conv_silu_cpu: grad_out must match x, got ", grad_out.sizes());
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor go = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_silu_cpu_backward", [&] {
    result = conv_backward_impl<scalar_t>(xc, w.contiguous(), b, go);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY(mambadm_cpu, m) {
  m.def("scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool softplus, Tensor? h0, Tensor? keep, int chunk) -> Tensor[]");
  m.def("scan_backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool softplus, Tensor? h0, Tensor? keep, int chunk, Tensor starts, Tensor grad_out, "
        "Tensor? grad_last) -> Tensor[]");
  m.def("conv_forward(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("conv_backward(Tensor x, Tensor w, Tensor? bias, Tensor grad_out) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mambadm_cpu, CPU, m) {
  m.impl("scan_forward", &scan_forward);
  m.impl("scan_backward", &scan_backward);
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
