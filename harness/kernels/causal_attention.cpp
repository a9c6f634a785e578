// Causal self-attention for bf16 on x86 CPUs with AVX-512 BF16 (AMX or not): ppl_harness::causal_attention.
//
// q [B, Hq, T, D], k and v [B, Hkv, T, D] (any strides, the last dimension contiguous; Hq a
// multiple of Hkv: grouped-query attention), scale -> out [B, T, Hq, D] bf16, contiguous: the
// layout the output projection reads, so no transpose follows.
//
// Flash attention over blocks of 128 query positions and 128 keys. A task is one (batch row, key
// head, query block); the Hq / Hkv query heads that share the key head are stacked into one
// matrix of G x 128 rows, so each product is a larger matmul. Products run through torch's
// batch-reduce GEMM (at::native::cpublas::brgemm: oneDNN's AMX micro-kernels, or its AVX-512 BF16
// ones where there is no AMX) on keys and values the kernel lays out once per call (VNNI pairs); scores are
// float32, the online softmax is float32 with exponentials by exp2_fast below, the probabilities
// are rounded to bf16 for the product with V
// (as SDPA's CPU flash kernel rounds them), the output is accumulated in float32 and rounded to
// bf16 once. The output is divided by the sum of the rounded probabilities, the weights V was
// actually multiplied by, so each row is a convex combination of V's rows: with the unrounded sum
// (SDPA's way) a row whose probability sits on one key (an attention sink, p ~ 0.9) is scaled by
// that key's rounding error, 2^-9 at most (SmolLM2's bf16 perplexity on a 4,096-token WikiText-2
// slice came out 0.137% below float32 that way, 0.061% this way; benchmarks/README.md). Only key
// blocks a query block can see are computed; the causal mask is applied inside the diagonal blocks.
// With a sliding window W > 0 (Gemma-3's local layers) query t sees keys t - W < s <= t: only the
// key blocks that hold such keys are computed, and each row masks the keys its window leaves out of them.
// With cos and sin tables ([B or 1, T, D] bf16), q and k are rotated here first (the rotary
// position embedding, rounded as eager bf16 rounds transformers' apply_rotary_pos_emb): each
// query row as it is copied into its block, each key row as it is packed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using bf16 = at::BFloat16;
constexpr int64_t BQ = 128, BK = 128, NV = BK / 16;

// 2^t for -100 <= t <= 0: 2^round(t) times a degree-4 polynomial of the rest (Taylor series of
// 2^f on [-0.5, 0.5], relative error below 5e-5, far under the bf16 rounding of the
// probabilities). Below -100 it gives 2^-100, never a denormal (whose microcode assists are
// slow); the caller zeroes masked keys.
inline __m512 exp2_fast(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-100.f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.0096181291f), _mm512_set1_ps(0.0555041087f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.2402265070f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.6931471806f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void store_bf16(bf16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

inline __m512 load_bf16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m512 round_bf16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }

// The rotary position embedding of one row (D values; cos and sin of its position), as eager bf16
// computes transformers' x * cos + rotate_half(x) * sin: each product rounded to bf16, then their
// sum (rotate_half(x) = [-x2, x1] for the halves x1, x2). Products of bf16 values are exact in float32.
inline void rotate_row(const bf16* x, const bf16* c, const bf16* s, int64_t D, bf16* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; d += 16) {
    const __m512 x1 = load_bf16(x + d), x2 = load_bf16(x + h + d);
    const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, load_bf16(c + d))),
                                    round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load_bf16(s + d))));
    const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, load_bf16(c + h + d))),
                                    round_bf16(_mm512_mul_ps(x1, load_bf16(s + h + d))));
    store_bf16(out + d, lo);
    store_bf16(out + h + d, hi);
  }
}

// Rotary tables [B or 1, T, D] (cos, sin): the row of batch row b, position t.
struct Rotary {
  const bf16 *cos = nullptr, *sin = nullptr;
  int64_t sb = 0, st = 0;
  const bf16* c(int64_t b, int64_t t) const { return cos + b * sb + t * st; }
  const bf16* s(int64_t b, int64_t t) const { return sin + b * sb + t * st; }
};

