/* emx-discovery-static: platform instances listed in a YAML file.
 *
 * The file's directory is watched (editors and config managers replace the
 * file by rename, which would orphan a watch on the file itself); events for
 * the file's name are debounced, then the file is read and parsed on libuv's
 * thread pool so a slow disk never stalls the loop. A valid file that differs
 * from the last good set is reported whole; an invalid or missing one is
 * logged with file:line and reported as a failure, so the core keeps the last
 * good set. A slow periodic re-read covers lost events.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "edgemux/discovery.h"
#include "instset.h"
#include "static_parse.h"

/* Error lines of one read kept for the log; the rest are only counted. */
#define ERRORS_KEPT 16
/* Larger files are refused: the whole file is held in memory twice. */
#define MAX_SIZE_LIMIT (64u * 1024 * 1024)

struct static_config {
    const char *file;
    uint64_t reload_delay_ms;
    uint64_t poll_interval_ms;
    uint64_t max_size;
};

struct static_disc;

/* One read of the file on the thread pool. Owned by the loop side, except
 * that work_cb fills the result fields while the job is in flight. */
struct job {
    uv_work_t req;
    struct static_disc *sd;
    char *path;
    size_t max_size;
    int rc;      /* 0, or a negative errno of the read, or of the parse */
    bool parsed; /* the file was read; rc is the parser's */
    struct static_set set;
    char *errors[ERRORS_KEPT];
    size_t nerrors; /* all the parser reported, kept or not */
};

struct static_disc {
    const struct emx_host *host; /* borrowed until destroy */
    char *path, *dir, *base;
    uint64_t reload_delay_ms;
    uint64_t poll_ms;
    size_t max_size;

    uv_fs_event_t watch;
    uv_timer_t debounce;
    uv_timer_t poll;
    unsigned open_handles; /* initialised and not yet closed */
    bool watching;
    int watch_error; /* last uv error of arming the watch, logged once */

    struct job *job; /* the read in flight, or NULL */
    bool again;      /* another read was asked for while one was in flight */
    bool stopped;
    bool destroyed;

    struct emx_instset good; /* last set reported */
    bool have_good;
    char *last_failure; /* reason last reported, or NULL after a good read */
};

static void maybe_free(struct static_disc *sd);
static void request_read(struct static_disc *sd);

static void job_free(struct job *job)
{
    for (size_t i = 0; i < job->nerrors && i < ERRORS_KEPT; i++)
        free(job->errors[i]);
    static_set_free(&job->set);
    free(job->path);
    free(job);
}

/* Runs on the thread pool: no host calls here. */
static void collect_error(void *arg, const char *msg)
{
    struct job *job = arg;
    if (job->nerrors < ERRORS_KEPT) {
        size_t len = strlen(msg);
        char *copy = malloc(len + 1);
        if (copy)
            memcpy(copy, msg, len + 1);
        job->errors[job->nerrors] = copy; /* NULL: logged as "out of memory" */
    }
    job->nerrors++;
}

static void work_cb(uv_work_t *req)
{
    struct job *job = req->data;
    char *text = NULL;
    size_t len = 0;

    job->rc = static_read_file(job->path, job->max_size, &text, &len);
    if (job->rc < 0)
        return;
    job->parsed = true;
    job->rc = static_parse(job->path, text, len, &job->set, collect_error, job);
    free(text);
}

/* The parser's set in the shape the core takes; the plugin decides nothing
 * here, every field is the file's. 0 or -ENOMEM. */
static int to_instset(const struct static_set *set, struct emx_instset *out)
{
    for (size_t i = 0; i < set->count; i++) {
        const struct static_instance *in = &set->items[i];
        if (emx_instset_add(out, in->id, in->host, in->port, in->tls, in->weight, in->priority,
                            in->metadata) < 0) {
            emx_instset_free(out);
            return -ENOMEM;
        }
    }
    return 0;
}

