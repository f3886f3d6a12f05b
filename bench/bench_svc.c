/* `attnd bench-serve`: latency and throughput of Attend over loopback, and the service's own
 * overhead, measured in one run.
 *
 * It starts `attnd serve --null-device` as a child process (or uses --target), creates two
 * sessions of the same model, one on device "cpu" and one on device "null" (every step of a call
 * but the attention work), fills both caches to the same context with Append, then sends the same
 * decode calls to each: C client threads, each with its own completion queue, calls back to back.
 * The ratio null / cpu is the share of a call's latency that is the service, not attention.
 *
 * Thread model: the main thread sets up and reports; C caller threads only call and record. */
#include "bench/bench.h"

#include <errno.h>
#include <grpc/grpc.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "attnd/v1/attention.pb-c.h"
#include "bench/bench_client.h"

typedef struct bopts {
    char target[128];
    uint32_t seqs, ctx, calls, warmup, concurrency, cpu_threads;
    uint32_t q_heads, kv_heads, head_dim;
    int json;
} bopts_t;

typedef struct packed {
    uint8_t *p;
    size_t n;
} packed_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One unary call on channel ch with the pluck queue cq (600 s deadline); returns the status,
 * details into msg. A call that cannot be started reads as UNKNOWN. */
static grpc_status_code call_unary(grpc_channel *ch, grpc_completion_queue *cq, const char *method,
                                   const packed_t *req, char *msg, size_t msg_len) {
    bench_call_cfg_t cfg = {.method = method, .timeout_ms = 600000};
    bench_reply_t r;
    bench_call_unary(ch, cq, &cfg, req->p, req->n, &r);
    snprintf(msg, msg_len, "%s", r.details);
    grpc_status_code status = r.status;
    bench_reply_fini(&r);
    return status;
}

static packed_t pack_msg(const ProtobufCMessage *m) {
    packed_t p = {NULL, protobuf_c_message_get_packed_size(m)};
    p.p = malloc(p.n ? p.n : 1);
    if (p.p != NULL)
        protobuf_c_message_pack(m, p.p);
    return p;
}

static void fill_random(uint16_t *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        /* bf16 in [-1, 1): sign, exponent 126..127, random mantissa */
        p[i] = (uint16_t)(((x >> 31) << 15) | ((126u + ((x >> 30) & 1u)) << 7) | ((x >> 16) & 0x7f));
    }
}

/* An Attend/Append request: chunks of n tokens for sequences [first, first + count) at start. */
static packed_t make_request(const bopts_t *o, const char *session, uint32_t first,
                             uint32_t count, uint32_t start, uint32_t n, bool with_q) {
    size_t tokens = (size_t)count * n;
    size_t qn = with_q ? tokens * o->q_heads * o->head_dim : 0;
    size_t kvn = tokens * o->kv_heads * o->head_dim;
    uint16_t *q = malloc((qn ? qn : 1) * 2), *k = malloc(kvn * 2), *v = malloc(kvn * 2);
    Attnd__V1__SequenceChunk *sc = calloc(count, sizeof *sc);
    Attnd__V1__SequenceChunk **scp = calloc(count, sizeof *scp);
    packed_t out = {NULL, 0};
    if (q != NULL && k != NULL && v != NULL && sc != NULL && scp != NULL) {
        fill_random(q, qn, first + 1);
        fill_random(k, kvn, first + 2);
        fill_random(v, kvn, first + 3);
        for (uint32_t i = 0; i < count; i++) {
            attnd__v1__sequence_chunk__init(&sc[i]);
            sc[i].seq_id = first + i;
            sc[i].start_pos = start;
            sc[i].num_tokens = n;
            scp[i] = &sc[i];
        }
        Attnd__V1__AttendRequest rq = ATTND__V1__ATTEND_REQUEST__INIT;
        rq.session = (char *)session;
        rq.n_chunks = count;
        rq.chunks = scp;
        rq.q = (ProtobufCBinaryData){qn * 2, (uint8_t *)q};
        rq.k = (ProtobufCBinaryData){kvn * 2, (uint8_t *)k};
        rq.v = (ProtobufCBinaryData){kvn * 2, (uint8_t *)v};
        out = pack_msg(&rq.base);
    }
    free(q);
    free(k);
    free(v);
    free(sc);
    free(scp);
    return out;
}

