// Registers the C++ kernels for the CPU dispatch key of the ops declared in torchaq/ops.py
// (schemas live in Python only; torchaq/__init__.py imports torchaq.ops before torchaq._C), and
// defines the Python module torchaq._C, whose import runs the static registration below.
#include <Python.h>
#include <torch/library.h>

#include "scan.h"

TORCH_LIBRARY_IMPL(torchaq, CPU, m) {
  m.impl("compute_lut", &torchaq::cpu::compute_lut_cpu);
  m.impl("lut_topk", &torchaq::cpu::lut_topk_cpu);
  m.impl("lut_score", &torchaq::cpu::lut_score_cpu);
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(torchaq::cpu::active_isa()); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Kernel set the CPU ops use now: 'avx512', 'avx2' or 'scalar' (honours TORCHAQ_FORCE_SCALAR / "
     "TORCHAQ_CPU_ISA, read at every call)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "torchaq C++ CPU kernels (registered as torch.ops.torchaq.* CPU kernels on import).", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
