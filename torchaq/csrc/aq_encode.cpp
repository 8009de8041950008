// CPU kernel of torch.ops.torchaq.aq_encode: score-aware LSQ++ encoding for additive codebooks.
//
// The algorithm, its state and its cost are documented in torchaq/ops/aq_encode.py (the pure-torch
// reference, which this kernel follows step for step so that both pick the same codes): per row,
// iterated conditional modes over the M codebooks with move cost
//   n[m,j] - 2 (p[m,j] - s[m,j] + G[(m,c_m),(m,j)]) + (eta-1)/|x|^2 (rx + p[m,c_m] - p[m,j])^2,
// inside iterated local search (the perturbations are an input, drawn by the caller).
// The inner products p = x C^T and the Gram matrix G = C C^T are matrix products (ATen/BLAS) per
// chunk of rows, outside the parallel region; the search itself runs at::parallel_for over rows.
#include "aq_encode.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace torchaq {
namespace cpu {
namespace {

constexpr int64_t kChunkRows = 4096;

struct Problem {
  int64_t M, K, MK;
  const float* gram;   // (MK, MK)
  const float* norms;  // (MK)
};

// The ICM state of one row (see aq_encode.py, class _Rows).
struct RowState {
  std::vector<int64_t> codes;  // (M)
  std::vector<float> s;        // (MK)
  float rx = 0.f;
};

inline void add_row(float* s, const float* plus, const float* minus, int64_t n) {
  for (int64_t t = 0; t < n; ++t) s[t] += plus[t] - minus[t];
}

struct Row {
  const Problem& pb;
  const float* dots;  // (MK) p = <x, C_mj>
  float x_sq, coef;

  void start(RowState& st, const int64_t* init) const {
    st.codes.assign(init, init + pb.M);
    st.s.assign(pb.MK, 0.f);
    float sum_p = 0.f;
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t slot = m * pb.K + st.codes[m];
      const float* g = pb.gram + slot * pb.MK;
      for (int64_t t = 0; t < pb.MK; ++t) st.s[t] += g[t];
    }
    // same summation order as the reference: gather then sum over m
    for (int64_t m = 0; m < pb.M; ++m) sum_p += dots[m * pb.K + st.codes[m]];
    st.rx = x_sq - sum_p;
  }

  void greedy(RowState& st) const {
    st.codes.assign(pb.M, 0);
    st.s.assign(pb.MK, 0.f);
    st.rx = x_sq;
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t lo = m * pb.K;
      int64_t best = 0;
      float best_cost = 0.f;
      for (int64_t j = 0; j < pb.K; ++j) {
        const float p = dots[lo + j];
        const float rxj = st.rx - p;
        const float cost = pb.norms[lo + j] - 2.f * (p - st.s[lo + j]) + coef * rxj * rxj;
        if (j == 0 || cost < best_cost) best_cost = cost, best = j;
      }
      st.codes[m] = best;
      const float* g = pb.gram + (lo + best) * pb.MK;
      for (int64_t t = 0; t < pb.MK; ++t) st.s[t] += g[t];
      st.rx = st.rx - dots[lo + best];
    }
  }

  void set_code(RowState& st, int64_t m, int64_t j) const {
    const int64_t old_slot = m * pb.K + st.codes[m], new_slot = m * pb.K + j;
    add_row(st.s.data(), pb.gram + new_slot * pb.MK, pb.gram + old_slot * pb.MK, pb.MK);
    st.rx += dots[old_slot] - dots[new_slot];
    st.codes[m] = j;
  }

  void sweep(RowState& st) const {
    const int64_t K = pb.K;
    for (int64_t m = 0; m < pb.M; ++m) {
      const int64_t lo = m * K;
      const int64_t cur = st.codes[m];
      const float* gcur = pb.gram + (lo + cur) * pb.MK + lo;
      const float rx_excl = st.rx + dots[lo + cur];
      int64_t best = 0;
      float best_cost = 0.f, cur_cost = 0.f;
      for (int64_t j = 0; j < K; ++j) {
        const float p = dots[lo + j];
        const float s_excl = st.s[lo + j] - gcur[j];
        const float rxj = rx_excl - p;
        const float cost = pb.norms[lo + j] - 2.f * (p - s_excl) + coef * rxj * rxj;
        if (j == 0 || cost < best_cost) best_cost = cost, best = j;
        if (j == cur) cur_cost = cost;
      }
      if (!(best_cost < cur_cost)) continue;
      add_row(st.s.data(), pb.gram + (lo + best) * pb.MK, pb.gram + (lo + cur) * pb.MK, pb.MK);
      st.rx = rx_excl - dots[lo + best];
      st.codes[m] = best;
    }
  }

  float loss(const RowState& st) const {
    float sum_p = 0.f, sum_s = 0.f;
    for (int64_t m = 0; m < pb.M; ++m) sum_p += dots[m * pb.K + st.codes[m]];
    for (int64_t m = 0; m < pb.M; ++m) sum_s += st.s[m * pb.K + st.codes[m]];
    const float r_sq = x_sq - 2.f * sum_p + sum_s;
    return r_sq + coef * st.rx * st.rx;
  }
};

}  // namespace

