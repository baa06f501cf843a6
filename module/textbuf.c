#include "textbuf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"

void emx_textbuf_init(struct emx_textbuf *b, size_t max)
{
    memset(b, 0, sizeof(*b));
    b->max = max ? max : EMX_TEXTBUF_DEFAULT_MAX;
}

void emx_textbuf_free(struct emx_textbuf *b)
{
    emx_free_ptr(&b->data);
    b->len = b->cap = 0;
}

/* Room for n more bytes plus the terminating NUL. */
static bool reserve(struct emx_textbuf *b, size_t n)
{
    if (b->failed)
        return false;
    if (n > b->max - b->len) {
        b->failed = true;
        return false;
    }
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
        cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
    char *d = emx_realloc(b->data, cap);
    if (!d) {
        b->failed = true;
        return false;
    }
    b->data = d;
    b->cap = cap;
    return true;
}

void emx_textbuf_append(struct emx_textbuf *b, const char *s, size_t n)
{
    if (!reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void emx_textbuf_puts(struct emx_textbuf *b, const char *s)
{
    emx_textbuf_append(b, s, strlen(s));
}

void emx_textbuf_printf(struct emx_textbuf *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = true;
        return;
    }
    if ((size_t)n < sizeof(small)) {
        emx_textbuf_append(b, small, (size_t)n);
        return;
    }
    if (!reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of a valid UTF-8 sequence starting at s (1..4), or 0. */
static size_t utf8_len(const unsigned char *s)
{
    if (s[0] < 0x80)
        return 1;
    size_t n;
    uint32_t min, cp;
    if ((s[0] & 0xE0) == 0xC0) {
        n = 2, min = 0x80, cp = s[0] & 0x1F;
    } else if ((s[0] & 0xF0) == 0xE0) {
        n = 3, min = 0x800, cp = s[0] & 0x0F;
    } else if ((s[0] & 0xF8) == 0xF0) {
        n = 4, min = 0x10000, cp = s[0] & 0x07;
    } else {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) /* also stops at the NUL */
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

void emx_textbuf_json_str(struct emx_textbuf *b, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    if (!s) {
        emx_textbuf_puts(b, "null");
        return;
    }
    emx_textbuf_append(b, "\"", 1);
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            emx_textbuf_append(b, esc, 2);
            p++;
        } else if (c < 0x20 || c == 0x7f) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            emx_textbuf_append(b, esc, 6);
            p++;
        } else {
            size_t n = utf8_len(p);
            if (n == 0) {
                emx_textbuf_append(b, "?", 1);
                p++;
            } else {
                emx_textbuf_append(b, (const char *)p, n);
                p += n;
            }
        }
    }
    emx_textbuf_append(b, "\"", 1);
}

void emx_textbuf_prom_label(struct emx_textbuf *b, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '\\' || *p == '"') {
            char esc[2] = {'\\', (char)*p};
            emx_textbuf_append(b, esc, 2);
        } else if (*p == '\n') {
            emx_textbuf_append(b, "\\n", 2);
        } else if (*p >= 0x20 && *p != 0x7f) {
            emx_textbuf_append(b, (const char *)p, 1);
        }
    }
}

void emx_textbuf_html(struct emx_textbuf *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    while (*p) {
        const char *ref = NULL;
        switch (*p) {
        case '&':
            ref = "&amp;";
            break;
        case '<':
            ref = "&lt;";
            break;
        case '>':
            ref = "&gt;";
            break;
        case '"':
            ref = "&quot;";
            break;
        case '\'':
            ref = "&#39;";
            break;
        default:
            break;
        }
        if (ref) {
            emx_textbuf_puts(b, ref);
            p++;
        } else if ((*p < 0x20 && *p != '\t' && *p != '\n') || *p == 0x7f) {
            p++;
        } else {
            size_t n = utf8_len(p);
            emx_textbuf_append(b, n ? (const char *)p : "?", n ? n : 1);
            p += n ? n : 1;
        }
    }
}
