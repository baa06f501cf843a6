/* Allocation through one seam, so tests can make the Nth allocation fail. */
#ifndef EMX_ALLOC_H
#define EMX_ALLOC_H

#include <stddef.h>

void *emx_malloc(size_t size);
void *emx_calloc(size_t n, size_t size);
void *emx_realloc(void *p, size_t size);
char *emx_strdup(const char *s);
char *emx_strndup(const char *s, size_t n);
void emx_free(void *p);

/* Free *pp and set it to NULL. */
#define emx_free_ptr(pp)                                                                     \
    do {                                                                                     \
        emx_free(*(pp));                                                                     \
        *(pp) = NULL;                                                                        \
    } while (0)

/* Tests only: the calling thread's allocation number n (1-based) from now on
 * fails; 0 turns injection off. */
void emx_alloc_fail_at(unsigned long n);

#endif
