/* The AlwaysOn codec: headers, bodies, strings and InfoTables of the binary
 * protocol of the ThingWorx Edge SDKs (docs/protocol.md).
 *
 * Parsers never allocate and never read past `len`: every malformed or
 * truncated input returns a negative EMX_AO_E* code. Parsed strings are views
 * into the caller's buffer. Builders write into a caller's buffer and return
 * the number of bytes written, or 0 when `cap` is too small or an argument is
 * out of range.
 */
#ifndef EMX_CODEC_H
#define EMX_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EMX_AO_VERSION 0x01
#define EMX_AO_HEADER_SIZE 15
#define EMX_AO_MULTIPART_SIZE 6
#define EMX_AO_AUTH_SESSION 0xFFFFFFFFu /* sessionId of an AUTH */
#define EMX_AO_INFOTABLE_MAX_DEPTH 16   /* nesting deeper than this is refused */

/* Offsets of the header fields, for in-place reads and rewrites. */
#define EMX_AO_OFF_VERSION 0
#define EMX_AO_OFF_CODE 1
#define EMX_AO_OFF_REQUEST_ID 2
#define EMX_AO_OFF_ENDPOINT_ID 6
#define EMX_AO_OFF_SESSION_ID 10
#define EMX_AO_OFF_MULTIPART 14

enum emx_ao_code {
    EMX_AO_GET = 0x01,
    EMX_AO_PUT = 0x02,
    EMX_AO_POST = 0x03,
    EMX_AO_DELETE = 0x04,
    EMX_AO_BIND = 0x0A,
    EMX_AO_UNBIND = 0x0B,
    EMX_AO_AUTH = 0x14,
    EMX_AO_KEEP_ALIVE = 0x1F,
    /* any code >= 0x40 is a response */
    EMX_AO_SUCCESS = 0x40,
    EMX_AO_BAD_REQUEST = 0x80,
    EMX_AO_UNAUTHORIZED = 0x81,
    EMX_AO_FORBIDDEN = 0x83,
    EMX_AO_NOT_FOUND = 0x84,
    EMX_AO_ENTITY_TOO_LARGE = 0x8D,
    EMX_AO_INTERNAL_ERROR = 0xA0,
    EMX_AO_NOT_IMPLEMENTED = 0xA1,
    EMX_AO_BAD_GATEWAY = 0xA2,
    EMX_AO_SERVICE_UNAVAILABLE = 0xA3,
    EMX_AO_GATEWAY_TIMEOUT = 0xA4,
};

/* ThingWorx base types as they appear on the wire. */
enum emx_ao_base_type {
    EMX_BT_NOTHING = 0xFF,
    EMX_BT_STRING = 0,
    EMX_BT_NUMBER = 1,
    EMX_BT_BOOLEAN = 2,
    EMX_BT_DATETIME = 3,
    EMX_BT_TIMESPAN = 4,
    EMX_BT_INFOTABLE = 5,
    EMX_BT_LOCATION = 6,
    EMX_BT_XML = 7,
    EMX_BT_JSON = 8,
    EMX_BT_QUERY = 9,
    EMX_BT_IMAGE = 10,
    EMX_BT_HYPERLINK = 11,
    EMX_BT_IMAGELINK = 12,
    EMX_BT_PASSWORD = 13,
    EMX_BT_HTML = 14,
    EMX_BT_TEXT = 15,
    EMX_BT_TAGS = 16,
    EMX_BT_SCHEDULE = 17,
    EMX_BT_VARIANT = 18,
    EMX_BT_GUID = 20,
    EMX_BT_BLOB = 21,
    EMX_BT_INTEGER = 22,
    EMX_BT_PROPERTYNAME = 50,
    EMX_BT_SERVICENAME = 51,
    EMX_BT_EVENTNAME = 52,
    /* 100..127: entity names (THINGNAME, THINGSHAPENAME, ...), all strings */
    EMX_BT_THINGNAME = 100,
    EMX_BT_ENTITYNAME_LAST = 127,
};

