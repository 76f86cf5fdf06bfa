/* Exact integer kernels (AVX2) for the packed lanes layout of kernels.py.

   acc[t][r] = sum_g m[r][g] * sum_{j in g} q[r][j] * a[t][j]          (exact, int64)

   for T activation rows at once (T = 1: a decode step; T > 1: a prompt). A row block holds
   L = 64 rows; a column of a block is one byte per lane (8-bit layout) or one nibble per lane
   (4-bit layout: byte l holds lane l in its low nibble, stored q + 8, and lane 32 + l in its
   high nibble, q as signed 4 bits). Group multipliers m: uint16 (n_blocks, n_groups, 64).

   The products are 8-bit integer multiply-adds (vpmaddubsw: unsigned x signed bytes, adjacent
   pairs summed to int16), never saturating here:
     4-bit: (q + 8) in [0, 15] times a in [-127, 127]: a pair is at most 3,810 in magnitude, and
            eight pairs (16 columns) are summed in int16 (30,480 < 32,767) before widening;
            sum (q + 8) a - 8 sum a = sum q a.
     8-bit: |q| times sign(q) a (vpsignb), |q|, |a| <= 127: a pair is at most 32,258; two pairs
            (four columns of a lane) are widened and summed by vpmaddwd into int32 at once.
   Group sums fit int32 (cols * 127 * 127 < 2^31 for cols < 133,000); m * sum is int64.
   Columns are visited in pairs; after the byte interleave (vpunpck*bw, within 128-bit halves)
   a vector's 16 results are the lanes [b, b + 8) and [b + 16, b + 24) of its 32-lane half. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define L 64

int bk_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* add 16 int16 results (lanes [b, b+8) and [b+16, b+24)) to int32 sums s[64] */
static inline void widen_add(int32_t *s, int b, __m256i x)
{
    __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(x));
    __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1));
    _mm256_storeu_si256((__m256i *)(s + b), _mm256_add_epi32(_mm256_loadu_si256((__m256i *)(s + b)), lo));
    _mm256_storeu_si256((__m256i *)(s + b + 16),
                        _mm256_add_epi32(_mm256_loadu_si256((__m256i *)(s + b + 16)), hi));
}

/* columns per decoded tile: the largest divisor of group that is a multiple of `step` and at
   most TILE (the tile's decoded pairs stay in L1 while every token of the call uses them) */
#define TILE 256
static int tile_cols(int group, int step)
{
    for (int t = TILE; t >= step; t -= step)
        if (group % t == 0)
            return t;
    return step;
}

/* tot[64] (int64) += m[64] (int64) * (s[64] - bias) */
static inline void apply_m64(int64_t *tot, const int64_t *m, const int32_t *s, int32_t bias)
{
    __m256i bb = _mm256_set1_epi32(bias);
    for (int l = 0; l < L; l += 8) {
        __m256i sv = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(s + l)), bb);
        __m256i s0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(sv));
        __m256i s1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(sv, 1));
        __m256i m0 = _mm256_loadu_si256((const __m256i *)(m + l));
        __m256i m1 = _mm256_loadu_si256((const __m256i *)(m + l + 4));
        __m256i *t = (__m256i *)(tot + l);
        _mm256_storeu_si256(t, _mm256_add_epi64(_mm256_loadu_si256(t), _mm256_mul_epi32(s0, m0)));
        _mm256_storeu_si256(t + 1, _mm256_add_epi64(_mm256_loadu_si256(t + 1), _mm256_mul_epi32(s1, m1)));
    }
}

/* an activation pair / quad as one integer (memcpy: no aliasing of the int8 buffer) */
static inline int16_t load16(const int8_t *p) { int16_t v; memcpy(&v, p, 2); return v; }
static inline int32_t load32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

static inline void widen_m(int64_t *mw, const uint16_t *m)
{
    for (int l = 0; l < L; l++)
        mw[l] = m[l];
}

/* 4-bit layout. planes: (nb, cols, 32) bytes; a: (T, cols) int8; asum: (T, ng) int32 sums of a
   over each group; out: (T, ldo) int64, rows (rb - rb0) * 64 + lane. group % 16 == 0. */
