// The int8 dot's inner loops on AVX2 without VNNI, one core, weights and rows in L1: giga products a second
// (best and median of interleaved rounds) for the loop flaxsst and ONNX Runtime's MLAS use (u8 x s8
// vpmaddubsw, then vpmaddwd by ones into int32), the same with 255-level rows through the sign trick
// (|x| x sign(w, x): no int16 saturation), and int16 rows through vpmaddwd (exact at any level count); and
// quantizing a row to levels with a division, a product, and the product with 32 values packed at once.
// Built and run by bench/int8_loops.py.
#include <immintrin.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 768
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static int8_t w8[2][K * 8] __attribute__((aligned(64)));
static uint8_t xu[6][K] __attribute__((aligned(64)));
static int8_t xs[6][K] __attribute__((aligned(64)));
static uint8_t xa[6][K] __attribute__((aligned(64)));
static int16_t x16[6][K] __attribute__((aligned(64)));
static int32_t out[6][16];

#define ROWS 4
#define SWEEP(NAME, STEP, ...)                                                                    \
  static void NAME(void) {                                                                        \
    __m256i acc0[ROWS], acc1[ROWS];                                                               \
    const __m256i ones = _mm256_set1_epi16(1);                                                    \
    (void)ones;                                                                                   \
    for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();                    \
    for (int k = 0; k < K; k += STEP) {                                                           \
      __VA_ARGS__                                                                                 \
    }                                                                                             \
    for (int r = 0; r < ROWS; ++r) {                                                              \
      _mm256_storeu_si256((__m256i*)out[r], acc0[r]);                                             \
      _mm256_storeu_si256((__m256i*)(out[r] + 8), acc1[r]);                                       \
    }                                                                                             \
  }

SWEEP(maddubs_127, 4, {
  __m256i a = _mm256_load_si256((const __m256i*)(w8[0] + 8 * k));
  __m256i b = _mm256_load_si256((const __m256i*)(w8[1] + 8 * k));
  for (int r = 0; r < ROWS; ++r) {
    __m256i x = _mm256_set1_epi32(*(const int32_t*)(xu[r] + k));
    acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, a), ones));
    acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b), ones));
  }
})
SWEEP(sign_trick_255, 4, {
  __m256i a = _mm256_load_si256((const __m256i*)(w8[0] + 8 * k));
  __m256i b = _mm256_load_si256((const __m256i*)(w8[1] + 8 * k));
  for (int r = 0; r < ROWS; ++r) {
    __m256i s = _mm256_set1_epi32(*(const int32_t*)(xs[r] + k)), x = _mm256_set1_epi32(*(const int32_t*)(xa[r] + k));
    acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_sign_epi8(a, s)), ones));
    acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_sign_epi8(b, s)), ones));
  }
})
SWEEP(madd_int16, 2, {
  __m256i a = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)(w8[0] + 8 * k)));
  __m256i b = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)(w8[1] + 8 * k)));
  for (int r = 0; r < ROWS; ++r) {
    __m256i x = _mm256_set1_epi32(*(const int32_t*)(x16[r] + k));
    acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(x, a));
    acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(x, b));
  }
})

#define M 64
static float row[M * K] __attribute__((aligned(64)));
static uint8_t levels[M * K] __attribute__((aligned(64)));
static void quantize(int kind) {  // 0: division, 1: product, 2: product, 32 values packed at once
  for (int m = 0; m < M; ++m) {
    const float* x = row + m * K;
    float s = 2.0f / 127, inverse = 1.0f / s;
    __m256 d = _mm256_set1_ps(kind ? inverse : s);
    __m256i z = _mm256_set1_epi32(64);
    if (kind == 2) {
      for (int k = 0; k < K; k += 32) {
        __m256i v[4];
        for (int i = 0; i < 4; ++i)
          v[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), d)), z);
        __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(levels + m * K + k), _mm256_min_epu8(bytes, _mm256_set1_epi8(127)));
      }
      continue;
    }
    for (int k = 0; k < K; k += 8) {
      __m256 f = kind ? _mm256_mul_ps(_mm256_loadu_ps(x + k), d) : _mm256_div_ps(_mm256_loadu_ps(x + k), d);
      __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(f), z);
      v = _mm256_min_epi32(_mm256_max_epi32(v, _mm256_setzero_si256()), _mm256_set1_epi32(127));
      int32_t l[8] __attribute__((aligned(32)));
      _mm256_store_si256((__m256i*)l, v);
      for (int j = 0; j < 8; ++j) levels[m * K + k + j] = (uint8_t)l[j];
    }
  }
}
static void quantize_division(void) { quantize(0); }
static void quantize_product(void) { quantize(1); }
static void quantize_packed(void) { quantize(2); }

typedef struct { const char* name; void (*run)(void); double work; } Loop;

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(void) {
  srand(0);
  for (int i = 0; i < K * 8; ++i) w8[0][i] = (int8_t)(rand() % 255 - 127), w8[1][i] = (int8_t)(rand() % 255 - 127);
  for (int r = 0; r < 6; ++r)
    for (int k = 0; k < K; ++k) {
      xu[r][k] = (uint8_t)(rand() % 128);
      xs[r][k] = (int8_t)(rand() % 255 - 127);
      xa[r][k] = (uint8_t)abs(xs[r][k]);
      x16[r][k] = (int16_t)(rand() % 256);
    }
  for (int i = 0; i < M * K; ++i) row[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
  Loop loops[] = {{"maddubs_127", maddubs_127, (double)ROWS * 16 * K},
                  {"sign_trick_255", sign_trick_255, (double)ROWS * 16 * K},
                  {"madd_int16", madd_int16, (double)ROWS * 16 * K},
                  {"quantize_division", quantize_division, (double)M * K},
                  {"quantize_product", quantize_product, (double)M * K},
                  {"quantize_packed", quantize_packed, (double)M * K}};
  enum { kLoops = sizeof(loops) / sizeof(loops[0]), kRounds = 41 };
  static double rates[kLoops][kRounds];
  for (int round = 0; round < kRounds; ++round)
    for (int i = 0; i < kLoops; ++i) {
      int calls = i < 3 ? 4000 : 200;
      double start = now();
      for (int c = 0; c < calls; ++c) loops[i].run();
      rates[i][round] = calls * loops[i].work / (now() - start) * 1e-9;
    }
  for (int i = 0; i < kLoops; ++i) {
    qsort(rates[i], kRounds, sizeof(double), by_value);
    printf("{\"what\": \"%s\", \"unit\": \"%s\", \"best\": %.2f, \"median\": %.2f}\n", loops[i].name,
           i < 3 ? "giga products/s" : "giga values/s", rates[i][kRounds - 1], rates[i][kRounds / 2]);
  }
  return out[0][0] == 12345 && levels[0] == 200;
}
