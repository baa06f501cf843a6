#include "setup.h"

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"

#define APP_KEY_MAX     4096
#define ADMIN_TOKEN_MIN 16 /* bytes: a guessable token protects nothing */

/* Read a secret file: refuse one that others can read, strip one trailing
 * newline. The key itself never appears in a message. */
static int read_key_file(const char *path, char **out, char *why, size_t whylen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, whylen, "cannot open '%s': %s", path, strerror(errno));
        return -errno;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(why, whylen, "'%s' is not a regular file", path);
        return -EINVAL;
    }
    if (st.st_mode & S_IROTH) {
        close(fd);
        snprintf(why, whylen, "'%s' is readable by everyone (mode %04o); chmod o-r it", path,
                 (unsigned)(st.st_mode & 07777));
        return -EPERM;
    }
    char *buf = emx_malloc(APP_KEY_MAX + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    ssize_t n = read(fd, buf, APP_KEY_MAX + 1);
    close(fd);
    if (n < 0 || n > APP_KEY_MAX) {
        snprintf(why, whylen, "'%s': %s", path, n < 0 ? strerror(errno) : "longer than 4096 bytes");
        emx_free(buf);
        return -EINVAL;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    buf[n] = '\0';
    if (n == 0) {
        snprintf(why, whylen, "'%s' is empty", path);
        emx_free(buf);
        return -EINVAL;
    }
    *out = buf;
    return 0;
}

static int node_line(const struct emx_config *cfg, const char *section, const char *key)
{
    struct emx_node *s = cfg->root ? emx_node_get(cfg->root, section) : NULL;
    struct emx_node *k = s && key ? emx_node_get(s, key) : NULL;
    return k ? k->line : s ? s->line : 1;
}

struct shared {
    struct emx_plugin *const *loaded;
    size_t n;
};

static int load_plugin(struct emx_setup *s, const char *dir, const char *section, const char *name,
                       enum emx_plugin_kind kind, const struct shared *sh,
                       struct emx_plugin **plugin, void **config, struct emx_errors *errs)
{
    char err[512];
    int rc = emx_plugin_load_shared(dir, name, kind, sh->loaded, sh->n, plugin, err, sizeof(err));
    if (rc != 0) {
        emx_errors_add(errs, s->cfg->file, node_line(s->cfg, section, "plugin"),
                       section, "%s", err);
        return rc;
    }
    const struct emx_option *table;
    size_t size;
    if (kind == EMX_PLUGIN_TRANSPORT) {
        table = (*plugin)->u.transport->options;
        size = (*plugin)->u.transport->config_size;
    } else {
        table = (*plugin)->u.discovery->options;
        size = (*plugin)->u.discovery->config_size;
    }
    *config = emx_calloc(1, size ? size : 1);
    if (!*config)
        return -ENOMEM;
    if (table)
        return emx_config_bind_plugin(s->cfg, section, table, *config, errs);
    return 0;
}

int emx_setup_load(const char *config_path, const char *plugins_dir, struct emx_setup *out,
                   struct emx_errors *errs)
{
    return emx_setup_load_shared(config_path, plugins_dir, NULL, 0, out, errs);
}

int emx_setup_load_shared(const char *config_path, const char *plugins_dir,
                          struct emx_plugin *const *loaded, size_t nloaded, struct emx_setup *out,
                          struct emx_errors *errs)
{
    const struct shared sh = {.loaded = loaded, .n = nloaded};
    memset(out, 0, sizeof(*out));
    int rc = emx_config_load(config_path, &out->cfg, errs);
    if (rc != 0)
        return rc;
    struct emx_config *cfg = out->cfg;
    out->plugins_dir = plugins_dir ? plugins_dir : cfg->plugins.dir;

    int bad = 0;
    bad |= load_plugin(out, out->plugins_dir, "transport", cfg->transport.plugin,
                       EMX_PLUGIN_TRANSPORT, &sh, &out->transport, &out->transport_config, errs);
    bad |= load_plugin(out, out->plugins_dir, "discovery", cfg->discovery.plugin,
                       EMX_PLUGIN_DISCOVERY, &sh, &out->discovery, &out->discovery_config, errs);
    /* Unknown keys can be told apart only once both plugins bound theirs. */
    if (!bad)
        bad |= emx_config_check_unused(cfg, errs);

    /* The platform app key: inline, from a file, or from the environment. */
    char why[600];
    if (cfg->platform.app_key && cfg->platform.app_key[0]) {
        out->app_key = emx_strdup(cfg->platform.app_key);
        if (!out->app_key)
            bad = -ENOMEM;
    } else if (cfg->platform.app_key_file) {
        if (read_key_file(cfg->platform.app_key_file, &out->app_key, why, sizeof(why)) != 0) {
            emx_errors_add(errs, cfg->file, node_line(cfg, "platform", "app_key_file"),
                           "platform.app_key_file", "%s", why);
            bad = -EINVAL;
        }
    } else if (getenv("EDGEMUX_APP_KEY") && getenv("EDGEMUX_APP_KEY")[0]) {
        out->app_key = emx_strdup(getenv("EDGEMUX_APP_KEY"));
        if (!out->app_key)
            bad = -ENOMEM;
    } else {
        emx_errors_add(errs, cfg->file, node_line(cfg, "platform", NULL), "platform.app_key",
                       "no platform app key: set platform.app_key_file (or platform.app_key, "
                       "or EDGEMUX_APP_KEY in the environment)");
        bad = -EINVAL;
    }
    /* The key goes into an HTTP header: a control character in it would
     * fail every pipe later, so refuse it now (without quoting it). */
    if (out->app_key)
        for (const char *k = out->app_key; *k; k++)
            if ((unsigned char)*k < 0x20 || *k == 0x7f) {
                emx_errors_add(errs, cfg->file, node_line(cfg, "platform", NULL), "platform.app_key",
                               "the app key contains a control character");
                bad = -EINVAL;
                break;
            }
    /* The admin token: the POST actions need it in an Authorization
     * header. Printable and without blanks, so it compares as written. */
    if (cfg->admin.token_file && cfg->admin.token_file[0]) {
        int line = node_line(cfg, "admin", "token_file");
        if (read_key_file(cfg->admin.token_file, &out->admin_token, why, sizeof(why)) != 0) {
            emx_errors_add(errs, cfg->file, line, "admin.token_file", "%s", why);
            bad = -EINVAL;
        } else {
            size_t n = strlen(out->admin_token);
            bool visible = true;
            for (size_t i = 0; i < n; i++)
                visible &= out->admin_token[i] > 0x20 && out->admin_token[i] < 0x7f;
            if (!visible || n < ADMIN_TOKEN_MIN) {
                emx_errors_add(errs, cfg->file, line, "admin.token_file",
                               "the token in '%s' must be at least %d printable characters "
                               "without blanks (e.g. openssl rand -hex 32)",
                               cfg->admin.token_file, ADMIN_TOKEN_MIN);
                bad = -EINVAL;
            }
        }
    }
    if (bad || errs->count) {
        emx_setup_free(out);
        return bad ? (bad < 0 ? bad : -EINVAL) : -EINVAL;
    }
    return 0;
}

void emx_setup_drop_transport(struct emx_setup *s)
{
    emx_plugin_unload(s->transport);
    s->transport = NULL;
    emx_free_ptr(&s->transport_config);
}

void emx_setup_drop_discovery(struct emx_setup *s)
{
    emx_plugin_unload(s->discovery);
    s->discovery = NULL;
    emx_free_ptr(&s->discovery_config);
}

static void setup_free(struct emx_setup *s, bool unload);

void emx_setup_free(struct emx_setup *s)
{
    setup_free(s, true);
}

void emx_setup_free_at_exit(struct emx_setup *s)
{
    setup_free(s, false);
}

static void setup_free(struct emx_setup *s, bool unload)
{
    if (s->app_key) {
        explicit_bzero(s->app_key, strlen(s->app_key));
        emx_free_ptr(&s->app_key);
    }
    if (s->admin_token) {
        explicit_bzero(s->admin_token, strlen(s->admin_token));
        emx_free_ptr(&s->admin_token);
    }
    if (s->transport)
        (unload ? emx_plugin_unload : emx_plugin_forget)(s->transport);
    if (s->discovery)
        (unload ? emx_plugin_unload : emx_plugin_forget)(s->discovery);
    emx_free(s->transport_config);
    emx_free(s->discovery_config);
    emx_config_free(s->cfg);
    memset(s, 0, sizeof(*s));
}
