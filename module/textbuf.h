/* A bounded, growable text buffer for admin answers (JSON, Prometheus text).
 * Appends never fail loudly: the first failure (out of memory, or the cap
 * reached) sets `failed` and every later append is ignored, so a writer
 * checks once at the end. The buffer is always NUL-terminated. */
#ifndef EMX_TEXTBUF_H
#define EMX_TEXTBUF_H

#include <stdbool.h>
#include <stddef.h>

struct emx_textbuf {
    char *data; /* owned; NULL until the first append */
    size_t len;
    size_t cap;
    size_t max; /* hard limit on len; 0: EMX_TEXTBUF_DEFAULT_MAX */
    bool failed;
};

#define EMX_TEXTBUF_DEFAULT_MAX (16u * 1024u * 1024u)

void emx_textbuf_init(struct emx_textbuf *b, size_t max);
void emx_textbuf_free(struct emx_textbuf *b);
void emx_textbuf_append(struct emx_textbuf *b, const char *s, size_t n);
void emx_textbuf_puts(struct emx_textbuf *b, const char *s);
void emx_textbuf_printf(struct emx_textbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* A JSON string with its quotes; control bytes escaped, invalid UTF-8 bytes
 * replaced by '?', so the output is always valid JSON. NULL writes null. */
void emx_textbuf_json_str(struct emx_textbuf *b, const char *s);
/* A Prometheus label value (without quotes): \ " and newline escaped,
 * control bytes dropped. */
void emx_textbuf_prom_label(struct emx_textbuf *b, const char *s);
/* Text for an HTML page, in an element or a double- or single-quoted
 * attribute: & < > " ' become character references, control bytes other
 * than tab and newline are dropped and invalid UTF-8 bytes become '?', so
 * nothing from outside can open markup. NULL writes nothing. */
void emx_textbuf_html(struct emx_textbuf *b, const char *s);

#endif
