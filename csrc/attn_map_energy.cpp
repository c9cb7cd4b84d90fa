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
// buffers; query rows are processed in register tiles of kRows rows × kKeyVecs vectors of keys
// (GCC/Clang vector extensions: one register per vector; AVX-512: 8 rows × 1 vector of 16 lanes,
// otherwise 6 rows × 2 vectors of 8 lanes), three sweeps over the keys per super-tile of kSuper
// register tiles — scores and row max; 2^x, A_ref, the difference and the row statistics; P and
// dk += Pᵀ q — then dq = P k in head-dim chunks of kDqChunk vectors × kRows rows (dq_chunk),
// without BLAS and without any [N, N] buffer (two [kSuper·kRows, N] tiles of scratch).
// at::parallel_for (OpenMP: the library is compiled with -fopenmp, CMakeLists.txt) runs over
// (batch·head, row-group) work items on torch's intra-op threads; when there are fewer
// batch·heads than threads, rows of one head are split into groups whose dk partial sums are
// reduced afterwards (a fixed split, so results do not depend on scheduling). attention_lse uses
// BLAS (at::addmm_out) per row block plus a vectorised row pass.

#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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
constexpr int64_t kRows = 8;     // query rows per register tile: 8 rows x 1 key vector = 8 accumulators
constexpr int64_t kKeyVecs = 1;  // key vectors per register tile
constexpr int64_t kDqChunk = 3;  // dq: 8 rows x 3 vectors = 24 accumulators + 3 keys of 32 zmm
#else
// 6 rows x 2 vectors = 12 accumulators + 2 operand vectors + 1 broadcast of AVX2's 16 ymm registers:
// 12 independent multiply-add chains cover the FMA latency of two pipes with room to spare, where
// 8 rows x 1 vector left none (in isolation on a Zen 3 core, the score loop at D = 40 ran at 46 vs
// 39 G FMA/s and the dq loop at 46 vs 29).
constexpr int64_t kLanes = 8;
constexpr int64_t kRows = 6;
constexpr int64_t kKeyVecs = 2;
constexpr int64_t kDqChunk = 2;  // dq: 6 rows x 2 vectors = 12 accumulators + 2 keys
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr int64_t kSuper = 4;  // register tiles per key sweep (rows per fused_tile call: 4·kRows)

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

