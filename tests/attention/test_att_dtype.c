/* Tests of attention/att_dtype.h: exact f16/bf16 -> f32, and f32 -> f16/bf16 rounding to nearest
 * even, checked exhaustively where it is cheap and against an independent reference (double
 * arithmetic and a search for the two neighbouring representable values) elsewhere. */
#include "tests/test_util.h"

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attention/att_dtype.h"
#include "tests/attention/att_ref_dtype.h"

static uint64_t g_seed;

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A 16-bit format for the reference encoder: non-negative finite patterns 0..inf-1 increase in
 * value; inf is the Inf pattern, which the encoder treats as the next value up (2^16 for f16,
 * 2^128 for bf16) so that round-to-nearest-even overflows to Inf exactly where IEEE 754 says:
 * at or beyond max + half an ulp (the Inf pattern is even, the max pattern odd). */
typedef struct fmt16 {
    const char *name;
    uint16_t inf;
    double above_max;
    double (*decode)(uint16_t);
    uint16_t (*encode)(float); /* the function under test */
    uint16_t quiet;            /* the quiet-NaN bit */
    int shift;                 /* f32 mantissa bits dropped */
} fmt16_t;

static uint16_t f16_encode(float f) { return att_f32_to_f16(f); }
static uint16_t bf16_encode(float f) { return att_f32_to_bf16(f); }

static const fmt16_t F16 = {"f16", 0x7c00u, 65536.0, ref_f16_decode, f16_encode, 0x0200u, 13};
static const fmt16_t BF16 = {"bf16", 0x7f80u, 0x1p128, ref_bf16_decode, bf16_encode, 0x0040u, 16};

static double ref_value(const fmt16_t *f, uint32_t p) {
    return p == f->inf ? f->above_max : f->decode((uint16_t)p);
}

/* Round-to-nearest-even of a non-NaN float, by search: lo is the largest pattern whose value is
 * <= |x|, hi the next; compare |x| with their midpoint (exact in double: one bit more than the
 * format has); a tie goes to the even pattern. */
static uint16_t ref_encode(const fmt16_t *f, float x) {
    uint16_t sign = signbit(x) ? 0x8000u : 0u;
    double a = fabs((double)x);
    if (a >= f->above_max)
        return (uint16_t)(sign | f->inf);
    uint32_t lo = 0, hi = f->inf;
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (ref_value(f, mid) <= a)
            lo = mid;
        else
            hi = mid;
    }
    double vlo = ref_value(f, lo);
    if (vlo == a)
        return (uint16_t)(sign | lo);
    double mid = (vlo + ref_value(f, hi)) / 2.0;
    uint32_t r = a < mid ? lo : a > mid ? hi : ((lo & 1u) ? hi : lo);
    return (uint16_t)(sign | r);
}

/* The header's NaN contract: quiet, sign kept, the top mantissa bits kept. */
static uint16_t expected_nan(const fmt16_t *f, uint32_t u) {
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint16_t payload = (uint16_t)(((u & 0x7fffffu) >> f->shift));
    return (uint16_t)(sign | f->inf | f->quiet | payload);
}

static int is_nan16(const fmt16_t *f, uint16_t h) {
    return (h & f->inf) == f->inf && (h & (uint16_t)~(f->inf | 0x8000u)) != 0;
}

static void check_encode(const fmt16_t *f, float x, const char *why) {
    uint32_t u = fbits(x);
    uint16_t got = f->encode(x);
    if (isnan(x)) {
        uint16_t want = expected_nan(f, u);
        if (!is_nan16(f, got) || (got & 0x8000u) != (want & 0x8000u) || got != want)
            fail_msg("%s: f32 NaN 0x%08" PRIx32 " -> 0x%04x, want NaN 0x%04x (%s; seed %" PRIu64
                     ")",
                     f->name, u, got, want, why, g_seed);
        return;
    }
    uint16_t want = ref_encode(f, x);
    if (got != want)
        fail_msg("%s: f32 0x%08" PRIx32 " (%.10g) -> 0x%04x, want 0x%04x (%s; seed %" PRIu64 ")",
                 f->name, u, (double)x, got, want, why, g_seed);
}

/* ---- exact decode and round trip over every 16-bit pattern ---- */

