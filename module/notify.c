/* sd_notify wrappers and the watchdog timer. See notify.h. */
#include "notify.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <time.h>

#ifdef EMX_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

static struct {
    uv_timer_t timer;
    bool running;
    uint64_t period_ms;
} wd;

#ifdef EMX_HAVE_SYSTEMD
/* sd_notify() is itself a no-op without NOTIFY_SOCKET; 0 keeps the variable
 * so later notifications (watchdog, stopping) still reach systemd. */
static void send_state(const char *state)
{
    (void)sd_notify(0, state);
}
#else
static void send_state(const char *state)
{
    (void)state;
}
#endif

void emx_notify_ready(const char *status)
{
    if (!status) {
        send_state("READY=1");
        return;
    }
    char buf[512];
    snprintf(buf, sizeof(buf), "READY=1\nSTATUS=%s", status);
    send_state(buf);
}

void emx_notify_reloading(void)
{
    /* MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) match the reload
     * to this message; older versions ignore it. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char buf[96];
    snprintf(buf, sizeof(buf), "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000);
    send_state(buf);
}

void emx_notify_stopping(void)
{
    send_state("STOPPING=1");
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    send_state("WATCHDOG=1");
}

int emx_notify_watchdog_start(uv_loop_t *loop)
{
    if (wd.running)
        return 0;
#ifdef EMX_HAVE_SYSTEMD
    uint64_t usec = 0;
    /* 0: also checks WATCHDOG_PID, so a child never pings for its parent. */
    if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return 0;
    /* Half the interval, as sd_watchdog_enabled(3) advises; at least 1 ms. */
    wd.period_ms = usec / 2000 ? usec / 2000 : 1;
    int rc = uv_timer_init(loop, &wd.timer);
    if (rc)
        return rc;
    wd.running = true;
    send_state("WATCHDOG=1");
    return uv_timer_start(&wd.timer, on_watchdog, wd.period_ms, wd.period_ms);
#else
    (void)loop;
    (void)on_watchdog;
    return 0;
#endif
}

void emx_notify_watchdog_stop(void)
{
    if (!wd.running)
        return;
    wd.running = false;
    wd.period_ms = 0;
    uv_timer_stop(&wd.timer);
    uv_close((uv_handle_t *)&wd.timer, NULL);
}

uint64_t emx_notify_watchdog_period_ms(void)
{
    return wd.period_ms;
}