// Keys transposed and values, per (batch row, key head, key block), zero past T, packed for brgemm.
// Keys transposed and values, per (batch row, key head, key block), zero past T, laid out for
// brgemm's B operand in VNNI pairs (element (k, n) of a K x N matrix at (k / 2) * 2N + 2n + k % 2,
// the layout oneDNN's AMX and AVX-512 BF16 micro-kernels both read); keys rotated first where
// rot.cos is set. K^T in pairs is the 32-bit transpose of the key rows (gathered 16 rows at a
// time); V in pairs interleaves each two rows.
void pack_keys_values(const Tensor& k, const Tensor& v, int64_t nk, const Rotary& rot, bf16* kp_out, bf16* vp_out) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), half = D / 2;
  const bf16 *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  alignas(64) int16_t lo_i[32], hi_i[32];
  for (int i = 0; i < 32; ++i) {
    lo_i[i] = (int16_t)(i / 2 + (i % 2) * 32);
    hi_i[i] = (int16_t)(16 + i / 2 + (i % 2) * 32);
  }
  const __m512i lo_idx = _mm512_load_si512(lo_i), hi_idx = _mm512_load_si512(hi_i);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)half));
  at::parallel_for(0, B * H * nk, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> kb(BK * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * nk), g = (idx / nk) % H, j = idx % nk;
      for (int64_t r = 0; r < BK; ++r) {  // the block's key rows, rotated or copied
        const int64_t t = j * BK + r;
        bf16* dst = kb.data() + r * D;
        const bf16* kr = kp + b * k.stride(0) + g * k.stride(1) + t * k.stride(2);
        if (t >= T) std::memset(dst, 0, D * sizeof(bf16));
        else if (rot.cos) rotate_row(kr, rot.c(b, t), rot.s(b, t), D, dst);
        else std::memcpy(dst, kr, D * sizeof(bf16));
      }
      int32_t* kd = reinterpret_cast<int32_t*>(kp_out + idx * D * BK);
      for (int64_t r0 = 0; r0 < BK; r0 += 16) {
        const int32_t* base = reinterpret_cast<const int32_t*>(kb.data() + r0 * D);
        for (int64_t dp = 0; dp < half; ++dp) _mm512_storeu_si512(kd + dp * BK + r0, _mm512_i32gather_epi32(rows, base + dp, 4));
      }
      bf16* vd = vp_out + idx * BK * D;
      for (int64_t r = 0; r < BK; r += 2) {
        const int64_t t = j * BK + r;
        const bf16* v0 = vp + b * v.stride(0) + g * v.stride(1) + t * v.stride(2);
        for (int64_t d = 0; d < D; d += 32) {
          const __m512i a = t < T ? _mm512_loadu_si512(v0 + d) : _mm512_setzero_si512();
          const __m512i c = t + 1 < T ? _mm512_loadu_si512(v0 + v.stride(2) + d) : _mm512_setzero_si512();
          _mm512_storeu_si512(vd + r * D + 2 * d, _mm512_permutex2var_epi16(a, lo_idx, c));
          _mm512_storeu_si512(vd + r * D + 2 * d + 32, _mm512_permutex2var_epi16(a, hi_idx, c));
        }
      }
    }
  });
}

