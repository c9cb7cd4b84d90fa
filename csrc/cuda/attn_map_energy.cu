// CUDA kernels for the self-attention-map L2 energy and the attention lse: the same ops and
// contracts as the C++ CPU kernels (csrc/attn_map_energy.cpp; float32 [B·H, N, D] inputs).
//
// These are plain row kernels (one thread block per (query row or key, batch·head), threads
// strided over the other axis, block reductions in shared memory): simple and exact, not tuned.
// On CUDA the Triton kernels (kernels/attn_map_energy.py) are the fast path; these exist so the
// native library offers every op on every device it is built for. They depend on the CUDA
// toolkit only (raw pointers, a cudaStream_t), so they compile without a GPU or a CUDA torch;
// csrc/cuda/torch_bindings_cuda.cpp registers them when torch has CUDA.
//
// Notation as in the CPU file: A = softmax(scale·q kᵀ), A_ref = exp(scale·q_ref k_refᵀ − lse_ref),
// row_sq_i = Σ_j (A − A_ref)², row_dot_i = Σ_j A (A − A_ref), P = A ⊙ ((A − A_ref) − row_dot),
// dq_sum_i = Σ_j P_ij k_j, dk_sum_j = Σ_i P_ij q_i.

#include <cuda_runtime.h>

#include <cstdint>

#include "attn_map_energy_cuda.h"

namespace {

constexpr int kThreads = 128;

__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

__device__ float block_max(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

__device__ float dot_row(const float* __restrict a, const float* __restrict b, int d) {
  float s = 0.0f;
  for (int i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// lse of row `row` of scale · x yᵀ (x row in shared memory, y [L, D] in global memory).
__device__ float row_lse(const float* x, const float* __restrict y, int L, int D, float scale, float* scratch) {
  float m = -INFINITY, l = 0.0f;
  for (int j = threadIdx.x; j < L; j += kThreads) {
    const float s = scale * dot_row(x, y + int64_t(j) * D, D);
    const float m_new = fmaxf(m, s);
    l = l * __expf(m - m_new) + __expf(s - m_new);
    m = m_new;
  }
  const float m_all = block_max(m, scratch);
  const float l_all = block_sum(m == -INFINITY ? 0.0f : l * __expf(m - m_all), scratch);
  return m_all + logf(l_all);
}

// grid (N, B·H); shared: q row, q_ref row (2·D floats) + reduction scratch.
__global__ void attn_map_energy_fwd_kernel(const float* __restrict q, const float* __restrict k,
                                           const float* __restrict q_ref, const float* __restrict k_ref,
                                           const float* __restrict lse_ref, float* __restrict lse_out,
                                           float* __restrict row_sq, float* __restrict row_dot, int N, int D,
                                           float scale) {
  extern __shared__ float shared[];
  float* qi = shared;
  float* qri = shared + D;
  float* scratch = shared + 2 * D;
  const int i = blockIdx.x;
  const int64_t bh = blockIdx.y, base = bh * N * D, row = bh * N + i;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    qi[d] = q[base + int64_t(i) * D + d];
    qri[d] = q_ref[base + int64_t(i) * D + d];
  }
  __syncthreads();
  const float lse = row_lse(qi, k + base, N, D, scale, scratch);
  const float lr = lse_ref[row];
  float sq = 0.0f, dt = 0.0f;
  for (int j = threadIdx.x; j < N; j += kThreads) {
    const float a = __expf(scale * dot_row(qi, k + base + int64_t(j) * D, D) - lse);
    const float d = a - __expf(scale * dot_row(qri, k_ref + base + int64_t(j) * D, D) - lr);
    sq += d * d;
    dt += a * d;
  }
  sq = block_sum(sq, scratch);
  dt = block_sum(dt, scratch);
  if (threadIdx.x == 0) {
    lse_out[row] = lse;
    row_sq[row] = sq;
    row_dot[row] = dt;
  }
}

// dq_sum: grid (N, B·H), one query row per block; shared: q, q_ref rows, dq accumulator (3·D).
__global__ void attn_map_energy_dq_kernel(const float* __restrict q, const float* __restrict k,
                                          const float* __restrict q_ref, const float* __restrict k_ref,
                                          const float* __restrict lse_ref, const float* __restrict lse,
                                          const float* __restrict row_dot, float* __restrict dq_sum, int N,
                                          int D, float scale) {
  extern __shared__ float shared[];
  float* qi = shared;
  float* qri = shared + D;
  float* acc = shared + 2 * D;
  const int i = blockIdx.x;
  const int64_t bh = blockIdx.y, base = bh * N * D, row = bh * N + i;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    qi[d] = q[base + int64_t(i) * D + d];
    qri[d] = q_ref[base + int64_t(i) * D + d];
    acc[d] = 0.0f;
  }
  __syncthreads();
  const float li = lse[row], lri = lse_ref[row], di = row_dot[row];
  for (int j = threadIdx.x; j < N; j += kThreads) {
    const float* kj = k + base + int64_t(j) * D;
    const float a = __expf(scale * dot_row(qi, kj, D) - li);
    const float p = a * ((a - __expf(scale * dot_row(qri, k_ref + base + int64_t(j) * D, D) - lri)) - di);
    for (int d = 0; d < D; ++d) atomicAdd(&acc[d], p * kj[d]);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kThreads) dq_sum[base + int64_t(i) * D + d] = acc[d];
}

// dk_sum: grid (N, B·H), one key per block, threads over query rows; shared: k, k_ref rows, acc.
__global__ void attn_map_energy_dk_kernel(const float* __restrict q, const float* __restrict k,
                                          const float* __restrict q_ref, const float* __restrict k_ref,
                                          const float* __restrict lse_ref, const float* __restrict lse,
                                          const float* __restrict row_dot, float* __restrict dk_sum, int N,
                                          int D, float scale) {
  extern __shared__ float shared[];
  float* kj = shared;
  float* krj = shared + D;
  float* acc = shared + 2 * D;
  const int j = blockIdx.x;
  const int64_t bh = blockIdx.y, base = bh * N * D;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    kj[d] = k[base + int64_t(j) * D + d];
    krj[d] = k_ref[base + int64_t(j) * D + d];
    acc[d] = 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < N; i += kThreads) {
    const int64_t row = bh * N + i;
    const float* qi = q + base + int64_t(i) * D;
    const float a = __expf(scale * dot_row(qi, kj, D) - lse[row]);
    const float ar = __expf(scale * dot_row(q_ref + base + int64_t(i) * D, krj, D) - lse_ref[row]);
    const float p = a * ((a - ar) - row_dot[row]);
    for (int d = 0; d < D; ++d) atomicAdd(&acc[d], p * qi[d]);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kThreads) dk_sum[base + int64_t(j) * D + d] = acc[d];
}

// grid (N, B·H): lse of query row i against L keys.
__global__ void attention_lse_kernel(const float* __restrict q, const float* __restrict k, float* __restrict lse,
                                     int N, int L, int D, float scale) {
  extern __shared__ float shared[];
  float* qi = shared;
  float* scratch = shared + D;
  const int i = blockIdx.x;
  const int64_t bh = blockIdx.y;
  for (int d = threadIdx.x; d < D; d += kThreads) qi[d] = q[(bh * N + i) * D + d];
  __syncthreads();
  const float value = row_lse(qi, k + bh * L * D, L, D, scale, scratch);
  if (threadIdx.x == 0) lse[bh * N + i] = value;
}

size_t shared_bytes(int vectors, int D) { return sizeof(float) * (vectors * D + kThreads / 32); }

}  // namespace

