/*
 * sd_kernels: the few CPU kernels that decide Stable Diffusion's speed, for x86-64 with AVX2 and FMA (AVX-512 where
 * the CPU has it).
 *
 *   linear     y[M, N] = x[M, K] w[K, N] + b                      (every nn.Linear)
 *   conv2d     NHWC x [B, H, W, Cin] * HWIO w -> [B, H', W', Cout]  (every nn.Conv2d: 3x3 and 1x1, stride 1 or 2)
 *   attention  softmax(q k^T * scale) v per head, never holding more than a [96, 512] tile of scores
 *   groupNorm  GroupNorm with an optional SiLU after it, in three passes over the input
 *
 * All four are one matrix product in disguise, computed by a single register-blocked micro-kernel: a 6x16 tile of
 * the output lives in 12 AVX registers while the shared dimension streams through (BLIS, Goto & van de Geijn 2008);
 * where the CPU has AVX-512, a 12x32 tile in 24 of its 32 registers does the same over two panels at once (chosen
 * once when the module loads; both add each output's products in the same order, so they agree bit for bit).
 * The right-hand matrix is packed once into panels of 16 columns ("packWeights", done at model load for weights;
 * per call for attention's K and V); weight panels whose values are all exactly halves (any fp16 checkpoint) are
 * held as halves ("halvePanels") and widened one 256-deep block at a time, for every row of a block. The left-hand rows are not packed at all: the kernel reads each of its 6 rows
 * through its own pointer, so a convolution reads its input in place, one kernel tap at a time, and a padded tap
 * points at a row of zeros (indirect convolution, Dukhan 2019): no im2col buffer.
 *
 * Work is shared out between `threads` POSIX threads made per call (a call lasts milliseconds) in units each takes
 * in turn (blocks of output rows, of Winograd tiles, of attention queries), so a core held up elsewhere does less.
 * Loading packs weights on a thread of its own, while the next weight is read past the page cache (readDirect).
 * Every entry point checks that each array holds what the shapes claim before touching memory, and throws a
 * RangeError naming the argument when not. Built by `sd setup-native` (src/setup/kernels.ts) with plain
 * `cc -O3 -shared`; the AVX2 and AVX-512 code is compiled per function (target attribute), and `available()` says
 * whether this CPU can run the AVX2 baseline, so the same file builds everywhere and JavaScript falls back to
 * TensorFlow ops where it cannot.
 */
#define NAPI_VERSION 8
#include <node_api.h>
#include <cpuid.h>
#include <fcntl.h>
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <string.h>
#ifdef __linux__
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define NR 16         /* columns of the micro-tile: two AVX registers */
#ifndef KC
#define KC 256        /* shared-dimension block: a 256x16 panel of B (16 KiB) stays in L1 */
#endif
#ifndef MC
#define MC 192        /* rows of the output per block: 192 x 512 floats of C (384 KiB) stay in L2 */
#endif
#ifndef JN
#define JN 32         /* panels of B (x16 columns) per block */
#endif
#define MAX_THREADS 64
#define QB 96         /* attention: queries per work unit */
#define KB 512        /* attention: keys per block of the online softmax (256 ran SD 1.5's 64x64 attention ~5% slower) */
#define AVX2 __attribute__((target("avx2,fma")))

static float *zeros = NULL; /* a row of zeros for padded taps and missing rows, at least as long as any kc */
static size_t zeros_len = 0;

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

static float *wino_made = NULL; /* Winograd's U_xi made from taps by a call (wino_scratch), kept for the next */
static size_t wino_made_len = 0;

static const float *zero_row(size_t len) {
  if (len > zeros_len) {
    /* Only grows, only on the calling (main) thread, before workers start. */
    free(zeros);
    zeros = calloc(len, sizeof(float));
    zeros_len = zeros ? len : 0;
  }
  return zeros;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* The micro-kernel                                                                                                  */

/*
 * c[i][0..16) = (or += when accumulate) sum_k a[i][k] * b[k][0..16), i < 6, for kc steps; a: 6 row pointers, b: a
 * packed panel (16 floats per k), c: rows ldc apart (a 6x16 tile, or 6 full rows of a larger output). The AVX2 tile.
 */
AVX2 static void kernel_6x16(int kc, const float *const *a, const float *b, size_t bstride, float *c, size_t ldc,
                             int accumulate) {
  (void)bstride; /* one panel only */
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  _Pragma("GCC unroll 4") for (int k = 0; k < kc; k++) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    b += NR;
    __m256 x = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a4 + k);
    c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a5 + k);
    c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 acc[12] = { c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51 };
  for (int i = 0; i < 6; i++) {
    float *o = c + i * ldc;
    __m256 v0 = acc[2 * i], v1 = acc[2 * i + 1];
    if (accumulate) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o + 8));
    }
    _mm256_storeu_ps(o, v0);
    _mm256_storeu_ps(o + 8, v1);
  }
}

/*
 * The AVX-512 tile: 12 rows by P panels (P = 2: 32 columns in 24 zmm registers; P = 1 for a last odd panel). The
 * panels stay as packed for AVX2 (16 columns each); the second is read bstride floats after the first, so the same
 * packed weights serve both kernels. Per k: P loads of B, 12 broadcasts of A, 12 P FMAs of 16 lanes.
 */
__attribute__((target("avx512f,fma"), always_inline)) static inline void
tile_12(int kc, const float *const *a, const float *b, size_t bstride, float *c, size_t ldc, int accumulate, const int P) {
  __m512 acc[2][12];
  const float *ap[12];
  _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) {
    ap[i] = a[i];
    acc[0][i] = _mm512_setzero_ps();
    acc[1][i] = _mm512_setzero_ps();
  }
  const float *b1 = b + bstride;
  _Pragma("GCC unroll 2") for (int k = 0; k < kc; k++) {
    const __m512 v0 = _mm512_loadu_ps(b + (size_t)k * NR), v1 = P == 2 ? _mm512_loadu_ps(b1 + (size_t)k * NR) : v0;
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) {
      const __m512 x = _mm512_set1_ps(ap[i][k]);
      acc[0][i] = _mm512_fmadd_ps(x, v0, acc[0][i]);
      if (P == 2) acc[1][i] = _mm512_fmadd_ps(x, v1, acc[1][i]);
    }
  }
  _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) {
    for (int p = 0; p < P; p++) {
      float *o = c + i * ldc + p * NR;
      _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(acc[p][i], _mm512_loadu_ps(o)) : acc[p][i]);
    }
  }
}

__attribute__((target("avx512f,fma"))) static void kernel_12x32(int kc, const float *const *a, const float *b,
                                                                 size_t bstride, float *c, size_t ldc, int accumulate) {
  tile_12(kc, a, b, bstride, c, ldc, accumulate, 2);
}

__attribute__((target("avx512f,fma"))) static void kernel_12x16(int kc, const float *const *a, const float *b,
                                                                 size_t bstride, float *c, size_t ldc, int accumulate) {
  tile_12(kc, a, b, bstride, c, ldc, accumulate, 1);
}

/*
 * The micro-kernel in use, chosen once when the module loads (microKernel(name) changes it, for tests and benches):
 * an mr x (panels * 16) tile of C from mr row pointers and `panels` packed panels bstride floats apart; `one` does
 * the same for a single panel (the last panel of an odd count).
 */
typedef void (*micro_fn)(int kc, const float *const *a, const float *b, size_t bstride, float *c, size_t ldc, int accumulate);
/* Attention's softmax over one row of n scores, in the same ISA (defined with attention): the row's largest value;
   r[j] = exp(scale r[j] - m) in place, returning their sum. */
typedef float (*row_max_fn)(const float *r, size_t n);
typedef float (*row_exp_fn)(float *r, size_t n, float scale, float m);
typedef struct { const char *name; size_t mr, panels; micro_fn all, one; row_max_fn row_max; row_exp_fn row_exp; } micro_t;
#define MR_MAX 12

AVX2 static float row_max_avx2(const float *r, size_t n);
AVX2 static float row_exp_avx2(float *r, size_t n, float scale, float m);
__attribute__((target("avx512f,fma"))) static float row_max_avx512(const float *r, size_t n);
__attribute__((target("avx512f,fma"))) static float row_exp_avx512(float *r, size_t n, float scale, float m);

static const micro_t MICRO_AVX2 = { "avx2", 6, 1, kernel_6x16, kernel_6x16, row_max_avx2, row_exp_avx2 };
static const micro_t MICRO_AVX512 = { "avx512", 12, 2, kernel_12x32, kernel_12x16, row_max_avx512, row_exp_avx512 };
static micro_t micro = { "avx2", 6, 1, kernel_6x16, kernel_6x16, row_max_avx2, row_exp_avx2 };

/* The kernel for panels [jp, jp + micro.panels) when they exist, else for the one panel jp; *n says how many. */
static micro_fn micro_for(size_t jp, size_t panels, size_t *n) {
  *n = jp + micro.panels <= panels ? micro.panels : 1;
  return *n == micro.panels ? micro.all : micro.one;
}

/*
 * What is added to the product once, with the first shared block: a bias row (shared by all rows, or one per image:
 * row r uses bias row r / bias_rows) and a residual of the output's layout.
 */
typedef struct {
  const float *bias;
  size_t bias_rows; /* 0: one bias row for all */
  size_t ldb;
  const float *res;
  size_t ldr;
} epi_t;

/*
 * c[rows][cols] (row stride ldc; its top-left is (row0, col0) of C) = tile + epilogue, or += tile when accumulating;
 * the tile's rows are ldt apart.
 */
AVX2 static void write_tile(const float *tile, size_t ldt, float *c, size_t ldc, int rows, int cols, size_t row0,
                            size_t col0, const epi_t *e, int accumulate) {
  for (int i = 0; i < rows; i++) {
    const float *t = tile + i * ldt;
    float *o = c + i * ldc;
    const float *bias = NULL, *res = NULL;
    if (!accumulate && e) {
      if (e->bias) bias = e->bias + (e->bias_rows ? (row0 + i) / e->bias_rows * e->ldb : 0) + col0;
      if (e->res) res = e->res + (row0 + i) * e->ldr + col0;
    }
    if (cols == NR) {
      __m256 v0 = _mm256_loadu_ps(t), v1 = _mm256_loadu_ps(t + 8);
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o + 8));
      }
      if (bias) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
      }
      if (res) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res + 8));
      }
      _mm256_storeu_ps(o, v0);
      _mm256_storeu_ps(o + 8, v1);
    } else {
      for (int j = 0; j < cols; j++) o[j] = (accumulate ? o[j] : 0.0f) + t[j] + (bias ? bias[j] : 0.0f) + (res ? res[j] : 0.0f);
    }
  }
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Vector exp (Cephes' polynomial, relative error ~2e-7 on [-87, 88])                                                */

AVX2 static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The same, sixteen lanes at a time, operation for operation (so each lane's value is the same bits). */
__attribute__((target("avx512f,fma"))) static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Threads                                                                                                           */

typedef void (*task_fn)(void *ctx, int thread, int threads);
typedef struct { task_fn fn; void *ctx; int thread, threads; } task_t;

static void *run_task(void *p) {
  task_t *t = p;
  t->fn(t->ctx, t->thread, t->threads);
  return NULL;
}

/* Runs fn(ctx, t, n) for t in [0, n): n-1 new threads and the caller. */
static void parallel(task_fn fn, void *ctx, int n) {
  if (n < 1) n = 1;
  if (n > MAX_THREADS) n = MAX_THREADS;
  pthread_t ids[MAX_THREADS];
  task_t tasks[MAX_THREADS];
  int started = 0;
  for (int t = 1; t < n; t++) {
    tasks[t] = (task_t){ fn, ctx, t, n };
    if (pthread_create(&ids[t], NULL, run_task, &tasks[t]) != 0) break;
    started = t;
  }
  /* Threads that could not start are covered by the caller: it runs every slice from `started`+1 on. */
  for (int t = started + 1; t < n; t++) fn(ctx, t, n);
  fn(ctx, 0, n);
  for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
}

/*
 * Units of work taken in turn: each thread takes the next unit until none is left. Splitting the work evenly in
 * advance made every call wait for its slowest thread: a core held up for a while (the garbage collector, TensorFlow's
 * threads, another tenant of the host) held up the whole call by as much. `units` is a multiple of the thread count
 * whenever the work allows (units_of), so on idle cores the split stays even.
 */
typedef struct { atomic_size_t next; size_t units, size, total; } units_t;

/* `total` items in units of about `pref` (at most, unless that leaves fewer units than threads), in multiples of `align`. */
static void units_of(units_t *u, size_t total, size_t pref, size_t align, int threads) {
  const size_t n = (size_t)(threads < 1 ? 1 : threads), per = n * pref;
  const size_t want = n * ((total + per - 1) / per);
  size_t size = (total + want - 1) / want;
  size = (size + align - 1) / align * align;
  if (size == 0) size = align;
  atomic_init(&u->next, 0);
  u->size = size;
  u->total = total;
  u->units = (total + size - 1) / size;
}

/* The next unit's items [*i0, *i1); 0 when none is left. */
static int take(units_t *u, size_t *i0, size_t *i1) {
  const size_t k = atomic_fetch_add(&u->next, 1);
  if (k >= u->units) return 0;
  *i0 = k * u->size;
  *i1 = min_sz(u->total, *i0 + u->size);
  return 1;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* The blocked product: C[M, N] = A[M, K] B[K, N] (+ bias), B packed, rows of A given block by block                */

/* A row provider: where row m's values for shared indices [k0, k0 + kc) start (kc contiguous floats). */
typedef const float *(*row_fn)(const void *ctx, size_t m, size_t k0);

typedef struct {
  size_t M, N, K;
  row_fn row;
  const void *row_ctx;
  /* The shared dimension in blocks that a row provider can serve contiguously (convolution: within one tap). */
  const size_t *kstart;
  size_t kblocks;
  const float *packed;   /* ceil(N/16) panels of [K][16] */
  const uint16_t *half;  /* or the same panels in IEEE half precision (then packed is NULL) */
  epi_t epi;             /* bias and residual */
  float *c;
  size_t ldc;
  const uint16_t *bf16;  /* or the panels as bfloat16 pairs, for the bfloat16 product (then packed and half are NULL) */
  size_t segment;        /* the bfloat16 product: K's segments (a conv's Cin: one tap), each padded to a multiple of 32 */
  uint16_t *abuf;        /* the bfloat16 product's rows as bfloat16, per thread (gemm allocates them) */
  size_t c_row0, c_col0; /* c holds C from this row and column on (a block's scratch, linearGeglu); 0 and 0 for all of C */
} gemm_t;

/* out[0, n) = the halves h[0, n) as floats (F16C: every AVX2 CPU has it); gemm_block's panels and widenHalves. */
__attribute__((target("avx2,f16c"))) static void widen(const uint16_t *h, size_t n, float *out) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    _mm256_storeu_ps(out + i + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + 8))));
  }
  for (; i < n; i++) out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h[i])));
}

/*
 * gemm_block's edge panel after its first shared block: its bias and residual added to the block's sums in edge, as
 * write_tile adds them to a first block's tile, so that C's values are summed in the same order as a whole panel's.
 */
static void edge_epilogue(float *edge, int rows, int cols, size_t row0, size_t col0, const epi_t *e) {
  for (int i = 0; i < rows; i++) {
    float *t = edge + i * NR;
    const float *bias = e->bias ? e->bias + (e->bias_rows ? (row0 + i) / e->bias_rows * e->ldb : 0) + col0 : NULL;
    const float *res = e->res ? e->res + (row0 + i) * e->ldr + col0 : NULL;
    for (int j = 0; j < cols; j++) t[j] = t[j] + (bias ? bias[j] : 0.0f) + (res ? res[j] : 0.0f);
  }
}

/* B's panels [jp, jp + np) for the shared block [k0, k0 + kc): packed, or widened from halves into wide. */
static const float *panels_for(const gemm_t *g, size_t jp, size_t np, size_t k0, size_t kc, float *wide, size_t *bstride) {
  if (!g->half) {
    *bstride = g->K * NR;
    return g->packed + (jp * g->K + k0) * NR;
  }
  for (size_t p = 0; p < np; p++) widen(g->half + ((jp + p) * g->K + k0) * NR, kc * NR, wide + p * kc * NR);
  *bstride = kc * NR;
  return wide;
}

/*
 * Rows [0, n) (the row pointers `rows`) times np panels b, bstride apart, over one shared block of kc, into C at c
 * (rows ldc apart; `cols` of the np * 16 columns in C; row0, col0 where c sits in C, for the epilogue e): a whole
 * tile is added into C by the kernel itself after the first shared block (`later`), or written there straight when
 * there is no epilogue; any other goes through a tile and write_tile (the epilogue added with the first block).
 */
AVX2 static void micro_tiles(micro_fn kernel, int kc, const float *const *rows, size_t n, const float *b, size_t bstride, float *c,
                             size_t ldc, size_t np, size_t cols, size_t row0, size_t col0, const epi_t *e, int later) {
  float tile[MR_MAX * 2 * NR];
  const size_t mr = micro.mr;
  for (size_t ir = 0; ir < n; ir += mr) {
    float *o = c + ir * ldc;
    if ((later || !e) && cols == np * NR && ir + mr <= n) {
      kernel(kc, rows + ir, b, bstride, o, ldc, later);
      continue;
    }
    kernel(kc, rows + ir, b, bstride, tile, np * NR, 0);
    for (size_t q = 0; q < np; q++)
      write_tile(tile + q * NR, np * NR, o + q * NR, ldc, (int)min_sz(mr, n - ir), (int)min_sz(NR, cols - q * NR), row0 + ir, col0 + q * NR, e, later);
  }
}

