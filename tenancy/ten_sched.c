/* Weighted deficit round robin over flows of intrusive items (see ten_sched.h).
 *
 * Thread model: none of its own. One dispatcher calls in, holding its own lock; nothing here
 * blocks or allocates per item.
 *
 * The ring of queued flows is a singly linked list from first (the flow whose turn it is) to last;
 * `turn` says whether first has had its deficit topped up for the current turn. A push looks the
 * flow up by a linear walk of the ring: a device serves tens of tenants, and a walk of tens of
 * nodes is small next to a job. Flows that empty are unlinked and kept in a short spare list, so
 * a steady mix of tenants does not call malloc per job. */
#include "tenancy/ten_sched.h"

#include <stdbool.h>
#include <stdlib.h>

#include "common/at_base.h"

#define SPARE_FLOWS_MAX 16u

typedef struct flow {
    struct flow *next;      /* next in the ring, or in the spare list */
    uint64_t id;
    uint32_t weight;        /* >= 1; the latest push's */
    uint64_t deficit;       /* cost units the flow may still spend; 0 while not queued */
    ten_sched_item_t *head; /* oldest queued item; never NULL while the flow is in the ring */
    ten_sched_item_t *tail;
} flow_t;

struct ten_sched {
    uint64_t quantum;       /* cost units per turn and unit of weight, >= 1 */
    flow_t *first;          /* the ring; NULL when nothing is queued */
    flow_t *last;
    bool turn;              /* first's deficit was topped up for its current turn */
    size_t n_flows;         /* flows in the ring */
    size_t n_items;         /* items queued */
    flow_t *spare;          /* unlinked flows kept for reuse */
    size_t n_spare;
};

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

static uint64_t sat_mul(uint64_t a, uint64_t b) {
    return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

static uint64_t item_cost(const ten_sched_item_t *it) { return it->cost != 0 ? it->cost : 1; }

static uint64_t turn_credit(const ten_sched_t *s, const flow_t *f) {
    return sat_mul(s->quantum, f->weight);
}

at_err_t ten_sched_create(uint64_t quantum, ten_sched_t **out) {
    if (quantum == 0)
        return AT_ERR_CONFIG;
    ten_sched_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return AT_ERR_NOMEM;
    s->quantum = quantum;
    *out = s;
    return AT_OK;
}

static void free_list(flow_t *f) {
    while (f != NULL) {
        flow_t *next = f->next;
        free(f);
        f = next;
    }
}

void ten_sched_destroy(ten_sched_t **sp) {
    if (sp == NULL || *sp == NULL)
        return;
    ten_sched_t *s = *sp;
    free_list(s->first);
    free_list(s->spare);
    free(s);
    *sp = NULL;
}

static flow_t *find_flow(const ten_sched_t *s, uint64_t id) {
    for (flow_t *f = s->first; f != NULL; f = f->next)
        if (f->id == id)
            return f;
    return NULL;
}

static flow_t *flow_new(ten_sched_t *s) {
    flow_t *f = s->spare;
    if (f != NULL) {
        s->spare = f->next;
        s->n_spare--;
    } else if ((f = malloc(sizeof *f)) == NULL)
        return NULL;
    return f;
}

static void ring_append(ten_sched_t *s, flow_t *f) {
    f->next = NULL;
    if (s->last != NULL)
        s->last->next = f;
    else
        s->first = f;
    s->last = f;
}

at_err_t ten_sched_push(ten_sched_t *s, uint64_t flow_id, uint32_t weight, ten_sched_item_t *item) {
    flow_t *f = find_flow(s, flow_id);
    if (f == NULL) {
        if ((f = flow_new(s)) == NULL)
            return AT_ERR_NOMEM;
        f->id = flow_id;
        f->deficit = 0;
        f->head = f->tail = NULL;
        ring_append(s, f);
        s->n_flows++;
    }
    f->weight = weight != 0 ? weight : 1;
    item->next = NULL;
    if (f->tail != NULL)
        f->tail->next = item;
    else
        f->head = item;
    f->tail = item;
    s->n_items++;
    return AT_OK;
}

/* The first flow's turn is over: it goes to the end of the ring, keeping its deficit. */
static void end_turn(ten_sched_t *s) {
    flow_t *f = s->first;
    s->turn = false;
    if (f == s->last)
        return;
    s->first = f->next;
    ring_append(s, f);
}

/* The first flow emptied: it leaves the ring and forgets its deficit. */
static void retire_first(ten_sched_t *s) {
    flow_t *f = s->first;
    s->first = f->next;
    if (s->first == NULL)
        s->last = NULL;
    s->turn = false;
    s->n_flows--;
    f->deficit = 0;
    if (s->n_spare < SPARE_FLOWS_MAX) {
        f->next = s->spare;
        s->spare = f;
        s->n_spare++;
    } else
        free(f);
}

/* Every flow has just had a turn without popping: each has deficit < cost of its head. Plain DRR
 * would go round and round until some flow's deficit covers its head; k, the fewest turns any flow
 * still needs, tells how many. Giving every flow the credit of k - 1 turns at once leaves each
 * exactly where those rounds would (none of them could have popped: each needs at least k), and
 * the next round pops, in the same flow plain DRR would pick. */
static void skip_idle_rounds(ten_sched_t *s) {
    uint64_t k = UINT64_MAX;
    for (const flow_t *f = s->first; f != NULL; f = f->next) {
        uint64_t need = item_cost(f->head) - f->deficit; /* > 0 */
        uint64_t per = turn_credit(s, f);
        uint64_t turns = need / per + (need % per != 0);
        if (turns < k)
            k = turns;
    }
    AT_ASSERT(k >= 1);
    /* (k - 1) x per < need for every flow, so neither the product nor the sum overflows. */
    for (flow_t *f = s->first; f != NULL; f = f->next)
        f->deficit += (k - 1) * turn_credit(s, f);
}

ten_sched_item_t *ten_sched_pop(ten_sched_t *s) {
    if (s->n_items == 0)
        return NULL;
    size_t turns_without_pop = 0;
    for (;;) {
        flow_t *f = s->first;
        if (!s->turn) {
            f->deficit = sat_add(f->deficit, turn_credit(s, f));
            s->turn = true;
        }
        uint64_t cost = item_cost(f->head);
        if (f->deficit >= cost) {
            ten_sched_item_t *it = f->head;
            f->deficit -= cost;
            f->head = it->next;
            if (f->head == NULL) {
                f->tail = NULL;
                retire_first(s);
            }
            s->n_items--;
            it->next = NULL;
            return it;
        }
        end_turn(s);
        if (++turns_without_pop == s->n_flows) {
            skip_idle_rounds(s);
            turns_without_pop = 0;
        }
    }
}

size_t ten_sched_len(const ten_sched_t *s) { return s->n_items; }

size_t ten_sched_flows(const ten_sched_t *s) { return s->n_flows; }
