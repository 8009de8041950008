// ATen driver of torch.ops.torchaq.rescore_topk on CPU: exact logits of a few candidate classes per
// query, top-k kept, in one pass that reads each candidate's weight row once and never builds the
// (B, C, d) block of gathered rows. Reference and semantics: torchaq/ops/rescore.py (rescore_topk_reference).
//
// Per query b (queries in parallel over at::parallel_for): the candidate ids are checked and
// de-duplicated (a repeated class scores -inf after its first occurrence), the C dot products
// <h_b, W[c]> are summed by the ISA kernel (order in rescore_kernels.h), the bias added, and the
// best k of the keys (value desc, class asc) packed as one uint64 each are selected with
// nth_element and sorted. Cost: B * C * d multiply-adds and B * C random row reads, plus
// O(B * (C + k log k)) for the selection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "rescore.h"
#include "rescore_i8_kernels.h"
#include "rescore_kernels.h"
#include "scan.h"
#include "topk.h"  // order_bits / from_order_bits: the scans' float <-> ordered-integer keys

namespace torchaq {
namespace cpu {

// Portable kernel (baseline flags): the same 64 partial sums and reduction tree as the SIMD files.
void dots_scalar(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n,
                 float* out) {
  for (int64_t c = 0; c < n; ++c) {
    const float* w = rows + int64_t(ids[c]) * ld;
    float p[64] = {};
    int64_t i = 0;
    for (; i + 64 <= d; i += 64)
      for (int r = 0; r < 64; ++r) p[r] += h[i + r] * w[i + r];
    if (i < d)
      for (int r = 0; r < 64; ++r) p[r] += i + r < d ? h[i + r] * w[i + r] : 0.0f;
    float s[16];
    for (int r = 0; r < 16; ++r) s[r] = (p[r] + p[r + 16]) + (p[r + 32] + p[r + 48]);
    for (int w2 = 8; w2 >= 1; w2 /= 2)
      for (int r = 0; r < w2; ++r) s[r] += s[r + w2];
    out[c] = s[0];
  }
}

#if !defined(TORCHAQ_X86_KERNELS)
void dots_avx2(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n, float* out) {
  dots_scalar(h, rows, ld, d, ids, n, out);
}
void dots_avx512(const float* h, const float* rows, int64_t ld, int64_t d, const int32_t* ids, int64_t n,
                 float* out) {
  dots_scalar(h, rows, ld, d, ids, n, out);
}
#endif

DotsFn dots_kernel() {  // the kernel set the scans use (honours TORCHAQ_FORCE_SCALAR / TORCHAQ_CPU_ISA)
  const char* isa = active_isa();
  if (std::strcmp(isa, "avx512") == 0) return dots_avx512;
  if (std::strcmp(isa, "avx2") == 0) return dots_avx2;
  return dots_scalar;
}

namespace {

using DotsI8Fn = void (*)(const int16_t*, float, const int8_t*, const float*, int64_t, const int32_t*, int64_t,
                          float*);

// Largest |h16| for which sum_i h16[i] * w8[i] (|w8| <= 127) fits int32: min(32767, (2^31 - 1) / (127 d)).
int64_t query_i16_limit(int64_t d) { return std::min<int64_t>(32767, ((int64_t(1) << 31) - 1) / (127 * std::max<int64_t>(d, 1))); }

// h ~ h_scale * h16 with integers h16 = round(h / h_scale), h_scale = max |h| / limit (1 if h == 0).
float quantize_query_i16(const float* h, int64_t d, int64_t limit, int16_t* h16) {
  float mx = 0.f;
  for (int64_t i = 0; i < d; ++i) mx = std::max(mx, std::fabs(h[i]));
  const float lim = float(limit);
  const float s = mx > 0.f ? mx / lim : 1.f;
  const float inv = 1.f / s;
  for (int64_t i = 0; i < d; ++i) h16[i] = int16_t(std::max(-lim, std::min(lim, std::nearbyint(h[i] * inv))));
  return s;
}

// Per-thread scratch, reused across calls (no allocation on the hot path once warm).
struct Buffers {
  std::vector<int32_t> ids;     // row of each candidate in `rows`
  std::vector<float> dots;
  std::vector<uint64_t> keys;
  std::vector<uint32_t> stamp;  // stamp[class] == gen: class already seen for this query
  std::vector<int16_t> h16;     // the query in int16 (shortlist stage)
  uint32_t gen = 0;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rescore_topk_cpu(const at::Tensor& h_in, const at::Tensor& weight_in,
                                                    const std::optional<at::Tensor>& bias_in,
                                                    const at::Tensor& cand_in, int64_t k) {
  return rescore_topk_side_cpu(h_in, weight_in, bias_in, cand_in, std::nullopt, k, Shortlist{});
}

std::tuple<at::Tensor, at::Tensor> rescore_topk_side_cpu(const at::Tensor& h_in, const at::Tensor& weight_in,
                                                         const std::optional<at::Tensor>& bias_in,
                                                         const at::Tensor& cand_in,
                                                         const std::optional<at::Tensor>& side_in, int64_t k,
                                                         const Shortlist& shortlist) {
  if (side_in.has_value() && side_in->numel() > 0) {
    TORCH_CHECK_VALUE(side_in->dim() == 1, "side_rows must be (S,), got shape ", side_in->sizes());
    TORCH_CHECK_TYPE(side_in->scalar_type() == at::kLong, "side_rows must be int64, got ", side_in->scalar_type());
    TORCH_CHECK_VALUE(side_in->device() == h_in.device(), "side_rows is on ", side_in->device(), " but h is on ",
                      h_in.device());
    const bool in_place = weight_in.dim() == 2 && weight_in.scalar_type() == at::kFloat && weight_in.stride(1) == 1 &&
                          weight_in.stride(0) >= weight_in.size(1);
    if (!in_place || cand_in.dim() != 2)  // a converted weight is gathered per candidate: append the side ids
      return rescore_topk_side_cpu(
          h_in, weight_in, bias_in,
          at::cat({cand_in, side_in->to(cand_in.device()).unsqueeze(0).expand({cand_in.size(0), side_in->size(0)})}, 1),
          std::nullopt, k, Shortlist{});
  }
  // mirrors torchaq.ops._check_rescore (same messages, ValueError / TypeError)
  TORCH_CHECK_VALUE(h_in.dim() == 2, "h must be (B, d), got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 2, "weight must be (V, d), got shape ", weight_in.sizes());
  TORCH_CHECK_TYPE(h_in.is_floating_point() && weight_in.is_floating_point(),
                   "h and weight must be floating point, got ", h_in.scalar_type(), ", ", weight_in.scalar_type());
  TORCH_CHECK_VALUE(h_in.size(1) == weight_in.size(1), "h has d = ", h_in.size(1), " but weight has d = ",
                    weight_in.size(1));
  TORCH_CHECK_VALUE(cand_in.dim() == 2 && cand_in.size(0) == h_in.size(0), "candidates must be (B, C) with B = ",
                    h_in.size(0), ", got shape ", cand_in.sizes());
  TORCH_CHECK_TYPE(cand_in.scalar_type() == at::kLong, "candidates must be int64, got ", cand_in.scalar_type());
  const bool has_side = side_in.has_value() && side_in->numel() > 0;
  const at::Tensor side = has_side ? side_in->contiguous() : at::Tensor();
  const int64_t S = has_side ? side.size(0) : 0;
  const int64_t* sp = has_side ? side.const_data_ptr<int64_t>() : nullptr;
  const int64_t V = weight_in.size(0), d = weight_in.size(1), B = h_in.size(0), C0 = cand_in.size(1), C = C0 + S;
  if (bias_in.has_value()) {
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == V, "bias must have shape (", V, ",), got ",
                      bias_in->sizes());
    TORCH_CHECK_TYPE(bias_in->is_floating_point(), "bias must be floating point, got ", bias_in->scalar_type());
  }
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "rescore_topk: weight must have fewer than 2^31 rows, got ", V);
  const int64_t kk = std::min(k, C);
  at::Tensor values = at::empty({B, kk}, h_in.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, kk}, cand_in.options());
  if (B == 0 || kk == 0) return {values, indices};

