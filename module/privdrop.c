#include "privdrop.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define EMX_SANITIZER_BUILD 1
#endif
#endif
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define EMX_SANITIZER_BUILD 1
#endif

#ifdef EMX_SANITIZER_BUILD
#include <sanitizer/common_interface_defs.h>

/* Sanitizer builds (scripts/test.sh): the sanitizer names the functions of
 * a report through a helper process it starts at its first report. Started
 * after the switch, the helper could no longer read a binary kept in a
 * directory only root may enter, and a report would show bare addresses
 * (which the suppressions cannot match): start it now. */
static void sanitizer_symbolizer_start(void)
{
    char buf[128];
    __sanitizer_symbolize_pc(__builtin_return_address(0), "%F", buf, sizeof(buf));
}
#else
static void sanitizer_symbolizer_start(void) {}
#endif

static int fail(char *err, size_t errlen, int rc, const char *fmt, const char *user)
{
    if (err && errlen)
        snprintf(err, errlen, fmt, user, strerror(-rc));
    return rc;
}

int emx_drop_privileges(const char *user, char *err, size_t errlen)
{
    if (!user || !user[0])
        return fail(err, errlen, -EINVAL, "server.user '%s': empty user name (%s)", "");
    if (geteuid() == 0)
        sanitizer_symbolizer_start();
    struct passwd pwbuf, *pw = NULL;
    char buf[4096];
    int e = getpwnam_r(user, &pwbuf, buf, sizeof(buf), &pw);
    if (!pw) {
        /* A numeric uid names a user that may have no passwd entry. */
        char *end;
        errno = 0;
        unsigned long uid = strtoul(user, &end, 10);
        if (*end || end == user || errno || uid == 0 || uid > 0x7fffffff)
            return fail(err, errlen, e ? -e : -ENOENT, "server.user '%s': no such user (%s)", user);
        if (getuid() == (uid_t)uid && geteuid() == (uid_t)uid)
            return 0;
        if (geteuid() != 0)
            return fail(err, errlen, -EPERM, "server.user '%s': not running as root (%s)", user);
        gid_t gid = (gid_t)uid;
        if (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid((uid_t)uid) != 0)
            return fail(err, errlen, -errno, "server.user '%s': cannot switch (%s)", user);
    } else {
        if (getuid() == pw->pw_uid && geteuid() == pw->pw_uid)
            return 0;
        if (geteuid() != 0)
            return fail(err, errlen, -EPERM, "server.user '%s': not running as root (%s)", user);
        if (initgroups(pw->pw_name, pw->pw_gid) != 0 || setgid(pw->pw_gid) != 0 ||
            setuid(pw->pw_uid) != 0)
            return fail(err, errlen, -errno, "server.user '%s': cannot switch (%s)", user);
    }
    /* The switch must be one way: root must not come back. */
    if (geteuid() == 0 || setuid(0) == 0)
        return fail(err, errlen, -EPERM, "server.user '%s': root could be regained (%s)", user);
    return 0;
}