static void report_good(struct static_disc *sd, struct job *job)
{
    const struct emx_host *h = sd->host;
    struct emx_instset set = {NULL, 0, 0};

    if (to_instset(&job->set, &set) < 0) {
        /* Nothing changes on our side, so the next event or poll retries. */
        h->log(h, EMX_LOG_ERROR, "%s: out of memory reporting %zu instances", sd->path,
               job->set.count);
        return;
    }
    if (sd->have_good && emx_instset_equal(&sd->good, &set) && !sd->last_failure) {
        h->log(h, EMX_LOG_DEBUG, "%s: unchanged", sd->path);
        emx_instset_free(&set);
        return;
    }
    if (sd->last_failure)
        h->log(h, EMX_LOG_INFO, "%s: valid again", sd->path);
    emx_instset_log_changes(h, sd->path, NULL, sd->have_good ? &sd->good : NULL, &set);
    emx_instset_report(h, &set);

    emx_instset_free(&sd->good);
    sd->good = set;
    sd->have_good = true;
    free(sd->last_failure);
    sd->last_failure = NULL;
}

static void report_failure(struct static_disc *sd, struct job *job)
{
    const struct emx_host *h = sd->host;
    char reason[640];

    if (job->parsed && job->rc == -EINVAL && job->nerrors > 0) {
        const char *first = job->errors[0] ? job->errors[0] : "out of memory";
        if (job->nerrors > 1)
            snprintf(reason, sizeof(reason), "%s (and %zu more error%s)", first, job->nerrors - 1,
                     job->nerrors == 2 ? "" : "s");
        else
            snprintf(reason, sizeof(reason), "%s", first);
    } else if (job->rc == -EFBIG) {
        snprintf(reason, sizeof(reason), "%s: larger than max_size (%zu bytes)", sd->path,
                 sd->max_size);
    } else if (!job->parsed && job->rc == -EINVAL) {
        snprintf(reason, sizeof(reason), "%s: not a regular file", sd->path);
    } else {
        snprintf(reason, sizeof(reason), "%s: cannot read: %s", sd->path, uv_strerror(job->rc));
    }

    /* The same failure on every poll is one outage, not many. */
    if (sd->last_failure && strcmp(sd->last_failure, reason) == 0) {
        h->log(h, EMX_LOG_DEBUG, "still failing: %s", reason);
        return;
    }
    if (job->parsed && job->rc == -EINVAL) {
        for (size_t i = 0; i < job->nerrors && i < ERRORS_KEPT; i++)
            h->log(h, EMX_LOG_ERROR, "%s", job->errors[i] ? job->errors[i] : "out of memory");
        if (job->nerrors > ERRORS_KEPT)
            h->log(h, EMX_LOG_ERROR, "%s: %zu more errors not shown", sd->path,
                   job->nerrors - ERRORS_KEPT);
    } else {
        h->log(h, EMX_LOG_ERROR, "%s", reason);
    }
    h->log(h, EMX_LOG_WARN, "%s: keeping the last good set (%zu instance%s)", sd->path,
           sd->good.count, sd->good.count == 1 ? "" : "s");

    size_t len = strlen(reason);
    char *copy = malloc(len + 1);
    if (copy)
        memcpy(copy, reason, len + 1);
    free(sd->last_failure);
    sd->last_failure = copy;
    h->discovery_failed(h, reason);
}

static void after_work_cb(uv_work_t *req, int status)
{
    struct job *job = req->data;
    struct static_disc *sd = job->sd;

    sd->job = NULL;
    if (sd->stopped || status < 0) {
        job_free(job);
        maybe_free(sd);
        return;
    }
    if (job->rc == 0)
        report_good(sd, job);
    else if (job->rc == -ENOMEM && job->parsed)
        sd->host->log(sd->host, EMX_LOG_ERROR, "%s: out of memory parsing", sd->path);
    else
        report_failure(sd, job);
    job_free(job);
    if (sd->again) {
        sd->again = false;
        request_read(sd);
    }
}