namespace gnr_fast_native::cuda {

cudaError_t attn_map_energy_fwd(const float* q, const float* k, const float* q_ref, const float* k_ref,
                                const float* lse_ref, float* lse, float* row_sq, float* row_dot, float* dq_sum,
                                float* dk_sum, int BH, int N, int D, float scale, cudaStream_t stream) {
  const dim3 grid(N, BH);
  attn_map_energy_fwd_kernel<<<grid, kThreads, shared_bytes(2, D), stream>>>(q, k, q_ref, k_ref, lse_ref, lse, row_sq,
                                                                             row_dot, N, D, scale);
  if (dq_sum != nullptr) {
    attn_map_energy_dq_kernel<<<grid, kThreads, shared_bytes(3, D), stream>>>(q, k, q_ref, k_ref, lse_ref, lse,
                                                                              row_dot, dq_sum, N, D, scale);
    attn_map_energy_dk_kernel<<<grid, kThreads, shared_bytes(3, D), stream>>>(q, k, q_ref, k_ref, lse_ref, lse,
                                                                              row_dot, dk_sum, N, D, scale);
  }
  return cudaGetLastError();
}

cudaError_t attn_map_energy_bwd(const float* q, const float* k, const float* q_ref, const float* k_ref,
                                const float* lse_ref, float* lse, const float* row_dot, float* dq_sum, float* dk_sum,
                                int BH, int N, int D, float scale, cudaStream_t stream) {
  const dim3 grid(N, BH);
  attention_lse_kernel<<<grid, kThreads, shared_bytes(1, D), stream>>>(q, k, lse, N, N, D, scale);
  attn_map_energy_dq_kernel<<<grid, kThreads, shared_bytes(3, D), stream>>>(q, k, q_ref, k_ref, lse_ref, lse, row_dot,
                                                                            dq_sum, N, D, scale);
  attn_map_energy_dk_kernel<<<grid, kThreads, shared_bytes(3, D), stream>>>(q, k, q_ref, k_ref, lse_ref, lse, row_dot,
                                                                            dk_sum, N, D, scale);
  return cudaGetLastError();
}

cudaError_t attention_lse(const float* q, const float* k, float* lse, int BH, int N, int L, int D, float scale,
                          cudaStream_t stream) {
  attention_lse_kernel<<<dim3(N, BH), kThreads, shared_bytes(1, D), stream>>>(q, k, lse, N, L, D, scale);
  return cudaGetLastError();
}

}  // namespace gnr_fast_native::cuda