at::Tensor aq_encode_cpu(const at::Tensor& x_in, const at::Tensor& codebooks_in, const at::Tensor& codes_in,
                         const at::Tensor& eta_in, const at::Tensor& perturb_in, int64_t icm_iters, bool greedy) {
  TORCH_CHECK_VALUE(codebooks_in.dim() == 3, "codebooks must be (M, K, d), got shape ", codebooks_in.sizes());
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be (N, d), got shape ", x_in.sizes());
  const int64_t M = codebooks_in.size(0), K = codebooks_in.size(1), d = codebooks_in.size(2), N = x_in.size(0);
  TORCH_CHECK_VALUE(M >= 1 && K >= 1, "codebooks must have M >= 1 and K >= 1");
  TORCH_CHECK_VALUE(x_in.size(1) == d, "x has d = ", x_in.size(1), " but codebooks have d = ", d);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && codebooks_in.scalar_type() == at::kFloat,
                   "x and codebooks must be float32, got ", x_in.scalar_type(), ", ", codebooks_in.scalar_type());
  TORCH_CHECK_VALUE(codes_in.dim() == 2 && codes_in.size(0) == N && codes_in.size(1) == M,
                    "codes must be (N, M) = (", N, ", ", M, "), got shape ", codes_in.sizes());
  TORCH_CHECK_TYPE(codes_in.scalar_type() == at::kLong, "codes must be int64, got ", codes_in.scalar_type());
  TORCH_CHECK_VALUE(eta_in.dim() == 1 && eta_in.size(0) == N && eta_in.scalar_type() == at::kFloat,
                    "eta must be float32 of shape (", N, ",), got ", eta_in.scalar_type(), " ", eta_in.sizes());
  TORCH_CHECK_VALUE(perturb_in.dim() == 3 && perturb_in.size(1) == N && perturb_in.scalar_type() == at::kLong,
                    "perturb must be int64 (R, N=", N, ", P), got ", perturb_in.scalar_type(), " ", perturb_in.sizes());
  TORCH_CHECK_VALUE(icm_iters >= 0, "icm_iters must be >= 0, got ", icm_iters);

  const int64_t MK = M * K;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor flat = codebooks_in.reshape({MK, d}).contiguous();
  const at::Tensor gram = at::mm(flat, flat.t()).contiguous();
  const at::Tensor norms = gram.diagonal().contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor eta = eta_in.contiguous();
  const at::Tensor perturb = perturb_in.contiguous();
  if (!greedy && N > 0) {
    const int64_t lo = codes.min().item<int64_t>(), hi = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < K, "codes must be in [0, ", K, "), got values in [", lo, ", ", hi, "]");
  }
  if (perturb.numel() > 0) {
    const int64_t lo = perturb.min().item<int64_t>(), hi = perturb.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < MK, "perturb must be in [0, M*K = ", MK, "), got values in [", lo, ", ", hi,
                      "]");
  }
  at::Tensor out = at::empty({N, M}, codes.options());
  const Problem pb{M, K, MK, gram.data_ptr<float>(), norms.data_ptr<float>()};
  const int64_t R = perturb.size(0), P = perturb.size(2);
  const float* xp = x.data_ptr<float>();
  const float* etap = eta.data_ptr<float>();
  const int64_t* codesp = codes.data_ptr<int64_t>();
  const int64_t* pertp = perturb.data_ptr<int64_t>();
  int64_t* outp = out.data_ptr<int64_t>();

  for (int64_t c0 = 0; c0 < N; c0 += kChunkRows) {
    const int64_t c1 = std::min(N, c0 + kChunkRows);
    const at::Tensor dots = at::mm(x.narrow(0, c0, c1 - c0), flat.t()).contiguous();  // (n, MK)
    const float* dotsp = dots.data_ptr<float>();
    at::parallel_for(c0, c1, 16, [&](int64_t r0, int64_t r1) {
      RowState best, cand;
      for (int64_t i = r0; i < r1; ++i) {
        const float* xi = xp + i * d;
        float x_sq = 0.f;
        for (int64_t t = 0; t < d; ++t) x_sq += xi[t] * xi[t];
        const float coef = x_sq > 0.f ? (etap[i] - 1.f) / std::max(x_sq, 1e-30f) : 0.f;
        const Row row{pb, dotsp + (i - c0) * MK, x_sq, coef};
        if (greedy) {
          row.greedy(best);
        } else {
          row.start(best, codesp + i * M);
        }
        for (int64_t it = 0; it < icm_iters; ++it) row.sweep(best);
        float best_loss = row.loss(best);
        for (int64_t r = 0; r < R; ++r) {
          cand = best;
          const int64_t* pv = pertp + (r * N + i) * P;
          for (int64_t j = 0; j < P; ++j) row.set_code(cand, pv[j] / K, pv[j] % K);
          for (int64_t it = 0; it < icm_iters; ++it) row.sweep(cand);
          const float cand_loss = row.loss(cand);
          if (cand_loss < best_loss) {
            std::swap(best, cand);
            best_loss = cand_loss;
          }
        }
        std::memcpy(outp + i * M, best.codes.data(), sizeof(int64_t) * M);
      }
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace torchaq