/*
 * One block of rows [ic, ic + mc) times the panels [jp0, jp1) of B, over all of the shared dimension.
 *
 * A panel that C holds only part of (the last one, where N is not a multiple of 16: a conv_out's 4 channels) is
 * summed over every shared block in `edge`, the whole panel's width, and copied into C once at the end, its bias and
 * residual added after the first shared block as write_tile adds them (the same sums in the same order, the same
 * bits). Copying each shared block's tile into C instead (write_tile) ran the UNet's 320 -> 4 conv_out 6x slower than
 * a 320 -> 16 conv (70 against 11 ms at SDXL's 128x128, 17.5 against 2.8 ms at SD 1.5's 64x64, ~0.4% of its step; 2-core
 * Zen 5 EPYC); the VAE's 128 -> 3 ran at the same speed either way.
 */
AVX2 static void gemm_block(const gemm_t *g, size_t ic, size_t mc, size_t jp0, size_t jp1) {
  const float *rows[MC + MR_MAX];
  float wide[2 * KC * NR] __attribute__((aligned(64))); /* half panels, widened once for all the block's rows */
  float edge[(MC + MR_MAX) * NR] __attribute__((aligned(64)));
  const size_t mr = micro.mr;
  const size_t whole = jp1 * NR > g->N ? jp1 - 1 : jp1; /* panels [jp0, whole) are whole; one after them is not */
  for (size_t kb = 0; kb < g->kblocks; kb++) {
    const size_t k0 = g->kstart[kb], kc = g->kstart[kb + 1] - k0;
    for (size_t i = 0; i < mc; i++) rows[i] = g->row(g->row_ctx, ic + i, k0);
    for (size_t i = mc; i % mr; i++) rows[i] = zeros; /* missing rows of the last micro-tile read zeros */
    size_t np, bstride;
    for (size_t jp = jp0; jp < whole; jp += np) {
      const micro_fn kernel = micro_for(jp, whole, &np);
      const float *b = panels_for(g, jp, np, k0, kc, wide, &bstride);
      micro_tiles(kernel, (int)kc, rows, mc, b, bstride, g->c + (ic - g->c_row0) * g->ldc + (jp * NR - g->c_col0), g->ldc, np, np * NR, ic,
                  jp * NR, &g->epi, kb > 0);
    }
    if (whole == jp1) continue;
    const float *b = panels_for(g, whole, 1, k0, kc, wide, &bstride);
    for (size_t ir = 0; ir < mc; ir += mr) {
      micro.one((int)kc, rows + ir, b, bstride, edge + ir * NR, NR, kb > 0);
      if (kb == 0) edge_epilogue(edge + ir * NR, (int)min_sz(mr, mc - ir), (int)(g->N - whole * NR), ic + ir, whole * NR, &g->epi);
    }
  }
  if (whole == jp1) return;
  const size_t cols = g->N - whole * NR;
  for (size_t i = 0; i < mc; i++) memcpy(g->c + (ic + i - g->c_row0) * g->ldc + (whole * NR - g->c_col0), edge + i * NR, cols * sizeof(float));
}

/*
 * Rows [m0, m1) of C, in blocks of 192 rows by 512 columns: the block of C (384 KiB) stays in L2 while every shared
 * block passes through it, so C is written once; the rows' inputs for one shared block (192 x 256) are reused by all
 * 32 panels, and B, re-read once per block of rows, comes from L3 when it fits there. Half panels are widened once
 * per block of rows, so the taller the block the less that costs: 192 rows against 96 made a Linear with K = 320
 * (SD's 64x64 level) ~25% faster (Xeon @ 2.80GHz, AVX-512).
 */
static void gemm_rows(const gemm_t *g, size_t m0, size_t m1) {
  const size_t panels = (g->N + NR - 1) / NR, mc = MC, jn = JN;
  for (size_t ic = m0; ic < m1; ic += mc)
    for (size_t jp = 0; jp < panels; jp += jn) gemm_block(g, ic, min_sz(mc, m1 - ic), jp, min_sz(panels, jp + jn));
}

/* A product's rows shared out in units of about MC (whole micro-tiles). */
typedef struct { const gemm_t *g; units_t rows; } gemm_work_t;

static void gemm_task(void *ctx, int t, int n) {
  (void)t, (void)n;
  gemm_work_t *w = ctx;
  size_t m0, m1;
  while (take(&w->rows, &m0, &m1)) gemm_rows(w->g, m0, m1);
}

/*
 * Shared-dimension blocks of at most KC that never cross a multiple of `segment`, each segment cut into equal
 * blocks (320 -> 160 + 160, not 256 + 64: every kernel call then streams long enough to hide its fixed cost).
 */
static size_t k_blocks(size_t K, size_t segment, size_t *kstart) {
  size_t n = 0;
  for (size_t s = 0; s < K; s += segment) {
    const size_t len = min_sz(segment, K - s), parts = (len + KC - 1) / KC;
    for (size_t p = 0; p < parts; p++) kstart[n++] = s + len * p / parts;
  }
  kstart[n] = K;
  return n;
}


/* ---------------------------------------------------------------------------------------------------------------- */
/* bfloat16 products: the opt-in `--precision bf16`, on AMX tiles or AVX512-BF16                                    */

/*
 * The weights are packed once as bfloat16 (packWeights with bf16: round to nearest even, 8 bits of mantissa instead
 * of float32's 24) in the float32 product's 16-column panels, each pair of consecutive k interleaved, [K/2][16][2]:
 * the layout an AMX B tile reads (16 pair-rows of 64 bytes) and the one a VDPBF16PS multiplies by a broadcast pair of
 * A. A block of rows of A is rounded to bfloat16 once, over the whole shared dimension, each segment (a conv's tap:
 * Cin values) zero-filled to a multiple of 32, and serves every panel; C is made 32 x 32 at a time, summed over all
 * of K in float32 and written once with its bias and residual. The zero-filled k past a segment's end meet whatever
 * B holds there (the next tap, the next panel, or BF16_PAD zeros after the last panel) and add nothing. Only the
 * inputs are rounded; the README gives the image PSNR this costs against float32.
 *
 * Two ISAs compute that 32 x 32 block (`blocks_t`, chosen once): Intel AMX (Sapphire Rapids on), where TDPBF16PS
 * adds A[16][32] B[32][16] into a C tile in one instruction, 16x an AVX-512 FMA's multiply-adds; and AVX512-BF16
 * (AMD Zen 4 and 5, Intel Cooper Lake), where VDPBF16PS adds 16 columns' pairs of products into float32 lanes:
 * twice an FMA's multiply-adds, from half the bytes.
 */

#define BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
#define BF16_PAD 512         /* bfloat16 values after the last panel: what a tile reading past the end of K meets */
#define ABUF_BYTES (1 << 19) /* a thread's block of A rows as bfloat16 (at least 32 rows): stays in L2 */

static int amx_state = -1; /* -1 not asked yet; 0 no; 1 this CPU has AMX-BF16 and the kernel lets this process use it */

/* Whether AMX can run: AMX-TILE, AMX-BF16 and AVX512-BF16, and Linux's permission for tile state. */
static int amx_ready(void) {
  if (amx_state < 0) {
    unsigned a = 0, b = 0, c = 0, d = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 22)) &&
             __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
#if defined(__linux__) && defined(SYS_arch_prctl)
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: tile registers are off for a process until it asks */
    ok = ok && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    ok = 0;
#endif
    amx_state = ok;
  }
  return amx_state;
}

/* Whether VDPBF16PS can run: AVX512-BF16 with AVX512F and BW (and the OS saving zmm state, which cpu_supports checks). */
static int avx512bf16_ready(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); /* round to nearest, ties to even */
}

/* d[0, n) = r[0, n) as bfloat16 (round to nearest even). */
BF16 static inline void to_bf16_row(const float *r, size_t n, uint16_t *d) {
  size_t j = 0;
  for (; j + 32 <= n; j += 32)
    _mm512_storeu_si512(d + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r + j + 16), _mm512_loadu_ps(r + j)));
  if (j < n) { /* the last n - j < 32 values, under masks */
    const size_t t = n - j;
    const __mmask16 lo = (__mmask16)((1u << (t < 16 ? t : 16)) - 1), hi = (__mmask16)(t > 16 ? (1u << (t - 16)) - 1 : 0);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, r + j + 16), _mm512_maskz_loadu_ps(lo, r + j));
    _mm512_mask_storeu_epi16(d + j, (__mmask32)((1ull << t) - 1), (__m512i)v);
  }
}

/*
 * The block both ISAs compute: C [32][32] (float32, rows ldc apart) = (or += with `accumulate`) the sum over
 * segments s < nseg of A_s [32][k] B_s [k][32], where A_s starts at a + s * sa (rows lda bfloat16 apart) and B_s at
 * b0 + s * sb and b1 + s * sb (two panels, pairs of k interleaved); with `two` 0 only the left 16 columns, b0's.
 * k is a multiple of `kalign`: 32 for AMX (a tile's depth), 2 for AVX512-BF16 (a pair).
 */
typedef void (*block_fn)(float *c, size_t ldc, int accumulate, const uint16_t *a, size_t lda, size_t nseg, size_t sa,
                         const uint16_t *b0, const uint16_t *b1, size_t sb, size_t k, int two);

typedef struct {
  const char *name;
  size_t kalign;
  void (*begin)(void); /* on a thread, before its first block */
  void (*end)(void);   /* and after its last */
  block_fn block;
} blocks_t;

/* AMX: tiles 0-3 hold C (16 x 16 floats each); 4, 5: A (16 rows x 32 bf16); 6, 7: B (16 pair-rows x 16). */
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config_t;

/*
 * The configuration lives in static memory: GCC 12 does not see LDTILECFG read its 64 bytes and drops the stores of
 * one built on the stack (then every tile instruction faults as unconfigured).
 */
static const tile_config_t TILES = {
  .palette = 1,
  .colsb = { 64, 64, 64, 64, 64, 64, 64, 64 },
  .rows = { 16, 16, 16, 16, 16, 16, 16, 16 },
};

AMX static void tiles_begin(void) { _tile_loadconfig(&TILES); }
AMX static void tiles_end(void) { _tile_release(); }

