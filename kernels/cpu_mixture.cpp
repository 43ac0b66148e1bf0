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
// Backward (adapters frozen, `backward`): one pass in the same order, per pair hg = B[e] rows @ dy[t], then
// dw[t, j] = scales[e] * <A[e] rows @ x[t], hg> and dx[t] += coef[t, j] * scales[e] * hg @ A[e] rows.
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
// Design limits: float and double only (half types take the torch backend); rows of x, y, dy and the
// factors are contiguous (the launcher makes them so); r_max <= 1024; scratch per thread: its pairs' order
// (T * k / threads integers) and N + 1 counters, never (T, k, r, d) nor (T, k, d).
// Bad ids or ranks return an error code before anything is written (never an out-of-bounds read).

#include <omp.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxRows = 1024;   // rank rows of one adapter
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

// Tokens [t0, t1)'s (token, slot) pairs sorted by adapter (a counting sort: order holds the pair ids
// p = t * k + j, adapter e's at positions start[e] .. start[e + 1]; empty slots left out), then for each
// adapter e with pairs, tiles of up to kTile distinct tokens: body(e, m, tokens, coefs, first, order) for
// each, with, for u < m, tokens[u], coefs[u] = the sum of coef[p] * scales[e] over token u's pairs (a token
// routed twice to e is one tile entry, so no tile writes one row twice) and first[u] .. first[u + 1], the
// positions of its pairs in order.
template <typename S, typename Body>
inline void for_each_tile(int64_t t0, int64_t t1, const int64_t* idx, int64_t k, int64_t N, const S* coef,
                          const S* scales, Body body) {
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) ++start[idx[p] + 1];
  for (int64_t e = 0; e < N; ++e) start[e + 1] += start[e];
  std::vector<int64_t> order(start[N]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = t0 * k; p < t1 * k; ++p)
    if (idx[p] >= 0) order[fill[idx[p]]++] = p;
  for (int64_t e = 0; e < N; ++e) {
    int64_t s = start[e];
    while (s < start[e + 1]) {
      int64_t tokens[kTile], first[kTile + 1];
      S coefs[kTile];
      int m = 0;
      for (; m < kTile && s < start[e + 1]; ++m) {
        tokens[m] = order[s] / k;
        coefs[m] = 0;
        first[m] = s;
        for (; s < start[e + 1] && order[s] / k == tokens[m]; ++s) coefs[m] += coef[order[s]] * scales[e];
      }
      first[m] = s;
      body(e, m, tokens, coefs, first, order);
    }
  }
}

// One thread's share: tokens [t0, t1). Its (token, slot) pairs are sorted by adapter (a counting sort), and
// each adapter's pairs run back to back, so the adapter's factors stay in L1 / L2 while its pairs stream by.
// A token's pairs all belong to one thread: no two threads write the same row of y.
template <typename S>
void mixture_tokens(int64_t t0, int64_t t1, S* y, int64_t y_row, const S* x, int64_t x_row, const S* P,
                    int64_t p_adapter, int64_t p_row, const S* Q, int64_t q_adapter, int64_t q_row,
                    const S* scales, const int64_t* idx, const S* coef, const int32_t* ranks, int64_t k,
                    int64_t N, int64_t d_p, int64_t d_q) {
  const S* p_rows[kMaxRows];
  const S* q_rows[kMaxRows];
  S h[kTile * kMaxRows];
  for_each_tile(t0, t1, idx, k, N, coef, scales, [&](int64_t e, int m, const int64_t* tokens, const S* coefs,
                                                     const int64_t*, const std::vector<int64_t>&) {
    const int rank = ranks[e];
    for (int r = 0; r < rank; ++r) {
      p_rows[r] = P + e * p_adapter + r * p_row;
      q_rows[r] = Q + e * q_adapter + r * q_row;
    }
    const S* xs[kTile];
    S* ys[kTile];
    for (int u = 0; u < m; ++u) {
      xs[u] = x + tokens[u] * x_row;
      ys[u] = y + tokens[u] * y_row;
    }
    dot_tile(xs, m, p_rows, rank, d_p, h, kMaxRows);
    for (int u = 0; u < m; ++u)
      for (int r = 0; r < rank; ++r) h[u * kMaxRows + r] *= coefs[u];
    axpy_tile(h, kMaxRows, m, q_rows, rank, d_q, ys);
  });
}

