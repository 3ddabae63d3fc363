// Varlen flash attention, CPU backend.
//
// The flash-attention-2 algorithm (Dao, 2023, arXiv:2307.08691) for packed sequences in
// flash-attn's varlen layout: q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32.
// Work is split into (segment, head) items that threads pull from a shared counter (longest
// first), so one long sample next to many short ones does not leave a core idle. Inside an
// item, tiles of BLOCK x BLOCK scores are computed with oneDNN's brgemm micro-kernel
// (at::native::cpublas::brgemm, exported by libtorch) and softmax runs online per row, so
// memory stays linear in tokens: per thread, one segment's dQ and transposed K/V.
//
// GEMM operands are read in place from the (tokens, heads, D) inputs (ld = heads * D); only a
// segment's last, partial block is copied into a zero-padded tile, and each item keeps a
// block-transposed copy of its segment's K (and V in the backward). The softmax scale is
// applied in the row kernels. fp16/bf16 are converted to fp32 once; fp64 serves gradcheck.
// brgemm calls thus have a handful of fixed shapes per head dim (no kernel generation per
// odd segment length).
//
// Masking follows flash-attn's varlen semantics: query i of a segment with lengths (Lq, Lk)
// may see key j iff  i + Lk - Lq - left <= j <= i + Lk - Lq + right  (a negative bound means
// unbounded; causal means right = 0). A row with no visible key gets out = 0, lse = +inf.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// Block size for a segment: short chat turns should not pay for 64 x 64 tiles.
inline int64_t block_for(int64_t len) { return len <= 16 ? 16 : (len <= 32 ? 32 : 64); }

// ---------------------------------------------------------------------------------------
// Tile GEMM: C[M,N] (ldc) = (accumulate ? C : 0) + A[M,K] (lda) * B[K,N] (ldb), row-major.

bool brgemm_works() {
  // brgemm needs oneDNN's ukernel API; probe once and fall back to plain loops without it.
  static const bool ok = [] {
    try {
      float a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1}, c[4] = {0, 0, 0, 0};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
      return c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

template <typename T>
void gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, T(0));
    for (int64_t p = 0; p < K; ++p) {
      const T a = A[i * lda + p];
      const T* b = B + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (brgemm_works()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
  } else {
    gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------
// exp for the softmax rows: branch-free so the row loops vectorize (std::exp does not).

inline float exp_row(float x) {
  // Cephes expf: 2^n * p(r), n = round(x / ln 2), |r| <= ln2 / 2; relative error ~1e-7.
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

inline double exp_row(double x) { return std::exp(x); }

// Row kernels of the online softmax. float rows use GCC/Clang vector extensions: GCC 12 did
// not auto-vectorize these loops here even under `omp simd` (measured: scalar exp cost more
// than the tile GEMMs). Eight lanes = AVX2; wider CPUs run two per AVX-512 op or split it.

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// Same Cephes polynomial as exp_row(float); rounding by the 1.5 * 2^23 trick.
inline vf8 exp8(vf8 x) {
  const vf8 zero = {};
  const vf8 xc = x < -87.0f ? zero - 87.0f : x;
  const vf8 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vf8 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf8 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  const vf8 res = y * (vf8)bits;  // same-size vector cast: bit reinterpretation
  return x < -87.0f ? zero : res;
}

inline float hsum8(vf8 v) {
  float t[kLanes];
  store8(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// max(mx, s[0..n)).
inline float row_max(const float* s, int64_t n, float mx) {
  vf8 m = vf8{} + mx;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 x = load8(s + j);
    m = x > m ? x : m;
  }
  float t[kLanes];
  store8(t, m);
  for (int64_t i = 0; i < kLanes; ++i) mx = std::max(mx, t[i]);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// s[j] = exp(s[j] * scale - mx) in place; returns the sum.
inline float row_exp_sum(float* s, int64_t n, float scale, float mx) {
  vf8 acc = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 p = exp8(load8(s + j) * scale - mx);
    store8(s + j, p);
    acc += p;
  }
  if (j < n) {  // tail through a padded vector: exp(-inf) = 0 adds nothing
    float t[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) t[i] = j + i < n ? s[j + i] * scale - mx : -INFINITY;
    const vf8 p = exp8(load8(t));
    store8(t, p);
    for (int64_t i = 0; j + i < n; ++i) s[j + i] = t[i];
    acc += p;
  }
  return hsum8(acc);
}

// Backward: p[j] = exp(s[j] * scale - lse) (s given in p), ds[j] = p[j] * (dp[j] - delta)
// (dp given in ds).
inline void row_p_ds(float* p, float* ds, int64_t n, float scale, float lse, float delta) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 pj = exp8(load8(p + j) * scale - lse);
    store8(p + j, pj);
    store8(ds + j, pj * (load8(ds + j) - delta));
  }
  for (; j < n; ++j) {
    const float pj = exp_row(p[j] * scale - lse);
    p[j] = pj;
    ds[j] = pj * (ds[j] - delta);
  }
}

// float64 rows (gradcheck only): plain loops.
inline double row_max(const double* s, int64_t n, double mx) {
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

inline double row_exp_sum(double* s, int64_t n, double scale, double mx) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] * scale - mx));
  return sum;
}

