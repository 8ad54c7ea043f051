// Batch-norm training kernels for the CPU: the math of reference.py, fused, registered as torch
// operators (namespace bncore) with their autograd in C++, so a training step runs no Python
// between the forward call and the next layer's backward.
//
// Two memory layouts, both seen as (N, C, L) with m = N * L values per channel:
//   planes: x[n][c][l], contiguous (NCHW images, (N, C, L) sequences);
//   rows:   x[r][c] with r = n * L + l (2-d (N, C) input, channels-last images).
//
// Forward reads x once for the statistics and once to normalize, channel by channel, so the
// second read of a channel usually comes from cache. Statistics use shifted sums (shift = the
// channel's first value): float partial sums over short runs, merged in double.
// Backward reads (dy, x) once for sum dy, sum dy*(x-mean), sum dy^2, and once more to write dx,
// accumulating sum dx^2 on the way: the by-product statistics cost no extra pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <omp.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRun = 2048;       // values summed in T before flushing to double
constexpr int64_t kRowBlock = 64;    // rows summed in T before flushing to double
constexpr int64_t kSerialWork = 32768;  // below this many values, one thread

int pick_threads(int64_t work, int requested) {
  if (requested < 1 || work < kSerialWork) return 1;
  return static_cast<int>(std::min<int64_t>(requested, std::max<int64_t>(1, work / kSerialWork)));
}

void split(int64_t n, int parts, int part, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, extra = n % parts;
  *begin = part * base + std::min<int64_t>(part, extra);
  *end = *begin + base + (part < extra ? 1 : 0);
}

// ---------------------------------------------------------------- forward

// The running buffers (if given) move towards the batch statistics:
// r <- (1 - momentum) r + momentum s, with the variance scaled by `correction` (m/(m-1) or 1).
template <typename T>
inline void update_running(T* rm, T* rv, int64_t c, double mu, double v, double momentum,
                           double correction) {
  if (!rm) return;
  rm[c] = static_cast<T>((1.0 - momentum) * rm[c] + momentum * mu);
  rv[c] = static_cast<T>((1.0 - momentum) * rv[c] + momentum * v * correction);
}

// Shifted sums of one channel (planes layout): sum d, sum d^2 with d = x - shift, and, if kTails,
// the counts of x <= lo and x >= hi. Partial sums run in T over short runs, then add up in double.
struct Sums {
  double s1 = 0, s2 = 0, lo = 0, hi = 0;
};

template <typename T, bool kTails>
Sums plane_sums(const T* x, int64_t N, int64_t C, int64_t L, int64_t c, T shift, T lo, T hi) {
  Sums s;
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + (n * C + c) * L;
    for (int64_t l0 = 0; l0 < L; l0 += kRun) {
      const int64_t l1 = std::min(L, l0 + kRun);
      T a1 = 0, a2 = 0, a3 = 0, a4 = 0;
#pragma omp simd reduction(+ : a1, a2, a3, a4)
      for (int64_t l = l0; l < l1; ++l) {
        const T d = p[l] - shift;
        a1 += d;
        a2 += d * d;
        if constexpr (kTails) {
          a3 += p[l] <= lo ? T(1) : T(0);
          a4 += p[l] >= hi ? T(1) : T(0);
        }
      }
      s.s1 += a1;
      s.s2 += a2;
      s.lo += a3;
      s.hi += a4;
    }
  }
  return s;
}

// The same over rows [r0, r1) of row-major (R, C) data, for every channel at once, added into
// s1, s2 (and lo, hi if kTails), each an array of C doubles. Columns go in blocks of kCols whose
// partial sums stay in registers while the rows stream past.
constexpr int64_t kCols = 16;

template <typename T, bool kTails, int64_t W>
inline void column_block_sums(const T* x, int64_t r0, int64_t r1, int64_t C, int64_t c0,
                              const T* shift, T lo, T hi, double* s1, double* s2, double* nlo,
                              double* nhi) {
  T sh[W], a1[W] = {}, a2[W] = {}, a3[W] = {}, a4[W] = {};
  for (int64_t j = 0; j < W; ++j) sh[j] = shift[c0 + j];
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * C + c0;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const T d = p[j] - sh[j];
      a1[j] += d;
      a2[j] += d * d;
      if constexpr (kTails) {
        a3[j] += p[j] <= lo ? T(1) : T(0);
        a4[j] += p[j] >= hi ? T(1) : T(0);
      }
    }
  }
  for (int64_t j = 0; j < W; ++j) {
    s1[c0 + j] += a1[j];
    s2[c0 + j] += a2[j];
    if constexpr (kTails) {
      nlo[c0 + j] += a3[j];
      nhi[c0 + j] += a4[j];
    }
  }
}

// Row blocks outside, column blocks inside: a block of rows stays in cache while its columns
// are summed, and each column block's partial sums stay in registers over the block's rows.
template <typename T, bool kTails>
void row_sums(const T* x, int64_t r0, int64_t r1, int64_t C, const T* shift, T lo, T hi,
              double* s1, double* s2, double* nlo, double* nhi) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    int64_t c0 = 0;
    for (; c0 + kCols <= C; c0 += kCols)
      column_block_sums<T, kTails, kCols>(x, rb, re, C, c0, shift, lo, hi, s1, s2, nlo, nhi);
    for (; c0 < C; ++c0)  // the last few columns, one at a time
      column_block_sums<T, kTails, 1>(x, rb, re, C, c0, shift, lo, hi, s1, s2, nlo, nhi);
  }
}

// Mean and biased variance from shifted sums over m values.
inline std::pair<double, double> finish(double s1, double s2, double shift, double m) {
  const double dm = s1 / m;
  return {shift + dm, std::max(s2 / m - dm * dm, 0.0)};
}

// The activation that follows BN, when the caller wants its statistics from the forward
// (kAct: 0 none, 1 identity, 2 ReLU): the output is in registers or cache anyway.
enum Act : int64_t { kNoAct = 0, kIdentity = 1, kRelu = 2 };

