/* Tests of tenancy/ten_sched: shares by weight (in items for equal costs, in served cost for
 * unequal ones), FIFO within a flow, a late quiet flow served within one round, no credit banked
 * while idle, huge items served (without looping per round), zero costs, weight changes, flows
 * freed when idle, out-of-memory on push, and random operation sequences checked pop by pop
 * against a plain DRR model that walks every round.
 *
 * Allocation failures are injected by linking with -Wl,--wrap=malloc,--wrap=calloc
 * (tests/CMakeLists.txt).
 *
 * Tolerances: DRR gives each backlogged flow, at every point of a run, its weight's share of the
 * served cost to within one turn: |served_i / w_i - served_j / w_j| <= 2 quantum +
 * max_cost (1 / w_i + 1 / w_j). The checks use that bound (exact counts where the trace is
 * simple enough to predict). No check depends on time. */
#include "tests/test_util.h"

#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tenancy/ten_sched.h"

static uint64_t g_seed;

/* ---- allocation failures ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);

static bool g_alloc_fail_all; /* single thread */
static long g_alloc_failed;

static bool alloc_should_fail(void) {
    if (!g_alloc_fail_all)
        return false;
    g_alloc_failed++;
    return true;
}

void *__wrap_malloc(size_t n) { return alloc_should_fail() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) {
    return alloc_should_fail() ? NULL : __real_calloc(n, size);
}

/* Every allocation from now on fails (until fail_no_alloc). */
static void fail_every_alloc(void) {
    g_alloc_failed = 0;
    g_alloc_fail_all = true;
}

static void fail_no_alloc(void) { g_alloc_fail_all = false; }

/* ---- jobs ---- */

typedef struct job {
    uint64_t flow;
    uint64_t seq; /* push order within its flow */
    ten_sched_item_t item;
} job_t;

static job_t *job_of(ten_sched_item_t *it) {
    return (job_t *)(void *)((char *)it - offsetof(job_t, item));
}

static ten_sched_t *make(uint64_t quantum) {
    ten_sched_t *s = NULL;
    at_err_t e = ten_sched_create(quantum, &s);
    TU_CHECK(e == AT_OK && s != NULL, "create: %s", at_err_name(e));
    return s;
}

static void push(ten_sched_t *s, job_t *j, uint64_t flow, uint32_t weight, uint64_t cost,
                 uint64_t seq) {
    j->flow = flow;
    j->seq = seq;
    j->item.cost = cost;
    at_err_t e = ten_sched_push(s, flow, weight, &j->item);
    TU_CHECK(e == AT_OK, "push: %s", at_err_name(e));
}

static job_t *pop(ten_sched_t *s) {
    ten_sched_item_t *it = ten_sched_pop(s);
    TU_CHECK(it != NULL, "pop: nothing, %zu queued", ten_sched_len(s));
    TU_CHECK(it->next == NULL, "popped item still linked");
    return job_of(it);
}

/* ---- basics ---- */

static void test_ten_sched_create_rejects_a_zero_quantum(void **state) {
    (void)state;
    ten_sched_t *s = (ten_sched_t *)(uintptr_t)0x77;
    assert_int_equal(ten_sched_create(0, &s), AT_ERR_CONFIG);
    assert_ptr_equal(s, (ten_sched_t *)(uintptr_t)0x77);
    s = make(1);
    assert_null(ten_sched_pop(s));
    assert_int_equal(ten_sched_len(s), 0);
    assert_int_equal(ten_sched_flows(s), 0);
    ten_sched_destroy(&s);
    assert_null(s);
    ten_sched_destroy(&s);
    ten_sched_destroy(NULL);
}

