// The fused DC-ASGD + SGD update of one parameter, as an XLA FFI custom call
// for CPU: one multi-threaded pass over memory.
//
// dcasgd_optax/_src/_kernel_build.py compiles this file on first use and
// _cpu_kernel.py registers `DcasgdSgdUpdate` as the CPU target
// "dcasgd_optax_sgd_update";
// dcasgd_optax/_src/_fused.py calls it for every large float32 parameter of
// `dcasgd` (the composed chain pull_after_push(chain(delay_compensation,
// [add_decayed_weights], sgd)) in one pass). For each element i, with g the
// gradient, w the params, b the arriving worker's backup row, v the mean
// square (DC-ASGD-a), t the momentum trace, and the scalars below:
//
//   v  <- decay * v + one_minus_decay * g * g              (adaptive only)
//   lam = lambda * sqrt(1 / (v / bc + eps)) * ramp         (adaptive; bc
//         only with bias correction)  or  lambda * ramp    (DC-ASGD-c)
//   c   = lam * g * g * (w - b), clipped to [-clip |g|, clip |g|] if clipped
//   u   = g + c  (+ wd * w with weight decay)
//   t  <- u + momentum * t                                 (momentum only)
//   d   = step * t (heavy ball) | step * (u + momentum * t) (Nesterov)
//         | step * u (no momentum);   step = -learning_rate
//   updates <- d                            (written unless heavy ball, where
//                                            the caller computes step * t)
//   b  <- w + d                             (the pull: rounded to bfloat16,
//                                            nearest even, for bf16 backups)
//
// in the order of operations of the composed chain, so the results agree to
// rounding (the compiler may contract a * b + c into one FMA, as XLA does).
// For an out-of-range worker ("valid" = 0) u is NaN: v and b are left as they
// were, t and the updates become NaN, as in the chain.
//
// Aliasing contract: the call's operands are
//   0 g        f32[n]            read
//   1 w        f32[n]            read
//   2 backups  f32|bf16[rows, n] the row `row` is read, then written if valid
//   3 ms       f32[n] or f32[rows, n] (per worker) or f32[0] (none)
//   4 trace    f32[n] or f32[0] (no momentum)
//   5 scalars  f32[kNumScalars]  (see enum Scalar)
//   6 row      s32[]             in [0, rows) (the caller clamps it)
// and its results (backups, ms, trace, updates), the first three aliased to
// operands 2, 3 and 4 (input_output_aliases), so that XLA hands the kernel
// the same buffers and the update is in place; updates is f32[n], or f32[0]
// for heavy-ball momentum. Under jax.vmap every operand gets leading batch
// axes (vmap_method="broadcast_all"): the call then updates each batch
// element in turn, scalars and row included (f32[..., kNumScalars], s32[...]).
// The call checks every operand's element type and size, and that each
// aliased result has its operand's, before touching memory (an error, not
// an overflow, for a direct ffi_call that gets them wrong).
// Each element is read and written by one thread only; the range is split
// into chunks shared out over XLA's intra-op thread pool and the calling
// thread.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The `flags` attribute (kept in step with _cpu_kernel.Flags).
enum Flag : int64_t {
  kAdaptive = 1,        // DC-ASGD-a: ms is kept and lambda adapts to it.
  kPerWorkerMs = 2,     // ms has one row per worker.
  kBiasCorrection = 4,  // ms is divided by bc before use.
  kClip = 8,            // the term is clipped to clip * |g|.
  kWeightDecay = 16,    // wd * w is added.
  kMomentum = 32,       // heavy-ball momentum.
  kNesterov = 64,       // Nesterov momentum (with kMomentum).
  kBf16Backups = 128,   // backups are bfloat16.
};

enum Scalar {
  kValid, kDecay, kOneMinusDecay, kLambda, kEps, kBiasDenominator, kRamp,
  kClipBound, kWd, kMomentumCoef, kStepSize, kNumScalars
};

struct Pointers {
  const float* g;
  const float* w;
  void* held;  // the worker's backup row
  float* ms;   // the mean square this worker folds into (or null)
  float* trace;
  float* updates;
  float s[kNumScalars];
};