// act(v), exactly as torch's: ReLU is 0 for v < 0 (-inf included) and keeps NaN.
template <typename T, int64_t kAct>
inline T activate(T v) {
  if constexpr (kAct == kRelu) return T(0) > v ? T(0) : v;
  return v;
}

// act(v) in the vectorized loops: ReLU as (v + |v|) / 2, which gcc vectorizes (it leaves the
// select above scalar). It differs from act(v) only at v = -inf (NaN, not 0).
template <typename T, int64_t kAct>
inline T activate_fast(T v) {
  if constexpr (kAct == kRelu) return (v + std::fabs(v)) * T(0.5);
  return v;
}

// The vectorized loops may be wrong only on a channel holding an infinite or NaN value, and
// such a value always makes the channel's sum non-finite: such a channel is summed again,
// exactly (exact_act_sums). So they also count a tail (act <= lo, act >= hi) only where its
// bound is finite, a tail at +-inf holding only infinite values: ReLU's statistics (lo = 0,
// hi = inf) cost one comparison per value, not two.
//
// with_act calls f(act, count_lo, count_hi) with compile-time constants: act is kRelu or
// kIdentity (act_kind), count_lo / count_hi whether lo / hi are finite.
template <typename T, typename F>
inline void with_act(int64_t act_kind, T lo, T hi, F&& f) {
  auto tails = [&](auto act) {
    const bool l = std::isfinite(lo), h = std::isfinite(hi);
    if (l && h)
      f(act, std::true_type{}, std::true_type{});
    else if (l)
      f(act, std::true_type{}, std::false_type{});
    else if (h)
      f(act, std::false_type{}, std::true_type{});
    else
      f(act, std::false_type{}, std::false_type{});
  };
  if (act_kind == kRelu)
    tails(std::integral_constant<int64_t, kRelu>{});
  else
    tails(std::integral_constant<int64_t, kIdentity>{});
}

// One channel's sums of act (sum, sum of squares, count <= lo, count >= hi) over its values
// y[n * stride + i] (n < outer, i < len), computed again exactly where the vectorized sums are
// not finite.
template <typename T, int64_t kAct>
void exact_act_sums(const T* y, int64_t outer, int64_t stride, int64_t len, T lo, T hi,
                    double* sums) {
  if (std::isfinite(sums[0])) return;
  double s[4] = {0, 0, 0, 0};
  for (int64_t n = 0; n < outer; ++n)
    for (int64_t i = 0; i < len; ++i) {
      const T a = activate<T, kAct>(y[n * stride + i]);
      s[0] += a;
      s[1] += a * a;
      s[2] += a <= lo;
      s[3] += a >= hi;
    }
  std::copy(s, s + 4, sums);
}

// Mean, variance and tail fractions of act(y) from raw sums (no shift: y is normalized).
template <typename T>
inline void finish_act(const double* sums, double m, int64_t c, int64_t C, T* act) {
  const double mu = sums[0] / m;
  act[c] = static_cast<T>(mu);
  act[C + c] = static_cast<T>(std::max(sums[1] / m - mu * mu, 0.0));
  act[2 * C + c] = static_cast<T>(sums[2] / m);
  act[3 * C + c] = static_cast<T>(sums[3] / m);
}

template <typename T, int64_t kAct, bool kLo = true, bool kHi = true>
void normalize_plane(const T* x, T* y, int64_t N, int64_t C, int64_t L, int64_t c, T scale,
                     T offset, T lo, T hi, double* sums) {
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + (n * C + c) * L;
    T* q = y + (n * C + c) * L;
    if constexpr (kAct == kNoAct) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) q[l] = p[l] * scale + offset;
    } else {
      for (int64_t l0 = 0; l0 < L; l0 += kRun) {
        const int64_t l1 = std::min(L, l0 + kRun);
        T a1 = 0, a2 = 0, a3 = 0, a4 = 0;
#pragma omp simd reduction(+ : a1, a2, a3, a4)
        for (int64_t l = l0; l < l1; ++l) {
          const T v = p[l] * scale + offset;
          q[l] = v;
          const T a = activate_fast<T, kAct>(v);
          a1 += a;
          a2 += a * a;
          if constexpr (kLo) a3 += a <= lo ? T(1) : T(0);
          if constexpr (kHi) a4 += a >= hi ? T(1) : T(0);
        }
        sums[0] += a1;
        sums[1] += a2;
        sums[2] += a3;
        sums[3] += a4;
      }
    }
  }
}

template <typename T>
void forward_planes(const T* x, T* y, int64_t N, int64_t C, int64_t L, const T* w, const T* b,
                    double eps, T* mean, T* var, T* invstd, T* rm, T* rv, double momentum,
                    double correction, int threads, int64_t act_kind = kNoAct, T lo = T(0),
                    T hi = T(0), T* act = nullptr) {
  const int64_t m = N * L;
  const int nt = std::min<int64_t>(pick_threads(m * C, threads), C);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < C; ++c) {
    const T shift = x[c * L];
    const Sums sums = plane_sums<T, false>(x, N, C, L, c, shift, T(0), T(0));
    const auto [mu, v] = finish(sums.s1, sums.s2, shift, static_cast<double>(m));
    const double inv = 1.0 / std::sqrt(v + eps);
    mean[c] = static_cast<T>(mu);
    var[c] = static_cast<T>(v);
    invstd[c] = static_cast<T>(inv);
    update_running(rm, rv, c, mu, v, momentum, correction);
    const T scale = static_cast<T>((w ? w[c] : 1.0) * inv);
    const T offset = static_cast<T>((b ? b[c] : 0.0) - mu * scale);
    double act_sums[4] = {0, 0, 0, 0};
    if (act_kind == kNoAct) {
      normalize_plane<T, kNoAct>(x, y, N, C, L, c, scale, offset, lo, hi, act_sums);
      continue;
    }
    with_act(act_kind, lo, hi, [&](auto act, auto kl, auto kh) {
      normalize_plane<T, act(), kl(), kh()>(x, y, N, C, L, c, scale, offset, lo, hi, act_sums);
      exact_act_sums<T, act()>(y + c * L, N, C * L, L, lo, hi, act_sums);
    });
    finish_act(act_sums, static_cast<double>(m), c, C, act);
  }
}

