// The recorder's CPU operators (namespace bncore, beside the batch-norm operators of
// bn_cpu.cpp): per-channel moments of any activation, a recorded step's row written in one
// call, and each weight's gradient norm taken the moment the backward produces it.
#include "bn_cpu.h"

namespace {

using at::Tensor;

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

// Registers a hook on `weight` that adds one to counter[0] each time the backward computes its
// gradient (once per backward pass that reaches it, however many forwards used it): the
// backward passes a BN layer took part in, counted with no Python in the backward (a Python
// hook costs tens of microseconds a layer and step). Returns the hook's handle for unwatch.
int64_t count_grads(const Tensor& weight, const Tensor& counter) {
  TORCH_CHECK(weight.requires_grad(), "bncore: count_grads needs a tensor that requires grad");
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 1 && counter.device().is_cpu(),
              "bncore: count_grads counts into a one-element int64 CPU tensor");
  Tensor c = counter;  // held by the hook
  return weight.register_hook([c](const at::TensorBase&) { c.mutable_data_ptr<int64_t>()[0] += 1; });
}

// Removes a hook watch_grad_norm or count_grads registered.
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

// For each weight i, its norm before a step and the angle it turned by (rows 0 and 1 of a (2, k)
// float32 result; the recorder's reference in torch operations beside it): one pass over both
// copies, double accumulation across runs, no step tensor made. With a = ||before||,
// b = ||after||, d = ||after - before||: 4ab sin^2(theta/2) = d^2 - (a - b)^2, stable for the
// small angles of one step.
Tensor weight_turn(at::TensorList before, at::TensorList after) {
  TORCH_CHECK(before.size() == after.size(), "bncore: weight_turn takes pairs of tensors");
  const int64_t k = static_cast<int64_t>(before.size());
  Tensor out = at::empty({2, k}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const int threads = at::get_num_threads();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(before[i].scalar_type() == at::kFloat && after[i].scalar_type() == at::kFloat &&
                    before[i].device().is_cpu() && after[i].device().is_cpu() &&
                    before[i].numel() == after[i].numel(),
                "bncore: weight_turn takes float32 CPU tensors of equal sizes");
    const Tensor was = before[i].contiguous(), now = after[i].contiguous();
    const float* p = was.const_data_ptr<float>();
    const float* q = now.const_data_ptr<float>();
    const int64_t m = was.numel();
    double sa = 0, sb = 0, sd = 0;
#pragma omp parallel for reduction(+ : sa, sb, sd) num_threads(pick_threads(m, threads)) if (m > kSerialWork)
    for (int64_t r0 = 0; r0 < m; r0 += kRun) {
      const int64_t r1 = std::min(m, r0 + kRun);
      float x = 0, y = 0, z = 0;
#pragma omp simd reduction(+ : x, y, z)
      for (int64_t j = r0; j < r1; ++j) {
        const float d = q[j] - p[j];
        x += p[j] * p[j];
        y += q[j] * q[j];
        z += d * d;
      }
      sa += x;
      sb += y;
      sd += z;
    }
    const double a = std::sqrt(sa), b = std::sqrt(sb);
    const double half =  // a weight of norm 0 turns by no angle: NaN, as the reference says
        a * b > 0 ? std::min(1.0, std::sqrt(std::max(0.0, sd - (a - b) * (a - b)) / (4 * a * b)))
                  : std::nan("");
    o[i] = static_cast<float>(a);
    o[k + i] = static_cast<float>(2 * std::asin(half));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bncore, m) {
  m.def("weight_turn(Tensor[] before, Tensor[] after) -> Tensor");
  m.def("channel_moments(Tensor x, float lo, float hi) -> Tensor");
  m.def("watch_grad_norm(Tensor weight, Tensor(a!) out, int column, Tensor flag) -> int");
  m.def("unwatch_grad_norm(Tensor weight, int handle) -> ()");
  m.def("count_grads(Tensor weight, Tensor(a!) counter) -> int");
  m.def(
      "record_row(Tensor(a!) out, Tensor[] tensors, int[] kinds, float[] lo, float[] hi, "
      "Tensor[] index, int[] offsets, int threads=0) -> ()");
}

TORCH_LIBRARY_IMPL(bncore, CPU, m) {
  m.impl("channel_moments", &channel_moments);
  m.impl("record_row", &record_row);
  m.impl("watch_grad_norm", &watch_grad_norm);
  m.impl("unwatch_grad_norm", &unwatch_grad_norm);
  m.impl("weight_turn", &weight_turn);
  m.impl("count_grads", &count_grads);
}
