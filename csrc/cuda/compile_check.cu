// Instantiates every kernel of lora_kernels.cuh (and the SGMV plan kernel) for every dtype, vector width and
// configuration the launchers in lora_cuda.cu use, so compile_check.sh can build them
// with nvcc alone (no torch, no GPU).
#include "lora_kernels.cuh"

namespace adapterhub {
namespace cuda {

template <typename T, int VEC>
void instantiate_width() {
  const void* kernels[] = {
      reinterpret_cast<const void*>(&lora_shrink_kernel<T, VEC, BgmvShrink>),
      reinterpret_cast<const void*>(&lora_shrink_kernel<T, VEC, SgmvShrink>),
      reinterpret_cast<const void*>(&lora_expand_kernel<T, VEC, BgmvExpand>),
      reinterpret_cast<const void*>(&lora_expand_kernel<T, VEC, SgmvExpand>),
      reinterpret_cast<const void*>(&lora_fused_decode_kernel<T, VEC>),
  };
  (void)kernels;
}

template <typename T>
void instantiate() {
  instantiate_width<T, kVecWidth<T>>();
  instantiate_width<T, 1>();
}

const void* plan_kernel = reinterpret_cast<const void*>(&sgmv_plan_kernel<SgmvShrink::kRows>);

template void instantiate<__half>();
template void instantiate<__nv_bfloat16>();
template void instantiate<float>();
template void instantiate<double>();

}  // namespace cuda
}  // namespace adapterhub