static void request_read(struct static_disc *sd)
{
    if (sd->stopped)
        return;
    if (sd->job) {
        sd->again = true;
        return;
    }
    struct job *job = calloc(1, sizeof(*job));
    size_t len = strlen(sd->path);
    if (!job || !(job->path = malloc(len + 1))) {
        free(job);
        sd->host->log(sd->host, EMX_LOG_ERROR, "%s: out of memory starting a read", sd->path);
        return;
    }
    memcpy(job->path, sd->path, len + 1);
    job->sd = sd;
    job->max_size = sd->max_size;
    job->req.data = job;
    int rc = uv_queue_work(sd->host->loop, &job->req, work_cb, after_work_cb);
    if (rc < 0) {
        sd->host->log(sd->host, EMX_LOG_ERROR, "%s: cannot queue a read: %s", sd->path,
                      uv_strerror(rc));
        job_free(job);
        return;
    }
    sd->job = job;
}

static void on_debounce(uv_timer_t *t)
{
    request_read(t->data);
}

static void on_fs_event(uv_fs_event_t *w, const char *filename, int events, int status)
{
    struct static_disc *sd = w->data;
    (void)events;
    if (status < 0) {
        sd->host->log(sd->host, EMX_LOG_WARN, "watching %s: %s", sd->dir, uv_strerror(status));
        return;
    }
    /* No name means the kernel dropped events: it may have been ours. */
    if (filename && strcmp(filename, sd->base) != 0)
        return;
    /* Restarting the timer on each event makes one read of a burst of writes. */
    uv_timer_start(&sd->debounce, on_debounce, sd->reload_delay_ms, 0);
}

/* (Re)arms the directory watch: a directory that was missing, or replaced
 * since, is picked up again on the next poll. */
static void arm_watch(struct static_disc *sd)
{
    if (sd->watching)
        uv_fs_event_stop(&sd->watch);
    int rc = uv_fs_event_start(&sd->watch, on_fs_event, sd->dir, 0);
    sd->watching = rc == 0;
    if (rc < 0 && rc != sd->watch_error)
        sd->host->log(sd->host, EMX_LOG_WARN, "cannot watch directory %s: %s; %s", sd->dir,
                      uv_strerror(rc),
                      sd->poll_ms ? "relying on the periodic re-read" : "no periodic re-read");
    else if (rc == 0 && sd->watch_error)
        sd->host->log(sd->host, EMX_LOG_INFO, "watching directory %s again", sd->dir);
    sd->watch_error = rc;
}

static void on_poll(uv_timer_t *t)
{
    struct static_disc *sd = t->data;
    arm_watch(sd);
    request_read(sd);
}

static void on_close(uv_handle_t *h)
{
    struct static_disc *sd = h->data;
    sd->open_handles--;
    maybe_free(sd);
}

static void close_handle(uv_handle_t *h)
{
    if (h->loop && !uv_is_closing(h))
        uv_close(h, on_close);
}

static void close_all(struct static_disc *sd)
{
    close_handle((uv_handle_t *)&sd->watch);
    close_handle((uv_handle_t *)&sd->debounce);
    close_handle((uv_handle_t *)&sd->poll);
    sd->watching = false;
}

static void disc_free(struct static_disc *sd)
{
    emx_instset_free(&sd->good);
    free(sd->last_failure);
    free(sd->path);
    free(sd->dir);
    free(sd->base);
    free(sd);
}

/* Memory goes only once destroy was called and libuv has let go of every
 * handle and the read in flight. */
static void maybe_free(struct static_disc *sd)
{
    if (sd->destroyed && sd->open_handles == 0 && !sd->job)
        disc_free(sd);
}

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static int static_create(const struct emx_host *host, const void *config, void **instance)
{
    const struct static_config *cfg = config;
    struct static_disc *sd;

    if (!EMX_HOST_HAS(host, discovery_failed))
        return -ENOTSUP;
    if (!cfg->file || !cfg->file[0]) {
        host->log(host, EMX_LOG_ERROR, "file: a path to the instances file is required");
        return -EINVAL;
    }
    const char *slash = strrchr(cfg->file, '/');
    const char *base = slash ? slash + 1 : cfg->file;
    if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        host->log(host, EMX_LOG_ERROR, "file: '%s' names a directory, not a file", cfg->file);
        return -EINVAL;
    }
    if (cfg->max_size < 1 || cfg->max_size > MAX_SIZE_LIMIT) {
        host->log(host, EMX_LOG_ERROR, "max_size: expected 1..%u bytes, found %llu", MAX_SIZE_LIMIT,
                  (unsigned long long)cfg->max_size);
        return -EINVAL;
    }
    sd = calloc(1, sizeof(*sd));
    if (!sd)
        return -ENOMEM;
    sd->host = host;
    sd->reload_delay_ms = cfg->reload_delay_ms;
    sd->poll_ms = cfg->poll_interval_ms;
    sd->max_size = (size_t)cfg->max_size;
    sd->path = dup_n(cfg->file, strlen(cfg->file));
    sd->base = dup_n(base, strlen(base));
    if (!slash)
        sd->dir = dup_n(".", 1);
    else if (slash == cfg->file)
        sd->dir = dup_n("/", 1);
    else
        sd->dir = dup_n(cfg->file, (size_t)(slash - cfg->file));
    if (!sd->path || !sd->base || !sd->dir) {
        disc_free(sd);
        return -ENOMEM;
    }
    *instance = sd;
    return 0;
}

