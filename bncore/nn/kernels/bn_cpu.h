// Shared by bn_cpu.cpp (the batch-norm operators) and record_cpu.cpp (the recorder's):
// the fused math and the checks on what the operators are given.
//
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
#pragma once

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
// below this many values, one thread (an MLP's (128, 256) batch is worth two: measured in the
// network, forward and backward 25% faster than on one)
constexpr int64_t kSerialWork = 16384;

int pick_threads(int64_t work, int requested) {
  if (requested < 1 || work < kSerialWork) return 1;
  return static_cast<int>(std::min<int64_t>(requested, std::max<int64_t>(1, work / kSerialWork)));
}

void split(int64_t n, int parts, int part, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, extra = n % parts;
  *begin = part * base + std::min<int64_t>(part, extra);
  *end = *begin + base + (part < extra ? 1 : 0);
}

// The rows kernels also take planes of few values (the small images late in a CNN: 4x4, 3x3) as
// an (N, C*L) matrix whose L consecutive columns are one channel: the planes kernels reduce each
// plane on its own, which on a plane of a few values costs more than the sums themselves. Wider
// planes, or rows too long for their partial sums to stay in cache, are faster as planes
// (measured: 8x8 planes, or 4x4 with 1024 channels).
constexpr int64_t kTinyPlane = 8, kFoldedPlane = 32, kFoldedColumns = 12288;
inline bool folded(int64_t c, int64_t l) {
  return l < kTinyPlane || (l <= kFoldedPlane && c * l <= kFoldedColumns);
}

// v[c] for each of the K = C * L columns (channel c: columns [c * L, c * L + L)); v itself when
// L is 1 (or v is null).
template <typename T>
const T* per_column(const T* v, int64_t C, int64_t L, std::vector<T>& buf) {
  if (L == 1 || !v) return v;
  buf.resize(static_cast<size_t>(C * L));
  for (int64_t c = 0; c < C; ++c) std::fill_n(buf.data() + c * L, L, v[c]);
  return buf.data();
}

// The sum of one channel's L columns over the nt threads' partial sums: part holds, per thread,
// `rows` rows of K = C * L doubles; this adds up row j's columns of channel c.
inline double channel_total(const std::vector<double>& part, int nt, int64_t rows, int64_t K,
                            int64_t L, int j, int64_t c) {
  double t = 0;
  for (int k = 0; k < nt; ++k) {
    const double* p = &part[static_cast<size_t>(k * rows + j) * K + c * L];
    for (int64_t l = 0; l < L; ++l) t += p[l];
  }
  return t;
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

// Sums of K quantities over one channel's values, kept per SIMD lane across the channel's planes
// and added up in double every kRun values: a plane of an 8x8 image is only 64 values, so a
// horizontal reduction per plane cost more than the sums themselves.
template <typename T, int K>
struct LaneSums {
  static constexpr int64_t W = 64 / sizeof(T);  // a cache line: 16 floats, 8 doubles
  alignas(64) T lane[K][W] = {};
  double total[K] = {};
  int64_t pending = 0;  // the most values any lane holds

  // f(lane, i, j) adds value i's K quantities into lane[k][j], for i in [0, len).
  template <typename F>
  inline void add(int64_t len, F&& f) {
    for (int64_t i0 = 0; i0 < len; i0 += kRun) {
      const int64_t i1 = std::min(len, i0 + kRun);
      int64_t i = i0;
      for (; i + W <= i1; i += W) {
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) f(lane, i + j, j);
      }
      const int64_t rest = i1 - i;
#pragma omp simd
      for (int64_t j = 0; j < rest; ++j) f(lane, i + j, j);
      pending += (i1 - i0 + W - 1) / W;
      if (pending >= kRun / W) flush();
    }
  }

  // The lanes into total.
  inline void flush() {
    for (int k = 0; k < K; ++k) {
      double s = 0;
      for (int64_t j = 0; j < W; ++j) s += lane[k][j];
      total[k] += s;
      std::fill_n(lane[k], W, T(0));
    }
    pending = 0;
  }
};