inline void row_p_ds(double* p, double* ds, int64_t n, double scale, double lse, double delta) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] * scale - lse);
    ds[j] = p[j] * (ds[j] - delta);
  }
}

// ---------------------------------------------------------------------------------------

struct Mask {
  int64_t offset;  // Lk - Lq: bottom-right alignment
  int64_t left, right;  // window; < 0 means unbounded
  int64_t Lk;
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + offset - left); }
  int64_t hi(int64_t i) const {  // inclusive
    return right < 0 ? Lk - 1 : std::min<int64_t>(Lk - 1, i + offset + right);
  }
};

struct Item {
  int64_t b, h, cost;
};

// (segment, head) items, most expensive first, for dynamic scheduling.
std::vector<Item> make_items(const int32_t* cu_q, const int32_t* cu_k, int64_t B, int64_t H) {
  std::vector<Item> items;
  items.reserve(B * H);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Lq = cu_q[b + 1] - cu_q[b], Lk = cu_k[b + 1] - cu_k[b];
    if (Lq == 0) continue;
    for (int64_t h = 0; h < H; ++h) items.push_back({b, h, Lq * std::max<int64_t>(Lk, 1)});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

template <typename F>
void run_items(const std::vector<Item>& items, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(items[i]);
  });
}

// A (rows, ld) row-major matrix view of one head of a (tokens, heads, D) tensor.
template <typename T>
struct Rows {
  const T* base;  // row 0 of the segment, this head
  int64_t ld;     // elements between rows (heads * D)
  int64_t n;      // valid rows in the segment
};

// Pointer to rows [r0, r0 + bs) of `m` for a GEMM operand: in place when all are valid,
// else the valid ones copied into `tile` (bs x D, zero padded) so no read passes the segment.
template <typename T>
const T* block_rows(const Rows<T>& m, int64_t r0, int64_t bs, int64_t D, T* tile, int64_t* ld) {
  if (r0 + bs <= m.n) {
    *ld = m.ld;
    return m.base + r0 * m.ld;
  }
  std::fill(tile, tile + bs * D, T(0));
  for (int64_t r = 0; r < m.n - r0; ++r) std::copy_n(m.base + (r0 + r) * m.ld, D, tile + r * D);
  *ld = D;
  return tile;
}

// Block-transposed copy of a segment's rows: block j0 / bs is a (D, bs) matrix (zero padded),
// the B operand of Q Kᵀ and dO Vᵀ with ld = bs (one brgemm shape whatever the segment
// length). Per item, so memory is one segment's keys per thread.
template <typename T>
void transpose_rows(const Rows<T>& m, int64_t D, int64_t bs, std::vector<T>& out) {
  const int64_t nblocks = (m.n + bs - 1) / bs;
  out.assign(nblocks * D * bs, T(0));
  for (int64_t blk = 0; blk < nblocks; ++blk) {  // contiguous writes; a block's rows sit in L1
    const int64_t rows = std::min(bs, m.n - blk * bs);
    const T* src = m.base + blk * bs * m.ld;
    T* dst = out.data() + blk * D * bs;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < rows; ++r) dst[d * bs + r] = src[r * m.ld + d];
  }
}

