// Registers the C++ kernels for the CPU dispatch key of the ops declared in torchaq/ops/schemas.py
// (schemas live in Python only; torchaq/__init__.py imports torchaq.ops before torchaq._C), and
// defines the Python module torchaq._C, whose import runs the static registration below.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "aq_encode.h"
#include "encode.h"
#include "inverse_cdf.h"
#include "layer_sample.h"
#include "linear_ce.h"
#include "mass_histogram.h"
#include "normal_apply.h"
#include "proposal.h"
#include "reject.h"
#include "rescore.h"
#include "row_partition.h"
#include "row_topk.h"
#include "scan.h"
#include "scan_kernels.h"
#include "tail_bounds.h"

TORCH_LIBRARY_IMPL(torchaq, CPU, m) {
  m.impl("compute_lut", &torchaq::cpu::compute_lut_cpu);
  m.impl("lut_topk", &torchaq::cpu::lut_topk_cpu);
  m.impl("lut_score", &torchaq::cpu::lut_score_cpu);
  m.impl("lut_score_quantized", &torchaq::cpu::lut_score_quantized_cpu);
  m.impl("row_topk", &torchaq::cpu::row_topk_cpu);
  m.impl("row_log_partition", &torchaq::cpu::row_log_partition_cpu);
  m.impl("inverse_cdf", &torchaq::cpu::inverse_cdf_cpu);
  m.impl("reject_rounds", &torchaq::cpu::reject_rounds_cpu);
  m.impl("proposal_weights_", &torchaq::cpu::proposal_weights_cpu);
  m.impl("tail_bounds_", &torchaq::cpu::tail_bounds_cpu);
  m.impl("mass_histogram", &torchaq::cpu::mass_histogram_cpu);
  m.impl("pq_encode", &torchaq::cpu::pq_encode_cpu);
  m.impl("anisotropic_encode", &torchaq::cpu::anisotropic_encode_cpu);
  m.impl("aq_encode", &torchaq::cpu::aq_encode_cpu);
  m.impl("rescore_topk", &torchaq::cpu::rescore_topk_cpu);
  m.impl("anisotropic_normal_apply", &torchaq::cpu::normal_apply_cpu);
  m.impl("anisotropic_normal_rhs", &torchaq::cpu::normal_rhs_cpu);
  m.impl("layer_topk", &torchaq::cpu::layer_topk_cpu);
  m.impl("layer_sample", &torchaq::cpu::layer_sample_cpu);
  m.impl("linear_ce", &torchaq::cpu::linear_ce_cpu);
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(torchaq::cpu::active_isa()); }

// Distinct threads that run one at::parallel_for of this extension (at most 64 counted).
PyObject* parallel_threads(PyObject*, PyObject*) {
  std::atomic<uint64_t> seen{0};
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, 4096, 1, [&](int64_t, int64_t) {
    volatile double x = 0;  // a little work, so that every thread of the region gets a share
    for (int i = 0; i < 20000; ++i) x = x + i;
    seen |= uint64_t(1) << (at::get_thread_num() & 63);
  });
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(__builtin_popcountll(seen.load()));
}

// The layout constants the C++ kernels were compiled with; the tests compare them with torchaq.ops.layout.
PyObject* layout(PyObject*, PyObject*) {
  return Py_BuildValue("{s:L,s:i,s:i}", "block", static_cast<long long>(torchaq::cpu::kBlock), "bits_k16", 4,
                       "bits_k256", 8);
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Kernel set the CPU ops use now: 'avx512', 'avx2' or 'scalar' (honours TORCHAQ_FORCE_SCALAR / "
     "TORCHAQ_CPU_ISA, read at every call)."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "Threads one at::parallel_for region of the extension runs on now: torch.get_num_threads() when "
     "built with OpenMP, 1 when built without it (the scans would then never run in parallel)."},
    {"layout", layout, METH_NOARGS,
     "The packed-layout constants compiled into the kernels: {'block': classes per packed block, "
     "'bits_k16': 4, 'bits_k256': 8} (must equal torchaq.ops.layout.BLOCK and BITS_OF_K)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "torchaq C++ CPU kernels (registered as torch.ops.torchaq.* CPU kernels on import).", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
