/* Model presets: a JSON file of ModelConfig fields (attention.proto) per model, loaded into the
 * protobuf-c message that CreateSession sends. */
#ifndef AT_BENCH_AB_PRESET_H
#define AT_BENCH_AB_PRESET_H

#include <stddef.h>
#include <stdint.h>

#include "attnd/v1/attention.pb-c.h"

typedef struct ab_model {
    char name[64];               /* the preset's "name" */
    char path[1280];             /* the file it came from */
    Attnd__V1__ModelConfig cfg;  /* its strings and arrays point into this struct's own
                                  * storage below: valid until ab_model_fini */
    uint32_t *layer_window;      /* owned: [cfg.n_layer_sliding_window] */
    float *alibi;                /* owned: [cfg.n_alibi_slopes] */
    float *sinks;                /* owned: [cfg.n_sinks] */
} ab_model_t;

/* Loads a preset: spec is a path when it contains '/' or ends in ".json", else the name of
 * <dir>/<spec>.json. Keys: name, description (ignored), num_layers, num_query_heads,
 * num_kv_heads, head_dim, dtype ("f32", "f16" or "bf16") -- all required but description --
 * and block_size, scale, sliding_window, layer_sliding_window, logits_soft_cap, alibi_slopes,
 * sinks (optional; 0 or empty = none). Unknown keys and wrong types are refused; the server
 * checks the values. Returns 0 and fills *m (ab_model_fini frees it), or -1 after a message on
 * stderr. Thread: any. */
int ab_model_load(const char *spec, const char *dir, ab_model_t *m);

/* Where preset names are looked up: given when not empty, else presets/ beside this program
 * (the build tree), else ../share/attnd/presets from it (an installed attnd-bench). Returns 0
 * and the directory in out, or -1 after a message. Thread: any. */
int ab_preset_dir(const char *given, char *out, size_t out_len);

/* Frees what *m owns and zeroes it. */
void ab_model_fini(ab_model_t *m);

/* Bytes per element of the model's dtype: 4, 2 or 2. */
size_t ab_model_elem_bytes(const ab_model_t *m);

/* "f32", "f16" or "bf16". Static storage. */
const char *ab_model_dtype_name(const ab_model_t *m);

#endif
