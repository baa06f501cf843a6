/* Everything `edgemux -t` checks and a running server needs before it opens
 * a socket: the config, the plugins it names (loaded and checked), their
 * options bound, and the platform app key read. Shared by the check mode and
 * the server so both judge a config the same way. */
#ifndef EMX_SETUP_H
#define EMX_SETUP_H

#include "config.h"
#include "loader.h"

struct emx_setup {
    struct emx_config *cfg;
    struct emx_plugin *transport;
    void *transport_config; /* bound options, transport->config_size bytes */
    struct emx_plugin *discovery;
    void *discovery_config;
    char *app_key;           /* from platform.app_key, app_key_file or EDGEMUX_APP_KEY */
    char *admin_token;       /* from admin.token_file; NULL: admin actions off */
    const char *plugins_dir; /* the directory the plugins came from */
};

/* Load and check everything. `plugins_dir` overrides plugins.dir when not
 * NULL. Every problem found is added to errs ("file:line: key: what");
 * returns 0 only when there is none. */
int emx_setup_load(const char *config_path, const char *plugins_dir, struct emx_setup *out,
                   struct emx_errors *errs);
/* The same, taking a reference to each plugin of `loaded` that is the very
 * file the config names (a reload: no new descriptor for unchanged plugins). */
int emx_setup_load_shared(const char *config_path, const char *plugins_dir,
                          struct emx_plugin *const *loaded, size_t nloaded, struct emx_setup *out,
                          struct emx_errors *errs);
/* Drop the setup's reference to a plugin it will not use, with its bound
 * options (a reload that keeps the running transport or discovery). */
void emx_setup_drop_transport(struct emx_setup *s);
void emx_setup_drop_discovery(struct emx_setup *s);
/* At process exit: the same, but the plugins stay mapped until the process
 * ends (a library a plugin uses may still have threads running, e.g.
 * libzookeeper-mt's after a close that did not finish, and unmapping it
 * under them crashes the exit). */
void emx_setup_free_at_exit(struct emx_setup *s);
void emx_setup_free(struct emx_setup *s);

#endif
