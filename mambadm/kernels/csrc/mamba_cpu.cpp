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
// delta_proj (optional, (d_inner, R)): delta is then (rows, L, R), the low-rank step sizes before the Mamba mixer's
// dt_proj, and delta + delta_bias becomes delta_proj delta + delta_bias inside the kernels (training never makes the
// (rows, L, d_inner) step sizes or their gradient; the backward returns the gradients of delta and delta_proj).
// A is (groups, d_inner, d_state): the rows form `groups` consecutive blocks and block g uses A[g] (the two branches
// of a GLoMa layer stepped as one); D and delta_bias are (d_inner,), shared by all rows, or (groups, d_inner), grouped
// like A.
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
// per-row partial sums), vectorised over channels. With segment > 0 the sequence is cut into windows of `segment`
// steps from its start and a tap never reads across a window start (the local branch of a GLoMa layer: every
// window as if it were its own sequence).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mamba_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Channels per block: the state of a block is (d_state, kLanes) with channels innermost, so every state update,
// decay and gradient term is a whole vector (one AVX-512 float vector, two AVX2 ones) and no loop over the state
// ends in a horizontal sum. Channel counts are padded up to a multiple of kLanes inside the kernels.
constexpr int64_t kLanes = 16;

// Rows per task of at::parallel_for (which needs the extension built with OpenMP, see scan_cpp.py): enough rows that
// a task holds ~32k elements of work, so a small call (one env's acting step) stays on the calling thread instead of
// paying for a parallel region.
inline int64_t row_grain(int64_t elements_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_row));
}

// Sequence tensors (u, delta, B, C, z, the output and all their gradients) are float32, float64 or bfloat16 (IO);
// the kernels compute in T (float for bfloat16, else IO's own type) and keep parameters (A, D, delta_bias,
// delta_proj, the conv's taps and bias), states and parameter gradients in T. bfloat16 values are read exactly and
// written rounded to nearest even, as torch's casts do: a bfloat16 call returns what a float32 call on the same
// values returns, cast to bfloat16, give or take one bfloat16 step where the two builds' float32 results differ in
// the last bit (under bf16 autocast the casts around the kernels were ~12% of a step).
template <typename T>
inline T to_compute(T v) { return v; }
inline float to_compute(at::BFloat16 v) { return static_cast<float>(v); }

template <typename IO, typename T>
inline IO to_io(T v) { return static_cast<IO>(v); }

template <typename T>
struct View3 {  // a (rows, steps, channels) view whose channels are contiguous
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0;
  View3() = default;
  explicit View3(const at::Tensor& t) : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  const T* row(int64_t b, int64_t t) const { return data + b * s0 + t * s1; }
  explicit operator bool() const { return data != nullptr; }
};

// exp for the decays inside the vectorised state loops: inlined, so the state stays in vector registers where a
// call to the vector math library would spill it. float: Cody-Waite range reduction and Cephes' expf polynomial,
// clamped to [-87, 88]; measured within 3e-7 relative (<= 5 ulp) of exp over [-87, 0]; double: std::exp.
inline float exp_inline(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline double exp_inline(double x) { return std::exp(x); }

#if defined(__AVX512F__)
// 2^f for 16 floats with |f| <= 1/2: a degree-6 polynomial (a minimax fit for relative error), within 7.9e-8.
inline __m512 pow2_poly(__m512 f) {
  __m512 p = _mm512_set1_ps(1.534581242594868e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930903688073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642129898e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}

// 2^x for 16 floats: n = round(x), f = x - n in [-1/2, 1/2] (exact), 2^f by pow2_poly, 2^n applied by vscalefps:
// 10 vector ops. Clamped below at -125 so that no result is denormal (they would slow every later operation).
// Measured within 7.9e-8 relative of 2^x over [-125, 0] (every 1/200000; built with this file's flags).
// The decays exp(delta' A) are computed as 2^(delta' (A log2 e)) with A pre-scaled: 11 ops where exp with a
// Cody-Waite reduction costs 14.
inline __m512 exp2_f32x16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-125.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(pow2_poly(_mm512_sub_ps(x, n)), n);
}

// exp(x) for 16 floats x <= 0 given exactly (no pre-scaled input to lose bits in): n = round(x log2 e), r = x - n ln 2
// in two parts (Cody-Waite), exp(r) = 2^(r log2 e) by pow2_poly, times 2^n; clamped below at -86.5 (no denormals).
inline __m512 exp_nonpos_f32x16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-86.5f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  return _mm512_scalef_ps(pow2_poly(_mm512_mul_ps(r, _mm512_set1_ps(1.44269504088896341f))), n);
}

// 1 / d for 16 floats d in [1, 3]: the 14-bit estimate and one Newton step (within 2 ulp)
inline __m512 reciprocal_f32x16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// softplus(p) = max(p, 0) + log1p(q) with q = exp(-|p|) in (0, 1], for 16 floats, inlined (the vector math
// library's log1pf and expf calls were ~19% of a scan forward): log1p(q) = 2 atanh(s), s = q / (2 + q) in
// (0, 1/3], by its odd series to s^13 (truncation < 2e-8 relative). With `sig`, also the derivative
// sigmoid(p) = (p >= 0 ? 1 : q) / (1 + q). Divisions as reciprocal_f32x16. Measured within 3.5e-7 (softplus) and
// 2.7e-7 (sigmoid) relative of double precision over [-100, 100] (every 1/400000); NaN in, NaN out.
inline __m512 softplus_f32x16(__m512 p, __m512* sig) {
  const __m512 q = exp_nonpos_f32x16(_mm512_or_ps(p, _mm512_set1_ps(-0.0f)));  // exp(-|p|)
  const __m512 one_q = _mm512_add_ps(_mm512_set1_ps(1.0f), q);
  const __m512 s = _mm512_mul_ps(q, reciprocal_f32x16(_mm512_add_ps(one_q, _mm512_set1_ps(1.0f))));
  const __m512 w = _mm512_mul_ps(s, s);
  __m512 c = _mm512_set1_ps(2.0f / 13.0f);
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f / 11.0f));
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f / 9.0f));
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f / 7.0f));
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f / 5.0f));
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f / 3.0f));
  c = _mm512_fmadd_ps(c, w, _mm512_set1_ps(2.0f));
  const __mmask16 nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
  if (sig) {
    const __mmask16 nonneg = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 numerator = _mm512_mask_blend_ps(nonneg, q, _mm512_set1_ps(1.0f));
    *sig = _mm512_mask_mov_ps(_mm512_mul_ps(numerator, reciprocal_f32x16(one_q)), nan, p);
  }
  return _mm512_mask_mov_ps(_mm512_add_ps(_mm512_max_ps(p, _mm512_setzero_ps()), _mm512_mul_ps(s, c)), nan, p);
}
#endif

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
  at::Tensor proj_t;  // delta_proj transposed, (R, d_inner) contiguous, or undefined
};

