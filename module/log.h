/* Logging: one line per event, text or JSON, tagged with the subsystem or
 * plugin instance. A logger is owned by whoever created it (the process's
 * main loop); a NULL logger discards everything (tests). Never log secrets:
 * app keys and tokens are EMX_OPT_SECRET and are never formatted. */
#ifndef EMX_LOG_H
#define EMX_LOG_H

#include <stdarg.h>
#include <stdbool.h>

#include "edgemux/host.h"

enum emx_log_format {
    EMX_LOG_TEXT = 0,
    EMX_LOG_JSON = 1,
};

struct emx_log {
    enum emx_log_level level;
    enum emx_log_format format;
    int fd; /* where lines go; 2 by default */
    int worker; /* server.workers > 1: the worker loop's index, shown on each line; -1: none */
};

void emx_log_init(struct emx_log *log);
bool emx_log_enabled(const struct emx_log *log, enum emx_log_level level);
void emx_logf(const struct emx_log *log, enum emx_log_level level, const char *tag,
              const char *fmt, ...) __attribute__((format(printf, 4, 5)));
void emx_vlogf(const struct emx_log *log, enum emx_log_level level, const char *tag,
               const char *fmt, va_list ap) __attribute__((format(printf, 4, 0)));
/* "error", "warn", "info", "debug" → level; returns 0 or -EINVAL. */
int emx_log_level_parse(const char *s, enum emx_log_level *out);
int emx_log_format_parse(const char *s, enum emx_log_format *out);
const char *emx_log_level_name(enum emx_log_level level);

#endif