enum emx_ao_error {
    EMX_AO_OK = 0,
    EMX_AO_ETRUNC = -1,     /* input ends inside a field */
    EMX_AO_EVERSION = -2,   /* version byte is not 0x01 */
    EMX_AO_EMULTIPART = -3, /* multipart flag not 0/1, or chunk numbers inconsistent */
    EMX_AO_EBODY = -4,      /* a body field holds a value the format does not allow */
    EMX_AO_ETYPE = -5,      /* unknown base type in an InfoTable or primitive */
    EMX_AO_EDEPTH = -6,     /* InfoTables nested deeper than EMX_AO_INFOTABLE_MAX_DEPTH */
    EMX_AO_ETRAIL = -7,     /* bytes left over after a complete body */
};

struct emx_ao_header {
    uint8_t version;
    uint8_t code;
    uint32_t request_id;
    uint32_t endpoint_id;
    uint32_t session_id;
    bool multipart;
    uint16_t chunk_id;    /* 1-based; multipart only */
    uint16_t chunk_count; /* multipart only */
    uint16_t chunk_size;  /* multipart only */
};

/* A string view into the parsed buffer (not NUL-terminated). */
struct emx_ao_str {
    const uint8_t *ptr;
    uint32_t len;
};

/* A bounded cursor. */
struct emx_ao_reader {
    const uint8_t *buf;
    size_t len;
    size_t pos;
};

struct emx_ao_request {
    uint8_t entity_type;
    struct emx_ao_str entity_name;
    uint8_t characteristic;
    struct emx_ao_str name;
    uint8_t header_count;
    const uint8_t *headers; /* header_count × (name str, value str) */
    size_t headers_len;
    bool has_params;        /* marker 0x05 + InfoTable; 0xFF: none */
    const uint8_t *params;  /* the InfoTable, without the 0x05 marker */
    size_t params_len;
};

struct emx_ao_response {
    bool has_reason;
    struct emx_ao_str reason;
    bool has_content;       /* marker 0x05 + InfoTable; 0xFF: none */
    const uint8_t *content; /* the InfoTable, without the 0x05 marker */
    size_t content_len;
};

struct emx_ao_bind {
    bool has_gateway;
    struct emx_ao_str gateway_name;
    struct emx_ao_str gateway_type;
    uint16_t count;
    const uint8_t *names; /* count strings */
    size_t names_len;
};

/* ---- header ---- */

/* Parse the 15-byte header and, when multipart=1, the 6-byte multipart
 * header. On success *body_off is the offset of the body. */
int emx_ao_header_parse(const uint8_t *buf, size_t len, struct emx_ao_header *h, size_t *body_off);
/* Write a header (and multipart header if h->multipart). */
size_t emx_ao_header_write(uint8_t *buf, size_t cap, const struct emx_ao_header *h);

static inline uint32_t emx_ao_get_u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void emx_ao_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static inline uint16_t emx_ao_get_u16(const uint8_t *p)
{
    return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}
static inline void emx_ao_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline bool emx_ao_is_response(uint8_t code) { return code >= 0x40; }
/* A request code edgemux knows how to route. */
bool emx_ao_is_known_request(uint8_t code);
/* A code listed in the protocol (request or response). */
bool emx_ao_is_known_code(uint8_t code);
/* "GET", "SUCCESS", ...; "UNKNOWN" for others. Never NULL. */
const char *emx_ao_code_name(uint8_t code);
const char *emx_ao_strerror(int err);

/* ---- strings and primitives ---- */

int emx_ao_read_u8(struct emx_ao_reader *r, uint8_t *out);
int emx_ao_read_u16(struct emx_ao_reader *r, uint16_t *out);
int emx_ao_read_u32(struct emx_ao_reader *r, uint32_t *out);
/* A string: length < 128 in one byte; otherwise 4 bytes big-endian with the
 * top bit set (the remaining 31 bits are the length). */
