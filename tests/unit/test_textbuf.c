/* The bounded text writer behind the admin API's JSON and metrics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "alloc.h"
#include "textbuf.h"

static void json_strings_are_escaped_and_valid(void **state)
{
    (void)state;
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_textbuf_json_str(&b, "a\"b\\c\n\x01\x7f");
    emx_textbuf_puts(&b, " ");
    emx_textbuf_json_str(&b, "caf\xc3\xa9 \xff\xc3"); /* valid é, then invalid bytes */
    emx_textbuf_puts(&b, " ");
    emx_textbuf_json_str(&b, NULL);
    assert_false(b.failed);
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\u000a\\u0001\\u007f\" \"caf\xc3\xa9 ??\" null");
    emx_textbuf_free(&b);
}

static void prometheus_labels_are_escaped(void **state)
{
    (void)state;
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_textbuf_prom_label(&b, "x\"y\\z\nw\x01");
    assert_string_equal(b.data, "x\\\"y\\\\z\\nw");
    emx_textbuf_free(&b);
}

static void cap_and_printf(void **state)
{
    (void)state;
    struct emx_textbuf b;
    emx_textbuf_init(&b, 10);
    emx_textbuf_printf(&b, "%d-%s", 42, "abc");
    assert_string_equal(b.data, "42-abc");
    emx_textbuf_puts(&b, "12345"); /* would pass the cap */
    assert_true(b.failed);
    emx_textbuf_puts(&b, "x"); /* ignored once failed */
    assert_string_equal(b.data, "42-abc");
    emx_textbuf_free(&b);
    /* long formatted text goes through the second vsnprintf */
    emx_textbuf_init(&b, 0);
    char big[1000];
    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    emx_textbuf_printf(&b, "<%s>", big);
    assert_int_equal(b.len, 1001);
    assert_false(b.failed);
    emx_textbuf_free(&b);
}

static void out_of_memory_sets_failed(void **state)
{
    (void)state;
    struct emx_textbuf b;
    emx_textbuf_init(&b, 0);
    emx_alloc_fail_at(1);
    emx_textbuf_puts(&b, "x");
    emx_alloc_fail_at(0);
    assert_true(b.failed);
    assert_null(b.data);
    emx_textbuf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(json_strings_are_escaped_and_valid),
        cmocka_unit_test(prometheus_labels_are_escaped),
        cmocka_unit_test(cap_and_printf),
        cmocka_unit_test(out_of_memory_sets_failed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
