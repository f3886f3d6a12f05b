/* The attnd server that attnd-bench spawns when no --target is given: `attnd serve
 * --null-device` on a free loopback port, in a process group of its own (Ctrl-C reaches only
 * attnd-bench, which stops it cleanly) and killed with attnd-bench should that die first. */
#ifndef AT_BENCH_AB_SERVER_H
#define AT_BENCH_AB_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* The attnd binary to run: given when not empty (it must be executable), else `attnd` beside
 * this program, else the build tree's. Returns 0 and the path in out, or -1 after a message. */
int ab_server_find(const char *given, char *out, size_t out_len);

/* Starts `attnd serve` (attnd: a path) with cpu_threads backend threads (0 = all), then the
 * n_extra arguments of extra (borrowed until return, at most AB_SERVER_EXTRA_MAX), and waits up
 * to 60 s until it serves. Returns 0, its pid and "127.0.0.1:PORT" in target; or -1 after a
 * message. Thread: main, before grpc_init and before any other thread starts. */
#define AB_SERVER_EXTRA_MAX 16
int ab_server_start(const char *attnd, uint32_t cpu_threads, const char *const *extra,
                    uint32_t n_extra, char *target, size_t target_len, pid_t *pid);

/* Sends SIGTERM and waits for it. Returns 0 when it exited with status 0, else -1 after a
 * message. */
int ab_server_stop(pid_t pid);

#endif
