/* The plugin loader: file checks on the open descriptor, dlopen through
 * /proc/self/fd, then every descriptor check before the core sees it. */
#include "loader.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"

#define PLUGIN_NAME_MAX    64
#define PLUGIN_VERSION_MAX 64
#define PLUGIN_PATH_MAX    4096
/* An option table longer than this is taken as unterminated. */
#define OPTIONS_MAX 256

/* Descriptor sizes as of ABI 1.0: the fields every 1.x plugin has. They are
 * spelled as "end of the last 1.0 field" so appending fields never moves them. */
#define END_OF(type_, field_) (offsetof(type_, field_) + sizeof(((type_ *)0)->field_))
#define TRANSPORT_SIZE_1_0    END_OF(struct emx_transport_plugin, close)
#define DISCOVERY_SIZE_1_0    END_OF(struct emx_discovery_plugin, reconfigure)

#if EMX_ABI_MINOR == 0
_Static_assert(TRANSPORT_SIZE_1_0 == sizeof(struct emx_transport_plugin),
               "the 1.0 transport descriptor ends at close");
_Static_assert(DISCOVERY_SIZE_1_0 == sizeof(struct emx_discovery_plugin),
               "the 1.0 discovery descriptor ends at reconfigure");
#endif

/* Where refusals are written: every message starts with the file. */
struct ctx {
    const char *path;
    char *err;
    size_t errlen;
};

__attribute__((format(printf, 3, 4))) static int refuse(const struct ctx *c, int rc,
                                                        const char *fmt, ...)
{
    if (!c->err || c->errlen == 0)
        return rc;
    int n = snprintf(c->err, c->errlen, "%s: ", c->path);
    if (n < 0 || (size_t)n >= c->errlen)
        return rc;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return rc;
}

const char *emx_plugin_kind_name(enum emx_plugin_kind kind)
{
    switch (kind) {
    case EMX_PLUGIN_TRANSPORT:
        return "transport";
    case EMX_PLUGIN_DISCOVERY:
        return "discovery";
    }
    return "unknown";
}

static bool kind_is_valid(uint32_t kind)
{
    return kind == EMX_PLUGIN_TRANSPORT || kind == EMX_PLUGIN_DISCOVERY;
}

static bool plugin_name_is_valid(const char *name)
{
    size_t len = strnlen(name, PLUGIN_NAME_MAX + 1);
    if (len == 0 || len > PLUGIN_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        char ch = name[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '_';
        if (!ok)
            return false;
    }
    return true;
}

/* Printable ASCII in the first max bytes: safe to put in a log line. */
static bool text_is_printable(const char *s, size_t max)
{
    size_t len = strnlen(s, max);
    for (size_t i = 0; i < len; i++) {
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    }
    return true;
}

/* The version goes into log lines: printable ASCII only, bounded. */
static bool plugin_version_is_valid(const char *version)
{
    size_t len = strnlen(version, PLUGIN_VERSION_MAX + 1);
    return len > 0 && len <= PLUGIN_VERSION_MAX && text_is_printable(version, len);
}

/* The file must be one only root or we could have written. */
static int check_file(const struct ctx *c, int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        return refuse(c, -e, "fstat failed: %s", strerror(e));
    }
    if (!S_ISREG(st.st_mode))
        return refuse(c, -EPERM, "not a regular file (mode %06o)", (unsigned)st.st_mode);
    if (st.st_mode & 022)
        return refuse(c, -EPERM, "group or world writable (mode %04o)",
                      (unsigned)(st.st_mode & 07777));
    uid_t me = geteuid();
    if (st.st_uid != 0 && st.st_uid != me)
        return refuse(c, -EPERM, "owned by uid %u, expected root (0) or the running user (%u)",
                      (unsigned)st.st_uid, (unsigned)me);
    return 0;
}

/* The size of the exported object as the ELF symbol table states it, or 0
 * when unknown; it bounds what struct_size may claim. */
static size_t symbol_size(const void *sym)
{
    Dl_info info;
    const ElfW(Sym) *es = NULL;
    if (!dladdr1(sym, &info, (void **)&es, RTLD_DL_SYMENT) || !es)
        return 0;
    return (size_t)es->st_size;
}

