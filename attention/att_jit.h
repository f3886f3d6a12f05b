/* Run-time compilation of the attention kernels (NVRTC for CUDA, hiprtc for HIP: a compiler
 * table), and the compiled-image cache.
 *
 * A model's constants (head_dim, dtype, block size, GQA group, KV heads, feature flags) and a
 * tile configuration become -D defines of the one kernel source (attention/kernels/att_unified.cu
 * with its headers, embedded in the binary at build time), compiled for one exact architecture
 * ("sm_90", "gfx90a:sramecc+:xnack-"). Images are cached under a content key: SHA-256 of the
 * source, its headers, every option, the architecture and the compiler's name and version. A key
 * names exactly one image, so the cache is safe to share between models and sessions (unlike a
 * launch cache keyed by less; see cache/lc.h). Cached on disk (one file per key, written
 * atomically: temporary file, fsync, rename, fsync of the directory; a file that is truncated or
 * whose checksum is wrong is recompiled and replaced, never loaded; past ATT_JIT_DISK_BYTES the
 * least recently used files are removed) and in memory, where the least
 * recently used images that the disk also holds are dropped past a limit (ATT_JIT_MEMORY_BYTES: a
 * server that tunes many models would otherwise keep every candidate it ever compiled). An image
 * the disk lacks (no directory, a failed write) stays in memory, since a lookup could not get it
 * back without compiling; the one just asked for stays however large; failed keys stay.
 *
 * Thread: any; a mutex guards the in-memory map and another the directory's pruning (compiles
 * of different keys may run at once; see att_jit.c for who calls from which thread). */
#ifndef AT_ATTENTION_ATT_JIT_H
#define AT_ATTENTION_ATT_JIT_H

#include <stddef.h>
#include <stdint.h>

#include "attention/att_model.h"
#ifdef AT_HAVE_CUDA
#include "attention/att_cudrv.h"
#endif
#include "common/at_err.h"

typedef struct att_jit att_jit_t;

/* A tile configuration of att_k_attend (see the kernel's top comment): the compile-time knobs
 * ATT_WARPS_M, ATT_WARP_MT, ATT_WARPS_N, ATT_TILE_K, ATT_STAGES. Rows per tile are
 * 16 * warp_mt * warps_m; threads 32 * warps_m * warps_n. Valid: warps_m * warps_n in 1..16,
 * warp_mt 1 or 2, tile_k a multiple of 16 * warps_n, stages 2..4, and the shared memory
 * ((rows + 2 * stages * tile_k) * (head_dim rounded up to 16, + 8) * 2 bytes) within the
 * device's per-block limit. f32 models use only rows and threads.
 * mma 1 selects the sm_90a wgmma body (ATT_WGMMA, kernels/att_sm90.cuh; compiled for "sm_90a"):
 * f16/bf16, head_dim 64 or 128, warps_m 4 or 8 (one or two warpgroups of 64 rows), warp_mt 1,
 * warps_n 1, tile_k 64 or 128, stages 2..4; a producer warpgroup more (threads 32 * warps_m + 128)
 * and 1024 + (rows + 2 * stages * tile_k) * head_dim * 2 bytes of shared memory. */
typedef struct att_tile {
    uint32_t warps_m; /* warps over the tile's rows */
    uint32_t warp_mt; /* m16 row tiles per warp: 1 or 2 */
    uint32_t warps_n; /* warps over each stage's keys */
    uint32_t tile_k;  /* keys per pipeline stage */
    uint32_t stages;  /* cp.async ring depth */
    uint32_t mma;     /* 0 mma.sync (any NVIDIA GPU from sm_80), 1 wgmma (sm_90a) */
} att_tile_t;

typedef enum att_tile_kind {
    ATT_TILE_WIDE = 0,   /* many rows: prefill and long chunks */
    ATT_TILE_NARROW = 1, /* 16 rows, keys split over 4 warps: decode */
    ATT_TILE_KINDS = 2,
} att_tile_kind_t;

