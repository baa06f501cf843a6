/* server.user: the privilege drop, run in child processes so the test
 * process keeps its identity. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pwd.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "privdrop.h"

/* Run fn in a child; return its exit status. */
static int in_child(int (*fn)(void))
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(fn());
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

static int become_nobody(void)
{
    char err[256];
    if (emx_drop_privileges("nobody", err, sizeof(err)) != 0)
        return 1;
    struct passwd *pw = getpwnam("nobody");
    if (!pw || getuid() != pw->pw_uid || geteuid() != pw->pw_uid || getgid() != pw->pw_gid)
        return 2;
    if (setuid(0) == 0)
        return 3;
    /* Already that user: a no-op that succeeds. */
    if (emx_drop_privileges("nobody", err, sizeof(err)) != 0)
        return 4;
    /* Now not root: becoming someone else fails with a message. */
    if (emx_drop_privileges("root", err, sizeof(err)) == 0 || !strstr(err, "not running as root"))
        return 5;
    return 0;
}

static void test_drop_to_nobody(void **state)
{
    (void)state;
    if (geteuid() != 0 || !getpwnam("nobody")) {
        skip();
        return;
    }
    assert_int_equal(in_child(become_nobody), 0);
}

static void test_unknown_user(void **state)
{
    (void)state;
    char err[256];
    assert_true(emx_drop_privileges("no-such-user-here", err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "no-such-user-here"));
    assert_true(emx_drop_privileges("", err, sizeof(err)) < 0);
    assert_true(emx_drop_privileges(NULL, err, sizeof(err)) < 0);
}

static int become_numeric(void)
{
    char err[256];
    if (emx_drop_privileges("54321", err, sizeof(err)) != 0)
        return 1;
    return getuid() == 54321 && geteuid() == 54321 && setuid(0) != 0 ? 0 : 2;
}

static void test_numeric_uid(void **state)
{
    (void)state;
    if (geteuid() != 0) {
        skip();
        return;
    }
    assert_int_equal(in_child(become_numeric), 0);
    char err[256];
    assert_true(emx_drop_privileges("0", err, sizeof(err)) < 0); /* never "become" root */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drop_to_nobody),
        cmocka_unit_test(test_unknown_user),
        cmocka_unit_test(test_numeric_uid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
