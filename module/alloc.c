#include "alloc.h"

#include <stdlib.h>
#include <string.h>

/* Per thread, so a test's injection never touches another loop's thread. */
static _Thread_local unsigned long fail_countdown;

static int should_fail(void)
{
    if (fail_countdown == 0)
        return 0;
    return --fail_countdown == 0;
}

void emx_alloc_fail_at(unsigned long n)
{
    fail_countdown = n;
}

void *emx_malloc(size_t size)
{
    return should_fail() ? NULL : malloc(size ? size : 1);
}

void *emx_calloc(size_t n, size_t size)
{
    return should_fail() ? NULL : calloc(n ? n : 1, size ? size : 1);
}

void *emx_realloc(void *p, size_t size)
{
    return should_fail() ? NULL : realloc(p, size ? size : 1);
}

char *emx_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = emx_malloc(len + 1);
    if (!d)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *emx_strdup(const char *s)
{
    return emx_strndup(s, strlen(s));
}

void emx_free(void *p)
{
    free(p);
}
