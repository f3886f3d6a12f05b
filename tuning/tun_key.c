/* Tuning keys (see tun.h): devices, model shapes, batch-shape buckets, and names.
 * Thread: any; tun_device_cpu reads /proc/cpuinfo. */
#include <stdio.h>
#include <string.h>

#include "tuning/tun.h"

static uint8_t ceil_log2(uint64_t x) {
    uint8_t r = 0;
    while (r < 63 && ((uint64_t)1 << r) < x)
        r++;
    return r;
}

tun_bucket_t tun_bucket_of(uint64_t tokens, uint64_t seqs, uint64_t max_q, uint64_t max_ctx) {
    return (tun_bucket_t){ceil_log2(tokens), ceil_log2(seqs), ceil_log2(max_q), ceil_log2(max_ctx)};
}

bool tun_bucket_equal(const tun_bucket_t *a, const tun_bucket_t *b) {
    return a->tokens == b->tokens && a->seqs == b->seqs && a->max_q == b->max_q &&
           a->max_ctx == b->max_ctx;
}

int tun_bucket_format(const tun_bucket_t *b, char *buf, size_t n) {
    return snprintf(buf, n, "tokens<=%llu seqs<=%llu q<=%llu ctx<=%llu",
                    1ull << b->tokens, 1ull << b->seqs, 1ull << b->max_q, 1ull << b->max_ctx);
}

void tun_device_cpu(const char *isa, uint32_t threads, tun_device_t *d) {
    memset(d, 0, sizeof *d);
    snprintf(d->backend, sizeof d->backend, "cpu");
    snprintf(d->name, sizeof d->name, "unknown cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "model name", 10) != 0)
            continue;
        const char *v = strchr(line, ':');
        if (v == NULL)
            continue;
        v++;
        while (*v == ' ' || *v == '\t')
            v++;
        size_t len = strcspn(v, "\n");
        snprintf(d->name, sizeof d->name, "%.*s", (int)len, v);
        break;
    }
    if (f != NULL)
        fclose(f);
    snprintf(d->arch, sizeof d->arch, "%s", isa);
#if defined(__clang__)
    snprintf(d->compiler, sizeof d->compiler, "clang %d.%d", __clang_major__, __clang_minor__);
#elif defined(__GNUC__)
    snprintf(d->compiler, sizeof d->compiler, "gcc %d.%d", __GNUC__, __GNUC_MINOR__);
#else
    snprintf(d->compiler, sizeof d->compiler, "cc");
#endif
    d->threads = threads;
}

int tun_device_key(const tun_device_t *d, char *buf, size_t n) {
    return snprintf(buf, n, "%s|%s|%s|%s|%s|%u|%u", d->backend, d->name, d->arch, d->driver,
                    d->compiler, d->threads, d->smem_bytes);
}

const char *tun_dtype_name(uint32_t dtype) {
    switch (dtype) {
    case 1: return "f32";
    case 2: return "f16";
    case 3: return "bf16";
    default: return "?";
    }
}

int tun_shape_key(const tun_shape_t *s, char *buf, size_t n) {
    return snprintf(buf, n, "d%u hq%u hkv%u g%u %s b%u f%u", s->head_dim, s->num_query_heads,
                    s->num_kv_heads, s->group, tun_dtype_name(s->dtype), s->block_size,
                    s->features);
}

static const char *const mode_names[] = {"off", "frozen", "on"};
static const char *const source_names[] = {"none", "heuristic", "stored", "tuned"};

const char *tun_mode_name(tun_mode_t m) {
    return (unsigned)m < 3 ? mode_names[m] : "?";
}

int tun_mode_parse(const char *s) {
    for (int i = 0; i < 3; i++)
        if (strcmp(s, mode_names[i]) == 0)
            return i;
    return -1;
}

const char *tun_source_name(tun_source_t s) {
    return (unsigned)s < 4 ? source_names[s] : "?";
}