inline float Bf16ToF32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN kept NaN (quiet): XLA's convert to bfloat16.
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

// Elements [lo, hi) for a valid worker, the flags known at compile time so
// that the loop has no branches and vectorizes.
template <int64_t F>
void ValidRange(const Pointers& p, int64_t lo, int64_t hi) {
  using Held = std::conditional_t<(F & kBf16Backups) != 0, uint16_t, float>;
  const float* __restrict g_ = p.g + lo;
  const float* __restrict w_ = p.w + lo;
  Held* __restrict b_ = static_cast<Held*>(p.held) + lo;
  float* __restrict v_ = (F & kAdaptive) ? p.ms + lo : nullptr;
  float* __restrict t_ = (F & kMomentum) ? p.trace + lo : nullptr;
  float* __restrict d_ = p.updates ? p.updates + lo : nullptr;
  const float* s = p.s;
  const float decay = s[kDecay], one_minus_decay = s[kOneMinusDecay];
  const float lambda = s[kLambda], eps = s[kEps], bc = s[kBiasDenominator];
  const float ramp = s[kRamp], clip = s[kClipBound], wd = s[kWd];
  const float momentum = s[kMomentumCoef], step = s[kStepSize];
  const int64_t n = hi - lo;
  for (int64_t i = 0; i < n; ++i) {
    const float g = g_[i], w = w_[i];
    float held;
    if constexpr ((F & kBf16Backups) != 0) held = Bf16ToF32(b_[i]);
    else held = b_[i];
    float lam = lambda;
    if constexpr ((F & kAdaptive) != 0) {
      const float v = decay * v_[i] + one_minus_decay * (g * g);
      v_[i] = v;
      float x = v;
      if constexpr ((F & kBiasCorrection) != 0) x = x / bc;
      lam = lambda * std::sqrt(1.0f / (x + eps));
    }
    lam = lam * ramp;
    float term = lam * g * g * (w - held);
    if constexpr ((F & kClip) != 0) {
      const float bound = clip * std::fabs(g);
      term = std::min(std::max(term, -bound), bound);
    }
    float u = g + term;
    if constexpr ((F & kWeightDecay) != 0) u = u + wd * w;
    float d;
    if constexpr ((F & kMomentum) != 0) {
      const float t = u + momentum * t_[i];
      t_[i] = t;
      if constexpr ((F & kNesterov) != 0) d = step * (u + momentum * t);
      else d = step * t;
    } else {
      d = step * u;
    }
    if constexpr ((F & kMomentum) == 0 || (F & kNesterov) != 0) d_[i] = d;
    const float pulled = w + d;
    if constexpr ((F & kBf16Backups) != 0) b_[i] = F32ToBf16(pulled);
    else b_[i] = pulled;
  }
}

// An out-of-range worker: the update is NaN, so are the momentum and the
// updates; the mean square and the backups are kept.
void InvalidRange(const Pointers& p, int64_t flags, int64_t lo, int64_t hi) {
  const float nan = std::nanf("");
  if (flags & kMomentum) std::fill(p.trace + lo, p.trace + hi, nan);
  if (p.updates) std::fill(p.updates + lo, p.updates + hi, nan);
}

using RangeFn = void (*)(const Pointers&, int64_t, int64_t);

// The instantiation for `flags` (kPerWorkerMs only moves the ms pointer).
template <int64_t F, int Bit>
RangeFn Select(int64_t flags) {
  if constexpr (Bit > kBf16Backups) {
    return &ValidRange<F>;
  } else if constexpr (Bit == kPerWorkerMs ||
                       (Bit == kBiasCorrection && !(F & kAdaptive)) ||
                       (Bit == kNesterov && !(F & kMomentum))) {
    return Select<F, Bit * 2>(flags);
  } else {
    return (flags & Bit) ? Select<F | Bit, Bit * 2>(flags)
                         : Select<F, Bit * 2>(flags);
  }
}