// Shifted sums of one channel (planes layout): sum d, sum d^2 with d = x - shift, and, if kTails,
// the counts of x <= lo and x >= hi.
struct Sums {
  double s1 = 0, s2 = 0, lo = 0, hi = 0;
};

template <typename T, bool kTails>
Sums plane_sums(const T* x, int64_t N, int64_t C, int64_t L, int64_t c, T shift, T lo, T hi) {
  LaneSums<T, kTails ? 4 : 2> a;
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + (n * C + c) * L;
    a.add(L, [&](auto& lane, int64_t l, int64_t j) {
      const T d = p[l] - shift;
      lane[0][j] += d;
      lane[1][j] += d * d;
      if constexpr (kTails) {
        lane[2][j] += p[l] <= lo ? T(1) : T(0);
        lane[3][j] += p[l] >= hi ? T(1) : T(0);
      }
    });
  }
  a.flush();
  if constexpr (kTails) return {a.total[0], a.total[1], a.total[2], a.total[3]};
  else return {a.total[0], a.total[1], 0, 0};
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
  LaneSums<T, 4> a;
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + (n * C + c) * L;
    T* q = y + (n * C + c) * L;
    if constexpr (kAct == kNoAct) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) q[l] = p[l] * scale + offset;
    } else {
      a.add(L, [&](auto& lane, int64_t l, int64_t j) {
        const T v = p[l] * scale + offset;
        q[l] = v;
        const T u = activate_fast<T, kAct>(v);
        lane[0][j] += u;
        lane[1][j] += u * u;
        if constexpr (kLo) lane[2][j] += u <= lo ? T(1) : T(0);
        if constexpr (kHi) lane[3][j] += u >= hi ? T(1) : T(0);
      });
    }
  }
  a.flush();
  for (int k = 0; k < 4; ++k) sums[k] += a.total[k];
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
void forward_rows(const T* x, T* y, int64_t R, int64_t C, int64_t L, const T* w, const T* b,
                  double eps, T* mean, T* var, T* invstd, T* rm, T* rv, double momentum,
                  double correction, int threads, int64_t act_kind = kNoAct, T lo = T(0),
                  T hi = T(0), T* act = nullptr) {
  const int64_t K = C * L;  // columns (see folded)
  const int nt = std::min<int64_t>(pick_threads(R * K, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * K, 0.0);
  std::vector<double> act_part(act_kind == kNoAct ? 0 : static_cast<size_t>(nt) * 4 * K, 0.0);
  std::vector<T> scale(K), offset(K), firsts(C), shift_buf;
  for (int64_t c = 0; c < C; ++c) firsts[c] = x[c * L];  // each channel's first value
  const T* shift = per_column(firsts.data(), C, L, shift_buf);
  const double m = static_cast<double>(R * L);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* s1 = &part[static_cast<size_t>(t) * 2 * K];
    row_sums<T, false>(x, r0, r1, K, shift, T(0), T(0), s1, s1 + K, nullptr, nullptr);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      const double t1 = channel_total(part, nth, 2, K, L, 0, c);
      const double t2 = channel_total(part, nth, 2, K, L, 1, c);
      const auto [mu, v] = finish(t1, t2, firsts[c], m);
      const double inv = 1.0 / std::sqrt(v + eps);
      mean[c] = static_cast<T>(mu);
      var[c] = static_cast<T>(v);
      invstd[c] = static_cast<T>(inv);
      update_running(rm, rv, c, mu, v, momentum, correction);
      const T sc = static_cast<T>((w ? w[c] : 1.0) * inv);
      std::fill_n(scale.data() + c * L, L, sc);
      std::fill_n(offset.data() + c * L, L, static_cast<T>((b ? b[c] : 0.0) - mu * sc));
    }
    const T* S = scale.data();
    const T* O = offset.data();
    if (act_kind == kNoAct) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const T* p = x + r * K;
        T* q = y + r * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) q[k] = p[k] * S[k] + O[k];
      }
    } else {
      // the same rows as the statistics pass, so the partial sums reuse its buffer
      double* sums = &act_part[static_cast<size_t>(t) * 4 * K];
      with_act(act_kind, lo, hi, [&](auto act, auto kl, auto kh) {
        normalize_rows_act<T, act(), kl(), kh()>(x, y, r0, r1, K, S, O, lo, hi, sums);
      });
    }
  }
  if (act_kind == kNoAct) return;
  // after the region's own barrier: a few thousand additions, not worth another barrier
  for (int64_t c = 0; c < C; ++c) {
    double tot[4];
    for (int j = 0; j < 4; ++j) tot[j] = channel_total(act_part, nt, 4, K, L, j, c);
    with_act(act_kind, lo, hi, [&](auto act, auto, auto) {
      exact_act_sums<T, act()>(y + c * L, R, K, L, lo, hi, tot);
    });
    finish_act(tot, m, c, C, act);
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
void moments_rows(const T* x, int64_t R, int64_t C, int64_t L, T lo, T hi, T* out, int threads) {
  const int64_t K = C * L;  // columns (see folded)
  const int nt = std::min<int64_t>(pick_threads(R * K, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 4 * K, 0.0);
  std::vector<T> firsts(C), shift_buf;
  for (int64_t c = 0; c < C; ++c) firsts[c] = x[c * L];
  const T* shift = per_column(firsts.data(), C, L, shift_buf);
  const double m = static_cast<double>(R * L);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* p = &part[static_cast<size_t>(t) * 4 * K];
    row_sums<T, true>(x, r0, r1, K, shift, lo, hi, p, p + K, p + 2 * K, p + 3 * K);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double tot[4];
      for (int j = 0; j < 4; ++j) tot[j] = channel_total(part, nth, 4, K, L, j, c);
      const auto [mu, v] = finish(tot[0], tot[1], firsts[c], m);
      out[c] = static_cast<T>(mu);
      out[C + c] = static_cast<T>(v);
      out[2 * C + c] = static_cast<T>(tot[2] / m);
      out[3 * C + c] = static_cast<T>(tot[3] / m);
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
    LaneSums<T, 3> g;
    for (int64_t n = 0; n < N; ++n) {
      const T *gp = dy + (n * C + c) * L, *xp = x + (n * C + c) * L;
      g.add(L, [&](auto& lane, int64_t l, int64_t j) {
        const T v = gp[l];
        lane[0][j] += v;
        lane[1][j] += v * (xp[l] - mu);
        lane[2][j] += v * v;
      });
    }
    g.flush();
    const double s_dy = g.total[0], inv = invstd[c];
    const double sdx = g.total[1] * inv;
    sum_dy[c] = static_cast<T>(s_dy);
    sum_dy_xhat[c] = static_cast<T>(sdx);
    dy_sq[c] = static_cast<T>(g.total[2]);
    if (!dx) continue;
    const DxCoef k = dx_coef(w ? w[c] : 1.0, inv, s_dy, sdx, static_cast<double>(m));
    const T ka = static_cast<T>(k.a), kb = static_cast<T>(k.b), kc = static_cast<T>(k.c);
    LaneSums<T, 1> q;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = (n * C + c) * L;
      const T *gp = dy + o, *xp = x + o;
      T* out = dx + o;
      q.add(L, [&](auto& lane, int64_t l, int64_t j) {
        const T v = ka * gp[l] + kb * (xp[l] - mu) + kc;
        out[l] = v;
        lane[0][j] += v * v;
      });
    }
    q.flush();
    dx_sq[c] = static_cast<T>(q.total[0]);
  }
}

