/* One log format for all of attnd, on stderr:
 *   2026-11-25T04:50:00.123Z INFO  component: message
 * Thread: any (one write per line, so lines from threads do not interleave). */
#ifndef AT_COMMON_AT_LOG_H
#define AT_COMMON_AT_LOG_H

typedef enum at_log_level {
    AT_LOG_DEBUG = 0,
    AT_LOG_INFO = 1,
    AT_LOG_WARN = 2,
    AT_LOG_ERROR = 3,
} at_log_level_t;

/* Lines below level are dropped. Set once at start-up, before other threads run. */
void at_log_set_level(at_log_level_t level);
/* "debug", "info", "warn", "error" -> level; -1 for anything else. */
int at_log_parse_level(const char *name);
void at_log(at_log_level_t level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
