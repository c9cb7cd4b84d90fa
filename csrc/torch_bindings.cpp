// Registers the native ops as torch.ops.gnr_fast_native.* (fake/meta twins: gnr_fast/ops/native.py).
#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY(gnr_fast_native, m) {
  m.def(
      "attn_map_energy_fwd(Tensor q, Tensor k, Tensor q_ref, Tensor k_ref, Tensor lse_ref, float scale, "
      "bool with_grad, int block_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attn_map_energy_bwd(Tensor q, Tensor k, Tensor q_ref, Tensor k_ref, Tensor lse_ref, Tensor row_dot, "
      "float scale, int block_rows) -> (Tensor, Tensor)");
  m.def("attention_lse(Tensor q, Tensor k, float scale, int block_rows) -> Tensor");
  // Float lanes per vector of the energy kernels as compiled (16: AVX-512, 8: otherwise).
  m.def("vector_lanes() -> int", &gnr_fast_native::vector_lanes);
  // Threads one at::parallel_for of `items` items runs on in this library (1 without OpenMP).
  m.def("parallel_threads(int items) -> int", &gnr_fast_native::parallel_threads);
}

TORCH_LIBRARY_IMPL(gnr_fast_native, CPU, m) {
  m.impl("attn_map_energy_fwd", &gnr_fast_native::attn_map_energy_fwd_cpu);
  m.impl("attn_map_energy_bwd", &gnr_fast_native::attn_map_energy_bwd_cpu);
  m.impl("attention_lse", &gnr_fast_native::attention_lse_cpu);
}
