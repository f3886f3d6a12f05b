/* The clock, progress lines and stop signals of attnd-bench (see ab_term.h).
 *
 * Thread model: the handlers may run on any thread; they only store to an atomic flag that any
 * thread reads. Progress lines are written by the main thread only. */
#include "bench/ab_term.h"

#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

/* Set by the handler, read by callers between calls: relaxed is enough, a late stop is fine. */
static atomic_int interrupted;
static bool stderr_tty; /* written before any thread starts */

static void on_signal(int sig) {
    atomic_store_explicit(&interrupted, 1, memory_order_relaxed);
    signal(sig, SIG_DFL); /* a second one ends the process */
}

void ab_term_init(void) {
    struct sigaction sa;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    stderr_tty = isatty(STDERR_FILENO) == 1;
}

bool ab_term_interrupted(void) {
    return atomic_load_explicit(&interrupted, memory_order_relaxed) != 0;
}

double ab_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void ab_progress_init(ab_progress_t *p) {
    p->last_s = ab_now_s();
    p->open = false;
}

bool ab_progress_due(const ab_progress_t *p) {
    return ab_now_s() - p->last_s >= 1.0;
}

void ab_progress_show(ab_progress_t *p, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (stderr_tty)
        fputc('\r', stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    /* on a terminal: clear what a longer earlier line left, and stay on the line */
    fputs(stderr_tty ? "\033[K" : "\n", stderr);
    fflush(stderr);
    p->open = stderr_tty;
    p->last_s = ab_now_s();
}

void ab_progress_end(ab_progress_t *p) {
    if (p->open)
        fputc('\n', stderr);
    p->open = false;
}