static void test_ten_sched_equal_costs_split_1_to_3_by_weight(void **state) {
    (void)state;
    enum { N = 4000 };
    job_t *a = tu_xcalloc(N, sizeof *a), *b = tu_xcalloc(N, sizeof *b);
    ten_sched_t *s = make(10);
    for (uint64_t i = 0; i < N; i++) {
        push(s, &a[i], 1, 1, 10, i);
        push(s, &b[i], 2, 3, 10, i);
    }
    assert_int_equal(ten_sched_len(s), 2 * N);
    assert_int_equal(ten_sched_flows(s), 2);
    long na = 0, nb = 0;
    for (int k = 0; k < N; k++) {
        if (pop(s)->flow == 1)
            na++;
        else
            nb++;
        /* Within one round of 1:3 at every point: a turn is 1 item of a or 3 of b. */
        TU_CHECK(labs(3 * na - nb) <= 3, "after %d pops: %ld of a, %ld of b", k + 1, na, nb);
    }
    print_message("1:3 over %d pops: %ld and %ld\n", N, na, nb);
    assert_int_equal(na, N / 4); /* N pops are N / 4 whole rounds */
    assert_int_equal(nb, 3 * N / 4);
    ten_sched_destroy(&s);
    free(a);
    free(b);
}

static void test_ten_sched_served_cost_not_item_count_follows_weights(void **state) {
    (void)state;
    enum { FLOWS = 3, PER_FLOW = 20000, QUANTUM = 100, MAX_COST = 200 };
    const uint32_t w[FLOWS] = {1, 2, 5};
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_sub_seed(g_seed, 1));
    job_t *jobs = tu_xcalloc(FLOWS * PER_FLOW, sizeof *jobs);
    ten_sched_t *s = make(QUANTUM);
    /* Flow 0 has the cheapest items, flow 2 the dearest: counts alone would be far off. */
    const uint32_t lo[FLOWS] = {1, 50, 100}, hi[FLOWS] = {40, 150, MAX_COST};
    for (uint64_t i = 0; i < PER_FLOW; i++)
        for (int f = 0; f < FLOWS; f++)
            push(s, &jobs[f * PER_FLOW + i], (uint64_t)f, w[f], tu_rng_range(&rng, lo[f], hi[f]),
                 i);
    double served[FLOWS] = {0};
    long count[FLOWS] = {0};
    double total = 0;
    double worst = 0;
    while (total < 2e6) {
        job_t *j = pop(s);
        served[j->flow] += (double)j->item.cost;
        count[j->flow]++;
        total += (double)j->item.cost;
        for (int x = 0; x < FLOWS; x++)
            for (int y = x + 1; y < FLOWS; y++) {
                double gap = fabs(served[x] / w[x] - served[y] / w[y]);
                double bound = 2.0 * QUANTUM + MAX_COST * (1.0 / w[x] + 1.0 / w[y]);
                if (gap / bound > worst)
                    worst = gap / bound;
                TU_CHECK(gap <= bound, "flows %d and %d: %.0f/%u vs %.0f/%u, gap %.0f > %.0f", x,
                         y, served[x], w[x], served[y], w[y], gap, bound);
            }
    }
    for (int f = 0; f < FLOWS; f++) {
        TU_CHECK(count[f] < PER_FLOW, "flow %d ran dry: the test needs every flow backlogged", f);
        double share = served[f] / total, want = (double)w[f] / 8.0;
        print_message("flow %d weight %u: %ld items, cost share %.4f (ideal %.4f)\n", f, w[f],
                      count[f], share, want);
        TU_CHECK(fabs(share - want) <= 0.01 * want, "flow %d share %.4f, want %.4f +- 1%%", f,
                 share, want);
    }
    print_message("largest gap: %.2f of the DRR bound\n", worst);
    ten_sched_destroy(&s);
    free(jobs);
}

static void test_ten_sched_pops_each_flow_in_push_order(void **state) {
    (void)state;
    enum { FLOWS = 10, JOBS = 20000 };
    tu_rng_t rng;
    tu_rng_seed(&rng, tu_sub_seed(g_seed, 2));
    job_t *jobs = tu_xcalloc(JOBS, sizeof *jobs);
    uint64_t next_seq[FLOWS] = {0}, want_seq[FLOWS] = {0};
    ten_sched_t *s = make(64);
    size_t pushed = 0, popped = 0;
    while (popped < JOBS) {
        if (pushed < JOBS && (ten_sched_len(s) == 0 || tu_rng_chance(&rng, 11, 20))) {
            uint64_t f = tu_rng_below(&rng, FLOWS);
            push(s, &jobs[pushed++], f, tu_rng_range(&rng, 1, 8), tu_rng_range(&rng, 0, 300),
                 next_seq[f]++);
        } else {
            job_t *j = pop(s);
            TU_CHECK(j->seq == want_seq[j->flow], "flow %" PRIu64 ": popped #%" PRIu64
                     ", expected #%" PRIu64, j->flow, j->seq, want_seq[j->flow]);
            want_seq[j->flow]++;
            popped++;
        }
        TU_CHECK(ten_sched_len(s) == pushed - popped, "len %zu, want %zu", ten_sched_len(s),
                 pushed - popped);
    }
    assert_null(ten_sched_pop(s));
    assert_int_equal(ten_sched_flows(s), 0);
    for (int f = 0; f < FLOWS; f++)
        assert_int_equal(want_seq[f], next_seq[f]);
    ten_sched_destroy(&s);
    free(jobs);
}