// One call's work, shared by the threads that take part (kept alive by the
// tasks that hold it, which may start after the call returned).
struct Work {
  Pointers p;
  int64_t flags = 0;
  bool valid = true;
  RangeFn fn = nullptr;
  int64_t size = 0, chunk = 0, num_chunks = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Run() {
    int64_t k, finished = 0;
    while ((k = next.fetch_add(1)) < num_chunks) {
      const int64_t lo = k * chunk, hi = std::min(size, lo + chunk);
      if (valid) fn(p, lo, hi);
      else InvalidRange(p, flags, lo, hi);
      ++finished;
    }
    if (finished && done.fetch_add(finished) + finished == num_chunks) {
      std::lock_guard<std::mutex> lock(mu);
      all_done.notify_all();
    }
  }
};

// Elements per chunk: enough to amortise a task, few enough to balance.
constexpr int64_t kChunk = int64_t{1} << 16;

// Copies `in` into `out` unless XLA aliased them (it does when told to).
void AliasOrCopy(ffi::AnyBuffer in, ffi::Result<ffi::AnyBuffer>& out) {
  if (in.untyped_data() != out->untyped_data() && in.size_bytes() > 0)
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
}

// The sizes of one call, per batch element (see the header).
struct Sizes {
  int64_t batch = 0, n = 0, rows = 0;
};

// An aliased result must be its operand's type and size (XLA hands the
// same buffer; a direct call without aliases gets a copy of the operand).
bool SameAs(ffi::AnyBuffer in, ffi::Result<ffi::AnyBuffer>& out) {
  return out->element_type() == in.element_type() &&
         out->element_count() == in.element_count();
}

ffi::Error Check(int64_t flags, ffi::Buffer<ffi::F32> g,
                 ffi::Buffer<ffi::F32> w, ffi::AnyBuffer backups,
                 ffi::AnyBuffer ms, ffi::AnyBuffer trace,
                 ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::S32> row,
                 ffi::Result<ffi::AnyBuffer>& backups_out,
                 ffi::Result<ffi::AnyBuffer>& ms_out,
                 ffi::Result<ffi::AnyBuffer>& trace_out,
                 ffi::Result<ffi::AnyBuffer>& updates, Sizes& z) {
  // g, w, scalars and row are typed: the FFI binding checks their types.
  z.batch = int64_t(row.element_count());
  if (z.batch == 0 || int64_t(scalars.element_count()) != z.batch * kNumScalars)
    return ffi::Error::InvalidArgument("scalars or row: sizes");
  z.n = int64_t(w.element_count()) / z.batch;
  const auto held = (flags & kBf16Backups) ? ffi::DataType::BF16
                                           : ffi::DataType::F32;
  if (z.n == 0 || int64_t(w.element_count()) != z.batch * z.n ||
      int64_t(g.element_count()) != z.batch * z.n ||
      backups.element_type() != held ||
      backups.element_count() % (z.batch * z.n) != 0)
    return ffi::Error::InvalidArgument("g, w, backups: sizes or dtype");
  z.rows = int64_t(backups.element_count()) / (z.batch * z.n);
  if (ms.element_type() != ffi::DataType::F32 ||
      trace.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("ms or trace: dtype (want f32)");
  const int64_t ms_size = !(flags & kAdaptive) ? 0
                          : (flags & kPerWorkerMs) ? z.rows * z.n : z.n;
  if (int64_t(ms.element_count()) != z.batch * ms_size ||
      int64_t(trace.element_count()) != ((flags & kMomentum) ? z.batch * z.n
                                                             : 0))
    return ffi::Error::InvalidArgument("ms or trace: sizes");
  if (!SameAs(backups, backups_out) || !SameAs(ms, ms_out) ||
      !SameAs(trace, trace_out))
    return ffi::Error::InvalidArgument(
        "backups, ms or trace results: dtype or size differs from the operand");
  const bool fresh = !(flags & kMomentum) || (flags & kNesterov);
  if (updates->element_type() != ffi::DataType::F32 ||
      int64_t(updates->element_count()) != (fresh ? z.batch * z.n : 0))
    return ffi::Error::InvalidArgument("updates: dtype or size");
  for (int64_t b = 0; b < z.batch; ++b) {
    if (row.typed_data()[b] < 0 || row.typed_data()[b] >= z.rows)
      return ffi::Error::InvalidArgument("row out of range");
  }
  return ffi::Error::Success();
}

// Runs `work` on the calling thread and as many pool threads as it has
// chunks for, and returns when every chunk is done.
void RunShared(ffi::ThreadPool& pool, const std::shared_ptr<Work>& work) {
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), work->num_chunks - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([work] { work->Run(); });
  work->Run();  // The caller works too, so no task waits for a free thread.
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done == work->num_chunks; });
}