AMX static void tiles_block(float *c, size_t ldc, int accumulate, const uint16_t *a, size_t lda, size_t nseg, size_t sa,
                            const uint16_t *b0, const uint16_t *b1, size_t sb, size_t k, int two) {
  if (accumulate) {
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    if (two) {
      _tile_loadd(1, c + NR, ldc * 4);
      _tile_loadd(3, c + 16 * ldc + NR, ldc * 4);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (size_t s = 0; s < nseg; s++, a += sa, b0 += sb, b1 += sb)
    for (size_t kk = 0; kk < k; kk += 32) {
      _tile_loadd(4, a + kk, lda * 2);
      _tile_loadd(5, a + 16 * lda + kk, lda * 2);
      _tile_loadd(6, b0 + kk * NR, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, b1 + kk * NR, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  if (two) {
    _tile_stored(1, c + NR, ldc * 4);
    _tile_stored(3, c + 16 * ldc + NR, ldc * 4);
  }
}

static void nothing(void) {}

/*
 * AVX512-BF16: 8 rows of the block at a time, their sums in 16 registers (8 without `two`) over all segments; per
 * pair of k, two B vectors and 8 broadcast pairs of A into VDPBF16PS.
 */
BF16 static inline void dp_rows(float *c, size_t ldc, int accumulate, const uint16_t *a, size_t lda, size_t nseg, size_t sa,
                                const uint16_t *b0, const uint16_t *b1, size_t sb, size_t k, int two) {
  __m512 s0[8], s1[8];
  for (int i = 0; i < 8; i++) {
    s0[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    s1[i] = accumulate && two ? _mm512_loadu_ps(c + i * ldc + NR) : _mm512_setzero_ps();
  }
  for (size_t s = 0; s < nseg; s++, a += sa, b0 += sb, b1 += sb)
    for (size_t p = 0; p < k; p += 2) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(b0 + p * NR);
      const __m512bh y = two ? (__m512bh)_mm512_loadu_si512(b1 + p * NR) : x;
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++) {
        uint32_t pair;
        memcpy(&pair, a + i * lda + p, sizeof pair);
        const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)pair);
        s0[i] = _mm512_dpbf16_ps(s0[i], ai, x);
        if (two) s1[i] = _mm512_dpbf16_ps(s1[i], ai, y);
      }
    }
  for (int i = 0; i < 8; i++) {
    _mm512_storeu_ps(c + i * ldc, s0[i]);
    if (two) _mm512_storeu_ps(c + i * ldc + NR, s1[i]);
  }
}

BF16 static void dp_block(float *c, size_t ldc, int accumulate, const uint16_t *a, size_t lda, size_t nseg, size_t sa,
                          const uint16_t *b0, const uint16_t *b1, size_t sb, size_t k, int two) {
  for (size_t r = 0; r < 32; r += 8) {
    if (two) dp_rows(c + r * ldc, ldc, accumulate, a + r * lda, lda, nseg, sa, b0, b1, sb, k, 1);
    else dp_rows(c + r * ldc, ldc, accumulate, a + r * lda, lda, nseg, sa, b0, b0, sb, k, 0);
  }
}

static const blocks_t BLOCKS_AMX = { "amx", 32, tiles_begin, tiles_end, tiles_block };
static const blocks_t BLOCKS_AVX512 = { "avx512bf16", 2, nothing, nothing, dp_block };

/* The bf16 products' ISA: AMX where it runs, else AVX512-BF16, else none (NULL); bf16() may switch it. */
static const blocks_t *blocks;
static int blocks_chosen;

static const blocks_t *bf16_blocks(void) {
  if (!blocks_chosen) {
    blocks = amx_ready() ? &BLOCKS_AMX : avx512bf16_ready() ? &BLOCKS_AVX512 : NULL;
    blocks_chosen = 1;
  }
  return blocks;
}

/* n rounded up to a multiple of the ISA's k alignment (a power of two). */
static size_t kround(const blocks_t *bl, size_t n) { return (n + bl->kalign - 1) & ~(bl->kalign - 1); }

/* The bf16 product's shape: K in segments of `segment` values, each padded to spad (the ISA's kalign); rows per block. */
static size_t bf16_spad(const gemm_t *g) { return kround(bf16_blocks(), g->segment); }
static size_t bf16_kp(const gemm_t *g) { return g->K / g->segment * bf16_spad(g); }
static size_t bf16_rows(const gemm_t *g) {
  const size_t fit = ABUF_BYTES / (bf16_kp(g) * sizeof(uint16_t)) & ~(size_t)31;
  return fit < 32 ? 32 : fit > MC ? MC : fit;
}

/* out[i] = row ic + i of A over all of K as bfloat16, each segment zero-filled to spad, for i < mc; zeros to mcp. */
BF16 static void pack_rows_bf16(const gemm_t *g, size_t ic, size_t mc, size_t mcp, uint16_t *out) {
  const size_t spad = bf16_spad(g), kp = bf16_kp(g), S = g->segment;
  for (size_t i = 0; i < mcp; i++) {
    uint16_t *row = out + i * kp;
    if (i >= mc) {
      memset(row, 0, kp * sizeof(uint16_t));
      continue;
    }
    for (size_t s = 0; s * S < g->K; s++) {
      uint16_t *dst = row + s * spad;
      size_t k = 0;
      for (size_t k0 = 0; k0 < S; k0 += KC) { /* a row provider serves at most KC values at a time */
        const size_t kc = min_sz(KC, S - k0);
        to_bf16_row(g->row(g->row_ctx, ic + i, s * S + k0), kc, dst + k0);
        k = k0 + kc;
      }
      for (; k < spad; k++) dst[k] = 0;
    }
  }
}

/* Rows [ic, ic + mc) of C times all its panels, from the rows packed in a, 32 x 32 of C at a time. */
static void gemm_block_bf16(const gemm_t *g, const blocks_t *bl, size_t ic, size_t mc, const uint16_t *a) {
  float tmp[32 * 32] __attribute__((aligned(64)));
  const size_t mcp = (mc + 31) & ~(size_t)31, ldc = g->ldc, kp = bf16_kp(g), spad = bf16_spad(g), S = g->segment;
  const size_t panels = (g->N + NR - 1) / NR;
  const int epilogue = g->epi.bias || g->epi.res;
  for (size_t jp = 0; jp < panels; jp += 2) {
    const int two = jp + 1 < panels, whole_cols = two && (jp + 2) * NR <= g->N;
    const uint16_t *b0 = g->bf16 + jp * g->K * NR, *b1 = b0 + g->K * NR;
    for (size_t ir = 0; ir < mcp; ir += 32) {
      /* each segment: its zero-filled spad values of A against the same k of B (past S: the next tap's, times 0) */
      float *c = g->c + (ic + ir) * ldc + jp * NR;
      if (!epilogue && whole_cols && ir + 32 <= mc) {
        bl->block(c, ldc, 0, a + ir * kp, kp, g->K / S, spad, b0, b1, S * NR, spad, 1);
        continue;
      }
      bl->block(tmp, 32, 0, a + ir * kp, kp, g->K / S, spad, b0, b1, S * NR, spad, two);
      for (size_t p = 0; p < (two ? 2u : 1u); p++) {
        const size_t col0 = (jp + p) * NR;
        write_tile(tmp + p * NR, 32, c + p * NR, ldc, (int)min_sz(32, mc - ir), (int)min_sz(NR, g->N - col0), ic + ir, col0,
                   &g->epi, 0);
      }
    }
  }
}

static void gemm_task_bf16(void *ctx, int t, int n) {
  (void)n;
  gemm_work_t *w = ctx;
  const gemm_t *g = w->g;
  const blocks_t *bl = bf16_blocks();
  uint16_t *a = g->abuf + (size_t)t * bf16_rows(g) * bf16_kp(g);
  size_t ic, m1;
  bl->begin();
  while (take(&w->rows, &ic, &m1)) {
    const size_t mc = m1 - ic;
    pack_rows_bf16(g, ic, mc, (mc + 31) & ~(size_t)31, a);
    gemm_block_bf16(g, bl, ic, mc, a);
  }
  bl->end();
}

/* The product for g: the bfloat16 one for bf16 panels, else the float32 one; 0 when out of memory (nothing computed). */
static int gemm(gemm_t *g, int threads) {
  gemm_work_t w = { g, { 0 } };
  if (!g->bf16) {
    units_of(&w.rows, g->M, MC, micro.mr, threads);
    parallel(gemm_task, &w, threads);
    return 1;
  }
  g->abuf = aligned_alloc(64, (size_t)threads * bf16_rows(g) * bf16_kp(g) * sizeof(uint16_t));
  if (!g->abuf) return 0;
  units_of(&w.rows, g->M, bf16_rows(g), 32, threads);
  parallel(gemm_task_bf16, &w, threads);
  free(g->abuf);
  g->abuf = NULL;
  return 1;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* N-API plumbing                                                                                                    */

typedef struct { napi_env env; napi_value *argv; size_t argc; int failed; } args_t;

static void fail(args_t *a, const char *msg) {
  if (!a->failed) napi_throw_range_error(a->env, NULL, msg);
  a->failed = 1;
}

static double num(args_t *a, size_t i, const char *name) {
  double v = 0;
  if (i >= a->argc || napi_get_value_double(a->env, a->argv[i], &v) != napi_ok) {
    char msg[128];
    snprintf(msg, sizeof msg, "sd_kernels: %s must be a number", name);
    fail(a, msg);
  }
  return v;
}

static size_t dim(args_t *a, size_t i, const char *name) {
  const double v = num(a, i, name);
  if (!a->failed && (v < 0 || v > 1e12 || v != (double)(size_t)v)) {
    char msg[128];
    snprintf(msg, sizeof msg, "sd_kernels: %s must be a non-negative integer, got %g", name, v);
    fail(a, msg);
    return 0;
  }
  return (size_t)v;
}

/* A Float32Array argument of at least `need` elements, or NULL (allowed only when `optional`). */
static float *f32(args_t *a, size_t i, const char *name, size_t need, int optional) {
  if (a->failed) return NULL;
  napi_valuetype type;
  if (i < a->argc && napi_typeof(a->env, a->argv[i], &type) == napi_ok && (type == napi_null || type == napi_undefined)) {
    if (!optional) {
      char msg[128];
      snprintf(msg, sizeof msg, "sd_kernels: %s is required", name);
      fail(a, msg);
    }
    return NULL;
  }
  if (i >= a->argc && optional) return NULL;
  bool is = false;
  if (i < a->argc) napi_is_typedarray(a->env, a->argv[i], &is);
  napi_typedarray_type tt;
  size_t len = 0;
  void *data = NULL;
  if (!is || napi_get_typedarray_info(a->env, a->argv[i], &tt, &len, &data, NULL, NULL) != napi_ok || tt != napi_float32_array) {
    char msg[128];
    snprintf(msg, sizeof msg, "sd_kernels: %s must be a Float32Array", name);
    fail(a, msg);
    return NULL;
  }
  if (len < need) {
    char msg[160];
    snprintf(msg, sizeof msg, "sd_kernels: %s holds %zu floats, the shapes need %zu", name, len, need);
    fail(a, msg);
    return NULL;
  }
  return data;
}

static void settle_packs(napi_env env); /* waits for packing in the background (packWeights with later) */

/*
 * Packed panels of at least `need` values: a Float32Array (into *packed), or a Uint16Array of halves from halvePanels
 * (into *half).
 */
static void panels_arg(args_t *a, size_t i, size_t need, size_t need_half, const float **packed, const uint16_t **half) {
  *packed = NULL;
  *half = NULL;
  if (a->failed) return;
  settle_packs(a->env); /* panels are read only once packed */
  bool is = false;
  napi_typedarray_type tt;
  size_t len = 0;
  void *data = NULL;
  if (i < a->argc) napi_is_typedarray(a->env, a->argv[i], &is);
  if (!is || napi_get_typedarray_info(a->env, a->argv[i], &tt, &len, &data, NULL, NULL) != napi_ok ||
      (tt != napi_float32_array && tt != napi_uint16_array)) {
    fail(a, "sd_kernels: packed must be a Float32Array, or a Uint16Array of halves");
    return;
  }
  if (tt == napi_uint16_array) need = need_half;
  if (len < need) {
    char msg[160];
    snprintf(msg, sizeof msg, "sd_kernels: packed holds %zu values, the shapes need %zu", len, need);
    fail(a, msg);
    return;
  }
  if (tt == napi_float32_array) *packed = data;
  else *half = data;
}

static int get_args(napi_env env, napi_callback_info info, napi_value *argv, size_t max, args_t *a) {
  a->env = env;
  a->argv = argv;
  a->argc = max;
  a->failed = 0;
  return napi_get_cb_info(env, info, &a->argc, argv, NULL, NULL) == napi_ok;
}

static int threads_arg(args_t *a, size_t i) {
  const size_t t = dim(a, i, "threads");
  return t < 1 ? 1 : t > MAX_THREADS ? MAX_THREADS : (int)t;
}

static int bool_arg(args_t *a, size_t i) {
  bool v = false;
  if (!a->failed && i < a->argc) napi_get_value_bool(a->env, a->argv[i], &v);
  return v;
}

/* bf16 panels (packWeights with bf16) for a product whose shared segments (K, or a conv's Cin) are even, on a CPU with AMX or AVX512-BF16. */
static void bf16_check(args_t *a, const float *packed, size_t segment) {
  if (a->failed) return;
  if (packed) fail(a, "sd_kernels: bf16 panels must be the Uint16Array packWeights(..., bf16) made");
  else if (segment % 2) fail(a, "sd_kernels: bf16 panels need an even shared dimension (a conv's Cin)");
  else if (!bf16_blocks()) fail(a, "sd_kernels: bf16 panels need AMX-BF16 or AVX512-BF16, which this CPU (or its OS) does not offer");
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* packWeights(w, K, N, layout, taps) -> Float32Array, ceil(N/16) panels of [K][16] holding B[k][n], where w is    */
/*   layout 0: B itself, [K, N] row-major;  1: [N, K] (nn.Linear's [out, in]);                                    */
/*   layout 2: OIHW [N, Cin, kh, kw] with taps = kh*kw and Cin = K / taps, read as k = (ky*kw + kx)*Cin + ci.      */

static size_t packed_len(size_t K, size_t N) { return (N + NR - 1) / NR * K * NR; }

/* Where row r, column c of a bfloat16 B panel is: pairs of rows interleaved, [rows/2][16][2]. */
static size_t pair_at(size_t r, size_t c) { return r / 2 * 2 * NR + c * 2 + r % 2; }

/*
 * packWeights(..., bf16 = true): the same panels as bfloat16 (round to nearest even) with each pair of k
 * interleaved, [ceil(N/16)][K/2][16][2], then BF16_PAD zeros: the bfloat16 product's B, made without a float32 copy.
 */
static napi_value bf16_panels(napi_env env, const float *w, size_t K, size_t N, size_t layout, size_t taps) {
  napi_value buf, out;
  void *data;
  const size_t len = packed_len(K, N), cin = K / taps;
  if (napi_create_arraybuffer(env, (len + BF16_PAD) * sizeof(uint16_t), &data, &buf) != napi_ok) return NULL;
  uint16_t *p = data;
  for (size_t jp = 0; jp * NR < N; jp++)
    for (size_t k = 0; k < K; k++)
      for (size_t j = 0; j < NR; j++) {
        const size_t n = jp * NR + j;
        const float v = n >= N ? 0.0f : layout == 0 ? w[k * N + n] : layout == 1 ? w[n * K + k] : w[(n * cin + k % cin) * taps + k / cin];
        p[jp * K * NR + pair_at(k, j)] = to_bf16(v);
      }
  memset(p + len, 0, BF16_PAD * sizeof(uint16_t));
  napi_create_typedarray(env, napi_uint16_array, len + BF16_PAD, buf, 0, &out);
  return out;
}

/*
 * Panel jp of the packWeights panels of w, whose elements are `es` bytes (float32, or IEEE halves packed as they are
 * stored): K rows of NR outputs, the outputs past N zero. Inlined for each element size, so each copy is one move.
 * The source is read in its own order (a Linear's row, a filter's taps), the panel written across.
 */
__attribute__((always_inline)) static inline void pack_panel(const char *w, size_t K, size_t N, size_t layout, size_t taps,
                                                             size_t jp, char *p, const size_t es) {
  const size_t cin = K / taps, cols = min_sz(NR, N - jp * NR);
  char *panel = p + jp * K * NR * es;
  if (cols < NR) memset(panel, 0, K * NR * es);
  if (layout == 0) {
    for (size_t k = 0; k < K; k++) memcpy(panel + k * NR * es, w + (k * N + jp * NR) * es, cols * es);
    return;
  }
  for (size_t j = 0; j < cols; j++) {
    const char *src = w + (jp * NR + j) * K * es; /* [N, K] and OIHW both hold output n's K values together */
    if (layout == 1)
      for (size_t k = 0; k < K; k++) memcpy(panel + (k * NR + j) * es, src + k * es, es);
    else
      for (size_t ci = 0; ci < cin; ci++)
        for (size_t t = 0; t < taps; t++) memcpy(panel + ((t * cin + ci) * NR + j) * es, src + (ci * taps + t) * es, es);
  }
}

typedef struct { const char *w; size_t K, N, layout, taps, es; char *p; units_t panels; } pack_t;

static void pack_task(void *ctx, int t, int n) {
  (void)t, (void)n;
  pack_t *s = ctx;
  size_t j0, j1;
  while (take(&s->panels, &j0, &j1))
    for (size_t jp = j0; jp < j1; jp++)
      if (s->es == 2) pack_panel(s->w, s->K, s->N, s->layout, s->taps, jp, s->p, 2);
      else pack_panel(s->w, s->K, s->N, s->layout, s->taps, jp, s->p, 4);
}

/* p = the packWeights panels of w, float32 (es 4) or halves (es 2), the panels shared out among `threads`. */
static void pack_panels(const void *w, size_t K, size_t N, size_t layout, size_t taps, size_t es, void *p, int threads) {
  pack_t s = { w, K, N, layout, taps, es, p };
  units_of(&s.panels, (N + NR - 1) / NR, 4, 1, threads);
  parallel(pack_task, &s, threads);
}

/*
 * Packing in the background. packWeights(..., later = true) hands the packing to a thread of this environment's
 * (napi instance data) and returns the panels at once, so that a loader reads the next weight from the disk while
 * this one is packed: the reads wait on the disk, the packing keeps the cores busy. Until a job is done its source
 * and panels are held (napi references, dropped on this thread once it is), and:
 * - every entry point that reads panels (panels_arg), frees them (releasePanels) or halves them first waits for
 *   every job (settle_packs), so no one sees panels half packed;
 * - the caller must not change a source until awaitPacks(source) returns (the loader reuses its buffers).
 */
typedef struct pack_job {
  pack_t work;
  const char *src;
  size_t src_bytes;
  int threads, done;
  napi_ref src_ref, dst_ref;
  struct pack_job *next;
} pack_job_t;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t work, finished;
  pack_job_t *jobs; /* oldest first, done or not: done ones wait for reap() to drop their references */
  int started, stop;
  pthread_t thread;
} packer_t;

static void *packer_thread(void *p) {
  packer_t *q = p;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    pack_job_t *j = q->jobs;
    while (j && j->done) j = j->next;
    if (!j) {
      if (q->stop) break;
      pthread_cond_wait(&q->work, &q->mu);
      continue;
    }
    pthread_mutex_unlock(&q->mu);
    units_of(&j->work.panels, (j->work.N + NR - 1) / NR, 4, 1, j->threads);
    parallel(pack_task, &j->work, j->threads);
    pthread_mutex_lock(&q->mu);
    j->done = 1;
    pthread_cond_broadcast(&q->finished);
  }
  pthread_mutex_unlock(&q->mu);
  return NULL;
}

/* At the environment's end (a worker thread's exit): the jobs are finished, the thread stopped. */
static void packer_free(napi_env env, void *data, void *hint) {
  (void)env, (void)hint;
  packer_t *q = data;
  if (q->started) {
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->thread, NULL);
  }
  for (pack_job_t *j = q->jobs, *next; j; j = next) next = j->next, free(j);
  free(q);
}

/* This environment's packer, made on first use; NULL where there is none (no memory, or no instance data). */
static packer_t *packer_of(napi_env env, int make) {
  packer_t *q = NULL;
  if (napi_get_instance_data(env, (void **)&q) != napi_ok) return NULL;
  if (q || !make) return q;
  q = calloc(1, sizeof *q);
  if (!q) return NULL;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->work, NULL);
  pthread_cond_init(&q->finished, NULL);
  if (napi_set_instance_data(env, q, packer_free, NULL) != napi_ok) return free(q), NULL;
  return q;
}

/* Drops the references of finished jobs (on the environment's own thread, as napi requires). */
static void reap(napi_env env, packer_t *q) {
  pthread_mutex_lock(&q->mu);
  pack_job_t *done = NULL, **at = &q->jobs;
  while (*at) {
    pack_job_t *j = *at;
    if (j->done) *at = j->next, j->next = done, done = j;
    else at = &j->next;
  }
  pthread_mutex_unlock(&q->mu);
  while (done) {
    pack_job_t *next = done->next;
    napi_delete_reference(env, done->src_ref);
    napi_delete_reference(env, done->dst_ref);
    free(done);
    done = next;
  }
}

/* Waits for the jobs that read [from, from + bytes), or for every job where from is NULL. */
static void wait_packs(napi_env env, const void *from, size_t bytes) {
  packer_t *q = packer_of(env, 0);
  if (!q) return;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    pack_job_t *j = q->jobs;
    while (j && (j->done || (from && (j->src >= (const char *)from + bytes || j->src + j->src_bytes <= (const char *)from)))) j = j->next;
    if (!j) break;
    pthread_cond_wait(&q->finished, &q->mu);
  }
  pthread_mutex_unlock(&q->mu);
  reap(env, q);
}

static void settle_packs(napi_env env) { wait_packs(env, NULL, 0); }

/* Queues the job of packing w into p; false (nothing queued) where no thread can take it, and the caller packs. */
static int pack_later(napi_env env, napi_value w_value, napi_value p_value, const pack_t *work, size_t src_bytes, int threads) {
  packer_t *q = packer_of(env, 1);
  if (!q) return 0;
  reap(env, q);
  pack_job_t *j = calloc(1, sizeof *j);
  if (!j) return 0;
  *j = (pack_job_t){ .work = *work, .src = work->w, .src_bytes = src_bytes, .threads = threads };
  if (napi_create_reference(env, w_value, 1, &j->src_ref) != napi_ok) return free(j), 0;
  if (napi_create_reference(env, p_value, 1, &j->dst_ref) != napi_ok) {
    napi_delete_reference(env, j->src_ref);
    return free(j), 0;
  }
  pthread_mutex_lock(&q->mu);
  if (!q->started) q->started = pthread_create(&q->thread, NULL, packer_thread, q) == 0;
  const int ok = q->started;
  if (ok) {
    pack_job_t **at = &q->jobs;
    while (*at) at = &(*at)->next;
    *at = j;
    pthread_cond_signal(&q->work);
  }
  pthread_mutex_unlock(&q->mu);
  if (!ok) {
    napi_delete_reference(env, j->src_ref);
    napi_delete_reference(env, j->dst_ref);
    free(j);
  }
  return ok;
}

/*
 * awaitPacks(source) returns once no packing in the background reads that typed array's memory, and drops what
 * finished jobs held; awaitPacks() once every job is done.
 */
static napi_value await_packs(napi_env env, napi_callback_info info) {
  size_t argc = 1, n = 0;
  napi_value argv[1];
  void *data = NULL;
  napi_typedarray_type t = napi_uint8_array;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc == 0) settle_packs(env);
  else if (napi_get_typedarray_info(env, argv[0], &t, &n, &data, NULL, NULL) == napi_ok)
    wait_packs(env, data, n * (t == napi_uint16_array ? 2 : t == napi_uint8_array ? 1 : 4));
  else settle_packs(env);
  return NULL;
}

/*
 * packWeights(w, K, N, layout, taps, bf16 = false, threads = 1, later = false): w a Float32Array, or a Uint16Array of
 * IEEE halves (a weight as an fp16 file stores it), whose panels are then halves too: what halvePanels makes of the
 * float32 panels of the same values, with no float32 copy on the way. With `later`, packed in the background (see
 * "Packing in the background" above).
 */