template <typename T>
void backward_rows(const T* dy, const T* x, T* dx, int64_t R, int64_t C, int64_t L,
                   const T* mean, const T* invstd, const T* w, T* sum_dy_xhat, T* sum_dy,
                   T* dy_sq, T* dx_sq, int threads) {
  const int64_t K = C * L;  // columns (see folded)
  const int nt = std::min<int64_t>(pick_threads(R * K, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 4 * K, 0.0);
  std::vector<T> ka(K), kb(K), kc(K), mean_buf;
  const T* mu = per_column(mean, C, L, mean_buf);
  const double m = static_cast<double>(R * L);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* s_dy = &part[static_cast<size_t>(t) * 4 * K];
    double* s_dyx = s_dy + K;
    double* s_dy2 = s_dyx + K;
    double* s_dx2 = s_dy2 + K;
    std::vector<T> a(K), bx(K), g2(K);
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      std::fill(a.begin(), a.end(), T(0));
      std::fill(bx.begin(), bx.end(), T(0));
      std::fill(g2.begin(), g2.end(), T(0));
      const int64_t re = std::min(r1, rb + kRowBlock);
      for (int64_t r = rb; r < re; ++r) {
        const T* g = dy + r * K;
        const T* p = x + r * K;
        T* A = a.data();
        T* B = bx.data();
        T* G = g2.data();
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          A[k] += g[k];
          B[k] += g[k] * (p[k] - mu[k]);
          G[k] += g[k] * g[k];
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        s_dy[k] += a[k];
        s_dyx[k] += bx[k];
        s_dy2[k] += g2[k];
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      const double t_dy = channel_total(part, nth, 4, K, L, 0, c);
      const double inv = invstd[c];
      const double sdx = channel_total(part, nth, 4, K, L, 1, c) * inv;
      sum_dy[c] = static_cast<T>(t_dy);
      sum_dy_xhat[c] = static_cast<T>(sdx);
      dy_sq[c] = static_cast<T>(channel_total(part, nth, 4, K, L, 2, c));
      const DxCoef k = dx_coef(w ? w[c] : 1.0, inv, t_dy, sdx, m);
      std::fill_n(ka.data() + c * L, L, static_cast<T>(k.a));
      std::fill_n(kb.data() + c * L, L, static_cast<T>(k.b));
      std::fill_n(kc.data() + c * L, L, static_cast<T>(k.c));
    }
    if (dx) {
      const T* KA = ka.data();
      const T* KB = kb.data();
      const T* KC = kc.data();
      std::vector<T> q2(K, T(0));
      T* Q = q2.data();
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(r1, rb + kRowBlock);
        for (int64_t r = rb; r < re; ++r) {
          const T* g = dy + r * K;
          const T* p = x + r * K;
          T* q = dx + r * K;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {
            const T v = KA[k] * g[k] + KB[k] * (p[k] - mu[k]) + KC[k];
            q[k] = v;
            Q[k] += v * v;
          }
        }
        for (int64_t k = 0; k < K; ++k) {
          s_dx2[k] += q2[k];
          q2[k] = 0;
        }
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c)
        dx_sq[c] = static_cast<T>(channel_total(part, nth, 4, K, L, 3, c));
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

  // Whether the rows kernels take it: as R rows of C channels of L columns each (see folded).
  bool as_rows() const { return rows || folded(c, l); }
  int64_t row_count() const { return rows ? n * l : n; }
  int64_t columns_per_channel() const { return rows ? 1 : l; }
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

// out[n * k + j] = x[n, units[j], centre of the trailing dims], for every n of the batch.
template <typename T>
void gather_units(const Tensor& x, const int64_t* units, int64_t k, T* out) {
  int64_t centre = 0;
  for (int64_t d = 2; d < x.dim(); ++d) centre += (x.size(d) / 2) * x.stride(d);
  const T* base = x.const_data_ptr<T>();
  for (int64_t n = 0; n < x.size(0); ++n)
    for (int64_t j = 0; j < k; ++j) out[n * k + j] = base[n * x.stride(0) + units[j] * x.stride(1) + centre];
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
  if (s.as_rows())
    moments_rows<T>(xp, s.row_count(), s.c, s.columns_per_channel(), l, h, out, threads);
  else
    moments_planes<T>(xp, s.n, s.c, s.l, l, h, out, threads);
}

void check_float_input(const Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && x.size(0) * x.size(1) > 0, "bncore: ", what,
              " takes a non-empty CPU tensor of shape (N, C, ...)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "bncore: ", what,
              " takes float32 or float64");
}

}  // namespace
