// ATen driver of the CPU lookup-table scans: argument checks, LUT quantization, work split over
// threads, run-time ISA dispatch and the final top-k merge. The per-block arithmetic lives in
// scan_{scalar,avx2,avx512}.cpp (see scan_kernels.h for why those files take raw pointers only).
//
// lut_topk, 4-bit (K = 16): per query, LUT[m, :] is shifted by min_m and scaled by one factor
//   scale = min(255 / max_m range_m, (65535 - M) / sum_m range_m)
// then rounded to uint8, so each entry fits a byte and every class's sum of M rounded entries
// (<= sum_m (range_m * scale + 1/2)) fits uint16. Returned values are the exact de-quantization
//   value = float(sum) * (1 / scale) + (sum_m min_m + bias[n])      (float32, no fma)
// which is within M / (2 * scale) (+ float rounding) of the exact float score.
// The top-k is kept per query and per thread while scanning (topk.h), never as a (B, N) matrix;
// for k >= 24 the SIMD kernels use two passes (block maxima, then a rescan of the ~k blocks that
// can hold a winner: see block_bound in topk.h).
// lut_topk, 8-bit (K = 256) and lut_score: exact float sums, subspaces added in order 0..M-1.
// compute_lut: LUT[b, m, j] = <q_m, C_m[j]>, float32 (the per-call step before every scan).
//
// Kernel set: AVX-512 (F/BW/VL/DQ), else AVX2+FMA, else scalar, from __builtin_cpu_supports.
// TORCHAQ_FORCE_SCALAR=1 or TORCHAQ_CPU_ISA=scalar|avx2|avx512 override it; both are read at
// every call. All kernel sets return bit-identical results.
#include "scan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "scan_kernels.h"
#include "topk.h"

