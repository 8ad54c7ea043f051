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
#include "bn_cpu.h"

namespace {

using at::Tensor;
using std::optional;

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
    if (s.as_rows())
      forward_rows<scalar_t>(xp, yp, s.row_count(), s.c, s.columns_per_channel(),
                             ptr_or_null<scalar_t>(w), ptr_or_null<scalar_t>(b), eps, mp, vp, ip,
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
    if (s.as_rows())
      backward_rows<scalar_t>(dyp, xp, dxp, s.row_count(), s.c, s.columns_per_channel(), mp,
                              ip, ptr_or_null<scalar_t>(w), st, st + s.c, st + 2 * s.c,
                              st + 3 * s.c, threads);
    else
      backward_planes<scalar_t>(dyp, xp, dxp, s.n, s.c, s.l, mp, ip, ptr_or_null<scalar_t>(w),
                                st, st + s.c, st + 2 * s.c, st + 3 * s.c, threads);
  });
  return dx;
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
  m.def(
      "reference_backward(Tensor dy, Tensor x, Tensor? weight, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bncore, CPU, m) {
  m.impl("forward", &bn_forward);
  m.impl("backward", &bn_backward);
  m.impl("batch_norm_train", &batch_norm_train);
}

TORCH_LIBRARY_IMPL(bncore, Autograd, m) { m.impl("batch_norm_train", &batch_norm_train); }
