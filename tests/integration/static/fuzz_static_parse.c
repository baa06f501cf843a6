/* Fuzz the static discovery plugin's instances-file parser: any bytes give
 * either a set whose every field holds the documented invariants, or errors
 * that each name the file and a line. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "static_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_error(void *arg, const char *msg)
{
    (void)arg;
    if (strncmp(msg, "f.yaml:", 7) != 0 || msg[7] < '1' || msg[7] > '9')
        abort(); /* an error without file:line */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct static_set set;
    if (static_parse("f.yaml", (const char *)data, size, &set, check_error, NULL) != 0)
        return 0;
    for (size_t i = 0; i < set.count; i++) {
        const struct static_instance *in = &set.items[i];
        if (!in->id || !in->host || in->port == 0 || strlen(in->id) > STATIC_ID_MAX + 10 ||
            (i > 0 && strcmp(set.items[i - 1].id, in->id) >= 0))
            abort(); /* unsorted or duplicate ids, or a field out of range */
    }
    if (!static_set_equal(&set, &set))
        abort();
    static_set_free(&set);
    return 0;
}
