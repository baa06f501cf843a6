/* A fake discovery plugin. Built once as the good one and once per flaw,
 * each flaw chosen by one FAKE_* define (see CMakeLists.txt). */
#include <errno.h>
#include <stddef.h>

#include "edgemux/discovery.h"
#include "fake.h"

static int calls;

static int fake_create(const struct emx_host *host, const void *config, void **instance)
{
    (void)host;
    (void)config;
    calls++;
    *instance = &calls;
    return 0;
}

__attribute__((unused)) static int fake_start(void *instance)
{
    (void)instance;
    calls++;
    return 0;
}

static void fake_stop(void *instance)
{
    (void)instance;
    calls++;
}

static void fake_destroy(void *instance)
{
    (void)instance;
    calls++;
}

static int fake_reconfigure(void *instance, const void *config)
{
    (void)instance;
    (void)config;
    calls++;
    return -ENOTSUP;
}

#define OPT(name_, alias_, type_, def_, field_, help_)                                             \
    {                                                                                              \
        (name_), (alias_), (type_), (def_), false, offsetof(struct fake_discovery_config, field_), \
            (help_)                                                                                \
    }

static const struct emx_option fake_options[] = {
    OPT("endpoint", "cx-server.fake.endpoint", EMX_OPT_STRING, "localhost:1", endpoint,
        "where the fake source lives"),
    OPT("interval", NULL, EMX_OPT_DURATION, "5s", interval_ms, "how often to look"),
    OPT("max_size", NULL, EMX_OPT_SIZE, "64KiB", max_size, "largest answer"),
    OPT("retries", NULL, EMX_OPT_INT, "3", retries, "attempts before giving up"),
    OPT("verbose", NULL, EMX_OPT_BOOL, "false", verbose, "log every answer"),
    OPT("tags", NULL, EMX_OPT_STRING_LIST, NULL, tags, "tags to match"),
    OPT("token", NULL, EMX_OPT_SECRET, NULL, token, "access token"),
#if defined(FAKE_OPT_OFFSET)
    {"beyond", NULL, EMX_OPT_SIZE, NULL, false, sizeof(struct fake_discovery_config),
     "bound past the end of the config"},
#elif defined(FAKE_OPT_DUP)
    OPT("interval", NULL, EMX_OPT_DURATION, "1s", interval_ms, "the same key twice"),
#elif defined(FAKE_OPT_ALIAS_DUP)
    OPT("period", "cx-server.fake.endpoint", EMX_OPT_DURATION, "1s", interval_ms,
        "an alias another option already has"),
#elif defined(FAKE_OPT_TYPE)
    {"odd", NULL, (enum emx_opt_type)99, NULL, false, 0, "a type no core knows"},
#elif defined(FAKE_OPT_NONAME)
    {NULL, NULL, EMX_OPT_BOOL, NULL, false, offsetof(struct fake_discovery_config, verbose),
     "no key"},
#endif
    EMX_OPTION_END,
};

#ifndef FAKE_MAGIC
#define FAKE_MAGIC EMX_PLUGIN_MAGIC
#endif
#ifndef FAKE_MAJOR
#define FAKE_MAJOR EMX_ABI_MAJOR
#endif
#ifndef FAKE_MINOR
#define FAKE_MINOR EMX_ABI_MINOR
#endif
#ifndef FAKE_STRUCT_SIZE
#define FAKE_STRUCT_SIZE sizeof(struct emx_discovery_plugin)
#endif
#ifndef FAKE_NAME
#define FAKE_NAME "fake"
#endif
#ifndef FAKE_CONFIG_SIZE
#define FAKE_CONFIG_SIZE sizeof(struct fake_discovery_config)
#endif
#ifndef FAKE_EXPORT_NAME
#define FAKE_EXPORT_NAME emx_discovery_plugin
#endif

EMX_PLUGIN_EXPORT const struct fake_discovery FAKE_EXPORT_NAME = {
    .d =
        {
            .hdr =
                {
                    .magic = FAKE_MAGIC,
                    .abi_major = FAKE_MAJOR,
                    .abi_minor = FAKE_MINOR,
                    .kind = EMX_PLUGIN_DISCOVERY,
                    .struct_size = (uint32_t)(FAKE_STRUCT_SIZE),
                    .name = FAKE_NAME,
                    .version = "0.0.1-test",
                },
            .options = fake_options,
            .config_size = FAKE_CONFIG_SIZE,
            .create = fake_create,
#ifndef FAKE_NO_START
            .start = fake_start,
#endif
            .stop = fake_stop,
            .destroy = fake_destroy,
            .reconfigure = fake_reconfigure,
        },
    .calls = &calls,
};
