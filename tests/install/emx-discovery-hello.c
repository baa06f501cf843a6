/* A discovery plugin built out of tree, the way a third party would: only
 * the installed SDK headers (found with `pkg-config --cflags edgemux`), no
 * edgemux library. It reports one fixed instance. */
#include <errno.h>
#include <stdlib.h>

#include <edgemux/discovery.h>

struct hello_config {
    const char *host;
    int64_t port;
};

struct hello {
    const struct emx_host *host;
    const struct hello_config *cfg;
};

static int hello_create(const struct emx_host *host, const void *config, void **instance)
{
    struct hello *h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    h->host = host;
    h->cfg = config;
    *instance = h;
    return 0;
}

static int hello_start(void *instance)
{
    struct hello *h = instance;
    struct emx_instance_info one = {
        .id = "hello-1",
        .host = h->cfg->host,
        .port = (uint16_t)h->cfg->port,
        .weight = 1,
    };
    h->host->log(h->host, EMX_LOG_INFO, "reporting %s:%d", one.host, (int)one.port);
    h->host->discovery_update(h->host, &one, 1);
    return 0;
}

static void hello_stop(void *instance)
{
    (void)instance;
}

static void hello_destroy(void *instance)
{
    free(instance);
}

static const struct emx_option hello_options[] = {
    {"host", NULL, EMX_OPT_STRING, "127.0.0.1", false, offsetof(struct hello_config, host),
     "platform address"},
    {"port", NULL, EMX_OPT_INT, NULL, true, offsetof(struct hello_config, port), "platform port"},
    EMX_OPTION_END,
};

EMX_PLUGIN_EXPORT const struct emx_discovery_plugin emx_discovery_plugin = {
    .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_DISCOVERY, struct emx_discovery_plugin, "hello", "1.0"),
    .options = hello_options,
    .config_size = sizeof(struct hello_config),
    .create = hello_create,
    .start = hello_start,
    .stop = hello_stop,
    .destroy = hello_destroy,
};
