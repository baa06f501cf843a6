/* The admin listener keeps serving after a connection could not be given
 * memory: that connection is dropped, the next one is answered. */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oom_connection_dropped_next_answered),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