/* ---- latency and credit ---- */

static void test_ten_sched_a_late_quiet_flow_is_served_within_one_round(void **state) {
    (void)state;
    enum { N = 1000 };
    job_t *flood = tu_xcalloc(N, sizeof *flood);
    job_t *flood2 = tu_xcalloc(N, sizeof *flood2);
    job_t quiet[2];
    /* One flooding flow, weight 4: a turn is 40 items of cost 10. */
    ten_sched_t *s = make(100);
    for (uint64_t i = 0; i < N; i++)
        push(s, &flood[i], 1, 4, 10, i);
    for (int k = 0; k < 3; k++)
        assert_int_equal(pop(s)->flow, 1);
    push(s, &quiet[0], 2, 1, 10, 0);
    /* The flood finishes the turn it is in (37 more items), then the quiet flow goes. */
    int pos = -1;
    for (int k = 0; k < 60 && pos < 0; k++)
        if (pop(s)->flow == 2)
            pos = k;
    assert_int_equal(pos, 37);
    ten_sched_destroy(&s);

    /* Two flooding flows: the quiet one waits for the current turn and the other flood's turn,
     * at most, however long their queues are. */
    s = make(100);
    for (uint64_t i = 0; i < N; i++) {
        push(s, &flood[i], 1, 4, 10, i);
        push(s, &flood2[i], 3, 2, 10, i);
    }
    for (int k = 0; k < 45; k++) /* flow 1's turn (40), then 5 of flow 3's turn (20) */
        pop(s);
    push(s, &quiet[1], 2, 1, 10, 0);
    pos = -1;
    for (int k = 0; k < 200 && pos < 0; k++)
        if (pop(s)->flow == 2)
            pos = k;
    /* flow 3 finishes its turn (15), flow 1 has a whole turn (40), then the quiet flow. */
    assert_int_equal(pos, 15 + 40);
    ten_sched_destroy(&s);
    free(flood);
    free(flood2);
}

static void test_ten_sched_an_idle_flow_does_not_bank_credit(void **state) {
    (void)state;
    enum { N = 100 };
    job_t *a = tu_xcalloc(N, sizeof *a);
    job_t b[2];
    ten_sched_t *s = make(100);
    for (uint64_t i = 0; i < N; i++)
        push(s, &a[i], 1, 1, 100, i);
    push(s, &b[0], 2, 1, 10, 0);
    assert_int_equal(pop(s)->flow, 1);
    /* b pops its one item with 90 of its turn's 100 left, and leaves: the 90 are dropped. */
    assert_int_equal(pop(s)->flow, 2);
    assert_int_equal(ten_sched_flows(s), 1);
    push(s, &b[1], 2, 1, 150, 1);
    /* With 90 banked b would pop right after one item of a (90 + 100 >= 150). Without, b needs
     * two turns of 100, so a pops twice first. */
    assert_int_equal(pop(s)->flow, 1);
    assert_int_equal(pop(s)->flow, 1);
    job_t *j = pop(s);
    assert_int_equal(j->flow, 2);
    assert_int_equal(j->seq, 1);
    ten_sched_destroy(&s);
    free(a);
}