namespace torchaq {
namespace cpu {
namespace {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa detected_isa() {
#if defined(TORCHAQ_X86_KERNELS)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

// Read at every call (a getenv is negligible next to a scan), so tests and benchmarks can switch
// paths in-process. TORCHAQ_FORCE_SCALAR=1 wins; TORCHAQ_CPU_ISA=scalar|avx2|avx512 caps the
// choice at what the CPU supports.
Isa current_isa() {
  const char* force = std::getenv("TORCHAQ_FORCE_SCALAR");
  if (force != nullptr && std::strcmp(force, "1") == 0) return Isa::Scalar;
  Isa isa = detected_isa();
  if (const char* want = std::getenv("TORCHAQ_CPU_ISA")) {
    Isa w = isa;
    if (std::strcmp(want, "scalar") == 0) w = Isa::Scalar;
    else if (std::strcmp(want, "avx2") == 0) w = Isa::Avx2;
    else if (std::strcmp(want, "avx512") == 0) w = Isa::Avx512;
    if (int(w) < int(isa)) isa = w;
  }
  return isa;
}

struct Kernels {
  void (*compute_lut)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
  void (*topk4)(const Topk4Args&, const Task&);
  void (*topk8)(const FloatScanArgs&, const Task&);
  void (*score4)(const FloatScanArgs&, const Task&);
  void (*score8)(const FloatScanArgs&, const Task&);
};

Kernels kernels_for(Isa isa) {
  switch (isa) {
#if defined(TORCHAQ_X86_KERNELS)
    case Isa::Avx512: return {compute_lut_avx512, topk4_avx512, topk8_avx512, score4_avx512, score8_avx512};
    case Isa::Avx2: return {compute_lut_avx2, topk4_avx2, topk8_avx2, score4_avx2, score8_avx2};
#endif
    default: return {compute_lut_scalar, topk4_scalar, topk8_scalar, score4_scalar, score8_scalar};
  }
}

// Mirrors torchaq.ops.check_lut_scan_args (same messages, ValueError / TypeError).
int64_t check_scan_args(const at::Tensor& lut, const at::Tensor& packed, int64_t num_classes,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(lut.dim() == 3, "lut must be (B, M, K), got shape ", lut.sizes());
  TORCH_CHECK_TYPE(lut.scalar_type() == at::kFloat, "lut must be float32, got ", lut.scalar_type());
  const int64_t K = lut.size(2);
  TORCH_CHECK_VALUE(K == 16 || K == 256, "lut must have K = 16 (4-bit) or 256 (8-bit) entries, got K = ", K);
  const int64_t bits = K == 16 ? 4 : 8;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8 (from torchaq.ops.pack_codes), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == kBlock,
                    "packed must be (ceil(N/32), P, 32) from pack_codes, got shape ", packed.sizes());
  TORCH_CHECK_VALUE(num_classes >= 0 && packed.size(0) == (num_classes + kBlock - 1) / kBlock,
                    "num_classes=", num_classes, " does not match packed with ", packed.size(0), " blocks of ", kBlock);
  const int64_t M = lut.size(1);
  const int64_t width = bits == 4 ? (M + 1) / 2 : M;
  TORCH_CHECK_VALUE(packed.size(1) == width, "packed has ", packed.size(1), " bytes per class but lut has M = ", M,
                    " subspaces of ", bits, " bits (", width, " bytes): mismatched num_subspaces");
  TORCH_CHECK_VALUE(packed.device() == lut.device(), "packed is on ", packed.device(), " but lut is on ",
                    lut.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == num_classes, "bias must have shape (", num_classes,
                      ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == lut.device(), "bias is on ", bias->device(), " but lut is on ", lut.device());
  }
  return bits;
}

// Split B queries x nblocks code blocks into a TQ x TB grid of tasks. Blocks are split first:
// each task then streams its share of the codes once for all its queries. Queries are split
// when there are too few blocks to go round (small vocabularies with a large batch).
struct Plan {
  int64_t TQ, TB, qchunk, bchunk;
};

Plan make_plan(int64_t B, int64_t nblocks, int64_t P) {
  int64_t T = at::get_num_threads();
  if (B * nblocks * P < (int64_t(1) << 14)) T = 1;  // too little work to pay for threads
  const int64_t TB = std::max<int64_t>(1, std::min<int64_t>(T, nblocks / 4));
  const int64_t TQ = std::max<int64_t>(1, std::min<int64_t>((T + TB - 1) / TB, B));
  int64_t qchunk = (B + TQ - 1) / TQ;
  if (qchunk > 4) qchunk = (qchunk + 3) / 4 * 4;  // whole groups of four queries per task
  const int64_t bchunk = (nblocks + TB - 1) / TB;
  return {(B + qchunk - 1) / qchunk, (nblocks + bchunk - 1) / bchunk, qchunk, bchunk};
}

// Runs fn(task) over the plan's grid, with the running top-k (if any) laid out as topk[bi * B + q].
template <typename Fn>
void run_tasks(const Plan& plan, int64_t B, int64_t nblocks, int64_t P, TopK* topk, Fn fn) {
  const int64_t scratch = scratch_bytes_per_query(P);
  const int64_t ntasks = plan.TQ * plan.TB;
  std::vector<uint8_t> work_buf(static_cast<size_t>(ntasks * plan.qchunk * scratch + 64));
  uint8_t* work = work_buf.data() + (64 - reinterpret_cast<uintptr_t>(work_buf.data()) % 64) % 64;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t qi = i / plan.TB, bi = i % plan.TB;
      Task t;
      t.q0 = qi * plan.qchunk;
      t.q1 = std::min(B, t.q0 + plan.qchunk);
      t.blk0 = bi * plan.bchunk;
      t.blk1 = std::min(nblocks, t.blk0 + plan.bchunk);
      t.topk = topk != nullptr ? topk + bi * B + t.q0 : nullptr;
      t.work = work + i * plan.qchunk * scratch;
      t.id = i;
      if (t.q0 < t.q1 && t.blk0 < t.blk1) fn(t);
    }
  });
}

