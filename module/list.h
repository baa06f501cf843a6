/* An intrusive circular doubly-linked list: O(1) insert and unlink, no
 * allocation. Used for the FIFOs of timers and the per-pipe/per-edge lists. */
#ifndef EMX_LIST_H
#define EMX_LIST_H

#include <stdbool.h>
#include <stddef.h>

struct emx_list {
    struct emx_list *prev, *next;
};

static inline void emx_list_init(struct emx_list *l)
{
    l->prev = l->next = l;
}
static inline bool emx_list_empty(const struct emx_list *l)
{
    return l->next == l;
}
/* A node that is in no list points at itself (after init or unlink). */
static inline bool emx_list_linked(const struct emx_list *n)
{
    return n->next != n && n->next != NULL;
}
static inline void emx_list_push_back(struct emx_list *head, struct emx_list *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}
static inline void emx_list_unlink(struct emx_list *n)
{
    if (n->next && n->next != n) {
        n->prev->next = n->next;
        n->next->prev = n->prev;
    }
    n->prev = n->next = n;
}

#define emx_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#define emx_list_first(head, type, member)                                                   \
    (emx_list_empty(head) ? NULL : emx_container_of((head)->next, type, member))
/* Safe against unlinking the current node. */
#define emx_list_for_each_safe(pos, tmp, head)                                               \
    for ((pos) = (head)->next, (tmp) = (pos)->next; (pos) != (head);                         \
         (pos) = (tmp), (tmp) = (pos)->next)

#endif