static void test_ten_sched_serves_an_item_dearer_than_a_turn(void **state) {
    (void)state;
    enum { N = 1000 };
    job_t *a = tu_xcalloc(N, sizeof *a);
    job_t big;
    /* Quantum 1: a's items cost 1, b's one item 500. Each round a pops one item and b gains 1,
     * so b pops in round 500, after a's 500th item. */
    ten_sched_t *s = make(1);
    for (uint64_t i = 0; i < N; i++)
        push(s, &a[i], 1, 1, 1, i);
    push(s, &big, 2, 1, 500, 0);
    int pos = -1;
    for (int k = 0; k < N && pos < 0; k++)
        if (pop(s)->flow == 2)
            pos = k;
    assert_int_equal(pos, 500);
    ten_sched_destroy(&s);
    free(a);
}

static void test_ten_sched_serves_huge_items_without_looping_per_round(void **state) {
    (void)state;
    /* Costs 10^15 and 2^64-1 with quantum 1 would take that many rounds one at a time: these pops
     * finishing at all shows the idle rounds are skipped. Order: a's five cheap items go first
     * (b and c gain 1 per round), then b (fewer rounds needed than c), then c. */
    job_t a[5], b, c;
    ten_sched_t *s = make(1);
    push(s, &c, 3, 1, UINT64_MAX, 0);
    push(s, &b, 2, 1, 1000000000000000ull, 0);
    for (uint64_t i = 0; i < 5; i++)
        push(s, &a[i], 1, 1, 1, i);
    for (int k = 0; k < 5; k++)
        assert_int_equal(pop(s)->flow, 1);
    assert_int_equal(pop(s)->flow, 2);
    assert_int_equal(pop(s)->flow, 3);
    assert_null(ten_sched_pop(s));
    ten_sched_destroy(&s);

    /* quantum x weight past 2^64 saturates instead of wrapping to a small credit. */
    s = make(UINT64_MAX / 2);
    push(s, &c, 3, 1000, UINT64_MAX, 0);
    push(s, &b, 2, 1000, UINT64_MAX, 0);
    assert_int_equal(pop(s)->flow, 3);
    assert_int_equal(pop(s)->flow, 2);
    assert_null(ten_sched_pop(s));
    ten_sched_destroy(&s);
}

static void test_ten_sched_zero_costs_and_weights_count_as_one(void **state) {
    (void)state;
    job_t a[4], b[4];
    ten_sched_t *s = make(1);
    for (uint64_t i = 0; i < 4; i++) {
        push(s, &a[i], 1, 0, 0, i);
        push(s, &b[i], 2, 1, 0, i);
    }
    /* Cost 1 each, weight 1 each, quantum 1: one item per turn, alternating. Were cost 0 free,
     * a would pop all four first. */
    for (int k = 0; k < 8; k++)
        assert_int_equal(pop(s)->flow, (uint64_t)(k % 2 == 0 ? 1 : 2));
    ten_sched_destroy(&s);
}

static void test_ten_sched_weight_change_takes_effect_on_the_next_turn(void **state) {
    (void)state;
    enum { N = 200 };
    job_t *a = tu_xcalloc(N, sizeof *a), *b = tu_xcalloc(N + 1, sizeof *b);
    ten_sched_t *s = make(10);
    for (uint64_t i = 0; i < N; i++) {
        push(s, &a[i], 1, 1, 10, i);
        push(s, &b[i], 2, 1, 10, i);
    }
    long na = 0, nb = 0;
    for (int k = 0; k < 20; k++) {
        if (pop(s)->flow == 1)
            na++;
        else
            nb++;
    }
    assert_int_equal(na, 10);
    assert_int_equal(nb, 10);
    /* 20 pops were 10 whole rounds; b's weight is 3 from its next turn on. */
    push(s, &b[N], 2, 3, 10, N);
    na = nb = 0;
    for (int k = 0; k < 80; k++) {
        if (pop(s)->flow == 1)
            na++;
        else
            nb++;
    }
    assert_int_equal(na, 20);
    assert_int_equal(nb, 60);
    /* And back to 1 (a's weight stays 1 throughout). */
    job_t b2;
    push(s, &b2, 2, 1, 10, N + 1);
    na = nb = 0;
    for (int k = 0; k < 40; k++) {
        if (pop(s)->flow == 1)
            na++;
        else
            nb++;
    }
    assert_int_equal(na, 20);
    assert_int_equal(nb, 20);
    ten_sched_destroy(&s);
    free(a);
    free(b);
}

/* ---- memory ---- */