static napi_value pack_weights(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  args_t a;
  if (!get_args(env, info, argv, 8, &a)) return NULL;
  const size_t K = dim(&a, 1, "K"), N = dim(&a, 2, "N"), layout = dim(&a, 3, "layout");
  const size_t taps = layout == 2 ? dim(&a, 4, "taps") : 1;
  const int bf = bool_arg(&a, 5);
  const int threads = a.argc > 6 ? threads_arg(&a, 6) : 1, later = bool_arg(&a, 7);
  if (!a.failed && (layout > 2 || taps == 0 || K % taps != 0)) fail(&a, "sd_kernels: packWeights: layout must be 0, 1 or 2 and taps must divide K");
  if (!a.failed && bf && (K / taps) % 2) fail(&a, "sd_kernels: packWeights: bf16 panels need an even shared segment (a conv's Cin)");
  napi_typedarray_type tt = napi_float32_array;
  bool is = false;
  size_t have = 0;
  void *w = NULL;
  if (!a.failed && a.argc > 0) napi_is_typedarray(env, argv[0], &is);
  if (!a.failed && (!is || napi_get_typedarray_info(env, argv[0], &tt, &have, &w, NULL, NULL) != napi_ok ||
                    (tt != napi_float32_array && tt != napi_uint16_array)))
    fail(&a, "sd_kernels: packWeights: w must be a Float32Array, or a Uint16Array of IEEE halves");
  if (!a.failed && tt == napi_uint16_array && bf) fail(&a, "sd_kernels: packWeights: bf16 panels are made from float32 weights, not halves");
  if (!a.failed && have < K * N) {
    char msg[160];
    snprintf(msg, sizeof msg, "sd_kernels: w holds %zu values, the shapes need %zu", have, K * N);
    fail(&a, msg);
  }
  if (a.failed) return NULL;
  if (bf) return bf16_panels(env, w, K, N, layout, taps);
  const size_t len = packed_len(K, N), es = tt == napi_uint16_array ? 2 : 4;
  napi_value buf, out;
  void *data;
  if (napi_create_arraybuffer(env, len * es, &data, &buf) != napi_ok) return NULL;
  napi_create_typedarray(env, es == 2 ? napi_uint16_array : napi_float32_array, len, buf, 0, &out);
  const pack_t work = { w, K, N, layout, taps, es, data };
  if (!later || !pack_later(env, argv[0], out, &work, K * N * es, threads)) pack_panels(w, K, N, layout, taps, es, data, threads);
  return out;
}

/*
 * halvePanels(panels Float32Array) -> Uint16Array of the same values as IEEE halves, or null when a value is not
 * exactly a half (the panels then stay float32). Weights read from an fp16 checkpoint always are: held this way they
 * take half the memory and compute exactly as before, widened block by block in gemm_block.
 */
/* Whether x[0, n) are all exactly halves; with h, also writes them there. */
__attribute__((target("avx2,f16c"))) static int halve(const float *x, size_t n, uint16_t *h) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m128i hv = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 back = _mm256_cvtph_ps(hv);
    if (_mm256_movemask_ps(_mm256_cmp_ps(back, v, _CMP_EQ_OQ)) != 0xff) return 0;
    if (h) _mm_storeu_si128((__m128i *)(h + i), hv);
  }
  for (; i < n; i++) {
    const __m128i hv = _mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (_mm_cvtss_f32(_mm_cvtph_ps(hv)) != x[i]) return 0;
    if (h) h[i] = (uint16_t)_mm_extract_epi16(hv, 0);
  }
  return 1;
}

/* x[0, n), every one exactly a half (halve said so), as a Uint16Array of halves. */
static napi_value halves_of(napi_env env, const float *x, size_t n) {
  napi_value buf, out;
  void *data;
  if (napi_create_arraybuffer(env, n * sizeof(uint16_t), &data, &buf) != napi_ok) return NULL;
  halve(x, n, data);
  napi_create_typedarray(env, napi_uint16_array, n, buf, 0, &out);
  return out;
}

static napi_value halve_panels(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  args_t a;
  if (!get_args(env, info, argv, 1, &a)) return NULL;
  settle_packs(env);
  const float *x = f32(&a, 0, "panels", 0, 0);
  if (a.failed) return NULL;
  size_t len = 0;
  napi_get_typedarray_info(env, argv[0], NULL, &len, NULL, NULL, NULL);
  if (halve(x, len, NULL)) return halves_of(env, x, len); /* checked before allocating */
  napi_value none;
  napi_get_null(env, &none);
  return none;
}

/*
 * bf16([name]) -> the ISA of the bfloat16 products ("amx" or "avx512bf16"), or null where this CPU (or its OS) runs
 * neither; with a name, switches to it first (a RangeError when it cannot run here). Only between calls.
 */
static napi_value bf16_isa(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype type = napi_undefined;
  if (argc > 0) napi_typeof(env, argv[0], &type);
  const blocks_t *use = bf16_blocks();
  if (type != napi_undefined) {
    char name[16] = "";
    size_t len = 0;
    if (type != napi_string || napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok) {
      napi_throw_type_error(env, NULL, "sd_kernels: bf16 takes \"amx\" or \"avx512bf16\"");
      return NULL;
    }
    use = strcmp(name, "amx") == 0 && amx_ready() ? &BLOCKS_AMX
        : strcmp(name, "avx512bf16") == 0 && avx512bf16_ready() ? &BLOCKS_AVX512
        : NULL;
    if (!use) {
      char msg[112];
      snprintf(msg, sizeof msg, "sd_kernels: bf16 ISA \"%s\" is not one this CPU runs (amx, avx512bf16)", name);
      napi_throw_range_error(env, NULL, msg);
      return NULL;
    }
    blocks = use;
  }
  napi_value r;
  if (use) napi_create_string_utf8(env, use->name, NAPI_AUTO_LENGTH, &r);
  else napi_get_null(env, &r);
  return r;
}

/*
 * widenHalves(src Uint16Array, out Float32Array): IEEE halves -> float32 (F16C), the same values as a table lookup;
 * fp16 checkpoints decode through it as they load (src/weights/dtypes.ts), several times faster than JS.
 */
static napi_value widen_halves(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_typedarray_type ts, to;
  size_t ns = 0, no = 0;
  void *hs = NULL, *xo = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 2 ||
      napi_get_typedarray_info(env, argv[0], &ts, &ns, &hs, NULL, NULL) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &to, &no, &xo, NULL, NULL) != napi_ok || ts != napi_uint16_array ||
      to != napi_float32_array || ns != no) {
    napi_throw_type_error(env, NULL, "sd_kernels: widenHalves(src Uint16Array, out Float32Array of the same length)");
    return NULL;
  }
  widen(hs, ns, xo);
  return NULL;
}

/*
 * readAhead(fd, offset, length) -> whether the system was asked to read that part of the file into its page cache
 * in the background (posix_fadvise WILLNEED): weights files read ahead of their decoding (src/weights/safetensors.ts).
 * Linux reads at most max(the device's largest request, its readahead window) per WILLNEED (one call for 128 MB read
 * 8 MB on a virtio disk), so the range is asked for in steps of AHEAD_STEP, 1 MB: within that bound on common disks
 * (1280 KB by default), and large requests (steps of 256 KB loaded an fp16 file at half the speed, a virtio disk).
 * Asking blocks while the disk's queue is full, so a thread of its own asks, on a copy of the descriptor (the caller
 * may close its own).
 */
#define AHEAD_STEP ((off_t)1 << 20)

typedef struct { int fd; off_t offset, length; } ahead_t;

static void advise_ahead(const ahead_t *a) {
#ifdef POSIX_FADV_WILLNEED
  for (off_t o = 0; o < a->length; o += AHEAD_STEP)
    posix_fadvise(a->fd, a->offset + o, a->length - o < AHEAD_STEP ? a->length - o : AHEAD_STEP, POSIX_FADV_WILLNEED);
#else
  (void)a;
#endif
}

static void *ahead_thread(void *p) {
  ahead_t *a = p;
  advise_ahead(a);
  close(a->fd);
  free(a);
  return NULL;
}

/*
 * The three arguments of the file helpers (readAhead, readDirect, pageCached) into argv, the first `ints` of them
 * as non-negative integers into v (a descriptor, a position, a length); false unless all of that holds.
 */
static bool file_args(napi_env env, napi_callback_info info, napi_value argv[3], int64_t *v, int ints) {
  size_t argc = 3;
  bool ok = napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == 3;
  for (int i = 0; ok && i < ints; i++) ok = napi_get_value_int64(env, argv[i], &v[i]) == napi_ok && v[i] >= 0;
  return ok;
}

static napi_value read_ahead(napi_env env, napi_callback_info info) {
  napi_value argv[3], r;
  int64_t v[3] = { -1, -1, -1 };
  bool ok = file_args(env, info, argv, v, 3);
#ifdef POSIX_FADV_WILLNEED
  ok = ok && fcntl((int)v[0], F_GETFD) != -1;
  ahead_t *a = ok ? malloc(sizeof *a) : NULL;
  if (a) {
    *a = (ahead_t){ fcntl((int)v[0], F_DUPFD_CLOEXEC, 0), (off_t)v[1], (off_t)v[2] };
    pthread_t id;
    pthread_attr_t attr;
    int started = 0;
    if (a->fd >= 0 && pthread_attr_init(&attr) == 0) {
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      started = pthread_create(&id, &attr, ahead_thread, a) == 0;
      pthread_attr_destroy(&attr);
    }
    if (!started) { /* no thread (or no descriptor to spare): ask from here */
      if (a->fd >= 0) close(a->fd);
      a->fd = (int)v[0];
      advise_ahead(a);
      free(a);
    }
  }
#else
  ok = false;
#endif
  napi_get_boolean(env, ok, &r);
  return r;
}

/*
 * readDirect(fd, position, out) -> whether out now holds the file's bytes [position, position + out.byteLength), read
 * past the page cache: fd is the file opened with O_DIRECT (src/weights/safetensors.ts). A read through the cache
 * costs the system a page of its cache for every 4 KB, which on a VM that hands its freed memory back to the host
 * is a fault in the host as well: loading an fp16 SD 1.5 file from a cold cache took 11 s of system time against 3
 * s with the file cached, and `dd` through the cache read at 390-500 MB/s where direct reads ran at 0.9-1.4 GB/s
 * with a tenth of its CPU time (2-core AMD EPYC VM). The disk reads whole aligned blocks, DIRECT_CHUNK at a time, into
 * a buffer kept for the next call (the main thread's alone), whose part in range is copied to out. False, with out
 * unspecified, where the system refuses (EINVAL: a file system without direct I/O) or the file ends first; the caller
 * then reads through the cache, which says why.
 */
#define DIRECT_ALIGN ((size_t)4096) /* the largest logical block size of common disks */
#define DIRECT_CHUNK ((size_t)8 << 20)

static void *direct_buf = NULL;

static napi_value read_direct(napi_env env, napi_callback_info info) {
  size_t len = 0;
  napi_value argv[3], r;
  int64_t v[2] = { -1, -1 };
  napi_typedarray_type type = napi_int8_array;
  void *out = NULL;
  bool ok = file_args(env, info, argv, v, 2) && napi_get_typedarray_info(env, argv[2], &type, &len, &out, NULL, NULL) == napi_ok;
  const int64_t fd = v[0], pos = v[1];
  if (ok && type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "sd_kernels: readDirect(fd, position, out Uint8Array)");
    return NULL;
  }
#ifdef __linux__
  if (ok && !direct_buf && posix_memalign(&direct_buf, DIRECT_ALIGN, DIRECT_CHUNK) != 0) direct_buf = NULL;
  ok = ok && direct_buf;
  const size_t begin = (size_t)pos, end = begin + len;
  for (size_t at = begin & ~(DIRECT_ALIGN - 1); ok && at < end;) {
    const size_t want = min_sz(DIRECT_CHUNK, ((end + DIRECT_ALIGN - 1) & ~(DIRECT_ALIGN - 1)) - at);
    const ssize_t got = pread((int)fd, direct_buf, want, (off_t)at);
    if (got < 0 && errno == EINTR) continue;
    ok = got > 0;
    if (!ok) break;
    const size_t from = at < begin ? begin : at, to = min_sz(end, at + (size_t)got);
    if (to > from) memcpy((char *)out + (from - begin), (char *)direct_buf + (from - at), to - from);
    at += (size_t)got;
    ok = (size_t)got == want || at >= end; /* a short read ends the file */
  }
#else
  ok = false;
#endif
  napi_get_boolean(env, ok, &r);
  return r;
}

/*
 * pageCached(fd, position, length) -> whether most of that part of the file is in the page cache (mincore on a
 * mapping that is never read), so that copying it from there beats reading the disk past it (readDirect). False
 * where the system cannot say.
 */
static napi_value page_cached(napi_env env, napi_callback_info info) {
  napi_value argv[3], r;
  int64_t v[3] = { -1, -1, -1 };
  const bool ok = file_args(env, info, argv, v, 3);
  bool cached = false;
#ifdef __linux__
  const size_t page = (size_t)sysconf(_SC_PAGESIZE), start = (size_t)v[1] & ~(page - 1);
  const size_t span = (size_t)v[1] + (size_t)v[2] - start, pages = (span + page - 1) / page;
  void *map = ok && pages > 0 ? mmap(NULL, span, PROT_READ, MAP_SHARED, (int)v[0], (off_t)start) : MAP_FAILED;
  unsigned char *in = map != MAP_FAILED ? malloc(pages) : NULL;
  if (in && mincore(map, span, in) == 0) {
    size_t resident = 0;
    for (size_t i = 0; i < pages; i++) resident += in[i] & 1;
    cached = 2 * resident > pages;
  }
  free(in);
  if (map != MAP_FAILED) munmap(map, span);
#endif
  napi_get_boolean(env, cached, &r);
  return r;
}

/*
 * releasePanels(panels) -> whether their memory was freed now: the ArrayBuffer is detached (every view of it reads
 * as empty from then on), so its bytes go back to the allocator at once instead of at some later garbage collection
 * (a disposed model's weights, before the next allocation that could reuse them). Only a view of the whole buffer is
 * released; one sharing its buffer is left alone (false).
 */
static napi_value release_panels(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], buf, r;
  size_t offset = 0, length = 0, bytes = 0;
  napi_typedarray_type type;
  bool done = false;
  settle_packs(env); /* no job writes them any more */
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc == 1 &&
      napi_get_typedarray_info(env, argv[0], &type, &length, NULL, &buf, &offset) == napi_ok &&
      napi_get_arraybuffer_info(env, buf, NULL, &bytes) == napi_ok) {
    const size_t size = type == napi_uint16_array ? 2 : type == napi_float32_array ? 4 : 0;
    done = size > 0 && offset == 0 && length * size == bytes && napi_detach_arraybuffer(env, buf) == napi_ok;
  }
  napi_get_boolean(env, done, &r);
  return r;
}

/* tuneAllocator(): glibc serves every block from its heap and keeps freed memory for reuse (see src/backend/kernels.ts) */

static napi_value tune_allocator(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value r;
#ifdef __GLIBC__
  const int ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
  const int ok = 0;
#endif
  napi_get_boolean(env, ok, &r);
  return r;
}

/*
 * trimHeap() -> whether the allocator was asked: the heap's free pages go back to the system (glibc malloc_trim).
 * tuneAllocator keeps freed memory for reuse, which is right between steps; after a model is freed it is not.
 */
