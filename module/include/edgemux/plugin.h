/* edgemux plugin SDK: the descriptor header every plugin starts with.
 *
 * A plugin is one shared object exporting exactly one const descriptor, its
 * symbol named by kind (EMX_TRANSPORT_SYMBOL or EMX_DISCOVERY_SYMBOL). The
 * descriptor begins with struct emx_plugin_header, whose fields never move or
 * change meaning. New descriptor fields are only appended; appending bumps
 * EMX_ABI_MINOR. A change that is not an append bumps EMX_ABI_MAJOR.
 *
 * The loader checks magic, kind, abi_major == core's, abi_minor <= core's and
 * struct_size before it calls any plugin function. Plugins must not have ELF
 * constructors: dlopen runs those before any check can happen.
 */
#ifndef EDGEMUX_PLUGIN_H
#define EDGEMUX_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "edgemux/option.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EMX_PLUGIN_MAGIC 0x504D5845u /* "EXMP" read little-endian: 'E','X','M','P' */
#define EMX_ABI_MAJOR 1
#define EMX_ABI_MINOR 5

#define EMX_TRANSPORT_SYMBOL "emx_transport_plugin"
#define EMX_DISCOVERY_SYMBOL "emx_discovery_plugin"

enum emx_plugin_kind {
    EMX_PLUGIN_TRANSPORT = 1,
    EMX_PLUGIN_DISCOVERY = 2,
};

/* Frozen forever: never reorder, resize or remove these fields. */
struct emx_plugin_header {
    uint32_t magic;       /* EMX_PLUGIN_MAGIC */
    uint16_t abi_major;   /* EMX_ABI_MAJOR the plugin was built against */
    uint16_t abi_minor;   /* EMX_ABI_MINOR the plugin was built against */
    uint32_t kind;        /* enum emx_plugin_kind */
    uint32_t struct_size; /* sizeof the whole descriptor the plugin was built with */
    const char *name;     /* short name, e.g. "consul" */
    const char *version;  /* plugin's own version string */
};

/* Fills the header of a descriptor of type T (transport or discovery). */
#define EMX_PLUGIN_HEADER(kind_, type_, name_, version_)                                     \
    {                                                                                        \
        .magic = EMX_PLUGIN_MAGIC, .abi_major = EMX_ABI_MAJOR, .abi_minor = EMX_ABI_MINOR,   \
        .kind = (kind_), .struct_size = (uint32_t)sizeof(type_), .name = (name_),            \
        .version = (version_)                                                                \
    }

/* Export only the descriptor: plugins are built with hidden visibility. */
#define EMX_PLUGIN_EXPORT __attribute__((visibility("default")))

#ifdef __cplusplus
}
#endif
#endif