// Rows R and R + 1 of a block where no key is masked for either: the arithmetic of
// softmax_block's unmasked rows, row for row the same, the two rows interleaved so that one
// row's reductions overlap the other's work.
inline void softmax_two_rows(int64_t R, float scale, int64_t D, const float* S, bf16* P, float* O, float* mx, float* l) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  const float *s0 = S + R * BK, *s1 = s0 + BK;
  __m512 x0[NV], x1[NV];
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    x0[c] = _mm512_loadu_ps(s0 + c * 16);
    x1[c] = _mm512_loadu_ps(s1 + c * 16);
    m0 = _mm512_max_ps(m0, x0[c]);
    m1 = _mm512_max_ps(m1, x1[c]);
  }
  const float old0 = mx[R], old1 = mx[R + 1];
  const float new0 = std::max(old0, _mm512_reduce_max_ps(m0) * scale), new1 = std::max(old1, _mm512_reduce_max_ps(m1) * scale);
  const __m512 vs = _mm512_set1_ps(scale), neg0 = _mm512_set1_ps(-new0), neg1 = _mm512_set1_ps(-new1);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int c = 0; c < NV; c += 2) {
    const __m512bh r0 = _mm512_cvtne2ps_pbh(exp2_fast(_mm512_fmadd_ps(x0[c + 1], vs, neg0)), exp2_fast(_mm512_fmadd_ps(x0[c], vs, neg0)));
    const __m512bh r1 = _mm512_cvtne2ps_pbh(exp2_fast(_mm512_fmadd_ps(x1[c + 1], vs, neg1)), exp2_fast(_mm512_fmadd_ps(x1[c], vs, neg1)));
    _mm512_storeu_si512(P + R * BK + c * 16, (__m512i)r0);
    _mm512_storeu_si512(P + (R + 1) * BK + c * 16, (__m512i)r1);
    acc0 = _mm512_dpbf16_ps(acc0, r0, ones);
    acc1 = _mm512_dpbf16_ps(acc1, r1, ones);
  }
  const float olds[2] = {old0, old1}, news[2] = {new0, new1};
  const __m512 accs[2] = {acc0, acc1};
  for (int h = 0; h < 2; ++h) {
    float* lr = l + (R + h) * 16;
    if (news[h] != olds[h]) {
      const __m512 va = exp2_fast(_mm512_set1_ps(olds[h] - news[h]));
      _mm512_storeu_ps(lr, _mm512_fmadd_ps(_mm512_loadu_ps(lr), va, accs[h]));
      float* o = O + (R + h) * D;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), va));
    } else {
      _mm512_storeu_ps(lr, _mm512_add_ps(_mm512_loadu_ps(lr), accs[h]));
    }
    mx[R + h] = news[h];
  }
}

// One query block's rows through one key block: scores in s (M x BK, float32) -> probabilities
// in p (bf16), running max mx (log2 units) and sum l updated, the output rows o rescaled. Row t
// sees the block's keys [lo, n): n from the causal mask, lo from the window (0 without one).
// The sum is kept as 16 partial sums per row (l: M x 16), added up once at the end; the rounded
// probabilities are summed by a bf16 dot product with ones (exact products, float32 sums).
inline void softmax_block(int64_t M, int64_t first_row, int64_t first_key, bool diag, int64_t window, float scale,
                          int64_t D, const float* S, bf16* P, float* O, float* mx, float* l) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  if (!diag && window == 0) {  // every row sees every key of the block (M is even: G x 128 rows)
    for (int64_t rr = 0; rr < M; rr += 2) softmax_two_rows(rr, scale, D, S, P, O, mx, l);
    return;
  }
  // row rr sees the block's keys [lo, n)
  auto seen = [&](int64_t rr) {
    const int64_t t = first_row + rr % BQ;
    return std::pair<int64_t, int64_t>(window > 0 ? std::max<int64_t>(0, t - window + 1 - first_key) : 0,
                                       diag ? std::min<int64_t>(BK, t - first_key + 1) : BK);
  };
  for (int64_t rr = 0; rr < M; ++rr) {
    const auto [lo, n] = seen(rr);
    if (n == BK && lo == 0 && rr + 1 < M && seen(rr + 1) == std::pair<int64_t, int64_t>(0, BK)) {
      softmax_two_rows(rr, scale, D, S, P, O, mx, l);  // both rows see every key of the block
      ++rr;
      continue;
    }
    const float* s = S + rr * BK;
    bf16* p = P + rr * BK;
    if (n <= lo) {
      std::memset(p, 0, BK * sizeof(bf16));
      continue;
    }
    const bool whole = n == BK && lo == 0;  // no key of the block masked for this row
    __m512 x[NV];
    __mmask16 mk[NV];
    __m512 vmax = ninf;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      if (whole) {
        mk[c] = 0xffff;
        x[c] = _mm512_loadu_ps(s + c * 16);
      } else {
        const int64_t hi_c = std::clamp<int64_t>(n - c * 16, 0, 16), lo_c = std::clamp<int64_t>(lo - c * 16, 0, 16);
        mk[c] = (__mmask16)(((1u << hi_c) - 1) & ~((1u << lo_c) - 1));
        x[c] = _mm512_mask_loadu_ps(ninf, mk[c], s + c * 16);
      }
      vmax = _mm512_max_ps(vmax, x[c]);
    }
    const float mold = mx[rr], mnew = std::max(mold, _mm512_reduce_max_ps(vmax) * scale);
    const __m512 vs = _mm512_set1_ps(scale), vneg = _mm512_set1_ps(-mnew);
    __m512 acc = _mm512_setzero_ps();
    const int c0 = (int)(lo / 32) * 2, c1 = (int)((n + 31) / 32) * 2;  // pairs of vectors outside [c0, c1) are all masked
