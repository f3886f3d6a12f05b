/* Model presets from JSON files (see ab_preset.h).
 *
 * Thread model: no shared state; each call works on its own ab_model_t. */
#include "bench/ab_preset.h"

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The uint32 fields of ModelConfig that a preset may set. */
typedef struct u32_key {
    const char *key;
    size_t off;
    bool required;
} u32_key_t;

#define M_(f) offsetof(Attnd__V1__ModelConfig, f)
static const u32_key_t u32_keys[] = {
    {"num_layers", M_(num_layers), true},
    {"num_query_heads", M_(num_query_heads), true},
    {"num_kv_heads", M_(num_kv_heads), true},
    {"head_dim", M_(head_dim), true},
    {"block_size", M_(block_size), false},
    {"sliding_window", M_(sliding_window), false},
};
#undef M_

static int fail(const char *path, const char *what, const char *key) {
    fprintf(stderr, "attnd-bench: preset %s: %s%s%s\n", path, what, key ? ": " : "",
            key ? key : "");
    return -1;
}

static const u32_key_t *find_u32(const char *key) {
    for (size_t i = 0; i < sizeof u32_keys / sizeof u32_keys[0]; i++)
        if (strcmp(u32_keys[i].key, key) == 0)
            return &u32_keys[i];
    return NULL;
}

static bool get_u32(json_t *v, uint32_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) > (json_int_t)0x7fffffff)
        return false;
    *out = (uint32_t)json_integer_value(v);
    return true;
}

static bool get_float(json_t *v, float *out) {
    if (!json_is_number(v) || !isfinite(json_number_value(v)))
        return false;
    *out = (float)json_number_value(v);
    return true;
}

/* An array of numbers into a new float array (NULL when empty); -1 on a wrong element. */
static int get_floats(const char *path, const char *key, json_t *v, float **out, size_t *n) {
    if (!json_is_array(v))
        return fail(path, "expected an array of numbers", key);
    *n = json_array_size(v);
    if (*n == 0)
        return 0;
    *out = calloc(*n, sizeof **out);
    if (*out == NULL)
        return fail(path, "out of memory", key);
    for (size_t i = 0; i < *n; i++)
        if (!get_float(json_array_get(v, i), &(*out)[i]))
            return fail(path, "expected finite numbers", key);
    return 0;
}

static int set_key(ab_model_t *m, const char *key, json_t *v) {
    Attnd__V1__ModelConfig *c = &m->cfg;
    const u32_key_t *u = find_u32(key);
    if (u != NULL) {
        if (!get_u32(v, (uint32_t *)(void *)((char *)c + u->off)))
            return fail(m->path, "expected a whole number from 0 to 2^31-1", key);
        return 0;
    }
    if (strcmp(key, "name") == 0) {
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) >= sizeof m->name)
            return fail(m->path, "expected a string of 1-63 bytes", key);
        snprintf(m->name, sizeof m->name, "%s", json_string_value(v));
        return 0;
    }
    if (strcmp(key, "description") == 0)
        return json_is_string(v) ? 0 : fail(m->path, "expected a string", key);
    if (strcmp(key, "dtype") == 0) {
        const char *s = json_is_string(v) ? json_string_value(v) : "";
        c->dtype = strcmp(s, "f32") == 0    ? ATTND__V1__DTYPE__F32
                   : strcmp(s, "f16") == 0  ? ATTND__V1__DTYPE__F16
                   : strcmp(s, "bf16") == 0 ? ATTND__V1__DTYPE__BF16
                                            : ATTND__V1__DTYPE__DTYPE_UNSPECIFIED;
        if (c->dtype == ATTND__V1__DTYPE__DTYPE_UNSPECIFIED)
            return fail(m->path, "expected \"f32\", \"f16\" or \"bf16\"", key);
        return 0;
    }
    if (strcmp(key, "scale") == 0 || strcmp(key, "logits_soft_cap") == 0) {
        float *dst = strcmp(key, "scale") == 0 ? &c->scale : &c->logits_soft_cap;
        return get_float(v, dst) ? 0 : fail(m->path, "expected a finite number", key);
    }
    if (strcmp(key, "layer_sliding_window") == 0) {
        if (!json_is_array(v))
            return fail(m->path, "expected an array of whole numbers", key);
        size_t n = json_array_size(v);
        if (n == 0)
            return 0;
        m->layer_window = calloc(n, sizeof *m->layer_window);
        if (m->layer_window == NULL)
            return fail(m->path, "out of memory", key);
        for (size_t i = 0; i < n; i++)
            if (!get_u32(json_array_get(v, i), &m->layer_window[i]))
                return fail(m->path, "expected whole numbers from 0 to 2^31-1", key);
        c->n_layer_sliding_window = n;
        c->layer_sliding_window = m->layer_window;
        return 0;
    }
    if (strcmp(key, "alibi_slopes") == 0) {
        int rc = get_floats(m->path, key, v, &m->alibi, &c->n_alibi_slopes);
        c->alibi_slopes = m->alibi;
        return rc;
    }
    if (strcmp(key, "sinks") == 0) {
        int rc = get_floats(m->path, key, v, &m->sinks, &c->n_sinks);
        c->sinks = m->sinks;
        return rc;
    }
    return fail(m->path, "unknown key", key);
}