// Lane-wise min/max as one instruction each: the vector-extension form `a < b ? b : a` compiles to a
// compare and a blend.
#if defined(__AVX512F__)
// (the all-lanes maskz forms: GCC 12 warns about _mm512_max_ps's undefined pass-through operand)
inline vf vmaxf(vf a, vf b) { return reinterpret_cast<vf>(_mm512_maskz_max_ps(0xFFFF, reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b))); }
inline vf vminf(vf a, vf b) { return reinterpret_cast<vf>(_mm512_maskz_min_ps(0xFFFF, reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b))); }
#elif defined(__AVX__)
inline vf vmaxf(vf a, vf b) { return reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
inline vf vminf(vf a, vf b) { return reinterpret_cast<vf>(_mm256_min_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
#else
inline vf vmaxf(vf a, vf b) { return a < b ? b : a; }
inline vf vminf(vf a, vf b) { return a < b ? a : b; }
#endif

// 2^x on kLanes lanes: x = n + f with n = round(x), |f| ≤ 1/2; 2^f by a degree-5 polynomial (a
// relative-error minimax fit on [-1/2, 1/2] made for this kernel: max relative error 2.3e-7 when
// evaluated in float32, about 2 ulp); 2^n added to the exponent bits. The kernels call it with
// log2-scaled scores minus their row max or log-sum-exp, so x ≤ 0 up to rounding; x is clamped to
// [-125, 127], so anything below gives ~2^-125 instead of 0: attention probabilities that small do
// not change a float32 sum of N ≤ 2^20 terms. About half the instructions of the natural-log exp
// it replaced (no ln2 range reduction, no final multiply, min/max instead of compare + blend): on a
// Zen 3 core that exp took 40 % of a D = 8 forward, and this one made the fused call 1.10-1.24x faster.
inline vf vexp2(vf x) {
  x = vminf(vmaxf(x, splat(-125.0f)), splat(127.0f));
  const vf n = (x + 12582912.0f) - 12582912.0f;  // round to nearest by the 1.5·2^23 trick
  const vf f = x - n;
  vf p = splat(1.327647129073739e-3f);
  p = p * f + 9.675540961325169e-3f;
  p = p * f + 5.550713092088699e-2f;
  p = p * f + 2.4022120237350464e-1f;
  p = p * f + 6.931469440460205e-1f;
  p = p * f + 1.0000001192092896f;
  vi bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(n, vi) << 23;
  vf out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
constexpr float kLog2e = 1.44269504088896341f;

// Per-thread buffers of one head, carved from one 4 KiB-aligned allocation per parallel task (the
// query tiles and the dq tile were allocated per super-tile before). Each buffer starts at its own
// offset within a 4 KiB page (kStagger), so a load from one buffer never shares its page offset with
// a recent store to another at the same index (4K aliasing, which stalls the load): separately
// allocated, a and t were both mmap'd and page-aligned. A/B on a Zen 3 core: 1.01-1.07x, within
// that host's noise.
class Scratch {
 public:
  int64_t Np, Dp, ld;  // ld: row stride of a and t, padded off a power of two
  // [Np/L, D, L] keys / source keys (L = kLanes), transposed per block of L keys (one block's D×L slice
  // is contiguous: a [D, Np] layout puts its rows a power-of-two stride apart, into one L1 set)
  float* kT;
  float* krT;
  float* kp;   // [Np, Dp] keys, row-major, head dim zero-padded to Dp
  float* a;    // [kSuper·kRows, ld]: exp / A
  float* t;    // [kSuper·kRows, ld]: A ⊙ (A − A_ref), then P
  float* dkT;  // [Np/L, D, L] dk partial sums, layout of kT
  float* qt;   // [kSuper·kRows, D] the super-tile's query rows / source query rows
  float* qrt;
  float* dq_out;  // [kRows, Dp] one register tile's dq rows
  int64_t keys_size() const { return D_ * Np; }

  Scratch(int64_t N, int64_t D)
      : Np((N + kLanes - 1) / kLanes * kLanes), Dp((D + kLanes - 1) / kLanes * kLanes), ld(Np + kLanes), D_(D) {
    const int64_t rows = kSuper * kRows;
    const int64_t sizes[] = {D * Np, D * Np, Np * Dp, rows * ld, rows * ld, D * Np, rows * D, rows * D, kRows * Dp};
    float** slots[] = {&kT, &krT, &kp, &a, &t, &dkT, &qt, &qrt, &dq_out};
    int64_t offsets[9], total = 0;
    for (int i = 0; i < 9; ++i) {
      total = (total + kPage - 1) / kPage * kPage + kStagger[i];
      offsets[i] = total;
      total += sizes[i];
    }
    arena_.reset(static_cast<float*>(std::aligned_alloc(kPage * sizeof(float), (total + kPage - 1) / kPage * kPage * sizeof(float))));
    TORCH_CHECK(arena_ != nullptr, "attn_map_energy: out of memory for the per-thread scratch (", total * 4, " bytes)");
    for (int i = 0; i < 9; ++i) *slots[i] = arena_.get() + offsets[i];
  }

 private:
  static constexpr int64_t kPage = 1024;  // floats per 4 KiB
  // Page offsets (floats) of kT, krT, kp, a, t, dkT, qt, qrt, dq_out. a and t are half a page apart:
  // their rows step by ld·4 ≡ 4·kLanes bytes (mod 4 KiB), so a super-tile's kSuper·kRows rows of
  // one span no more than half a page and never meet the other's.
  static constexpr int64_t kStagger[9] = {0, 0, 0, 0, 512, 256, 768, 896, 640};
  int64_t D_;
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> arena_;
};

// dq rows r0 … r0+rows−1: dq_r = Σ_j P_rj k_j with P in s.t and k in s.kp ([Np, Dp]). The head
// dim is swept in chunks of W ≤ kDqChunk vectors (48 floats with AVX-512); for each chunk, kRows
// rows at a time keep kRows·W accumulators plus W key vectors in registers while j runs over all
// keys. So each key chunk is read once per kRows rows (kSuper times per super-tile) whatever D is —
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
  float* out = s.dq_out;
  for (int64_t tt = 0; tt < tiles; ++tt) {
    for (int64_t c0 = 0; c0 < DV; c0 += kDqChunk) {
      switch (std::min(kDqChunk, DV - c0)) {
        case 3: dq_chunk<3>(s, N, c0, tt * kRows, out); break;
        case 2: dq_chunk<2>(s, N, c0, tt * kRows, out); break;
        default: dq_chunk<1>(s, N, c0, tt * kRows, out); break;
      }
    }
    const int64_t valid = std::min(kRows, rows - tt * kRows);
    for (int64_t r = 0; r < valid; ++r)
      std::memcpy(dq + (r0 + tt * kRows + r) * D, out + r * s.Dp, sizeof(float) * D);
  }
}

// Scores of one register tile against C ≤ kKeyVecs consecutive key blocks: acc[r][c] = Σ_d
// qtile[r, d] · (block c of kT_blocks)[d] (kT_blocks: the kᵀ layout of Scratch, from the first block).
template <int C>
inline void tile_scores(const float* qtile, const float* kT_blocks, int64_t D, vf (&acc)[kRows][kKeyVecs]) {
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf kv[C];
    for (int c = 0; c < C; ++c) kv[c] = loadv(kT_blocks + (c * D + d) * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const float qv = qtile[r * D + d];
      for (int c = 0; c < C; ++c) acc[r][c] += qv * kv[c];
    }
  }
}

// tile_scores for nc blocks (kKeyVecs, or fewer in the last group of a row).
inline void key_group_scores(int nc, const float* qtile, const float* kT_blocks, int64_t D,
                             vf (&acc)[kRows][kKeyVecs]) {
  if (nc == kKeyVecs)
    tile_scores<kKeyVecs>(qtile, kT_blocks, D, acc);
  else
    tile_scores<1>(qtile, kT_blocks, D, acc);
}

// dkᵀ += Pᵀ q for one register tile: for C ≤ kKeyVecs key blocks (dkT_blocks: the dkᵀ layout of
// Scratch, from the first block) and every head dim d, Σ_r p[r][c] · qtile[r, d] in row order.
template <int C>
inline void tile_dk(const vf (&p)[kRows][kKeyVecs], const float* qtile, float* dkT_blocks, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    vf acc[C];
    for (int c = 0; c < C; ++c) acc[c] = loadv(dkT_blocks + (c * D + d) * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const float qv = qtile[r * D + d];
      for (int c = 0; c < C; ++c) acc[c] += p[r][c] * qv;
    }
    for (int c = 0; c < C; ++c) storev(dkT_blocks + (c * D + d) * kLanes, acc[c]);
  }
}

// One super-tile of up to kSuper·kRows query rows [r0, r0 + rows) of one head (q/qr: its [N, D]
// rows). Each group of kKeyVecs key blocks (kLanes keys each) is used by all kSuper register tiles
// of kRows rows while its kᵀ and dkᵀ slices are in L1. Writes row_sq/row_dot; with want_grad adds Pᵀ q into s.dkT and
// writes P k into dq.
void fused_tile(const float* q, const float* qr, const float* lse_ref, Scratch& s, int64_t N, int64_t D,
                int64_t r0, int64_t rows, float scale, bool want_grad, const float* given_dot, float* row_sq,
                float* row_dot, float* dq) {
  constexpr int64_t SR = kSuper * kRows;
  const int64_t Np = s.Np, blocks = Np / kLanes;
  const int64_t tiles = (rows + kRows - 1) / kRows;
  float* qt = s.qt;
  float* qrt = s.qrt;
  std::fill(qt, qt + SR * D, 0.0f);  // rows past `rows` stay 0
  std::fill(qrt, qrt + SR * D, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      qt[r * D + d] = q[(r0 + r) * D + d];
      qrt[r * D + d] = qr[(r0 + r) * D + d];
    }
  vf lane_idx;
  for (int64_t l = 0; l < kLanes; ++l) lane_idx[l] = float(l);
  const vf tail_valid = lane_idx < float(N - (blocks - 1) * kLanes) ? splat(1.0f) : splat(0.0f);
  const vf neg_inf = splat(-std::numeric_limits<float>::infinity());

  // Scores are kept in log2 units (scale · log2 e) for vexp2.
  const float scale2 = scale * kLog2e;

  // Pass 1: current scores into s.a and their row max.
  vf vmax[SR];
  for (auto& m : vmax) m = neg_inf;
  for (int64_t jb = 0; jb < blocks; jb += kKeyVecs) {
    const int nc = static_cast<int>(std::min<int64_t>(kKeyVecs, blocks - jb));
    for (int64_t tt = 0; tt < tiles; ++tt) {
      vf acc[kRows][kKeyVecs];
      key_group_scores(nc, &qt[tt * kRows * D], &s.kT[jb * D * kLanes], D, acc);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        for (int c = 0; c < nc; ++c) {
          const int64_t b = jb + c;
          vf x = acc[r][c] * scale2;
          if (b == blocks - 1) x = tail_valid > 0.0f ? x : neg_inf;
          vmax[row] = x > vmax[row] ? x : vmax[row];
          storev(&s.a[row * s.ld + b * kLanes], x);
        }
      }
    }
  }
  float inv[SR], lse_ref_r[SR];
  for (int64_t r = 0; r < tiles * kRows; ++r) {
    const float m = hmax(vmax[r]);
    vf sum = {};
    for (int64_t jb = 0; jb < blocks; ++jb) {
      vf e = vexp2(loadv(&s.a[r * s.ld + jb * kLanes]) - m);
      if (jb == blocks - 1) e *= tail_valid;
      storev(&s.a[r * s.ld + jb * kLanes], e);
      sum += e;
    }
    inv[r] = 1.0f / hsum(sum);
    lse_ref_r[r] = r < rows ? lse_ref[r0 + r] * kLog2e : 0.0f;
  }

  // Pass 2: source probabilities, the difference and the row statistics.
  vf sq[SR] = {}, dot[SR] = {};
  const bool use_given = given_dot != nullptr;
  for (int64_t jb = 0; jb < blocks; jb += kKeyVecs) {
    const int nc = static_cast<int>(std::min<int64_t>(kKeyVecs, blocks - jb));
    for (int64_t tt = 0; tt < tiles; ++tt) {
      vf acc[kRows][kKeyVecs];
      key_group_scores(nc, &qrt[tt * kRows * D], &s.krT[jb * D * kLanes], D, acc);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        const float dg = use_given && row < rows ? given_dot[r0 + row] : 0.0f;
        for (int c = 0; c < nc; ++c) {
          const int64_t b = jb + c;
          vf ar = vexp2(acc[r][c] * scale2 - lse_ref_r[row]);
          if (b == blocks - 1) ar *= tail_valid;
          const vf a = loadv(&s.a[row * s.ld + b * kLanes]) * inv[row];
          const vf diff = a - ar;
          sq[row] += diff * diff;
          dot[row] += a * diff;
          storev(&s.a[row * s.ld + b * kLanes], a);
          storev(&s.t[row * s.ld + b * kLanes], use_given ? a * (diff - dg) : a * diff);
        }
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
  for (int64_t jb = 0; jb < blocks; jb += kKeyVecs) {
    const int nc = static_cast<int>(std::min<int64_t>(kKeyVecs, blocks - jb));
    for (int64_t tt = 0; tt < tiles; ++tt) {
      vf p[kRows][kKeyVecs];
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = tt * kRows + r;
        for (int c = 0; c < nc; ++c) {
          float* tp = &s.t[row * s.ld + (jb + c) * kLanes];
          const vf tv = loadv(tp);
          p[r][c] = row >= rows ? vf{} : use_given ? tv : tv - dots[row] * loadv(&s.a[row * s.ld + (jb + c) * kLanes]);
          storev(tp, p[r][c]);
        }
      }
      const float* qtile = &qt[tt * kRows * D];
      if (nc == kKeyVecs)
        tile_dk<kKeyVecs>(p, qtile, &s.dkT[jb * D * kLanes], D);
      else
        tile_dk<1>(p, qtile, &s.dkT[jb * D * kLanes], D);
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
  // Every (group, batch·head) item writes its whole [N, D] slice of dk_parts (from its zeroed dkT).
  at::Tensor dk_parts = want_grad ? at::empty({groups, BH, N, D}, opts) : at::Tensor();

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
      std::fill(s.kT, s.kT + s.keys_size(), 0.0f);
      std::fill(s.krT, s.krT + s.keys_size(), 0.0f);
      std::fill(s.kp, s.kp + s.Np * s.Dp, 0.0f);
      for (int64_t j = 0; j < N; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t blocked = ((j / kLanes) * D + d) * kLanes + j % kLanes;
          s.kT[blocked] = kp[off + j * D + d];
          s.krT[blocked] = krp[off + j * D + d];
          s.kp[j * s.Dp + d] = kp[off + j * D + d];
        }
      if (want_grad) std::fill(s.dkT, s.dkT + s.keys_size(), 0.0f);
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

int64_t parallel_threads(int64_t items) {
  TORCH_CHECK(items >= 1, "parallel_threads: items must be at least 1, got ", items);
  std::vector<char> seen(static_cast<size_t>(std::max(at::get_num_threads(), 1)), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && tid < static_cast<int>(seen.size())) seen[tid] = 1;  // one writer per index
  });
  return std::count(seen.begin(), seen.end(), char{1});
}

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