static int find_descriptor(const struct ctx *c, void *dl, enum emx_plugin_kind kind,
                           const struct emx_plugin_header **out, size_t *sym_size)
{
    bool transport = kind == EMX_PLUGIN_TRANSPORT;
    const char *want = transport ? EMX_TRANSPORT_SYMBOL : EMX_DISCOVERY_SYMBOL;
    const char *other = transport ? EMX_DISCOVERY_SYMBOL : EMX_TRANSPORT_SYMBOL;
    enum emx_plugin_kind other_kind = transport ? EMX_PLUGIN_DISCOVERY : EMX_PLUGIN_TRANSPORT;

    const void *sym = dlsym(dl, want);
    if (!sym) {
        if (dlsym(dl, other))
            return refuse(c, -ENOEXEC, "has no %s symbol; is it a %s plugin?", want,
                          emx_plugin_kind_name(other_kind));
        return refuse(c, -ENOEXEC, "has no %s symbol; not an edgemux %s plugin", want,
                      emx_plugin_kind_name(kind));
    }
    size_t size = symbol_size(sym);
    if (size && size < sizeof(struct emx_plugin_header))
        return refuse(c, -ENOEXEC, "symbol %s too small: %zu bytes, header needs %zu", want, size,
                      sizeof(struct emx_plugin_header));
    *out = sym;
    *sym_size = size;
    return 0;
}

/* Header checks, in the order the ABI promises: nothing past the header is
 * read until struct_size says it exists. */
static int check_header(const struct ctx *c, const struct emx_plugin_header *h,
                        enum emx_plugin_kind kind, size_t sym_size)
{
    if (h->magic != EMX_PLUGIN_MAGIC)
        return refuse(c, -ENOEXEC, "bad magic: expected 0x%08x, found 0x%08x",
                      (unsigned)EMX_PLUGIN_MAGIC, (unsigned)h->magic);
    if (h->kind != (uint32_t)kind)
        return refuse(c, -ENOEXEC, "wrong kind: expected %s (%d), found %s (%u)",
                      emx_plugin_kind_name(kind), (int)kind,
                      kind_is_valid(h->kind) ? emx_plugin_kind_name(h->kind) : "unknown",
                      (unsigned)h->kind);
    if (h->abi_major != EMX_ABI_MAJOR)
        return refuse(c, -ENOTSUP, "ABI major mismatch: core %d, plugin %u", EMX_ABI_MAJOR,
                      (unsigned)h->abi_major);
    if (h->abi_minor > EMX_ABI_MINOR)
        return refuse(c, -ENOTSUP, "plugin built for ABI %u.%u, core supports up to %d.%d",
                      (unsigned)h->abi_major, (unsigned)h->abi_minor, EMX_ABI_MAJOR, EMX_ABI_MINOR);
    size_t need = kind == EMX_PLUGIN_TRANSPORT ? TRANSPORT_SIZE_1_0 : DISCOVERY_SIZE_1_0;
    if (h->struct_size < need)
        return refuse(c, -ENOEXEC, "descriptor too short: struct_size %u, need at least %zu",
                      (unsigned)h->struct_size, need);
    if (sym_size && h->struct_size > sym_size)
        return refuse(c, -ENOEXEC, "descriptor larger than its symbol: struct_size %u, symbol %zu",
                      (unsigned)h->struct_size, sym_size);
    if (!h->name)
        return refuse(c, -ENOEXEC, "descriptor has no name");
    if (!plugin_name_is_valid(h->name))
        return refuse(c, -ENOEXEC, "bad name in descriptor: expected [A-Za-z0-9_-]{1,%d}",
                      PLUGIN_NAME_MAX);
    if (!h->version)
        return refuse(c, -ENOEXEC, "descriptor has no version");
    if (!plugin_version_is_valid(h->version))
        return refuse(c, -ENOEXEC, "bad version in descriptor: expected 1 to %d printable chars",
                      PLUGIN_VERSION_MAX);
    return 0;
}