static int setup_session(grpc_channel *ch, grpc_completion_queue *cq, const bopts_t *o,
                         const char *device, const char *session) {
    Attnd__V1__ModelConfig mc = ATTND__V1__MODEL_CONFIG__INIT;
    mc.name = "bench";
    mc.num_layers = 1;
    mc.num_query_heads = o->q_heads;
    mc.num_kv_heads = o->kv_heads;
    mc.head_dim = o->head_dim;
    mc.dtype = ATTND__V1__DTYPE__BF16;
    Attnd__V1__CreateSessionRequest cr = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    cr.session = (char *)session;
    cr.model = &mc;
    cr.kv_capacity_tokens = (uint64_t)o->seqs * (o->ctx + 16);
    cr.device = (char *)device;
    packed_t p = pack_msg(&cr.base);
    char msg[512];
    grpc_status_code st = call_unary(ch, cq, "/attnd.v1.Attention/CreateSession", &p, msg,
                                     sizeof msg);
    free(p.p);
    if (st != GRPC_STATUS_OK) {
        fprintf(stderr, "attnd bench-serve: CreateSession on %s: status %d: %s\n", device, st, msg);
        return -1;
    }
    /* fill: 1024-token chunks, 4 sequences a call (16 MiB at the default shape) */
    const uint32_t chunk = 1024, per_call = 4;
    for (uint32_t s = 0; s < o->seqs; s += per_call) {
        uint32_t count = o->seqs - s < per_call ? o->seqs - s : per_call;
        for (uint32_t pos = 0; pos < o->ctx; pos += chunk) {
            uint32_t n = o->ctx - pos < chunk ? o->ctx - pos : chunk;
            packed_t rq = make_request(o, session, s, count, pos, n, false);
            st = call_unary(ch, cq, "/attnd.v1.Attention/Append", &rq, msg, sizeof msg);
            free(rq.p);
            if (st != GRPC_STATUS_OK) {
                fprintf(stderr, "attnd bench-serve: Append on %s: status %d: %s\n", device, st,
                        msg);
                return -1;
            }
        }
    }
    return 0;
}

typedef struct caller {
    grpc_channel *ch;
    const packed_t *req;
    uint32_t calls;
    double *lat;  /* [calls] seconds */
    int failed;
    char msg[256];
} caller_t;