static int static_start(void *instance)
{
    struct static_disc *sd = instance;
    uv_loop_t *loop = sd->host->loop;
    int rc;

    if ((rc = uv_timer_init(loop, &sd->debounce)) < 0)
        goto fail;
    sd->open_handles++;
    sd->debounce.data = sd;
    if ((rc = uv_timer_init(loop, &sd->poll)) < 0)
        goto fail;
    sd->open_handles++;
    sd->poll.data = sd;
    if ((rc = uv_fs_event_init(loop, &sd->watch)) < 0)
        goto fail;
    sd->open_handles++;
    sd->watch.data = sd;

    arm_watch(sd);
    if (sd->poll_ms)
        uv_timer_start(&sd->poll, on_poll, sd->poll_ms, sd->poll_ms);
    request_read(sd);
    sd->host->log(sd->host, EMX_LOG_DEBUG, "started: %s (directory %s)", sd->path, sd->dir);
    return 0;
fail:
    /* destroy closes what was initialised. */
    sd->host->log(sd->host, EMX_LOG_ERROR, "cannot start: %s", uv_strerror(rc));
    return rc;
}

static void static_stop(void *instance)
{
    struct static_disc *sd = instance;
    sd->stopped = true;
    /* A read still queued is dropped; one running finishes and is ignored. */
    if (sd->job)
        uv_cancel((uv_req_t *)&sd->job->req);
    close_all(sd);
}

static void static_destroy(void *instance)
{
    struct static_disc *sd = instance;
    if (!sd)
        return;
    sd->stopped = true;
    sd->destroyed = true;
    close_all(sd);
    maybe_free(sd);
}

/* A new file path means a new watch, a new last-good baseline and new
 * failure state: recreating the instance is simpler and as cheap. */
static int static_reconfigure(void *instance, const void *config)
{
    (void)instance;
    (void)config;
    return -ENOTSUP;
}

#define OPT(name_, type_, def_, required_, field_, help_)                                          \
    {                                                                                              \
        (name_), NULL, (type_), (def_), (required_), offsetof(struct static_config, field_),       \
            (help_)                                                                                \
    }

static const struct emx_option static_options[] = {
    OPT("file", EMX_OPT_STRING, NULL, true, file,
        "path of the YAML file listing the instances (its directory is watched)"),
    OPT("reload_delay", EMX_OPT_DURATION, "200ms", false, reload_delay_ms,
        "wait this long after the last change event before re-reading the file"),
    OPT("poll_interval", EMX_OPT_DURATION, "30s", false, poll_interval_ms,
        "re-read the file this often in case a change event was missed; 0 turns it off"),
    OPT("max_size", EMX_OPT_SIZE, "1MiB", false, max_size,
        "refuse an instances file larger than this (at most 64MiB)"),
    EMX_OPTION_END,
};

EMX_PLUGIN_EXPORT const struct emx_discovery_plugin emx_discovery_plugin = {
    .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_DISCOVERY, struct emx_discovery_plugin, "static", "0.1.0"),
    .options = static_options,
    .config_size = sizeof(struct static_config),
    .create = static_create,
    .start = static_start,
    .stop = static_stop,
    .destroy = static_destroy,
    .reconfigure = static_reconfigure,
};
