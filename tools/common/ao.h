/* AlwaysOn helpers the tools share on top of the core codec: InfoTable and
 * response builders, multipart chunking as the SDK does it, and reassembly. */
#ifndef EMX_TOOLS_AO_H
#define EMX_TOOLS_AO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "hmap.h"

/* An InfoTable with one BLOB field `field` and one row holding `data`.
 * Returns bytes written, or 0 when cap is too small. */
size_t ao_infotable_blob(uint8_t *buf, size_t cap, const char *field, const uint8_t *data,
                         size_t len);
/* Bytes ao_infotable_blob needs. */
size_t ao_infotable_blob_size(const char *field, size_t len);

/* One field of a one-row InfoTable: STRING (s) or INTEGER (i). */
struct ao_field {
    const char *name;
    uint8_t type; /* EMX_BT_STRING or EMX_BT_INTEGER */
    const char *s;
    int32_t i;
};
/* An InfoTable with these fields, in this order, and one row of their
 * values (the tunnel control services' params, TUNNELS.md §3.1, §5).
 * Returns bytes written, or 0 when cap is too small or a type is other. */
size_t ao_infotable_row(uint8_t *buf, size_t cap, const struct ao_field *f, size_t n);
size_t ao_infotable_row_size(const struct ao_field *f, size_t n);

/* Emit one AlwaysOn message as the SDK would: whole if header + body fit in
 * chunk_size, else as multipart chunks each no larger than chunk_size that
 * repeat the header, the multipart header and entityType · entityName.
 * `body` is the message body without the entity prefix for a response and
 * with it for a request (the prefix is then taken from the body).
 * `send` is called per message; returns 0, or -1 (message not sendable). */
typedef int (*ao_send_fn)(void *arg, const uint8_t *msg, size_t len);
int ao_emit(const struct emx_ao_header *h, uint8_t entity_type, const char *entity_name,
            const uint8_t *body, size_t body_len, size_t chunk_size, ao_send_fn send, void *arg);

/* Multipart reassembly, keyed by (endpointId, requestId, request/response). */
struct ao_reasm {
    struct hmap map;
    size_t max_total; /* refuse messages larger than this */
};
enum {
    AO_REASM_MORE = 0,
    AO_REASM_DONE = 1,
    AO_REASM_ETOOBIG = -100,
    AO_REASM_ESEQ = -101, /* chunk out of order, or count/prefix changed */
};
void ao_reasm_init(struct ao_reasm *r, size_t max_total);
void ao_reasm_free(struct ao_reasm *r);
/* Feed one multipart chunk (`msg` whole, header parsed into h). On DONE,
 * *out is a malloc'd non-multipart message (header + body; a request body
 * keeps its entity prefix once). Errors drop the partial message. */
int ao_reasm_feed(struct ao_reasm *r, const struct emx_ao_header *h, const uint8_t *msg, size_t len,
                  size_t body_off, uint8_t **out, size_t *out_len);
size_t ao_reasm_pending(const struct ao_reasm *r);

#endif
