/* Per-pipe writability (DESIGN §4 rule 2): watermark hysteresis and the
 * stall signal of a pipe that has requests pending but receives nothing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "watermark.h"

#define LOW  100
#define HIGH 200

static void wm_starts_writable(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    assert_true(wm.writable);
    assert_int_equal(wm.queued, 0);
}

static void wm_crossing_high_fires_once(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    assert_false(emx_wm_set_queued(&wm, HIGH)); /* at high: not over it */
    assert_true(wm.writable);
    assert_true(emx_wm_set_queued(&wm, HIGH + 1));
    assert_false(wm.writable);
    assert_false(emx_wm_set_queued(&wm, HIGH + 2));
    assert_false(emx_wm_set_queued(&wm, HIGH * 10));
    assert_false(wm.writable);
}

static void wm_falling_to_low_reenables(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    assert_true(emx_wm_set_queued(&wm, HIGH + 1));
    /* Between the marks, and at low + 1: still unwritable. */
    assert_false(emx_wm_set_queued(&wm, HIGH));
    assert_false(emx_wm_set_queued(&wm, (LOW + HIGH) / 2));
    assert_false(emx_wm_set_queued(&wm, LOW + 1));
    assert_false(wm.writable);
    assert_true(emx_wm_set_queued(&wm, LOW));
    assert_true(wm.writable);
    assert_false(emx_wm_set_queued(&wm, 0));
    assert_true(wm.writable);
    /* Rising again between the marks does not turn it off. */
    assert_false(emx_wm_set_queued(&wm, HIGH));
    assert_true(wm.writable);
}

static void wm_draining_without_crossing_fires_nothing(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    for (uint64_t q = 0; q <= HIGH; q += 10)
        assert_false(emx_wm_set_queued(&wm, q));
    for (uint64_t q = HIGH; q > 0; q -= 10)
        assert_false(emx_wm_set_queued(&wm, q));
    assert_false(emx_wm_set_queued(&wm, 0));
    assert_true(wm.writable);
}

static void wm_moving_marks_down_reevaluates(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    assert_false(emx_wm_set_queued(&wm, 150));
    assert_true(wm.writable);
    /* 150 is now over the new high: off at once. */
    assert_true(emx_wm_set_marks(&wm, 50, 100));
    assert_false(wm.writable);
    assert_false(emx_wm_set_marks(&wm, 60, 120)); /* still over */
    assert_false(wm.writable);
}

static void wm_moving_marks_up_reevaluates(void **state)
{
    (void)state;
    struct emx_watermark wm;
    emx_wm_init(&wm, LOW, HIGH);
    assert_true(emx_wm_set_queued(&wm, 300));
    assert_false(wm.writable);
    /* Raising high above the queue is not enough: hysteresis wants low. */
    assert_false(emx_wm_set_marks(&wm, 200, 400));
    assert_false(wm.writable);
    /* 300 is at or below the new low: on at once. */
    assert_true(emx_wm_set_marks(&wm, 300, 600));
    assert_true(wm.writable);
    assert_int_equal(wm.low, 300);
    assert_int_equal(wm.high, 600);
}

static void stall_nothing_answerable_never_stalls(void **state)
{
    (void)state;
    struct emx_stall s;
    emx_stall_init(&s);
    assert_false(emx_stall_is_stalled(&s, false, 0, 0, 2000, 500));
    assert_false(emx_stall_is_stalled(&s, false, 0, 0, 100000, 500));
    assert_false(emx_stall_is_stalled(&s, false, 0, 0, UINT64_MAX / 2, 1));
}

static void stall_answerable_and_silent_stalls(void **state)
{
    (void)state;
    struct emx_stall s;
    emx_stall_init(&s);
    emx_stall_received(&s); /* before the request: no sign of life for it */
    uint64_t mark = s.received;
    assert_false(emx_stall_is_stalled(&s, true, 1000, mark, 1000, 2000));
    assert_false(emx_stall_is_stalled(&s, true, 1000, mark, 2999, 2000));
    assert_true(emx_stall_is_stalled(&s, true, 1000, mark, 3000, 2000));
    assert_true(emx_stall_is_stalled(&s, true, 1000, mark, 9000, 2000));
}

static void stall_receive_after_oldest_clears(void **state)
{
    (void)state;
    struct emx_stall s;
    emx_stall_init(&s);
    uint64_t mark = s.received;
    assert_true(emx_stall_is_stalled(&s, true, 1000, mark, 5000, 2000));
    emx_stall_received(&s);
    assert_false(emx_stall_is_stalled(&s, true, 1000, mark, 5000, 2000));
    assert_false(emx_stall_is_stalled(&s, true, 1000, mark, 60000, 2000));
    /* a newer oldest request (the old one answered) starts a new clock */
    mark = s.received;
    assert_false(emx_stall_is_stalled(&s, true, 6000, mark, 7999, 2000));
    assert_true(emx_stall_is_stalled(&s, true, 6000, mark, 8000, 2000));
}

static void stall_after_zero_never_stalls(void **state)
{
    (void)state;
    struct emx_stall s;
    emx_stall_init(&s);
    assert_false(emx_stall_is_stalled(&s, true, 0, 0, 0, 0));
    assert_false(emx_stall_is_stalled(&s, true, 0, 0, 1000000, 0));
}

static void stall_time_before_oldest_is_not_stalled(void **state)
{
    (void)state;
    struct emx_stall s;
    emx_stall_init(&s);
    assert_false(emx_stall_is_stalled(&s, true, 50000, 0, 1000, 2000));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(wm_starts_writable),
        cmocka_unit_test(wm_crossing_high_fires_once),
        cmocka_unit_test(wm_falling_to_low_reenables),
        cmocka_unit_test(wm_draining_without_crossing_fires_nothing),
        cmocka_unit_test(wm_moving_marks_down_reevaluates),
        cmocka_unit_test(wm_moving_marks_up_reevaluates),
        cmocka_unit_test(stall_nothing_answerable_never_stalls),
        cmocka_unit_test(stall_answerable_and_silent_stalls),
        cmocka_unit_test(stall_receive_after_oldest_clears),
        cmocka_unit_test(stall_after_zero_never_stalls),
        cmocka_unit_test(stall_time_before_oldest_is_not_stalled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