// Per-step terms of the channels of row b, steps [s, s + len), into (len, ld) buffers (ld >= channels; the
// padding columns are left as they are), vectorised over channels: delta' (dl), x = delta' u (x), and
// sigmoid(delta + bias) (sig, the softplus derivative) when asked. `bias` is never null (zeros when absent);
// `proj_t` (R, nd) when delta holds the R low-rank step sizes per step (see delta_proj above), else null.
// Optional terms are switched outside the vector loops, never inside: a select in a vectorised loop evaluates
// both sides, and the side that is not taken can produce denormals that slow every later operation 3-4x.
template <typename T, typename IO>
void step_terms(const View3<IO>& u, const View3<IO>& delta, const T* bias, const T* proj_t, int64_t R, bool sp,
                int64_t b, int64_t s, int64_t len, int64_t nd, int64_t ld, T* dl, T* x, T* sig) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<IO, float>) {  // one vector of channels at a time
    for (int64_t j = 0; j < len; ++j) {
      const float* up = u.row(b, s + j);
      const float* dp = delta.row(b, s + j);
      for (int64_t i = 0; i < nd; i += kLanes) {
        const __mmask16 m = nd - i >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (nd - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, bias + i);  // delta + bias, then delta'
        if (proj_t) {
          for (int64_t r = 0; r < R; ++r)
            v = _mm512_fmadd_ps(_mm512_set1_ps(dp[r]), _mm512_maskz_loadu_ps(m, proj_t + r * nd + i), v);
        } else {
          v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dp + i), v);
        }
        if (sp) {
          __m512 sg;
          v = softplus_f32x16(v, sig ? &sg : nullptr);
          if (sig) _mm512_mask_storeu_ps(sig + j * ld + i, m, sg);
        }
        _mm512_mask_storeu_ps(dl + j * ld + i, m, v);
        _mm512_mask_storeu_ps(x + j * ld + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, up + i)));
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < len; ++j) {
    const IO* up = u.row(b, s + j);
    const IO* dp = delta.row(b, s + j);
    T* dlj = dl + j * ld;  // delta + bias first, then delta'
    T* xj = x + j * ld;
    if (proj_t) {
      std::copy(bias, bias + nd, dlj);
      for (int64_t r = 0; r < R; ++r) {
        const T dr = to_compute(dp[r]);
        const T* wr = proj_t + r * nd;
#pragma omp simd
        for (int64_t i = 0; i < nd; ++i) dlj[i] += dr * wr[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < nd; ++i) dlj[i] = to_compute(dp[i]) + bias[i];
    }
    if (sp && sig) {  // softplus and its derivative sigmoid from one exp: log1p(e) and e / (1 + e)
      T* sj = sig + j * ld;
#pragma omp simd
      for (int64_t i = 0; i < nd; ++i) {
        const T pre = dlj[i];
        const T e = std::exp(std::min(pre, T(20)));
        sj[i] = e / (T(1) + e);
        const T v = pre > T(20) ? pre : std::log1p(e);
        dlj[i] = v;
        xj[i] = v * to_compute(up[i]);
      }
    } else if (sp) {
#pragma omp simd
      for (int64_t i = 0; i < nd; ++i) {
        const T v = softplus(dlj[i]);
        dlj[i] = v;
        xj[i] = v * to_compute(up[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < nd; ++i) xj[i] = dlj[i] * to_compute(up[i]);
    }
  }
}

// Steps [s, s + len) of row b of B or C, (len, n) with row stride `ld` on return: the tensor itself when it holds
// T, else converted into buf (the state loops read B and C per state, as broadcast scalars of type T).
template <typename T, typename IO>
const T* steps_as_compute(const View3<IO>& v, int64_t b, int64_t s, int64_t len, int64_t n, T* buf, int64_t& ld) {
  if constexpr (std::is_same_v<IO, T>) {
    ld = v.s1;
    return v.row(b, s);
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const IO* src = v.row(b, s + j);
      for (int64_t i = 0; i < n; ++i) buf[j * n + i] = to_compute(src[i]);
    }
    ld = n;
    return buf;
  }
}

// The factor block_step wants A multiplied by: the AVX-512 float kernel computes the decay as 2^(delta' A log2(e))
// (a multiply and the two-part range reduction fewer per state than exp(delta' A)), every other build as
// exp(delta' A).
template <typename T>
constexpr T decay_scale() {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return 1.44269504088896341f;
#endif
  return T(1);
}

// A of every group, times `scale`, as (groups, d_state, padded channels), channels innermost, zero in the padding.
template <typename T>
std::vector<T> lane_major_A(const at::Tensor& A, int64_t Dp, T scale) {
  const int64_t G = A.size(0), Dn = A.size(1), N = A.size(2);
  const T* src = A.data_ptr<T>();
  std::vector<T> out(G * N * Dp, T(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < Dn; ++d)
      for (int64_t n = 0; n < N; ++n) out[(g * N + n) * Dp + d] = scale * src[(g * Dn + d) * N + n];
  return out;
}

// A row's state between the tensor layout (d_inner, d_state) and the kernels' (block, d_state, lane) layout.
template <typename T>
void to_lanes(const T* src, int64_t Dn, int64_t N, T* dst) {
  for (int64_t d0 = 0; d0 < Dn; d0 += kLanes) {
    const int64_t nd = std::min(kLanes, Dn - d0);
    T* blk = dst + (d0 / kLanes) * N * kLanes;
    for (int64_t i = 0; i < nd; ++i) {
      const T* row = src + (d0 + i) * N;
      for (int64_t n = 0; n < N; ++n) blk[n * kLanes + i] = row[n];
    }
  }
}

template <typename T>
void from_lanes(const T* src, int64_t Dn, int64_t N, T* dst) {
  for (int64_t d0 = 0; d0 < Dn; d0 += kLanes) {
    const int64_t nd = std::min(kLanes, Dn - d0);
    const T* blk = src + (d0 / kLanes) * N * kLanes;
    for (int64_t i = 0; i < nd; ++i) {
      T* row = dst + (d0 + i) * N;
      for (int64_t n = 0; n < N; ++n) row[n] = blk[n * kLanes + i];
    }
  }
}

// A times decay_scale as block_step reads it (A_decay, lane-major, see lane_major_A), A itself (only when asked: the
// backward's gradient terms), D and delta_bias of every group, zeros for absent D / delta_bias; row b of a scan of
// `rows` rows uses group b / (rows / groups).
template <typename T>
struct GroupParams {
  int64_t G, Dn, N, Dp, rows_per_group;
  std::vector<T> A, A_decay, zeros;
  const T *D, *bias;  // (G, Dn) each
  GroupParams(const Args& a, int64_t Dp_, bool with_A)
      : G(a.A.size(0)), Dn(a.A.size(1)), N(a.A.size(2)), Dp(Dp_), rows_per_group(a.u.size(0) / a.A.size(0)),
        A(with_A ? lane_major_A<T>(a.A, Dp_, T(1)) : std::vector<T>()),
        A_decay(lane_major_A<T>(a.A, Dp_, decay_scale<T>())), zeros(G * Dn, T(0)),
        D(a.D.defined() ? a.D.data_ptr<T>() : zeros.data()),
        bias(a.delta_bias.defined() ? a.delta_bias.data_ptr<T>() : zeros.data()) {}
  int64_t group(int64_t b) const { return b / rows_per_group; }
  const T* A_of(int64_t b) const { return A.data() + group(b) * N * Dp; }
  const T* A_decay_of(int64_t b) const { return A_decay.data() + group(b) * N * Dp; }
  const T* D_of(int64_t b) const { return D + group(b) * Dn; }
  const T* bias_of(int64_t b) const { return bias + group(b) * Dn; }
};

#if defined(__AVX512F__)
// block_step for float with kLanes == 16: one vector per state, written with intrinsics for exp2_f32x16; A_blk is
// A log2(e) (decay_scale). kKeep: multiply the decays by `keep` (the reset of acting); training has no keep.
template <bool kStoreDecay, bool kKeep>
inline void block_step_f32x16(const float* dl, const float* x, const float* A_blk, int64_t Dp, const float* Bp,
                              const float* Cp, float keep, int64_t N, const float* h_prev, float* h, float* a,
                              float* y) {
  static_assert(kLanes == 16, "one AVX-512 vector per block");
  const __m512 dlv = _mm512_loadu_ps(dl), xv = _mm512_loadu_ps(x), kv = _mm512_set1_ps(keep);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    __m512 av = exp2_f32x16(_mm512_mul_ps(dlv, _mm512_loadu_ps(A_blk + n * Dp)));
    if constexpr (kKeep) av = _mm512_mul_ps(kv, av);
    if constexpr (kStoreDecay) _mm512_storeu_ps(a + n * kLanes, av);
    const __m512 hv = _mm512_fmadd_ps(av, _mm512_loadu_ps(h_prev + n * kLanes),
                                      _mm512_mul_ps(xv, _mm512_set1_ps(Bp[n])));
    _mm512_storeu_ps(h + n * kLanes, hv);
    acc = _mm512_fmadd_ps(hv, _mm512_set1_ps(Cp[n]), acc);
  }
  _mm512_storeu_ps(y, acc);
}
#endif

// One step of one block of kLanes channels: a = keep exp(delta' A), h = a h_prev + x B and y = <h, C> per lane,
// with A_blk = A decay_scale (see GroupParams::A_decay). h_prev may be h itself (the forward updates in place); with
// kStoreDecay the decays go to `a` for the adjoint.
template <typename T, bool kStoreDecay>
inline void block_step(const T* dl, const T* x, const T* A_blk, int64_t Dp, const T* Bp, const T* Cp, T keep,
                       int64_t N, const T* h_prev, T* h, T* a, T* y) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (keep == 1.0f) block_step_f32x16<kStoreDecay, false>(dl, x, A_blk, Dp, Bp, Cp, keep, N, h_prev, h, a, y);
    else block_step_f32x16<kStoreDecay, true>(dl, x, A_blk, Dp, Bp, Cp, keep, N, h_prev, h, a, y);
    return;
  }
