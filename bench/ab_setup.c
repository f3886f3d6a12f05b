/* Server check, sessions and cache fill of attnd-bench (see ab_setup.h).
 *
 * Thread model: main thread only; each function uses a completion queue of its own. */
#include "bench/ab_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attnd/v1/attention.pb-c.h"
#include "bench/ab_term.h"
#include "bench/bench_client.h"
#include "grpc/health/v1/health.pb-c.h"

/* Largest Append the fill sends: big enough to be quick, far below the message limit. */
#define FILL_MESSAGE_BYTES (16u << 20)

/* One unary call of a packed message; the reply in *r (bench_reply_fini). */
static int call_msg(grpc_channel *ch, const char *method, const char *token, int64_t timeout_ms,
                    const ProtobufCMessage *msg, bench_reply_t *r) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n + 1);
    if (buf == NULL) {
        memset(r, 0, sizeof *r);
        snprintf(r->details, sizeof r->details, "client: out of memory");
        return -1;
    }
    protobuf_c_message_pack(msg, buf);
    grpc_completion_queue *cq = bench_cq_create();
    bench_call_cfg_t cfg = {.method = method, .token = token, .timeout_ms = timeout_ms,
                            .keep_body = true};
    int rc = bench_call_unary(ch, cq, &cfg, buf, n, r);
    bench_cq_destroy(&cq);
    free(buf);
    return rc;
}

int ab_setup_check_server(grpc_channel *ch, const char *target, const char *token) {
    Grpc__Health__V1__HealthCheckRequest rq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    bench_reply_t r;
    int rc = call_msg(ch, "/grpc.health.v1.Health/Check", token, 10000, &rq.base, &r);
    if (rc == 0 && (r.status == GRPC_STATUS_UNAVAILABLE ||
                    r.status == GRPC_STATUS_DEADLINE_EXCEEDED)) {
        fprintf(stderr, "attnd-bench: cannot reach an attnd server at %s: %s: %s\n", target,
                bench_status_name(r.status), r.details);
        rc = -1;
    } else if (rc != 0 || r.status != GRPC_STATUS_OK) {
        fprintf(stderr, "attnd-bench: %s: health check failed: %s: %s\n", target,
                rc == 0 ? bench_status_name(r.status) : "client", r.details);
        rc = -1;
    } else {
        Grpc__Health__V1__HealthCheckResponse *h =
            grpc__health__v1__health_check_response__unpack(NULL, r.body_bytes, r.body);
        if (h == NULL ||
            h->status != GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING) {
            fprintf(stderr, "attnd-bench: %s: the server is %s\n", target,
                    h == NULL ? "answering health checks with garbage" : "not serving");
            rc = -1;
        }
        if (h != NULL)
            grpc__health__v1__health_check_response__free_unpacked(h, NULL);
    }
    bench_reply_fini(&r);
    return rc;
}

int ab_setup_create(grpc_channel *ch, ab_session_t *s, uint32_t layers, uint64_t capacity_tokens) {
    Attnd__V1__ModelConfig cfg = s->model->cfg; /* its arrays stay the preset's */
    cfg.num_layers = layers;
    if (cfg.n_layer_sliding_window > layers)
        cfg.n_layer_sliding_window = layers;
    Attnd__V1__CreateSessionRequest rq = ATTND__V1__CREATE_SESSION_REQUEST__INIT;
    rq.session = s->name;
    rq.model = &cfg;
    rq.kv_capacity_tokens = capacity_tokens;
    rq.device = (char *)s->device;
    bench_reply_t r;
    int rc = call_msg(ch, "/attnd.v1.Attention/CreateSession", s->token, 120000, &rq.base, &r);
    if (rc != 0 || r.status != GRPC_STATUS_OK) {
        fprintf(stderr, "attnd-bench: CreateSession %s (model %s, device %s, %llu tokens): %s: "
                        "%s\n", s->name, s->model->name, s->device,
                (unsigned long long)capacity_tokens,
                rc == 0 ? bench_status_name(r.status) : "client", r.details);
        if (strcmp(s->device, "null") == 0)
            fprintf(stderr, "attnd-bench: (device null needs a server started with "
                            "--null-device)\n");
        rc = -1;
    } else {
        s->created = true;
    }
    bench_reply_fini(&r);
    return rc;
}

/* How one session is filled: tokens per chunk and sequences per Append. */
typedef struct fill_plan {
    uint64_t first;  /* first sequence id */
    uint32_t count;  /* sequences */
    uint32_t step;   /* tokens per Append per sequence */
    uint32_t group;  /* sequences per Append */
} fill_plan_t;

static fill_plan_t plan_fill(const ab_model_t *m, const ab_shape_t *shape, uint32_t slot,
                             bool decode, bool prefill) {
    size_t token_bytes = 2 * (size_t)m->cfg.num_kv_heads * m->cfg.head_dim *
                         ab_model_elem_bytes(m);
    size_t budget = FILL_MESSAGE_BYTES / token_bytes;
    fill_plan_t p = {.first = ab_work_slot_first(shape, slot) + (decode ? 0 : shape->batch),
                     .count = (decode ? shape->batch : 0) + (prefill ? 1 : 0)};
    p.step = budget == 0 ? 1 : budget < shape->ctx ? (uint32_t)budget : shape->ctx;
    p.group = budget / p.step > 0 ? (uint32_t)(budget / p.step) : 1;
    return p;
}

static uint64_t fill_calls(const fill_plan_t *p, const ab_shape_t *shape, uint32_t layers) {
    uint64_t groups = (p->count + p->group - 1) / p->group;
    uint64_t steps = (shape->ctx + p->step - 1) / p->step;
    return groups * steps * layers;
}