// Sums of act(y) over rows [r0, r1) for the columns [c0, c0 + W): read-only, in registers.
template <typename T, int64_t kAct, int64_t W, bool kLo, bool kHi>
inline void act_column_block(const T* y, int64_t r0, int64_t r1, int64_t C, int64_t c0, T lo,
                             T hi, double* sums) {
  T a1[W] = {}, a2[W] = {}, a3[W] = {}, a4[W] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const T* q = y + r * C + c0;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const T a = activate_fast<T, kAct>(q[j]);
      a1[j] += a;
      a2[j] += a * a;
      if constexpr (kLo) a3[j] += a <= lo ? T(1) : T(0);
      if constexpr (kHi) a4[j] += a >= hi ? T(1) : T(0);
    }
  }
  for (int64_t j = 0; j < W; ++j) {
    sums[c0 + j] += a1[j];
    sums[C + c0 + j] += a2[j];
    sums[2 * C + c0 + j] += a3[j];
    sums[3 * C + c0 + j] += a4[j];
  }
}

// y = x * S + O over rows [r0, r1), then the sums of act(y) (sum, sum of squares, count <= lo,
// count >= hi) added into sums[0..3][C], a block of rows at a time: the stores stream row by
// row, and the statistics read the block back from cache (strided stores stalled on misses).
template <typename T, int64_t kAct, bool kLo, bool kHi>
void normalize_rows_act(const T* x, T* y, int64_t r0, int64_t r1, int64_t C, const T* S,
                        const T* O, T lo, T hi, double* sums) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    for (int64_t r = rb; r < re; ++r) {
      const T* p = x + r * C;
      T* q = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) q[c] = p[c] * S[c] + O[c];
    }
    int64_t c0 = 0;
    for (; c0 + kCols <= C; c0 += kCols)
      act_column_block<T, kAct, kCols, kLo, kHi>(y, rb, re, C, c0, lo, hi, sums);
    for (; c0 < C; ++c0) act_column_block<T, kAct, 1, kLo, kHi>(y, rb, re, C, c0, lo, hi, sums);
  }
}

template <typename T>
void forward_rows(const T* x, T* y, int64_t R, int64_t C, const T* w, const T* b, double eps,
                  T* mean, T* var, T* invstd, T* rm, T* rv, double momentum, double correction,
                  int threads, int64_t act_kind = kNoAct, T lo = T(0), T hi = T(0),
                  T* act = nullptr) {
  const int nt = std::min<int64_t>(pick_threads(R * C, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  std::vector<double> act_part(act_kind == kNoAct ? 0 : static_cast<size_t>(nt) * 4 * C, 0.0);
  std::vector<T> scale(C), offset(C);
  const T* shift = x;  // the first row
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* s1 = &part[static_cast<size_t>(t) * 2 * C];
    row_sums<T, false>(x, r0, r1, C, shift, T(0), T(0), s1, s1 + C, nullptr, nullptr);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0, t2 = 0;
      for (int k = 0; k < nth; ++k) {
        t1 += part[static_cast<size_t>(k) * 2 * C + c];
        t2 += part[static_cast<size_t>(k) * 2 * C + C + c];
      }
      const auto [mu, v] = finish(t1, t2, shift[c], static_cast<double>(R));
      const double inv = 1.0 / std::sqrt(v + eps);
      mean[c] = static_cast<T>(mu);
      var[c] = static_cast<T>(v);
      invstd[c] = static_cast<T>(inv);
      update_running(rm, rv, c, mu, v, momentum, correction);
      scale[c] = static_cast<T>((w ? w[c] : 1.0) * inv);
      offset[c] = static_cast<T>((b ? b[c] : 0.0) - mu * scale[c]);
    }
    const T* S = scale.data();
    const T* O = offset.data();
    if (act_kind == kNoAct) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const T* p = x + r * C;
        T* q = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = p[c] * S[c] + O[c];
      }
    } else {
      // the same rows as the statistics pass, so the partial sums reuse its buffer
      double* sums = &act_part[static_cast<size_t>(t) * 4 * C];
      with_act(act_kind, lo, hi, [&](auto act, auto kl, auto kh) {
        normalize_rows_act<T, act(), kl(), kh()>(x, y, r0, r1, C, S, O, lo, hi, sums);
      });
    }
  }
  if (act_kind == kNoAct) return;
  // after the region's own barrier: a few thousand additions, not worth another barrier
  for (int64_t c = 0; c < C; ++c) {
    double tot[4] = {0, 0, 0, 0};
    for (int k = 0; k < nt; ++k)
      for (int j = 0; j < 4; ++j) tot[j] += act_part[static_cast<size_t>(k) * 4 * C + j * C + c];
    with_act(act_kind, lo, hi, [&](auto act, auto, auto) {
      exact_act_sums<T, act()>(y + c, R, C, 1, lo, hi, tot);
    });
    finish_act(tot, static_cast<double>(R), c, C, act);
  }
}

// ---------------------------------------------------------------- moments

// Per-channel mean, biased variance, and the fractions of values <= lo and >= hi, written as
// the rows of out (4 x C): what a probe needs of any activation, in one pass.
template <typename T>
void moments_planes(const T* x, int64_t N, int64_t C, int64_t L, T lo, T hi, T* out,
                    int threads) {
  const double m = static_cast<double>(N * L);
  const int nt = std::min<int64_t>(pick_threads(N * L * C, threads), C);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < C; ++c) {
    const T shift = x[c * L];
    const Sums s = plane_sums<T, true>(x, N, C, L, c, shift, lo, hi);
    const auto [mu, v] = finish(s.s1, s.s2, shift, m);
    out[c] = static_cast<T>(mu);
    out[C + c] = static_cast<T>(v);
    out[2 * C + c] = static_cast<T>(s.lo / m);
    out[3 * C + c] = static_cast<T>(s.hi / m);
  }
}