static napi_value trim_heap(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value r;
  free(wino_made);
  wino_made = NULL;
  wino_made_len = 0;
#ifdef __GLIBC__
  malloc_trim(0);
  napi_get_boolean(env, true, &r);
#else
  napi_get_boolean(env, false, &r);
#endif
  return r;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* linear(x [M, K], M, K, packed, N, bias | null, out [M, N], threads, residual [M, N] | null)                       */

typedef struct { const float *x; size_t K; } dense_rows_t;

static const float *dense_row(const void *ctx, size_t m, size_t k0) {
  const dense_rows_t *d = ctx;
  return d->x + m * d->K + k0;
}

static napi_value linear(napi_env env, napi_callback_info info) {
  napi_value argv[10];
  args_t a;
  if (!get_args(env, info, argv, 10, &a)) return NULL;
  const size_t M = dim(&a, 1, "M"), K = dim(&a, 2, "K"), N = dim(&a, 4, "N");
  const int threads = threads_arg(&a, 7);
  const float *x = f32(&a, 0, "x", M * K, 0);
  const float *packed;
  const uint16_t *half;
  const int bf = bool_arg(&a, 9);
  panels_arg(&a, 3, packed_len(K, N), packed_len(K, N) + (bf ? BF16_PAD : 0), &packed, &half);
  if (bf) bf16_check(&a, packed, K);
  const float *bias = f32(&a, 5, "bias", N, 1);
  float *out = f32(&a, 6, "out", M * N, 0);
  const float *res = f32(&a, 8, "residual", M * N, 1);
  if (a.failed || M == 0 || N == 0) return NULL;
  if (K == 0) {
    for (size_t m = 0; m < M; m++)
      for (size_t n = 0; n < N; n++) out[m * N + n] = (bias ? bias[n] : 0.0f) + (res ? res[m * N + n] : 0.0f);
    return NULL;
  }
  size_t *kstart = malloc(sizeof(size_t) * (K / KC + 2));
  if (!kstart || !zero_row(KC)) { free(kstart); fail(&a, "sd_kernels: out of memory"); return NULL; }
  dense_rows_t rows = { x, K };
  gemm_t g = { M, N, K, dense_row, &rows, kstart, k_blocks(K, K, kstart), packed, bf ? NULL : half, { bias, 0, N, res, N },
               out, N, bf ? half : NULL, K, NULL };
  if (!gemm(&g, threads)) fail(&a, "sd_kernels: out of memory");
  free(kstart);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* conv2d(x, B, H, W, Cin, packed, Cout, kernel, stride, padTop, padLeft, Hout, Wout, bias | null, out, threads,      */
/*        residual [B, Hout, Wout, Cout] | null, biasPerImage): bias is [Cout], or [B, Cout] when biasPerImage.       */
/* The shared index is (ky, kx, ci) with ci fastest, matching an HWIO filter read as [k*k*Cin, Cout].                */

typedef struct {
  const float *x;
  size_t H, W, Cin, kernel, stride, Hout, Wout;
  long padTop, padLeft;
} conv_rows_t;

static const float *conv_row(const void *ctx, size_t m, size_t k0) {
  const conv_rows_t *c = ctx;
  const size_t tap = k0 / c->Cin, ci = k0 % c->Cin;
  const size_t ox = m % c->Wout, oy = (m / c->Wout) % c->Hout, b = m / (c->Wout * c->Hout);
  const long iy = (long)(oy * c->stride + tap / c->kernel) - c->padTop;
  const long ix = (long)(ox * c->stride + tap % c->kernel) - c->padLeft;
  if (iy < 0 || ix < 0 || iy >= (long)c->H || ix >= (long)c->W) return zeros;
  return c->x + ((b * c->H + (size_t)iy) * c->W + (size_t)ix) * c->Cin + ci;
}

static napi_value conv2d(napi_env env, napi_callback_info info) {
  napi_value argv[19];
  args_t a;
  if (!get_args(env, info, argv, 19, &a)) return NULL;
  const size_t B = dim(&a, 1, "B"), H = dim(&a, 2, "H"), W = dim(&a, 3, "W"), Cin = dim(&a, 4, "Cin");
  const size_t Cout = dim(&a, 6, "Cout"), kernel = dim(&a, 7, "kernel"), stride = dim(&a, 8, "stride");
  const size_t padTop = dim(&a, 9, "padTop"), padLeft = dim(&a, 10, "padLeft");
  const size_t Hout = dim(&a, 11, "Hout"), Wout = dim(&a, 12, "Wout");
  const int threads = threads_arg(&a, 15);
  if (!a.failed && (kernel == 0 || stride == 0 || Cin == 0)) fail(&a, "sd_kernels: kernel, stride and Cin must be positive");
  const size_t K = kernel * kernel * Cin;
  const float *x = f32(&a, 0, "x", B * H * W * Cin, 0);
  const float *packed;
  const uint16_t *half;
  const int bf = bool_arg(&a, 18);
  panels_arg(&a, 5, packed_len(K, Cout), packed_len(K, Cout) + (bf ? BF16_PAD : 0), &packed, &half);
  if (bf) bf16_check(&a, packed, Cin);
  bool per_image = false;
  if (!a.failed && a.argc > 17) napi_get_value_bool(env, argv[17], &per_image);
  const float *bias = f32(&a, 13, "bias", per_image ? B * Cout : Cout, 1);
  float *out = f32(&a, 14, "out", B * Hout * Wout * Cout, 0);
  const float *res = f32(&a, 16, "residual", B * Hout * Wout * Cout, 1);
  if (a.failed || B * Hout * Wout == 0 || Cout == 0) return NULL;
  size_t *kstart = malloc(sizeof(size_t) * (kernel * kernel * (Cin / KC + 2) + 2));
  if (!kstart || !zero_row(KC)) { free(kstart); fail(&a, "sd_kernels: out of memory"); return NULL; }
  conv_rows_t rows = { x, H, W, Cin, kernel, stride, Hout, Wout, (long)padTop, (long)padLeft };
  const epi_t epi = { bias, per_image ? Hout * Wout : 0, Cout, res, Cout };
  gemm_t g = { B * Hout * Wout, Cout, K, conv_row, &rows, kstart, k_blocks(K, Cin, kstart), packed, bf ? NULL : half, epi,
               out, Cout, bf ? half : NULL, Cin, NULL };
  if (!gemm(&g, threads)) fail(&a, "sd_kernels: out of memory");
  free(kstart);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* Winograd F(m x m, 3x3), m = 2 or 4 (Lavin & Gray 2015), for 3x3 convs, stride 1, padding 1: each m x m block of  */
/* outputs ("tile") is A^T [ (G g G^T) . (B^T d B) ] A over the (m+2) x (m+2) input patch d around it, so the channel */
/* sums become (m+2)^2 GEMMs of [tiles, Cin] x [Cin, Cout]: 16/36 of the direct conv's multiplications for m = 2,    */
/* 36/144 for m = 4. F(2x2)'s transforms only add and halve; F(4x4)'s scale by up to 8 and lose a few more bits.     */
/*                                                                                                                  */
/* conv3x3Winograd(x, B, H, W, Cin, taps, Cout, bias | null, out, threads, residual | null, biasPerImage, m)        */
/*   x, out, residual: [B, H, W, C] channels last; Cin and Cout multiples of 8; bias as in conv2d; taps the direct   */
/*   conv's panels (packWeights layout 2: [ceil(Cout/16)][9][Cin][16]), float32 or halves; m the tile, 2 or 4.       */

#define WT 96 /* tiles per block: a block's transformed inputs for one xi (96 x Cin) stay in L2 through its GEMM */

/* G, the weight transform: u = G g G^T for a 3x3 g, (m+2) x 3. */
static const float G2[4][3] = { { 1, 0, 0 }, { 0.5f, 0.5f, 0.5f }, { 0.5f, -0.5f, 0.5f }, { 0, 0, 1 } };
static const float G4[6][3] = { { 0.25f, 0, 0 },
                                { -1 / 6.0f, -1 / 6.0f, -1 / 6.0f },
                                { -1 / 6.0f, 1 / 6.0f, -1 / 6.0f },
                                { 1 / 24.0f, 1 / 12.0f, 1 / 6.0f },
                                { 1 / 24.0f, -1 / 12.0f, 1 / 6.0f },
                                { 0, 0, 1 } };

/*
 * U_xi = (G g G^T)[xi], xi = (m+2) * row + col, for the output panels [cp0, cp1), 16 outputs per vector: from the
 * taps as floats (tf) or as halves (th), into p ((m+2)^2 packed matrices, each packed_len(Cin, Cout) apart). Every U
 * is summed in the same order whichever the source, so a conv computes the same from either.
 */
typedef struct { const float *tf; const uint16_t *th; float *p; size_t Cin, Cout; int m; } wino_w_t;

/* sum_k G[i][k] x[k * step] for the rows i of G, multiplications by 0 skipped (they are constants once inlined). */
__attribute__((target("avx2,fma"), always_inline)) static inline void g_rows(const float (*G)[3], int rows, const __m256 *x, int step, __m256 *y) {
  for (int i = 0; i < rows; i++) {
    __m256 acc = _mm256_setzero_ps();
    for (int k = 0; k < 3; k++)
      if (G[i][k] != 0) acc = _mm256_fmadd_ps(_mm256_set1_ps(G[i][k]), x[k * step], acc);
    y[i] = acc;
  }
}

/*
 * U_xi for the output panels [cp0, cp1) and input channels [ci0, ci1) into out: U_xi's value for (ci, the panel's
 * column j) at out[xi * xi_stride + (cp - cp0) * panel_stride + (ci - ci0) * 16 + j].
 */
__attribute__((target("avx2,f16c,fma"), always_inline)) static inline void wino_weights_m(const wino_w_t *s, size_t cp0, size_t cp1, size_t ci0, size_t ci1,
                                                                                     float *out, size_t xi_stride, size_t panel_stride, const int m, const float (*G)[3]) {
  const int a = m + 2;
  for (size_t cp = cp0; cp < cp1; cp++)
    for (size_t ci = ci0; ci < ci1; ci++)
      for (int lane = 0; lane < 2; lane++) { /* 16 outputs as two vectors of 8 */
        const size_t at = (cp * 9 * s->Cin + ci) * NR + (size_t)lane * 8, tap = s->Cin * NR;
        __m256 g[9], t[3][6], tc[6], u[6];
        for (int k = 0; k < 9; k++)
          g[k] = s->th ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s->th + at + (size_t)k * tap))) : _mm256_loadu_ps(s->tf + at + (size_t)k * tap);
        for (int j = 0; j < 3; j++) { /* t = G g: column j of g to column j of t */
          g_rows(G, a, g + j, 3, tc);
          for (int i = 0; i < a; i++) t[j][i] = tc[i];
        }
        float *o = out + (cp - cp0) * panel_stride + (ci - ci0) * NR + (size_t)lane * 8;
        for (int i = 0; i < a; i++) { /* u = t G^T: row i of t to row i of u */
          const __m256 row[3] = { t[0][i], t[1][i], t[2][i] };
          g_rows(G, a, row, 1, u);
          for (int k = 0; k < a; k++) _mm256_storeu_ps(o + (size_t)(a * i + k) * xi_stride, u[k]);
        }
      }
}

__attribute__((target("avx2,f16c,fma"))) static void wino_weights(const wino_w_t *s, size_t cp0, size_t cp1, size_t ci0, size_t ci1, float *out,
                                                                   size_t xi_stride, size_t panel_stride) {
  if (s->m == 4) wino_weights_m(s, cp0, cp1, ci0, ci1, out, xi_stride, panel_stride, 4, G4);
  else wino_weights_m(s, cp0, cp1, ci0, ci1, out, xi_stride, panel_stride, 2, G2);
}

/*
 * How far apart U_xi made whole lie: a packed matrix and 48 floats more. Its (m+2)^2 matrices are written 8 floats
 * at a time to each in turn (wino_weights_m), and packed_len(Cin, Cout) floats, 4 KB times a whole number for SD's
 * channels, put all 36 (or 16) writes of one group in the same cache sets: 64x64 320 -> 320 at F(4x4) made its
 * matrices in 2.3-5.1 ms against 1.1 with the gap, 32x32 1280 -> 1280 at F(2x2) in 5.0-7.0 against 2.9 (2-core Zen 5
 * EPYC).
 */
#define WINO_GAP 48
static size_t wino_stride(size_t Cin, size_t Cout) { return packed_len(Cin, Cout) + WINO_GAP; }

/* Every U_xi, whole, into s->p: (m+2)^2 packed matrices wino_stride apart, the panels shared by the threads. */
static void wino_weights_task(void *ctx, int t, int n) {
  const wino_w_t *s = ctx;
  const size_t panels = (s->Cout + NR - 1) / NR, cp0 = panels * (size_t)t / (size_t)n, cp1 = panels * (size_t)(t + 1) / (size_t)n;
  wino_weights(s, cp0, cp1, 0, s->Cin, s->p + cp0 * s->Cin * NR, wino_stride(s->Cin, s->Cout), s->Cin * NR);
}

typedef struct {
  const float *x, *bias, *res;
  float *out;
  size_t B, H, W, Cin, Cout, th, tw, tiles, bias_rows;
  int m;
  const size_t *kstart;
  size_t kblocks;
  units_t blocks; /* the tiles in blocks of at most WT */
  wino_w_t taps;  /* the taps, and in taps.p every U_xi made whole before (wino_task) or NULL (wino_fused_conv) */
} wino_t;

/* B^T d for one column (or row) d of the patch: m + 2 values to m + 2. */
__attribute__((target("avx2,fma"), always_inline)) static inline void input_1d(int m, const __m256 *d, __m256 *r) {
  if (m == 2) {
    r[0] = _mm256_sub_ps(d[0], d[2]);
    r[1] = _mm256_add_ps(d[1], d[2]);
    r[2] = _mm256_sub_ps(d[2], d[1]);
    r[3] = _mm256_sub_ps(d[1], d[3]);
    return;
  }
  const __m256 two = _mm256_set1_ps(2), four = _mm256_set1_ps(4), five = _mm256_set1_ps(5);
  const __m256 d42 = _mm256_sub_ps(d[4], d[2]);
  r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
  r[1] = _mm256_fnmadd_ps(four, _mm256_add_ps(d[1], d[2]), _mm256_add_ps(d[3], d[4]));
  r[2] = _mm256_fmadd_ps(four, _mm256_sub_ps(d[1], d[2]), _mm256_sub_ps(d[4], d[3]));
  r[3] = _mm256_fmadd_ps(two, _mm256_sub_ps(d[3], d[1]), d42);
  r[4] = _mm256_fmadd_ps(two, _mm256_sub_ps(d[1], d[3]), d42);
  r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
}

/* A^T u for one column (or row) u of a tile's products: m + 2 values to m. */
__attribute__((target("avx2,fma"), always_inline)) static inline void output_1d(int m, const __m256 *u, __m256 *y) {
  if (m == 2) {
    y[0] = _mm256_add_ps(_mm256_add_ps(u[0], u[1]), u[2]);
    y[1] = _mm256_sub_ps(_mm256_sub_ps(u[1], u[2]), u[3]);
    return;
  }
  const __m256 a = _mm256_add_ps(u[1], u[2]), b = _mm256_sub_ps(u[1], u[2]);
  const __m256 c = _mm256_add_ps(u[3], u[4]), d = _mm256_sub_ps(u[3], u[4]);
  y[0] = _mm256_add_ps(_mm256_add_ps(u[0], a), c);
  y[1] = _mm256_fmadd_ps(_mm256_set1_ps(2), d, b);
  y[2] = _mm256_fmadd_ps(_mm256_set1_ps(4), c, a);
  y[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8), d, b), u[5]);
}

/* Tiles [t0, t0 + n) -> v[xi][n][Cin]: B^T d B per channel, 8 channels at a time; outside the image reads zeros. */
__attribute__((target("avx2,fma"), always_inline)) static inline void wino_input_m(const wino_t *s, size_t t0, size_t n, float *v, size_t ld, const int m) {
  const size_t C = s->Cin;
  const int a = m + 2;
  for (size_t i = 0; i < n; i++) {
    const size_t t = t0 + i, b = t / (s->th * s->tw), ty = t / s->tw % s->th, tx = t % s->tw;
    const float *at[6][6];
    for (int r = 0; r < a; r++)
      for (int c = 0; c < a; c++) {
        const long y = (long)(m * ty) - 1 + r, x = (long)(m * tx) - 1 + c;
        at[r][c] = y < 0 || x < 0 || y >= (long)s->H || x >= (long)s->W ? NULL : s->x + ((b * s->H + (size_t)y) * s->W + (size_t)x) * C;
      }
    for (size_t c = 0; c < C; c += 8) {
      __m256 t[6][6], d[6], r[6];
      for (int q = 0; q < a; q++) { /* B^T d: column q */
        for (int k = 0; k < a; k++) d[k] = at[k][q] ? _mm256_loadu_ps(at[k][q] + c) : _mm256_setzero_ps();
        input_1d(m, d, r);
        for (int k = 0; k < a; k++) t[k][q] = r[k];
      }
      for (int k = 0; k < a; k++) { /* (B^T d) B: row k */
        input_1d(m, t[k], r);
        float *o = v + (size_t)(a * k) * ld * C + i * C + c;
        for (int q = 0; q < a; q++) _mm256_storeu_ps(o + (size_t)q * ld * C, r[q]);
      }
    }
  }
}

/*
 * p[xi][ld][Cout] (its first n rows of each xi) -> the m x m outputs of tiles [t0, t0 + n): A^T p A, plus bias and
 * residual; edges past H, W dropped.
 */
__attribute__((target("avx2,fma"), always_inline)) static inline void wino_output_m(const wino_t *s, size_t t0, size_t n, const float *p, size_t ld, const int m) {
  const size_t C = s->Cout;
  const int a = m + 2;
  for (size_t i = 0; i < n; i++) {
    const size_t t = t0 + i, b = t / (s->th * s->tw), ty = t / s->tw % s->th, tx = t % s->tw;
    const float *bias = s->bias ? s->bias + (s->bias_rows ? b * C : 0) : NULL;
    for (size_t c = 0; c < C; c += 8) {
      __m256 u[6][4], row[6], col[6], y[4];
      for (int r = 0; r < a; r++) { /* p A: row r */
        const float *at = p + (size_t)(a * r) * ld * C + i * C + c;
        for (int q = 0; q < a; q++) row[q] = _mm256_loadu_ps(at + (size_t)q * ld * C);
        output_1d(m, row, u[r]);
      }
      const __m256 bv = bias ? _mm256_loadu_ps(bias + c) : _mm256_setzero_ps();
      for (int q = 0; q < m; q++) { /* A^T (p A): column q */
        for (int r = 0; r < a; r++) col[r] = u[r][q];
        output_1d(m, col, y);
        for (int r = 0; r < m; r++) {
          const size_t oy = (size_t)m * ty + (size_t)r, ox = (size_t)m * tx + (size_t)q;
          if (oy >= s->H || ox >= s->W) continue;
          const size_t o = ((b * s->H + oy) * s->W + ox) * C + c;
          __m256 val = _mm256_add_ps(y[r], bv);
          if (s->res) val = _mm256_add_ps(val, _mm256_loadu_ps(s->res + o));
          _mm256_storeu_ps(s->out + o, val);
        }
      }
    }
  }
}

