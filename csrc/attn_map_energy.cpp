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
// Energy kernels (fused_tile): per head, keys are copied once into transposed, kLanes-padded
// buffers; query rows are processed in register tiles of 8 rows × kLanes keys (GCC/Clang vector
// extensions: one register per vector, 16 lanes with AVX-512, 8 with AVX2), three sweeps over the keys per tile —
// scores and row max; exp, A_ref, the difference and the row statistics; P and dk += Pᵀ q —
// then dq = P k in head-dim chunks of kDqChunk vectors × 8 rows (dq_chunk), without BLAS and without
// any [N, N] buffer (two [32, N] tiles of scratch).
// at::parallel_for (OpenMP) runs over (batch·head, row-group) work items; when there are fewer
// batch·heads than threads, rows of one head are split into groups whose dk partial sums are
// reduced afterwards (a fixed split, so results do not depend on scheduling). attention_lse uses
// BLAS (at::addmm_out) per row block plus a vectorised row pass.

#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
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

// ---- Fused register-tiled sweep (no BLAS): GCC/Clang vector extensions, kLanes float lanes -----
// One vector is one machine register of the target: 16 lanes (a zmm) with AVX-512, 8 lanes (a ymm)
// otherwise. A 16-lane vector on an AVX2 target is two ymm registers, so the 8-row tiles below
// need 16 accumulators + operands in AVX2's 16 ymm registers and spill on every multiply-add:
// the AVX-512 geometry built for AVX2 ran 3-7x slower than the chunked torch path (measured on a
// Zen 3 core, benchmarks/README.md).

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int64_t kDqChunk = 3;  // dq: 8 rows x 3 vectors = 24 accumulators + 3 keys of 32 zmm
#else
constexpr int64_t kLanes = 8;
constexpr int64_t kDqChunk = 1;  // dq: 8 rows x 1 vector = 8 accumulators + 1 key of 16 ymm
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr int64_t kRows = 8;   // query rows per register tile
constexpr int64_t kSuper = 4;  // register tiles per key sweep (rows per fused_tile call: 32)

inline vf splat(float x) { return vf{} + x; }
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp_f32 on kLanes lanes (same polynomial; round-to-nearest by the 1.5·2^23 trick).
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf y = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// Per-thread buffers of one head: transposed, key-padded copies and the row tiles.
struct Scratch {
  int64_t Np, Dp, ld;  // ld: row stride of a and t, padded off a power of two
  // [Np/L, D, L] keys / source keys (L = kLanes), transposed per block of L keys (one block's D×L slice
  // is contiguous: a [D, Np] layout puts its rows a power-of-two stride apart, into one L1 set)
  std::vector<float> kT, krT;
  std::vector<float> kp;       // [Np, Dp] keys, row-major, head dim zero-padded to Dp
  std::vector<float> a, t;     // [kSuper·kRows, Np]: exp / A, then A ⊙ (A − A_ref) / P
  std::vector<float> dkT;      // [Np/L, D, L] dk partial sums, layout of kT
  Scratch(int64_t N, int64_t D)
      : Np((N + kLanes - 1) / kLanes * kLanes), Dp((D + kLanes - 1) / kLanes * kLanes), ld(Np + kLanes),
        kT(D * Np), krT(D * Np), kp(Np * Dp), a(kSuper * kRows * (Np + kLanes)), t(kSuper * kRows * (Np + kLanes)), dkT(D * Np) {}
};

// dq rows r0 … r0+rows−1: dq_r = Σ_j P_rj k_j with P in s.t and k in s.kp ([Np, Dp]). The head
// dim is swept in chunks of W ≤ kDqChunk vectors (48 floats with AVX-512); for each chunk, 8 rows
// at a time keep 8·W accumulators plus W key vectors in registers while j runs over all keys.
// So each key chunk is read once per 8 rows (4 times per 32-row super-tile) whatever D is —
// a whole-row register tile at D = 160 held only 2 rows and re-read all keys every 2 rows.
// The sum over j runs in key order.

