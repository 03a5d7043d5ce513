// The only translation unit that includes Python.h: it gives `torch_piso._C` a module init so that
// `import torch_piso._C` loads the shared library, whose static initializers register the ops.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torch_piso compiled ops (registered under torch.ops.piso)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
