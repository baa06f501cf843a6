/* Fuzz the config loader: YAML parsing, binding, checks and error messages,
 * then the size and duration parsers on the same bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct emx_errors errs = {0};
    struct emx_config *cfg = NULL;
    if (emx_config_load_string("fuzz.yaml", (const char *)data, size, &cfg, &errs) == 0) {
        /* A loaded config must survive the rest of the pipeline too. */
        emx_config_check_unused(cfg, &errs);
        emx_config_free(cfg);
    }
    emx_errors_free(&errs);

    /* The value parsers take C strings: give them one. */
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    uint64_t v;
    bool b;
    emx_parse_size(s, &v);
    emx_parse_duration(s, &v);
    emx_parse_bool(s, &b);
    free(s);
    return 0;
}