#endif
  T acc[kLanes] = {};
  for (int64_t n = 0; n < N; ++n) {
    const T* An = A_blk + n * Dp;
    const T* hp = h_prev + n * kLanes;
    T* hn = h + n * kLanes;
    const T bn = Bp[n], cn = Cp[n];
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) {
      const T av = keep * exp_inline(dl[i] * An[i]);
      if constexpr (kStoreDecay) a[n * kLanes + i] = av;
      const T hv = av * hp[i] + x[i] * bn;
      hn[i] = hv;
      acc[i] += hv * cn;
    }
  }
  std::copy(acc, acc + kLanes, y);
}

// One step of the adjoint recurrence for one block of kLanes channels, every state n (lane vectors at n * kLanes,
// A_blk's at n * Dp): with g = C_t[n] dy_t + carry (the gradient reaching h_t),
//   dC_t[n] += dy_t h_t,  dB_t[n] += g x_t,  g_x = sum_n g B_t[n],  g_a = sum_n g a_t h_{t-1} A,
//   dA += g a_t h_{t-1} delta'_t,  carry = a_t g (the gradient reaching h_{t-1});
// dB, dC as per-lane partial sums (added up over lanes by the caller), g_x and g_a per lane.
template <typename T>
inline void adjoint_step(const T* gy, const T* x, const T* dl, const T* Bp, const T* Cp, const T* A_blk, int64_t Dp,
                         int64_t N, const T* h_prev, const T* h, const T* a, T* carry, T* gA, T* gB, T* gC, T* g_x,
                         T* g_a) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kLanes == 16, "one AVX-512 vector per block");
    const __m512 gyv = _mm512_loadu_ps(gy), xv = _mm512_loadu_ps(x), dlv = _mm512_loadu_ps(dl);
    __m512 sx = _mm512_setzero_ps(), sa = _mm512_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = n * kLanes;
      const __m512 an = _mm512_loadu_ps(a + o);
      const __m512 g = _mm512_fmadd_ps(gyv, _mm512_set1_ps(Cp[n]), _mm512_loadu_ps(carry + o));
      _mm512_storeu_ps(gC + o, _mm512_fmadd_ps(gyv, _mm512_loadu_ps(h + o), _mm512_loadu_ps(gC + o)));
      _mm512_storeu_ps(gB + o, _mm512_fmadd_ps(g, xv, _mm512_loadu_ps(gB + o)));
      sx = _mm512_fmadd_ps(g, _mm512_set1_ps(Bp[n]), sx);
      const __m512 gda = _mm512_mul_ps(_mm512_mul_ps(g, an), _mm512_loadu_ps(h_prev + o));
      sa = _mm512_fmadd_ps(gda, _mm512_loadu_ps(A_blk + n * Dp), sa);
      _mm512_storeu_ps(gA + o, _mm512_fmadd_ps(gda, dlv, _mm512_loadu_ps(gA + o)));
      _mm512_storeu_ps(carry + o, _mm512_mul_ps(an, g));
    }
    _mm512_storeu_ps(g_x, sx);
    _mm512_storeu_ps(g_a, sa);
    return;
  }
