/* Dropping root after the listening sockets are open (server.user). */
#ifndef EMX_PRIVDROP_H
#define EMX_PRIVDROP_H

#include <stddef.h>

/* Become `user` (name or numeric uid): its primary group, its supplementary
 * groups, then its uid, and check that root cannot be regained. A process
 * already running as that user succeeds without change; a non-root process
 * asked to become another user fails. Returns 0, or a negative errno with
 * one line in err. */
int emx_drop_privileges(const char *user, char *err, size_t errlen);

#endif