void bk_mm4(const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
            int T, int cols, int group, int rb0, int rb1, int64_t *out, int ldo)
{
    const int ng = cols / group, tc = tile_cols(group, 16);
    const __m256i m0f = _mm256_set1_epi8(0x0F), x8 = _mm256_set1_epi8(0x08);
    int32_t s[T][L] __attribute__((aligned(32)));
    int64_t tot[T][L] __attribute__((aligned(32)));
    int64_t mw[L] __attribute__((aligned(32)));
    __m256i P[TILE / 2][4];
    for (int rb = rb0; rb < rb1; rb++) {
        memset(tot, 0, sizeof(tot));
        const uint8_t *blk = planes + (size_t)rb * cols * 32;
        for (int g = 0; g < ng; g++) {
            memset(s, 0, sizeof(s));
            for (int c0 = g * group; c0 < (g + 1) * group; c0 += tc) {
                for (int p = 0; p < tc / 2; p++) {  /* decode the tile's pairs: q + 8 per lane */
                    const uint8_t *b = blk + (size_t)(c0 + 2 * p) * 32;
                    __m256i b0 = _mm256_loadu_si256((const __m256i *)b);
                    __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + 32));
                    __m256i lo0 = _mm256_and_si256(b0, m0f), lo1 = _mm256_and_si256(b1, m0f);
                    __m256i hi0 = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b0, 4), m0f), x8);
                    __m256i hi1 = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m0f), x8);
                    P[p][0] = _mm256_unpacklo_epi8(lo0, lo1);  /* lanes 0-7, 16-23 */
                    P[p][1] = _mm256_unpackhi_epi8(lo0, lo1);  /* lanes 8-15, 24-31 */
                    P[p][2] = _mm256_unpacklo_epi8(hi0, hi1);  /* lanes 32-39, 48-55 */
                    P[p][3] = _mm256_unpackhi_epi8(hi0, hi1);  /* lanes 40-47, 56-63 */
                }
                for (int t = 0; t < T; t++) {
                    const int8_t *ap = a + (size_t)t * cols + c0;
                    for (int p0 = 0; p0 < tc / 2; p0 += 8) {  /* 8 pairs in int16, then widened */
                        __m256i y0 = _mm256_setzero_si256(), y1 = y0, y2 = y0, y3 = y0;
                        for (int p = p0; p < p0 + 8; p++) {
                            __m256i av = _mm256_set1_epi16(load16(ap + 2 * p));  /* (a_j, a_j+1) */
                            y0 = _mm256_add_epi16(y0, _mm256_maddubs_epi16(P[p][0], av));
                            y1 = _mm256_add_epi16(y1, _mm256_maddubs_epi16(P[p][1], av));
                            y2 = _mm256_add_epi16(y2, _mm256_maddubs_epi16(P[p][2], av));
                            y3 = _mm256_add_epi16(y3, _mm256_maddubs_epi16(P[p][3], av));
                        }
                        widen_add(s[t], 0, y0);
                        widen_add(s[t], 8, y1);
                        widen_add(s[t], 32, y2);
                        widen_add(s[t], 40, y3);
                    }
                }
            }
            widen_m(mw, m + ((size_t)rb * ng + g) * L);
            for (int t = 0; t < T; t++)
                apply_m64(tot[t], mw, s[t], 8 * asum[(size_t)t * ng + g]);
        }
        for (int t = 0; t < T; t++)
            memcpy(out + (size_t)t * ldo + (size_t)(rb - rb0) * L, tot[t], sizeof(tot[t]));
    }
}

/* four columns of 32 lanes (one byte each) -> four vectors of quads (the order below) */
static inline void quads(const int8_t *b, size_t stride, __m256i w[4])
{
    __m256i x0 = _mm256_loadu_si256((const __m256i *)b);
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(b + stride));
    __m256i x2 = _mm256_loadu_si256((const __m256i *)(b + 2 * stride));
    __m256i x3 = _mm256_loadu_si256((const __m256i *)(b + 3 * stride));
    __m256i l01 = _mm256_unpacklo_epi8(x0, x1), l23 = _mm256_unpacklo_epi8(x2, x3);
    __m256i h01 = _mm256_unpackhi_epi8(x0, x1), h23 = _mm256_unpackhi_epi8(x2, x3);
    w[0] = _mm256_unpacklo_epi16(l01, l23);
    w[1] = _mm256_unpackhi_epi16(l01, l23);
    w[2] = _mm256_unpacklo_epi16(h01, h23);
    w[3] = _mm256_unpackhi_epi16(h01, h23);
}

/* add a lane-quad accumulator set (the quads order) to the int32 sums s[64] */
static inline void store_quads(int32_t *s, const __m256i acc[8])
{
    static const int B[4] = {0, 4, 8, 12};
    for (int k = 0; k < 8; k++) {
        int32_t *sb = s + 32 * (k / 4) + B[k % 4];
        __m128i *p0 = (__m128i *)sb, *p1 = (__m128i *)(sb + 16);
        _mm_storeu_si128(p0, _mm_add_epi32(_mm_loadu_si128(p0), _mm256_castsi256_si128(acc[k])));
        _mm_storeu_si128(p1, _mm_add_epi32(_mm_loadu_si128(p1), _mm256_extracti128_si256(acc[k], 1)));
    }
}