// Per-query uint8 LUT (B, 2P, 16) (rows >= M stay zero), 1 / scale and the sum of offsets.
void quantize_lut(const at::Tensor& lut, int64_t P, uint8_t* qlut, float* inv_scale, float* offset) {
  const int64_t B = lut.size(0), M = lut.size(1);
  TORCH_CHECK_VALUE(M < 65535, "lut_topk: 4-bit codes support M < 65535 subspaces, got M = ", M);
  const float* L = lut.const_data_ptr<float>();
  std::memset(qlut, 0, size_t(B * 2 * P * 16));
  bool finite = true;
  std::vector<uint8_t> bad(static_cast<size_t>(B), 0);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> mins(static_cast<size_t>(M));
    for (int64_t b = begin; b < end; ++b) {
      const float* l = L + b * M * 16;
      double maxr = 0, sumr = 0, off = 0;
      for (int64_t m = 0; m < M; ++m) {
        double lo = l[m * 16], hi = l[m * 16];
        for (int j = 1; j < 16; ++j) {
          lo = std::min(lo, double(l[m * 16 + j]));
          hi = std::max(hi, double(l[m * 16 + j]));
        }
        mins[size_t(m)] = lo;
        maxr = std::max(maxr, hi - lo);
        sumr += hi - lo;
        off += lo;
      }
      if (!std::isfinite(sumr) || !std::isfinite(off)) {
        bad[size_t(b)] = 1;
        continue;
      }
      const double scale = maxr > 0 ? std::min(255.0 / maxr, double(65535 - M) / sumr) : 1.0;
      uint8_t* q = qlut + b * 2 * P * 16;
      if (scale < 1e37) {
        // float (vectorised): the rounding error of (l - min) * scale is ~1e-7 of a step, far
        // inside the half step of slack that the uint16 budget keeps per subspace
        const float sf = float(scale);
        for (int64_t m = 0; m < M; ++m) {
          const float mn = float(mins[size_t(m)]);  // exact: the min is one of the float entries
          for (int j = 0; j < 16; ++j) q[m * 16 + j] = uint8_t(std::min(255.f, (l[m * 16 + j] - mn) * sf + 0.5f));
        }
      } else {  // ranges below ~1e-35: the scale overflows float
        for (int64_t m = 0; m < M; ++m) {
          for (int j = 0; j < 16; ++j) {
            const double v = (double(l[m * 16 + j]) - mins[size_t(m)]) * scale + 0.5;  // round, v >= 0.5
            q[m * 16 + j] = uint8_t(std::min(255.0, v));
          }
        }
      }
      inv_scale[b] = float(1.0 / scale);
      offset[b] = float(off);
    }
  });
  for (uint8_t x : bad) finite = finite && x == 0;
  TORCH_CHECK_VALUE(finite, "lut_topk: the 4-bit scan quantizes the LUT and needs finite entries (got inf or nan)");
}

// Merge the TB partial top-k of every query into the sorted output; value(q, key) de-quantizes.
// Sorting packs (key order bits, inverted index) into one uint64, so that a plain descending
// integer sort is the (key desc, index asc) order.
template <typename ValueFn>
void merge_topk(std::vector<TopK>& topk, int64_t B, int64_t TB, int64_t kk, float* values, int64_t* indices,
                ValueFn value) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> cand;
    for (int64_t q = begin; q < end; ++q) {
      cand.clear();
      for (int64_t bi = 0; bi < TB; ++bi) {
        TopK& t = topk[size_t(bi * B + q)];
        if (t.size > t.k) topk_compact(t);
        for (int64_t i = 0; i < t.size; ++i)
          cand.push_back(uint64_t(order_bits(t.key[i])) << 32 | uint64_t(0xFFFFFFFFu - uint32_t(t.idx[i])));
      }
      std::sort(cand.begin(), cand.end(), std::greater<uint64_t>());
      for (int64_t i = 0; i < kk; ++i) {  // every class is offered, so cand.size() >= kk
        const uint64_t c = cand[size_t(i)];
        values[q * kk + i] = value(q, from_order_bits(uint32_t(c >> 32)));
        indices[q * kk + i] = int64_t(0xFFFFFFFFu - uint32_t(c));
      }
    }
  });
}

}  // namespace