/* v[xi][ld][Cin] (rows [0, n) of each xi) = B^T d B for the tiles [t0, t0 + n). */
AVX2 static void wino_input(const wino_t *s, size_t t0, size_t n, float *v, size_t ld) {
  if (s->m == 4) wino_input_m(s, t0, n, v, ld, 4);
  else wino_input_m(s, t0, n, v, ld, 2);
}

AVX2 static void wino_output(const wino_t *s, size_t t0, size_t n, const float *p, size_t ld) {
  if (s->m == 4) wino_output_m(s, t0, n, p, ld, 4);
  else wino_output_m(s, t0, n, p, ld, 2);
}

/*
 * A conv with few tiles (at most one block of WT per thread: SD's 16x16 and 32x32 levels) against many channels
 * spends less on U_xi made where it is used than on U_xi made whole before: each xi's matrix (105 MB for 1280 ->
 * 1280 at F(2x2)) was written out by one pass and read back by the next, and SD 1.5's step ran 0.33-0.53 s (9-14%)
 * faster with that pass skipped. Such a conv runs in three passes instead: the input transform of every tile (v,
 * [xi][tiles][Cin]); the threads share out the output panels, each making U_xi for one panel pair and shared block at
 * a time (ub: nxi blocks of 2 x KC x 16 floats, WINO_GAP apart) and using it on every tile and xi while it is in
 * cache (p, [xi][tiles][Cout]); then the output transform. The products are summed in the same order as gemm_rows
 * over U_xi made whole, so the same bits.
 */
typedef struct {
  const wino_t *s;
  float *v, *p;
  units_t in, out; /* blocks of tiles for the first and third passes */
  size_t pairs;    /* output panel pairs, shared out by the second */
} wino_fused_t;

static void wino_fused_in(void *ctx, int t, int n) {
  (void)t, (void)n;
  wino_fused_t *f = ctx;
  size_t b0, t1;
  while (take(&f->in, &b0, &t1)) wino_input(f->s, b0, t1 - b0, f->v + b0 * f->s->Cin, f->s->tiles);
}

static void wino_fused_out(void *ctx, int t, int n) {
  (void)t, (void)n;
  wino_fused_t *f = ctx;
  size_t b0, t1;
  while (take(&f->out, &b0, &t1)) wino_output(f->s, b0, t1 - b0, f->p + b0 * f->s->Cout, f->s->tiles);
}

static void wino_fused_gemms(void *ctx, int t, int nthreads) {
  const wino_fused_t *f = ctx;
  const wino_t *s = f->s;
  const size_t nxi = (size_t)(s->m + 2) * (size_t)(s->m + 2), panels = (s->Cout + NR - 1) / NR, mr = micro.mr, n = s->tiles;
  const size_t jp0 = 2 * (f->pairs * (size_t)t / (size_t)nthreads), jp1 = min_sz(panels, 2 * (f->pairs * (size_t)(t + 1) / (size_t)nthreads));
  const size_t nr = (n + mr - 1) / mr * mr; /* each xi's row pointers, the last micro-tile's missing rows as zeros */
  const float **rows = malloc(sizeof(float *) * nxi * nr);
  float *ub = aligned_alloc(64, sizeof(float) * nxi * (2 * KC * NR + WINO_GAP));
  for (size_t kb = 0; rows && ub && kb < s->kblocks; kb++) {
    const size_t k0 = s->kstart[kb], kc = s->kstart[kb + 1] - k0;
    for (size_t xi = 0; xi < nxi; xi++)
      for (size_t i = 0; i < nr; i++) rows[xi * nr + i] = i < n ? f->v + (xi * n + i) * s->Cin + k0 : zeros;
    size_t np;
    for (size_t jp = jp0; jp < jp1; jp += np) {
      const micro_fn kernel = micro_for(jp, jp1, &np);
      const size_t ld = np * kc * NR + WINO_GAP; /* U_xi of the pair, xi by xi */
      wino_weights(&s->taps, jp, jp + np, k0, k0 + kc, ub, ld, kc * NR);
      for (size_t xi = 0; xi < nxi; xi++)
        micro_tiles(kernel, (int)kc, rows + xi * nr, n, ub + xi * ld, kc * NR, f->p + xi * n * s->Cout + jp * NR, s->Cout, np,
                    min_sz(np * NR, s->Cout - jp * NR), 0, 0, NULL, kb > 0);
    }
  }
  if (!rows || !ub) /* no scratch: this thread's columns as NaN, never passing for a result */
    for (size_t xi = 0; xi < nxi; xi++)
      for (size_t i = 0; i < n; i++)
        for (size_t j = jp0 * NR; j < min_sz(jp1 * NR, s->Cout); j++) f->p[(xi * n + i) * s->Cout + j] = NAN;
  free(rows);
  free(ub);
}

/* The three passes of a conv with few tiles; false where its v and p could not be allocated. */
static int wino_fused_conv(const wino_t *s, int threads) {
  const size_t nxi = (size_t)(s->m + 2) * (size_t)(s->m + 2);
  wino_fused_t f = { s, malloc(sizeof(float) * nxi * s->tiles * s->Cin), malloc(sizeof(float) * nxi * s->tiles * s->Cout), { 0 }, { 0 },
                     ((s->Cout + NR - 1) / NR + 1) / 2 };
  if (f.v && f.p) {
    units_of(&f.in, s->tiles, WT, 1, threads);
    units_of(&f.out, s->tiles, WT, 1, threads);
    parallel(wino_fused_in, &f, threads);
    parallel(wino_fused_gemms, &f, threads);
    parallel(wino_fused_out, &f, threads);
  }
  free(f.v);
  free(f.p);
  return f.v && f.p;
}

/* Blocks of tiles taken in turn: transform, (m+2)^2 GEMMs (this thread alone), transform back. */
static void wino_task(void *ctx, int t, int nthreads) {
  (void)t, (void)nthreads;
  wino_t *s = ctx;
  const size_t nxi = (size_t)(s->m + 2) * (size_t)(s->m + 2);
  float *v = malloc(sizeof(float) * nxi * WT * s->Cin), *p = malloc(sizeof(float) * nxi * WT * s->Cout);
  size_t b0, t1;
  while (take(&s->blocks, &b0, &t1)) {
    if (v && p) {
      const size_t one = wino_stride(s->Cin, s->Cout), n = t1 - b0;
      wino_input(s, b0, n, v, n);
      for (size_t xi = 0; xi < nxi; xi++) {
        dense_rows_t rows = { v + xi * n * s->Cin, s->Cin };
        gemm_t g = { n, s->Cout, s->Cin, dense_row, &rows, s->kstart, s->kblocks, s->taps.p + xi * one, NULL,
                     { NULL, 0, 0, NULL, 0 }, p + xi * n * s->Cout, s->Cout };
        gemm_rows(&g, 0, n);
      }
      wino_output(s, b0, n, p, n);
      continue;
    }
    const size_t m = (size_t)s->m;
    for (size_t i = b0; i < t1; i++) { /* no scratch: these tiles as NaN, never passing for a result */
      const size_t b = i / (s->th * s->tw), ty = i / s->tw % s->th, tx = i % s->tw;
      for (size_t oy = m * ty; oy < min_sz(m * ty + m, s->H); oy++)
        for (size_t ox = m * tx; ox < min_sz(m * tx + m, s->W); ox++)
          for (size_t c = 0; c < s->Cout; c++) s->out[((b * s->H + oy) * s->W + ox) * s->Cout + c] = NAN;
    }
  }
  free(v);
  free(p);
}

/* The most floats of U_xi made whole: F(2x2)'s for SD's 2560 -> 1280 conv (kernels.ts, WINOGRAD_F4_MAX_MATRICES). */
#define WINO_MAX_MATRICES ((size_t)16 * 2560 * 1280)

/*
 * Whether U_xi is made where it is used (wino_fused_conv) rather than whole before: where each thread has at most one
 * block of tiles, or U_xi whole would not fit in WINO_MAX_MATRICES (F(4x4) for SD's 1280-channel convs, which
 * kernels.ts asks for only with few tiles). SD_WINO_FUSED=0|1 forces one way (measuring; 0 then makes any size).
 */
static int wino_fused(size_t tiles, size_t Cin, size_t Cout, int m, int threads) {
  const char *e = getenv("SD_WINO_FUSED");
  if (e && (e[0] == '0' || e[0] == '1')) return e[0] == '1';
  const size_t n = (size_t)(threads < 1 ? 1 : threads);
  return (tiles + n * WT - 1) / (n * WT) <= 1 || (size_t)(m + 2) * (size_t)(m + 2) * Cin * Cout > WINO_MAX_MATRICES;
}

/*
 * Where a call turns taps into U_xi: one block kept from call to call and grown to the largest conv's (only the main
 * thread calls in, as with zero_row). A block of its own per call (105 MB for a 1280 -> 1280 conv, 210 MB for
 * 2560 -> 1280) rarely found that much free in the heap between the feature maps, so its pages faulted in zeroed
 * every time: SD 1.5's 16x16 2560 -> 1280 conv took ~100 ms in the UNet against ~57 ms alone. trimHeap frees it.
 */
static float *wino_scratch(size_t len) {
  if (len > wino_made_len) {
    free(wino_made);
    wino_made = malloc(len * sizeof(float));
    wino_made_len = wino_made ? len : 0;
  }
  return wino_made;
}

static napi_value conv3x3_winograd(napi_env env, napi_callback_info info) {
  napi_value argv[13];
  args_t a;
  if (!get_args(env, info, argv, 13, &a)) return NULL;
  const size_t B = dim(&a, 1, "B"), H = dim(&a, 2, "H"), W = dim(&a, 3, "W"), Cin = dim(&a, 4, "Cin");
  const size_t Cout = dim(&a, 6, "Cout");
  const int threads = threads_arg(&a, 9);
  const size_t m = a.argc > 12 ? dim(&a, 12, "m") : 2;
  if (!a.failed && (Cin == 0 || Cin % 8 || Cout % 8)) fail(&a, "sd_kernels: conv3x3Winograd needs Cin and Cout that are positive multiples of 8");
  if (!a.failed && m != 2 && m != 4) fail(&a, "sd_kernels: conv3x3Winograd's tile m must be 2 or 4");
  const float *x = f32(&a, 0, "x", B * H * W * Cin, 0);
  const float *taps_f; /* the taps as floats, or */
  const uint16_t *taps_h; /* as halves */
  panels_arg(&a, 5, packed_len(9 * Cin, Cout), packed_len(9 * Cin, Cout), &taps_f, &taps_h);
  bool per_image = false;
  if (!a.failed && a.argc > 11) napi_get_value_bool(env, argv[11], &per_image);
  const float *bias = f32(&a, 7, "bias", per_image ? B * Cout : Cout, 1);
  float *out = f32(&a, 8, "out", B * H * W * Cout, 0);
  const float *res = f32(&a, 10, "residual", B * H * W * Cout, 1);
  if (a.failed || B * H * W == 0 || Cout == 0) return NULL;
  const size_t th = (H + m - 1) / m, tw = (W + m - 1) / m;
  const int fused = wino_fused(B * th * tw, Cin, Cout, (int)m, threads);
  size_t *kstart = malloc(sizeof(size_t) * (Cin / KC + 2));
  float *made = fused ? NULL : wino_scratch((m + 2) * (m + 2) * wino_stride(Cin, Cout)); /* U_xi from the taps, this call */
  if (!kstart || !zero_row(KC) || (!fused && !made)) { free(kstart); fail(&a, "sd_kernels: out of memory"); return NULL; }
  const wino_w_t ws = { taps_f, taps_h, made, Cin, Cout, (int)m };
  if (!fused) parallel(wino_weights_task, (void *)&ws, threads);
  wino_t s = { x, bias, res, out, B, H, W, Cin, Cout, th, tw, B * th * tw, per_image, (int)m, kstart, k_blocks(Cin, Cin, kstart), { 0 }, ws };
  units_of(&s.blocks, s.tiles, WT, 1, threads);
  if (!fused) parallel(wino_task, &s, threads);
  else if (!wino_fused_conv(&s, threads)) fail(&a, "sd_kernels: out of memory");
  free(kstart);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* attention(q [B, Nq, H*D], k [B, Nk, H*D], v [B, Nk, H*D], B, Nq, Nk, heads, scale, out [B, Nq, H*D], threads)     */
/* Flash-style: per (item, block of QB queries), keys in blocks of KB with a running max and sum per query row.      */

typedef struct {
  const float *q, *k, *v;
  float *out;
  size_t B, Nq, Nk, heads, D, C;
  float scale;
  float *kp, *vp; /* per item: K^T as ceil(Nk/16) panels of [D][16]; V as ceil(D/16) panels of [Nk][16] */
  size_t kp_item, vp_item;
  size_t units_per_item;
  /* bf16: the same panels as bfloat16 pairs, D and Nk padded to the ISA's kalign (dp, nkp) with zeros */
  uint16_t *kb, *vb;
  size_t dp, nkp;
  units_t work; /* the units (item, block of QB queries), taken in turn */
} attn_t;

/* K^T and V of each item as bfloat16 B panels: K^T [dp/2][16 keys][2] per 16 keys, V [nkp/2][16][2] per 16 of D. */
static void pack_kv_bf16_task(void *ctx, int t, int n) {
  attn_t *s = ctx;
  const size_t items = s->B * s->heads, kpanels = (s->Nk + NR - 1) / NR, dpanels = (s->D + NR - 1) / NR;
  const size_t kb_item = kpanels * NR * s->dp, vb_item = dpanels * NR * s->nkp;
  for (size_t it = (size_t)t; it < items; it += (size_t)n) {
    const size_t b = it / s->heads, h = it % s->heads;
    const float *k = s->k + b * s->Nk * s->C + h * s->D, *v = s->v + b * s->Nk * s->C + h * s->D;
    uint16_t *kb = s->kb + it * kb_item, *vb = s->vb + it * vb_item;
    memset(kb, 0, kb_item * sizeof(uint16_t));
    memset(vb, 0, vb_item * sizeof(uint16_t));
    for (size_t j = 0; j < s->Nk; j++) {
      const float *kj = k + j * s->C, *vj = v + j * s->C;
      for (size_t d = 0; d < s->D; d++) {
        kb[(j / NR) * s->dp * NR + pair_at(d, j % NR)] = to_bf16(kj[d]);
        vb[(d / NR) * s->nkp * NR + pair_at(j, d % NR)] = to_bf16(vj[d]);
      }
    }
  }
}

/* dst rows [0, 8) of 8 = the 8x8 block of src (rows ld apart) transposed; dst rows ldd apart. */
AVX2 static void transpose8(const float *src, size_t ld, float *dst, size_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; i++) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

/*
 * One item's K^T panels: 16 keys' D values each as [D][16] (8x8 blocks transposed, the rest one by one, keys past
 * Nk zero), and its V panels: each key's D values in runs of 16, [Nk][16] per 16 of D (the D past the last 16 zero).
 */
AVX2 static void pack_kv_item(const attn_t *s, const float *k, const float *v, float *kp, float *vp) {
  const size_t D = s->D, C = s->C, Nk = s->Nk, d8 = D / 8 * 8;
  for (size_t j0 = 0; j0 < Nk; j0 += NR) {
    float *panel = kp + j0 / NR * D * NR;
    const size_t keys = min_sz(NR, Nk - j0);
    if (keys < NR) memset(panel, 0, D * NR * sizeof(float));
    size_t jj = 0;
    for (; jj + 8 <= keys; jj += 8)
      for (size_t d = 0; d < d8; d += 8) transpose8(k + (j0 + jj) * C + d, C, panel + d * NR + jj, NR);
    for (size_t j = 0; j < keys; j++)
      for (size_t d = j < jj ? d8 : 0; d < D; d++) panel[d * NR + j] = k[(j0 + j) * C + d];
  }
  const size_t dfull = D / NR * NR;
  for (size_t j = 0; j < Nk; j++) {
    const float *vj = v + j * C;
    for (size_t d = 0; d < dfull; d += NR) memcpy(vp + ((d / NR) * Nk + j) * NR, vj + d, NR * sizeof(float));
    if (dfull < D) {
      float *last = vp + ((dfull / NR) * Nk + j) * NR;
      memcpy(last, vj + dfull, (D - dfull) * sizeof(float));
      memset(last + (D - dfull), 0, (NR - (D - dfull)) * sizeof(float));
    }
  }
}

static void pack_kv_task(void *ctx, int t, int n) {
  attn_t *s = ctx;
  const size_t items = s->B * s->heads;
  for (size_t it = (size_t)t; it < items; it += (size_t)n) {
    const size_t b = it / s->heads, h = it % s->heads;
    const float *k = s->k + b * s->Nk * s->C + h * s->D, *v = s->v + b * s->Nk * s->C + h * s->D;
    pack_kv_item(s, k, v, s->kp + it * s->kp_item, s->vp + it * s->vp_item);
  }
}

/*
 * The softmax over a row of scores, in 32 lanes: lane l sums (or maxes) the scores j = l mod 32, four AVX2 registers
 * or two AVX-512 ones wide (four and two independent chains, where one would wait on each add's latency), then the
 * 32 lanes are added half onto half in one fixed order, so both ISAs give the same bits. The rest of the row (under
 * 32) goes 8 at a time into the same lanes, then one by one.
 */
AVX2 static float row_max_rest(const float *r, size_t j, size_t n, float *lanes) {
  for (; j + 8 <= n; j += 8) {
    float *l = lanes + j % 32;
    _mm256_storeu_ps(l, _mm256_max_ps(_mm256_loadu_ps(l), _mm256_loadu_ps(r + j)));
  }
  for (int w = 16; w >= 1; w /= 2)
    for (int l = 0; l < w; l++) lanes[l] = lanes[l + w] > lanes[l] ? lanes[l + w] : lanes[l];
  float m = lanes[0];
  for (; j < n; j++) m = r[j] > m ? r[j] : m;
  return m;
}

AVX2 static float row_exp_rest(float *r, size_t j, size_t n, float scale, float m, float *lanes) {
  const __m256 sv = _mm256_set1_ps(scale), mv = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(r + j), sv, mv));
    _mm256_storeu_ps(r + j, p);
    float *l = lanes + j % 32;
    _mm256_storeu_ps(l, _mm256_add_ps(_mm256_loadu_ps(l), p));
  }
  /* half onto half, five steps deep (in a row, 32 adds would wait on each other's latency) */
  for (int w = 16; w >= 1; w /= 2)
    for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
  float tail = 0.0f;
  for (; j < n; j++) { r[j] = expf(r[j] * scale - m); tail += r[j]; }
  return lanes[0] + tail;
}

