/* A host table for the discovery plugin integration tests: the built plugin
 * is loaded with dlopen and given a struct emx_host of the test's own that
 * records what the plugin told it (log lines, updates, failures). Helpers
 * bind the plugin's options by name, run the loop with bounded waits and
 * check that the loop can close at the end.
 *
 * Plugin-specific parts (parsers, post, fixtures) stay in each test: the
 * config chooses the parsers, and a test may replace any function of
 * th->host after th_open. */
#ifndef EMX_TEST_HOST_H
#define EMX_TEST_HOST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "edgemux/discovery.h"

#define TH_REASONS    64          /* failure reasons kept one by one */
#define TH_REASON_LEN 512         /* ... each at most this long */
#define TH_TYPE(t)    (1u << (t)) /* an option type in th_set's mask */

struct th_instance {
    char *id, *host, *metadata;
    uint16_t port;
    bool tls;
    uint32_t weight, priority;
};

/* What the plugin told the host. */
struct th_rec {
    int updates;
    int empty_updates;
    struct th_instance *set; /* set_max entries */
    size_t count;
    int failures;
    char reason[1024]; /* the last one */
    char reasons[TH_REASONS][TH_REASON_LEN];
    int nlogs;
    bool stopped;
    int calls_after_stop;
};

struct th_config {
    const char *plugin;  /* path of the .so */
    const char *name;    /* its descriptor's name; the tag is "discovery:<name>.0" */
    size_t set_max;      /* an update with more instances fails the test */
    size_t log_max;      /* log lines kept; later ones are dropped */
    size_t log_len;      /* room for one kept line ("<level> <text>") */
    size_t line_len;     /* the formatted text is cut to line_len - 1 */
    bool debug_disabled; /* log_enabled() says no to EMX_LOG_DEBUG */
    int (*parse_size)(const char *text, uint64_t *out);
    int (*parse_duration)(const char *text, uint64_t *out);
};

struct th_host {
    uv_loop_t loop;
    struct emx_host host; /* .core points to this struct */
    struct th_rec rec;
    void *dl;
    const struct emx_discovery_plugin *d;
    void *cfg; /* config_size bytes, zeroed by th_open */
    void *inst;
    void *user; /* the test's own fixture */
    struct th_config conf;
    char tag[64];
    char *logs; /* log_max lines of log_len */
    uv_timer_t deadline;
    bool expired;
};

typedef bool (*th_pred)(struct th_host *th, long arg);

/* The loop, the plugin (checked to be the discovery plugin `name`), the host
 * table and a zeroed config. */
void th_open(struct th_host *th, const struct th_config *conf, void *user);
/* Frees what th_open made and what was recorded; the loop must be closed. */
void th_close(struct th_host *th);

const char *th_log(const struct th_host *th, int i);
bool th_log_has(const struct th_host *th, const char *needle);
int th_log_count(const struct th_host *th, const char *needle);
void th_dump_logs(const struct th_host *th);
const struct th_instance *th_find(const struct th_host *th, const char *id);

/* Runs the loop until pred holds or ms pass; returns whether it held. */
bool th_wait_until(struct th_host *th, th_pred pred, long arg, uint64_t ms);
void th_run_for(struct th_host *th, uint64_t ms);
bool th_updates_over(struct th_host *th, long n);
bool th_failures_over(struct th_host *th, long n);
bool th_count_is(struct th_host *th, long n); /* after at least one update */
void th_wait_update(struct th_host *th, int before, uint64_t ms);
void th_wait_failure(struct th_host *th, int before, uint64_t ms);

/* The plugin's options, found by name and bound by offset. */
const struct emx_option *th_option(const struct th_host *th, const char *name);
void th_set(struct th_host *th, const char *name, unsigned types, const void *value, size_t size);
void th_set_str(struct th_host *th, const char *name, const char *value); /* STRING, SECRET */
void th_set_bool(struct th_host *th, const char *name, bool value);
void th_set_u64(struct th_host *th, const char *name, uint64_t value); /* DURATION, SIZE */

/* A number with an optional unit, one of units (NULL-terminated) scaling it
 * by the matching mul; the test parsers are built on it. */
int th_parse_unit(const char *text, uint64_t *out, const char *const *units, const uint64_t *mul);

void th_start(struct th_host *th); /* create and start with th->cfg */
/* stop (and destroy, if asked); later calls into the host are counted. */
void th_stop(struct th_host *th, bool destroy);
/* Runs the loop under an unreferenced deadline of ms until no handle is
 * left: the plugin let go of the loop in time. */
void th_await_idle(struct th_host *th, uint64_t ms);
/* Closes the deadline and the loop; nothing reached the host after stop. */
void th_close_loop(struct th_host *th);

#endif
