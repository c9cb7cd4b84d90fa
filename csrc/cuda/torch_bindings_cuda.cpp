// CUDA implementations of the gnr_fast_native ops (schemas: csrc/torch_bindings.cpp), compiled
// only when torch has CUDA (CMakeLists.txt). Kernels are launched on the tensors' device and its
// current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attn_map_energy_cuda.h"

namespace {

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat, name, " must be a float32 CUDA tensor");
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "gnr_fast_native CUDA launch: ", cudaGetErrorString(err)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_ref_in, const at::Tensor& k_ref_in,
    const at::Tensor& lse_ref_in, double scale, bool with_grad, int64_t /*block_rows*/) {
  for (const auto* t : {&q_in, &k_in, &q_ref_in, &k_ref_in, &lse_ref_in}) check(*t, "inputs");
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), q_ref = q_ref_in.contiguous(), k_ref = k_ref_in.contiguous(),
       lse_ref = lse_ref_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto row_sq = at::empty({B, H, N}, q.options()), row_dot = at::empty_like(row_sq), lse = at::empty_like(row_sq);
  auto dq = with_grad ? at::empty_like(q) : at::empty({0}, q.options());
  auto dk = with_grad ? at::empty_like(k) : at::empty({0}, q.options());
  check_launch(gnr_fast_native::cuda::attn_map_energy_fwd(
      q.data_ptr<float>(), k.data_ptr<float>(), q_ref.data_ptr<float>(), k_ref.data_ptr<float>(),
      lse_ref.data_ptr<float>(), lse.data_ptr<float>(), row_sq.data_ptr<float>(), row_dot.data_ptr<float>(),
      with_grad ? dq.data_ptr<float>() : nullptr, with_grad ? dk.data_ptr<float>() : nullptr, int(B * H), int(N),
      int(D), float(scale), c10::cuda::getCurrentCUDAStream()));
  return {row_sq, row_dot, dq, dk};
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_ref_in,
                                            const at::Tensor& k_ref_in, const at::Tensor& lse_ref_in,
                                            const at::Tensor& row_dot_in, double scale, int64_t /*block_rows*/) {
  for (const auto* t : {&q_in, &k_in, &q_ref_in, &k_ref_in, &lse_ref_in, &row_dot_in}) check(*t, "inputs");
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), q_ref = q_ref_in.contiguous(), k_ref = k_ref_in.contiguous(),
       lse_ref = lse_ref_in.contiguous(), row_dot = row_dot_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto lse = at::empty({B, H, N}, q.options());
  auto dq = at::empty_like(q), dk = at::empty_like(k);
  check_launch(gnr_fast_native::cuda::attn_map_energy_bwd(
      q.data_ptr<float>(), k.data_ptr<float>(), q_ref.data_ptr<float>(), k_ref.data_ptr<float>(),
      lse_ref.data_ptr<float>(), lse.data_ptr<float>(), row_dot.data_ptr<float>(), dq.data_ptr<float>(),
      dk.data_ptr<float>(), int(B * H), int(N), int(D), float(scale), c10::cuda::getCurrentCUDAStream()));
  return {dq, dk};
}

at::Tensor lse_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double scale, int64_t /*block_rows*/) {
  check(q_in, "q");
  check(k_in, "k");
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), D = q.size(3);
  auto lse = at::empty({B, H, N}, q.options());
  check_launch(gnr_fast_native::cuda::attention_lse(q.data_ptr<float>(), k.data_ptr<float>(), lse.data_ptr<float>(),
                                                    int(B * H), int(N), int(L), int(D), float(scale),
                                                    c10::cuda::getCurrentCUDAStream()));
  return lse;
}

}  // namespace

TORCH_LIBRARY_IMPL(gnr_fast_native, CUDA, m) {
  m.impl("attn_map_energy_fwd", &fwd_cuda);
  m.impl("attn_map_energy_bwd", &bwd_cuda);
  m.impl("attention_lse", &lse_cuda);
}