AVX2 static float row_max_avx2(const float *r, size_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(r + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(r + j + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(r + j + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(r + j + 24));
  }
  float lanes[32];
  _mm256_storeu_ps(lanes, m0);
  _mm256_storeu_ps(lanes + 8, m1);
  _mm256_storeu_ps(lanes + 16, m2);
  _mm256_storeu_ps(lanes + 24, m3);
  return row_max_rest(r, j, n, lanes);
}

AVX2 static float row_exp_avx2(float *r, size_t n, float scale, float m) {
  const __m256 sv = _mm256_set1_ps(scale), mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256 p0 = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(r + j), sv, mv));
    const __m256 p1 = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(r + j + 8), sv, mv));
    const __m256 p2 = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(r + j + 16), sv, mv));
    const __m256 p3 = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(r + j + 24), sv, mv));
    _mm256_storeu_ps(r + j, p0);
    _mm256_storeu_ps(r + j + 8, p1);
    _mm256_storeu_ps(r + j + 16, p2);
    _mm256_storeu_ps(r + j + 24, p3);
    s0 = _mm256_add_ps(s0, p0);
    s1 = _mm256_add_ps(s1, p1);
    s2 = _mm256_add_ps(s2, p2);
    s3 = _mm256_add_ps(s3, p3);
  }
  float lanes[32];
  _mm256_storeu_ps(lanes, s0);
  _mm256_storeu_ps(lanes + 8, s1);
  _mm256_storeu_ps(lanes + 16, s2);
  _mm256_storeu_ps(lanes + 24, s3);
  return row_exp_rest(r, j, n, scale, m, lanes);
}

__attribute__((target("avx512f,fma"))) static float row_max_avx512(const float *r, size_t n) {
  __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(r + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(r + j + 16));
  }
  float lanes[32];
  _mm512_storeu_ps(lanes, m0);
  _mm512_storeu_ps(lanes + 16, m1);
  return row_max_rest(r, j, n, lanes);
}

__attribute__((target("avx512f,fma"))) static float row_exp_avx512(float *r, size_t n, float scale, float m) {
  const __m512 sv = _mm512_set1_ps(scale), mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  size_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 p0 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(r + j), sv, mv));
    const __m512 p1 = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(r + j + 16), sv, mv));
    _mm512_storeu_ps(r + j, p0);
    _mm512_storeu_ps(r + j + 16, p1);
    s0 = _mm512_add_ps(s0, p0);
    s1 = _mm512_add_ps(s1, p1);
  }
  float lanes[32];
  _mm512_storeu_ps(lanes, s0);
  _mm512_storeu_ps(lanes + 16, s1);
  return row_exp_rest(r, j, n, scale, m, lanes);
}

AVX2 static void attend_unit(const attn_t *s, size_t unit, float *scores, float *acc, float *mx, float *sum) {
  const size_t it = unit / s->units_per_item, q0 = (unit % s->units_per_item) * QB;
  const size_t b = it / s->heads, h = it % s->heads, D = s->D;
  const size_t qn = min_sz(QB, s->Nq - q0), dpanels = (D + NR - 1) / NR, dpad = dpanels * NR;
  const float *kp = s->kp + it * s->kp_item, *vp = s->vp + it * s->vp_item;
  const size_t mr = micro.mr;
  const float *rows[QB + MR_MAX];
  for (size_t i = 0; i < qn; i++) rows[i] = s->q + (b * s->Nq + q0 + i) * s->C + h * D;
  for (size_t i = qn; i % mr; i++) rows[i] = zeros;
  for (size_t i = 0; i < qn; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
  memset(acc, 0, QB * dpad * sizeof(float));
  for (size_t k0 = 0; k0 < s->Nk; k0 += KB) {
    const size_t kn = min_sz(KB, s->Nk - k0), kpanels = (kn + NR - 1) / NR, ldS = KB;
    /* scores [qn, kn] = q k^T (the padded columns of the last panel are never read) */
    size_t np;
    for (size_t jp = 0; jp < kpanels; jp += np) {
      const micro_fn kernel = micro_for(jp, kpanels, &np);
      const float *bpanel = kp + (k0 / NR + jp) * D * NR;
      for (size_t ir = 0; ir < qn; ir += mr) {
        kernel((int)D, rows + ir, bpanel, D * NR, scores + ir * ldS + jp * NR, ldS, 0); /* rows past qn: zeros */
      }
    }
    /* online softmax: p = exp(scale * s - m_new); acc and sum are rescaled by exp(m_old - m_new) */
    for (size_t i = 0; i < qn; i++) {
      float *r = scores + i * ldS;
      const float m = micro.row_max(r, kn) * s->scale, m_new = m > mx[i] ? m : mx[i];
      const float alpha = mx[i] == -INFINITY ? 0.0f : expf(mx[i] - m_new);
      mx[i] = m_new;
      sum[i] = sum[i] * alpha + micro.row_exp(r, kn, s->scale, m_new);
      if (alpha != 1.0f) for (size_t d = 0; d < dpad; d++) acc[i * dpad + d] *= alpha;
    }
    /* acc [qn, D] += p [qn, kn] v[k0 : k0 + kn] */
    const float *prow[QB + MR_MAX];
    for (size_t i = 0; i < qn; i++) prow[i] = scores + i * ldS;
    for (size_t i = qn; i % mr; i++) prow[i] = zeros;
    for (size_t dp = 0; dp < dpanels; dp += np) {
      const micro_fn kernel = micro_for(dp, dpanels, &np);
      const float *bpanel = vp + (dp * s->Nk + k0) * NR;
      for (size_t ir = 0; ir < qn; ir += mr) {
        kernel((int)kn, prow + ir, bpanel, s->Nk * NR, acc + ir * dpad + dp * NR, dpad, 1);
      }
    }
  }
  for (size_t i = 0; i < qn; i++) {
    float *o = s->out + (b * s->Nq + q0 + i) * s->C + h * D;
    const float inv = 1.0f / sum[i];
    for (size_t d = 0; d < D; d++) o[d] = acc[i * dpad + d] * inv;
  }
}

/* Units [u0, u1) of the output as NaN: a failed allocation can never pass for a result. */
static void nan_units(const attn_t *s, size_t u0, size_t u1) {
  for (size_t u = u0; u < u1; u++) {
    const size_t it = u / s->units_per_item, q0 = (u % s->units_per_item) * QB;
    for (size_t i = q0; i < min_sz(q0 + QB, s->Nq); i++)
      for (size_t d = 0; d < s->D; d++) s->out[((it / s->heads) * s->Nq + i) * s->C + (it % s->heads) * s->D + d] = NAN;
  }
}

/*
 * attend_unit in bfloat16: q k^T and p v as 32 x 32 block products (blocks_t: AMX or AVX512-BF16) of bfloat16 inputs
 * with float32 sums, the online softmax in float32 between them as above; the probabilities are rounded to bfloat16
 * for p v.
 */
BF16 static void attend_unit_bf16(const attn_t *s, const blocks_t *bl, size_t unit, float *scores, uint16_t *pb, uint16_t *qb,
                                  float *acc, float *mx, float *sum) {
  const size_t it = unit / s->units_per_item, q0 = (unit % s->units_per_item) * QB;
  const size_t b = it / s->heads, h = it % s->heads, D = s->D, dp = s->dp;
  const size_t qn = min_sz(QB, s->Nq - q0), qnp = (qn + 31) & ~(size_t)31, dpanels = (D + NR - 1) / NR, dpad = dpanels * NR;
  const uint16_t *kb = s->kb + it * ((s->Nk + NR - 1) / NR * NR * dp), *vb = s->vb + it * (dpanels * NR * s->nkp);
  for (size_t i = 0; i < qnp; i++) {
    uint16_t *row = qb + i * dp;
    const float *qi = s->q + (b * s->Nq + q0 + i) * s->C + h * D;
    if (i < qn) to_bf16_row(qi, D, row);
    for (size_t d = i < qn ? D : 0; d < dp; d++) row[d] = 0;
  }
  memset(pb + qn * KB, 0, (qnp - qn) * KB * sizeof(uint16_t)); /* rows past qn stay zero */
  for (size_t i = 0; i < qn; i++) { mx[i] = -INFINITY; sum[i] = 0.0f; }
  memset(acc, 0, QB * dpad * sizeof(float));
  for (size_t k0 = 0; k0 < s->Nk; k0 += KB) {
    const size_t kn = min_sz(KB, s->Nk - k0), kpanels = (kn + NR - 1) / NR, knp = kround(bl, kn);
    /* scores [qnp, KB] = q k^T (columns past kn are never read) */
    for (size_t jp = 0; jp < kpanels; jp += 2) {
      const int two = jp + 1 < kpanels;
      const uint16_t *b0 = kb + (k0 / NR + jp) * dp * NR, *b1 = b0 + dp * NR;
      for (size_t ir = 0; ir < qnp; ir += 32) {
        bl->block(scores + ir * KB + jp * NR, KB, 0, qb + ir * dp, dp, 1, 0, b0, b1, 0, dp, two);
      }
    }
    /* online softmax as in attend_unit; p as bfloat16, zero-filled to knp */
    for (size_t i = 0; i < qn; i++) {
      float *r = scores + i * KB;
      const float m = micro.row_max(r, kn) * s->scale, m_new = m > mx[i] ? m : mx[i];
      const float alpha = mx[i] == -INFINITY ? 0.0f : expf(mx[i] - m_new);
      mx[i] = m_new;
      sum[i] = sum[i] * alpha + micro.row_exp(r, kn, s->scale, m_new);
      if (alpha != 1.0f) for (size_t d = 0; d < dpad; d++) acc[i * dpad + d] *= alpha;
      to_bf16_row(r, kn, pb + i * KB);
      memset(pb + i * KB + kn, 0, (knp - kn) * sizeof(uint16_t));
    }
    /* acc [qnp, dpad] += p [qnp, knp] v[k0 : k0 + knp] */
    for (size_t dq = 0; dq < dpanels; dq += 2) {
      const int two = dq + 1 < dpanels;
      const uint16_t *v0 = vb + (dq * s->nkp + k0) * NR, *v1 = v0 + s->nkp * NR;
      for (size_t ir = 0; ir < qnp; ir += 32) {
        bl->block(acc + ir * dpad + dq * NR, dpad, 1, pb + ir * KB, KB, 1, 0, v0, v1, 0, knp, two);
      }
    }
  }
  for (size_t i = 0; i < qn; i++) {
    float *o = s->out + (b * s->Nq + q0 + i) * s->C + h * D;
    const float inv = 1.0f / sum[i];
    for (size_t d = 0; d < D; d++) o[d] = acc[i * dpad + d] * inv;
  }
}

static void attend_task_bf16(void *ctx, int t, int n) {
  (void)t, (void)n;
  attn_t *s = ctx;
  const blocks_t *bl = bf16_blocks();
  const size_t dpad = (s->D + NR - 1) / NR * NR;
  float *scores = aligned_alloc(64, sizeof(float) * QB * KB), *acc = aligned_alloc(64, sizeof(float) * QB * dpad);
  uint16_t *pb = aligned_alloc(64, sizeof(uint16_t) * QB * KB), *qb = aligned_alloc(64, sizeof(uint16_t) * QB * s->dp);
  float mx[QB], sum[QB];
  size_t u0, u1;
  if (scores && acc && pb && qb) bl->begin();
  while (take(&s->work, &u0, &u1)) {
    if (scores && acc && pb && qb) attend_unit_bf16(s, bl, u0, scores, pb, qb, acc, mx, sum);
    else nan_units(s, u0, u1);
  }
  if (scores && acc && pb && qb) bl->end();
  free(scores);
  free(acc);
  free(pb);
  free(qb);
}

static void attend_task(void *ctx, int t, int n) {
  (void)t, (void)n;
  attn_t *s = ctx;
  const size_t dpad = (s->D + NR - 1) / NR * NR;
  float *scores = malloc(sizeof(float) * QB * KB), *acc = malloc(sizeof(float) * QB * dpad);
  float mx[QB], sum[QB];
  size_t u0, u1;
  while (take(&s->work, &u0, &u1)) {
    if (scores && acc) attend_unit(s, u0, scores, acc, mx, sum);
    else nan_units(s, u0, u1);
  }
  free(scores);
  free(acc);
}

static napi_value attention(napi_env env, napi_callback_info info) {
  napi_value argv[12];
  args_t a;
  if (!get_args(env, info, argv, 12, &a)) return NULL;
  const int bf = bool_arg(&a, 11);
  if (bf && !a.failed && !bf16_blocks()) fail(&a, "sd_kernels: bf16 attention needs AMX-BF16 or AVX512-BF16, which this CPU (or its OS) does not offer");
  const size_t B = dim(&a, 3, "B"), Nq = dim(&a, 4, "Nq"), Nk = dim(&a, 5, "Nk"), heads = dim(&a, 6, "heads");
  const size_t D = dim(&a, 7, "D");
  const float scale = (float)num(&a, 8, "scale");
  const int threads = threads_arg(&a, 10);
  if (!a.failed && (heads == 0 || D == 0 || Nk == 0)) fail(&a, "sd_kernels: heads, D and Nk must be positive");
  const size_t C = heads * D;
  const float *q = f32(&a, 0, "q", B * Nq * C, 0), *k = f32(&a, 1, "k", B * Nk * C, 0), *v = f32(&a, 2, "v", B * Nk * C, 0);
  float *out = f32(&a, 9, "out", B * Nq * C, 0);
  if (a.failed || B * Nq == 0) return NULL;
  attn_t s = { q, k, v, out, B, Nq, Nk, heads, D, C, scale, NULL, NULL, 0, 0, (Nq + QB - 1) / QB, NULL, NULL, 0, 0, { 0 } };
  units_of(&s.work, B * heads * s.units_per_item, 1, 1, 1); /* one unit at a time */
  if (bf) {
    s.dp = kround(bf16_blocks(), D);
    s.nkp = kround(bf16_blocks(), Nk);
    s.kb = malloc(sizeof(uint16_t) * ((Nk + NR - 1) / NR * NR) * s.dp * B * heads);
    s.vb = malloc(sizeof(uint16_t) * ((D + NR - 1) / NR * NR) * s.nkp * B * heads);
    if (!s.kb || !s.vb) {
      free(s.kb);
      free(s.vb);
      fail(&a, "sd_kernels: out of memory for attention's packed keys and values");
      return NULL;
    }
    parallel(pack_kv_bf16_task, &s, threads);
    parallel(attend_task_bf16, &s, threads);
    free(s.kb);
    free(s.vb);
    return NULL;
  }
  s.kp_item = (Nk + NR - 1) / NR * NR * D;
  s.vp_item = (D + NR - 1) / NR * NR * Nk;
  s.kp = malloc(sizeof(float) * s.kp_item * B * heads);
  s.vp = malloc(sizeof(float) * s.vp_item * B * heads);
  if (!s.kp || !s.vp || !zero_row(D > KB ? D : KB)) {
    free(s.kp);
    free(s.vp);
    fail(&a, "sd_kernels: out of memory for attention's packed keys and values");
    return NULL;
  }
  parallel(pack_kv_task, &s, threads);
  parallel(attend_task, &s, threads);
  free(s.kp);
  free(s.vp);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* groupNorm(x [B, P, C], B, P, C, groups, eps, gamma, beta, silu, out, threads)                                     */
/* Pass 1: per-channel sums (float over 64 positions, then double); pass 2: the same for (x - mean_group)^2;         */
/* pass 3: y = x * scale[c] + shift[c], then y * sigmoid(y) when silu.                                               */

typedef struct {
  const float *x;
  float *out;
  size_t B, P, C;
  double *partial;      /* [threads][B][C] */
  const float *center;  /* [B][C]: the group mean per channel, for pass 2 */
  const float *scale, *shift; /* [B][C], for pass 3 */
  int pass, silu;
} gn_t;

AVX2 static void gn_task(void *ctx, int t, int n) {
  gn_t *g = ctx;
  const size_t C = g->C, P = g->P;
  const size_t p0 = P * (size_t)t / (size_t)n, p1 = P * (size_t)(t + 1) / (size_t)n;
  for (size_t b = 0; b < g->B; b++) {
    const float *x = g->x + b * P * C;
    if (g->pass < 3) {
      double *tot = g->partial + ((size_t)t * g->B + b) * C;
      const float *ctr = g->pass == 2 ? g->center + b * C : NULL;
      float *blk = calloc(C, sizeof(float));
      if (!blk) { for (size_t c = 0; c < C; c++) tot[c] = NAN; continue; }
      for (size_t p = p0; p < p1; p++) {
        const float *r = x + p * C;
        if (ctr) for (size_t c = 0; c < C; c++) { const float d = r[c] - ctr[c]; blk[c] += d * d; }
        else for (size_t c = 0; c < C; c++) blk[c] += r[c];
        if ((p - p0) % 64 == 63 || p + 1 == p1) {
          for (size_t c = 0; c < C; c++) { tot[c] += blk[c]; blk[c] = 0.0f; }
        }
      }
      free(blk);
    } else {
      const float *sc = g->scale + b * C, *sh = g->shift + b * C;
      float *o = g->out + b * P * C;
      for (size_t p = p0; p < p1; p++) {
        const float *r = x + p * C;
        float *w = o + p * C;
        size_t c = 0;
        for (; c + 8 <= C; c += 8) {
          __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(r + c), _mm256_loadu_ps(sc + c), _mm256_loadu_ps(sh + c));
          if (g->silu) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), y));
            y = _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
          }
          _mm256_storeu_ps(w + c, y);
        }
        for (; c < C; c++) {
          const float y = r[c] * sc[c] + sh[c];
          w[c] = g->silu ? y / (1.0f + expf(-y)) : y;
        }
      }
    }
  }
}