#endif
  T sx[kLanes] = {}, sa[kLanes] = {};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = n * kLanes;
    const T* An = A_blk + n * Dp;
    const T bn = Bp[n], cn = Cp[n];
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) {
      const T g = gy[i] * cn + carry[o + i];
      gC[o + i] += gy[i] * h[o + i];
      gB[o + i] += g * x[i];
      sx[i] += g * bn;
      const T gda = g * a[o + i] * h_prev[o + i];
      sa[i] += gda * An[i];
      gA[o + i] += gda * dl[i];
      carry[o + i] = a[o + i] * g;
    }
  }
  std::copy(sx, sx + kLanes, g_x);
  std::copy(sa, sa + kLanes, g_a);
}

// NS: d_state known at compile time (16, the default, lets the compiler unroll the state loops), or 0: any.
// save_starts: keep the state at every chunk start (lane layout) for the backward; off when no gradient is needed.
template <typename T, typename IO, int64_t NS>
std::vector<at::Tensor> forward_impl(const Args& a, bool save_starts) {
  const int64_t rows = a.u.size(0), L = a.u.size(1), Dn = a.u.size(2);
  const int64_t N = NS ? NS : a.A.size(2);
  const int64_t chunk = a.chunk, n_chunks = (L + chunk - 1) / chunk;
  const int64_t n_blocks = (Dn + kLanes - 1) / kLanes, Dp = n_blocks * kLanes;
  auto opts = a.A.options();  // T
  at::Tensor out = at::empty({rows, L, Dn}, a.u.options());
  at::Tensor last = at::empty({rows, Dn, N}, opts);
  at::Tensor starts = save_starts ? at::empty({rows, std::max<int64_t>(n_chunks, 1), N * Dp}, opts)
                                  : at::empty({0}, opts);
  View3<IO> u(a.u), delta(a.delta), B(a.B), C(a.C), z;
  View3<T> keep;
  if (a.z.defined()) z = View3<IO>(a.z);
  if (a.keep.defined()) keep = View3<T>(a.keep);
  const GroupParams<T> groups(a, Dp, false);
  const T* h0 = a.h0.defined() ? a.h0.data_ptr<T>() : nullptr;
  IO* o = out.data_ptr<IO>();
  T* lst = last.data_ptr<T>();
  T* st = save_starts ? starts.data_ptr<T>() : nullptr;
  const bool sp = a.softplus;
  const T* proj = a.proj_t.defined() ? a.proj_t.data_ptr<T>() : nullptr;
  const int64_t R = proj ? a.proj_t.size(0) : 0;

  at::parallel_for(0, rows, row_grain(L * Dp * N), [&](int64_t r0, int64_t r1) {
    const int64_t T_max = std::min(chunk, L);
    std::vector<T> h(N * Dp), dl(T_max * Dp, T(0)), x(T_max * Dp, T(0)), y(T_max * Dp);
    std::vector<T> B_buf(std::is_same_v<IO, T> ? 0 : T_max * N), C_buf(B_buf.size());
    for (int64_t b = r0; b < r1; ++b) {
      std::fill(h.begin(), h.end(), T(0));
      if (h0) to_lanes(h0 + b * Dn * N, Dn, N, h.data());
      const T *Ab = groups.A_decay_of(b), *Dv = groups.D_of(b), *bias = groups.bias_of(b);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t s = c * chunk, len = std::min(chunk, L - s);
        if (st) std::copy(h.begin(), h.end(), st + (b * n_chunks + c) * N * Dp);
        step_terms(u, delta, bias, proj, R, sp, b, s, len, Dn, Dp, dl.data(), x.data(), static_cast<T*>(nullptr));
        int64_t ldB, ldC;
        const T* Bs = steps_as_compute(B, b, s, len, N, B_buf.data(), ldB);
        const T* Cs = steps_as_compute(C, b, s, len, N, C_buf.data(), ldC);
        for (int64_t j = 0; j < len; ++j) {
          const T* Bp = Bs + j * ldB;
          const T* Cp = Cs + j * ldC;
          const T k = keep ? keep.row(b, s + j)[0] : T(1);
          for (int64_t blk = 0; blk < n_blocks; ++blk) {
            const int64_t o = j * Dp + blk * kLanes;
            T* hb = h.data() + blk * N * kLanes;
            block_step<T, false>(dl.data() + o, x.data() + o, Ab + blk * kLanes, Dp, Bp, Cp, k, N, hb, hb,
                                 static_cast<T*>(nullptr), y.data() + o);
          }
          // out = (y + D u) * silu(z), vectorised over channels
          const IO* up = u.row(b, s + j);
          const IO* zp = z ? z.row(b, s + j) : nullptr;
          const T* yj = y.data() + j * Dp;
          IO* oj = o + (b * L + s + j) * Dn;
          if (zp) {
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) {
              const T zd = to_compute(zp[d]);
              oj[d] = to_io<IO>((yj[d] + Dv[d] * to_compute(up[d])) * zd * sigmoid(zd));
            }
          } else {
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) oj[d] = to_io<IO>(yj[d] + Dv[d] * to_compute(up[d]));
          }
        }
      }
      from_lanes(h.data(), Dn, N, lst + b * Dn * N);
    }
  });
  return {out, last, starts};
}

