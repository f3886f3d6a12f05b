/* Fair choice of the next job for a saturated device: weighted deficit round robin (DRR) on the
 * caller's cost estimate (for example tokens x context length).
 *
 * Jobs are grouped in flows; a flow is the unit of fairness, normally one tenant
 * (ten_tenant_id()). While several flows have work queued, each gets a share of the served cost
 * in proportion to its weight, whatever the number or cost of the jobs it queues, and a flow that
 * floods the queue delays another flow's next job by at most one round: one turn of each flow
 * ahead of it in the ring, a turn serving at most quantum x weight plus less than one item's cost.
 * Within one flow, items pop in push order, so the calls of one session (a session belongs to one
 * tenant) run in arrival order.
 *
 * The rules, for the record:
 * - queued flows form a ring; on its turn a flow's deficit grows by quantum x weight, and it pops
 *   items while its deficit covers the cost of its head item (the cost is taken off the deficit);
 *   then the turn passes to the next flow, and the flow keeps what deficit is left;
 * - a flow whose queue empties leaves the ring and loses its deficit (no credit banked while
 *   idle); when it queues again it joins at the end of the ring with deficit 0;
 * - an item may cost more than one turn's quantum x weight: its flow then keeps its turns' deficit
 *   until it covers the cost, so every item is served after finitely many rounds. Rounds in which
 *   no flow can pop are skipped in one step (pop does not loop per round);
 * - cost 0 counts as 1, so that a flood of "free" items still takes turns;
 * - weight 0 counts as 1; a weight given with a push applies from the flow's next turn on;
 * - deficits saturate at UINT64_MAX instead of wrapping.
 *
 * Intrusive: the caller embeds a ten_sched_item_t in its job and gets the job back from the
 * popped item (container_of style); no allocation per item. A flow costs one small allocation
 * while it has items queued; a few freed flows are kept for reuse.
 *
 * Thread: not thread-safe. The device's dispatcher calls every function under its own lock. */
#ifndef AT_TENANCY_TEN_SCHED_H
#define AT_TENANCY_TEN_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "common/at_err.h"

typedef struct ten_sched_item {
    struct ten_sched_item *next; /* the scheduler's while the item is queued */
    uint64_t cost;               /* the caller's estimate, in any unit shared by all items */
} ten_sched_item_t;

typedef struct ten_sched ten_sched_t;

/* A scheduler whose flows get quantum x weight cost units per turn; quantum is best about the
 * cost of a typical item. AT_ERR_CONFIG for quantum 0, AT_ERR_NOMEM. On success *out is the
 * caller's, to free with ten_sched_destroy. */
at_err_t ten_sched_create(uint64_t quantum, ten_sched_t **out);

/* Frees the scheduler and its flows. Items still queued are not touched (the caller owns them
 * and must not expect them back). NULL and *s == NULL allowed; sets *s to NULL. */
void ten_sched_destroy(ten_sched_t **s);

/* Queues item at the end of flow flow_id, with the flow's weight now weight. The item (its
 * storage stays the caller's) must stay valid until it is popped; item->next is the scheduler's.
 * item->cost is read at each pop, so the caller may raise it between calls while the item waits
 * (a batch that grows: it is charged what it costs when it leaves). AT_ERR_NOMEM only when
 * flow_id has nothing queued and no memory for its flow can be found: nothing is queued then and
 * item is untouched. */
at_err_t ten_sched_push(ten_sched_t *s, uint64_t flow_id, uint32_t weight, ten_sched_item_t *item);

/* The next item by the rules above, removed from the scheduler and handed back to the caller;
 * NULL when nothing is queued. */
ten_sched_item_t *ten_sched_pop(ten_sched_t *s);

/* Items queued. */
size_t ten_sched_len(const ten_sched_t *s);

/* Flows with items queued (the others take no memory beyond a few kept for reuse). */
size_t ten_sched_flows(const ten_sched_t *s);

#endif