template <int W>
void dq_chunk(const Scratch& s, int64_t N, int64_t c0, int64_t row0, float* out /* [kRows, Dp] */) {
  vf acc[kRows][W] = {};
  const float* kbase = &s.kp[c0 * kLanes];
  const float* pbase = &s.t[row0 * s.ld];
  for (int64_t j = 0; j < N; ++j) {
    vf kv[W];
    for (int c = 0; c < W; ++c) kv[c] = loadv(kbase + j * s.Dp + c * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const float pj = pbase[r * s.ld + j];  // rows past the tile's valid rows hold P = 0
      for (int c = 0; c < W; ++c) acc[r][c] += pj * kv[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < W; ++c) storev(out + r * s.Dp + (c0 + c) * kLanes, acc[r][c]);
}

void dq_rows_dispatch(const Scratch& s, int64_t N, int64_t D, int64_t r0, int64_t rows, float* dq) {
  const int64_t DV = s.Dp / kLanes, tiles = (rows + kRows - 1) / kRows;
  std::vector<float> out(static_cast<size_t>(kRows * s.Dp));
  for (int64_t tt = 0; tt < tiles; ++tt) {
    for (int64_t c0 = 0; c0 < DV; c0 += kDqChunk) {
      switch (std::min(kDqChunk, DV - c0)) {
        case 3: dq_chunk<3>(s, N, c0, tt * kRows, out.data()); break;
        case 2: dq_chunk<2>(s, N, c0, tt * kRows, out.data()); break;
        default: dq_chunk<1>(s, N, c0, tt * kRows, out.data()); break;
      }
    }
    const int64_t valid = std::min(kRows, rows - tt * kRows);
    for (int64_t r = 0; r < valid; ++r)
      std::memcpy(dq + (r0 + tt * kRows + r) * D, out.data() + r * s.Dp, sizeof(float) * D);
  }
}

// One super-tile of up to kSuper·kRows query rows [r0, r0 + rows) of one head (q/qr: its [N, D]
// rows). Each key block (kLanes keys) is used by all kSuper register tiles of 8 rows while its kᵀ
// and dkᵀ slices are in L1. Writes row_sq/row_dot; with want_grad adds Pᵀ q into s.dkT and
// writes P k into dq.
void fused_tile(const float* q, const float* qr, const float* lse_ref, Scratch& s, int64_t N, int64_t D,
                int64_t r0, int64_t rows, float scale, bool want_grad, const float* given_dot, float* row_sq,
                float* row_dot, float* dq) {
  constexpr int64_t SR = kSuper * kRows;
  const int64_t Np = s.Np, blocks = Np / kLanes;
  const int64_t tiles = (rows + kRows - 1) / kRows;
  std::vector<float> qt(SR * D, 0.0f), qrt(SR * D, 0.0f);  // rows past `rows` stay 0
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      qt[r * D + d] = q[(r0 + r) * D + d];
      qrt[r * D + d] = qr[(r0 + r) * D + d];
    }
  vf lane_idx;
  for (int64_t l = 0; l < kLanes; ++l) lane_idx[l] = float(l);
  const vf tail_valid = lane_idx < float(N - (blocks - 1) * kLanes) ? splat(1.0f) : splat(0.0f);
  const vf neg_inf = splat(-std::numeric_limits<float>::infinity());

  // Pass 1: current scores into s.a and their row max.
  vf vmax[SR];
  for (auto& m : vmax) m = neg_inf;
  for (int64_t jb = 0; jb < blocks; ++jb) {
    const bool tail = jb == blocks - 1;
    for (int64_t tt = 0; tt < tiles; ++tt) {
      const float* qtile = &qt[tt * kRows * D];
      vf acc[kRows] = {};
      for (int64_t d = 0; d < D; ++d) {
        const vf kv = loadv(&s.kT[(jb * D + d) * kLanes]);
        for (int64_t r = 0; r < kRows; ++r) acc[r] += qtile[r * D + d] * kv;
      }
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        acc[r] *= scale;
        if (tail) acc[r] = tail_valid > 0.0f ? acc[r] : neg_inf;
        vmax[row] = acc[r] > vmax[row] ? acc[r] : vmax[row];
        storev(&s.a[row * s.ld + jb * kLanes], acc[r]);
      }
    }
  }
  float inv[SR], lse_ref_r[SR];
  for (int64_t r = 0; r < tiles * kRows; ++r) {
    const float m = hmax(vmax[r]);
    vf sum = {};
    for (int64_t jb = 0; jb < blocks; ++jb) {
      vf e = vexp(loadv(&s.a[r * s.ld + jb * kLanes]) - m);
      if (jb == blocks - 1) e *= tail_valid;
      storev(&s.a[r * s.ld + jb * kLanes], e);
      sum += e;
    }
    inv[r] = 1.0f / hsum(sum);
    lse_ref_r[r] = r < rows ? lse_ref[r0 + r] : 0.0f;
  }

  // Pass 2: source probabilities, the difference and the row statistics.
  vf sq[SR] = {}, dot[SR] = {};
  const bool use_given = given_dot != nullptr;
  for (int64_t jb = 0; jb < blocks; ++jb) {
    for (int64_t tt = 0; tt < tiles; ++tt) {
      const float* qtile = &qrt[tt * kRows * D];
      vf acc[kRows] = {};
      for (int64_t d = 0; d < D; ++d) {
        const vf kv = loadv(&s.krT[(jb * D + d) * kLanes]);
        for (int64_t r = 0; r < kRows; ++r) acc[r] += qtile[r * D + d] * kv;
      }
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        vf ar = vexp(acc[r] * scale - lse_ref_r[row]);
        if (jb == blocks - 1) ar *= tail_valid;
        const vf a = loadv(&s.a[row * s.ld + jb * kLanes]) * inv[row];
        const vf diff = a - ar;
        sq[row] += diff * diff;
        dot[row] += a * diff;
        storev(&s.a[row * s.ld + jb * kLanes], a);
        const float dg = use_given && row < rows ? given_dot[r0 + row] : 0.0f;
        storev(&s.t[row * s.ld + jb * kLanes], use_given ? a * (diff - dg) : a * diff);
      }
    }
  }
  float dots[SR];
  for (int64_t r = 0; r < tiles * kRows; ++r) {
    dots[r] = hsum(dot[r]);
    if (r < rows) {
      row_sq[r0 + r] = hsum(sq[r]);
      row_dot[r0 + r] = dots[r];
    }
  }
  if (!want_grad) return;

  // Pass 3: P (rows past `rows` zeroed), dk += Pᵀ q, dq = P k.
  for (int64_t jb = 0; jb < blocks; ++jb) {
    for (int64_t tt = 0; tt < tiles; ++tt) {
      vf p[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        const vf tv = loadv(&s.t[row * s.ld + jb * kLanes]);
        p[r] = row >= rows ? vf{} : use_given ? tv : tv - dots[row] * loadv(&s.a[row * s.ld + jb * kLanes]);
        storev(&s.t[row * s.ld + jb * kLanes], p[r]);
      }
      const float* qtile = &qt[tt * kRows * D];
      for (int64_t d = 0; d < D; ++d) {
        vf acc = loadv(&s.dkT[(jb * D + d) * kLanes]);
        for (int64_t r = 0; r < kRows; ++r) acc += p[r] * qtile[r * D + d];
        storev(&s.dkT[(jb * D + d) * kLanes], acc);
      }
    }
  }
  dq_rows_dispatch(s, N, D, r0, rows, dq);
}