template <typename T, typename IO, int64_t NS>
std::vector<at::Tensor> backward_impl(const Args& a, const at::Tensor& starts, const at::Tensor& grad_out_t,
                                      const std::optional<at::Tensor>& grad_last) {
  const int64_t rows = a.u.size(0), L = a.u.size(1), Dn = a.u.size(2);
  const int64_t N = NS ? NS : a.A.size(2);
  const int64_t chunk = a.chunk, n_chunks = starts.size(1);
  const int64_t n_blocks = (Dn + kLanes - 1) / kLanes, Dp = n_blocks * kLanes;
  auto opts = a.A.options(), io_opts = a.u.options();  // T, IO
  const T* proj = a.proj_t.defined() ? a.proj_t.data_ptr<T>() : nullptr;
  const int64_t R = proj ? a.proj_t.size(0) : 0;
  at::Tensor g_u = at::empty({rows, L, Dn}, io_opts), g_delta = at::empty({rows, L, proj ? R : Dn}, io_opts);
  // the gradient of delta_proj as (R, d_inner) per row, summed over rows by the caller; empty without delta_proj
  at::Tensor g_proj_rows = at::zeros({proj ? rows : 0, R, Dn}, opts);
  at::Tensor g_B = at::empty({rows, L, N}, io_opts), g_C = at::empty({rows, L, N}, io_opts);
  at::Tensor g_z = a.z.defined() ? at::empty({rows, L, Dn}, io_opts) : at::Tensor();
  at::Tensor g_A_rows = at::empty({rows, Dn, N}, opts);  // summed over rows by the caller
  at::Tensor g_D_rows = at::zeros({rows, Dn}, opts);     // idem
  at::Tensor g_bias_rows = at::zeros({rows, Dn}, opts);  // idem
  at::Tensor g_h0 = at::empty({rows, Dn, N}, opts);
  const at::Tensor g_last = grad_last.has_value() ? grad_last->contiguous() : at::Tensor();

  View3<IO> u(a.u), delta(a.delta), B(a.B), C(a.C), go(grad_out_t), z;
  View3<T> keep;
  if (a.z.defined()) z = View3<IO>(a.z);
  if (a.keep.defined()) keep = View3<T>(a.keep);
  const GroupParams<T> groups(a, Dp, true);
  const T* st = starts.data_ptr<T>();
  const T* gl = g_last.defined() ? g_last.data_ptr<T>() : nullptr;
  IO *gu = g_u.data_ptr<IO>(), *gdelta = g_delta.data_ptr<IO>(), *gB = g_B.data_ptr<IO>(), *gC = g_C.data_ptr<IO>();
  IO* gz = g_z.defined() ? g_z.data_ptr<IO>() : nullptr;
  T *gA = g_A_rows.data_ptr<T>(), *gD = g_D_rows.data_ptr<T>(), *gbias = g_bias_rows.data_ptr<T>();
  T* gh0 = g_h0.data_ptr<T>();
  T* gproj = proj ? g_proj_rows.data_ptr<T>() : nullptr;
  const bool sp = a.softplus;

  at::parallel_for(0, rows, row_grain(L * Dp * N), [&](int64_t r0, int64_t r1) {
    const int64_t T_max = std::min(chunk, L), NL = N * kLanes;
    std::vector<T> hbuf((T_max + 1) * NL), abuf(T_max * NL), carry(N * Dp), gA_acc(N * Dp);
    std::vector<T> dl(T_max * Dp, T(0)), x(T_max * Dp, T(0)), sig(T_max * Dp, T(1)), sz(z ? T_max * Dp : 0);
    // per step and channel of the chunk (padding columns stay zero): y = <h, C>, its gradient gy, and the sums
    // over states gx = sum_n g B and ga = sum_n g a h_prev A that the per-channel epilogue needs
    std::vector<T> y(T_max * Dp, T(0)), gy(T_max * Dp, T(0)), gx(T_max * Dp, T(0)), ga(T_max * Dp, T(0));
    std::vector<T> gB_lanes(T_max * NL), gC_lanes(T_max * NL);  // per-lane partial sums of dB, dC
    // d(delta + bias) of one step: projected back to the R inputs (delta_proj), or converted to IO
    std::vector<T> g_pre_buf(proj || !std::is_same_v<IO, T> ? Dn : 0);
    std::vector<T> B_buf(std::is_same_v<IO, T> ? 0 : T_max * N), C_buf(B_buf.size());
    for (int64_t b = r0; b < r1; ++b) {
      const T *Ab = groups.A_of(b), *Ad = groups.A_decay_of(b), *Dv = groups.D_of(b), *bias = groups.bias_of(b);
      std::fill(carry.begin(), carry.end(), T(0));  // gradient reaching the state from later steps
      if (gl) to_lanes(gl + b * Dn * N, Dn, N, carry.data());
      std::fill(gA_acc.begin(), gA_acc.end(), T(0));
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t s = c * chunk, len = std::min(chunk, L - s);
        step_terms(u, delta, bias, proj, R, sp, b, s, len, Dn, Dp, dl.data(), x.data(), sig.data());
        int64_t ldB, ldC;
        const T* Bs = steps_as_compute(B, b, s, len, N, B_buf.data(), ldB);
        const T* Cs = steps_as_compute(C, b, s, len, N, C_buf.data(), ldC);
        // gy = d out / dy = g_out * silu(z) (or g_out), and dD += gy u: vectorised over all channels at once
        for (int64_t j = 0; j < len; ++j) {
          const int64_t t = s + j;
          const IO* up = u.row(b, t);
          const IO* gop = go.row(b, t);
          T* gyj = gy.data() + j * Dp;
          T* gDb = gD + b * Dn;
          if (z) {
            const IO* zp = z.row(b, t);
            T* szj = sz.data() + j * Dp;
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) {
              const T zd = to_compute(zp[d]);
              const T sg = sigmoid(zd);
              szj[d] = sg;
              gyj[d] = to_compute(gop[d]) * zd * sg;
            }
          } else {
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) gyj[d] = to_compute(gop[d]);
          }
#pragma omp simd
          for (int64_t d = 0; d < Dn; ++d) gDb[d] += gyj[d] * to_compute(up[d]);
        }
        std::fill(gB_lanes.begin(), gB_lanes.begin() + len * NL, T(0));
        std::fill(gC_lanes.begin(), gC_lanes.begin() + len * NL, T(0));
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const int64_t d0 = blk * kLanes;
          // recompute decays a_t and states of this chunk and block (hbuf[j] = h_{s+j-1}), and y_t = <h_t, C_t>
          const T* h_start = st + (b * n_chunks + c) * N * Dp + blk * NL;
          std::copy(h_start, h_start + NL, hbuf.begin());
          for (int64_t j = 0; j < len; ++j) {
            const T k = keep ? keep.row(b, s + j)[0] : T(1);
            block_step<T, true>(dl.data() + j * Dp + d0, x.data() + j * Dp + d0, Ad + d0, Dp, Bs + j * ldB,
                                Cs + j * ldC, k, N, &hbuf[j * NL], &hbuf[(j + 1) * NL], &abuf[j * NL],
                                &y[j * Dp + d0]);
          }
          // adjoint recurrence, backwards through the chunk
          T* cr = carry.data() + blk * NL;
          T* gAb = gA_acc.data() + blk * NL;
          for (int64_t j = len - 1; j >= 0; --j) {
            const int64_t o = j * Dp + d0;
            adjoint_step(&gy[o], &x[o], &dl[o], Bs + j * ldB, Cs + j * ldC, Ab + d0, Dp, N, &hbuf[j * NL],
                         &hbuf[(j + 1) * NL], &abuf[j * NL], cr, gAb, &gB_lanes[j * NL], &gC_lanes[j * NL], &gx[o],
                         &ga[o]);
          }
        }
        // Per channel, vectorised over all channels: dz from out = (y + D u) * silu(z); du and d delta (through
        // the softplus) and d delta_bias from x = delta' u and a = exp(delta' A); with delta_proj, d delta is
        // projected back to the R inputs and d delta_proj collects its outer product with them
        for (int64_t j = 0; j < len; ++j) {
          const int64_t t = s + j;
          const IO* up = u.row(b, t);
          const T* dlj = dl.data() + j * Dp;
          const T* sj = sig.data() + j * Dp;
          const T *yj = y.data() + j * Dp, *gyj = gy.data() + j * Dp, *gxj = gx.data() + j * Dp;
          const T* gaj = ga.data() + j * Dp;
          IO* gup = gu + (b * L + t) * Dn;
          T* gdp;  // d(delta + bias): straight into g_delta when it is (rows, L, d_inner) of T
          if constexpr (std::is_same_v<IO, T>) gdp = proj ? g_pre_buf.data() : gdelta + (b * L + t) * Dn;
          else gdp = g_pre_buf.data();
          T* gbb = gbias + b * Dn;
          if (z) {
            const IO* gop = go.row(b, t);
            const IO* zp = z.row(b, t);
            const T* szj = sz.data() + j * Dp;
            IO* gzp = gz + (b * L + t) * Dn;
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) {
              const T sg = szj[d], zd = to_compute(zp[d]);
              gzp[d] = to_io<IO>(to_compute(gop[d]) * (yj[d] + Dv[d] * to_compute(up[d])) * sg *
                                 (T(1) + zd * (T(1) - sg)));
            }
          }
#pragma omp simd
          for (int64_t d = 0; d < Dn; ++d) {
            gup[d] = to_io<IO>(gxj[d] * dlj[d] + gyj[d] * Dv[d]);
            const T g_pre = (gaj[d] + gxj[d] * to_compute(up[d])) * sj[d];  // sj: the softplus derivative, or 1
            gdp[d] = g_pre;
            gbb[d] += g_pre;
          }
          if constexpr (!std::is_same_v<IO, T>) {
            if (!proj) {
              IO* gdo = gdelta + (b * L + t) * Dn;
#pragma omp simd
              for (int64_t d = 0; d < Dn; ++d) gdo[d] = to_io<IO>(gdp[d]);
            }
          }
          if (proj) {
            const IO* dp = delta.row(b, t);
            IO* gdt = gdelta + (b * L + t) * R;
            for (int64_t r = 0; r < R; ++r) {
              const T* wr = proj + r * Dn;
              T* gwr = gproj + (b * R + r) * Dn;
              const T dr = to_compute(dp[r]);
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t d = 0; d < Dn; ++d) {
                acc += gdp[d] * wr[d];
                gwr[d] += gdp[d] * dr;
              }
              gdt[r] = to_io<IO>(acc);
            }
          }
        }
        // dB_t, dC_t: the per-lane partial sums added up
        for (int64_t j = 0; j < len; ++j) {
          IO* gBrow = gB + (b * L + s + j) * N;
          IO* gCrow = gC + (b * L + s + j) * N;
          for (int64_t n = 0; n < N; ++n) {
            T sb = 0, sc = 0;
            const T* pb = &gB_lanes[j * NL + n * kLanes];
            const T* pc = &gC_lanes[j * NL + n * kLanes];
#pragma omp simd reduction(+ : sb, sc)
            for (int64_t i = 0; i < kLanes; ++i) { sb += pb[i]; sc += pc[i]; }
            gBrow[n] = to_io<IO>(sb);
            gCrow[n] = to_io<IO>(sc);
          }
        }
      }
      from_lanes(carry.data(), Dn, N, gh0 + b * Dn * N);
      from_lanes(gA_acc.data(), Dn, N, gA + b * Dn * N);
    }
  });
  return {g_u, g_delta, g_A_rows, g_B, g_C, g_D_rows, g_z, g_bias_rows, g_h0, g_proj_rows};
}

