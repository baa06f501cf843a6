/* The running server: one libuv loop carrying the transport plugin, the
 * discovery plugin, the router, its timers, signals and the admin listener.
 * Pipes are (re)connected here with backoff; the router decides the rest. */
#ifndef EMX_SERVER_H
#define EMX_SERVER_H

#include "setup.h"

/* Run until SIGTERM/SIGINT and a clean shutdown. Returns 0 on a clean exit,
 * a negative errno when start-up failed (logged). */
int emx_server_run(struct emx_setup *setup);

#endif