  const at::Tensor cand = cand_in.contiguous();
  const int64_t* cp = cand.const_data_ptr<int64_t>();
  {  // ids in range: one pass of compares over B * C integers
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0, n = B * C0; i < n; ++i) {
      lo = std::min(lo, cp[i]);
      hi = std::max(hi, cp[i]);
    }
    for (int64_t i = 0; i < S; ++i) {
      lo = std::min(lo, sp[i]);
      hi = std::max(hi, sp[i]);
    }
    TORCH_CHECK_VALUE(lo >= 0 && hi < V, "candidates must be class ids in [0, ", V, "), got values in [", lo, ", ",
                      hi, "]");
  }
  const at::Tensor h = h_in.scalar_type() == at::kFloat ? h_in.contiguous() : h_in.to(at::kFloat).contiguous();
  // float32 rows with unit stride are read in place; other weights are gathered and converted
  // once per call (B * C rows), then read from that copy
  const bool in_place = weight_in.scalar_type() == at::kFloat && weight_in.stride(1) == 1 && weight_in.stride(0) >= d;
  at::Tensor rows_t;
  if (!in_place) {
    TORCH_INTERNAL_ASSERT(!has_side);  // appended above
    TORCH_CHECK_VALUE(B * C < (int64_t(1) << 31), "rescore_topk: B * C must be < 2^31 for a non-float32 weight");
    rows_t = weight_in.index_select(0, cand.reshape(-1)).to(at::kFloat).contiguous();
  }
  const float* rows = in_place ? weight_in.const_data_ptr<float>() : rows_t.const_data_ptr<float>();
  const int64_t ld = in_place ? weight_in.stride(0) : d;
  at::Tensor bias_t;
  if (bias_in.has_value())
    bias_t = bias_in->scalar_type() == at::kFloat ? bias_in->contiguous() : bias_in->to(at::kFloat).contiguous();
  const float* bias = bias_in.has_value() ? bias_t.const_data_ptr<float>() : nullptr;
  const float* hp = h.const_data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const DotsFn dots = dots_kernel();
  // the int8 shortlist stage (layer_topk): only for weights read in place
  const int64_t h_limit = query_i16_limit(d);
  const bool use_i8 = shortlist.rows8 != nullptr && in_place && h_limit >= 127;
  const DotsI8Fn dots_i8 = std::strcmp(active_isa(), "avx512") == 0 ? dots_i8_avx512 : dots_i8_scalar;
  const int64_t R = std::max(shortlist.keep, kk);