// The compute type of a sequence dtype (see to_compute): float for bfloat16, else the dtype itself.
at::ScalarType compute_type(at::ScalarType io) { return io == at::kBFloat16 ? at::kFloat : io; }

// Runs f(T{}, IO{}) for the sequence dtype io: float32 / float64 (T = IO) or bfloat16 (T = float).
template <typename F>
void dispatch_io(at::ScalarType io, F&& f) {
  switch (io) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(float{}, at::BFloat16{}); break;
    default: TORCH_CHECK(false, "mambadm_cpu: tensors must be float32, float64 or bfloat16, got ", io);
  }
}

Args make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& delta_bias, bool softplus, const std::optional<at::Tensor>& h0,
               const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& delta_proj, int64_t chunk) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU, got ", u.device());
  TORCH_CHECK(u.dim() == 3, "selective_scan_cpu: u must be (rows, L, d_inner), got ", u.sizes());
  const at::ScalarType io = u.scalar_type(), ct = compute_type(io);
  TORCH_CHECK(io == at::kFloat || io == at::kDouble || io == at::kBFloat16,
              "selective_scan_cpu: u must be float32, float64 or bfloat16, got ", io);
  const int64_t rows = u.size(0), L = u.size(1), Dn = u.size(2);
  TORCH_CHECK(A.dim() == 3 && A.size(1) == Dn && rows % A.size(0) == 0,
              "selective_scan_cpu: A must be (groups dividing rows, d_inner, d_state), got ", A.sizes());
  const int64_t N = A.size(2);
  // sequence tensors in u's dtype, parameters, states and keep in the compute type
  auto check_as = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK(t.sizes() == shape, "selective_scan_cpu: ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "selective_scan_cpu: ", name, " has dtype ", t.scalar_type(),
                ", expected ", dtype);
  };
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) { check_as(t, name, shape, io); };
  auto check_param = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    check_as(t, name, shape, ct);
  };
  if (delta_proj) {
    TORCH_CHECK(delta_proj->dim() == 2 && delta_proj->size(0) == Dn, "selective_scan_cpu: delta_proj must be (",
                Dn, ", R), got ", delta_proj->sizes());
    check_param(*delta_proj, "delta_proj", {Dn, delta_proj->size(1)});
    check(delta, "delta", {rows, L, delta_proj->size(1)});
  } else {
    check(delta, "delta", {rows, L, Dn});
  }
  check(B, "B", {rows, L, N});
  check(C, "C", {rows, L, N});
  check_param(A, "A", {A.size(0), Dn, N});
  TORCH_CHECK(chunk > 0, "selective_scan_cpu: chunk must be positive");
  auto unit_inner = [](const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); };
  Args a{unit_inner(u), unit_inner(delta), A.contiguous(), unit_inner(B), unit_inner(C), {}, {}, {}, {}, {},
         softplus, chunk};
  const int64_t G = A.size(0);
  // D and delta_bias: (d_inner,) for all rows or (groups, d_inner); stored as (groups, d_inner)
  auto per_group = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == ct, "selective_scan_cpu: ", name, " has dtype ", t.scalar_type(), ", expected ",
                ct);
    const bool shared = t.dim() == 1 && t.size(0) == Dn;
    const bool grouped = t.dim() == 2 && t.size(0) == G && t.size(1) == Dn;
    TORCH_CHECK(shared || grouped, "selective_scan_cpu: ", name, " must have shape (", Dn, ") or (", G, ", ", Dn,
                "), got ", t.sizes());
    return t.expand({G, Dn}).contiguous();
  };
  if (D) a.D = per_group(*D, "D");
  if (z) { check(*z, "z", {rows, L, Dn}); a.z = unit_inner(*z); }
  if (delta_bias) a.delta_bias = per_group(*delta_bias, "delta_bias");
  if (h0) { check_param(*h0, "h0", {rows, Dn, N}); a.h0 = h0->contiguous(); }
  if (keep) { check_param(*keep, "keep", {rows, L, 1}); a.keep = keep->contiguous(); }
  if (delta_proj) a.proj_t = delta_proj->t().contiguous();
  return a;
}

}  // namespace

