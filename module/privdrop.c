#include "privdrop.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
