/* The plugin loader (DESIGN §2): opens a plugin named in the config from
 * plugins.dir, checks the file and its descriptor, and only then hands the
 * descriptor to the core. No plugin function is called here. */
#ifndef EMX_LOADER_H
#define EMX_LOADER_H

#include <stddef.h>

#include "edgemux/discovery.h"
#include "edgemux/plugin.h"
#include "edgemux/transport.h"

struct emx_plugin {
    unsigned refs;            /* emx_plugin_unload drops one; the last one unloads */
    void *dl;                 /* dlopen handle */
    int fd;                   /* the checked file, open while loaded (see loader.c) */
    char *path;               /* the file as named, for messages */
    enum emx_plugin_kind kind;
    const struct emx_plugin_header *hdr;
    union {
        const struct emx_transport_plugin *transport;
        const struct emx_discovery_plugin *discovery;
    } u;
};

/* "discovery", "transport". */
const char *emx_plugin_kind_name(enum emx_plugin_kind kind);

/* Resolve `name` (letters, digits, '-', '_') to <dir>/emx-<kind>-<name>.so
 * and load it. On failure returns a negative errno and writes into err one
 * line naming the file and, for a descriptor check, the expected and found
 * values; *out is then NULL. err may be NULL; errlen bounds it.
 *
 * Errors: -EINVAL bad name, kind or arguments; -ENAMETOOLONG; the open's
 * errno (-ENOENT …); -EPERM the file is not a regular file, is group or
 * world writable, or is owned by neither root nor the running user;
 * -ELIBBAD dlopen failed; -ENOTSUP ABI version mismatch; -ENOEXEC any other
 * descriptor fault (symbol, magic, kind, size, name, callbacks, options);
 * -ENOMEM. */
int emx_plugin_load(const char *dir, const char *name, enum emx_plugin_kind kind,
                    struct emx_plugin **out, char *err, size_t errlen);
/* Like emx_plugin_load, but when the file (same device and inode, checked on
 * the descriptor) is one of `loaded`, of the same kind, take a reference to
 * it instead of loading it again: a reload opens no new descriptor for an
 * unchanged plugin, and no second name is ever given to one loaded object. */
int emx_plugin_load_shared(const char *dir, const char *name, enum emx_plugin_kind kind,
                           struct emx_plugin *const *loaded, size_t nloaded,
                           struct emx_plugin **out, char *err, size_t errlen);
/* Load a plugin from an explicit path (same checks). */
int emx_plugin_load_path(const char *path, enum emx_plugin_kind kind, struct emx_plugin **out,
                         char *err, size_t errlen);
/* Drop one reference; the last one dlcloses the plugin and closes its file.
 * The caller makes sure none of its code can still run (pending callbacks). */
void emx_plugin_unload(struct emx_plugin *p);
/* At process exit: drop the reference like emx_plugin_unload, but leave
 * the object mapped until the process ends (see emx_setup_free_at_exit). */
void emx_plugin_forget(struct emx_plugin *p);

#endif