/* Where a fill stands, for its progress line, and the buffers its Appends reuse. */
typedef struct fill_state {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    uint64_t total, done; /* Append calls */
    double bytes, t0_s;
    ab_progress_t pg;
    ab_buf_t payload;     /* ab_work_fill_payload of the slot being filled */
    ab_buf_t req;         /* the Append being sent */
} fill_state_t;

/* One Append of tokens [pos, pos + len) of sequences [first, first + count) on layer. Returns
 * 0, or -1 after a message (which ends the progress line first). */
static int append_once(fill_state_t *st, const ab_session_t *s, uint32_t layer, uint64_t first,
                       uint32_t count, uint32_t pos, uint32_t len) {
    if (ab_work_append(s->model, s->name, layer, first, count, pos, len, &st->payload,
                       &st->req) != 0) {
        ab_progress_end(&st->pg);
        fprintf(stderr, "attnd-bench: out of memory for an Append\n");
        return -1;
    }
    bench_call_cfg_t cfg = {.method = "/attnd.v1.Attention/Append", .token = s->token,
                            .timeout_ms = 120000};
    bench_reply_t r;
    int rc = bench_call_unary(st->ch, st->cq, &cfg, st->req.p, st->req.n, &r);
    st->bytes += (double)st->req.n;
    if (rc != 0 || r.status != GRPC_STATUS_OK) {
        ab_progress_end(&st->pg);
        fprintf(stderr, "attnd-bench: Append to %s (layer %u, sequences %llu..%llu, tokens "
                        "%u..%u): %s: %s\n", s->name, layer, (unsigned long long)first,
                (unsigned long long)(first + count - 1), pos, pos + len - 1,
                rc == 0 ? bench_status_name(r.status) : "client", r.details);
        rc = -1;
    }
    bench_reply_fini(&r);
    return rc;
}

/* Fills one slot of session s on every layer. Returns 0, or -1 after a message. */
static int fill_slot(fill_state_t *st, const ab_session_t *s, const fill_plan_t *p,
                     const ab_shape_t *shape, uint32_t layers) {
    if (ab_work_fill_payload(s->model, (size_t)p->step * p->group, &st->payload) != 0) {
        ab_progress_end(&st->pg);
        fprintf(stderr, "attnd-bench: out of memory for the Append payload\n");
        return -1;
    }
    for (uint32_t layer = 0; layer < layers; layer++)
        for (uint32_t g = 0; g < p->count; g += p->group)
            for (uint32_t pos = 0; pos < shape->ctx; pos += p->step) {
                uint32_t count = p->count - g < p->group ? p->count - g : p->group;
                uint32_t len = shape->ctx - pos < p->step ? shape->ctx - pos : p->step;
                if (ab_term_interrupted()) {
                    ab_progress_end(&st->pg);
                    fprintf(stderr, "attnd-bench: interrupted while filling caches\n");
                    return -1;
                }
                if (append_once(st, s, layer, p->first + g, count, pos, len) != 0)
                    return -1;
                if (++st->done < st->total && ab_progress_due(&st->pg))
                    ab_progress_show(&st->pg, "fill %s: Append %llu/%llu, %.0f MB in %.1f s",
                                     s->device, (unsigned long long)st->done,
                                     (unsigned long long)st->total, st->bytes / 1e6,
                                     ab_now_s() - st->t0_s);
            }
    return 0;
}

int ab_setup_fill(grpc_channel *ch, const ab_session_t *ss, uint32_t n, const ab_shape_t *shape,
                  uint32_t layers, bool decode, bool prefill) {
    if (shape->ctx == 0 || n == 0)
        return 0;
    fill_state_t st = {.ch = ch, .t0_s = ab_now_s()};
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t slot = 0; slot < ss[i].slots; slot++) {
            fill_plan_t p = plan_fill(ss[i].model, shape, slot, decode, prefill);
            st.total += fill_calls(&p, shape, layers);
        }
    ab_progress_init(&st.pg);
    st.cq = bench_cq_create();
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i++)
        for (uint32_t slot = 0; slot < ss[i].slots && rc == 0; slot++) {
            fill_plan_t p = plan_fill(ss[i].model, shape, slot, decode, prefill);
            rc = fill_slot(&st, &ss[i], &p, shape, layers);
        }
    if (rc == 0)
        ab_progress_show(&st.pg, "fill %s: Append %llu/%llu, %.0f MB in %.1f s: %u sessions, "
                                 "%u tokens cached per sequence", ss[0].device,
                         (unsigned long long)st.done, (unsigned long long)st.total,
                         st.bytes / 1e6, ab_now_s() - st.t0_s, n, shape->ctx);
    ab_progress_end(&st.pg);
    bench_cq_destroy(&st.cq);
    ab_buf_fini(&st.payload);
    ab_buf_fini(&st.req);
    return rc;
}

void ab_setup_close(grpc_channel *ch, ab_session_t *ss, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        if (!ss[i].created)
            continue;
        Attnd__V1__CloseSessionRequest rq = ATTND__V1__CLOSE_SESSION_REQUEST__INIT;
        rq.session = ss[i].name;
        bench_reply_t r;
        int rc = call_msg(ch, "/attnd.v1.Attention/CloseSession", ss[i].token, 60000, &rq.base,
                          &r);
        if (rc != 0 || r.status != GRPC_STATUS_OK)
            fprintf(stderr, "attnd-bench: warning: CloseSession %s: %s: %s\n", ss[i].name,
                    rc == 0 ? bench_status_name(r.status) : "client", r.details);
        else
            ss[i].created = false;
        bench_reply_fini(&r);
    }
}