static napi_value group_norm(napi_env env, napi_callback_info info) {
  napi_value argv[11];
  args_t a;
  if (!get_args(env, info, argv, 11, &a)) return NULL;
  const size_t B = dim(&a, 1, "B"), P = dim(&a, 2, "P"), C = dim(&a, 3, "C"), G = dim(&a, 4, "groups");
  const double eps = num(&a, 5, "eps");
  bool silu = false;
  if (!a.failed && (a.argc <= 8 || napi_get_value_bool(env, argv[8], &silu) != napi_ok)) fail(&a, "sd_kernels: silu must be a boolean");
  const int threads = threads_arg(&a, 10);
  if (!a.failed && (G == 0 || C % G != 0 || P == 0)) fail(&a, "sd_kernels: groups must divide C, and P must be positive");
  const float *x = f32(&a, 0, "x", B * P * C, 0), *gamma = f32(&a, 6, "gamma", C, 0), *beta = f32(&a, 7, "beta", C, 0);
  float *out = f32(&a, 9, "out", B * P * C, 0);
  if (a.failed || B == 0) return NULL;
  const int n = threads;
  double *partial = malloc(sizeof(double) * (size_t)n * B * C);
  float *center = malloc(sizeof(float) * B * C), *scale = malloc(sizeof(float) * B * C), *shift = malloc(sizeof(float) * B * C);
  if (!partial || !center || !scale || !shift) {
    free(partial); free(center); free(scale); free(shift);
    fail(&a, "sd_kernels: out of memory for groupNorm's statistics");
    return NULL;
  }
  gn_t g = { x, out, B, P, C, partial, center, scale, shift, 1, silu };
  const size_t cg = C / G;
  const double count = (double)P * (double)cg;
  double *mean = malloc(sizeof(double) * B * G);
  for (int pass = 1; pass <= 2 && mean; pass++) {
    memset(partial, 0, sizeof(double) * (size_t)n * B * C);
    g.pass = pass;
    parallel(gn_task, &g, n);
    for (size_t b = 0; b < B; b++)
      for (size_t gi = 0; gi < G; gi++) {
        double s = 0;
        for (int t = 0; t < n; t++) for (size_t c = gi * cg; c < (gi + 1) * cg; c++) s += partial[((size_t)t * B + b) * C + c];
        if (pass == 1) {
          mean[b * G + gi] = s / count;
          for (size_t c = gi * cg; c < (gi + 1) * cg; c++) center[b * C + c] = (float)mean[b * G + gi];
        } else {
          const double inv = 1.0 / sqrt(s / count + eps);
          for (size_t c = gi * cg; c < (gi + 1) * cg; c++) {
            scale[b * C + c] = (float)(inv * gamma[c]);
            shift[b * C + c] = (float)(beta[c] - mean[b * G + gi] * inv * gamma[c]);
          }
        }
      }
  }
  if (mean) {
    g.pass = 3;
    parallel(gn_task, &g, n);
  } else {
    fail(&a, "sd_kernels: out of memory for groupNorm's statistics");
  }
  free(mean); free(partial); free(center); free(scale); free(shift);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* layerNorm(x [M, C], M, C, eps, gamma, beta, out, threads): per row, biased variance, centred, in double.          */
/* The row's sums run in 16 double lanes (four AVX2 registers), added in one fixed order at the end: one scalar      */
/* double chain waited out each add's latency (SDXL's [2048, 1280] LayerNorm: 3.4 ms, bound by it).                  */

typedef struct { const float *x, *gamma, *beta; float *out; size_t M, C; double eps; } ln_t;

/* sum over c of (r[c] - centre)^power, power 1 or 2 */
AVX2 static double ln_sum(const float *r, size_t C, double centre, int power) {
  const __m256d cv = _mm256_set1_pd(centre);
  __m256d a[4] = { _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd() };
  size_t c = 0;
  for (; c + 16 <= C; c += 16)
    for (int i = 0; i < 4; i++) {
      const __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(r + c + 4 * i)), cv);
      a[i] = power == 1 ? _mm256_add_pd(a[i], d) : _mm256_fmadd_pd(d, d, a[i]);
    }
  double lanes[4], tail = 0;
  _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3])));
  for (; c < C; c++) {
    const double d = (double)r[c] - centre;
    tail += power == 1 ? d : d * d;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
}

AVX2 static void ln_task(void *ctx, int t, int n) {
  const ln_t *l = ctx;
  const size_t m0 = l->M * (size_t)t / (size_t)n, m1 = l->M * (size_t)(t + 1) / (size_t)n, C = l->C;
  for (size_t m = m0; m < m1; m++) {
    const float *r = l->x + m * C;
    float *o = l->out + m * C;
    const double mean = ln_sum(r, C, 0.0, 1) / (double)C, v = ln_sum(r, C, mean, 2);
    const float inv = (float)(1.0 / sqrt(v / (double)C + l->eps)), mf = (float)mean;
    for (size_t c = 0; c < C; c++) o[c] = (r[c] - mf) * inv * l->gamma[c] + l->beta[c];
  }
}

static napi_value layer_norm(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  args_t a;
  if (!get_args(env, info, argv, 8, &a)) return NULL;
  const size_t M = dim(&a, 1, "M"), C = dim(&a, 2, "C");
  const double eps = num(&a, 3, "eps");
  const int threads = threads_arg(&a, 7);
  const float *x = f32(&a, 0, "x", M * C, 0), *gamma = f32(&a, 4, "gamma", C, 0), *beta = f32(&a, 5, "beta", C, 0);
  float *out = f32(&a, 6, "out", M * C, 0);
  if (a.failed || M == 0 || C == 0) return NULL;
  ln_t l = { x, gamma, beta, out, M, C, eps };
  parallel(ln_task, &l, threads);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */
/* geglu(value, gate, out, n, threads): out = value * GELU(gate), GELU(x) = x/2 (1 + erf(x / sqrt 2)) as in torch.     */
/* erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) on |x|, sign restored.                              */

AVX2 static inline __m256 erf256(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  return _mm256_or_ps(y, sign);
}

typedef struct { const float *value, *gate; float *out; size_t n; } geglu_t;

/* out[0, n) = value * GELU(gate), 8 at a time (the last n % 8 with libm's erff). */
AVX2 static void geglu_span(const float *value, const float *gate, float *out, size_t n) {
  size_t i = 0;
  const __m256 half = _mm256_set1_ps(0.5f), rs2 = _mm256_set1_ps(0.70710678118654752f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(gate + i);
    const __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf256(_mm256_mul_ps(x, rs2))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(value + i), gelu));
  }
  for (; i < n; i++) out[i] = value[i] * 0.5f * gate[i] * (1.0f + erff(gate[i] * 0.70710678118654752f));
}

static void geglu_task(void *ctx, int t, int n) {
  const geglu_t *g = ctx;
  const size_t i0 = g->n * (size_t)t / (size_t)n / 8 * 8, i1 = t + 1 == n ? g->n : g->n * (size_t)(t + 1) / (size_t)n / 8 * 8;
  geglu_span(g->value + i0, g->gate + i0, g->out + i0, i1 - i0);
}

/*
 * linearGeglu(x, M, K, value, gate, N, valueBias | null, gateBias | null, out, threads): out [M, N] =
 * (x Wv + bv) * GELU(x Wg + bg), the GEGLU feed-forward's projection without its two [M, N] products in memory
 * (at SD 1.5's 64x64 level, batch 2: 42 MB each, written and read back). Per block of rows and columns both
 * products are made into a thread's scratch block, as linear makes them, and combined as geglu does: the same bits
 * as linear, linear and geglu wherever N is a multiple of 8. Float32 or half panels.
 */
typedef struct { const gemm_t *value, *gate; float *out; units_t rows; } gated_t;

static void gated_task(void *ctx, int t, int n) {
  (void)t, (void)n;
  gated_t *s = ctx;
  const gemm_t *gv = s->value;
  /* half as many panels per block as linear's, so both scratch blocks (384 KiB together) stay in L2 */
  const size_t jn = JN / 2, N = gv->N, panels = (N + NR - 1) / NR, ld = jn * NR;
  float *scratch = malloc(sizeof(float) * 2 * MC * ld);
  size_t ic, m1;
  while (take(&s->rows, &ic, &m1)) {
    if (!scratch) { /* never passes for a result */
      for (size_t m = ic; m < m1; m++) for (size_t j = 0; j < N; j++) s->out[m * N + j] = NAN;
      continue;
    }
    for (size_t jp = 0; jp < panels; jp += jn) {
      const size_t mc = m1 - ic, jp1 = min_sz(panels, jp + jn), cols = min_sz(ld, N - jp * NR);
      gemm_t v = *gv, g = *s->gate;
      v.c = scratch, g.c = scratch + MC * ld;
      v.ldc = g.ldc = ld;
      v.c_row0 = g.c_row0 = ic;
      v.c_col0 = g.c_col0 = jp * NR;
      gemm_block(&v, ic, mc, jp, jp1);
      gemm_block(&g, ic, mc, jp, jp1);
      for (size_t i = 0; i < mc; i++) geglu_span(v.c + i * ld, g.c + i * ld, s->out + (ic + i) * N + jp * NR, cols);
    }
  }
  free(scratch);
}

static napi_value linear_geglu(napi_env env, napi_callback_info info) {
  napi_value argv[10];
  args_t a;
  if (!get_args(env, info, argv, 10, &a)) return NULL;
  const size_t M = dim(&a, 1, "M"), K = dim(&a, 2, "K"), N = dim(&a, 5, "N");
  const int threads = threads_arg(&a, 9);
  const float *x = f32(&a, 0, "x", M * K, 0);
  const float *pv, *pg;
  const uint16_t *hv, *hg;
  panels_arg(&a, 3, packed_len(K, N), packed_len(K, N), &pv, &hv);
  panels_arg(&a, 4, packed_len(K, N), packed_len(K, N), &pg, &hg);
  const float *bv = f32(&a, 6, "valueBias", N, 1), *bg = f32(&a, 7, "gateBias", N, 1);
  float *out = f32(&a, 8, "out", M * N, 0);
  if (!a.failed && K == 0) fail(&a, "sd_kernels: linearGeglu needs K > 0");
  if (a.failed || M == 0 || N == 0) return NULL;
  size_t *kstart = malloc(sizeof(size_t) * (K / KC + 2));
  if (!kstart || !zero_row(KC)) { free(kstart); fail(&a, "sd_kernels: out of memory"); return NULL; }
  dense_rows_t rows = { x, K };
  const size_t kblocks = k_blocks(K, K, kstart);
  const gemm_t value = { M, N, K, dense_row, &rows, kstart, kblocks, pv, hv, { bv, 0, N, NULL, N }, NULL, 0, NULL, K, NULL, 0, 0 };
  const gemm_t gate = { M, N, K, dense_row, &rows, kstart, kblocks, pg, hg, { bg, 0, N, NULL, N }, NULL, 0, NULL, K, NULL, 0, 0 };
  gated_t s = { &value, &gate, out, { 0 } };
  units_of(&s.rows, M, MC, micro.mr, threads);
  parallel(gated_task, &s, threads);
  free(kstart);
  return NULL;
}

static napi_value geglu(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  args_t a;
  if (!get_args(env, info, argv, 5, &a)) return NULL;
  const size_t n = dim(&a, 3, "n");
  const int threads = threads_arg(&a, 4);
  const float *value = f32(&a, 0, "value", n, 0), *gate = f32(&a, 1, "gate", n, 0);
  float *out = f32(&a, 2, "out", n, 0);
  if (a.failed || n == 0) return NULL;
  geglu_t g = { value, gate, out, n };
  parallel(geglu_task, &g, threads);
  return NULL;
}

/* ---------------------------------------------------------------------------------------------------------------- */

/* The sha256 of this file when it was built (src/setup/kernels.ts passes it), so a stale build is never used. */
#ifndef SD_KERNELS_SOURCE
#define SD_KERNELS_SOURCE "unknown"
#endif

static napi_value source_hash(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value r;
  napi_create_string_utf8(env, SD_KERNELS_SOURCE, NAPI_AUTO_LENGTH, &r);
  return r;
}

static napi_value available(napi_env env, napi_callback_info info) {
  (void)info;
  __builtin_cpu_init();
  napi_value r;
  napi_get_boolean(env, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"), &r);
  return r;
}

/*
 * microKernel([name]) -> the micro-kernel in use ("avx2" or "avx512"); with a name, switches to it first (a RangeError
 * when this CPU cannot run it). Only between calls: a kernel never changes while one runs.
 */
static napi_value micro_kernel(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype type = napi_undefined;
  if (argc > 0) napi_typeof(env, argv[0], &type);
  if (type != napi_undefined) {
    char name[16] = "";
    size_t len = 0;
    if (type != napi_string || napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len) != napi_ok) {
      napi_throw_type_error(env, NULL, "sd_kernels: microKernel takes \"avx2\" or \"avx512\"");
      return NULL;
    }
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0) micro = MICRO_AVX2;
    else if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f")) micro = MICRO_AVX512;
    else {
      char msg[96];
      snprintf(msg, sizeof msg, "sd_kernels: micro-kernel \"%s\" is not one this CPU runs (avx2, avx512)", name);
      napi_throw_range_error(env, NULL, msg);
      return NULL;
    }
  }
  napi_value r;
  napi_create_string_utf8(env, micro.name, NAPI_AUTO_LENGTH, &r);
  return r;
}

NAPI_MODULE_INIT() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) micro = MICRO_AVX512; /* the widest this CPU runs; AVX2 is the baseline */
  const napi_property_descriptor fns[] = {
    { "microKernel", NULL, micro_kernel, NULL, NULL, NULL, napi_default, NULL },
    { "available", NULL, available, NULL, NULL, NULL, napi_default, NULL },
    { "source", NULL, source_hash, NULL, NULL, NULL, napi_default, NULL },
    { "tuneAllocator", NULL, tune_allocator, NULL, NULL, NULL, napi_default, NULL },
    { "trimHeap", NULL, trim_heap, NULL, NULL, NULL, napi_default, NULL },
    { "packWeights", NULL, pack_weights, NULL, NULL, NULL, napi_default, NULL },
    { "awaitPacks", NULL, await_packs, NULL, NULL, NULL, napi_default, NULL },
    { "halvePanels", NULL, halve_panels, NULL, NULL, NULL, napi_default, NULL },
    { "bf16", NULL, bf16_isa, NULL, NULL, NULL, napi_default, NULL },
    { "releasePanels", NULL, release_panels, NULL, NULL, NULL, napi_default, NULL },
    { "widenHalves", NULL, widen_halves, NULL, NULL, NULL, napi_default, NULL },
    { "readAhead", NULL, read_ahead, NULL, NULL, NULL, napi_default, NULL },
    { "readDirect", NULL, read_direct, NULL, NULL, NULL, napi_default, NULL },
    { "pageCached", NULL, page_cached, NULL, NULL, NULL, napi_default, NULL },
    { "linear", NULL, linear, NULL, NULL, NULL, napi_default, NULL },
    { "conv2d", NULL, conv2d, NULL, NULL, NULL, napi_default, NULL },
    { "conv3x3Winograd", NULL, conv3x3_winograd, NULL, NULL, NULL, napi_default, NULL },
    { "attention", NULL, attention, NULL, NULL, NULL, napi_default, NULL },
    { "groupNorm", NULL, group_norm, NULL, NULL, NULL, napi_default, NULL },
    { "layerNorm", NULL, layer_norm, NULL, NULL, NULL, napi_default, NULL },
    { "geglu", NULL, geglu, NULL, NULL, NULL, napi_default, NULL },
    { "linearGeglu", NULL, linear_geglu, NULL, NULL, NULL, napi_default, NULL },
  };
  napi_define_properties(env, exports, sizeof fns / sizeof fns[0], fns);
  return exports;
}