/* 8-bit layout. planes: (nb, cols, 64) int8; as bk_mm4 otherwise (asum unused). group % 4 == 0.
   A tile's columns are interleaved once, four at a time, so that each 32-bit slot holds one
   lane's four weights (vpunpck*bw, then *wd): one vpmaddubsw + vpmaddwd per token then gives
   each lane its four products summed in int32. Vector k of a 32-lane half h holds the lanes
   [B[k], B[k] + 4) in its low 128 bits and [B[k] + 16, B[k] + 20) in its high ones, + 32 h. */
void bk_mm8(const int8_t *planes, const uint16_t *m, const int8_t *a, int T, int cols,
            int group, int rb0, int rb1, int64_t *out, int ldo)
{
    const int ng = cols / group, tc = tile_cols(group, 4);
    const __m256i one = _mm256_set1_epi16(1);
    int32_t s[T][L] __attribute__((aligned(32)));
    int64_t tot[T][L] __attribute__((aligned(32)));
    int64_t mw[L] __attribute__((aligned(32)));
    __m256i W[TILE / 4][8], A[TILE / 4][8];
    for (int rb = rb0; rb < rb1; rb++) {
        memset(tot, 0, sizeof(tot));
        const int8_t *blk = planes + (size_t)rb * cols * L;
        for (int g = 0; g < ng; g++) {
            memset(s, 0, sizeof(s));
            for (int c0 = g * group; c0 < (g + 1) * group; c0 += tc) {
                for (int q = 0; q < tc / 4; q++) {  /* columns c0 + 4q .. c0 + 4q + 3 */
                    const int8_t *b = blk + (size_t)(c0 + 4 * q) * L;
                    for (int h = 0; h < 2; h++) {
                        __m256i *w = W[q] + 4 * h;
                        quads(b + 32 * h, L, w);
                        for (int k = 0; k < 4; k++)
                            A[q][4 * h + k] = _mm256_abs_epi8(w[k]);
                    }
                }
                for (int t = 0; t < T; t++) {
                    const int8_t *ap = a + (size_t)t * cols + c0;
                    __m256i acc[8];
                    for (int k = 0; k < 8; k++)
                        acc[k] = _mm256_setzero_si256();
                    for (int q = 0; q < tc / 4; q++) {
                        __m256i a4 = _mm256_set1_epi32(load32(ap + 4 * q));  /* (a_j .. a_j+3) */
                        for (int k = 0; k < 8; k++)
                            acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(
                                _mm256_maddubs_epi16(A[q][k], _mm256_sign_epi8(a4, W[q][k])), one));
                    }
                    store_quads(s[t], acc);
                }
            }
            widen_m(mw, m + ((size_t)rb * ng + g) * L);
            for (int t = 0; t < T; t++)
                apply_m64(tot[t], mw, s[t], 0);
        }
        for (int t = 0; t < T; t++)
            memcpy(out + (size_t)t * ldo + (size_t)(rb - rb0) * L, tot[t], sizeof(tot[t]));
    }
}

/* ---- AVX-512 VNNI + VBMI, 512-bit vectors: both layouts -----------------------------------------

   vpdpbusd adds four unsigned x signed byte products to each int32 slot, without the int16 step
   of vpmaddubsw, so a weight needs no sign trick: it is used biased (unsigned), and the group's
   sum is corrected by the bias times the group's sum of a. A column quad (columns c .. c + 3 of a row block) becomes four vectors of 16 lane quads (each
   32-bit slot: one lane's four weights, biased unsigned), multiplied by vpdpbusd with the four
   activations broadcast; a group's sums stay in registers and meet their multipliers there
   (vpmuldq into int64 lanes). A prompt decodes a tile (in L1) once and passes over it with NT = 4
   tokens at a time (16 accumulators), so each decoded vector serves four vpdpbusd.

   4-bit layout: the quad is 128 contiguous bytes (32 per column: lane l in the low nibble, stored
   q + 8; lane 32 + l in the high one, q as signed 4 bits). Two byte permutes (vpermt2b) gather
   them: Z_h byte 4 i + k = column c + k, byte 16 h + i, i.e. the lanes 16 h + i (low nibbles) and
   32 + 16 h + i (high nibbles). The low nibble is u = q + 8; the high one, masked in place with
   its top bit flipped ((z & 0xF0) ^ 0x80, one vpternlogd), is 16 u: its sums are 16 x the lane's,
   corrected by 16 * 8 * sum(a), and the lane's int64 total is divided by 16 at the end (exact:
   every term is a multiple of 16). |16 sum u a| <= 240 * 127 * group < 2^31.
   8-bit layout: the quad is four 64-byte columns; the byte and word interleave of bk_mm8 within
   each 128-bit chunk puts lane 16 j + 4 k + p in slot 4 j + p of vector k; u = q + 128, corrected
   by 128 * sum(a); |sum u a| <= 255 * 127 * group < 2^31 (simd.py checks VNNI_MAX_GROUP).
   The multipliers are gathered into the same slot order (vpermt2w), and the totals scattered
   back to lane order once per row block. */

