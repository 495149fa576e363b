"""The op schemas of the `adapterhub` torch library.

csrc/ops.cpp defines the same strings in C++ (TORCH_LIBRARY); the fallback defines
these when the extension is not built. A test checks that the two agree.
"""

SCHEMAS: dict[str, str] = {
    "lora_shrink": "lora_shrink(Tensor x, Tensor A, Tensor index, Tensor? ranks=None) -> Tensor",
    "lora_expand": (
        "lora_expand(Tensor(a!) y, Tensor t, Tensor B, Tensor scale, Tensor index, Tensor? ranks=None, "
        "Tensor? weight=None) -> ()"
    ),
    "lora_delta": (
        "lora_delta(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor index, Tensor? ranks=None, "
        "Tensor? weight=None) -> ()"
    ),
    "lora_linear": (
        "lora_linear(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor scale, Tensor index, "
        "Tensor? ranks=None, Tensor? weight=None) -> Tensor"
    ),
    "lora_linear_backward": (
        "lora_linear_backward(Tensor grad_y, Tensor x, Tensor W, Tensor A, Tensor B, Tensor scale, "
        "Tensor index, Tensor? ranks=None, Tensor? weight=None) -> (Tensor, Tensor, Tensor)"
    ),
}