static int load_file(ab_model_t *m) {
    json_error_t err;
    json_t *root = json_load_file(m->path, JSON_REJECT_DUPLICATES, &err);
    if (root == NULL) {
        if (err.line < 1) /* not JSON's fault: the file could not be read */
            fprintf(stderr, "attnd-bench: preset %s: %s\n", m->path, err.text);
        else
            fprintf(stderr, "attnd-bench: preset %s: line %d: %s\n", m->path, err.line,
                    err.text);
        return -1;
    }
    int rc = json_is_object(root) ? 0 : fail(m->path, "expected a JSON object", NULL);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (rc != 0)
            break;
        rc = set_key(m, key, v);
    }
    json_decref(root);
    if (rc != 0)
        return rc;
    if (m->name[0] == '\0')
        return fail(m->path, "missing key", "name");
    if (m->cfg.dtype == ATTND__V1__DTYPE__DTYPE_UNSPECIFIED)
        return fail(m->path, "missing key", "dtype");
    for (size_t i = 0; i < sizeof u32_keys / sizeof u32_keys[0]; i++)
        if (u32_keys[i].required &&
            *(const uint32_t *)(const void *)((const char *)&m->cfg + u32_keys[i].off) == 0)
            return fail(m->path, "missing or 0", u32_keys[i].key);
    return 0;
}

int ab_model_load(const char *spec, const char *dir, ab_model_t *m) {
    memset(m, 0, sizeof *m);
    attnd__v1__model_config__init(&m->cfg);
    size_t n = strlen(spec);
    bool is_path = strchr(spec, '/') != NULL || (n > 5 && strcmp(spec + n - 5, ".json") == 0);
    int w = is_path ? snprintf(m->path, sizeof m->path, "%s", spec)
                    : snprintf(m->path, sizeof m->path, "%s/%s.json", dir, spec);
    if (w < 0 || (size_t)w >= sizeof m->path) {
        fprintf(stderr, "attnd-bench: preset path too long: %s\n", spec);
        return -1;
    }
    if (load_file(m) != 0) {
        if (!is_path)
            fprintf(stderr, "attnd-bench: (preset names are looked up in %s; see --presets-dir)\n",
                    dir);
        ab_model_fini(m);
        return -1;
    }
    m->cfg.name = m->name;
    return 0;
}

static bool is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int ab_preset_dir(const char *given, char *out, size_t out_len) {
    if (given[0] != '\0') {
        snprintf(out, out_len, "%s", given);
        return 0;
    }
    char self[1024];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    char *slash = NULL;
    if (n > 0) {
        self[n] = '\0';
        slash = strrchr(self, '/');
    }
    if (slash != NULL) {
        *slash = '\0';
        static const char *const rel[] = {"presets", "../share/attnd/presets"};
        for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
            int w = snprintf(out, out_len, "%s/%s", self, rel[i]);
            if (w > 0 && (size_t)w < out_len && is_dir(out))
                return 0;
        }
    }
    fprintf(stderr, "attnd-bench: no presets directory beside attnd-bench (presets/ or "
                    "../share/attnd/presets): give --presets-dir DIR, or a preset's .json path\n");
    return -1;
}

void ab_model_fini(ab_model_t *m) {
    free(m->layer_window);
    free(m->alibi);
    free(m->sinks);
    memset(m, 0, sizeof *m);
}

size_t ab_model_elem_bytes(const ab_model_t *m) {
    return m->cfg.dtype == ATTND__V1__DTYPE__F32 ? 4 : 2;
}

const char *ab_model_dtype_name(const ab_model_t *m) {
    switch (m->cfg.dtype) {
    case ATTND__V1__DTYPE__F32: return "f32";
    case ATTND__V1__DTYPE__F16: return "f16";
    default: return "bf16";
    }
}