int bk_has_vnni(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw");
}

#define V512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512dq")))
#define INLINE static inline __attribute__((always_inline))

int bk_has_vbmi(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512dq");
}

/* the lane of slot i of vector k */
static int slot_lane(int nibbles, int k, int i)
{
    return nibbles ? 16 * k + i : 16 * (i / 4) + 4 * k + i % 4;
}

/* the four vectors of biased lane quads of columns c .. c + 3 (ix: the two vpermt2b indices) */
V512 INLINE void quads512(const uint8_t *blk, int c, int nibbles, const __m512i ix[2], __m512i u[4])
{
    if (nibbles) {
        const uint8_t *b = blk + (size_t)c * 32;
        const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0),
                      x80 = _mm512_set1_epi8((char)0x80);
        __m512i x0 = _mm512_loadu_si512(b), x1 = _mm512_loadu_si512(b + 64);
        __m512i z0 = _mm512_permutex2var_epi8(x0, ix[0], x1), z1 = _mm512_permutex2var_epi8(x0, ix[1], x1);
        u[0] = _mm512_and_si512(z0, lo4);
        u[1] = _mm512_and_si512(z1, lo4);
        u[2] = _mm512_ternarylogic_epi32(z0, hi4, x80, 0x6A);  /* (z & 0xF0) ^ 0x80 */
        u[3] = _mm512_ternarylogic_epi32(z1, hi4, x80, 0x6A);
    } else {
        const uint8_t *b = blk + (size_t)c * L;
        const __m512i x80 = _mm512_set1_epi8((char)0x80);
        __m512i x0 = _mm512_loadu_si512(b), x1 = _mm512_loadu_si512(b + L);
        __m512i x2 = _mm512_loadu_si512(b + 2 * L), x3 = _mm512_loadu_si512(b + 3 * L);
        __m512i l01 = _mm512_unpacklo_epi8(x0, x1), l23 = _mm512_unpacklo_epi8(x2, x3);
        __m512i h01 = _mm512_unpackhi_epi8(x0, x1), h23 = _mm512_unpackhi_epi8(x2, x3);
        u[0] = _mm512_xor_si512(_mm512_unpacklo_epi16(l01, l23), x80);
        u[1] = _mm512_xor_si512(_mm512_unpackhi_epi16(l01, l23), x80);
        u[2] = _mm512_xor_si512(_mm512_unpacklo_epi16(h01, h23), x80);
        u[3] = _mm512_xor_si512(_mm512_unpackhi_epi16(h01, h23), x80);
    }
}

/* a group's 64 multipliers in slot order, as int64: mw[2 k + h] = slots 8 h .. 8 h + 7 of k */
V512 INLINE void widen_m512(__m512i mw[8], const uint16_t *m, const __m512i mix[4])
{
    __m512i m0 = _mm512_loadu_si512(m), m1 = _mm512_loadu_si512(m + 32);
    for (int k = 0; k < 4; k++) {
        __m512i p = _mm512_permutex2var_epi16(m0, mix[k], m1);  /* slot i of k in word i */
        mw[2 * k] = _mm512_cvtepu16_epi64(_mm512_castsi512_si128(p));
        mw[2 * k + 1] = _mm512_cvtepu16_epi64(_mm512_extracti32x4_epi32(p, 1));
    }
}

/* tot[2 k + h] (int64) += mw[2 k + h] * (acc[k] - bias_k * as), slots 8 h .. 8 h + 7 */
V512 INLINE void apply_m512(__m512i tot[8], const __m512i mw[8], const __m512i acc[4], int32_t as,
                            int nibbles)
{
    for (int k = 0; k < 4; k++) {
        __m512i s = _mm512_sub_epi32(acc[k], _mm512_set1_epi32((nibbles && k < 2 ? 8 : 128) * as));
        __m512i s0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(s));
        __m512i s1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s, 1));
        tot[2 * k] = _mm512_add_epi64(tot[2 * k], _mm512_mul_epi32(s0, mw[2 * k]));
        tot[2 * k + 1] = _mm512_add_epi64(tot[2 * k + 1], _mm512_mul_epi32(s1, mw[2 * k + 1]));
    }
}

