#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void emx_log_init(struct emx_log *log)
{
    log->level = EMX_LOG_INFO;
    log->format = EMX_LOG_TEXT;
    log->fd = 2;
    log->worker = -1;
}

bool emx_log_enabled(const struct emx_log *log, enum emx_log_level level)
{
    return log && level <= log->level;
}

const char *emx_log_level_name(enum emx_log_level level)
{
    return (unsigned)level < 4 ? level_names[level] : "?";
}

int emx_log_level_parse(const char *s, enum emx_log_level *out)
{
    for (unsigned i = 0; i < 4; i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (enum emx_log_level)i;
            return 0;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        *out = EMX_LOG_WARN;
        return 0;
    }
    return -EINVAL;
}

int emx_log_format_parse(const char *s, enum emx_log_format *out)
{
    if (strcasecmp(s, "text") == 0)
        *out = EMX_LOG_TEXT;
    else if (strcasecmp(s, "json") == 0)
        *out = EMX_LOG_JSON;
    else
        return -EINVAL;
    return 0;
}

/* Append s to buf as a JSON string body (no quotes), bounded by cap. */
static size_t json_escape(char *buf, size_t cap, size_t pos, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (; *s && pos + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[pos++] = '\\';
            buf[pos++] = (char)c;
        } else if (c == '\n') {
            buf[pos++] = '\\';
            buf[pos++] = 'n';
        } else if (c < 0x20) {
            memcpy(buf + pos, "\\u00", 4);
            buf[pos + 4] = hex[c >> 4];
            buf[pos + 5] = hex[c & 15];
            pos += 6;
        } else {
            buf[pos++] = (char)c;
        }
    }
    return pos;
}

void emx_vlogf(const struct emx_log *log, enum emx_log_level level, const char *tag,
               const char *fmt, va_list ap)
{
    if (!emx_log_enabled(log, level))
        return;
    char msg[1024];
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    if (n < 0)
        return;
    /* Keep one event on one line whatever the message holds. */
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[64];
    snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (long)(ts.tv_nsec / 1000000) % 1000);

    char line[2048];
    size_t pos;
    if (log->format == EMX_LOG_JSON) {
        pos = (size_t)snprintf(line, sizeof(line), "{\"ts\":\"%s\",\"level\":\"%s\",\"tag\":\"",
                               when, emx_log_level_name(level));
        pos = json_escape(line, sizeof(line), pos, tag ? tag : "core");
        if (log->worker >= 0)
            pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\",\"worker\":%d,\"msg\":\"",
                                    log->worker);
        else
            pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\",\"msg\":\"");
        /* Leave room for the closing quote, brace and newline, so a long
         * message is cut inside the string and the line stays valid JSON. */
        pos = json_escape(line, sizeof(line) - 4, pos, msg);
        pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\"}\n");
    } else if (log->worker >= 0) {
        pos = (size_t)snprintf(line, sizeof(line), "%s %-5s [%s] w%d: %s\n", when,
                               emx_log_level_name(level), tag ? tag : "core", log->worker, msg);
    } else {
        pos = (size_t)snprintf(line, sizeof(line), "%s %-5s [%s] %s\n", when,
                               emx_log_level_name(level), tag ? tag : "core", msg);
    }
    if (pos >= sizeof(line)) {
        pos = sizeof(line) - 1;
        line[pos - 1] = '\n';
    }
    /* One write per line, so lines from several threads never interleave. */
    ssize_t w = write(log->fd, line, pos);
    (void)w;
}

void emx_logf(const struct emx_log *log, enum emx_log_level level, const char *tag,
              const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emx_vlogf(log, level, tag, fmt, ap);
    va_end(ap);
}
