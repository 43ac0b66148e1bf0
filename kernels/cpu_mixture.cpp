// The CPU backend's kernels: the LoRA mixture as one fused pass over the tokens (kernels/cpu_backend.py).
//
//   T = tokens, N = adapters, r = rank (per adapter, <= r_max), k = adapters per token
//   for t in range(T):                              # split across OpenMP threads (torch's own pool)
//       for j in range(k):
//           e = idx[t, j]; if e < 0: continue
//           c = coef[t, j] * scales[e]
//           h[:ranks[e]] = c * P[e, :ranks[e]] @ x[t]          # shrink: ranks[e] dot products of length d_p
//           y[t] += h[:ranks[e]] @ Q[e, :ranks[e]]             # expand: ranks[e] axpys of length d_q
//
// Forward: x = layer input, P = A (N, r_max, d_in), Q = B's rows (N, r_max, d_out).
// Backward dx: x = grad, P = B's rows, Q = A (the same kernel with the factors swapped).
// Gate gradient: dw[t, j] = scales[e] * <P[e] @ x[t], R[e] @ g[t]>, the two shrinks of the backward.
//
// Each thread takes a range of tokens and sorts its (token, slot) pairs by adapter (counting sort): an
// adapter's factors are read from memory once per thread and stay in cache while its pairs stream by
// (without the sort, every pair re-reads 2 * r * d factor values from L2, which bounds the kernel on a CPU).
// An adapter's pairs run in tiles of four tokens, a token that routes twice to one adapter (duplicate slots)
// being one tile entry with the summed coefficient. Within a tile, register-blocked micro-kernels on 32-byte
// vectors take two tokens by four rank rows at once (one token by eight at a tile's odd end): each factor
// vector loaded feeds two FMAs, each x or y vector four, and nothing spills (8-10% faster than the earlier
// four-by-four loops, which needed more registers than AVX2 has; AMD EPYC, 2026-12-02).
//
// Design limits: float and double only (half types take the torch backend); rows of x, y, P, Q and R are
// contiguous (the launcher makes them so); r_max <= 1024 (k * r_max for the gate gradient); scratch per
// thread: its pairs' order (T * k / threads integers) and N + 1 counters, never (T, k, r, d) nor (T, k, d).
// Bad ids or ranks return an error code before anything is written (never an out-of-bounds read).

#include <omp.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxRows = 1024;   // rank rows of one adapter (k x rank for the gate gradient)
constexpr int kTile = 4;         // tokens of one adapter whose shrink and expand run together

// Register-blocked micro-kernels on 32-byte vectors (GCC / Clang vector extensions: AVX2 registers on x86,
// two NEON registers on Arm). A block of MT tokens by RT rank rows keeps MT * RT accumulators (shrink) or
// MT * RT broadcast coefficients (expand) in registers, plus MT rows of x or y and one factor vector: at
// most 11 of the 16 AVX2 registers, so nothing spills and every load feeds at least one FMA per token.
template <typename S>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