static void test_att_dtype_f16_every_pattern_decodes_exactly(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        float f = att_f16_to_f32((uint16_t)h);
        double ref = ref_f16_decode((uint16_t)h);
        if (isnan(ref)) {
            if (!isnan(f) || !signbit(f) != !(h & 0x8000u))
                fail_msg("f16 0x%04x: got %g, want a NaN of the same sign", h, (double)f);
            /* The payload survives into the f32 mantissa's top bits. */
            assert_int_equal((fbits(f) >> 13) & 0x3ffu, h & 0x3ffu);
        } else if ((double)f != ref || !signbit(f) != !signbit(ref)) {
            fail_msg("f16 0x%04x: got %.10g, want %.10g", h, (double)f, ref);
        }
    }
}

static void test_att_dtype_f16_every_pattern_round_trips(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        uint16_t back = att_f32_to_f16(att_f16_to_f32((uint16_t)h));
        uint16_t want = is_nan16(&F16, (uint16_t)h) ? (uint16_t)(h | F16.quiet) : (uint16_t)h;
        if (back != want)
            fail_msg("f16 0x%04x -> f32 -> 0x%04x, want 0x%04x", h, back, want);
    }
}

static void test_att_dtype_bf16_every_pattern_decodes_exactly(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        float f = att_bf16_to_f32((uint16_t)h);
        /* bf16 is the top half of an f32: the bits are the pattern followed by 16 zeros. */
        assert_int_equal(fbits(f), h << 16);
        double ref = ref_bf16_decode((uint16_t)h);
        if (isnan(ref))
            assert_true(isnan(f));
        else if ((double)f != ref)
            fail_msg("bf16 0x%04x: got %.10g, want %.10g", h, (double)f, ref);
    }
}

static void test_att_dtype_bf16_every_pattern_round_trips(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        uint16_t back = att_f32_to_bf16(att_bf16_to_f32((uint16_t)h));
        uint16_t want = is_nan16(&BF16, (uint16_t)h) ? (uint16_t)(h | BF16.quiet) : (uint16_t)h;
        if (back != want)
            fail_msg("bf16 0x%04x -> f32 -> 0x%04x, want 0x%04x", h, back, want);
    }
}

/* ---- f32 -> 16 bits: rounding ---- */

static void test_att_dtype_f16_rounds_named_edges(void **state) {
    (void)state;
    struct {
        float x;
        uint16_t want;
    } cases[] = {
        {0.0f, 0x0000u},
        {-0.0f, 0x8000u},
        {1.0f, 0x3c00u},
        {-2.0f, 0xc000u},
        {1.0f + 0x1p-11f, 0x3c00u},        /* tie between 0x3c00 and 0x3c01: even */
        {1.0f + 3 * 0x1p-11f, 0x3c02u},    /* tie between 0x3c01 and 0x3c02: even */
        {65504.0f, 0x7bffu},               /* largest finite */
        {65519.0f, 0x7bffu},
        {nextafterf(65520.0f, 0.0f), 0x7bffu},
        {65520.0f, 0x7c00u},               /* max + half ulp: ties to even, i.e. Inf */
        {-65520.0f, 0xfc00u},
        {65536.0f, 0x7c00u},
        {FLT_MAX, 0x7c00u},
        {INFINITY, 0x7c00u},
        {-INFINITY, 0xfc00u},
        {0x1p-14f, 0x0400u},               /* smallest normal */
        {0x1p-14f - 0x1p-25f, 0x0400u},    /* tie between 0x03ff and 0x0400: even */
        {0x1p-14f - 0x1p-24f, 0x03ffu},    /* largest subnormal */
        {0x1p-24f, 0x0001u},               /* smallest subnormal */
        {0x1p-25f, 0x0000u},               /* tie between 0 and 0x0001: even */
        {nextafterf(0x1p-25f, 1.0f), 0x0001u},
        {nextafterf(0x1p-25f, 0.0f), 0x0000u},
        {3 * 0x1p-25f, 0x0002u},           /* tie between 0x0001 and 0x0002: even */
        {5 * 0x1p-25f, 0x0002u},           /* tie between 0x0002 and 0x0003: even */
        {-0x1p-25f, 0x8000u},              /* rounds to zero, sign kept */
        {-1e-10f, 0x8000u},
        {0x1p-149f, 0x0000u},              /* smallest f32 subnormal */
        {0x1p-126f, 0x0000u},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = att_f32_to_f16(cases[i].x);
        if (got != cases[i].want)
            fail_msg("f16 edge %zu: %.10g -> 0x%04x, want 0x%04x", i, (double)cases[i].x, got,
                     cases[i].want);
        check_encode(&F16, cases[i].x, "named edge"); /* the reference agrees too */
    }
}