int emx_ao_read_str(struct emx_ao_reader *r, struct emx_ao_str *out);
/* Bytes a string of `len` takes on the wire. */
size_t emx_ao_str_size(size_t len);
/* Write a string; returns bytes written or 0. */
size_t emx_ao_write_str(uint8_t *buf, size_t cap, const void *s, size_t len);
bool emx_ao_str_eq(struct emx_ao_str s, const char *cstr);

/* Skip one typed value of `base_type` (as stored in InfoTable rows, without
 * its type byte; VARIANT reads its own type byte). */
int emx_ao_skip_primitive(struct emx_ao_reader *r, uint8_t base_type, unsigned depth);
/* Skip one InfoTable: the shape (field definitions with aspects) then rows. */
int emx_ao_skip_infotable(struct emx_ao_reader *r, unsigned depth);

/* Visit the fields of an InfoTable's shape and its row values without
 * allocating. Any callback may be NULL; a callback returning non-zero stops
 * the walk and that value is returned. */
struct emx_ao_infotable_visitor {
    int (*field)(void *user, struct emx_ao_str name, struct emx_ao_str description,
                 uint8_t base_type, uint16_t aspect_count);
    int (*row_begin)(void *user, uint16_t field_count);
    /* `value` spans the value's bytes without the type byte. */
    int (*value)(void *user, uint8_t base_type, const uint8_t *value, size_t len);
    void *user;
};
int emx_ao_walk_infotable(const uint8_t *buf, size_t len, const struct emx_ao_infotable_visitor *v,
                          size_t *consumed);

/* ---- bodies ---- */

int emx_ao_request_parse(const uint8_t *body, size_t len, struct emx_ao_request *out);
int emx_ao_response_parse(const uint8_t *body, size_t len, struct emx_ao_response *out);
/* Prefix of every chunk of a multipart request: entityType · entityName.
 * *payload_off is the offset of the chunk's payload within body. */
int emx_ao_multipart_prefix_parse(const uint8_t *body, size_t len, uint8_t *entity_type,
                                  struct emx_ao_str *entity_name, size_t *payload_off);
/* AUTH body: claimCount · (name, value)*. Finds the claim `name`. Returns
 * EMX_AO_OK and sets *value, EMX_AO_EBODY when the body is well-formed but
 * lacks the claim, or another error when malformed. */
int emx_ao_auth_find_claim(const uint8_t *body, size_t len, const char *name,
                           struct emx_ao_str *value);
/* Validate an AUTH body and count its claims. */
int emx_ao_auth_parse(const uint8_t *body, size_t len, uint8_t *claim_count);
int emx_ao_bind_parse(const uint8_t *body, size_t len, struct emx_ao_bind *out);
/* Iterate the names of a parsed BIND/UNBIND: *cursor starts at 0; returns
 * EMX_AO_OK per name, 1 at the end. */
int emx_ao_bind_next_name(const struct emx_ao_bind *b, size_t *cursor, struct emx_ao_str *out);

/* ---- Remote Access tunnel control services (TUNNELS.md §3.1, §5) ---- */

#define EMX_AO_CHARACTERISTIC_SERVICES 0x02

enum emx_ao_tunnel_service {
    EMX_AO_TUNNEL_NONE = 0,     /* not a tunnel control service */
    EMX_AO_TUNNEL_START,        /* StartTunnel: platform → device */
    EMX_AO_TUNNEL_COMPLETE,     /* CompleteTunnel: platform → device */
    EMX_AO_TUNNEL_COMMAND_TO,   /* TunnelCommandToEdge: platform → device */
    EMX_AO_TUNNEL_COMMAND_FROM, /* TunnelCommandFromEdge: device → platform */
};

/* The fields of a tunnel control service, read from the first row of its
 * params InfoTable by field name (first definition of a name wins). A field
 * that is absent, or whose value has another base type than the SDK reads
 * (a string type for strings, INTEGER for numbers), is left unset: a
 * string with ptr NULL, a number with its has_ flag false. Strings are
 * views into the body. */