template <typename T>
void moments_rows(const T* x, int64_t R, int64_t C, T lo, T hi, T* out, int threads) {
  const int nt = std::min<int64_t>(pick_threads(R * C, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 4 * C, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* p = &part[static_cast<size_t>(t) * 4 * C];
    row_sums<T, true>(x, r0, r1, C, x, lo, hi, p, p + C, p + 2 * C, p + 3 * C);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double tot[4] = {0, 0, 0, 0};
      for (int k = 0; k < nth; ++k)
        for (int j = 0; j < 4; ++j) tot[j] += part[static_cast<size_t>(k) * 4 * C + j * C + c];
      const auto [mu, v] = finish(tot[0], tot[1], x[c], static_cast<double>(R));
      out[c] = static_cast<T>(mu);
      out[C + c] = static_cast<T>(v);
      out[2 * C + c] = static_cast<T>(tot[2] / R);
      out[3 * C + c] = static_cast<T>(tot[3] / R);
    }
  }
}

// --------------------------------------------------------------- backward

// dx = k*(dy - sum_dy/m - xhat*sum_dy_xhat/m) = a*dy + b*(x - mean) + c, per channel.
struct DxCoef {
  double a, b, c;
};

inline DxCoef dx_coef(double w, double inv, double sum_dy, double sum_dy_xhat, double m) {
  const double k = w * inv;
  return {k, -k * inv * sum_dy_xhat / m, -k * sum_dy / m};
}

template <typename T>
void backward_planes(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L,
                     const T* mean, const T* invstd, const T* w, T* sum_dy_xhat, T* sum_dy,
                     T* dy_sq, T* dx_sq, int threads) {
  const int64_t m = N * L;
  const int nt = std::min<int64_t>(pick_threads(m * C, threads), C);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < C; ++c) {
    const T mu = mean[c];
    double s_dy = 0, s_dyx = 0, s_dy2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = (n * C + c) * L;
      for (int64_t l0 = 0; l0 < L; l0 += kRun) {
        const int64_t l1 = std::min(L, l0 + kRun);
        T a = 0, bx = 0, g2 = 0;
#pragma omp simd reduction(+ : a, bx, g2)
        for (int64_t l = l0; l < l1; ++l) {
          const T g = dy[o + l];
          a += g;
          bx += g * (x[o + l] - mu);
          g2 += g * g;
        }
        s_dy += a;
        s_dyx += bx;
        s_dy2 += g2;
      }
    }
    const double inv = invstd[c];
    const double sdx = s_dyx * inv;
    sum_dy[c] = static_cast<T>(s_dy);
    sum_dy_xhat[c] = static_cast<T>(sdx);
    dy_sq[c] = static_cast<T>(s_dy2);
    if (!dx) continue;
    const DxCoef k = dx_coef(w ? w[c] : 1.0, inv, s_dy, sdx, static_cast<double>(m));
    const T ka = static_cast<T>(k.a), kb = static_cast<T>(k.b), kc = static_cast<T>(k.c);
    double s_dx2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = (n * C + c) * L;
      for (int64_t l0 = 0; l0 < L; l0 += kRun) {
        const int64_t l1 = std::min(L, l0 + kRun);
        T q2 = 0;
#pragma omp simd reduction(+ : q2)
        for (int64_t l = l0; l < l1; ++l) {
          const T v = ka * dy[o + l] + kb * (x[o + l] - mu) + kc;
          dx[o + l] = v;
          q2 += v * v;
        }
        s_dx2 += q2;
      }
    }
    dx_sq[c] = static_cast<T>(s_dx2);
  }
}