static void test_att_dtype_bf16_rounds_named_edges(void **state) {
    (void)state;
    struct {
        uint32_t x;
        uint16_t want;
    } cases[] = {
        {0x00000000u, 0x0000u},
        {0x80000000u, 0x8000u},
        {0x3f800000u, 0x3f80u},                 /* 1 */
        {0x3f808000u, 0x3f80u},                 /* 1 + 2^-8: tie, even */
        {0x3f818000u, 0x3f82u},                 /* tie between 0x3f81 and 0x3f82: even */
        {0x3f808001u, 0x3f81u},                 /* just above the tie */
        {0x3f817fffu, 0x3f81u},                 /* just below the tie */
        {0x7f7f0000u, 0x7f7fu},                 /* largest finite bf16 */
        {0x7f7f7fffu, 0x7f7fu},
        {0x7f7f8000u, 0x7f80u},                 /* max + half ulp: Inf */
        {0x7f7fffffu, 0x7f80u},                 /* FLT_MAX */
        {0xff7f8000u, 0xff80u},
        {0x7f800000u, 0x7f80u},                 /* Inf */
        {0xff800000u, 0xff80u},
        {0x00000001u, 0x0000u},                 /* f32 subnormals round into bf16 subnormals */
        {0x00008000u, 0x0000u},                 /* tie between 0 and 0x0001: even */
        {0x00008001u, 0x0001u},
        {0x00018000u, 0x0002u},                 /* tie between 0x0001 and 0x0002: even */
        {0x007f8000u, 0x0080u},                 /* largest subnormal tie rounds to min normal */
        {0x80008000u, 0x8000u},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = att_f32_to_bf16(bitsf(cases[i].x));
        if (got != cases[i].want)
            fail_msg("bf16 edge %zu: 0x%08" PRIx32 " -> 0x%04x, want 0x%04x", i, cases[i].x, got,
                     cases[i].want);
        check_encode(&BF16, bitsf(cases[i].x), "named edge");
    }
}

/* Every decision boundary of the format: each representable value, the midpoint to the next and
 * the f32 neighbours of both, with both signs. */
static void sweep_boundaries(const fmt16_t *f) {
    for (uint32_t p = 0; p < f->inf; p++) {
        double lo = ref_value(f, p), hi = ref_value(f, p + 1);
        float mid = (float)((lo + hi) / 2.0); /* exact: one bit more than the format */
        assert_true((double)mid == (lo + hi) / 2.0);
        float xs[] = {(float)lo, nextafterf((float)lo, INFINITY), nextafterf(mid, 0.0f), mid,
                      nextafterf(mid, INFINITY)};
        for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++) {
            check_encode(f, xs[i], "boundary sweep");
            check_encode(f, -xs[i], "boundary sweep");
        }
    }
}

static void test_att_dtype_f16_rounds_every_boundary(void **state) {
    (void)state;
    sweep_boundaries(&F16);
}

static void test_att_dtype_bf16_rounds_every_boundary(void **state) {
    (void)state;
    sweep_boundaries(&BF16);
}

/* Random f32s: all bit patterns, and patterns concentrated on the exponents where the format
 * is normal, subnormal or about to overflow. */
static void random_rounding(const fmt16_t *f, int lo_exp, int hi_exp, uint64_t salt) {
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, salt));
    for (int i = 0; i < 400000; i++) {
        uint32_t u = (uint32_t)tu_rng_next(&r);
        check_encode(f, bitsf(u), "random f32 bits");
        uint32_t e = (uint32_t)(127 + lo_exp) + tu_rng_below(&r, (uint32_t)(hi_exp - lo_exp + 1));
        uint32_t v = (u & 0x807fffffu) | (e << 23);
        /* Half of them with the dropped bits forced to an exact tie. */
        if (i & 1) {
            uint32_t dropped = (1u << f->shift) - 1u;
            uint32_t half = 1u << (f->shift - 1);
            v = (v & ~dropped) | half;
        }
        check_encode(f, bitsf(v), i & 1 ? "random tie" : "random in range");
    }
}

static void test_att_dtype_f16_rounds_random_inputs_to_nearest_even(void **state) {
    (void)state;
    random_rounding(&F16, -27, 16, 1);
}

static void test_att_dtype_bf16_rounds_random_inputs_to_nearest_even(void **state) {
    (void)state;
    random_rounding(&BF16, -126, 127, 2);
}

