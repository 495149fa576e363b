// The op schemas of the `adapterhub` library and the Python module `adapterhub._C`.
// Kernels register themselves per device (csrc/cpu, csrc/cuda); the composite
// lora_delta, lora_linear and its backward live in csrc/lora_linear.cpp.
// adapterhub/ops/schemas.py holds the same schema strings for the pure-PyTorch
// fallback; tests/test_ops_registration.py checks that the two agree.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(adapterhub, m) {
  m.set_python_module("adapterhub.ops.meta");
  m.def("lora_shrink(Tensor x, Tensor A, Tensor index, Tensor? ranks=None) -> Tensor");
  m.def(
      "lora_expand(Tensor(a!) y, Tensor t, Tensor B, Tensor scale, Tensor index, Tensor? ranks=None, "
      "Tensor? weight=None) -> ()");
  m.def(
      "lora_delta(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor index, Tensor? ranks=None, "
      "Tensor? weight=None) -> ()");
  m.def(
      "lora_linear(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor index, "
      "Tensor? ranks=None, Tensor? weight=None) -> Tensor");
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor W, Tensor A, Tensor B, Tensor scale, "
      "Tensor index, Tensor? ranks=None, Tensor? weight=None) -> (Tensor, Tensor, Tensor)");
}

#ifdef ADAPTERHUB_WITH_CUDA
namespace adapterhub {
void raise_routing_errors();                        // csrc/cuda/lora_cuda.cu
std::string set_cuda_decode(const std::string& mode);  // csrc/cuda/lora_cuda.cu
}  // namespace adapterhub
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adapterhub compiled core: gathered low-rank (LoRA) ops registered under torch.ops.adapterhub";
#ifdef ADAPTERHUB_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("raise_routing_errors", &adapterhub::raise_routing_errors, py::call_guard<py::gil_scoped_release>(),
        "Waits for the devices the ops ran on, then raises the first out-of-range routing value their "
        "kernels reported and no op raised yet");
  m.def("set_cuda_decode", &adapterhub::set_cuda_decode,
        "the decode kernel of lora_delta and lora_linear on sm_90+ from now on: 'split' (shrink, expand) or "
        "'fused' (one launch); "
        "returns the previous one");
#else
  m.attr("with_cuda") = false;
#endif
}
