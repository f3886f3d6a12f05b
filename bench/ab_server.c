/* Spawning and stopping `attnd serve` for attnd-bench (see ab_server.h).
 *
 * Thread model: main thread only; fork happens before any other thread exists, and the child
 * calls only async-signal-safe functions before exec. */
#include "bench/ab_server.h"

#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef AB_ATTND_BUILD_PATH
#define AB_ATTND_BUILD_PATH ""
#endif

int ab_server_find(const char *given, char *out, size_t out_len) {
    if (given[0] != '\0') {
        if (access(given, X_OK) != 0) {
            fprintf(stderr, "attnd-bench: --attnd %s: %s\n", given, strerror(errno));
            return -1;
        }
        snprintf(out, out_len, "%s", given);
        return 0;
    }
    char self[1024];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            slash[1] = '\0';
            int w = snprintf(out, out_len, "%sattnd", self);
            if (w > 0 && (size_t)w < out_len && access(out, X_OK) == 0)
                return 0;
        }
    }
    if (AB_ATTND_BUILD_PATH[0] != '\0' && access(AB_ATTND_BUILD_PATH, X_OK) == 0) {
        snprintf(out, out_len, "%s", AB_ATTND_BUILD_PATH);
        return 0;
    }
    fprintf(stderr, "attnd-bench: cannot find the attnd binary (not beside attnd-bench, not at "
                    "'%s'): give --attnd PATH, or --target HOST:PORT\n", AB_ATTND_BUILD_PATH);
    return -1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void describe_exit(const char *what, int status) {
    if (WIFEXITED(status))
        fprintf(stderr, "attnd-bench: attnd serve %s with status %d\n", what,
                WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        fprintf(stderr, "attnd-bench: attnd serve %s on signal %d\n", what, WTERMSIG(status));
}

/* Reads "HOST:PORT" from the ready file; 0 once it is there. */
static int read_ready(const char *path, char *target, size_t target_len) {
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    char line[128];
    int rc = fgets(line, sizeof line, f) != NULL ? 0 : -1;
    fclose(f);
    if (rc == 0) {
        line[strcspn(line, "\r\n")] = '\0';
        snprintf(target, target_len, "%s", line);
    }
    return rc;
}

int ab_server_start(const char *attnd, uint32_t cpu_threads, const char *const *extra,
                    uint32_t n_extra, char *target, size_t target_len, pid_t *pid) {
    if (n_extra > AB_SERVER_EXTRA_MAX) {
        fprintf(stderr, "attnd-bench: at most %d extra server arguments\n", AB_SERVER_EXTRA_MAX);
        return -1;
    }
    char dir[] = "/tmp/attnd-bench-XXXXXX";
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "attnd-bench: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    char ready[64], threads[16];
    snprintf(ready, sizeof ready, "%s/ready", dir);
    snprintf(threads, sizeof threads, "%u", cpu_threads);
    /* built before fork: the child only calls async-signal-safe functions */
    char *argv[12 + AB_SERVER_EXTRA_MAX] = {
        "attnd", "serve", "--listen", "127.0.0.1:0", "--ready-file", ready, "--null-device",
        "--cpu-threads", threads, "--log-level", "warn"};
    for (uint32_t i = 0; i < n_extra; i++)
        argv[11 + i] = (char *)extra[i];
    argv[11 + n_extra] = NULL;
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "attnd-bench: fork: %s\n", strerror(errno));
        rmdir(dir);
        return -1;
    }
    if (child == 0) {
        /* its own process group: a terminal's Ctrl-C goes to attnd-bench alone */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) /* attnd-bench died before prctl */
            _exit(127);
        execv(attnd, argv);
        _exit(127);
    }
    int rc = -1;
    bool exited = false;
    for (int i = 0; i < 600 && rc != 0 && !exited; i++) { /* up to 60 s */
        int status = 0;
        if (read_ready(ready, target, target_len) == 0) {
            rc = 0;
        } else if (waitpid(child, &status, WNOHANG) == child) {
            describe_exit("exited before it was ready", status);
            exited = true;
        } else {
            sleep_ms(100);
        }
    }
    if (rc != 0 && !exited) {
        fprintf(stderr, "attnd-bench: attnd serve was not ready after 60 s; stopping it\n");
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
    unlink(ready);
    rmdir(dir);
    if (rc == 0)
        *pid = child;
    return rc;
}

int ab_server_stop(pid_t pid) {
    if (kill(pid, SIGTERM) != 0) {
        fprintf(stderr, "attnd-bench: cannot stop attnd serve (pid %d): %s\n", (int)pid,
                strerror(errno));
        return -1;
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            fprintf(stderr, "attnd-bench: waitpid: %s\n", strerror(errno));
            return -1;
        }
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    describe_exit("did not stop cleanly: it ended", status);
    return -1;
}
