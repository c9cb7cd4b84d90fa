// CPU kernels for the self-attention-map L2 energy (DESIGN.md §4, §8) and the per-row
// log-sum-exp of attention scores. Registered as torch ops in csrc/torch_bindings.cpp.
//
// For one (batch, head) with current-pass q, k and source-pass q_ref, k_ref, lse_ref ([N, D]):
//
//   A     = softmax(scale · q kᵀ)                 A_ref = exp(scale · q_ref k_refᵀ − lse_ref)
//   row_sq_i  = Σ_j (A − A_ref)²_ij               row_dot_i = Σ_j A_ij (A − A_ref)_ij   (= D_i)
//   P_ij      = A_ij ((A − A_ref)_ij − D_i)
//   dq_sum_i  = Σ_j P_ij k_j                      dk_sum_j  = Σ_i P_ij q_i
//
// ∂(Σ_i row_sq_i)/∂q = 2·scale·dq_sum and likewise for k: the Python wrapper
// (gnr_fast/ops/native.py) applies 2·scale·g / (B·H·N·N) and the dtype. Everything here is float32.
//
// Work split: rows are processed in blocks of R rows; per block two [R, N] score tiles live in a
// per-thread scratch buffer that stays in cache. The four products per block (q kᵀ, q_ref k_refᵀ,
// P k, Pᵀ q) go to BLAS through at::addmm_out; everything between them is one fused elementwise
// sweep per row (3–4 passes over a cached row, two exps per entry). at::parallel_for (OpenMP)
// runs over (batch·head, row-group) work items; when there are fewer batch·heads than threads,
// rows of one head are split into groups whose dk partial sums are reduced afterwards (a fixed
// split, so results do not depend on scheduling).

#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace gnr_fast_native {
namespace {

// exp(x) for float32, branch-free so loops calling it vectorise (Cephes expf: range reduction
// x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial; max relative error ~2 ulp on [-87, 88]).
// Arguments below -87 give ~2^-126 instead of 0: attention probabilities that small do not
// change a float32 sum of N ≤ 2^20 terms.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return y * two_n;
}

// One row of current scores s (length n): overwrites s with exp(s − max) and returns
// 1 / Σ_j exp(s_j − max); A = s · that factor (applied by diff_row, saving a pass).
float exp_row(float* __restrict s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_f32(s[j] - m);
    s[j] = e;
    sum += e;
  }
  return 1.0f / sum;
}

// Log-sum-exp of one row of scores (s is left unchanged).
float lse_row(const float* __restrict s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_f32(s[j] - m);
  return m + std::log(sum);
}

struct RowStats {
  float sq;
  float dot;
};

// One row: on entry a = exp(s − max) (from exp_row, with inv = its normaliser) and t = source
// scores; on exit a = A and, when `want_p`, t = P, with D_i = `given_dot` when it is not NaN
// (recomputing backward) and the row's own dot otherwise (fused forward). Returns the row stats.
RowStats diff_row(float* __restrict a, float* __restrict t, float inv, float lse_ref, int64_t n, bool want_p,
                  float given_dot) {
  float sq = 0.0f, dot = 0.0f;
  if (want_p && !std::isnan(given_dot)) {
#pragma omp simd reduction(+ : sq, dot)
    for (int64_t j = 0; j < n; ++j) {
      const float p = a[j] * inv;
      const float d = p - exp_f32(t[j] - lse_ref);
      sq += d * d;
      dot += p * d;
      t[j] = p * (d - given_dot);
    }
    return {sq, dot};
  }
#pragma omp simd reduction(+ : sq, dot)
  for (int64_t j = 0; j < n; ++j) {
    const float p = a[j] * inv;
    const float d = p - exp_f32(t[j] - lse_ref);
    sq += d * d;
    dot += p * d;
    a[j] = p;
    t[j] = p * d;
  }
  if (want_p) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) t[j] -= dot * a[j];
  }
  return {sq, dot};
}