template <typename T>
void backward_rows(const T* dy, const T* x, T* dx, int64_t R, int64_t C, const T* mean,
                   const T* invstd, const T* w, T* sum_dy_xhat, T* sum_dy, T* dy_sq, T* dx_sq,
                   int threads) {
  const int nt = std::min<int64_t>(pick_threads(R * C, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 4 * C, 0.0);
  std::vector<T> ka(C), kb(C), kc(C);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* s_dy = &part[static_cast<size_t>(t) * 4 * C];
    double* s_dyx = s_dy + C;
    double* s_dy2 = s_dyx + C;
    double* s_dx2 = s_dy2 + C;
    std::vector<T> a(C), bx(C), g2(C);
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      std::fill(a.begin(), a.end(), T(0));
      std::fill(bx.begin(), bx.end(), T(0));
      std::fill(g2.begin(), g2.end(), T(0));
      const int64_t re = std::min(r1, rb + kRowBlock);
      for (int64_t r = rb; r < re; ++r) {
        const T* g = dy + r * C;
        const T* p = x + r * C;
        T* A = a.data();
        T* B = bx.data();
        T* G = g2.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          A[c] += g[c];
          B[c] += g[c] * (p[c] - mean[c]);
          G[c] += g[c] * g[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s_dy[c] += a[c];
        s_dyx[c] += bx[c];
        s_dy2[c] += g2[c];
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double t_dy = 0, t_dyx = 0, t_dy2 = 0;
      for (int k = 0; k < nth; ++k) {
        const double* p = &part[static_cast<size_t>(k) * 4 * C];
        t_dy += p[c];
        t_dyx += p[C + c];
        t_dy2 += p[2 * C + c];
      }
      const double inv = invstd[c];
      const double sdx = t_dyx * inv;
      sum_dy[c] = static_cast<T>(t_dy);
      sum_dy_xhat[c] = static_cast<T>(sdx);
      dy_sq[c] = static_cast<T>(t_dy2);
      const DxCoef k = dx_coef(w ? w[c] : 1.0, inv, t_dy, sdx, static_cast<double>(R));
      ka[c] = static_cast<T>(k.a);
      kb[c] = static_cast<T>(k.b);
      kc[c] = static_cast<T>(k.c);
    }
    if (dx) {
      const T* KA = ka.data();
      const T* KB = kb.data();
      const T* KC = kc.data();
      std::vector<T> q2(C, T(0));
      T* Q = q2.data();
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(r1, rb + kRowBlock);
        for (int64_t r = rb; r < re; ++r) {
          const T* g = dy + r * C;
          const T* p = x + r * C;
          T* q = dx + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T v = KA[c] * g[c] + KB[c] * (p[c] - mean[c]) + KC[c];
            q[c] = v;
            Q[c] += v * v;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          s_dx2[c] += q2[c];
          q2[c] = 0;
        }
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        double t_dx2 = 0;
        for (int k = 0; k < nth; ++k) t_dx2 += part[static_cast<size_t>(k) * 4 * C + 3 * C + c];
        dx_sq[c] = static_cast<T>(t_dx2);
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------ torch operators

namespace {

using at::Tensor;
using std::optional;

// Layout and sizes of an (N, C, *) input; `rows` when the channel is the innermost dimension.
struct Shape {
  int64_t n, c, l;
  bool rows;
};

Shape shape_of(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), l = x.numel() / std::max<int64_t>(1, n * c);
  if (x.is_contiguous()) return {n, c, l, l == 1};
  // channels-last order: C innermost, then the trailing dims, then N
  int64_t expected = 1;
  std::vector<int64_t> order{1};
  for (int64_t d = x.dim() - 1; d > 1; --d) order.push_back(d);
  order.push_back(0);
  for (int64_t d : order) {
    TORCH_CHECK(x.size(d) == 1 || x.stride(d) == expected,
                "bncore: input layout is neither contiguous nor channels-last");
    expected *= x.size(d);
  }
  return {n, c, l, true};
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(const optional<Tensor>& t) {
  return t && t->defined() ? t->mutable_data_ptr<T>() : nullptr;
}

void check_param(const optional<Tensor>& t, const Tensor& x, const char* name) {
  if (!t || !t->defined()) return;
  TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->numel() == x.size(1),
              "bncore: ", name, " must be a contiguous ", x.scalar_type(), " vector of ",
              x.size(1), " elements");
}

// A fresh (C,) vector like x; allocating directly keeps the per-call overhead down.
Tensor channel_vector(const Tensor& x) { return at::empty({x.size(1)}, x.options()); }

struct ForwardOut {
  Tensor y, mean, var, invstd, act;
};

// A layer's part of a recorded step's row (bncore.stats.RecordTarget): 14 rows of C values,
// then N*k tracked units. Rows: mean, var, 4 of act, running mean and var, gamma, beta, then
// the 4 gradient sums that the backward fills.
constexpr int64_t kRecordAct = 2, kRecordRunning = 6, kRecordParams = 8, kRecordGrad = 10,
                  kRecordRows = 14;

// The row's checked data pointer for x's layer, or nullptr without a record.
template <typename T>
T* record_ptr(const optional<Tensor>& record, const Tensor& x, const optional<Tensor>& units) {
  if (!record || !record->defined()) return nullptr;
  TORCH_CHECK(record->scalar_type() == x.scalar_type() && record->is_contiguous() &&
                  record->device().is_cpu(),
              "bncore: record must be a contiguous CPU tensor of x's dtype");
  // with units, the record is exactly the layer's stretch: a batch of another size is an error
  const bool with_units = units && units->defined();
  const int64_t need = kRecordRows * x.size(1) + (with_units ? x.size(0) * units->numel() : 0);
  TORCH_CHECK(with_units ? record->numel() == need : record->numel() >= need,
              "bncore: the record holds ", record->numel(), " values, this batch of ", x.size(0),
              " needs ", need, " (was the recorder laid out for another batch size?)");
  return record->mutable_data_ptr<T>();
}

// out[n * k + j] = x[n, units[j], centre of the trailing dims], for every n of the batch.
template <typename T>
void gather_units(const Tensor& x, const int64_t* units, int64_t k, T* out) {
  int64_t centre = 0;
  for (int64_t d = 2; d < x.dim(); ++d) centre += (x.size(d) / 2) * x.stride(d);
  const T* base = x.const_data_ptr<T>();
  for (int64_t n = 0; n < x.size(0); ++n)
    for (int64_t j = 0; j < k; ++j) out[n * k + j] = base[n * x.stride(0) + units[j] * x.stride(1) + centre];
}

template <typename T>
void copy_or_nan(T* out, const T* src, int64_t n) {
  if (src)
    std::memcpy(out, src, n * sizeof(T));
  else
    std::fill_n(out, n, std::numeric_limits<T>::quiet_NaN());
}

// What the forward knows of a recorded step, written while it is still in cache: the batch
// statistics, the running buffers as just updated, gamma and beta, NaN gradient sums for the
// backward to fill, and y at the tracked units (n-major, centre of the trailing dims).
template <typename T>
void write_record(T* r, const Tensor& y, int64_t C, const T* mean, const T* var, const T* rm,
                  const T* rv, const T* w, const T* b, const optional<Tensor>& units) {
  copy_or_nan(r, mean, C);
  copy_or_nan(r + C, var, C);
  copy_or_nan(r + kRecordRunning * C, rm, C);
  copy_or_nan(r + (kRecordRunning + 1) * C, rv, C);
  copy_or_nan(r + kRecordParams * C, w, C);
  copy_or_nan(r + (kRecordParams + 1) * C, b, C);
  copy_or_nan<T>(r + kRecordGrad * C, nullptr, 4 * C);
  if (!units || !units->defined()) return;
  TORCH_CHECK(units->scalar_type() == at::kLong && units->is_contiguous() && units->is_cpu(),
              "bncore: units must be a contiguous int64 CPU tensor");
  gather_units<T>(y, units->const_data_ptr<int64_t>(), units->numel(), r + kRecordRows * C);
}

// y and the statistics (mean, var, invstd); moves the running buffers if given. With an
// activation kind (Act), also the (4, C) statistics of act(y): mean, variance, fractions
// <= act_lo and >= act_hi; else act is an empty tensor. With a record, the step's row is
// written there (write_record), the activation statistics in its act rows (act is empty).
ForwardOut forward_impl(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                        const optional<Tensor>& rm, const optional<Tensor>& rv, double momentum,
                        double correction, double eps, int64_t act_kind = kNoAct,
                        double act_lo = 0, double act_hi = 0,
                        const optional<Tensor>& record = std::nullopt,
                        const optional<Tensor>& units = std::nullopt) {
  TORCH_CHECK(act_kind >= kNoAct && act_kind <= kRelu, "bncore: unknown activation kind ",
              act_kind);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "bncore: CPU input of shape (N, C, ...)");
  for (auto [t, name] : {std::pair{&w, "weight"}, {&b, "bias"}, {&rm, "running_mean"},
                         {&rv, "running_var"}})
    check_param(*t, x, name);
  const Shape s = shape_of(x);
  const bool recording = record && record->defined();
  ForwardOut o{at::empty_like(x), channel_vector(x), channel_vector(x), channel_vector(x),
               at::empty({act_kind == kNoAct || recording ? 0 : 4 * s.c}, x.options())};
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bncore_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = o.y.mutable_data_ptr<scalar_t>();
    scalar_t *mp = o.mean.mutable_data_ptr<scalar_t>(), *vp = o.var.mutable_data_ptr<scalar_t>(),
             *ip = o.invstd.mutable_data_ptr<scalar_t>();
    scalar_t* rec = record_ptr<scalar_t>(record, x, units);
    scalar_t* ap = act_kind == kNoAct ? nullptr
                   : rec           ? rec + kRecordAct * s.c
                                   : o.act.mutable_data_ptr<scalar_t>();
    const auto lo = static_cast<scalar_t>(act_lo), hi = static_cast<scalar_t>(act_hi);
    if (s.rows)
      forward_rows<scalar_t>(xp, yp, s.n * s.l, s.c, ptr_or_null<scalar_t>(w),
                             ptr_or_null<scalar_t>(b), eps, mp, vp, ip,
                             mut_ptr_or_null<scalar_t>(rm), mut_ptr_or_null<scalar_t>(rv),
                             momentum, correction, threads, act_kind, lo, hi, ap);
    else
      forward_planes<scalar_t>(xp, yp, s.n, s.c, s.l, ptr_or_null<scalar_t>(w),
                               ptr_or_null<scalar_t>(b), eps, mp, vp, ip,
                               mut_ptr_or_null<scalar_t>(rm), mut_ptr_or_null<scalar_t>(rv),
                               momentum, correction, threads, act_kind, lo, hi, ap);
    if (rec)
      write_record<scalar_t>(rec, o.y, s.c, mp, vp, mut_ptr_or_null<scalar_t>(rm),
                             mut_ptr_or_null<scalar_t>(rv), ptr_or_null<scalar_t>(w),
                             ptr_or_null<scalar_t>(b), units);
  });
  if (o.act.numel()) o.act = o.act.view({4, s.c});
  return o;
}

// A (4, C) tensor of NaN: the gradient sums before a backward has filled them.
Tensor nan_sums(const Tensor& x) {
  Tensor sums = at::empty({4, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bncore_nan", [&] {
    std::fill_n(sums.mutable_data_ptr<scalar_t>(), sums.numel(),
                std::numeric_limits<scalar_t>::quiet_NaN());
  });
  return sums;
}

// A copy of row i of a contiguous (4, C) tensor.
Tensor row_copy(const Tensor& sums, int64_t i) {
  Tensor out = at::empty({sums.size(1)}, sums.options());
  std::memcpy(out.mutable_data_ptr(), static_cast<const char*>(sums.const_data_ptr()) +
                                          i * sums.size(1) * sums.element_size(),
              sums.size(1) * sums.element_size());
  return out;
}

// dx (undefined unless need_dx), and sums rows (sum_dy_xhat, sum_dy, dy_sq, dx_sq) into `sums`.
Tensor backward_impl(const Tensor& dy_in, const Tensor& x, const Tensor& mean,
                     const Tensor& invstd, const optional<Tensor>& w, bool need_dx,
                     Tensor& sums) {
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "bncore: gradient of shape ", dy_in.sizes(),
              " for input of shape ", x.sizes());
  Tensor dy = dy_in;
  if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type())
    dy = at::empty_like(x).copy_(dy_in);
  const Shape s = shape_of(x);
  Tensor dx = need_dx ? at::empty_like(x) : Tensor();
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bncore_backward", [&] {
    scalar_t* st = sums.mutable_data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *ip = invstd.const_data_ptr<scalar_t>();
    if (s.rows)
      backward_rows<scalar_t>(dyp, xp, dxp, s.n * s.l, s.c, mp, ip, ptr_or_null<scalar_t>(w),
                              st, st + s.c, st + 2 * s.c, st + 3 * s.c, threads);
    else
      backward_planes<scalar_t>(dyp, xp, dxp, s.n, s.c, s.l, mp, ip, ptr_or_null<scalar_t>(w),
                                st, st + s.c, st + 2 * s.c, st + 3 * s.c, threads);
  });
  return dx;
}

