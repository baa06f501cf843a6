/* A fake transport plugin: minimal bodies, no connections. Built as the
 * good one, without send (FAKE_NO_SEND), and exported under the discovery
 * symbol name (FAKE_EXPORT_NAME) to test the kind check. */
#include <errno.h>

#include "edgemux/transport.h"
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

static int fake_start(void *instance)
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

static int fake_listen(void *instance, const struct emx_listen_spec *spec,
                       const struct emx_conn_callbacks *cb, void *user, struct emx_listener **out)
{
    (void)instance;
    (void)spec;
    (void)cb;
    (void)user;
    (void)out;
    calls++;
    return -ENOTSUP;
}

static void fake_unlisten(struct emx_listener *listener)
{
    (void)listener;
    calls++;
}

static int fake_connect(void *instance, const struct emx_connect_spec *spec,
                        const struct emx_conn_callbacks *cb, void *user, struct emx_conn **out)
{
    (void)instance;
    (void)spec;
    (void)cb;
    (void)user;
    (void)out;
    calls++;
    return -ENOTSUP;
}

__attribute__((unused)) static int fake_send(struct emx_conn *conn, const uint8_t *data, size_t len)
{
    (void)conn;
    (void)data;
    (void)len;
    calls++;
    return -ENOTCONN;
}

static size_t fake_buffered(struct emx_conn *conn)
{
    (void)conn;
    calls++;
    return 0;
}

static int fake_pause_read(struct emx_conn *conn, bool pause)
{
    (void)conn;
    (void)pause;
    calls++;
    return -ENOTCONN;
}

static void fake_close(struct emx_conn *conn, uint16_t code, const char *reason)
{
    (void)conn;
    (void)code;
    (void)reason;
    calls++;
}

#ifndef FAKE_EXPORT_NAME
#define FAKE_EXPORT_NAME emx_transport_plugin
#endif

EMX_PLUGIN_EXPORT const struct fake_transport FAKE_EXPORT_NAME = {
    .d =
        {
            .hdr = EMX_PLUGIN_HEADER(EMX_PLUGIN_TRANSPORT, struct emx_transport_plugin, "fake",
                                     "0.0.1-test"),
            .options = NULL,
            .config_size = 0,
            .create = fake_create,
            .start = fake_start,
            .stop = fake_stop,
            .destroy = fake_destroy,
            .listen = fake_listen,
            .unlisten = fake_unlisten,
            .connect = fake_connect,
#ifndef FAKE_NO_SEND
            .send = fake_send,
#endif
            .buffered = fake_buffered,
            .pause_read = fake_pause_read,
            .close = fake_close,
        },
    .calls = &calls,
};