// Work items (of `cost` multiply-adds each) per at::parallel_for task: small problems run on one
// thread instead of paying an OpenMP fork/join (and a wait for a descheduled thread) per call.
int64_t grain_for(int64_t cost) {
  constexpr int64_t kMinTaskCost = int64_t{1} << 22;
  return std::max<int64_t>(1, kMinTaskCost / std::max<int64_t>(cost, 1));
}

int64_t resolve_block_rows(int64_t block_rows, int64_t n_keys) {
  if (block_rows > 0) return block_rows;
  // Two [R, N] float32 tiles of about 256 KiB each (L2-resident), 16–128 rows.
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(n_keys, 1), 16, 128);
}

at::Tensor blob(float* data, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::from_blob(data, sizes, strides, at::TensorOptions().dtype(at::kFloat));
}

void check_qk(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be [B, H, N, D], got ", t.sizes());
}

// The shared sweep of the forward (with_grad: fused gradient) and the backward (given row_dot).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sweep(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_ref_in, const at::Tensor& k_ref_in,
    const at::Tensor& lse_ref_in, double scale_d, bool want_energy, bool want_grad,
    const c10::optional<at::Tensor>& row_dot_in, int64_t block_rows) {
  check_qk(q_in, "q");
  check_qk(k_in, "k");
  check_qk(q_ref_in, "q_ref");
  check_qk(k_ref_in, "k_ref");
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && q_ref_in.sizes() == q_in.sizes() && k_ref_in.sizes() == q_in.sizes(),
              "q, k, q_ref, k_ref must share one [B, H, N, D] shape");
  TORCH_CHECK(lse_ref_in.scalar_type() == at::kFloat && lse_ref_in.sizes() == q_in.sizes().slice(0, 3),
              "lse_ref must be float32 [B, H, N]");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), q_ref = q_ref_in.contiguous(),
             k_ref = k_ref_in.contiguous(), lse_ref = lse_ref_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), BH = B * H;
  const float scale = static_cast<float>(scale_d);
  const int64_t R = std::min(resolve_block_rows(block_rows, N), N);
  const int64_t blocks = (N + R - 1) / R;
  const auto opts = q.options();

  at::Tensor row_sq = at::empty({B, H, N}, opts);
  at::Tensor row_dot = at::empty({B, H, N}, opts);
  at::Tensor row_dot_given;
  if (row_dot_in.has_value()) {
    TORCH_CHECK(row_dot_in->scalar_type() == at::kFloat && row_dot_in->sizes() == row_sq.sizes(),
                "row_dot must be float32 [B, H, N]");
    row_dot_given = row_dot_in->contiguous();
  }
  // Gradient sums in the transposed [D, N] layout per head (the BLAS-friendly output shape).
  const int64_t threads = at::get_num_threads();
  const int64_t groups = (!want_grad || BH >= threads) ? 1 : std::min<int64_t>(blocks, (threads + BH - 1) / BH);
  at::Tensor dq_t = want_grad ? at::empty({BH, D, N}, opts) : at::Tensor();
  at::Tensor dk_parts = want_grad ? at::zeros({groups, BH, D, N}, opts) : at::Tensor();

  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* qrp = q_ref.data_ptr<float>();
  const float* krp = k_ref.data_ptr<float>();
  const float* lrp = lse_ref.data_ptr<float>();
  const float* given = row_dot_in.has_value() ? row_dot_given.data_ptr<float>() : nullptr;
  float* sqp = row_sq.data_ptr<float>();
  float* dotp = row_dot.data_ptr<float>();

  const int64_t item_cost = (N / groups + 1) * N * (2 * D + 16) * (want_grad ? 2 : 1);
  at::parallel_for(0, BH * groups, grain_for(item_cost), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(2 * R * N));
    float* S = scratch.data();      // [R, N] current scores, then A
    float* T = S + R * N;           // [R, N] source scores, then P
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / groups, group = item % groups;
      const int64_t first = blocks * group / groups, last = blocks * (group + 1) / groups;
      const int64_t off = bh * N * D;
      // [N, D] views of this head; kᵀ and k_refᵀ as [D, N].
      auto keys_t = blob(const_cast<float*>(kp + off), {D, N}, {1, D});
      auto keys_ref_t = blob(const_cast<float*>(krp + off), {D, N}, {1, D});
      at::Tensor dk_part = want_grad ? dk_parts[group][bh] : at::Tensor();  // [D, N]
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, N - r0);
        auto s = blob(S, {rows, N}, {N, 1});
        auto t = blob(T, {rows, N}, {N, 1});
        auto q_rows = blob(const_cast<float*>(qp + off + r0 * D), {rows, D}, {D, 1});
        auto q_ref_rows = blob(const_cast<float*>(qrp + off + r0 * D), {rows, D}, {D, 1});
        at::addmm_out(s, s, q_rows, keys_t, /*beta=*/0, /*alpha=*/scale);
        at::addmm_out(t, t, q_ref_rows, keys_ref_t, 0, scale);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = bh * N + r0 + i;
          const float inv = exp_row(S + i * N, N);
          const float d_given = given ? given[row] : std::numeric_limits<float>::quiet_NaN();
          const RowStats st = diff_row(S + i * N, T + i * N, inv, lrp[row], N, want_grad, d_given);
          sqp[row] = st.sq;
          dotp[row] = st.dot;
        }
        if (want_grad) {
          // dq_t[:, r0:r0+rows] = kᵀ Pᵀ ([D, N] · [N, rows]); dk_t += q_rowsᵀ P ([D, rows] · [rows, N]).
          auto dq_cols = dq_t[bh].narrow(1, r0, rows);
          at::addmm_out(dq_cols, dq_cols, keys_t, t.t(), 0, 1);
          at::addmm_out(dk_part, dk_part, q_rows.t(), t, 1, 1);
        }
      }
    }
  });
  (void)want_energy;
  if (!want_grad) {
    return {row_sq, row_dot, at::empty({0}, opts), at::empty({0}, opts)};
  }
  at::Tensor dk_t = groups == 1 ? dk_parts[0] : dk_parts.sum(0);
  auto dq = dq_t.transpose(1, 2).contiguous().view({B, H, N, D});
  auto dk = dk_t.transpose(1, 2).contiguous().view({B, H, N, D});
  return {row_sq, row_dot, dq, dk};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attn_map_energy_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, double scale, bool with_grad, int64_t block_rows) {
  return sweep(q, k, q_ref, k_ref, lse_ref, scale, true, with_grad, c10::nullopt, block_rows);
}