const char* active_isa() {
  switch (current_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

std::tuple<at::Tensor, at::Tensor> lut_topk_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in,
                                                int64_t num_classes, int64_t k,
                                                const std::optional<at::Tensor>& bias_in) {
  const int64_t bits = check_scan_args(lut_in, packed_in, num_classes, bias_in);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(num_classes < (int64_t(1) << 31), "lut_topk: num_classes must be < 2^31, got ", num_classes);
  const int64_t B = lut_in.size(0), M = lut_in.size(1), kk = std::min(k, num_classes);
  at::Tensor values = at::empty({B, kk}, lut_in.options());
  at::Tensor indices = at::empty({B, kk}, lut_in.options().dtype(at::kLong));
  if (B == 0 || kk == 0) return {values, indices};

  const at::Tensor lut = lut_in.contiguous(), packed = packed_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t nblocks = packed.size(0), P = packed.size(1);
  const Kernels kern = kernels_for(current_isa());
  const Plan plan = make_plan(B, nblocks, P);

  const int64_t cap = 2 * kk + 2 * kBlock, stride = cap + 16;  // see TopK
  const size_t ntopk = static_cast<size_t>(plan.TB * B);
  std::vector<float> keys(ntopk * size_t(stride + cap));
  std::vector<int32_t> ids(ntopk * size_t(stride + 2 * cap));
  std::vector<TopK> topk(ntopk);
  for (size_t i = 0; i < ntopk; ++i) {
    float* kp = keys.data() + i * size_t(stride + cap);
    int32_t* ip = ids.data() + i * size_t(stride + 2 * cap);
    topk[i] = TopK{kp, ip, ip + stride, kp + stride, 0, kk, cap, 0.f, 0};
  }
  float* vals = values.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();

  if (bits == 4) {
    std::vector<uint8_t> qlut(static_cast<size_t>(B * 2 * P * 16));
    std::vector<float> inv_scale(static_cast<size_t>(B)), offset(static_cast<size_t>(B));
    quantize_lut(lut, P, qlut.data(), inv_scale.data(), offset.data());
    // bias in kernel order: per block the 16 even classes, then the 16 odd ones (the SIMD
    // kernels produce the uint16 sums in that order)
    std::vector<float> bias_eo;
    const float* bias_ptr = nullptr;
    if (bias.has_value()) {
      bias_ptr = bias->const_data_ptr<float>();
      bias_eo.assign(size_t(nblocks * kBlock), 0.f);
      for (int64_t n = 0; n < num_classes; ++n) {
        const int64_t i = n % kBlock;
        bias_eo[size_t(n - i + (i & 1) * 16 + i / 2)] = bias_ptr[n];
      }
    }
    // two-pass scratch (SIMD kernels)
    std::vector<float> bmax(static_cast<size_t>(B * nblocks));
    std::vector<uint32_t> select(static_cast<size_t>(plan.TQ * plan.TB * (nblocks + 16)));
    Topk4Args a{packed.const_data_ptr<uint8_t>(), P, num_classes, qlut.data(), inv_scale.data(), offset.data(),
                bias_ptr, bias.has_value() ? bias_eo.data() : nullptr, nblocks, bmax.data(), select.data()};
    run_tasks(plan, B, nblocks, P, topk.data(), [&](const Task& t) { kern.topk4(a, t); });
    const bool has_bias = bias.has_value();
    merge_topk(topk, B, plan.TB, kk, vals, idx, [&](int64_t q, float key) {
      // with a bias the key already is the de-quantized score; without, it is the uint16 sum
      return has_bias ? key : key * inv_scale[size_t(q)] + offset[size_t(q)];
    });
  } else {
    FloatScanArgs a{packed.const_data_ptr<uint8_t>(), P, M, num_classes, lut.const_data_ptr<float>(),
                    bias.has_value() ? bias->const_data_ptr<float>() : nullptr, nullptr};
    run_tasks(plan, B, nblocks, P, topk.data(), [&](const Task& t) { kern.topk8(a, t); });
    merge_topk(topk, B, plan.TB, kk, vals, idx, [](int64_t, float key) { return key; });
  }
  return {values, indices};
}

at::Tensor compute_lut_cpu(const at::Tensor& queries, const at::Tensor& codebooks) {
  // mirrors torchaq.ops._check_compute_lut
  TORCH_CHECK_VALUE(codebooks.dim() == 3, "codebooks must be (M, K, dsub), got shape ", codebooks.sizes());
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries must be (B, d), got shape ", queries.sizes());
  const int64_t M = codebooks.size(0), K = codebooks.size(1), dsub = codebooks.size(2), B = queries.size(0);
  TORCH_CHECK_VALUE(queries.size(1) == M * dsub, "queries have d = ", queries.size(1), " but codebooks cover M * dsub = ",
                    M, " * ", dsub, " = ", M * dsub,
                    " (pad queries with zeros to the quantizer's padded dimension)");
  TORCH_CHECK_TYPE(queries.is_floating_point() && codebooks.is_floating_point(),
                   "queries and codebooks must be floating point, got ", queries.scalar_type(), ", ",
                   codebooks.scalar_type());
  TORCH_CHECK_VALUE(queries.device() == codebooks.device(), "queries are on ", queries.device(), " but codebooks on ",
                    codebooks.device());
  at::Tensor out = at::empty({B, M, K}, queries.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (dsub == 0) return out.zero_();
  const at::Tensor q = queries.to(at::kFloat).contiguous();
  const at::Tensor c = codebooks.to(at::kFloat).contiguous();
  // codebooks transposed to (M, dsub, K) so the kernel's inner loop runs over K contiguous
  // entries; a plain loop, as a strided ATen copy costs more than the whole LUT at batch 1
  std::vector<float> ct(static_cast<size_t>(M * dsub * K));
  const float* cp = c.const_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t t = 0; t < dsub; ++t) ct[size_t((m * dsub + t) * K + j)] = cp[(m * K + j) * dsub + t];
  const Kernels kern = kernels_for(current_isa());
  const float* qp = q.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, M * K * dsub));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { kern.compute_lut(qp, ct.data(), b0, b1, M, K, dsub, op); });
  return out;
}