struct emx_ao_tunnel_msg {
    enum emx_ao_tunnel_service service;
    uint8_t entity_type;
    struct emx_ao_str thing; /* the entity name */
    struct emx_ao_str tid;
    struct emx_ao_str type;       /* StartTunnel: "tcp" or "file" */
    struct emx_ao_str connection; /* StartTunnel, CompleteTunnel: JSON text */
    struct emx_ao_str command;    /* TunnelCommandToEdge/FromEdge */
    struct emx_ao_str peer_name;  /* CompleteTunnel */
    bool has_chunksize, has_idle_timeout, has_read_timeout;
    int32_t chunksize, idle_timeout, read_timeout;
    /* Where tid's value lies, encoded (its length prefix and bytes): what
     * emx_ao_tunnel_with_tid replaces. NULL when tid is unset. */
    const uint8_t *tid_value;
    size_t tid_value_len;
};

/* Is this request body (everything after the header) a tunnel control
 * service, i.e. characteristic Services (0x02) and one of the four service
 * names, on any entity? Returns EMX_AO_OK with out->service NONE for a body
 * that is not one (only its prefix is read then), EMX_AO_OK with the fields
 * for one whose body parses whole, or a negative EMX_AO_E* code for a
 * tunnel service whose body is malformed or cut short (a first chunk of a
 * multipart message is cut short). Never reads past `len`. */
int emx_ao_tunnel_parse(const uint8_t *body, size_t len, struct emx_ao_tunnel_msg *out);
/* "StartTunnel", ...; "" for NONE. Never NULL. */
const char *emx_ao_tunnel_service_name(enum emx_ao_tunnel_service s);
/* The local target of a StartTunnel's `connection` JSON: the string value
 * of "host" and the integer value of "port" at the object's top level.
 * Returns EMX_AO_OK when both are found (port 0..65535), EMX_AO_EBODY
 * otherwise. A scanner, not a JSON validator; never reads past the view. */
int emx_ao_tunnel_target(struct emx_ao_str connection, struct emx_ao_str *host, uint16_t *port);
/* Copy the single-part message `msg` (header and body; `m` parsed from its
 * body) into `out` with the value of its tid field replaced by the string
 * `tid`. Every other byte is unchanged. Returns the new length, or 0 when
 * `m` has no tid, the tid does not lie inside `msg`, or `cap` is short. */
size_t emx_ao_tunnel_with_tid(const uint8_t *msg, size_t len, const struct emx_ao_tunnel_msg *m,
                              const void *tid, size_t tid_len, uint8_t *out, size_t cap);

/* ---- builders ---- */

/* A response with no content: header · reasonMarker [reason] · 0xFF.
 * reason NULL: marker 0x00. */
size_t emx_ao_build_response(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                             uint32_t endpoint_id, uint32_t session_id, const char *reason);
/* Upper bound of emx_ao_build_response's output for a reason of `reason_len`. */
size_t emx_ao_response_size(size_t reason_len);
/* An AUTH with one claim appKey (sessionId 0xFFFFFFFF). */
size_t emx_ao_build_auth(uint8_t *buf, size_t cap, uint32_t request_id, uint32_t endpoint_id,
                         const char *app_key, size_t key_len);
/* A BIND or UNBIND without gateway for `count` names. */
size_t emx_ao_build_bind(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                         uint32_t endpoint_id, uint32_t session_id,
                         const struct emx_ao_str *names, size_t count);
/* A request: header (not multipart) · entityType · entityName · characteristic
 * · name · headerCount 0 · params (0x05 + `params` InfoTable bytes, or 0xFF
 * when params is NULL). */
size_t emx_ao_build_request(uint8_t *buf, size_t cap, uint8_t code, uint32_t request_id,
                            uint32_t endpoint_id, uint32_t session_id, uint8_t entity_type,
                            const char *entity_name, uint8_t characteristic, const char *name,
                            const uint8_t *params, size_t params_len);

#endif
