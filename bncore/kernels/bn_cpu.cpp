// Batch-norm training kernels for the CPU: the math of reference.py, fused.
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
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

template <typename T>
void forward_planes(const T* x, T* y, int64_t N, int64_t C, int64_t L, const T* w, const T* b,
                    double eps, T* mean, T* var, T* invstd, T* rm, T* rv, double momentum,
                    double correction, int threads) {
  const int64_t m = N * L;
  const int nt = std::min<int64_t>(pick_threads(m * C, threads), C);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < C; ++c) {
    const T shift = x[c * L];
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* p = x + (n * C + c) * L;
      for (int64_t l0 = 0; l0 < L; l0 += kRun) {
        const int64_t l1 = std::min(L, l0 + kRun);
        T a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t l = l0; l < l1; ++l) {
          const T d = p[l] - shift;
          a1 += d;
          a2 += d * d;
        }
        s1 += a1;
        s2 += a2;
      }
    }
    const double dm = s1 / m;
    const double v = std::max(s2 / m - dm * dm, 0.0);
    const double mu = shift + dm;
    const double inv = 1.0 / std::sqrt(v + eps);
    mean[c] = static_cast<T>(mu);
    var[c] = static_cast<T>(v);
    invstd[c] = static_cast<T>(inv);
    update_running(rm, rv, c, mu, v, momentum, correction);
    const T scale = static_cast<T>((w ? w[c] : 1.0) * inv);
    const T offset = static_cast<T>((b ? b[c] : 0.0) - mu * scale);
    for (int64_t n = 0; n < N; ++n) {
      const T* p = x + (n * C + c) * L;
      T* q = y + (n * C + c) * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) q[l] = p[l] * scale + offset;
    }
  }
}

template <typename T>
void forward_rows(const T* x, T* y, int64_t R, int64_t C, const T* w, const T* b, double eps,
                  T* mean, T* var, T* invstd, T* rm, T* rv, double momentum, double correction,
                  int threads) {
  const int nt = std::min<int64_t>(pick_threads(R * C, threads), R);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  std::vector<T> scale(C), offset(C);
  const T* shift = x;  // the first row
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t r0, r1;
    split(R, nth, t, &r0, &r1);
    double* s1 = &part[static_cast<size_t>(t) * 2 * C];
    double* s2 = s1 + C;
    std::vector<T> a1(C), a2(C);
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      std::fill(a1.begin(), a1.end(), T(0));
      std::fill(a2.begin(), a2.end(), T(0));
      const int64_t re = std::min(r1, rb + kRowBlock);
      for (int64_t r = rb; r < re; ++r) {
        const T* p = x + r * C;
        T* A1 = a1.data();
        T* A2 = a2.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T d = p[c] - shift[c];
          A1[c] += d;
          A2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += a1[c];
        s2[c] += a2[c];
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0, t2 = 0;
      for (int k = 0; k < nth; ++k) {
        t1 += part[static_cast<size_t>(k) * 2 * C + c];
        t2 += part[static_cast<size_t>(k) * 2 * C + C + c];
      }
      const double dm = t1 / R;
      const double v = std::max(t2 / R - dm * dm, 0.0);
      const double mu = shift[c] + dm;
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
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* p = x + r * C;
      T* q = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) q[c] = p[c] * S[c] + O[c];
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

// C entry points: one forward and one backward per dtype. `rows` selects the layout; the
// statistics are written to consecutive rows of length C starting at `stats`:
// forward: mean, var, invstd; backward: sum_dy_xhat, sum_dy, dy_sq, dx_sq.
#define BN_EXPORT(T, SUFFIX)                                                                     \
  extern "C" void bn_forward_##SUFFIX(const T* x, T* y, int64_t N, int64_t C, int64_t L,         \
                                      int rows, const T* w, const T* b, double eps, T* stats,    \
                                      T* rm, T* rv, double momentum, double correction,          \
                                      int threads) {                                             \
    if (rows)                                                                                    \
      forward_rows<T>(x, y, N * L, C, w, b, eps, stats, stats + C, stats + 2 * C, rm, rv,        \
                      momentum, correction, threads);                                            \
    else                                                                                         \
      forward_planes<T>(x, y, N, C, L, w, b, eps, stats, stats + C, stats + 2 * C, rm, rv,       \
                        momentum, correction, threads);                                          \
  }                                                                                              \
  extern "C" void bn_backward_##SUFFIX(const T* dy, const T* x, T* dx, int64_t N, int64_t C,     \
                                       int64_t L, int rows, const T* mean, const T* invstd,      \
                                       const T* w, T* stats, int threads) {                      \
    if (rows)                                                                                    \
      backward_rows<T>(dy, x, dx, N * L, C, mean, invstd, w, stats, stats + C, stats + 2 * C,    \
                       stats + 3 * C, threads);                                                  \
    else                                                                                         \
      backward_planes<T>(dy, x, dx, N, C, L, mean, invstd, w, stats, stats + C, stats + 2 * C,   \
                         stats + 3 * C, threads);                                                \
  }

BN_EXPORT(float, f32)
BN_EXPORT(double, f64)