static void test_ten_sched_idle_flows_take_no_memory_and_push_fails_cleanly(void **state) {
    (void)state;
    enum { FLOWS = 100 };
    job_t jobs[FLOWS];
    ten_sched_t *s = make(5);
    for (uint64_t f = 0; f < FLOWS; f++)
        push(s, &jobs[f], 1000 + f, 1, 5, 0);
    assert_int_equal(ten_sched_flows(s), FLOWS);
    for (int k = 0; k < FLOWS; k++)
        pop(s);
    assert_int_equal(ten_sched_flows(s), 0); /* freed or kept spare; ASan checks the rest */

    /* Freed flows are reused before allocating: a few new flows need no memory. */
    job_t x[3];
    fail_every_alloc();
    for (uint64_t f = 0; f < 3; f++) {
        x[f].item.cost = 1;
        assert_int_equal(ten_sched_push(s, 5000 + f, 1, &x[f].item), AT_OK);
    }
    fail_no_alloc();
    for (int k = 0; k < 3; k++)
        pop(s);

    /* Once the spares are gone, a new flow fails with NOMEM and the item is untouched... */
    job_t many[40];
    for (uint64_t f = 0; f < 40; f++)
        push(s, &many[f], 7000 + f, 1, 1, 0);
    job_t y;
    ten_sched_item_t *sentinel = (ten_sched_item_t *)(uintptr_t)0x1234;
    y.item.next = sentinel;
    y.item.cost = 9;
    fail_every_alloc();
    assert_int_equal(ten_sched_push(s, 99999, 1, &y.item), AT_ERR_NOMEM);
    TU_CHECK(g_alloc_failed > 0, "the push did not allocate");
    assert_ptr_equal(y.item.next, sentinel);
    assert_int_equal(y.item.cost, 9);
    assert_int_equal(ten_sched_len(s), 40);
    assert_int_equal(ten_sched_flows(s), 40);
    /* ...while a flow that has items queued takes more without allocating. */
    job_t z;
    z.item.cost = 1;
    assert_int_equal(ten_sched_push(s, 7003, 1, &z.item), AT_OK);
    at_err_t e = AT_OK;
    ten_sched_t *s2 = NULL;
    e = ten_sched_create(1, &s2);
    fail_no_alloc();
    assert_int_equal(e, AT_ERR_NOMEM);
    assert_null(s2);
    int got_z = 0;
    for (int k = 0; k < 41; k++)
        got_z += pop(s) == &z;
    assert_int_equal(got_z, 1);
    assert_null(ten_sched_pop(s));

    /* Destroy leaves queued items alone (they are the caller's). */
    push(s, &y, 1, 1, 1, 0);
    ten_sched_destroy(&s);
    assert_int_equal(y.flow, 1);
}

/* ---- against a plain model ---- */

/* Textbook DRR, one round at a time, with arrays: what ten_sched must do pop for pop. */
#define M_FLOWS 6
#define M_JOBS 4000

typedef struct mflow {
    uint32_t weight;
    uint64_t deficit;
    size_t q[M_JOBS]; /* job indices, FIFO */
    size_t head, tail;
} mflow_t;

typedef struct model {
    uint64_t quantum;
    mflow_t f[M_FLOWS];
    int ring[M_FLOWS]; /* queued flows in turn order; ring[0]'s turn */
    int n_ring;
    bool started; /* ring[0] got its credit for this turn */
} model_t;

static void m_push(model_t *m, const job_t *jobs, size_t idx, int flow, uint32_t weight) {
    (void)jobs;
    mflow_t *f = &m->f[flow];
    if (f->head == f->tail) {
        f->deficit = 0;
        m->ring[m->n_ring++] = flow;
    }
    f->weight = weight ? weight : 1;
    f->q[f->tail++] = idx;
}