typedef struct att_jit_stats {
    uint64_t compiles; /* compiler runs */
    uint64_t memory_hits;
    uint64_t disk_hits;
    uint64_t disk_rejects; /* files found damaged and recompiled */
    uint64_t compile_ns;   /* wall time inside the compiler */
    uint64_t evictions;    /* images dropped from memory past the limit */
    uint64_t memory_bytes; /* image bytes held in memory now */
    uint64_t disk_removed; /* image files removed from the directory past its limit */
} att_jit_stats_t;

/* The in-memory images' default limit in bytes: some 800 images (an att_k_attend cubin for sm_90
 * is about 80 KB), every variant that a handful of models and their tuning use. */
#define ATT_JIT_MEMORY_BYTES (64u << 20)

/* The default limit in bytes of one compiler's image files (one extension) in the cache
 * directory: past it the least recently used go, down to 90% of it, after a new file (used: read,
 * written, or served from memory, which marks the file at most once a minute). Every change of
 * the kernel source makes every key new, so a long-lived directory would otherwise keep each
 * version's images. Temporary files and other files are not counted and stay. */
#define ATT_JIT_DISK_BYTES (1ull << 30)

/* The most headers the kernel source includes (att_jit_source_t). */
#define ATT_JIT_MAX_HEADERS 3u

/* Dynamic shared memory of att_k_attend with tile t for model m, in bytes (the kernel's own
 * figure, att_k_info, is the one used to launch; this one lets a plan check a tile fits). */
uint32_t att_jit_tile_smem(const att_model_t *m, const att_tile_t *t);

/* Room for the defines of one variant. */
#define ATT_JIT_MAX_OPTS 20
typedef struct att_jit_opts {
    char text[ATT_JIT_MAX_OPTS][40];
    const char *ptr[ATT_JIT_MAX_OPTS];
    uint32_t n;
    /* The variant's own compile target when the device's does not build it ("sm_90a" for a wgmma
     * tile, whose instructions exist only on the arch-specific target); "": the device's. */
    char arch[16];
} att_jit_opts_t;

/* NVRTC's options (language level, line info, then att_jit_model_defines) of model m with tile
 * t, and its own target (o->arch). */
void att_jit_model_opts(const att_model_t *m, const att_tile_t *t, att_jit_opts_t *o);

/* The target to compile o for on a device of architecture dev_arch: o->arch, else dev_arch. */
const char *att_jit_opts_arch(const att_jit_opts_t *o, const char *dev_arch);

/* Appends the defines of model m with tile t to o. The window flag is set when any layer has a
 * window (the window itself is a per-call value). */
void att_jit_model_defines(const att_model_t *m, const att_tile_t *t, att_jit_opts_t *o);

/* Appends one option, printf-formatted with v, to o. */
void att_jit_opt_add(att_jit_opts_t *o, const char *fmt, unsigned v);

/* The embedded kernel source and the headers it includes, under the names it includes them by;
 * static storage. */
typedef struct att_jit_source {
    const char *text;
    const char *name;
    const char *headers[ATT_JIT_MAX_HEADERS];
    const char *header_names[ATT_JIT_MAX_HEADERS];
    uint32_t num_headers;
} att_jit_source_t;
void att_jit_kernel_source(att_jit_source_t *out);

/* A compile that failed, for a compiler table: logs the compiler's log (NULL: none) at ERROR
 * level and returns AT_ERR_UNSUPPORTED with its first error, or why, in diag. */
at_err_t att_jit_compile_failed(const char *compiler, const char *arch, const char *log,
                                const char *why, at_diag_t *diag);

#ifdef AT_HAVE_CUDA
/* A failed nvrtcCompileProgram (r) of prog for arch: fetches NVRTC's log and hands it to
 * att_jit_compile_failed, whose result it returns. */
at_err_t att_jit_nvrtc_failed(const att_nvrtc_t *nv, nvrtcProgram prog, nvrtcResult r,
                              const char *arch, at_diag_t *diag);
#endif

