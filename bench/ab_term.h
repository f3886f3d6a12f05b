/* attnd-bench's interaction with the terminal: the clock that every timing uses, the live
 * progress line on stderr, and Ctrl-C (SIGINT) or SIGTERM, which stop the run gracefully. */
#ifndef AT_BENCH_AB_TERM_H
#define AT_BENCH_AB_TERM_H

#include <stdbool.h>

/* Installs the SIGINT and SIGTERM handlers (a second signal kills at once) and notes whether
 * stderr is a terminal. Thread: main, before any other thread starts. */
void ab_term_init(void);

/* True once SIGINT or SIGTERM arrived. Thread: any. */
bool ab_term_interrupted(void);

/* CLOCK_MONOTONIC in seconds. Thread: any. */
double ab_now_s(void);

/* A progress line: on a terminal rewritten in place, else one line each time. */
typedef struct ab_progress {
    double last_s; /* when it was last shown; 0 = never */
    bool open;     /* a terminal line is shown and not yet ended */
} ab_progress_t;

/* Starts a progress line: the first show is due a second from now. */
void ab_progress_init(ab_progress_t *p);

/* True when a second has passed since the line was last shown (or initialised). */
bool ab_progress_due(const ab_progress_t *p);

/* Shows the line (printf format, no newline). Thread: main. */
__attribute__((format(printf, 2, 3))) void ab_progress_show(ab_progress_t *p, const char *fmt,
                                                              ...);

/* Ends a line left open on a terminal, so that the next output starts on a line of its own. */
void ab_progress_end(ab_progress_t *p);

#endif
