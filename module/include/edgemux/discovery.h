/* edgemux plugin SDK: discovery plugins.
 *
 * A discovery plugin finds platform instances and reports the whole current
 * set through host->discovery_update each time it changes; the core diffs it.
 * Plugins never touch pipes, and never block the loop: blocking libraries run
 * on the plugin's own thread and hand results back with host->post.
 */
#ifndef EDGEMUX_DISCOVERY_H
#define EDGEMUX_DISCOVERY_H

#include "edgemux/host.h"
#include "edgemux/option.h"
#include "edgemux/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

struct emx_discovery_plugin {
    struct emx_plugin_header hdr; /* kind EMX_PLUGIN_DISCOVERY */

    const struct emx_option *options; /* terminated by EMX_OPTION_END; may be NULL */
    size_t config_size;               /* bytes of the config struct the options bind into */

    /* Create an instance. `config` was filled from `options` by the core and
     * is borrowed until destroy. `host` is borrowed until destroy. Return 0
     * and set *instance, or a negative errno and log why through host. */
    int (*create)(const struct emx_host *host, const void *config, void **instance);
    /* Begin watching the source; the first set may be reported from here on. */
    int (*start)(void *instance);
    /* Stop watching; no host call after stop returns except log. */
    void (*stop)(void *instance);
    /* Free everything; called after stop, or after a failed start. */
    void (*destroy)(void *instance);
    /* Config reload: a new config for the same instance. Return 0 if applied,
     * -ENOTSUP if the instance must be recreated. May be NULL (recreate). */
    int (*reconfigure)(void *instance, const void *config);
};

#ifdef __cplusplus
}
#endif
#endif