// Declared in mamba_cpu.h for the extension's other files (the acting step); also the `scan_forward` op.
std::vector<at::Tensor> mambadm::selective_scan_forward(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool softplus, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& delta_proj, int64_t chunk,
    bool save_starts) {
  Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, delta_proj, chunk);
  std::vector<at::Tensor> result;
  dispatch_io(u.scalar_type(), [&](auto t, auto io) {
    using T = decltype(t);
    using IO = decltype(io);
    result = a.A.size(2) == 16 ? forward_impl<T, IO, 16>(a, save_starts) : forward_impl<T, IO, 0>(a, save_starts);
  });
  return result;
}

namespace {

std::vector<at::Tensor> scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                                      bool softplus, const std::optional<at::Tensor>& h0,
                                      const std::optional<at::Tensor>& keep,
                                      const std::optional<at::Tensor>& delta_proj, int64_t chunk,
                                      const at::Tensor& starts, const at::Tensor& grad_out,
                                      const std::optional<at::Tensor>& grad_last) {
  Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus, h0, keep, delta_proj, chunk);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.scalar_type() == u.scalar_type(),
              "selective_scan_cpu: grad_out must match u, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const at::ScalarType ct = compute_type(u.scalar_type());
  TORCH_CHECK(starts.scalar_type() == ct && (!grad_last || grad_last->scalar_type() == ct),
              "selective_scan_cpu: starts and grad_last must be ", ct);
  const int64_t lanes = (u.size(2) + kLanes - 1) / kLanes * kLanes * A.size(2);
  TORCH_CHECK(starts.dim() == 3 && starts.size(0) == u.size(0) && starts.size(2) == lanes,
              "selective_scan_cpu: starts must be the forward's saved states (run it with save_starts), got ",
              starts.sizes());
  std::vector<at::Tensor> result;
  const at::Tensor go = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  dispatch_io(u.scalar_type(), [&](auto t, auto io) {
    using T = decltype(t);
    using IO = decltype(io);
    result = a.A.size(2) == 16 ? backward_impl<T, IO, 16>(a, starts.contiguous(), go, grad_last)
                               : backward_impl<T, IO, 0>(a, starts.contiguous(), go, grad_last);
  });
  return result;
}

// The first of K taps that output t reads: taps before the start of t's window (or of the sequence) read zeros.
inline int64_t first_tap(int64_t t, int64_t K, int64_t segment) {
  return std::max<int64_t>(0, K - 1 - (segment > 0 ? t % segment : t));
}

// x, the output and their gradients in IO, taps, bias and their gradients in T (see to_compute).
template <typename T, typename IO>
at::Tensor conv_forward_impl(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& bias_t,
                             int64_t segment) {
  const int64_t rows = x_t.size(0), L = x_t.size(1), Cn = x_t.size(2), K = w_t.size(0);
  at::Tensor out = at::empty({rows, L, Cn}, x_t.options());
  View3<IO> x(x_t);
  const T* w = w_t.data_ptr<T>();  // (K, channels): tap k of every channel contiguous
  const std::vector<T> zeros(Cn, T(0));
  const T* bias = bias_t.defined() ? bias_t.data_ptr<T>() : zeros.data();
  IO* o = out.data_ptr<IO>();
  at::parallel_for(0, rows, row_grain(L * Cn * K), [&](int64_t r0, int64_t r1) {
    std::vector<T> acc_buf(std::is_same_v<IO, T> ? 0 : Cn);  // one output row in T before its conversion
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t t = 0; t < L; ++t) {
        T* ot;
        if constexpr (std::is_same_v<IO, T>) ot = o + (b * L + t) * Cn;
        else ot = acc_buf.data();
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) ot[c] = bias[c];
        for (int64_t k = first_tap(t, K, segment); k < K; ++k) {
          const IO* xs = x.row(b, t - K + 1 + k);
          const T* wk = w + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) ot[c] += wk[c] * to_compute(xs[c]);
        }
        if constexpr (std::is_same_v<IO, T>) {
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) ot[c] = ot[c] * sigmoid(ot[c]);
        } else {
          IO* out_t = o + (b * L + t) * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) out_t[c] = to_io<IO>(ot[c] * sigmoid(ot[c]));
        }
      }
    }
  });
  return out;
}