// x as a tensor the kernels can stride (a contiguous copy only if it has an odd layout).
std::pair<Tensor, Shape> strideable(const Tensor& x) {
  try {
    return {x, shape_of(x)};
  } catch (const c10::Error&) {
    Tensor c = x.contiguous();
    return {c, shape_of(c)};
  }
}

template <typename T>
void moments_into(const Tensor& x_in, double lo, double hi, T* out, int threads) {
  auto [x, s] = strideable(x_in);
  const T* xp = x.const_data_ptr<T>();
  const auto l = static_cast<T>(lo), h = static_cast<T>(hi);
  if (s.rows)
    moments_rows<T>(xp, s.n * s.l, s.c, l, h, out, threads);
  else
    moments_planes<T>(xp, s.n, s.c, s.l, l, h, out, threads);
}

void check_float_input(const Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && x.size(0) * x.size(1) > 0, "bncore: ", what,
              " takes a non-empty CPU tensor of shape (N, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "bncore: ", what,
              " takes float32 or float64");
}

Tensor channel_moments(const Tensor& x, double lo, double hi) {
  check_float_input(x, "channel_moments");
  Tensor out = at::empty({4, x.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bncore_moments", [&] {
    moments_into<scalar_t>(x, lo, hi, out.mutable_data_ptr<scalar_t>(), at::get_num_threads());
  });
  return out;
}

