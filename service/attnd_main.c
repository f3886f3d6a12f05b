/* The attnd command: one binary whose first argument picks a subcommand from a table.
 *
 * Exit status: what the subcommand returns; 2 for no arguments or an unknown subcommand.
 * Thread: main thread only. */
#include <stdio.h>
#include <string.h>

#include "bench/bench.h"
#include "service/svc_serve.h"
#include "service/svc_worker.h"

#ifndef ATTND_VERSION
#define ATTND_VERSION "unknown"
#endif

typedef struct cmd {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand's name */
    const char *summary;
} cmd_t;

static int cmd_help(int argc, char **argv);

/* Adding a subcommand is one line here. */
static const cmd_t cmds[] = {
    {"serve", svc_serve_main, "serve attnd.v1.Attention over gRPC (attnd serve --help)"},
    {"token", svc_token_main, "print a new bearer token and its digest for the tenants file"},
    {"bench", bench_cpu_main, "time the CPU attention backend (attnd bench --help)"},
    {"tune", bench_tune_main, "tune a model's kernel configs ahead of time (attnd tune --help)"},
    {"bench-serve", bench_svc_main, "time Attend over loopback, and the service's overhead"},
#ifdef AT_HAVE_CUDA
    {"bench-gpu", bench_gpu_main, "time the CUDA backend on cuda:0 against measured ceilings"},
#endif
    {"help", cmd_help, "print this help, or a command's: attnd help COMMAND"},
    {"worker", svc_worker_main, NULL}, /* hidden: a device's worker process, spawned by serve */
};

static void usage(FILE *f) {
    fprintf(f, "usage: attnd COMMAND [options]\n"
               "       attnd --help | --version\n"
               "\ncommands:\n");
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (cmds[i].summary != NULL)
            fprintf(f, "  %-12s %s\n", cmds[i].name, cmds[i].summary);
}

static const cmd_t *cmd_find(const char *name) {
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(cmds[i].name, name) == 0)
            return &cmds[i];
    return NULL;
}

static int unknown(const char *name) {
    fprintf(stderr, "attnd: unknown command '%s' (see attnd --help)\n", name);
    return 2;
}

static int cmd_help(int argc, char **argv) {
    if (argc < 2) {
        usage(stdout);
        return 0;
    }
    const cmd_t *c = cmd_find(argv[1]);
    if (c == NULL)
        return unknown(argv[1]);
    if (c->run == cmd_help) {
        usage(stdout);
        return 0;
    }
    char help_opt[] = "--help";
    char *sub_argv[] = {argv[1], help_opt, NULL};
    return c->run(2, sub_argv);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("attnd %s\n", ATTND_VERSION);
        return 0;
    }
    const cmd_t *c = cmd_find(argv[1]);
    if (c == NULL)
        return unknown(argv[1]);
    return c->run(argc - 1, argv + 1);
}
