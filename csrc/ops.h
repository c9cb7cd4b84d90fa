// Declarations of the native ops (CPU kernels in attn_map_energy.cpp; registration in
// torch_bindings.cpp). Schemas and contracts: gnr_fast/ops/native.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gnr_fast_native {

// (row_sq, row_dot, dq_sum, dk_sum); row stats [B, H, N], sums [B, H, N, D] (or [0] when !with_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attn_map_energy_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, double scale, bool with_grad, int64_t block_rows);

// (dq_sum, dk_sum) recomputed from the forward's row_dot.
std::tuple<at::Tensor, at::Tensor> attn_map_energy_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, const at::Tensor& row_dot, double scale, int64_t block_rows);

// logsumexp(scale · q kᵀ, -1): q [B, H, N, D], k [B, H, L, D] -> [B, H, N].
at::Tensor attention_lse_cpu(const at::Tensor& q, const at::Tensor& k, double scale, int64_t block_rows);

// Float lanes per vector of the energy kernels' register tiles in this build (16 with AVX-512,
// else 8): the tile geometry follows the -march the library was compiled for.
int64_t vector_lanes();

// How many threads at::parallel_for gives this library's loops now: the number of distinct
// at::get_thread_num() values seen over one parallel loop of `items` items (1 in a library
// compiled without OpenMP, whatever torch.get_num_threads() says).
int64_t parallel_threads(int64_t items);

}  // namespace gnr_fast_native