static void test_att_dtype_nan_stays_nan_with_sign_and_payload(void **state) {
    (void)state;
    const uint32_t nans[] = {0x7f800001u, 0x7f802000u, 0x7fc00000u, 0x7fffffffu, 0xff800001u,
                             0xffc00000u, 0xffffffffu, 0x7fa00000u, 0x7f800100u, 0xff812345u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        check_encode(&F16, bitsf(nans[i]), "NaN");
        check_encode(&BF16, bitsf(nans[i]), "NaN");
    }
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 3));
    for (int i = 0; i < 100000; i++) {
        uint32_t m = (uint32_t)tu_rng_next(&r) & 0x7fffffu;
        uint32_t u = ((uint32_t)tu_rng_next(&r) & 0x80000000u) | 0x7f800000u | (m ? m : 1u);
        check_encode(&F16, bitsf(u), "random NaN");
        check_encode(&BF16, bitsf(u), "random NaN");
    }
}

/* ---- helpers around the conversions ---- */

static void test_att_dtype_bytes_and_names(void **state) {
    (void)state;
    assert_int_equal(att_dtype_bytes(ATT_DTYPE_F32), 4);
    assert_int_equal(att_dtype_bytes(ATT_DTYPE_F16), 2);
    assert_int_equal(att_dtype_bytes(ATT_DTYPE_BF16), 2);
    assert_int_equal(att_dtype_bytes(ATT_DTYPE_UNSPECIFIED), 0);
    assert_int_equal(att_dtype_bytes((att_dtype_t)99), 0);
    assert_string_equal(att_dtype_name(ATT_DTYPE_F32), "f32");
    assert_string_equal(att_dtype_name(ATT_DTYPE_F16), "f16");
    assert_string_equal(att_dtype_name(ATT_DTYPE_BF16), "bf16");
    assert_string_equal(att_dtype_name(ATT_DTYPE_UNSPECIFIED), "unspecified");
    assert_non_null(att_dtype_name((att_dtype_t)99));
}

static void test_att_dtype_load_and_store_use_the_conversions(void **state) {
    (void)state;
    tu_rng_t r;
    tu_rng_seed(&r, tu_sub_seed(g_seed, 4));
    float f32buf[64];
    uint16_t h16buf[64];
    for (size_t i = 0; i < 64; i++) {
        float x = bitsf((uint32_t)tu_rng_next(&r));
        if (isnan(x))
            x = 1.5f;
        att_store(ATT_DTYPE_F32, f32buf, i, x);
        assert_int_equal(fbits(att_load(ATT_DTYPE_F32, f32buf, i)), fbits(x));
        att_store(ATT_DTYPE_F16, h16buf, i, x);
        assert_int_equal(h16buf[i], att_f32_to_f16(x));
        assert_int_equal(fbits(att_load(ATT_DTYPE_F16, h16buf, i)),
                         fbits(att_f16_to_f32(h16buf[i])));
        att_store(ATT_DTYPE_BF16, h16buf, i, x);
        assert_int_equal(h16buf[i], att_f32_to_bf16(x));
        assert_int_equal(fbits(att_load(ATT_DTYPE_BF16, h16buf, i)),
                         fbits(att_bf16_to_f32(h16buf[i])));
    }
    /* Neighbours are untouched. */
    uint16_t guard[3] = {0x1111u, 0x2222u, 0x3333u};
    att_store(ATT_DTYPE_F16, guard, 1, 1.0f);
    assert_int_equal(guard[0], 0x1111u);
    assert_int_equal(guard[1], 0x3c00u);
    assert_int_equal(guard[2], 0x3333u);
}

int main(void) {
    g_seed = tu_base_seed("test_att_dtype");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_att_dtype_f16_every_pattern_decodes_exactly),
        cmocka_unit_test(test_att_dtype_f16_every_pattern_round_trips),
        cmocka_unit_test(test_att_dtype_bf16_every_pattern_decodes_exactly),
        cmocka_unit_test(test_att_dtype_bf16_every_pattern_round_trips),
        cmocka_unit_test(test_att_dtype_f16_rounds_named_edges),
        cmocka_unit_test(test_att_dtype_bf16_rounds_named_edges),
        cmocka_unit_test(test_att_dtype_f16_rounds_every_boundary),
        cmocka_unit_test(test_att_dtype_bf16_rounds_every_boundary),
        cmocka_unit_test(test_att_dtype_f16_rounds_random_inputs_to_nearest_even),
        cmocka_unit_test(test_att_dtype_bf16_rounds_random_inputs_to_nearest_even),
        cmocka_unit_test(test_att_dtype_nan_stays_nan_with_sign_and_payload),
        cmocka_unit_test(test_att_dtype_bytes_and_names),
        cmocka_unit_test(test_att_dtype_load_and_store_use_the_conversions),
    };
    return cmocka_run_group_tests_name("att_dtype", tests, NULL, NULL);
}
