/* The attention coverage matrix: dtype {f32, f16, bf16} x GQA group {1, 4, 8, MQA} x head_dim
 * {64, 128, 256, 80} x block size {16, 64}, 96 cases. Each case runs a mixed batch (a prefill
 * chunk, a decode token and a chunk over earlier context in one call, then a decode step and
 * sometimes a rollback) on 1 or 2 layers, with features (windows, soft cap, ALiBi, sinks,
 * explicit scale) switched on at random from the case's seed, on the default CPU kernels and
 * on the portable ones (and with small query tiles), against the oracle.
 *
 * Sequences stay short (tens to ~200 tokens) so the whole matrix takes a few minutes under
 * AddressSanitizer on 2 cores. Each case prints its model and features; a failure also names
 * its seed. Label: slow. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "tests/attention/att_rig.h"

static uint64_t g_seed;

typedef struct mcase {
    att_dtype_t dtype;
    uint32_t hq;
    uint32_t hkv;
    uint32_t d;
    uint32_t block;
    uint32_t index;
    char name[64];
} mcase_t;

static const att_cpu_cfg_t BACKENDS[] = {
    {.num_threads = 2},
    {.num_threads = 2, .tile_rows = 8, .isa = ATT_CPU_ISA_X86V3},
    {.num_threads = 1, .tile_rows = 16, .isa = ATT_CPU_ISA_PORTABLE},
};

static void run_case(void **state) {
    const mcase_t *mc = *state;
    const uint64_t seed = tu_sub_seed(g_seed, 10000u + mc->index);
    tu_rng_t r;
    tu_rng_seed(&r, seed);
    att_rig_spec_t spec;
    att_rig_spec_draw(&spec, mc->dtype, mc->hq, mc->hkv, mc->d, mc->block, &r);
    char desc[256];
    tu_where_set("%s: ATTND_TEST_SEED=%" PRIu64 " case %u (seed %" PRIu64 "), %s", mc->name,
                 g_seed, mc->index, seed, att_rig_spec_str(&spec, desc, sizeof desc));
    print_message("case %u: %s\n", mc->index, desc);
    att_rig_t rig;
    att_rig_init(&rig, &spec.cfg, 4096, BACKENDS, (uint32_t)(sizeof BACKENDS / sizeof BACKENDS[0]),
                 tu_rng_next(&r));

    /* The widest heads cost the oracle most: shorter prompts there. */
    const uint32_t max_prompt = mc->d >= 256 || mc->hq >= 16 ? 100 : 200;
    const uint64_t A = 1 + tu_rng_below(&r, 1000), B = A + 1, C = A + 2;
    const uint32_t pa = tu_rng_range(&r, 40, max_prompt), pb = tu_rng_range(&r, 8, 40);
    const att_chunk_t s1[] = {{A, 0, pa}, {B, 0, pb}};
    att_rig_attend_layers(&rig, s1, 2);
    /* One call: a decode token, a new prompt, a chunk over earlier context. */
    const uint32_t pc = tu_rng_range(&r, 10, 60), cb = tu_rng_range(&r, 10, 50);
    const att_chunk_t s2[] = {{A, pa, 1}, {C, 0, pc}, {B, pb, cb}};
    att_rig_attend_layers(&rig, s2, 3);
    const att_chunk_t s3[] = {{C, pc, 1}, {B, pb + cb, 1}, {A, pa + 1, 1}};
    att_rig_attend_layers(&rig, s3, 3);
    if (tu_rng_chance(&r, 1, 2)) { /* a retry that rolls B back a few tokens */
        const uint32_t back = tu_rng_range(&r, 1, 5);
        const att_chunk_t s4[] = {{B, pb + cb + 1 - back, back + 1}, {A, pa + 2, 1}};
        att_rig_attend_layers(&rig, s4, 2);
    }
    att_rig_fini(&rig);
}

int main(void) {
    g_seed = tu_base_seed("test_att_matrix");
    static const att_dtype_t dtypes[] = {ATT_DTYPE_F32, ATT_DTYPE_F16, ATT_DTYPE_BF16};
    static const struct {
        const char *name;
        uint32_t hq, hkv;
    } groups[] = {{"g1", 4, 4}, {"g4", 8, 2}, {"g8", 16, 2}, {"mqa", 6, 1}};
    static const uint32_t dims[] = {64, 128, 256, 80};
    static const uint32_t blocks[] = {16, 64};
    enum { N = 3 * 4 * 4 * 2 };
    static mcase_t cases[N];
    static struct CMUnitTest tests[N];
    uint32_t n = 0;
    for (size_t a = 0; a < 3; a++)
        for (size_t g = 0; g < 4; g++)
            for (size_t d = 0; d < 4; d++)
                for (size_t b = 0; b < 2; b++, n++) {
                    mcase_t *c = &cases[n];
                    c->dtype = dtypes[a];
                    c->hq = groups[g].hq;
                    c->hkv = groups[g].hkv;
                    c->d = dims[d];
                    c->block = blocks[b];
                    c->index = n;
                    snprintf(c->name, sizeof c->name, "test_att_matrix_%s_%s_d%u_b%u",
                             att_dtype_name(c->dtype), groups[g].name, c->d, c->block);
                    tests[n] = (struct CMUnitTest){c->name, run_case, NULL, NULL, c};
                }
    return _cmocka_run_group_tests("att_matrix", tests, n, NULL, NULL);
}
