// CPU kernel of torch.ops.torchaq.linear_ce: the fused linear cross-entropy (loss, log-sum-exp and,
// with row_grad, the gradients of e, c and bias). Semantics and the pure-torch reference:
// torchaq/ops/linear_ce.py.
//
// Rows are processed in chunks of R rows (R * V logits: the only large buffer, 128 MB by default).
// For each chunk, in parallel over blocks of B classes (at::parallel_for threads taking blocks from
// a shared counter; one thread owns a class block, so the rows of grad_c it writes are its own):
//   pass A: logits tile = e_chunk @ c_block^T (one small single-threaded GEMM), + bias, softcap,
//           then per row the block's max, sum of exp(l - max), sum of l and the target logit;
//   combine the blocks' partials into lse (a log-sum-exp of log-sum-exps) and the loss;
//   pass B (gradients only): the tile kept from pass A becomes dz in place, then
//           grad_c[block] += dz^T @ e_chunk, grad_bias[block] += sum_b dz, and
//           grad_e[chunk] += dz @ c_block into a per-thread accumulator (summed at the end).
// The logits are computed once (N V d multiply-adds) and reused for the gradients (2 N V d): three
// products instead of the four of a backward that recomputes them. Without row_grad no buffer is
// kept (a tile per block). Accumulation is float32 (float64 for float64 inputs); bf16 / fp16 tiles
// of c are converted per block. No gradient filtering: every class contributes. The element-wise
// work of a float32 tile (max, exp-sums, the gradient) is one fused pass of the ISA kernels of
// linear_ce_kernels.h (scalar / AVX2 / AVX-512, chosen like the scans: active_isa()); float64
// tiles use ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "linear_ce.h"
#include "linear_ce_kernels.h"
#include "scan.h"

namespace torchaq {
namespace cpu {
void lce_stats_scalar(const float* tile, int64_t n, int64_t w, float* mx, float* se, float* ls) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = tile + i * w;
    float m = -INFINITY, s = 0.0f, t = 0.0f;
    for (int64_t j = 0; j < w; ++j) m = std::fmax(m, row[j]);
    for (int64_t j = 0; j < w; ++j) {
      s += std::exp(row[j] - m);
      t += row[j];
    }
    mx[i] = m;
    se[i] = s;
    if (ls != nullptr) ls[i] = t;
  }
}

void lce_grad_scalar(float* tile, int64_t n, int64_t w, const float* lse, const float* a, const float* s, float cap) {
  const float inv = cap > 0 ? 1.0f / cap : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float* row = tile + i * w;
    const float si = s ? s[i] : 0.0f;
    for (int64_t j = 0; j < w; ++j) {
      float g = a[i] * std::exp(row[j] - lse[i]) - si;
      if (cap > 0) g *= 1.0f - (row[j] * inv) * (row[j] * inv);
      row[j] = g;
    }
  }
}

namespace {

struct TileKernels {
  void (*stats)(const float*, int64_t, int64_t, float*, float*, float*);
  void (*grad)(float*, int64_t, int64_t, const float*, const float*, const float*, float);
};

TileKernels tile_kernels() {
  const char* isa = active_isa();
#if defined(TORCHAQ_X86_KERNELS)
  if (std::strcmp(isa, "avx512") == 0) return {lce_stats_avx512, lce_grad_avx512};
  if (std::strcmp(isa, "avx2") == 0) return {lce_stats_avx2, lce_grad_avx2};
#endif
  (void)isa;
  return {lce_stats_scalar, lce_grad_scalar};
}

// f(b) for every class block b < n_blk, blocks handed out one at a time from a shared counter: a
// thread that the OS deschedules (a shared machine) delays only the block it holds, not a static
// half of the work.
template <class F>
void for_each_block(int64_t n_blk, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blk)), 1,
                   [&](int64_t, int64_t) {
                     for (int64_t b = next++; b < n_blk; b = next++) f(b);
                   });
}

constexpr int64_t kRowChunkElements = int64_t(1) << 25;  // keep in sync with ops/linear_ce.py
constexpr int64_t kGradGroups = 16;  // groups of class blocks of the gradient pass (load balance, determinism)

