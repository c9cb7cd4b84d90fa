// Host launchers of the CUDA kernels in attn_map_energy.cu (float32, contiguous [B·H, N, D];
// contracts in that file). No torch headers, so the kernels compile with the CUDA toolkit alone.
#pragma once

#include <cuda_runtime.h>

namespace gnr_fast_native::cuda {

// lse, row_sq, row_dot: [B·H, N] out; dq_sum/dk_sum: [B·H, N, D] out, or nullptr for no gradient.
cudaError_t attn_map_energy_fwd(const float* q, const float* k, const float* q_ref, const float* k_ref,
                                const float* lse_ref, float* lse, float* row_sq, float* row_dot, float* dq_sum,
                                float* dk_sum, int BH, int N, int D, float scale, cudaStream_t stream);

// lse: [B·H, N] scratch (recomputed); dq_sum/dk_sum out.
cudaError_t attn_map_energy_bwd(const float* q, const float* k, const float* q_ref, const float* k_ref,
                                const float* lse_ref, float* lse, const float* row_dot, float* dq_sum, float* dk_sum,
                                int BH, int N, int D, float scale, cudaStream_t stream);

// lse [B·H, N] of q [B·H, N, D] against k [B·H, L, D].
cudaError_t attention_lse(const float* q, const float* k, float* lse, int BH, int N, int L, int D, float scale,
                          cudaStream_t stream);

}  // namespace gnr_fast_native::cuda