/* a row block's totals to out[lane] (the high nibbles' / 16) */
V512 INLINE void store_tot(int64_t *o, const __m512i tot[8], int nibbles, const uint8_t *lane)
{
    if (nibbles) {
        for (int j = 0; j < 8; j++)
            _mm512_storeu_si512(o + 8 * j, j < 4 ? tot[j] : _mm512_srai_epi64(tot[j], 4));
        return;
    }
    int64_t t[L] __attribute__((aligned(64)));
    for (int j = 0; j < 8; j++)
        _mm512_store_si512(t + 8 * j, tot[j]);
    for (int i = 0; i < L; i++)
        o[lane[i]] = t[i];
}

/* NT tokens' sums over a decoded tile of nq quads: acc[t][k] += U[q][k] . a_t[4q .. 4q + 3] */
V512 INLINE void tile_dot(const __m512i (*U)[4], int nq, const int8_t *a, size_t lda, int NT,
                          __m512i acc[][4])
{
    for (int q = 0; q < nq; q++)
        for (int t = 0; t < NT; t++) {
            __m512i a4 = _mm512_set1_epi32(load32(a + (size_t)t * lda + 4 * q));
            for (int k = 0; k < 4; k++)
                acc[t][k] = _mm512_dpbusd_epi32(acc[t][k], U[q][k], a4);
        }
}

/* S[t][k] = (first ? 0 : S[t][k]) + the tile's sums, for NT tokens from t0 */
V512 INLINE void tile_tokens(const __m512i (*U)[4], int nq, const int8_t *a, int cols, int t0,
                             int NT, int first, __m512i (*S)[4])
{
    __m512i acc[4][4];
    for (int t = 0; t < NT; t++)
        for (int k = 0; k < 4; k++)
            acc[t][k] = first ? _mm512_setzero_si512() : S[t0 + t][k];
    tile_dot(U, nq, a + (size_t)t0 * cols, cols, NT, acc);
    for (int t = 0; t < NT; t++)
        for (int k = 0; k < 4; k++)
            S[t0 + t][k] = acc[t][k];
}

/* the two vpermt2b indices that gather a column quad's nibble bytes (quads512) */
V512 INLINE void quad_index(__m512i vix[2])
{
    uint8_t ix[2][64];
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 16; i++)
            for (int k = 0; k < 4; k++)
                ix[h][4 * i + k] = (uint8_t)(32 * k + 16 * h + i);
    for (int h = 0; h < 2; h++)
        vix[h] = _mm512_loadu_si512(ix[h]);
}

/* all T tokens over one decoded tile: four at a time, then the rest one by one (tile_tokens) */
V512 INLINE void tile_all(const __m512i (*U)[4], int nq, const int8_t *a, int cols, int T, int first,
                          __m512i (*S)[4])
{
    int t0 = 0;
    for (; t0 + 4 <= T; t0 += 4)
        tile_tokens(U, nq, a, cols, t0, 4, first, S);
    for (; t0 < T; t0++)
        tile_tokens(U, nq, a, cols, t0, 1, first, S);
}

/* software prefetch for a decode step's 8 columns from c: PF_L1 columns ahead into L1 and PF_L2
   into L2 (past the block's end it reads the next block, which follows it in memory). On an
   Intel Xeon (Sapphire Rapids) VM it raised the single-thread read rate from DRAM from 9.6 to
   11.6 GB/s (4-bit) and 11.7 to 12.8 (8-bit); on an AMD EPYC it changed nothing measurable. */
#define PF_L1 64
#define PF_L2 256
V512 INLINE void prefetch_cols(const uint8_t *blk, int c, size_t colbytes)
{
    for (size_t b = 0; b < 8 * colbytes; b += 64) {
        _mm_prefetch((const char *)(blk + (size_t)(c + PF_L1) * colbytes + b), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + (size_t)(c + PF_L2) * colbytes + b), _MM_HINT_T1);
    }
}

/* int32 totals for small groups (flush > 0): a group's sum s (bias removed) times its multiplier
   by vpmulld, exact while |s m| summed over `flush` groups stays below 2^31 (the caller sizes
   flush from the largest multiplier and the group: |s| <= group * 128 * 127); then widened into
   the int64 totals. Else each group's products are int64 (vpmuldq). */
V512 INLINE void widen_m32(__m512i mw[4], const uint16_t *m, const __m512i mix[4])
{
    __m512i m0 = _mm512_loadu_si512(m), m1 = _mm512_loadu_si512(m + 32);
    for (int k = 0; k < 4; k++)
        mw[k] = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(_mm512_permutex2var_epi16(m0, mix[k], m1)));
}