void check_args(const at::Tensor& e, const at::Tensor& c, const std::optional<at::Tensor>& bias,
                const at::Tensor& targets, const std::optional<at::Tensor>& row_grad, double softcap,
                double label_smoothing, int64_t class_block, int64_t row_chunk) {
  TORCH_CHECK(e.dim() == 2 && e.is_floating_point(), "e must be a floating-point (N, d) tensor");
  TORCH_CHECK(c.dim() == 2 && c.is_floating_point(), "c must be a floating-point (V, d) tensor");
  TORCH_CHECK(c.size(1) == e.size(1), "c has d = ", c.size(1), " but e has d = ", e.size(1));
  TORCH_CHECK(c.scalar_type() == e.scalar_type(), "c must have e's dtype ", e.scalar_type(), ", got ",
              c.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c.size(0) && bias->is_floating_point(),
                "bias must be a floating-point (", c.size(0), ",) tensor");
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == e.size(0) &&
                  (targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt),
              "targets must be an int64 (", e.size(0), ",) tensor");
  if (row_grad) TORCH_CHECK(row_grad->dim() == 1 && row_grad->size(0) == e.size(0), "row_grad must be (N,)");
  TORCH_CHECK(softcap >= 0, "softcap must be > 0 (or 0 for none), got ", softcap);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "label_smoothing must be in [0, 1]");
  TORCH_CHECK(class_block >= 1 && row_chunk >= 0, "class_block must be >= 1 and row_chunk >= 0");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_cpu(
    const at::Tensor& e_in, const at::Tensor& c_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& targets_in, const std::optional<at::Tensor>& row_grad_in, int64_t ignore_index,
    double softcap, double label_smoothing, double z_loss, int64_t class_block, int64_t row_chunk) {
  check_args(e_in, c_in, bias_in, targets_in, row_grad_in, softcap, label_smoothing, class_block, row_chunk);
  // The ATen calls of this kernel (mm_out into the buffer, in-place updates) must not see the
  // inputs' requires_grad, also on the worker threads of at::parallel_for, which do not inherit a
  // dispatch guard: the kernel works on detached aliases (the op's autograd is the caller's).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = e_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto fopt = e_in.options().dtype(acc);
  const int64_t n_rows = e_in.size(0), dim = e_in.size(1), n_cls = c_in.size(0);
  const bool with_grad = row_grad_in.has_value();
  const bool has_bias = bias_in.has_value();

  const at::Tensor e = e_in.detach().to(acc).contiguous();
  const at::Tensor c = c_in.detach().contiguous();
  const bool convert_c = c.scalar_type() != acc;
  const at::Tensor bias = has_bias ? bias_in->detach().to(acc).contiguous() : at::Tensor();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK(tgt[i] == ignore_index || (tgt[i] >= 0 && tgt[i] < n_cls), "targets must be in [0, ", n_cls,
                ") or ignore_index=", ignore_index, ", got ", tgt[i]);
  }
  const at::Tensor valid = (targets != ignore_index);

  at::Tensor loss = at::zeros({n_rows}, fopt), lse = at::zeros({n_rows}, fopt);
  at::Tensor grad_e, grad_c, grad_b;
  if (with_grad) {
    grad_e = at::zeros({n_rows, dim}, fopt);
    grad_c = at::zeros({n_cls, dim}, fopt);
    if (has_bias) grad_b = at::zeros({n_cls}, fopt);
  }
  const int64_t blk = std::min(class_block, std::max<int64_t>(n_cls, 1));
  const int64_t n_blk = (n_cls + blk - 1) / blk;
  // auto: a 128 MB buffer, but at least d / 2 rows: every chunk reads c and rewrites grad_c ((V, d)
  // each) once, which at large d (2048 and up) costs more than a buffer of half grad_c's size
  int64_t chunk = row_chunk > 0 ? row_chunk
                                : std::max<int64_t>({64, kRowChunkElements / std::max<int64_t>(n_cls, 1), dim / 2});
  chunk = std::max<int64_t>(1, std::min(chunk, n_rows));
  const double eps_over_v = label_smoothing / double(n_cls);
  const bool fast = acc == at::kFloat;
  const TileKernels kern = tile_kernels();

  auto class_rows = [&](int64_t b) {  // (rows of c, as acc) of block b
    at::Tensor w = c.narrow(0, b * blk, std::min(blk, n_cls - b * blk));
    return convert_c ? w.to(acc) : w;
  };

  for (int64_t r0 = 0; r0 < n_rows && n_cls > 0; r0 += chunk) {
    const int64_t n = std::min(chunk, n_rows - r0);
    const at::Tensor ec = e.narrow(0, r0, n);
    // block-major buffer: the tile of block b is the contiguous (n, width_b) slab at offset n * b * blk
    at::Tensor buffer = with_grad ? at::empty({n * n_cls}, fopt) : at::Tensor();
    at::Tensor pmax = at::empty({n_blk, n}, fopt), psum = at::empty({n_blk, n}, fopt);
    at::Tensor plsum = label_smoothing > 0 ? at::empty({n_blk, n}, fopt) : at::Tensor();
    at::Tensor tlogit = at::zeros({n}, fopt);
    const int64_t* tc = tgt + r0;

    for_each_block(n_blk, [&](int64_t b) {
      {
        const int64_t c0 = b * blk, w = std::min(blk, n_cls - c0);
        at::Tensor tile = with_grad ? buffer.narrow(0, n * c0, n * w).view({n, w}) : at::empty({n, w}, fopt);
        at::mm_out(tile, ec, class_rows(b).t());
        if (has_bias) tile.add_(bias.narrow(0, c0, w));
        if (softcap > 0) tile.div_(softcap).tanh_().mul_(softcap);
        if (fast) {
          kern.stats(tile.data_ptr<float>(), n, w, pmax[b].data_ptr<float>(), psum[b].data_ptr<float>(),
                     label_smoothing > 0 ? plsum[b].data_ptr<float>() : nullptr);
        } else {
          at::Tensor m = at::amax(tile, {1});
          pmax[b].copy_(m);
          psum[b].copy_(at::sum(at::exp(tile - m.unsqueeze(1)), {1}));
          if (label_smoothing > 0) plsum[b].copy_(at::sum(tile, {1}));
        }
        AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "linear_ce_target", [&] {
          const scalar_t* tp = tile.data_ptr<scalar_t>();
          scalar_t* out = tlogit.data_ptr<scalar_t>();
          for (int64_t i = 0; i < n; ++i) {
            if (tc[i] >= c0 && tc[i] < c0 + w) out[i] = tp[i * w + (tc[i] - c0)];
          }
        });
      }
    });
    const at::Tensor gmax = at::amax(pmax, {0});
    const at::Tensor lse_c = gmax + at::log(at::sum(psum * at::exp(pmax - gmax.unsqueeze(0)), {0}));
    const at::Tensor valid_c = valid.narrow(0, r0, n);
    at::Tensor loss_c = lse_c - (1.0 - label_smoothing) * tlogit + z_loss * lse_c * lse_c;
    if (label_smoothing > 0) loss_c = loss_c - eps_over_v * at::sum(plsum, {0});
    lse.narrow(0, r0, n).copy_(lse_c);
    loss.narrow(0, r0, n).copy_(at::where(valid_c, loss_c, at::zeros_like(loss_c)));
    if (!with_grad) continue;

    const at::Tensor g = at::where(valid_c, row_grad_in->detach().narrow(0, r0, n).to(acc), at::zeros_like(lse_c));
    const at::Tensor a = (g * (1.0 + 2.0 * z_loss * lse_c)).contiguous();
    const at::Tensor smooth = (g * eps_over_v).contiguous();
    // the target's -(1 - eps) g term, times the softcap's derivative at the (capped) target logit
    at::Tensor tcoef = g * (1.0 - label_smoothing);
    if (softcap > 0) tcoef = tcoef * (1.0 - (tlogit / softcap).square());
    tcoef = tcoef.contiguous();
    const at::Tensor lse_col = lse_c.unsqueeze(1), a_col = a.unsqueeze(1), smooth_col = smooth.unsqueeze(1);
    // grad_e: one accumulator per fixed group of consecutive blocks, summed in group order, so the
    // result does not depend on which thread took which group (deterministic, like grad_c)
    const int64_t n_grp = std::min<int64_t>(n_blk, kGradGroups);
    std::vector<at::Tensor> dh(n_grp);
    for_each_block(n_grp, [&](int64_t grp) {
      at::Tensor& acc_e = dh[grp];
      acc_e = at::zeros({n, dim}, fopt);
      for (int64_t b = grp * n_blk / n_grp; b < (grp + 1) * n_blk / n_grp; ++b) {
        const int64_t c0 = b * blk, w = std::min(blk, n_cls - c0);
        at::Tensor tile = buffer.narrow(0, n * c0, n * w).view({n, w});
        if (fast) {
          kern.grad(tile.data_ptr<float>(), n, w, lse_c.data_ptr<float>(), a.data_ptr<float>(),
                    label_smoothing > 0 ? smooth.data_ptr<float>() : nullptr, static_cast<float>(softcap));
        } else {
          at::Tensor cap_grad;
          if (softcap > 0) cap_grad = 1.0 - (tile / softcap).square_();
          tile.sub_(lse_col).exp_().mul_(a_col);
          if (label_smoothing > 0) tile.sub_(smooth_col);
          if (softcap > 0) tile.mul_(cap_grad);
        }
        AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "linear_ce_target_grad", [&] {
          scalar_t* tp = tile.data_ptr<scalar_t>();
          const scalar_t* tcp = tcoef.data_ptr<scalar_t>();
          for (int64_t i = 0; i < n; ++i) {
            if (tc[i] >= c0 && tc[i] < c0 + w) tp[i * w + (tc[i] - c0)] -= tcp[i];
          }
        });
        const at::Tensor wb = class_rows(b);
        at::Tensor gc = grad_c.narrow(0, c0, w);
        gc.addmm_(tile.t(), ec);
        if (has_bias) grad_b.narrow(0, c0, w).add_(at::sum(tile, {0}));
        acc_e.addmm_(tile, wb);
      }
    });
    at::Tensor ge = grad_e.narrow(0, r0, n);
    for (const auto& t : dh) {
      if (t.defined()) ge.add_(t);
    }
  }
  if (!with_grad) {
    return {loss, lse, e_in.new_empty({0}), c_in.new_empty({0}), e_in.new_empty({0})};  // distinct: no aliasing
  }
  return {loss, lse, grad_e.to(e_in.scalar_type()), grad_c.to(c_in.scalar_type()),
          has_bias ? grad_b.to(bias_in->scalar_type()) : e_in.new_empty({0})};
}

LceStatsFn lce_stats_kernel() { return tile_kernels().stats; }
LceGradFn lce_grad_kernel() { return tile_kernels().grad; }

}  // namespace cpu
}  // namespace torchaq