template <typename T, typename IO>
std::vector<at::Tensor> conv_backward_impl(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& bias_t,
                                           const at::Tensor& go_t, int64_t segment) {
  const int64_t rows = x_t.size(0), L = x_t.size(1), Cn = x_t.size(2), K = w_t.size(0);
  auto opts = w_t.options();  // T
  at::Tensor g_x = at::empty({rows, L, Cn}, x_t.options());
  at::Tensor g_w_rows = at::zeros({rows, K, Cn}, opts);  // summed over rows by the caller
  at::Tensor g_bias_rows = at::zeros({rows, Cn}, opts);  // idem
  View3<IO> x(x_t), go(go_t);
  const T* w = w_t.data_ptr<T>();
  const std::vector<T> zeros(Cn, T(0));
  const T* bias = bias_t.defined() ? bias_t.data_ptr<T>() : zeros.data();
  IO* gx = g_x.data_ptr<IO>();
  T *gw = g_w_rows.data_ptr<T>(), *gb = g_bias_rows.data_ptr<T>();
  at::parallel_for(0, rows, row_grain(L * Cn * K), [&](int64_t r0, int64_t r1) {
    std::vector<T> g_pre(L * Cn);  // d loss / d pre-activation of every output of the row
    std::vector<T> gx_buf(std::is_same_v<IO, T> ? 0 : Cn);  // one dx row in T before its conversion
    for (int64_t b = r0; b < r1; ++b) {
      T* gwb = gw + b * K * Cn;
      T* gbb = gb + b * Cn;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t k0 = first_tap(t, K, segment);
        // recompute pre_t, then g_pre = g_out * silu'(pre_t); dw and d bias collect it
        T* gp = g_pre.data() + t * Cn;
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) gp[c] = bias[c];
        for (int64_t k = k0; k < K; ++k) {
          const IO* xs = x.row(b, t - K + 1 + k);
          const T* wk = w + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) gp[c] += wk[c] * to_compute(xs[c]);
        }
        const IO* gop = go.row(b, t);
#pragma omp simd
        for (int64_t c = 0; c < Cn; ++c) {
          const T sg = sigmoid(gp[c]);
          gp[c] = to_compute(gop[c]) * sg * (T(1) + gp[c] * (T(1) - sg));
          gbb[c] += gp[c];
        }
        for (int64_t k = k0; k < K; ++k) {
          const IO* xs = x.row(b, t - K + 1 + k);
          T* gwk = gwb + k * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) gwk[c] += to_compute(xs[c]) * gp[c];
        }
      }
      // dx_s = sum over the outputs t = s + K - 1 - k that read input s through tap k (same window, t < L),
      // gathered: each dx row is written once, no zero fill and no read-modify-write per tap
      for (int64_t s = 0; s < L; ++s) {
        T* gxs;
        if constexpr (std::is_same_v<IO, T>) gxs = gx + (b * L + s) * Cn;
        else gxs = gx_buf.data();
        bool first = true;
        for (int64_t k = K - 1; k >= 0; --k) {
          const int64_t t = s + K - 1 - k;
          if (t >= L || (segment > 0 && t / segment != s / segment)) break;  // later taps reach further
          const T* gp = g_pre.data() + t * Cn;
          const T* wk = w + k * Cn;
          if (first) {
#pragma omp simd
            for (int64_t c = 0; c < Cn; ++c) gxs[c] = wk[c] * gp[c];
            first = false;
          } else {
#pragma omp simd
            for (int64_t c = 0; c < Cn; ++c) gxs[c] += wk[c] * gp[c];
          }
        }
        if constexpr (!std::is_same_v<IO, T>) {
          IO* out_s = gx + (b * L + s) * Cn;
#pragma omp simd
          for (int64_t c = 0; c < Cn; ++c) out_s[c] = to_io<IO>(gxs[c]);
        }
      }
    }
  });
  return {g_x, g_w_rows, g_bias_rows};
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t segment) {
  TORCH_CHECK(segment >= 0, "causal_conv_silu_cpu: segment must be >= 0 (0: none), got ", segment);
  TORCH_CHECK(x.device().is_cpu(), "causal_conv_silu_cpu: tensors must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "causal_conv_silu_cpu: x must be (rows, L, channels), got ", x.sizes());
  const at::ScalarType io = x.scalar_type(), ct = compute_type(io);
  TORCH_CHECK(io == at::kFloat || io == at::kDouble || io == at::kBFloat16,
              "causal_conv_silu_cpu: x must be float32, float64 or bfloat16, got ", io);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(2) && w.scalar_type() == ct,
              "causal_conv_silu_cpu: w must be (taps, channels=", x.size(2), ") of ", ct, ", got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(!bias || (bias->sizes() == at::IntArrayRef{x.size(2)} && bias->scalar_type() == ct),
              "causal_conv_silu_cpu: bias must be (channels,) of ", ct);
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        int64_t segment) {
  check_conv(x, w, bias, segment);
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out;
  dispatch_io(x.scalar_type(), [&](auto t, auto io) {
    out = conv_forward_impl<decltype(t), decltype(io)>(xc, w.contiguous(), b, segment);
  });
  return out;
}

std::vector<at::Tensor> conv_backward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& grad_out, int64_t segment) {
  check_conv(x, w, bias, segment);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "causal_conv_silu_cpu: grad_out must match x, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor go = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  std::vector<at::Tensor> result;
  dispatch_io(x.scalar_type(), [&](auto t, auto io) {
    result = conv_backward_impl<decltype(t), decltype(io)>(xc, w.contiguous(), b, go, segment);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY(mambadm_cpu, m) {
  m.def("scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool softplus, Tensor? h0, Tensor? keep, Tensor? delta_proj, int chunk, "
        "bool save_starts) -> Tensor[]");
  m.def("scan_backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool softplus, Tensor? h0, Tensor? keep, Tensor? delta_proj, int chunk, Tensor starts, "
        "Tensor grad_out, Tensor? grad_last) -> Tensor[]");
  m.def("conv_forward(Tensor x, Tensor w, Tensor? bias, int segment) -> Tensor");
  m.def("conv_backward(Tensor x, Tensor w, Tensor? bias, Tensor grad_out, int segment) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mambadm_cpu, CPU, m) {
  m.impl("scan_forward", &mambadm::selective_scan_forward);
  m.impl("scan_backward", &scan_backward);
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