template <typename S>
inline typename Lanes<S>::V load(const S* p) {
  typename Lanes<S>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename S>
inline void store(S* p, typename Lanes<S>::V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// h[m * h_row + i] = <xs[m], rows[i]> for m < MT, i < RT.
template <typename S, int MT, int RT>
inline void dot_block(const S* const* xs, const S* const* rows, int64_t d, S* h, int64_t h_row) {
  using V = typename Lanes<S>::V;
  constexpr int L = Lanes<S>::L;
  V acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < RT; ++i) acc[m][i] = V{};
  int64_t c = 0;
  for (; c + L <= d; c += L) {
    V xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = load(xs[m] + c);
    for (int i = 0; i < RT; ++i) {
      const V p = load(rows[i] + c);
      for (int m = 0; m < MT; ++m) acc[m][i] += xv[m] * p;
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < RT; ++i) {
      S s = 0;
      for (int l = 0; l < L; ++l) s += acc[m][i][l];
      for (int64_t e = c; e < d; ++e) s += xs[m][e] * rows[i][e];
      h[m * h_row + i] = s;
    }
}

// ys[m] += sum_{i < RT} h[m * h_row + i] * rows[i] for m < MT: each y row is read and written once per block.
template <typename S, int MT, int RT>
inline void axpy_block(const S* h, int64_t h_row, const S* const* rows, int64_t d, S* const* ys) {
  using V = typename Lanes<S>::V;
  constexpr int L = Lanes<S>::L;
  V coef[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < RT; ++i) coef[m][i] = V{} + h[m * h_row + i];
  int64_t c = 0;
  for (; c + L <= d; c += L) {
    V yv[MT];
    for (int m = 0; m < MT; ++m) yv[m] = load(ys[m] + c);
    for (int i = 0; i < RT; ++i) {
      const V q = load(rows[i] + c);
      for (int m = 0; m < MT; ++m) yv[m] += coef[m][i] * q;
    }
    for (int m = 0; m < MT; ++m) store(ys[m] + c, yv[m]);
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t e = c; e < d; ++e) {
      S s = ys[m][e];
      for (int i = 0; i < RT; ++i) s += h[m * h_row + i] * rows[i][e];
      ys[m][e] = s;
    }
}

// Shrink of M tokens (xs) by n rank rows: h[m * h_row + i] = <xs[m], rows[i]>; pairs of tokens by four rows,
// a lone token by eight.
template <typename S>
inline void dot_tile(const S* const* xs, int M, const S* const* rows, int n, int64_t d, S* h, int64_t h_row) {
  int m = 0;
  for (; m + 2 <= M; m += 2) {
    int i = 0;
    for (; i + 4 <= n; i += 4) dot_block<S, 2, 4>(xs + m, rows + i, d, h + m * h_row + i, h_row);
    for (; i < n; ++i) dot_block<S, 2, 1>(xs + m, rows + i, d, h + m * h_row + i, h_row);
  }
  if (m < M) {
    int i = 0;
    for (; i + 8 <= n; i += 8) dot_block<S, 1, 8>(xs + m, rows + i, d, h + m * h_row + i, h_row);
    for (; i + 4 <= n; i += 4) dot_block<S, 1, 4>(xs + m, rows + i, d, h + m * h_row + i, h_row);
    for (; i < n; ++i) dot_block<S, 1, 1>(xs + m, rows + i, d, h + m * h_row + i, h_row);
  }
}

// Expand of M tokens: ys[m] += sum_{i < n} h[m * h_row + i] * rows[i]; blocks as in dot_tile.
template <typename S>
inline void axpy_tile(const S* h, int64_t h_row, int M, const S* const* rows, int n, int64_t d, S* const* ys) {
  int m = 0;
  for (; m + 2 <= M; m += 2) {
    int i = 0;
    for (; i + 4 <= n; i += 4) axpy_block<S, 2, 4>(h + m * h_row + i, h_row, rows + i, d, ys + m);
    for (; i < n; ++i) axpy_block<S, 2, 1>(h + m * h_row + i, h_row, rows + i, d, ys + m);
  }
  if (m < M) {
    int i = 0;
    for (; i + 8 <= n; i += 8) axpy_block<S, 1, 8>(h + m * h_row + i, h_row, rows + i, d, ys + m);
    for (; i + 4 <= n; i += 4) axpy_block<S, 1, 4>(h + m * h_row + i, h_row, rows + i, d, ys + m);
    for (; i < n; ++i) axpy_block<S, 1, 1>(h + m * h_row + i, h_row, rows + i, d, ys + m);
  }
}

// 0 when every (token, slot) entry has a usable adapter id and rank, else an error code for the launcher.
// Run before anything is written, so a refused call leaves y as it was.
inline int check_entries(const int64_t* idx, const int32_t* ranks, int64_t entries, int64_t N, int r_max) {
  int status = 0;
  for (int64_t p = 0; p < entries; ++p) {
    const int64_t e = idx[p];
    if (e >= N || e < -1) {
      status |= 1;
    } else if (e >= 0 && (ranks[e] < 0 || ranks[e] > r_max)) {
      status |= 2;
    }
  }
  return status;
}

// Enough work to be worth waking the thread pool (about 20 us of one core).
inline bool parallel_worth(int64_t T, int64_t k, int64_t r, int64_t d) { return T * k * r * d > (1 << 18); }

// The (slot, rank) rows of token t, slot by slot: P rows and Q rows of its adapters (entries already
// checked). Returns their count.
template <typename S>
inline int token_rows(int64_t t, const int64_t* idx, const int32_t* ranks, int64_t k, const S* P,
                      int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter, int64_t q_row,
                      const S** p_rows, const S** q_rows) {
  int n = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx[t * k + j];
    if (e < 0) continue;
    for (int r = 0; r < ranks[e]; ++r, ++n) {
      p_rows[n] = P + e * p_adapter + r * p_row;
      q_rows[n] = Q + e * q_adapter + r * q_row;
    }
  }
  return n;
}

// One thread's share: tokens [t0, t1). Its (token, slot) pairs are sorted by adapter (a counting sort), and
// each adapter's pairs run back to back, so the adapter's factors stay in L1 / L2 while its pairs stream by.
// A token's pairs all belong to one thread: no two threads write the same row of y.
template <typename S>
void mixture_tokens(int64_t t0, int64_t t1, S* y, int64_t y_row, const S* x, int64_t x_row, const S* P,
                    int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter, int64_t q_row,
                    const S* scales, const int64_t* idx, const S* coef, const int32_t* ranks, int64_t k,
                    int64_t N, int64_t d_p, int64_t d_q) {
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) ++start[idx[p] + 1];
  for (int64_t e = 0; e < N; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(start[N]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) order[fill[idx[p]]++] = p;
  const S* p_rows[kMaxRows];
  const S* q_rows[kMaxRows];
  S h[kTile * kMaxRows];
  for (int64_t e = 0; e < N; ++e) {
    if (start[e] == start[e + 1]) continue;
    const int rank = ranks[e];
    for (int r = 0; r < rank; ++r) {
      p_rows[r] = P + e * p_adapter + r * p_row;
      q_rows[r] = Q + e * q_adapter + r * q_row;
    }
    // Tiles of up to kTile distinct tokens; a token routed twice to e (duplicate slots) is one entry with the
    // summed coefficient, so no tile writes one row of y twice.
    int64_t s = start[e];
    while (s < start[e + 1]) {
      const S* xs[kTile];
      S* ys[kTile];
      S coefs[kTile];
      int m = 0;
      for (; m < kTile && s < start[e + 1]; ++m) {
        const int64_t token = order[s] / k;
        xs[m] = x + token * x_row;
        ys[m] = y + token * y_row;
        coefs[m] = 0;
        for (; s < start[e + 1] && order[s] / k == token; ++s) coefs[m] += coef[order[s]] * scales[e];
      }
      dot_tile(xs, m, p_rows, rank, d_p, h, kMaxRows);
      for (int u = 0; u < m; ++u)
        for (int r = 0; r < rank; ++r) h[u * kMaxRows + r] *= coefs[u];
      axpy_tile(h, kMaxRows, m, q_rows, rank, d_q, ys);
    }
  }
}

template <typename S>
int mixture(S* y, int64_t y_row, const S* x, int64_t x_row, const S* P, int64_t p_adapter, int64_t p_row,
            const S* Q, int64_t q_adapter, int64_t q_row, const S* scales, const int64_t* idx, const S* coef,
            const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max, int64_t d_p, int64_t d_q) {
  if (r_max > kMaxRows) return 3;
  const int status = check_entries(idx, ranks, T * k, N, r_max);
  if (status) return status;
#pragma omp parallel if (parallel_worth(T, k, r_max, d_p + d_q))
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    mixture_tokens(T * me / threads, T * (me + 1) / threads, y, y_row, x, x_row, P, p_adapter, p_row, Q,
                   q_adapter, q_row, scales, idx, coef, ranks, k, N, d_p, d_q);
  }
  return 0;
}