// One thread's share of the backward (adapters frozen), tokens [t0, t1), in the forward's order (pairs sorted
// by adapter, tiles of up to kTile tokens):
//   hg = B[e] rows @ g[t]                      (rank dots over d_out)
//   dw[t, j] = scales[e] * <A[e] rows @ x[t], hg>           (when dw is wanted: rank dots over d_in)
//   dx[t] += coef[t, j] * scales[e] * hg @ A[e] rows        (when dx is wanted: rank axpys over d_in)
// so B[e]'s dots with g serve both gradients. A duplicate slot (one token routed twice to e) is one tile
// entry: its dx coefficient is the sum, and each of its slots gets the same dw. dw of empty slots is 0.
template <typename S>
void backward_tokens(int64_t t0, int64_t t1, S* dx, int64_t dx_row, S* dw, const S* x, int64_t x_row,
                     const S* g, int64_t g_row, const S* A, int64_t a_adapter, int64_t a_row, const S* Br,
                     int64_t b_adapter, int64_t b_row, const S* scales, const int64_t* idx, const S* coef,
                     const int32_t* ranks, int64_t k, int64_t N, int64_t d_in, int64_t d_out) {
  if (dw != nullptr)
    for (int64_t p = t0 * k; p < t1 * k; ++p) dw[p] = 0;
  const S* a_rows[kMaxRows];
  const S* b_rows[kMaxRows];
  S hg[kTile * kMaxRows];
  S hx[kTile * kMaxRows];
  for_each_tile(t0, t1, idx, k, N, coef, scales, [&](int64_t e, int m, const int64_t* tokens, const S* coefs,
                                                     const int64_t* first, const std::vector<int64_t>& order) {
    const int rank = ranks[e];
    for (int r = 0; r < rank; ++r) {
      a_rows[r] = A + e * a_adapter + r * a_row;
      b_rows[r] = Br + e * b_adapter + r * b_row;
    }
    const S* xs[kTile];
    const S* gs[kTile];
    S* dxs[kTile];
    for (int u = 0; u < m; ++u) {
      xs[u] = x + tokens[u] * x_row;
      gs[u] = g + tokens[u] * g_row;
      dxs[u] = dx == nullptr ? nullptr : dx + tokens[u] * dx_row;
    }
    dot_tile(gs, m, b_rows, rank, d_out, hg, kMaxRows);
    if (dw != nullptr) {
      dot_tile(xs, m, a_rows, rank, d_in, hx, kMaxRows);
      for (int u = 0; u < m; ++u) {
        S value = 0;
        for (int r = 0; r < rank; ++r) value += hx[u * kMaxRows + r] * hg[u * kMaxRows + r];
        for (int64_t q = first[u]; q < first[u + 1]; ++q) dw[order[q]] = value * scales[e];
      }
    }
    if (dx != nullptr) {
      for (int u = 0; u < m; ++u)
        for (int r = 0; r < rank; ++r) hg[u * kMaxRows + r] *= coefs[u];
      axpy_tile(hg, kMaxRows, m, a_rows, rank, d_in, dxs);
    }
  });
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
int backward(S* dx, int64_t dx_row, S* dw, const S* x, int64_t x_row, const S* g, int64_t g_row, const S* A,
             int64_t a_adapter, int64_t a_row, const S* Br, int64_t b_adapter, int64_t b_row, const S* scales,
             const int64_t* idx, const S* coef, const int32_t* ranks, int64_t T, int64_t k, int64_t N, int r_max,
             int64_t d_in, int64_t d_out) {
  if (r_max > kMaxRows) return 3;
  const int status = check_entries(idx, ranks, T * k, N, r_max);
  if (status) return status;
#pragma omp parallel if (parallel_worth(T, k, r_max, 2 * d_in + d_out))
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    backward_tokens(T * me / threads, T * (me + 1) / threads, dx, dx_row, dw, x, x_row, g, g_row, A, a_adapter,
                    a_row, Br, b_adapter, b_row, scales, idx, coef, ranks, k, N, d_in, d_out);
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
  extern "C" int am_backward_##suffix(S* dx, int64_t dx_row, S* dw, const S* x, int64_t x_row, const S* g,    \
                                      int64_t g_row, const S* A, int64_t a_adapter, int64_t a_row,             \
                                      const S* Br, int64_t b_adapter, int64_t b_row, const S* scales,          \
                                      const int64_t* idx, const S* coef, const int32_t* ranks, int64_t T,      \
                                      int64_t k, int64_t N, int r_max, int64_t d_in, int64_t d_out) {          \
    return backward<S>(dx, dx_row, dw, x, x_row, g, g_row, A, a_adapter, a_row, Br, b_adapter, b_row, scales,  \
                       idx, coef, ranks, T, k, N, r_max, d_in, d_out);                                         \
  }

AM_EXPORT(float, f32)
AM_EXPORT(double, f64)