static void *caller_main(void *arg) {
    caller_t *c = arg;
    grpc_completion_queue *cq = bench_cq_create();
    for (uint32_t i = 0; i < c->calls; i++) {
        double t0 = now_s();
        grpc_status_code st = call_unary(c->ch, cq, "/attnd.v1.Attention/Attend", c->req, c->msg,
                                         sizeof c->msg);
        c->lat[i] = now_s() - t0;
        if (st != GRPC_STATUS_OK) {
            c->failed = (int)st;
            break;
        }
    }
    bench_cq_destroy(&cq);
    return NULL;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct stats {
    double p50, p99, mean, calls_per_s;
} stats_t;

/* Runs o->warmup then o->calls per caller, concurrently; stats over the timed calls. */
static int run_calls(grpc_channel *ch, const bopts_t *o, const packed_t *req, stats_t *st) {
    uint32_t c = o->concurrency;
    caller_t *callers = calloc(c, sizeof *callers);
    pthread_t *tids = calloc(c, sizeof *tids);
    double *lat = calloc((size_t)c * o->calls, sizeof *lat);
    double *warm = calloc((size_t)c * (o->warmup ? o->warmup : 1), sizeof *warm);
    int rc = -1;
    if (callers == NULL || tids == NULL || lat == NULL || warm == NULL)
        goto out;
    for (int phase = 0; phase < 2; phase++) {
        uint32_t n = phase == 0 ? o->warmup : o->calls;
        if (n == 0)
            continue;
        double t0 = now_s();
        for (uint32_t i = 0; i < c; i++) {
            callers[i] = (caller_t){.ch = ch, .req = req, .calls = n,
                                    .lat = (phase == 0 ? warm : lat) + (size_t)i * n};
            pthread_create(&tids[i], NULL, caller_main, &callers[i]);
        }
        for (uint32_t i = 0; i < c; i++)
            pthread_join(tids[i], NULL);
        double wall = now_s() - t0;
        for (uint32_t i = 0; i < c; i++)
            if (callers[i].failed) {
                fprintf(stderr, "attnd bench-serve: Attend: status %d: %s\n", callers[i].failed,
                        callers[i].msg);
                goto out;
            }
        if (phase == 1) {
            size_t total = (size_t)c * n;
            double sum = 0;
            for (size_t i = 0; i < total; i++)
                sum += lat[i];
            qsort(lat, total, sizeof *lat, cmp_d);
            st->p50 = lat[total / 2];
            st->p99 = lat[(size_t)((double)(total - 1) * 0.99)];
            st->mean = sum / (double)total;
            st->calls_per_s = (double)total / wall;
        }
    }
    rc = 0;
out:
    free(callers);
    free(tids);
    free(lat);
    free(warm);
    return rc;
}

/* Starts `attnd serve --null-device` on a free loopback port; its address into o->target. */
static pid_t start_server(bopts_t *o) {
    char ready[64], threads[16];
    snprintf(ready, sizeof ready, "/tmp/attnd-bench-%d.ready", (int)getpid());
    snprintf(threads, sizeof threads, "%u", o->cpu_threads);
    unlink(ready);
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {"attnd", "serve", "--listen", "127.0.0.1:0", "--ready-file", ready,
                        "--null-device", "--cpu-threads", threads, "--log-level", "warn", NULL};
        execv("/proc/self/exe", argv);
        _exit(127);
    }
    if (pid < 0)
        return -1;
    for (int i = 0; i < 600; i++) { /* up to 60 s */
        FILE *f = fopen(ready, "r");
        if (f != NULL) {
            int ok = fscanf(f, "%127s", o->target) == 1;
            fclose(f);
            unlink(ready);
            if (ok)
                return pid;
        }
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return -1;
        usleep(100000);
    }
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    return -1;
}

static int parse(bopts_t *o, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            printf("usage: attnd bench-serve [--target HOST:PORT] [--seqs N] [--ctx N] [--calls N]\n"
                   "                          [--warmup N] [--concurrency N] [--cpu-threads N] "
                   "[--json]\n"
                   "Decode Attend calls (SEQS sequences x 1 token at CTX cached tokens, Llama-3.1-8B\n"
                   "attention shape, bf16) over loopback to a cpu and a null session; prints\n"
                   "latency p50/p99, calls/s, and the service overhead (null / cpu). Without\n"
                   "--target it starts `attnd serve --null-device` itself; a --target server must\n"
                   "have been started with --null-device.\n");
            return 1;
        }
        if (strcmp(a, "--json") == 0) {
            o->json = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "attnd bench-serve: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        uint32_t *dst = strcmp(a, "--seqs") == 0          ? &o->seqs
                        : strcmp(a, "--ctx") == 0         ? &o->ctx
                        : strcmp(a, "--calls") == 0       ? &o->calls
                        : strcmp(a, "--warmup") == 0      ? &o->warmup
                        : strcmp(a, "--concurrency") == 0 ? &o->concurrency
                        : strcmp(a, "--cpu-threads") == 0 ? &o->cpu_threads
                                                          : NULL;
        if (strcmp(a, "--target") == 0) {
            snprintf(o->target, sizeof o->target, "%s", v);
            continue;
        }
        char *end = NULL;
        errno = 0;
        unsigned long x = strtoul(v, &end, 10);
        if (dst == NULL || errno != 0 || *end != '\0' || x > 1000000 || v[0] == '-') {
            fprintf(stderr, "attnd bench-serve: bad option %s %s (see --help)\n", a, v);
            return 2;
        }
        *dst = (uint32_t)x;
    }
    if (o->seqs == 0 || o->calls == 0 || o->concurrency == 0 || o->concurrency > 256) {
        fprintf(stderr, "attnd bench-serve: --seqs, --calls and --concurrency (<= 256) must be "
                        "positive\n");
        return 2;
    }
    return 0;
}