// L2 norm of a contiguous float buffer (double accumulation across runs).
double l2_norm(const float* p, int64_t m, int threads) {
  double total = 0;
#pragma omp parallel for reduction(+ : total) num_threads(pick_threads(m, threads)) if (m > kSerialWork)
  for (int64_t b0 = 0; b0 < m; b0 += kRun) {
    const int64_t b1 = std::min(m, b0 + kRun);
    float a = 0;
#pragma omp simd reduction(+ : a)
    for (int64_t j = b0; j < b1; ++j) a += p[j] * p[j];
    total += a;
  }
  return std::sqrt(total);
}

// Registers a hook on `weight` that writes the L2 norm of each gradient the backward computes
// for it into out[row, column], row = flag[0] - 1 (nothing while flag[0] is 0): taken the
// moment the gradient exists, so it is still in cache, with no Python in the backward and
// nothing left to copy afterwards. Returns the hook's handle for unwatch.
int64_t watch_grad_norm(const Tensor& weight, const Tensor& out, int64_t column,
                        const Tensor& flag) {
  TORCH_CHECK(weight.requires_grad(), "bncore: watch_grad_norm needs a tensor that requires grad");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device().is_cpu() &&
                  out.dim() == 2 && column >= 0 && column < out.size(1),
              "bncore: watch_grad_norm writes into a contiguous float32 CPU matrix");
  TORCH_CHECK(flag.scalar_type() == at::kLong && flag.numel() == 1 && flag.device().is_cpu(),
              "bncore: watch_grad_norm's flag is a one-element int64 CPU tensor");
  Tensor o = out, f = flag;  // held by the hook
  return weight.register_hook([o, f, column](const at::TensorBase& grad) {
    const int64_t row = f.const_data_ptr<int64_t>()[0] - 1;
    if (row < 0 || row >= o.size(0) || !grad.defined() || !grad.device().is_cpu() ||
        grad.scalar_type() != at::kFloat)
      return;
    const Tensor g = Tensor(grad).contiguous();
    o.mutable_data_ptr<float>()[row * o.size(1) + column] =
        static_cast<float>(l2_norm(g.const_data_ptr<float>(), g.numel(), at::get_num_threads()));
  });
}

void unwatch_grad_norm(const Tensor& weight, int64_t handle) {
  weight.remove_hook(static_cast<unsigned>(handle));
}

// What is left of a recorded step (the BN layers write the rest themselves), written into `out`
// (float32, 1-d) with a single call, piece i from offsets[i] on. Piece kinds:
//   0 copy      the tensor's values (contiguous order)
//   1 mean/var  2C values: per-channel mean and biased variance of an (N, C, ...) tensor
//   2 moments   4C values: mean, variance, fraction <= lo, fraction >= hi
//   3 units     N*k values: x[n, index[j], centre of the trailing dims], n-major (takes the
//               next tensor of `index`)
//   4 norm      1 value: the L2 norm of the whole tensor
// threads: how many OpenMP threads to use (0: torch's setting).
enum Piece : int64_t { kCopy = 0, kMeanVar = 1, kMoments = 2, kUnits = 3, kNorm = 4 };

void record_row(const Tensor& out, at::TensorList tensors, at::IntArrayRef kinds,
                at::ArrayRef<double> lo, at::ArrayRef<double> hi, at::TensorList index,
                at::IntArrayRef offsets, int64_t threads_wanted) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device().is_cpu(),
              "bncore: record_row writes a contiguous float32 CPU row");
  TORCH_CHECK(tensors.size() == kinds.size() && lo.size() == kinds.size() &&
                  hi.size() == kinds.size() && offsets.size() == kinds.size(),
              "bncore: record_row needs one kind, lo, hi and offset per tensor");
  float* const start = out.mutable_data_ptr<float>();
  const float* end = start + out.numel();
  const int threads = threads_wanted > 0 ? static_cast<int>(threads_wanted) : at::get_num_threads();
  size_t next_index = 0;
  std::vector<float> tmp;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat, "bncore: record_row takes float32 tensors");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] < out.numel(),
                "bncore: record_row offset out of its row");
    float* o = start + offsets[i];
    int64_t n = 0;
    switch (kinds[i]) {
      case kCopy: {
        n = t.numel();
        TORCH_CHECK(o + n <= end, "bncore: record_row overflows its row");
        Tensor c = t.contiguous();
        std::memcpy(o, c.const_data_ptr<float>(), n * sizeof(float));
        break;
      }
      case kMeanVar:
      case kMoments: {
        check_float_input(t, "record_row");
        const int64_t c = t.size(1);
        n = (kinds[i] == kMoments ? 4 : 2) * c;
        TORCH_CHECK(o + n <= end, "bncore: record_row overflows its row");
        tmp.resize(4 * c);
        moments_into<float>(t, lo[i], hi[i], tmp.data(), threads);
        std::memcpy(o, tmp.data(), n * sizeof(float));
        break;
      }
      case kUnits: {
        TORCH_CHECK(next_index < index.size(), "bncore: record_row is missing a unit index");
        const Tensor units = index[next_index++].to(at::kLong).contiguous();
        n = t.size(0) * units.numel();
        TORCH_CHECK(o + n <= end, "bncore: record_row overflows its row");
        gather_units<float>(t, units.const_data_ptr<int64_t>(), units.numel(), o);
        break;
      }
      case kNorm: {
        n = 1;
        TORCH_CHECK(o + 1 <= end, "bncore: record_row overflows its row");
        Tensor c = t.contiguous();
        *o = static_cast<float>(l2_norm(c.const_data_ptr<float>(), c.numel(), threads));
        break;
      }
      default:
        TORCH_CHECK(false, "bncore: record_row got an unknown piece kind ", kinds[i]);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const optional<Tensor>& w,
                                                      const optional<Tensor>& b,
                                                      const optional<Tensor>& rm,
                                                      const optional<Tensor>& rv, double momentum,
                                                      double correction, double eps) {
  ForwardOut o = forward_impl(x, w, b, rm, rv, momentum, correction, eps);
  return {o.y, o.mean, o.var, o.invstd};
}

