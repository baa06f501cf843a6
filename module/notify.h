/* Service manager notifications (systemd Type=notify, through libsystemd):
 * READY once edgemux serves, RELOADING/READY around a reload, STOPPING when
 * it drains, and a watchdog keep-alive sent from the event loop, so a loop
 * that hangs is restarted by systemd. When not started by systemd (no
 * NOTIFY_SOCKET) or built without libsystemd, every call does nothing. */
#ifndef EMX_NOTIFY_H
#define EMX_NOTIFY_H

#include <uv.h>

/* READY=1, with an optional one-line STATUS= for `systemctl status`. */
void emx_notify_ready(const char *status);
/* RELOADING=1: a SIGHUP reload began; call emx_notify_ready() when done. */
void emx_notify_reloading(void);
/* STOPPING=1: shutdown or drain began. */
void emx_notify_stopping(void);
/* When the service has a watchdog (WatchdogSec=, seen as WATCHDOG_USEC),
 * sends WATCHDOG=1 from a timer on loop at half the interval. Returns 0 (also
 * when there is no watchdog) or -errno. One watchdog per process. */
int emx_notify_watchdog_start(uv_loop_t *loop);
/* Closes the watchdog timer (if any) so the loop can end; safe to repeat. */
void emx_notify_watchdog_stop(void);
/* The watchdog period in ms (half of WATCHDOG_USEC), 0 when off. */
uint64_t emx_notify_watchdog_period_ms(void);

#endif