V512 INLINE void apply_m32(__m512i t32[4], const __m512i mw[4], const __m512i acc[4], int32_t as,
                           int nibbles)
{
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_sub_epi32(acc[k], _mm512_set1_epi32((nibbles && k < 2 ? 8 : 128) * as));
        t32[k] = _mm512_add_epi32(t32[k], _mm512_mullo_epi32(v, mw[k]));
    }
}

V512 INLINE void flush32(__m512i tot[8], __m512i t32[4]);

/* a group's finishing: into the int32 totals (flushed every `flush` groups, and after the last)
   or straight into the int64 ones */
V512 INLINE void finish_group(__m512i tot[8], __m512i t32[4], const __m512i acc[4], const uint16_t *m,
                              const __m512i mix[4], int32_t as, int nibbles, int flush, int g, int ng)
{
    if (flush > 0) {
        __m512i mw[4];
        widen_m32(mw, m, mix);
        apply_m32(t32, mw, acc, as, nibbles);
        if ((g + 1) % flush == 0 || g + 1 == ng)
            flush32(tot, t32);
    } else {
        __m512i mw[8];
        widen_m512(mw, m, mix);
        apply_m512(tot, mw, acc, as, nibbles);
    }
}

V512 INLINE void mvz(const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
                     int T, int cols, int group, int rb0, int rb1, int64_t *out, int ldo, int nibbles,
                     int flush)
{
    const int ng = cols / group, tc = tile_cols(group, 8), nq = tc / 4;
    const size_t colbytes = nibbles ? 32 : L;
    uint8_t lane[L];
    uint16_t mi[4][32];
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 32; i++)
            mi[k][i] = (uint16_t)slot_lane(nibbles, k, i % 16);
    for (int i = 0; i < L; i++)
        lane[i] = (uint8_t)slot_lane(nibbles, i / 16, i % 16);
    __m512i vix[2], mix[4];
    quad_index(vix);
    for (int k = 0; k < 4; k++)
        mix[k] = _mm512_loadu_si512(mi[k]);
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *blk = planes + (size_t)rb * cols * colbytes;
        const uint16_t *mb = m + (size_t)rb * ng * L;
        int64_t *o = out + (size_t)(rb - rb0) * L;
        if (T == 1) {  /* a decode step: sums, multipliers and totals all in registers */
            __m512i tot[8], t32[4];
            for (int j = 0; j < 8; j++)
                tot[j] = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++)
                t32[k] = _mm512_setzero_si512();
            for (int g = 0; g < ng; g++) {
                __m512i acc[2][4], u[4];
                for (int k = 0; k < 4; k++)
                    acc[0][k] = acc[1][k] = _mm512_setzero_si512();
                for (int c = g * group; c < (g + 1) * group; c += 8) {  /* two quads, two chains */
                    prefetch_cols(blk, c, colbytes);
                    for (int e = 0; e < 2; e++) {
                        __m512i a4 = _mm512_set1_epi32(load32(a + c + 4 * e));
                        quads512(blk, c + 4 * e, nibbles, vix, u);
                        for (int k = 0; k < 4; k++)
                            acc[e][k] = _mm512_dpbusd_epi32(acc[e][k], u[k], a4);
                    }
                }
                for (int k = 0; k < 4; k++)
                    acc[0][k] = _mm512_add_epi32(acc[0][k], acc[1][k]);
                finish_group(tot, t32, acc[0], mb + (size_t)g * L, mix, asum[g], nibbles, flush, g, ng);
            }
            store_tot(o, tot, nibbles, lane);
            continue;
        }
        __m512i U[TILE / 4][4], S[T][4], tot[T][8], t32[T][4];
        for (int t = 0; t < T; t++) {
            for (int j = 0; j < 8; j++)
                tot[t][j] = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++)
                t32[t][k] = _mm512_setzero_si512();
        }
        for (int g = 0; g < ng; g++) {
            for (int c0 = g * group; c0 < (g + 1) * group; c0 += tc) {
                for (int q = 0; q < nq; q++)
                    quads512(blk, c0 + 4 * q, nibbles, vix, U[q]);
                tile_all((const __m512i (*)[4])U, nq, a + c0, cols, T, c0 == g * group, S);
            }
            if (flush > 0) {
                __m512i mw[4];
                widen_m32(mw, mb + (size_t)g * L, mix);
                const int fl = (g + 1) % flush == 0 || g + 1 == ng;
                for (int t = 0; t < T; t++) {
                    apply_m32(t32[t], mw, S[t], asum[(size_t)t * ng + g], nibbles);
                    if (fl)
                        flush32(tot[t], t32[t]);
                }
            } else {
                __m512i mw[8];
                widen_m512(mw, mb + (size_t)g * L, mix);
                for (int t = 0; t < T; t++)
                    apply_m512(tot[t], mw, S[t], asum[(size_t)t * ng + g], nibbles);
            }
        }
        for (int t = 0; t < T; t++)
            store_tot(o + (size_t)t * ldo, tot[t], nibbles, lane);
    }
}