int bench_svc_main(int argc, char **argv) {
    bopts_t o = {.seqs = 64, .ctx = 4096, .calls = 30, .warmup = 3, .concurrency = 1,
                 .q_heads = 32, .kv_heads = 8, .head_dim = 128};
    int rc = parse(&o, argc, argv);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    pid_t server = 0;
    if (o.target[0] == '\0' && (server = start_server(&o)) <= 0) {
        fprintf(stderr, "attnd bench-serve: could not start attnd serve\n");
        return 1;
    }
    grpc_init();
    grpc_channel *ch = bench_channel_create(o.target);
    grpc_completion_queue *cq = bench_cq_create();
    stats_t st[2] = {{0}};
    const char *devices[2] = {"cpu", "null"};
    rc = 1;
    for (int dv = 0; dv < 2; dv++) {
        char session[64];
        snprintf(session, sizeof session, "bench-serve-%s-%d", devices[dv], (int)getpid());
        fprintf(stderr, "attnd bench-serve: %s: filling %u sequences x %u tokens...\n",
                devices[dv], o.seqs, o.ctx);
        if (setup_session(ch, cq, &o, devices[dv], session) != 0)
            goto out;
        packed_t req = make_request(&o, session, 0, o.seqs, o.ctx, 1, true);
        fprintf(stderr, "attnd bench-serve: %s: %u + %u calls x %u callers...\n", devices[dv],
                o.warmup, o.calls, o.concurrency);
        int r = req.p != NULL ? run_calls(ch, &o, &req, &st[dv]) : -1;
        free(req.p);
        if (r != 0)
            goto out;
    }
    double ratio = st[1].p50 / st[0].p50;
    double kv_bytes = (double)o.seqs * (o.ctx + 1) * o.kv_heads * o.head_dim * 2 * 2;
    if (o.json) {
        printf("{\"model\": {\"q_heads\": %u, \"kv_heads\": %u, \"head_dim\": %u, \"dtype\": "
               "\"bf16\"}, \"seqs\": %u, \"ctx\": %u, \"calls\": %u, \"concurrency\": %u,\n",
               o.q_heads, o.kv_heads, o.head_dim, o.seqs, o.ctx, o.calls, o.concurrency);
        for (int dv = 0; dv < 2; dv++)
            printf(" \"%s\": {\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"mean_ms\": %.4f, "
                   "\"calls_per_s\": %.3f, \"tokens_per_s\": %.1f},\n",
                   devices[dv], st[dv].p50 * 1e3, st[dv].p99 * 1e3, st[dv].mean * 1e3,
                   st[dv].calls_per_s, st[dv].calls_per_s * o.seqs);
        printf(" \"overhead_ratio_p50\": %.5f, \"overhead_ratio_mean\": %.5f}\n", ratio,
               st[1].mean / st[0].mean);
    } else {
        printf("decode batch over loopback: %u sequences x 1 token at %u context, Llama-3.1-8B "
               "attention shape, bf16, %u callers, %u calls each\n",
               o.seqs, o.ctx, o.concurrency, o.calls);
        printf("device  p50 ms    p99 ms    mean ms   calls/s   tokens/s   KV GB/s\n");
        for (int dv = 0; dv < 2; dv++)
            printf("%-6s %8.3f  %8.3f  %8.3f  %8.2f  %9.1f  %8.2f\n", devices[dv],
                   st[dv].p50 * 1e3, st[dv].p99 * 1e3, st[dv].mean * 1e3, st[dv].calls_per_s,
                   st[dv].calls_per_s * o.seqs, dv == 0 ? kv_bytes * st[dv].calls_per_s / 1e9 : 0);
        printf("service overhead: null / cpu = %.4f at p50, %.4f in the mean\n", ratio,
               st[1].mean / st[0].mean);
    }
    rc = 0;
out:
    grpc_channel_destroy(ch);
    bench_cq_destroy(&cq);
    grpc_shutdown();
    if (server > 0) {
        kill(server, SIGTERM);
        int status = 0;
        waitpid(server, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "attnd bench-serve: the server did not stop cleanly\n");
            rc = 1;
        }
    }
    return rc;
}