#pragma GCC unroll 4
    for (int c = 0; c < NV; c += 2) {
      if (c < c0 || c >= c1) {
        _mm512_storeu_si512(p + c * 16, _mm512_setzero_si512());
        continue;
      }
      __m512 e0 = exp2_fast(_mm512_fmadd_ps(x[c], vs, vneg)), e1 = exp2_fast(_mm512_fmadd_ps(x[c + 1], vs, vneg));
      if (!whole) {
        e0 = _mm512_maskz_mov_ps(mk[c], e0);
        e1 = _mm512_maskz_mov_ps(mk[c + 1], e1);
      }
      const __m512bh rounded = _mm512_cvtne2ps_pbh(e1, e0);  // e0 in the low half: keys c*16 .. c*16+31 in order
      _mm512_storeu_si512(p + c * 16, (__m512i)rounded);
      acc = _mm512_dpbf16_ps(acc, rounded, ones);  // the sum of the weights V is multiplied by
    }
    float* lr = l + rr * 16;
    if (mnew != mold) {
      // 2^-100 on the first block (mold = -inf), where l and o are still 0
      const __m512 va = exp2_fast(_mm512_set1_ps(mold - mnew));
      _mm512_storeu_ps(lr, _mm512_fmadd_ps(_mm512_loadu_ps(lr), va, acc));
      float* o = O + rr * D;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), va));
    } else {
      _mm512_storeu_ps(lr, _mm512_add_ps(_mm512_loadu_ps(lr), acc));
    }
    mx[rr] = mnew;
  }
}