template <typename S>
int gate_grad(S* dw, const S* x, int64_t x_row, const S* g, int64_t g_row, const S* P, int64_t p_adapter,
              int64_t p_row, const S* R, int64_t r_adapter, int64_t r_row, const S* scales, const int64_t* idx,
              const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max, int64_t d_p, int64_t d_r) {
  if (k * r_max > kMaxRows) return 3;
  const int status = check_entries(idx, ranks, T * k, N, r_max);
  if (status) return status;
#pragma omp parallel for schedule(static) if (parallel_worth(T, k, r_max, d_p + d_r))
  for (int64_t t = 0; t < T; ++t) {
    const S* p_rows[kMaxRows];
    const S* r_rows[kMaxRows];
    S hx[kMaxRows], hg[kMaxRows];
    for (int64_t j = 0; j < k; ++j) dw[t * k + j] = 0;
    const int n = token_rows<S>(t, idx, ranks, k, P, p_adapter, p_row, R, r_adapter, r_row, p_rows, r_rows);
    if (n == 0) continue;
    const S* xt = x + t * x_row;
    const S* gt = g + t * g_row;
    dot_tile(&xt, 1, p_rows, n, d_p, hx, kMaxRows);
    dot_tile(&gt, 1, r_rows, n, d_r, hg, kMaxRows);
    int i = 0;
    for (int64_t j = 0; j < k; ++j) {            // rows come slot by slot, ranks[e] each
      const int64_t e = idx[t * k + j];
      if (e < 0) continue;
      S value = 0;
      for (int r = 0; r < ranks[e]; ++r, ++i) value += hx[i] * hg[i];
      dw[t * k + j] = value * scales[e];
    }
  }
  return 0;
}

}  // namespace

#define AM_EXPORT(S, suffix)                                                                                    \
  extern "C" int am_mixture_##suffix(S* y, int64_t y_row, const S* x, int64_t x_row, const S* P,             \
                                     int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter,          \
                                     int64_t q_row, const S* scales, const int64_t* idx, const S* coef,        \
                                     const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max,         \
                                     int64_t d_p, int64_t d_q) {                                               \
    return mixture<S>(y, y_row, x, x_row, P, p_adapter, p_row, Q, q_adapter, q_row, scales, idx, coef, ranks,  \
                      T, k, N, r_max, d_p, d_q);                                                               \
  }                                                                                                            \
  extern "C" int am_gate_grad_##suffix(S* dw, const S* x, int64_t x_row, const S* g, int64_t g_row,           \
                                       const S* P, int64_t p_adapter, int64_t p_row, const S* R,               \
                                       int64_t r_adapter, int64_t r_row, const S* scales, const int64_t* idx,  \
                                       const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max,       \
                                       int64_t d_p, int64_t d_r) {                                             \
    return gate_grad<S>(dw, x, x_row, g, g_row, P, p_adapter, p_row, R, r_adapter, r_row, scales, idx, ranks,  \
                        T, k, N, r_max, d_p, d_r);                                                             \
  }

AM_EXPORT(float, f32)
AM_EXPORT(double, f64)
