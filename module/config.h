/* Configuration: YAML (libyaml) read into a tree that keeps file and line,
 * bound into struct emx_config through option tables (the same mechanism
 * plugins use), with the ThingWorx Connection Server's property names as
 * aliases. Every error is reported as "file:line: key: what is wrong". */
#ifndef EMX_CONFIG_H
#define EMX_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "edgemux/option.h"

/* ---- errors ---- */

/* A list of messages, each "file:line: key: what is wrong". Start zeroed. */
struct emx_errors {
    size_t count;
    char **msgs;
    size_t dropped; /* messages not stored: out of memory, or past EMX_ERRORS_MAX */
};
#define EMX_ERRORS_MAX 200
/* key may be NULL ("file:line: what"); line <= 0 leaves the line out. */
void emx_errors_add(struct emx_errors *e, const char *file, int line, const char *key,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void emx_errors_free(struct emx_errors *e);

/* ---- the YAML tree ---- */

enum emx_node_kind {
    EMX_NODE_SCALAR = 1,
    EMX_NODE_MAP,
    EMX_NODE_SEQ,
};

struct emx_node {
    enum emx_node_kind kind;
    const char *file; /* shared by all nodes of one document */
    int line;         /* 1-based */
    char *value;      /* SCALAR: the text; MAP entries: NULL */
    char *key;        /* set when this node is a value in a MAP */
    int key_line;
    bool used;                 /* set by binding; leftovers are "unknown key" */
    bool is_null;              /* SCALAR: plain "", "~" or "null": binds as absent */
    struct emx_node *children; /* MAP: values (each with .key); SEQ: items */
    size_t count;
    const char **strs; /* owned: items of an EMX_OPT_STRING_LIST bound here */
    char *file_owned;  /* root only: the storage `file` points at */
};

/* Parse a YAML document; duplicate keys in one map are errors. Anchors and
 * aliases are refused (a config is data, not a graph). */
int emx_yaml_parse(const char *file, const char *text, size_t len, struct emx_node **out,
                   struct emx_errors *errs);
void emx_node_free(struct emx_node *n);
/* The value under `key` in a MAP node, or NULL. */
struct emx_node *emx_node_get(const struct emx_node *map, const char *key);

/* ---- values ---- */

/* "64k" "64K" "64KiB" "64kb" → 65536 (k/K/KiB/kB are all 1024: this is a
 * buffer size, not a disk); "1MiB"/"1m"; "1GiB"/"1g"; a bare integer is bytes. */
int emx_parse_size(const char *text, uint64_t *out);
/* "250ms" "30s" "5m" "1h" "1.5s" → milliseconds; "0" → 0; other bare
 * numbers are refused (ambiguous). */
int emx_parse_duration(const char *text, uint64_t *out);
int emx_parse_bool(const char *text, bool *out);

/* Bind the keys of `map` (may be NULL: defaults only) into `out` through
 * `table`. Keys are matched by name or alias. Keys named in `skip` (NULL-
 * terminated, may be NULL) are left alone. Marks bound nodes used. Strings
 * point into the tree (borrowed: valid while the tree lives), or at static
 * defaults. Returns the number of errors added. */
int emx_options_bind(const struct emx_option *table, const struct emx_node *map,
                     const char *section, const char *const *skip, void *out,
                     struct emx_errors *errs);
/* Apply top-level flat alias keys ("cx-server.x.y: v") that name an option of
 * `table`, and nothing else (no defaults). It cannot see the section, so use
 * emx_options_bind_section to catch an alias also set inside the section. */
int emx_options_bind_aliases(const struct emx_option *table, struct emx_node *root, void *out,
                             struct emx_errors *errs);
/* Both at once: keys of `map` (may be NULL), flat aliases of `root` (may be
 * NULL), defaults, required keys; the same option set twice is an error.
 * Returns the number of errors added. */
int emx_options_bind_section(const struct emx_option *table, const struct emx_node *map,
                             struct emx_node *root, const char *section, const char *const *skip,
                             void *out, struct emx_errors *errs);

/* ---- the core's settings ---- */

struct emx_config {
    struct emx_node *root; /* owns every string below */
    char *file;

    struct {
        const char *name; /* required; alias cx-server.thing.name */
        int64_t workers;
        const char *user;
    } server;
    struct {
        const char *dir;
    } plugins;
    struct {
        const char *level;
        const char *format;
    } log;
    struct {
        const char *address;
        int64_t port; /* alias cx-server.protocol.port */
        const char *path;
        const char *tls_cert;
        const char *tls_key;
        const char *tls_ca;
        bool tls_client_cert;
        uint64_t max_message_size;
        uint64_t max_preauth_message; /* before a successful AUTH */
        uint64_t auth_timeout;
        uint64_t idle_timeout;
        uint64_t request_timeout; /* platform → edge requests */
        int64_t max_pending;
        uint64_t max_queued;
        int64_t max_connections;
        bool deflate;
        struct emx_strlist trusted_proxies; /* IPs/CIDRs whose X-Forwarded-For is believed */
        int64_t max_connections_per_source;
        int64_t max_msgs_per_sec;
        int64_t max_things;
        uint64_t drain_spread;
        uint64_t max_bytes_in_flight; /* request bytes per device toward pipes; 0: off */
        uint64_t max_answer_backlog;  /* unread answer bytes per device; 0: off */
        uint64_t max_memory;          /* in-flight + unread bytes of all devices; 0: off */
        int64_t max_tunnels;          /* tunnel records at once; 0: off */
        int64_t max_tunnels_per_device;  /* per device connection; 0: off */
        int64_t max_tunnels_per_source;  /* tunnel sockets from one address; 0: off */
        uint64_t tunnel_connect_timeout; /* an unclaimed tunnel record lives this long */
        bool tunnels;                    /* relay tunnel sockets (else 404) */
        uint64_t tunnel_idle_timeout;    /* a relayed tunnel with no message this long closes */
        struct emx_strlist tunnel_headers_to_copy; /* empty: appKey, Cookie */
        uint64_t tunnel_drain_timeout;   /* SIGTERM: tunnels are closed after this */
    } edge;
    struct {
        const char *path;
        const char *app_key; /* secret */
        const char *app_key_file;
        int64_t pipes_per_instance;
        uint64_t high_watermark;
        uint64_t low_watermark;
        uint64_t ping_interval;
        uint64_t idle_read_timeout;
        uint64_t connect_timeout;
        uint64_t request_timeout; /* edge → platform requests */
        uint64_t stall_after;
        uint64_t multipart_pin_wait;
        uint64_t all_down_grace;
        uint64_t close_spread;
        uint64_t sndbuf;
        uint64_t reconnect_min;
        uint64_t reconnect_max;
        int64_t max_connecting; /* pipes between connect and open, all instances */
        const char *tls_ca;
        const char *tls_cert;
        const char *tls_key;
        bool tls_verify;
    } platform;
    struct {
        const char *plugin;
        uint64_t empty_confirm;
        int64_t max_instances; /* a larger set is refused; the last good one stays */
        struct emx_node *node; /* the section, for the plugin's own options */
    } discovery;
    struct {
        const char *plugin;
        struct emx_node *node;
    } transport;
    struct {
        const char *listen;
        const char *agent_listen;
        const char *token_file; /* bearer token of the POST actions; NULL: actions off */
    } admin;

    struct emx_config_priv *priv; /* which tables bound which maps, for "did you mean" */
};

/* Read and bind a config file (or text, for tests and fuzzing; at most
 * 1 MiB either way). Every error found is added to errs; returns 0 only when
 * there are none (-EINVAL, -ENOMEM, or -errno of reading the file), and then
 * *out is NULL. Plugin options are bound later by emx_config_bind_plugin,
 * once the plugin is loaded. Unknown keys of the core's own sections are
 * reported here; those of discovery:, transport: and top-level dotted keys
 * (plugin aliases) by emx_config_check_unused. */
int emx_config_load(const char *path, struct emx_config **out, struct emx_errors *errs);
int emx_config_load_string(const char *file, const char *text, size_t len, struct emx_config **out,
                           struct emx_errors *errs);
void emx_config_free(struct emx_config *cfg);

/* Bind a plugin's options from its section ("discovery" or "transport") and
 * from top-level aliases into `out` (config_size bytes, zeroed by caller).
 * The section's "plugin", "empty_confirm" and "max_instances" keys are the core's. `table`
 * must stay valid until emx_config_check_unused. Returns 0 or -EINVAL. */
int emx_config_bind_plugin(struct emx_config *cfg, const char *section,
                           const struct emx_option *table, void *out, struct emx_errors *errs);
/* After every binding: report each key nobody used as unknown (with "did
 * you mean" for a near miss). Returns 0 or -EINVAL. */
int emx_config_check_unused(struct emx_config *cfg, struct emx_errors *errs);

/* The core option tables, for --help and docs. */
extern const struct emx_option emx_core_options_server[];
extern const struct emx_option emx_core_options_edge[];
extern const struct emx_option emx_core_options_platform[];

#endif