// fp16/bf16 are computed in fp32: one conversion pass, then the fp32 kernel.
template <typename T>
at::Tensor as_compute(const at::Tensor& x) {
  return x.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                     const at::Tensor& v_in, const at::Tensor& cu_q,
                                     const at::Tensor& cu_k, double scale_d, int64_t left,
                                     int64_t right) {
  const at::Tensor q = as_compute<T>(q_in), k = as_compute<T>(k_in), v = as_compute<T>(v_in);
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1), group = H / Hkv;
  const int64_t B = cu_q.size(0) - 1;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({H, Tq}, q.options());
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  T* LSE = lse.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const T inf = std::numeric_limits<T>::infinity();

  run_items(make_items(cq, ck, B, H), [&](const Item& it) {
    const int64_t sq = cq[it.b], sk = ck[it.b];
    const int64_t Lq = cq[it.b + 1] - sq, Lk = ck[it.b + 1] - sk;
    const int64_t h = it.h, hk = h / group, bs = block_for(std::max(Lq, Lk));
    const Mask mask{Lk - Lq, left, right, Lk};
    const Rows<T> qr{Q + sq * H * D + h * D, H * D, Lq};
    const Rows<T> kr{K + sk * Hkv * D + hk * D, Hkv * D, Lk};
    const Rows<T> vr{V + sk * Hkv * D + hk * D, Hkv * D, Lk};
    std::vector<T> S(bs * bs), acc(bs * D), m(bs), l(bs), q_tile(bs * D), v_tile(bs * D), kt;
    transpose_rows(kr, D, bs, kt);

    for (int64_t i0 = 0; i0 < Lq; i0 += bs) {
      const int64_t bq = std::min(bs, Lq - i0);
      int64_t ldq;
      const T* Qi = block_rows(qr, i0, bs, D, q_tile.data(), &ldq);
      std::fill(m.begin(), m.end(), -inf);  // running max of scaled scores
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t jlo = mask.lo(i0), jhi = mask.hi(i0 + bq - 1);
      for (int64_t j0 = (jlo / bs) * bs; j0 <= jhi; j0 += bs) {
        const int64_t bk = std::min(bs, Lk - j0);
        gemm(bs, bs, D, Qi, ldq, kt.data() + j0 * D, bs, S.data(), bs, false);  // raw Q Kᵀ
        for (int64_t r = 0; r < bs; ++r) {
          T* s = S.data() + r * bs;
          const int64_t lo = std::max<int64_t>(mask.lo(i0 + r) - j0, 0);
          const int64_t hi = std::min<int64_t>(mask.hi(i0 + r) - j0 + 1, bk);
          if (r >= bq || lo >= hi) {
            std::fill(s, s + bs, T(0));
            continue;
          }
          // scale > 0, so max(s) * scale = max(s * scale).
          const T mx = std::max(m[r], row_max(s + lo, hi - lo, -inf) * scale);
          const T sum = row_exp_sum(s + lo, hi - lo, scale, mx);
          std::fill(s, s + lo, T(0));
          std::fill(s + hi, s + bs, T(0));
          const T alpha = std::exp(m[r] - mx);  // 0 on the row's first visible block
          if (alpha != T(1)) {
            T* a = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        int64_t ldv;
        const T* Vj = block_rows(vr, j0, bs, D, v_tile.data(), &ldv);
        gemm(bs, D, bs, S.data(), bs, Vj, ldv, acc.data(), D, true);  // acc += P V
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* o = O + ((sq + i0 + r) * H + h) * D;
        const T* a = acc.data() + r * D;
        const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
        LSE[h * Tq + sq + i0 + r] = l[r] > T(0) ? m[r] + std::log(l[r]) : inf;
      }
    }
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------
// Backward: per item, key blocks outer (dK, dV tiles stay in cache), query blocks inner,
// dQ accumulated in an item-private buffer; no atomics, bit-for-bit deterministic.

template <typename T>
void transpose_tile(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) y[j * n + i] = x[i * n + j];
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& dout_in, const at::Tensor& q_in,
                                      const at::Tensor& k_in, const at::Tensor& v_in,
                                      const at::Tensor& out_in, const at::Tensor& lse_in,
                                      const at::Tensor& cu_q, const at::Tensor& cu_k,
                                      double scale_d, int64_t left, int64_t right) {
  const at::Tensor q = as_compute<T>(q_in), k = as_compute<T>(k_in), v = as_compute<T>(v_in);
  const at::Tensor dout = as_compute<T>(dout_in);
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Tk = k.size(0), Hkv = k.size(1), group = H / Hkv;
  const int64_t B = cu_q.size(0) - 1;
  // Delta = rowsum(dO * O): the FA2 pre-pass that turns softmax's backward into a row term.
  at::Tensor delta = (dout * as_compute<T>(out_in)).sum(-1).t().contiguous();  // (H, Tq)
  at::Tensor lse = as_compute<T>(lse_in);
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({Tk, H, D}, q.options());  // per q head; summed for GQA
  at::Tensor dv = at::zeros({Tk, H, D}, q.options());
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  const T *DO = dout.data_ptr<T>(), *DELTA = delta.data_ptr<T>(), *LSE = lse.data_ptr<T>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const T inf = std::numeric_limits<T>::infinity();

  run_items(make_items(cq, ck, B, H), [&](const Item& it) {
    const int64_t sq = cq[it.b], sk = ck[it.b];
    const int64_t Lq = cq[it.b + 1] - sq, Lk = ck[it.b + 1] - sk;
    const int64_t h = it.h, hk = h / group, bs = block_for(std::max(Lq, Lk));
    const int64_t nq = (Lq + bs - 1) / bs;
    const Mask mask{Lk - Lq, left, right, Lk};
    const Rows<T> qr{Q + sq * H * D + h * D, H * D, Lq};
    const Rows<T> dor{DO + sq * H * D + h * D, H * D, Lq};
    const Rows<T> kr{K + sk * Hkv * D + hk * D, Hkv * D, Lk};
    const Rows<T> vr{V + sk * Hkv * D + hk * D, Hkv * D, Lk};
    std::vector<T> P(bs * bs), dS(bs * bs), tile_t(bs * bs), dk_acc(bs * D), dv_acc(bs * D);
    std::vector<T> q_tile(bs * D), do_tile(bs * D), k_tile(bs * D), kt, vt;
    std::vector<T> dq_acc(nq * bs * D, T(0));
    transpose_rows(kr, D, bs, kt);
    transpose_rows(vr, D, bs, vt);
    const T *lse_h = LSE + h * Tq + sq, *delta_h = DELTA + h * Tq + sq;

    for (int64_t j0 = 0; j0 < Lk; j0 += bs) {
      const int64_t bk = std::min(bs, Lk - j0);
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      int64_t ldk;
      const T* Kj = block_rows(kr, j0, bs, D, k_tile.data(), &ldk);
      for (int64_t i0 = 0; i0 < Lq; i0 += bs) {
        const int64_t bq = std::min(bs, Lq - i0);
        if (mask.lo(i0) > j0 + bk - 1 || mask.hi(i0 + bq - 1) < j0) continue;
        int64_t ldq, lddo;
        const T* Qi = block_rows(qr, i0, bs, D, q_tile.data(), &ldq);
        const T* DOi = block_rows(dor, i0, bs, D, do_tile.data(), &lddo);
        gemm(bs, bs, D, Qi, ldq, kt.data() + j0 * D, bs, P.data(), bs, false);    // raw S
        gemm(bs, bs, D, DOi, lddo, vt.data() + j0 * D, bs, dS.data(), bs, false);  // dP
        for (int64_t r = 0; r < bs; ++r) {
          T* p = P.data() + r * bs;
          T* ds = dS.data() + r * bs;
          const int64_t lo = std::max<int64_t>(mask.lo(i0 + r) - j0, 0);
          const int64_t hi = std::min<int64_t>(mask.hi(i0 + r) - j0 + 1, bk);
          if (r >= bq || lo >= hi || lse_h[i0 + r] == inf) {
            std::fill(p, p + bs, T(0));
            std::fill(ds, ds + bs, T(0));
            continue;
          }
          row_p_ds(p + lo, ds + lo, hi - lo, scale, lse_h[i0 + r], delta_h[i0 + r]);
          std::fill(p, p + lo, T(0));
          std::fill(ds, ds + lo, T(0));
          std::fill(p + hi, p + bs, T(0));
          std::fill(ds + hi, ds + bs, T(0));
        }
        transpose_tile(P.data(), tile_t.data(), bs);
        gemm(bs, D, bs, tile_t.data(), bs, DOi, lddo, dv_acc.data(), D, true);  // dV += Pᵀ dO
        transpose_tile(dS.data(), tile_t.data(), bs);
        gemm(bs, D, bs, tile_t.data(), bs, Qi, ldq, dk_acc.data(), D, true);  // dK += dSᵀ Q
        gemm(bs, D, bs, dS.data(), bs, Kj, ldk, dq_acc.data() + i0 * D, D, true);  // dQ += dS K
      }
      for (int64_t r = 0; r < bk; ++r) {
        T* dk_row = DK + ((sk + j0 + r) * H + h) * D;
        const T* a = dk_acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) dk_row[d] = a[d] * scale;
        std::copy_n(dv_acc.data() + r * D, D, DV + ((sk + j0 + r) * H + h) * D);
      }
    }
    for (int64_t r = 0; r < Lq; ++r) {
      T* o = DQ + ((sq + r) * H + h) * D;
      const T* a = dq_acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * scale;
    }
  });
  if (group > 1) {
    dk = dk.view({Tk, Hkv, group, D}).sum(2);
    dv = dv.view({Tk, Hkv, group, D}).sum(2);
  }
  return {dq, dk, dv};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_q, const at::Tensor& cu_k) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "varlen_attention (cpp): q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "varlen_attention (cpp): q, k, v must be (tokens, heads, head_dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), "varlen_attention (cpp): k and v shapes differ");
  TORCH_CHECK(q.size(2) == k.size(2), "varlen_attention (cpp): q and k head_dim differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "varlen_attention (cpp): heads of q must be a multiple of heads of k/v");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt &&
                  cu_q.is_contiguous() && cu_k.is_contiguous() && cu_q.dim() == 1 &&
                  cu_q.sizes() == cu_k.sizes() && cu_q.size(0) >= 1,
              "varlen_attention (cpp): cu_seqlens must be contiguous int32 (batch+1,)");
}

}  // namespace

std::vector<at::Tensor> varlen_fwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu_q,
                                   at::Tensor cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  if (q.scalar_type() == at::kDouble) return forward_impl<double>(q, k, v, cu_q, cu_k, scale, left, right);
  return forward_impl<float>(q, k, v, cu_q, cu_k, scale, left, right);
}

std::vector<at::Tensor> varlen_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v,
                                   at::Tensor out, at::Tensor lse, at::Tensor cu_q,
                                   at::Tensor cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(dout, q, k, v, out, lse, cu_q, cu_k, scale, left, right);
  return backward_impl<float>(dout, q, k, v, out, lse, cu_q, cu_k, scale, left, right);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyfast-tune varlen flash attention, CPU backend (see csrc/varlen_attention.cpp)";
  m.def("fwd", &varlen_fwd,
        "(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right) -> "
        "[out (total_q, H, D) fp32|fp64, lse (H, total_q)]");
  m.def("bwd", &varlen_bwd,
        "(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, "
        "window_right) -> [dq, dk, dv] fp32|fp64");
  m.def("uses_brgemm", &brgemm_works, "True when tiles go through oneDNN's brgemm");
}