static size_t m_pop(model_t *m, const job_t *jobs) {
    for (;;) {
        mflow_t *f = &m->f[m->ring[0]];
        if (!m->started) {
            f->deficit += m->quantum * f->weight;
            m->started = true;
        }
        size_t idx = f->q[f->head];
        uint64_t cost = jobs[idx].item.cost ? jobs[idx].item.cost : 1;
        if (f->deficit >= cost) {
            f->deficit -= cost;
            f->head++;
            if (f->head == f->tail) {
                f->deficit = 0;
                memmove(&m->ring[0], &m->ring[1], (size_t)(m->n_ring - 1) * sizeof m->ring[0]);
                m->n_ring--;
                m->started = false;
            }
            return idx;
        }
        int first = m->ring[0];
        memmove(&m->ring[0], &m->ring[1], (size_t)(m->n_ring - 1) * sizeof m->ring[0]);
        m->ring[m->n_ring - 1] = first;
        m->started = false;
    }
}

static void test_ten_sched_random_ops_match_a_plain_drr_model(void **state) {
    (void)state;
    job_t *jobs = tu_xcalloc(M_JOBS, sizeof *jobs);
    model_t *m = tu_xcalloc(1, sizeof *m);
    for (uint64_t run = 0; run < 30; run++) {
        tu_rng_t rng;
        uint64_t seed = tu_sub_seed(g_seed, 100 + run);
        tu_rng_seed(&rng, seed);
        memset(m, 0, sizeof *m);
        memset(jobs, 0, M_JOBS * sizeof *jobs);
        m->quantum = tu_rng_range(&rng, 1, 40);
        /* Costs up to 30 turns' worth, so rounds without a pop are common. */
        uint32_t max_cost = (uint32_t)m->quantum * 30;
        ten_sched_t *s = make(m->quantum);
        size_t pushed = 0, popped = 0;
        for (int step = 0; popped < M_JOBS; step++) {
            tu_where_set("seed %" PRIu64 " run %" PRIu64 " step %d", seed, run, step);
            if (pushed < M_JOBS && (pushed == popped || tu_rng_chance(&rng, 1, 2))) {
                int f = (int)tu_rng_below(&rng, M_FLOWS);
                uint32_t w = tu_rng_range(&rng, 0, 4);
                uint64_t cost = tu_rng_chance(&rng, 1, 10) ? 0 : tu_rng_range(&rng, 1, max_cost);
                push(s, &jobs[pushed], (uint64_t)f, w, cost, pushed);
                m_push(m, jobs, pushed, f, w);
                pushed++;
            } else {
                size_t want = m_pop(m, jobs);
                job_t *j = pop(s);
                TU_CHECK(j == &jobs[want], "popped job %zu (flow %" PRIu64 "), model says %zu "
                         "(flow %" PRIu64 ")", (size_t)(j - jobs), j->flow, want,
                         jobs[want].flow);
                popped++;
            }
            TU_CHECK(ten_sched_flows(s) == (size_t)m->n_ring, "%zu flows, model %d",
                     ten_sched_flows(s), m->n_ring);
        }
        assert_null(ten_sched_pop(s));
        ten_sched_destroy(&s);
    }
    tu_where_set("seed %" PRIu64, g_seed);
    free(m);
    free(jobs);
}

int main(void) {
    g_seed = tu_base_seed("test_ten_sched");
    tu_where_set("seed %" PRIu64, g_seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ten_sched_create_rejects_a_zero_quantum),
        cmocka_unit_test(test_ten_sched_equal_costs_split_1_to_3_by_weight),
        cmocka_unit_test(test_ten_sched_served_cost_not_item_count_follows_weights),
        cmocka_unit_test(test_ten_sched_pops_each_flow_in_push_order),
        cmocka_unit_test(test_ten_sched_a_late_quiet_flow_is_served_within_one_round),
        cmocka_unit_test(test_ten_sched_an_idle_flow_does_not_bank_credit),
        cmocka_unit_test(test_ten_sched_serves_an_item_dearer_than_a_turn),
        cmocka_unit_test(test_ten_sched_serves_huge_items_without_looping_per_round),
        cmocka_unit_test(test_ten_sched_zero_costs_and_weights_count_as_one),
        cmocka_unit_test(test_ten_sched_weight_change_takes_effect_on_the_next_turn),
        cmocka_unit_test(test_ten_sched_idle_flows_take_no_memory_and_push_fails_cleanly),
        cmocka_unit_test(test_ten_sched_random_ops_match_a_plain_drr_model),
    };
    return cmocka_run_group_tests_name("ten_sched", tests, NULL, NULL);
}
