/* The admin listener keeps serving after a connection could not be given
 * memory: that connection is dropped, the next one is answered. Actions
 * (anything but GET and HEAD) need the token, the admin address as Host
 * (and Origin, when sent). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "admin.h"
#include "alloc.h"

static bool always_ready(void *ctx)
{
    (void)ctx;
    return true;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

static int connect_to(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 20000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* Run the loop until the peer answered or closed; returns bytes read (0 = EOF). */
static ssize_t exchange(uv_loop_t *loop, int fd, char *buf, size_t cap)
{
    const char req[] = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    (void)!write(fd, req, sizeof(req) - 1);
    size_t got = 0;
    for (int i = 0; i < 200; i++) {
        uv_run(loop, UV_RUN_NOWAIT);
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n == 0)
            break;
        if (n > 0) {
            got += (size_t)n;
            buf[got] = '\0';
            if (strstr(buf, "\r\n\r\n") && strstr(buf, "ok\n"))
                break;
        }
    }
    return (ssize_t)got;
}

static void test_oom_connection_dropped_next_answered(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    int port = free_port();
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    struct emx_admin_ops ops = {.ctx = NULL, .ready = always_ready};
    struct emx_admin *a = NULL;
    assert_int_equal(emx_admin_start(&loop, addr, &ops, NULL, &a), 0);

    char buf[2048];
    emx_alloc_fail_at(1); /* this connection's memory cannot be had */
    int fd = connect_to(port);
    ssize_t n = exchange(&loop, fd, buf, sizeof(buf));
    emx_alloc_fail_at(0);
    close(fd);
    assert_int_equal(n, 0); /* dropped, not answered */

    for (int i = 0; i < 3; i++) { /* and the listener still serves */
        fd = connect_to(port);
        n = exchange(&loop, fd, buf, sizeof(buf));
        close(fd);
        assert_true(n > 0);
        assert_non_null(strstr(buf, "HTTP/1.1 200"));
    }

    emx_admin_stop(a);
    for (int i = 0; i < 50 && uv_run(&loop, UV_RUN_NOWAIT); i++)
        usleep(1000);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_header_lookup(void **state)
{
    (void)state;
    const char head[] = "POST /x HTTP/1.1\r\nhost:  a:1 \r\nX-Host: no\r\nAuthorization:"
                        "Bearer t\r\nHOST: b\r\n\r\nHost: body\r\n";
    const char *v = NULL;
    size_t n = 0;
    assert_int_equal(emx_admin_header(head, sizeof(head) - 1, "Host", &v, &n), 2);
    assert_int_equal(n, 3);
    assert_memory_equal(v, "a:1", 3);
    assert_int_equal(emx_admin_header(head, sizeof(head) - 1, "Authorization", &v, &n), 1);
    assert_memory_equal(v, "Bearer t", n);
    assert_int_equal(emx_admin_header(head, sizeof(head) - 1, "Origin", &v, &n), 0);
    const char bare[] = "GET / HTTP/1.0\n\n";
    assert_int_equal(emx_admin_header(bare, sizeof(bare) - 1, "Host", &v, &n), 0);
}

static bool host_ok(const char *listen, const char *host)
{
    return emx_admin_host_ok(listen, host, strlen(host));
}

static void test_host_check(void **state)
{
    (void)state;
    /* a loopback listen address: its loopback names */
    assert_true(host_ok("127.0.0.1:9900", "127.0.0.1:9900"));
    assert_true(host_ok("127.0.0.1:9900", "localhost:9900"));
    assert_true(host_ok("127.0.0.1:9900", "LocalHost:9900"));
    assert_true(host_ok("127.0.0.1:9900", "[::1]:9900"));
    assert_true(host_ok("[::1]:9900", "[0:0::1]:9900"));
    assert_true(host_ok("[::1]:9900", "127.0.0.1:9900"));
    assert_true(host_ok("127.0.0.1:80", "localhost"));
    assert_false(host_ok("127.0.0.1:9900", "localhost"));         /* port 80 */
    assert_false(host_ok("127.0.0.1:9900", "localhost:9901"));    /* another port */
    assert_false(host_ok("127.0.0.1:9900", "evil.example:9900")); /* DNS rebinding */
    assert_false(host_ok("127.0.0.1:9900", "localhost.:9900"));
    assert_false(host_ok("127.0.0.1:9900", "10.0.0.1:9900"));
    assert_false(host_ok("127.0.0.1:9900", "127.0.0.1:09x0"));
    assert_false(host_ok("127.0.0.1:9900", "127.0.0.1:"));
    assert_false(host_ok("127.0.0.1:9900", "::1:9900"));
    assert_false(host_ok("127.0.0.1:9900", ""));
    assert_false(host_ok("127.0.0.1:9900", "[::1:9900"));
    /* a management address: only itself */
    assert_true(host_ok("10.1.2.3:9900", "10.1.2.3:9900"));
    assert_false(host_ok("10.1.2.3:9900", "localhost:9900"));
    assert_false(host_ok("10.1.2.3:9900", "10.1.2.4:9900"));
    assert_false(host_ok("10.1.2.3:9900", "admin.example:9900"));
    /* a wildcard: any IP literal or localhost, never a name */
    assert_true(host_ok("0.0.0.0:9900", "10.9.8.7:9900"));
    assert_true(host_ok("0.0.0.0:9900", "localhost:9900"));
    assert_true(host_ok("[::]:9900", "[fe80::1]:9900"));
    assert_false(host_ok("0.0.0.0:9900", "rebind.example:9900"));
    assert_false(host_ok(NULL, "localhost:9900"));
}

static void test_authorize(void **state)
{
    (void)state;
    const char *L = "127.0.0.1:9900", *T = "0123456789abcdef0123";
    const char *why = NULL;
#define AUTHZ(head, token) emx_admin_authorize(head, strlen(head), L, token, &why)
    const char ok[] = "POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\n"
                      "Authorization: Bearer 0123456789abcdef0123\r\n\r\n";
    assert_int_equal(AUTHZ(ok, T), 0);
    assert_int_equal(AUTHZ(ok, NULL), 403);
    assert_string_equal(why, "admin actions are off (no admin.token_file)\n");
    assert_int_equal(AUTHZ(ok, ""), 403);
    assert_int_equal(AUTHZ(ok, "0123456789abcdef0124"), 403);
    assert_non_null(strstr(why, "token"));
    assert_int_equal(AUTHZ(ok, "0123456789abcdef012"), 403);   /* a prefix of the sent one */
    assert_int_equal(AUTHZ(ok, "0123456789abcdef01234"), 403); /* longer than the sent one */
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: localhost:9900\r\nauthorization:  bearer  "
                           "0123456789abcdef0123 \r\n\r\n",
                           T),
                     0);
    /* wrong or missing Host, or two of them */
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: evil.example:9900\r\nAuthorization: "
                           "Bearer 0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_non_null(strstr(why, "Host"));
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nAuthorization: Bearer "
                           "0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: localhost:9900\r\nHost: evil:9900\r\n"
                           "Authorization: Bearer 0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    /* a page elsewhere (Origin), even with the right Host */
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nOrigin: "
                           "http://evil.example\r\nAuthorization: Bearer "
                           "0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_non_null(strstr(why, "Origin"));
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nOrigin: null\r\n"
                           "Authorization: Bearer 0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nOrigin: "
                           "http://localhost:9900\r\nAuthorization: Bearer "
                           "0123456789abcdef0123\r\n\r\n",
                           T),
                     0);
    /* no token, another scheme, the token twice */
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\n\r\n", T), 403);
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nAuthorization: Basic "
                           "0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nAuthorization: "
                           "Bearer0123456789abcdef0123\r\n\r\n",
                           T),
                     403);
    assert_int_equal(AUTHZ("POST /x HTTP/1.1\r\nHost: 127.0.0.1:9900\r\nAuthorization: Bearer "
                           "0123456789abcdef0123\r\nAuthorization: Bearer x\r\n\r\n",
                           T),
                     403);
    assert_null(strstr(why, T)); /* the reason never repeats a token */