/* ---- 4-bit layout, groups of 32: the multipliers on int16 pairs (vpmaddwd)

   A group's exact sum s = sum q a (the bias removed; the high nibbles' sums, 16 s, shifted right
   by 4, exactly) has |s| <= 32 * 8 * 127 = 32,512 < 2^15, so it is an int16. With multipliers
   m < 2^15, two groups g, g + 1 of a lane go into one int32 lane as int16 pairs (s_g, s_g+1) and
   (m_g, m_g+1), and one vpmaddwd makes m_g s_g + m_g+1 s_g+1 (|.| <= 2 * 32,767 * 32,512 < 2^31).
   The int32 totals take `flush` such pairs (flush * 2 * max(m) * 32,512 < 2^31, from the
   caller) before they are added to the int64 totals. Against the int64 path (mvz) this halves the
   per-group finishing: 4 vpermt2w per pair of groups instead of 4 vpermt2w + 16 widenings per
   group, and no 64-bit multiplies. */

/* the multiplier pairs of groups g, g + 1 in slot order: word 2i of mp[k] = m_g[16k + i],
   word 2i + 1 = m_g+1[16k + i]; m1 = NULL: the second group is absent (zeros) */
V512 INLINE void pair_m(__m512i mp[4], const uint16_t *m0, const uint16_t *m1, const __m512i pix[2])
{
    const __m512i z = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {  /* lanes 32 h .. 32 h + 31 */
        __m512i a = _mm512_loadu_si512(m0 + 32 * h), b = m1 ? _mm512_loadu_si512(m1 + 32 * h) : z;
        mp[2 * h] = _mm512_permutex2var_epi16(a, pix[0], b);
        mp[2 * h + 1] = _mm512_permutex2var_epi16(a, pix[1], b);
    }
}

/* a group's four sum vectors as int16-valued int32 lanes (bias removed, high nibbles / 16) */
V512 INLINE void sums16(__m512i s[4], const __m512i acc[4], int32_t as)
{
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_sub_epi32(acc[k], _mm512_set1_epi32((k < 2 ? 8 : 128) * as));
        s[k] = k < 2 ? v : _mm512_srai_epi32(v, 4);
    }
}

/* t32[k] += m_g s_g + m_g+1 s_g+1 (s1 = NULL: no second group) */
V512 INLINE void apply_pair(__m512i t32[4], const __m512i mp[4], const __m512i s0[4], const __m512i *s1)
{
    for (int k = 0; k < 4; k++) {
        __m512i pr = s1 ? _mm512_mask_blend_epi16(0xAAAAAAAA, s0[k], _mm512_slli_epi32(s1[k], 16))
                        : _mm512_and_si512(s0[k], _mm512_set1_epi32(0xFFFF));
        t32[k] = _mm512_add_epi32(t32[k], _mm512_madd_epi16(pr, mp[k]));
    }
}

/* tot[2 k + h] (int64) += t32[k]'s lanes 8 h .. 8 h + 7; t32 := 0 */
V512 INLINE void flush32(__m512i tot[8], __m512i t32[4])
{
    for (int k = 0; k < 4; k++) {
        tot[2 * k] = _mm512_add_epi64(tot[2 * k], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(t32[k])));
        tot[2 * k + 1] = _mm512_add_epi64(tot[2 * k + 1],
                                          _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(t32[k], 1)));
        t32[k] = _mm512_setzero_si512();
    }
}

#define TMAX 64  /* tokens per call (simd.TOKEN_TILE) */