/* A run-time compiler. compile() builds the embedded source (att_jit_kernel_source) for arch with
 * opts into *image (malloc'd; the caller's) of *bytes; a source that does not compile is
 * AT_ERR_UNSUPPORTED with the first error line in diag and the log at ERROR level. Called from
 * any thread, for different keys at once. */
typedef struct att_jit_compiler {
    const char *name;      /* "nvrtc 13.0", "hiprtc 5.2.21153": part of every key */
    const char *image_ext; /* suffix of the cache's files: "cubin", "hsaco" */
    at_err_t (*compile)(void *user, const char *arch, const char *const *opts, uint32_t n_opts,
                        void **image, size_t *bytes, at_diag_t *diag);
    void *user; /* borrowed; outlives the att_jit_t */
} att_jit_compiler_t;

/* A cache of images compiled by cc (copied). cache_dir NULL or "" keeps images in memory only;
 * otherwise the directory is created (with parents) if missing: AT_ERR_IO with diag when that
 * fails. On success *out is the caller's (att_jit_destroy). */
at_err_t att_jit_create_with(const att_jit_compiler_t *cc, const char *cache_dir, at_diag_t *diag,
                             att_jit_t **out);

/* att_jit_create_with NVRTC (CUDA builds only); AT_ERR_UNSUPPORTED when NVRTC cannot be loaded. */
at_err_t att_jit_create(const char *cache_dir, at_diag_t *diag, att_jit_t **out);
void att_jit_destroy(att_jit_t **j);

/* The image for arch ("sm_90") and options: from memory, disk, or the compiler. *image is a copy,
 * malloc'd and the caller's (free), since the cache may drop its own at any time; set only on
 * AT_OK; image NULL asks for none (to fill the cache ahead of use), *bytes is set either way. A
 * compile error is AT_ERR_UNSUPPORTED (the variant cannot be built) with the first error line in
 * diag and the whole log at ERROR level; AT_ERR_NOMEM when the copy cannot be made. *compiled (may
 * be NULL) says whether the compiler ran. */
at_err_t att_jit_image(att_jit_t *j, const char *arch, const char *const *opts, uint32_t n_opts,
                       void **image, size_t *bytes, int *compiled, at_diag_t *diag);

/* As att_jit_image, but never compiles: from memory, else from disk. AT_ERR_NOT_READY when
 * neither has it; AT_ERR_UNSUPPORTED when an earlier compile of it failed. For a call's path
 * (set_tuning), where a compile would stall the call for seconds. */
at_err_t att_jit_lookup(att_jit_t *j, const char *arch, const char *const *opts, uint32_t n_opts,
                        void **image, size_t *bytes);

/* Sets the in-memory images' limit in bytes (ATT_JIT_MEMORY_BYTES until then) and drops the least
 * recently used images past it that the disk also holds, now and at each insert. */
void att_jit_set_memory_limit(att_jit_t *j, size_t bytes);

/* Sets the cache directory's limit for image files in bytes (ATT_JIT_DISK_BYTES until then) and
 * removes the least recently used image files past it, now and after each new file. Files of
 * other compilers (another extension) and other files stay. */
void att_jit_set_disk_limit(att_jit_t *j, uint64_t bytes);

void att_jit_get_stats(att_jit_t *j, att_jit_stats_t *out);

/* Hex SHA-256 of the embedded kernel source and its headers (att_unified.cu, att_kparams.h,
 * att_port.h, att_sm90.cuh): a kernel change changes it, so tuning records keyed by it (CUDA's
 * and HIP's) are not reused. Any thread. */
const char *att_jit_kernel_hash(void);

/* The default cache directory: $ATTND_KERNEL_CACHE_DIR (set by `attnd serve --kernel-cache-dir`
 * for its workers), else $XDG_CACHE_HOME/attnd/kernels, else $HOME/.cache/attnd/kernels; "" when
 * none is set. Writes at most n bytes. */
void att_jit_default_dir(char *buf, size_t n);

/* "13.0": the NVRTC version, or "" when it cannot be loaded. */
void att_jit_nvrtc_version(char *buf, size_t n);

#endif