at::Tensor lut_score_cpu(const at::Tensor& lut_in, const at::Tensor& packed_in, int64_t num_classes,
                         const std::optional<at::Tensor>& bias_in) {
  const int64_t bits = check_scan_args(lut_in, packed_in, num_classes, bias_in);
  const int64_t B = lut_in.size(0), M = lut_in.size(1);
  at::Tensor out = at::empty({B, num_classes}, lut_in.options());
  if (B == 0 || num_classes == 0) return out;
  const at::Tensor packed = packed_in.contiguous();
  const int64_t nblocks = packed.size(0), P = packed.size(1);
  // 4-bit: pad odd M with a zero table so the kernels read whole packed rows (adds +0.0f)
  const at::Tensor lut =
      bits == 4 && 2 * P != M ? at::constant_pad_nd(lut_in, {0, 0, 0, 2 * P - M}).contiguous() : lut_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const Kernels kern = kernels_for(current_isa());
  FloatScanArgs a{packed.const_data_ptr<uint8_t>(), P, M, num_classes, lut.const_data_ptr<float>(),
                  bias.has_value() ? bias->const_data_ptr<float>() : nullptr, out.data_ptr<float>()};
  run_tasks(make_plan(B, nblocks, P), B, nblocks, P, nullptr,
            [&](const Task& t) { bits == 4 ? kern.score4(a, t) : kern.score8(a, t); });
  return out;
}

}  // namespace cpu
}  // namespace torchaq