V512 INLINE void mv16(const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
                      int T, int cols, int rb0, int rb1, int64_t *out, int ldo, int flush)
{
    const int ng = cols / 32;
    uint16_t pi[2][32];
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 16; i++) {
            pi[j][2 * i] = (uint16_t)(16 * j + i);
            pi[j][2 * i + 1] = (uint16_t)(32 + 16 * j + i);
        }
    __m512i vix[2], pix[2], mp[4];
    quad_index(vix);
    for (int h = 0; h < 2; h++)
        pix[h] = _mm512_loadu_si512(pi[h]);
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *blk = planes + (size_t)rb * cols * 32;
        const uint16_t *mb = m + (size_t)rb * ng * L;
        int64_t *o = out + (size_t)(rb - rb0) * L;
        __m512i U[8][4], S[2][TMAX][4], t32[TMAX][4], tot[TMAX][8];
        for (int t = 0; t < T; t++) {
            for (int j = 0; j < 8; j++)
                tot[t][j] = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++)
                t32[t][k] = _mm512_setzero_si512();
        }
        for (int g = 0, np = 0; g < ng; g += 2) {
            const int two = g + 1 < ng;
            for (int h = 0; h < 1 + two; h++) {
                const int c0 = 32 * (g + h);
                for (int q = 0; q < 8; q++)
                    quads512(blk, c0 + 4 * q, 1, vix, U[q]);
                tile_all((const __m512i (*)[4])U, 8, a + c0, cols, T, 1, S[h]);
            }
            pair_m(mp, mb + (size_t)g * L, two ? mb + (size_t)(g + 1) * L : NULL, pix);
            const int fl = ++np == flush || g + 2 >= ng;
            for (int t = 0; t < T; t++) {
                __m512i s0[4], s1[4];
                sums16(s0, S[0][t], asum[(size_t)t * ng + g]);
                if (two)
                    sums16(s1, S[1][t], asum[(size_t)t * ng + g + 1]);
                apply_pair(t32[t], mp, s0, two ? s1 : NULL);
                if (fl)
                    flush32(tot[t], t32[t]);
            }
            if (fl)
                np = 0;
        }
        for (int t = 0; t < T; t++)
            for (int j = 0; j < 8; j++)
                _mm512_storeu_si512(o + (size_t)t * ldo + 8 * j, tot[t][j]);
    }
}

/* the 4-bit / 8-bit layout; asum: (T, ng) int32 group sums of a; else as bk_mm8. group % 8 == 0
   (kernels.pack makes it a multiple of 32). flush: groups per int32 total (mvz; 0: int64 each
   group); pairs: 4-bit prompts (1 < T <= TMAX) with groups of 32 take the int16-pair path
   (mv16) with that many pairs of groups per int32 total (0: not). A decode step stays on mvz:
   it is bound by memory either way, and mvz's register use leaves it more compute headroom. */
V512 void bk_mv4z(const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
                  int T, int cols, int group, int rb0, int rb1, int64_t *out, int ldo, int flush,
                  int pairs)
{
    if (group == 32 && pairs > 0 && T > 1 && T <= TMAX)
        mv16(planes, m, a, asum, T, cols, rb0, rb1, out, ldo, pairs);
    else
        mvz(planes, m, a, asum, T, cols, group, rb0, rb1, out, ldo, 1, flush);
}

/* the 8-bit layout; flush > 0: int32 totals over that many groups (see widen_m32), 0: int64;
   pairs: unused (the 4-bit layout's) */
V512 void bk_mv8z(const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
                  int T, int cols, int group, int rb0, int rb1, int64_t *out, int ldo, int flush,
                  int pairs)
{
    (void)pairs;
    mvz(planes, m, a, asum, T, cols, group, rb0, rb1, out, ldo, 0, flush);
}

/* ---- threads: dynamic chunks of row blocks

   Every thread of a call runs bk_dyn with the same counter `next`: each takes the next `chunk`
   row blocks of [rb0, rb1) until none are left, so a thread the OS has descheduled holds up at
   most one chunk (equal static shares made the other thread wait for the whole of its share: a
   2-thread run on a machine with one core free took 4x as long as a 1-thread one).
   which: 0 bk_mm4, 1 bk_mm8, 2 bk_mv4z, 3 bk_mv8z (the caller checks the CPU has it). */
void bk_dyn(int which, const uint8_t *planes, const uint16_t *m, const int8_t *a, const int32_t *asum,
            int T, int cols, int group, int rb0, int rb1, int64_t *out, int ldo, int flush,
            int pairs, int *next, int chunk)
{
    const int n = rb1 - rb0;
    for (;;) {
        const int b = __atomic_fetch_add(next, chunk, __ATOMIC_RELAXED);
        if (b >= n)
            return;
        const int e = b + chunk < n ? b + chunk : n;
        int64_t *o = out + (size_t)b * L;
        switch (which) {
        case 0:
            bk_mm4(planes, m, a, asum, T, cols, group, rb0 + b, rb0 + e, o, ldo);
            break;
        case 1:
            bk_mm8((const int8_t *)planes, m, a, T, cols, group, rb0 + b, rb0 + e, o, ldo);
            break;
        case 2:
            bk_mv4z(planes, m, a, asum, T, cols, group, rb0 + b, rb0 + e, o, ldo, flush, pairs);
            break;
        default:
            bk_mv8z(planes, m, a, asum, T, cols, group, rb0 + b, rb0 + e, o, ldo, flush, pairs);
        }
    }
}