// Batch element `b`'s pointers (operands with a leading batch axis, from
// vmap, are laid out one element after the other).
Pointers BatchElement(const Sizes& z, int64_t b, int64_t flags,
                      ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::S32> row,
                      void* backups, float* ms, float* trace, float* updates) {
  Pointers p;
  const int64_t n = z.n, r = row.typed_data()[b];
  std::memcpy(p.s, scalars.typed_data() + b * kNumScalars, sizeof p.s);
  p.g = g.typed_data() + b * n;
  p.w = w.typed_data() + b * n;
  const int64_t width = (flags & kBf16Backups) ? 2 : 4;
  p.held = static_cast<char*>(backups) + (b * z.rows + r) * n * width;
  p.ms = nullptr;
  if (flags & kAdaptive) {
    p.ms = (flags & kPerWorkerMs) ? ms + (b * z.rows + r) * n : ms + b * n;
  }
  p.trace = (flags & kMomentum) ? trace + b * n : nullptr;
  p.updates = updates ? updates + b * n : nullptr;
  return p;
}

ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                  ffi::Buffer<ffi::F32> w, ffi::AnyBuffer backups,
                  ffi::AnyBuffer ms, ffi::AnyBuffer trace,
                  ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::S32> row,
                  ffi::Result<ffi::AnyBuffer> backups_out,
                  ffi::Result<ffi::AnyBuffer> ms_out,
                  ffi::Result<ffi::AnyBuffer> trace_out,
                  ffi::Result<ffi::AnyBuffer> updates_out, int64_t flags) {
  Sizes z;
  ffi::Error error =
      Check(flags, g, w, backups, ms, trace, scalars, row, backups_out,
            ms_out, trace_out, updates_out, z);
  if (error.failure()) return error;
  AliasOrCopy(backups, backups_out);
  AliasOrCopy(ms, ms_out);
  AliasOrCopy(trace, trace_out);
  float* updates = updates_out->element_count()
                       ? static_cast<float*>(updates_out->untyped_data())
                       : nullptr;
  const RangeFn fn = Select<0, 1>(flags);
  for (int64_t b = 0; b < z.batch; ++b) {
    auto work = std::make_shared<Work>();
    work->p = BatchElement(
        z, b, flags, g, w, scalars, row, backups_out->untyped_data(),
        static_cast<float*>(ms_out->untyped_data()),
        static_cast<float*>(trace_out->untyped_data()), updates);
    work->flags = flags;
    work->valid = work->p.s[kValid] != 0.0f;
    work->fn = fn;
    work->size = z.n;
    work->chunk = kChunk;
    work->num_chunks = (z.n + kChunk - 1) / kChunk;
    RunShared(pool, work);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DcasgdSgdUpdate, Update,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // g
        .Arg<ffi::Buffer<ffi::F32>>()  // w
        .Arg<ffi::AnyBuffer>()         // backups
        .Arg<ffi::AnyBuffer>()         // ms
        .Arg<ffi::AnyBuffer>()         // trace
        .Arg<ffi::Buffer<ffi::F32>>()  // scalars
        .Arg<ffi::Buffer<ffi::S32>>()  // row
        .Ret<ffi::AnyBuffer>()         // backups (aliased)
        .Ret<ffi::AnyBuffer>()         // ms (aliased)
        .Ret<ffi::AnyBuffer>()         // trace (aliased)
        .Ret<ffi::AnyBuffer>()         // updates
        .Attr<int64_t>("flags"));