#undef AUTHZ
}

struct handled {
    int calls;
};

static void count_handle(void *ctx, const struct emx_admin_request *req,
                         struct emx_admin_response *resp)
{
    (void)req;
    ((struct handled *)ctx)->calls++;
    resp->status = 200;
    emx_textbuf_puts(&resp->body, "done\n");
}

/* One request over a socket; the answer's status code. */
static int ask(uv_loop_t *loop, int port, const char *req, char *buf, size_t cap)
{
    int fd = connect_to(port);
    (void)!write(fd, req, strlen(req));
    size_t got = 0;
    for (int i = 0; i < 200; i++) {
        uv_run(loop, UV_RUN_NOWAIT);
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n == 0)
            break;
        if (n > 0)
            got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    int status = 0;
    sscanf(buf, "HTTP/1.1 %d", &status);
    return status;
}

static void test_actions_need_token_over_socket(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    int port = free_port();
    char addr[64], req[512], buf[2048];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    struct handled h = {0};
    struct emx_admin_ops ops = {.ctx = &h, .ready = always_ready, .handle = count_handle};
    struct emx_admin *a = NULL;
    assert_int_equal(emx_admin_start(&loop, addr, &ops, NULL, &a), 0);
    const char *token = "tok-0123456789abcdef";
    snprintf(req, sizeof(req),
             "POST /instances/x/maintenance HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer "
             "%s\r\n\r\n",
             addr, token);
    assert_int_equal(ask(&loop, port, req, buf, sizeof(buf)), 403); /* no token set: off */
    assert_non_null(strstr(buf, "admin actions are off"));
    assert_int_equal(h.calls, 0);
    assert_int_equal(emx_admin_set_token(a, token), 0);
    assert_int_equal(ask(&loop, port, req, buf, sizeof(buf)), 200);
    assert_int_equal(h.calls, 1);
    /* GET stays open; DELETE is an action too */
    snprintf(req, sizeof(req), "GET /instances HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(ask(&loop, port, req, buf, sizeof(buf)), 200);
    assert_int_equal(h.calls, 2);
    snprintf(req, sizeof(req), "DELETE /instances/x/maintenance HTTP/1.1\r\nHost: %s\r\n\r\n",
             addr);
    assert_int_equal(ask(&loop, port, req, buf, sizeof(buf)), 403);
    assert_int_equal(h.calls, 2);
    assert_null(strstr(buf, token));
    assert_int_equal(emx_admin_set_token(a, NULL), 0); /* a reload without token_file */
    snprintf(req, sizeof(req), "POST /x HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n\r\n",
             addr, token);
    assert_int_equal(ask(&loop, port, req, buf, sizeof(buf)), 403);
    assert_int_equal(h.calls, 2);
    emx_admin_set_token(a, "left-for-the-free-path-0123");
    emx_admin_stop(a);
    for (int i = 0; i < 50 && uv_run(&loop, UV_RUN_NOWAIT); i++)
        usleep(1000);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oom_connection_dropped_next_answered),
        cmocka_unit_test(test_header_lookup),
        cmocka_unit_test(test_host_check),
        cmocka_unit_test(test_authorize),
        cmocka_unit_test(test_actions_need_token_over_socket),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