  // a query is C * d multiply-adds over C random rows: one query already pays for a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, C * d));
  at::parallel_for(0, B, grain, [&](int64_t q0, int64_t q1) {
    thread_local Buffers buf;
    if (buf.ids.size() < size_t(C)) {
      buf.ids.resize(size_t(C));
      buf.dots.resize(size_t(C));
      buf.keys.resize(size_t(C));
    }
    if (buf.stamp.size() < size_t(V)) {
      buf.stamp.assign(size_t(V), 0);
      buf.gen = 0;
    }
    for (int64_t q = q0; q < q1; ++q) {
      if (++buf.gen == 0) {  // wrapped: forget every stamp
        std::fill(buf.stamp.begin(), buf.stamp.end(), 0u);
        buf.gen = 1;
      }
      const int64_t* c = cp + q * C0;
      if (use_i8 && C > R) {
        // shortlist: the distinct candidates by int8 score, the best R of them re-scored exactly
        int64_t nu = 0;
        for (int64_t i = 0; i < C; ++i) {
          const int64_t cls = i < C0 ? c[i] : sp[i - C0];
          uint32_t& st = buf.stamp[size_t(cls)];
          buf.ids[size_t(nu)] = int32_t(cls);
          nu += st != buf.gen;
          st = buf.gen;
        }
        if (nu > R) {
          if (buf.h16.size() < size_t(d)) buf.h16.resize(size_t(d));
          const float hs = quantize_query_i16(hp + q * d, d, h_limit, buf.h16.data());
          dots_i8(buf.h16.data(), hs, shortlist.rows8, shortlist.scale, d, buf.ids.data(), nu, buf.dots.data());
          uint64_t* kb = buf.keys.data();
          for (int64_t i = 0; i < nu; ++i) {
            const int32_t cls = buf.ids[size_t(i)];
            float v = buf.dots[size_t(i)];
            if (bias != nullptr) v = v + bias[cls];
            kb[i] = uint64_t(order_bits(v)) << 32 | uint64_t(0xFFFFFFFFu - uint32_t(cls));
          }
          std::nth_element(kb, kb + R, kb + nu, std::greater<uint64_t>());
          for (int64_t i = 0; i < R; ++i) buf.ids[size_t(i)] = int32_t(0xFFFFFFFFu - uint32_t(kb[i]));
          dots(hp + q * d, rows, ld, d, buf.ids.data(), R, buf.dots.data());
          for (int64_t i = 0; i < R; ++i) {  // distinct classes: no repeats left
            const int32_t cls = buf.ids[size_t(i)];
            float v = buf.dots[size_t(i)];
            if (bias != nullptr) v = v + bias[cls];
            kb[i] = uint64_t(order_bits(v)) << 32 | uint64_t(0xFFFFFFFFu - uint32_t(cls));
          }
          if (kk < R) std::nth_element(kb, kb + kk, kb + R, std::greater<uint64_t>());
          std::sort(kb, kb + kk, std::greater<uint64_t>());
          for (int64_t i = 0; i < kk; ++i) {
            vp[q * kk + i] = from_order_bits(uint32_t(kb[i] >> 32));
            ip[q * kk + i] = int64_t(0xFFFFFFFFu - uint32_t(kb[i]));
          }
          continue;
        }
        if (++buf.gen == 0) {  // few distinct candidates: the exact pass below, with fresh stamps
          std::fill(buf.stamp.begin(), buf.stamp.end(), 0u);
          buf.gen = 1;
        }
      }
      for (int64_t i = 0; i < C0; ++i) buf.ids[size_t(i)] = in_place ? int32_t(c[i]) : int32_t(q * C + i);
      for (int64_t i = 0; i < S; ++i) buf.ids[size_t(C0 + i)] = int32_t(sp[i]);  // in place (checked above)
      dots(hp + q * d, rows, ld, d, buf.ids.data(), C, buf.dots.data());
      for (int64_t i = 0; i < C; ++i) {
        const int64_t cls = i < C0 ? c[i] : sp[i - C0];
        float v = buf.dots[size_t(i)];
        if (bias != nullptr) v = v + bias[cls];
        uint32_t& st = buf.stamp[size_t(cls)];
        if (st == buf.gen) v = -INFINITY;  // a repeat of a class already offered
        st = buf.gen;
        buf.keys[size_t(i)] = uint64_t(order_bits(v)) << 32 | uint64_t(0xFFFFFFFFu - uint32_t(cls));
      }
      uint64_t* kb = buf.keys.data();
      if (kk < C) std::nth_element(kb, kb + kk, kb + C, std::greater<uint64_t>());
      std::sort(kb, kb + kk, std::greater<uint64_t>());
      for (int64_t i = 0; i < kk; ++i) {
        vp[q * kk + i] = from_order_bits(uint32_t(kb[i] >> 32));
        ip[q * kk + i] = int64_t(0xFFFFFFFFu - uint32_t(kb[i]));
      }
    }
  });
  return {values, indices};
}

}  // namespace cpu
}  // namespace torchaq
