/* edgemux plugin SDK: option tables.
 *
 * A plugin declares its options as a table; the core parses the YAML, binds
 * each option into the plugin's config struct (by offset), applies defaults,
 * and rejects unknown, duplicate, missing-required and malformed keys with
 * file:line before any plugin function runs.
 */
#ifndef EDGEMUX_OPTION_H
#define EDGEMUX_OPTION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum emx_opt_type {
    EMX_OPT_STRING = 1,  /* const char *; borrowed, valid until the instance is destroyed */
    EMX_OPT_BOOL,        /* bool */
    EMX_OPT_INT,         /* int64_t */
    EMX_OPT_SIZE,        /* uint64_t bytes: "64k", "64KiB", "1MiB", or a bare byte count */
    EMX_OPT_DURATION,    /* uint64_t milliseconds: "250ms", "30s", "5m", "1h" */
    EMX_OPT_STRING_LIST, /* struct emx_strlist; a YAML sequence of scalars, or one scalar */
    EMX_OPT_SECRET,      /* const char *; like STRING but never logged or shown */
};

struct emx_strlist {
    size_t count;
    const char *const *items; /* borrowed, like EMX_OPT_STRING */
};

struct emx_option {
    const char *name;       /* key in the plugin's YAML section */
    const char *alias;      /* another accepted key (e.g. the CX server property), or NULL */
    enum emx_opt_type type;
    const char *def;        /* default, written as it would be in YAML; NULL: none */
    bool required;          /* an error if neither the key nor a default is present */
    size_t offset;          /* offsetof(config struct, field) */
    const char *help;       /* one line, shown by --help and in docs */
};

/* Terminates an option table. */
#define EMX_OPTION_END {NULL, NULL, 0, NULL, false, 0, NULL}

#ifdef __cplusplus
}
#endif
#endif