#define NEED_CALLBACK(c_, d_, field_)                                                              \
    do {                                                                                           \
        if (!(d_)->field_)                                                                         \
            return refuse((c_), -ENOEXEC, "missing callback '%s'", #field_);                       \
    } while (0)

/* Every field read here lies within the 1.0 size, which struct_size covers. */
static int check_transport_callbacks(const struct ctx *c, const struct emx_transport_plugin *d)
{
    NEED_CALLBACK(c, d, create);
    NEED_CALLBACK(c, d, start);
    NEED_CALLBACK(c, d, stop);
    NEED_CALLBACK(c, d, destroy);
    NEED_CALLBACK(c, d, listen);
    NEED_CALLBACK(c, d, unlisten);
    NEED_CALLBACK(c, d, connect);
    NEED_CALLBACK(c, d, send);
    NEED_CALLBACK(c, d, buffered);
    NEED_CALLBACK(c, d, pause_read);
    NEED_CALLBACK(c, d, close);
    return 0;
}

static int check_discovery_callbacks(const struct ctx *c, const struct emx_discovery_plugin *d)
{
    NEED_CALLBACK(c, d, create);
    NEED_CALLBACK(c, d, start);
    NEED_CALLBACK(c, d, stop);
    NEED_CALLBACK(c, d, destroy);
    return 0; /* reconfigure is optional */
}

/* Size and alignment of the config field an option binds into; false for a
 * type this core does not know. */
static bool option_field(enum emx_opt_type type, size_t *size, size_t *align)
{
    switch (type) {
    case EMX_OPT_STRING:
    case EMX_OPT_SECRET:
        *size = sizeof(const char *);
        *align = alignof(const char *);
        return true;
    case EMX_OPT_BOOL:
        *size = sizeof(bool);
        *align = alignof(bool);
        return true;
    case EMX_OPT_INT:
        *size = sizeof(int64_t);
        *align = alignof(int64_t);
        return true;
    case EMX_OPT_SIZE:
    case EMX_OPT_DURATION:
        *size = sizeof(uint64_t);
        *align = alignof(uint64_t);
        return true;
    case EMX_OPT_STRING_LIST:
        *size = sizeof(struct emx_strlist);
        *align = alignof(struct emx_strlist);
        return true;
    }
    return false;
}

static bool option_end(const struct emx_option *o)
{
    return !o->name && o->type == 0;
}

/* Does `key` appear as a name or alias among the first n options? */
static bool option_key_taken(const struct emx_option *opts, size_t n, const char *key)
{
    for (size_t j = 0; j < n; j++) {
        if (strcmp(opts[j].name, key) == 0)
            return true;
        if (opts[j].alias && strcmp(opts[j].alias, key) == 0)
            return true;
    }
    return false;
}

static int check_options(const struct ctx *c, const struct emx_option *opts, size_t config_size)
{
    if (!opts)
        return 0;
    size_t i;
    for (i = 0; i < OPTIONS_MAX && !option_end(&opts[i]); i++) {
        const struct emx_option *o = &opts[i];
        if (!o->name || !o->name[0])
            return refuse(c, -ENOEXEC, "option %zu has no name", i);
        if (config_size == 0)
            return refuse(c, -ENOEXEC, "option '%s': options declared but config_size is 0",
                          o->name);
        size_t size, align;
        if (!option_field(o->type, &size, &align))
            return refuse(c, -ENOEXEC, "option '%s': bad type: expected 1..%d, found %d", o->name,
                          (int)EMX_OPT_SECRET, (int)o->type);
        if (o->offset > config_size || size > config_size - o->offset)
            return refuse(c, -ENOEXEC, "option '%s': offset %zu + size %zu exceeds config_size %zu",
                          o->name, o->offset, size, config_size);
        if (o->offset % align)
            return refuse(c, -ENOEXEC, "option '%s': offset %zu not aligned to %zu", o->name,
                          o->offset, align);
        if (o->alias && !o->alias[0])
            return refuse(c, -ENOEXEC, "option '%s': empty alias", o->name);
        if (option_key_taken(opts, i, o->name))
            return refuse(c, -ENOEXEC, "duplicate option key '%s'", o->name);
        if (o->alias && (strcmp(o->alias, o->name) == 0 || option_key_taken(opts, i, o->alias)))
            return refuse(c, -ENOEXEC, "duplicate option key '%s' (alias of '%s')", o->alias,
                          o->name);
    }
    if (i == OPTIONS_MAX)
        return refuse(c, -ENOEXEC, "option table has no end marker within %d entries", OPTIONS_MAX);
    return 0;
}

static int check_descriptor(const struct ctx *c, const struct emx_plugin_header *h,
                            enum emx_plugin_kind kind, size_t sym_size)
{
    int rc = check_header(c, h, kind, sym_size);
    if (rc < 0)
        return rc;
    if (kind == EMX_PLUGIN_TRANSPORT) {
        const struct emx_transport_plugin *d = (const struct emx_transport_plugin *)h;
        rc = check_transport_callbacks(c, d);
        return rc < 0 ? rc : check_options(c, d->options, d->config_size);
    }
    const struct emx_discovery_plugin *d = (const struct emx_discovery_plugin *)h;
    rc = check_discovery_callbacks(c, d);
    return rc < 0 ? rc : check_options(c, d->options, d->config_size);
}

/* Is some loaded object already named `name`? dl_iterate_phdr sees every
 * object's name; one left mapped (RTLD_NODELETE, or a unique symbol) after
 * its plugin was unloaded keeps the name of a descriptor since closed. */
struct name_probe {
    const char *name;
    bool found;
};

static int probe_name(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct name_probe *np = data;
    if (info->dlpi_name && strcmp(info->dlpi_name, np->name) == 0) {
        np->found = true;
        return 1;
    }
    return 0;
}

static bool object_named(const char *name)
{
    struct name_probe np = {.name = name, .found = false};
    dl_iterate_phdr(probe_name, &np);
    return np.found;
}

/* The plugin among `loaded` (same kind) that is the file open on fd. */
static struct emx_plugin *find_loaded(int fd, enum emx_plugin_kind kind,
                                      struct emx_plugin *const *loaded, size_t nloaded)
{
    struct stat st, lst;
    if (!loaded || fstat(fd, &st) != 0)
        return NULL;
    for (size_t i = 0; i < nloaded; i++) {
        struct emx_plugin *lp = loaded[i];
        if (lp && lp->kind == kind && lp->fd >= 0 && fstat(lp->fd, &lst) == 0 &&
            lst.st_dev == st.st_dev && lst.st_ino == st.st_ino)
            return lp;
    }
    return NULL;
}

#define FD_NAME_TRIES 16

static int load_path(const char *path, enum emx_plugin_kind kind, struct emx_plugin *const *loaded,
                     size_t nloaded, struct emx_plugin **out, char *err, size_t errlen)
{
    struct ctx c = {.path = path ? path : "(null)", .err = err, .errlen = errlen};
    if (err && errlen)
        err[0] = '\0';
    if (out)
        *out = NULL;
    if (!path || !path[0] || !out)
        return refuse(&c, -EINVAL, "no plugin path given");
    if (!kind_is_valid(kind))
        return refuse(&c, -EINVAL, "bad plugin kind %d", (int)kind);

    struct emx_plugin *p = NULL;
    const struct emx_plugin_header *h = NULL;
    size_t sym_size = 0;
    void *dl = NULL;
    char fdpath[64];
    int rc;

    /* O_NONBLOCK: a FIFO planted under the name must not hang the open;
     * it is refused by the regular-file check right after. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        /* After server.user the plugin directory may not be searchable any
         * more; a plugin already loaded from this very path is the one the
         * configuration names, and it is held open: share it. */
        for (size_t i = 0; e == EACCES && loaded && i < nloaded; i++)
            if (loaded[i] && loaded[i]->kind == kind && loaded[i]->path &&
                strcmp(loaded[i]->path, path) == 0) {
                loaded[i]->refs++;
                *out = loaded[i];
                return 0;
            }
        return refuse(&c, -e, "cannot open: %s", strerror(e));
    }
    rc = check_file(&c, fd);
    if (rc < 0)
        goto out_close;
    struct emx_plugin *same = find_loaded(fd, kind, loaded, nloaded);
    if (same) {
        close(fd);
        same->refs++;
        *out = same;
        return 0;
    }

    /* Load the very file checked above, whatever happens to the name. A
     * name some loaded object still carries would give back that object:
     * move the descriptor to another number first. */
    snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", fd);
    for (int tries = 0; object_named(fdpath); tries++) {
        int nfd = tries < FD_NAME_TRIES ? fcntl(fd, F_DUPFD_CLOEXEC, fd + 1) : -1;
        if (nfd < 0) {
            rc = refuse(&c, -EMFILE, "no free descriptor name to load it under");
            goto out_close;
        }
        close(fd);
        fd = nfd;
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", fd);
    }
    dl = dlopen(fdpath, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        const char *why = dlerror();
        rc = refuse(&c, -ELIBBAD, "dlopen failed: %s", why ? why : "unknown error");
        goto out_close;
    }
    /* The fd stays open while the plugin is loaded: glibc finds loaded
     * objects by name first, and "/proc/self/fd/N" of a closed fd would be
     * the name of the next plugin opened on the same number. */

    rc = find_descriptor(&c, dl, kind, &h, &sym_size);
    if (rc < 0)
        goto out_dlclose;
    rc = check_descriptor(&c, h, kind, sym_size);
    if (rc < 0)
        goto out_dlclose;

    p = emx_calloc(1, sizeof(*p));
    if (!p) {
        rc = refuse(&c, -ENOMEM, "out of memory");
        goto out_dlclose;
    }
    p->path = emx_strdup(path);
    if (!p->path) {
        rc = refuse(&c, -ENOMEM, "out of memory");
        goto out_free;
    }
    p->refs = 1;
    p->dl = dl;
    p->fd = fd;
    p->kind = kind;
    p->hdr = h;
    if (kind == EMX_PLUGIN_TRANSPORT)
        p->u.transport = (const struct emx_transport_plugin *)h;
    else
        p->u.discovery = (const struct emx_discovery_plugin *)h;
    *out = p;
    return 0;

out_free:
    emx_free(p);
out_dlclose:
    dlclose(dl);
out_close:
    if (fd >= 0)
        close(fd);
    return rc;
}