// The shared sweep of the forward (with_grad: fused gradient) and the backward (given row_dot).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sweep(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_ref_in, const at::Tensor& k_ref_in,
    const at::Tensor& lse_ref_in, double scale_d, bool want_grad, const c10::optional<at::Tensor>& row_dot_in) {
  check_qk(q_in, "q");
  check_qk(k_in, "k");
  check_qk(q_ref_in, "q_ref");
  check_qk(k_ref_in, "k_ref");
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && q_ref_in.sizes() == q_in.sizes() && k_ref_in.sizes() == q_in.sizes(),
              "q, k, q_ref, k_ref must share one [B, H, N, D] shape");
  TORCH_CHECK(lse_ref_in.scalar_type() == at::kFloat && lse_ref_in.sizes() == q_in.sizes().slice(0, 3),
              "lse_ref must be float32 [B, H, N]");
  TORCH_CHECK(q_in.size(3) <= 256, "head dim must be at most 256, got ", q_in.size(3));
  const auto q = q_in.contiguous(), k = k_in.contiguous(), q_ref = q_ref_in.contiguous(),
             k_ref = k_ref_in.contiguous(), lse_ref = lse_ref_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), BH = B * H;
  const float scale = static_cast<float>(scale_d);
  const int64_t tiles = (N + kSuper * kRows - 1) / (kSuper * kRows);
  const auto opts = q.options();

  at::Tensor row_sq = at::empty({B, H, N}, opts);
  at::Tensor row_dot = at::empty({B, H, N}, opts);
  at::Tensor row_dot_given;
  if (row_dot_in.has_value()) {
    TORCH_CHECK(row_dot_in->scalar_type() == at::kFloat && row_dot_in->sizes() == row_sq.sizes(),
                "row_dot must be float32 [B, H, N]");
    row_dot_given = row_dot_in->contiguous();
  }
  const int64_t threads = at::get_num_threads();
  const int64_t groups = (!want_grad || BH >= threads) ? 1 : std::min<int64_t>(tiles, (threads + BH - 1) / BH);
  at::Tensor dq = want_grad ? at::empty({B, H, N, D}, opts) : at::empty({0}, opts);
  at::Tensor dk_parts = want_grad ? at::zeros({groups, BH, N, D}, opts) : at::Tensor();

  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* qrp = q_ref.data_ptr<float>();
  const float* krp = k_ref.data_ptr<float>();
  const float* lrp = lse_ref.data_ptr<float>();
  const float* given = row_dot_in.has_value() ? row_dot_given.data_ptr<float>() : nullptr;
  float* sqp = row_sq.data_ptr<float>();
  float* dotp = row_dot.data_ptr<float>();
  float* dqp = want_grad ? dq.data_ptr<float>() : nullptr;
  float* dkp = want_grad ? dk_parts.data_ptr<float>() : nullptr;

  const int64_t item_cost = (N / groups + 1) * N * (2 * D + 16) * (want_grad ? 2 : 1);
  at::parallel_for(0, BH * groups, grain_for(item_cost), [&](int64_t begin, int64_t end) {
    Scratch s(N, D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / groups, group = item % groups;
      const int64_t first = tiles * group / groups, last = tiles * (group + 1) / groups;
      const int64_t off = bh * N * D;
      std::fill(s.kT.begin(), s.kT.end(), 0.0f);
      std::fill(s.krT.begin(), s.krT.end(), 0.0f);
      std::fill(s.kp.begin(), s.kp.end(), 0.0f);
      for (int64_t j = 0; j < N; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t blocked = ((j / kLanes) * D + d) * kLanes + j % kLanes;
          s.kT[blocked] = kp[off + j * D + d];
          s.krT[blocked] = krp[off + j * D + d];
          s.kp[j * s.Dp + d] = kp[off + j * D + d];
        }
      if (want_grad) std::fill(s.dkT.begin(), s.dkT.end(), 0.0f);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t r0 = tile * kSuper * kRows, rows = std::min(kSuper * kRows, N - r0);
        fused_tile(qp + off, qrp + off, lrp + bh * N, s, N, D, r0, rows, scale, want_grad,
                   given ? given + bh * N : nullptr, sqp + bh * N, dotp + bh * N, dqp ? dqp + off : nullptr);
      }
      if (want_grad) {
        float* dk_out = dkp + (group * BH + bh) * N * D;
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) dk_out[j * D + d] = s.dkT[((j / kLanes) * D + d) * kLanes + j % kLanes];
      }
    }
  });
  if (!want_grad) return {row_sq, row_dot, dq, at::empty({0}, opts)};
  at::Tensor dk = (groups == 1 ? dk_parts[0] : dk_parts.sum(0)).view({B, H, N, D});
  return {row_sq, row_dot, dq, dk};
}

}  // namespace

int64_t vector_lanes() { return kLanes; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attn_map_energy_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, double scale, bool with_grad, int64_t block_rows) {
  (void)block_rows;  // the fused kernel tiles by kRows; kept in the schema for API stability
  return sweep(q, k, q_ref, k_ref, lse_ref, scale, with_grad, c10::nullopt);
}

std::tuple<at::Tensor, at::Tensor> attn_map_energy_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_ref, const at::Tensor& k_ref,
    const at::Tensor& lse_ref, const at::Tensor& row_dot, double scale, int64_t block_rows) {
  (void)block_rows;
  auto out = sweep(q, k, q_ref, k_ref, lse_ref, scale, true, row_dot);
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