std::tuple<Tensor, Tensor> bn_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                       const Tensor& invstd, const optional<Tensor>& w,
                                       bool need_dx) {
  Tensor sums = nan_sums(x);
  Tensor dx = backward_impl(dy, x, mean, invstd, w, need_dx, sums);
  return {dx, sums};
}

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward of batch_norm_train, as a plain autograd node: the generic custom-Function
// machinery (input metadata for all 14 arguments, saved_data by name, five wrapped outputs)
// cost about as much per call as the layer's whole kernel on small inputs.
struct BatchNormTrainBackward : public Node {
  SavedVariable x_, w_, mean_, invstd_;
  Tensor grad_stats_;  // (4, C), written in place by apply: not version-checked
  double eps_ = 0;

  std::string name() const override { return "BatchNormTrainBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    w_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
  }

  // next edges: x, weight, bias (an undefined tensor's edge is invalid: nothing computed)
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    if (grads.empty() || !grads[0].defined()) return out;
    const Tensor x = x_.unpack(), w = w_.unpack();
    const bool need_dx = task_should_compute_output(0);
    const bool need_w = task_should_compute_output(1), need_b = task_should_compute_output(2);
    const optional<Tensor> w_opt = w.defined() ? optional<Tensor>(w) : std::nullopt;
    if (at::GradMode::is_enabled()) {
      // create_graph: differentiate through the statistics too, with the reference math
      // (registered from Python as bncore::reference_backward).
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("bncore::reference_backward", "")
                           .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                               const Tensor&, const Tensor&, const optional<Tensor>&, double)>();
      auto [rdx, rdyx, rdy, dy_sq, dx_sq] = op.call(grads[0], x, w_opt, eps_);
      {
        at::NoGradGuard no_grad;
        for (auto [i, t] : {std::pair{0, &rdyx}, {1, &rdy}, {2, &dy_sq}, {3, &dx_sq}})
          grad_stats_[i].copy_(*t);
      }
      out[0] = need_dx ? rdx : Tensor();
      out[1] = need_w ? rdyx : Tensor();
      out[2] = need_b ? rdy : Tensor();
      return out;
    }
    Tensor dx = backward_impl(grads[0], x, mean_.unpack(), invstd_.unpack(), w_opt, need_dx,
                              grad_stats_);
    out[0] = need_dx ? dx : Tensor();
    // copies: grad_stats stays the layer's record whatever happens to the parameter grads
    if (need_w) out[1] = row_copy(grad_stats_, 0);
    if (need_b) out[2] = row_copy(grad_stats_, 1);
    return out;
  }
};

// Training-mode batch norm; returns (y, mean, var, grad_stats, act_stats) where grad_stats
// (4 x C: sum_dy_xhat, sum_dy, dy_sq, dx_sq) is NaN until the backward fills it, and act_stats
// the statistics of the activation that follows (see forward_impl). Recording, the backward
// fills record_grad, the (4, C) view on the record's gradient rows that the caller holds, and
// grad_stats is act_stats (empty). Only y is differentiable.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_train(
    const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
    const optional<Tensor>& rm, const optional<Tensor>& rv, double momentum, double correction,
    double eps, int64_t act_kind, double act_lo, double act_hi, const optional<Tensor>& record,
    const optional<Tensor>& record_grad, const optional<Tensor>& units) {
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(w) &&
                  !torch::autograd::isFwGradDefined(b),
              "bncore: BatchNorm has no forward-mode AD (dual tensors); "
              "torch.nn.BatchNorm has, if you need it");
  ForwardOut o = forward_impl(x, w, b, rm, rv, momentum, correction, eps, act_kind, act_lo,
                              act_hi, record, units);
  const bool recording = record && record->defined();
  if (recording)
    TORCH_CHECK(record_grad && record_grad->defined() && record_grad->is_contiguous() &&
                    record_grad->dim() == 2 && record_grad->size(0) == 4 &&
                    record_grad->size(1) == x.size(1) &&
                    record_grad->scalar_type() == x.scalar_type(),
                "bncore: record_grad must be a contiguous (4, C) tensor of x's dtype");
  Tensor grad_stats = recording ? *record_grad : nan_sums(x);
  if (torch::autograd::compute_requires_grad(x, w, b)) {
    auto node = c10::make_intrusive<BatchNormTrainBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
    node->x_ = SavedVariable(x, false);
    node->w_ = SavedVariable(w.value_or(Tensor()), false);
    node->mean_ = SavedVariable(o.mean, false);
    node->invstd_ = SavedVariable(o.invstd, false);
    node->grad_stats_ = grad_stats;
    node->eps_ = eps;
    torch::autograd::set_history(o.y, node);
  }
  return {o.y, o.mean, o.var, recording ? o.act : grad_stats, o.act};
}

}  // namespace

TORCH_LIBRARY(bncore, m) {
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float correction, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, bool need_dx) "
      "-> (Tensor, Tensor)");
  m.def(
      "batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float correction, float eps, int act=0, "
      "float act_lo=0, float act_hi=0, Tensor(c!)? record=None, Tensor(d!)? record_grad=None, "
      "Tensor? units=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_moments(Tensor x, float lo, float hi) -> Tensor");
  m.def("watch_grad_norm(Tensor weight, Tensor(a!) out, int column, Tensor flag) -> int");
  m.def("unwatch_grad_norm(Tensor weight, int handle) -> ()");
  m.def(
      "record_row(Tensor(a!) out, Tensor[] tensors, int[] kinds, float[] lo, float[] hi, "
      "Tensor[] index, int[] offsets, int threads=0) -> ()");
  m.def(
      "reference_backward(Tensor dy, Tensor x, Tensor? weight, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bncore, CPU, m) {
  m.impl("forward", &bn_forward);
  m.impl("backward", &bn_backward);
  m.impl("channel_moments", &channel_moments);
  m.impl("record_row", &record_row);
  m.impl("watch_grad_norm", &watch_grad_norm);
  m.impl("unwatch_grad_norm", &unwatch_grad_norm);
  m.impl("batch_norm_train", &batch_norm_train);
}

TORCH_LIBRARY_IMPL(bncore, Autograd, m) { m.impl("batch_norm_train", &batch_norm_train); }