int emx_plugin_load_path(const char *path, enum emx_plugin_kind kind, struct emx_plugin **out,
                         char *err, size_t errlen)
{
    return load_path(path, kind, NULL, 0, out, err, errlen);
}

int emx_plugin_load(const char *dir, const char *name, enum emx_plugin_kind kind,
                    struct emx_plugin **out, char *err, size_t errlen)
{
    return emx_plugin_load_shared(dir, name, kind, NULL, 0, out, err, errlen);
}

int emx_plugin_load_shared(const char *dir, const char *name, enum emx_plugin_kind kind,
                           struct emx_plugin *const *loaded, size_t nloaded,
                           struct emx_plugin **out, char *err, size_t errlen)
{
    struct ctx c = {.path = dir ? dir : "(null)", .err = err, .errlen = errlen};
    if (err && errlen)
        err[0] = '\0';
    if (out)
        *out = NULL;
    if (!dir || !dir[0])
        return refuse(&c, -EINVAL, "no plugin directory given");
    if (!kind_is_valid(kind))
        return refuse(&c, -EINVAL, "bad plugin kind %d", (int)kind);
    /* The charset already keeps out '/' and "..": a name never leaves dir. */
    if (!name || !plugin_name_is_valid(name))
        return refuse(&c, -EINVAL, "bad %s plugin name '%.*s': expected 1 to %d of [A-Za-z0-9_-]",
                      emx_plugin_kind_name(kind), PLUGIN_NAME_MAX,
                      name && text_is_printable(name, PLUGIN_NAME_MAX) ? name : "",
                      PLUGIN_NAME_MAX);

    char path[PLUGIN_PATH_MAX];
    size_t dlen = strlen(dir);
    const char *sep = dir[dlen - 1] == '/' ? "" : "/";
    int n = snprintf(path, sizeof(path), "%s%semx-%s-%s.so", dir, sep, emx_plugin_kind_name(kind),
                     name);
    if (n < 0 || (size_t)n >= sizeof(path))
        return refuse(&c, -ENAMETOOLONG, "plugin path too long for '%s'", name);
    return load_path(path, kind, loaded, nloaded, out, err, errlen);
}

static void plugin_release(struct emx_plugin *p, bool unmap)
{
    if (!p || --p->refs > 0)
        return;
    if (p->dl && unmap)
        dlclose(p->dl);
    if (p->fd >= 0)
        close(p->fd);
    emx_free_ptr(&p->path);
    emx_free(p);
}

void emx_plugin_unload(struct emx_plugin *p)
{
    plugin_release(p, true);
}

void emx_plugin_forget(struct emx_plugin *p)
{
    plugin_release(p, false);
}