Tensor causal_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale_d, int64_t window,
                        const std::optional<Tensor>& cos_in, const std::optional<Tensor>& sin_in) {
  TORCH_CHECK(q_in.device().is_cpu() && q_in.scalar_type() == at::kBFloat16 && k_in.scalar_type() == at::kBFloat16 &&
              v_in.scalar_type() == at::kBFloat16, "causal_attention: bf16 CPU tensors");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "causal_attention: [B, H, T, D] tensors");
  auto last_contiguous = [](const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); };
  const Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(2) == T && v.size(2) == T &&
              k.size(3) == D && v.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "causal_attention: shapes");
  TORCH_CHECK(D % 32 == 0 && D <= 256, "causal_attention: head_dim a multiple of 32, at most 256");
  TORCH_CHECK(window >= 0, "causal_attention: window >= 0 (0: none)");
  TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), "causal_attention: cos and sin together");
  Tensor cos, sin;
  Rotary rot;
  if (cos_in.has_value()) {  // [B or 1, T, D] bf16: q and k are rotated here, as transformers' apply_rotary_pos_emb
    cos = last_contiguous(*cos_in), sin = last_contiguous(*sin_in);
    TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.dim() == 3 && cos.sizes() == sin.sizes() &&
                cos.stride(0) == sin.stride(0) && cos.stride(1) == sin.stride(1) && (cos.size(0) == B || cos.size(0) == 1) &&
                cos.size(1) == T && cos.size(2) == D, "causal_attention: cos and sin bf16 [B or 1, T, head_dim] tables");
    rot = Rotary{cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1)};
  }
  const int64_t G = Hq / Hkv, M = G * BQ;
  const float scale = (float)(scale_d * 1.4426950408889634);  // scores in log2 units: exp(x) = 2^(x log2 e)
  Tensor out = at::empty({B, T, Hq, D}, q.options());
  if (T == 0 || B == 0) return out;
  const int64_t nk = (T + BK - 1) / BK, nq = (T + BQ - 1) / BQ;
  Tensor Kp = at::empty({B * Hkv * nk * D * BK}, q.options()), Vp = at::empty({B * Hkv * nk * BK * D}, q.options());
  pack_keys_values(k, v, nk, rot, Kp.data_ptr<bf16>(), Vp.data_ptr<bf16>());
  const bf16* qp = q.data_ptr<bf16>();
  const bf16 *kpk = Kp.data_ptr<bf16>(), *vpk = Vp.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, B * Hkv * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> Qs(M * D), P(M * BK);
    std::vector<float> S(M * BK), O(M * D), mx(M), l(M * 16);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (Hkv * nq), g = (idx / nq) % Hkv, r = idx % nq;
      // query blocks taken from both ends in turn, so that a thread's run of tasks is balanced
      // (block i costs i + 1 key blocks)
      const int64_t i = r % 2 == 0 ? r / 2 : nq - 1 - r / 2;
      for (int64_t h = 0; h < G; ++h)
        for (int64_t rr = 0; rr < BQ; ++rr) {
          const int64_t t = i * BQ + rr;
          bf16* dst = Qs.data() + (h * BQ + rr) * D;
          if (t >= T) {
            std::memset(dst, 0, D * sizeof(bf16));
            continue;
          }
          const bf16* src = qp + b * q.stride(0) + (g * G + h) * q.stride(1) + t * q.stride(2);
          if (rot.cos) rotate_row(src, rot.c(b, t), rot.s(b, t), D, dst);
          else std::memcpy(dst, src, D * sizeof(bf16));
        }
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t jn = std::min(T - 1, i * BQ + BQ - 1) / BK + 1;
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, i * BQ - window + 1) / BK : 0;  // the first block row i*BQ sees
      for (int64_t j = j0; j < jn; ++j) {
        const bf16* kb = kpk + ((b * Hkv + g) * nk + j) * D * BK;
        const bf16* vb = vpk + ((b * Hkv + g) * nk + j) * BK * D;
        at::native::cpublas::brgemm(M, BK, D, D, BK, BK, false, Qs.data(), kb, S.data());
        const bool diag = (j + 1) * BK - 1 > i * BQ;  // some key of the block lies after some query
        softmax_block(M, i * BQ, j * BK, diag, window, scale, D, S.data(), P.data(), O.data(), mx.data(), l.data());
        at::native::cpublas::brgemm(M, D, BK, BK, D, D, true, P.data(), vb, O.data());
      }
      for (int64_t h = 0; h < G; ++h)
        for (int64_t rr = 0; rr < BQ && i * BQ + rr < T; ++rr) {
          const int64_t row = h * BQ + rr;
          const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_loadu_ps(l.data() + row * 16)));
          bf16* dst = op + ((b * T + i * BQ + rr) * Hq + g * G + h) * D;
          for (int64_t d = 0; d < D; d += 16) store_bf16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(O.data() + row * D + d), inv));
        }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ppl_harness, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale, int window=0, Tensor? cos=None, Tensor? sin=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ppl_harness, CPU, m) {
  m.impl("causal_attention", &causal_attention);
}