std::tuple<at::Tensor, at::Tensor> attn_map_energy_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, const at::Tensor& row_dot, double scale, int64_t block_rows) {
  auto out = sweep(q, k, q_ref, k_ref, lse_ref, scale, false, true, row_dot, block_rows);
  return {std::get<2>(out), std::get<3>(out)};
}

at::Tensor attention_lse_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale_d, int64_t block_rows) {
  check_qk(q_in, "q");
  check_qk(k_in, "k");
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) && q_in.size(3) == k_in.size(3),
              "k must match q in B, H and D");
  const auto q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2), D = q.size(3);
  const float scale = static_cast<float>(scale_d);
  const int64_t R = std::min(resolve_block_rows(block_rows, L), N);
  const int64_t blocks = (N + R - 1) / R;
  at::Tensor lse = at::empty({B, H, N}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, grain_for(R * L * (D + 8)), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(R * L));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, r0 = (item % blocks) * R, rows = std::min(R, N - r0);
      auto keys_t = blob(const_cast<float*>(kp + bh * L * D), {D, L}, {1, D});
      auto q_rows = blob(const_cast<float*>(qp + bh * N * D + r0 * D), {rows, D}, {D, 1});
      auto s = blob(scratch.data(), {rows, L}, {L, 1});
      at::addmm_out(s, s, q_rows, keys_t, 0, scale);
      for (int64_t i = 0; i < rows; ++i) lp[bh * N + r0 + i] = lse_row(scratch.data() + i * L, L);
    }
  });
  return lse;
}

}  // namespace gnr_fast_native
