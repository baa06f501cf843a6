/* The plugin loader against fake plugins built only for tests: every
 * refusal names the file, the reason and the expected/found values, and the
 * good plugins load without any of their code running. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "alloc.h"
#include "fake.h"
#include "loader.h"

#define FAKE_DIR EMX_TEST_PLUGIN_DIR

/* AddressSanitizer pads globals and their ELF symbol sizes with it. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

static char err[512];

/* The path the loader resolves `name` of `kind` to in the fake plugin dir. */
static const char *fake_path(const char *kind, const char *name)
{
    static char path[PATH_MAX];
    int n = snprintf(path, sizeof(path), "%s/emx-%s-%s.so", FAKE_DIR, kind, name);
    assert_true(n > 0 && (size_t)n < sizeof(path));
    return path;
}

static void assert_err_contains(const char *needle)
{
    if (!strstr(err, needle))
        fail_msg("error \"%s\" lacks \"%s\"", err, needle);
}

/* Load `name` into `kind`'s slot, expect refusal `rc`, a message that starts
 * with the file and contains `reason`. */
static void expect_refused(enum emx_plugin_kind kind, const char *name, int rc, const char *reason)
{
    struct emx_plugin *p = (struct emx_plugin *)1;
    memset(err, 0, sizeof(err));
    assert_int_equal(emx_plugin_load(FAKE_DIR, name, kind, &p, err, sizeof(err)), rc);
    assert_null(p);
    char prefix[PATH_MAX + 2];
    snprintf(prefix, sizeof(prefix), "%s: ", fake_path(emx_plugin_kind_name(kind), name));
    if (strncmp(err, prefix, strlen(prefix)) != 0)
        fail_msg("error \"%s\" does not start with \"%s\"", err, prefix);
    assert_err_contains(reason);
    assert_null(strchr(err, '\n'));
}

static void test_good_discovery_loads(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
                     0);
    assert_non_null(p);
    assert_string_equal(err, "");
    assert_int_equal(p->kind, EMX_PLUGIN_DISCOVERY);
    assert_string_equal(p->path, fake_path("discovery", "good"));
    assert_ptr_equal(p->hdr, &p->u.discovery->hdr);
    assert_int_equal(p->hdr->magic, EMX_PLUGIN_MAGIC);
    assert_int_equal(p->hdr->abi_major, EMX_ABI_MAJOR);
    assert_int_equal(p->hdr->abi_minor, EMX_ABI_MINOR);
    assert_int_equal(p->hdr->struct_size, sizeof(struct emx_discovery_plugin));
    assert_string_equal(p->hdr->name, "fake");
    assert_string_equal(p->hdr->version, "0.0.1-test");

    const struct emx_discovery_plugin *d = p->u.discovery;
    assert_int_equal(d->config_size, sizeof(struct fake_discovery_config));
    assert_non_null(d->options);
    assert_string_equal(d->options[0].name, "endpoint");
    assert_string_equal(d->options[0].alias, "cx-server.fake.endpoint");
    assert_int_equal(d->options[0].type, EMX_OPT_STRING);
    assert_non_null(d->reconfigure);
    emx_plugin_unload(p);
}

static void test_good_transport_loads(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_TRANSPORT, &p, err, sizeof(err)),
                     0);
    assert_int_equal(p->kind, EMX_PLUGIN_TRANSPORT);
    assert_int_equal(p->hdr->kind, EMX_PLUGIN_TRANSPORT);
    assert_int_equal(p->hdr->struct_size, sizeof(struct emx_transport_plugin));
    assert_string_equal(p->hdr->name, "fake");
    assert_null(p->u.transport->options);
    assert_non_null(p->u.transport->send);
    emx_plugin_unload(p);
}

/* The counter behind each fake descriptor is bumped by every plugin
 * function: it is 0 after load, and calling one shows the counter works. */
static void test_load_runs_no_plugin_code(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
                     0);
    const struct fake_discovery *fd = (const struct fake_discovery *)p->u.discovery;
    assert_int_equal(*fd->calls, 0);
    void *inst = NULL;
    assert_int_equal(p->u.discovery->create(NULL, NULL, &inst), 0);
    p->u.discovery->destroy(inst);
    assert_int_equal(*fd->calls, 2);
    emx_plugin_unload(p);

    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_TRANSPORT, &p, err, sizeof(err)),
                     0);
    const struct fake_transport *ft = (const struct fake_transport *)p->u.transport;
    assert_int_equal(*ft->calls, 0);
    assert_int_equal(p->u.transport->buffered(NULL), 0);
    assert_int_equal(*ft->calls, 1);
    emx_plugin_unload(p);
}

static void test_load_twice(void **state)
{
    (void)state;
    struct emx_plugin *a = NULL, *b = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &a, err, sizeof(err)),
                     0);
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &b, err, sizeof(err)),
                     0);
    assert_ptr_not_equal(a, b);
    /* One file, one mapping: the dynamic linker counts the references. */
    assert_ptr_equal(a->hdr, b->hdr);
    emx_plugin_unload(a);
    assert_string_equal(b->hdr->name, "fake");
    emx_plugin_unload(b);
}

static int open_fds(void)
{
    int n = 0;
    char path[64];
    for (int fd = 0; fd < 1024; fd++) {
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n += access(path, F_OK) == 0;
    }
    return n;
}

/* A reload names the plugins already running: they are shared, not opened
 * again, and each reference is dropped on its own. */
static void test_load_shared(void **state)
{
    (void)state;
    struct emx_plugin *t = NULL, *d = NULL, *again = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_TRANSPORT, &t, err, sizeof(err)),
                     0);
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &d, err, sizeof(err)),
                     0);
    int before = open_fds();
    struct emx_plugin *loaded[] = {t, d};
    for (int i = 0; i < 50; i++) {
        assert_int_equal(emx_plugin_load_shared(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, loaded, 2,
                                                &again, err, sizeof(err)),
                         0);
        assert_ptr_equal(again, d);
        assert_int_equal(d->refs, 2);
        emx_plugin_unload(again);
        assert_int_equal(d->refs, 1);
    }
    assert_int_equal(open_fds(), before);
    /* Another file is loaded on its own, even with a list given. */
    assert_int_equal(emx_plugin_load_shared(FAKE_DIR, "other", EMX_PLUGIN_DISCOVERY, loaded, 2,
                                            &again, err, sizeof(err)),
                     0);
    assert_ptr_not_equal(again, d);
    assert_int_equal(open_fds(), before + 1);
    emx_plugin_unload(again);
    assert_int_equal(open_fds(), before);
    emx_plugin_unload(t);
    emx_plugin_unload(d);
}

/* A plugin that stays mapped after dlclose keeps the name of its closed
 * descriptor; the next plugin opened on that number must not be taken for
 * it. */
static void test_stale_name_not_reused(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    assert_int_equal(
        emx_plugin_load(FAKE_DIR, "nodelete", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)), 0);
    int fd = p->fd;
    emx_plugin_unload(p);
    assert_int_equal(emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_TRANSPORT, &p, err, sizeof(err)),
                     0);
    assert_int_equal(p->kind, EMX_PLUGIN_TRANSPORT);
    assert_non_null(p->u.transport);
    assert_int_not_equal(p->fd, fd);
    emx_plugin_unload(p);
}

static void test_bad_magic(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "badmagic", -ENOEXEC,
                   "bad magic: expected 0x504d5845, found 0x12345678");
}

static void test_wrong_major(void **state)
{
    (void)state;
    char want[128];
    snprintf(want, sizeof(want), "ABI major mismatch: core %d, plugin %d", EMX_ABI_MAJOR,
             EMX_ABI_MAJOR + 1);
    expect_refused(EMX_PLUGIN_DISCOVERY, "major", -ENOTSUP, want);
}

static void test_newer_minor(void **state)
{
    (void)state;
    char want[128];
    snprintf(want, sizeof(want), "plugin built for ABI %d.%d, core supports up to %d.%d",
             EMX_ABI_MAJOR, EMX_ABI_MINOR + 1, EMX_ABI_MAJOR, EMX_ABI_MINOR);
    expect_refused(EMX_PLUGIN_DISCOVERY, "minor", -ENOTSUP, want);
}

static void test_short_struct(void **state)
{
    (void)state;
    char want[128];
    snprintf(want, sizeof(want), "descriptor too short: struct_size 24, need at least %zu",
             sizeof(struct emx_discovery_plugin));
    expect_refused(EMX_PLUGIN_DISCOVERY, "short", -ENOEXEC, want);
}

static void test_object_smaller_than_header(void **state)
{
    (void)state;
    if (UNDER_ASAN)
        skip(); /* the padded symbol looks big enough; the read would overflow */
    char want[128];
    snprintf(want, sizeof(want),
             "symbol emx_discovery_plugin too small: %zu bytes, header needs %zu", sizeof(uint32_t),
             sizeof(struct emx_plugin_header));
    expect_refused(EMX_PLUGIN_DISCOVERY, "tiny", -ENOEXEC, want);
}

/* struct_size may not claim more than the exported object holds. */
static void test_struct_size_beyond_object(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "big", -ENOEXEC,
                   "descriptor larger than its symbol: struct_size 4096, symbol ");
}

static void test_no_name(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "noname", -ENOEXEC, "descriptor has no name");
}

static void test_wrong_kind_descriptor(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "wrongkind", -ENOEXEC,
                   "wrong kind: expected discovery (2), found transport (1)");
}

static void test_transport_in_discovery_slot(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    int rc = emx_plugin_load_path(fake_path("transport", "good"), EMX_PLUGIN_DISCOVERY, &p, err,
                                  sizeof(err));
    assert_int_equal(rc, -ENOEXEC);
    assert_null(p);
    assert_err_contains(fake_path("transport", "good"));
    assert_err_contains("has no emx_discovery_plugin symbol; is it a transport plugin?");

    rc = emx_plugin_load_path(fake_path("discovery", "good"), EMX_PLUGIN_TRANSPORT, &p, err,
                              sizeof(err));
    assert_int_equal(rc, -ENOEXEC);
    assert_err_contains("has no emx_transport_plugin symbol; is it a discovery plugin?");
}

static void test_no_symbol(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "nosymbol", -ENOEXEC,
                   "has no emx_discovery_plugin symbol; not an edgemux discovery plugin");
}

static void test_missing_callback(void **state)
{
    (void)state;
    expect_refused(EMX_PLUGIN_DISCOVERY, "nostart", -ENOEXEC, "missing callback 'start'");
    expect_refused(EMX_PLUGIN_TRANSPORT, "nosend", -ENOEXEC, "missing callback 'send'");
}

static void test_bad_option_tables(void **state)
{
    (void)state;
    char want[160];
    snprintf(want, sizeof(want), "option 'beyond': offset %zu + size %zu exceeds config_size %zu",
             sizeof(struct fake_discovery_config), sizeof(uint64_t),
             sizeof(struct fake_discovery_config));
    expect_refused(EMX_PLUGIN_DISCOVERY, "optoffset", -ENOEXEC, want);
    expect_refused(EMX_PLUGIN_DISCOVERY, "optdup", -ENOEXEC, "duplicate option key 'interval'");
    expect_refused(EMX_PLUGIN_DISCOVERY, "optalias", -ENOEXEC,
                   "duplicate option key 'cx-server.fake.endpoint' (alias of 'period')");
    expect_refused(EMX_PLUGIN_DISCOVERY, "opttype", -ENOEXEC,
                   "option 'odd': bad type: expected 1..7, found 99");
    expect_refused(EMX_PLUGIN_DISCOVERY, "optnoname", -ENOEXEC, "option 7 has no name");
    expect_refused(EMX_PLUGIN_DISCOVERY, "optnosize", -ENOEXEC,
                   "option 'endpoint': options declared but config_size is 0");
}

static void test_bad_names(void **state)
{
    (void)state;
    char too_long[70];
    memset(too_long, 'a', 65);
    too_long[65] = '\0';
    const char *bad[] = {"../x", "a/b", "", "..", ".", "x.so", "a b", "a\nb", too_long};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct emx_plugin *p = NULL;
        int rc = emx_plugin_load(FAKE_DIR, bad[i], EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err));
        assert_int_equal(rc, -EINVAL);
        assert_null(p);
        assert_err_contains("bad discovery plugin name");
        assert_null(strchr(err, '\n'));
    }
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, NULL, EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
                     -EINVAL);
    /* 64 characters is the longest name: it passes the name check and is
     * then simply not found. */
    too_long[64] = '\0';
    assert_int_equal(
        emx_plugin_load(FAKE_DIR, too_long, EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)), -ENOENT);
}

static void test_missing_file(void **state)
{
    (void)state;
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "%s: cannot open: %s", fake_path("discovery", "missing"),
             strerror(ENOENT));
    struct emx_plugin *p = NULL;
    assert_int_equal(
        emx_plugin_load(FAKE_DIR, "missing", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)), -ENOENT);
    assert_string_equal(err, want);
    /* A trailing '/' on the directory does not double the separator. */
    assert_int_equal(
        emx_plugin_load(FAKE_DIR "/", "missing", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
        -ENOENT);
    assert_string_equal(err, want);
}

static void test_no_err_buffer(void **state)
{
    (void)state;
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(FAKE_DIR, "badmagic", EMX_PLUGIN_DISCOVERY, &p, NULL, 0),
                     -ENOEXEC);
    char tiny[8];
    assert_int_equal(
        emx_plugin_load(FAKE_DIR, "badmagic", EMX_PLUGIN_DISCOVERY, &p, tiny, sizeof(tiny)),
        -ENOEXEC);
    assert_int_equal(strlen(tiny), sizeof(tiny) - 1);
    assert_null(p);
}

static void test_alloc_failure(void **state)
{
    (void)state;
    for (unsigned long n = 1; n <= 2; n++) {
        struct emx_plugin *p = NULL;
        emx_alloc_fail_at(n);
        int rc = emx_plugin_load(FAKE_DIR, "good", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err));
        emx_alloc_fail_at(0);
        assert_int_equal(rc, -ENOMEM);
        assert_null(p);
        assert_err_contains("out of memory");
    }
}

/* A scratch directory holding copies of the good plugin with chosen modes
 * and owners. */
struct scratch {
    char dir[PATH_MAX];
    char path[PATH_MAX];
};

static int scratch_setup(void **state)
{
    struct scratch *s = calloc(1, sizeof(*s));
    if (!s)
        return -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(s->dir, sizeof(s->dir), "%s/emx-loader-XXXXXX", tmp && *tmp ? tmp : P_tmpdir);
    if (!mkdtemp(s->dir)) {
        free(s);
        return -1;
    }
    *state = s;
    return 0;
}

static int scratch_teardown(void **state)
{
    struct scratch *s = *state;
    if (s->path[0]) {
        unlink(s->path);
        rmdir(s->path); /* when the test made a directory there */
    }
    rmdir(s->dir);
    free(s);
    return 0;
}

/* s->path := <scratch dir>/emx-discovery-<name>.so */
static void scratch_name(struct scratch *s, const char *name)
{
    int n = snprintf(s->path, sizeof(s->path), "%s/emx-discovery-%s.so", s->dir, name);
    assert_true(n > 0 && (size_t)n < sizeof(s->path));
}

/* Copy the good discovery plugin into the scratch dir as emx-discovery-<name>.so. */
static void copy_good(struct scratch *s, const char *name, mode_t mode)
{
    scratch_name(s, name);
    FILE *in = fopen(fake_path("discovery", "good"), "rb");
    assert_non_null(in);
    FILE *out = fopen(s->path, "wb");
    assert_non_null(out);
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
        assert_int_equal(fwrite(buf, 1, n, out), n);
    assert_int_equal(fclose(out), 0);
    fclose(in);
    assert_int_equal(chmod(s->path, mode), 0);
}

static void expect_copy_refused(struct scratch *s, const char *name, int rc, const char *reason)
{
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(s->dir, name, EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)), rc);
    assert_null(p);
    assert_err_contains(s->path);
    assert_err_contains(reason);
}

static void test_copy_with_safe_mode_loads(void **state)
{
    struct scratch *s = *state;
    copy_good(s, "copy", 0644);
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(s->dir, "copy", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
                     0);
    assert_string_equal(p->hdr->name, "fake");
    emx_plugin_unload(p);
}

static void test_world_writable_refused(void **state)
{
    struct scratch *s = *state;
    copy_good(s, "ww", 0666);
    expect_copy_refused(s, "ww", -EPERM, "group or world writable (mode 0666)");
}

static void test_group_writable_refused(void **state)
{
    struct scratch *s = *state;
    copy_good(s, "gw", 0664);
    expect_copy_refused(s, "gw", -EPERM, "group or world writable (mode 0664)");
}

static void test_other_owner_refused(void **state)
{
    struct scratch *s = *state;
    if (geteuid() != 0)
        skip(); /* only root can give a file away */
    const struct passwd *pw = getpwnam("nobody");
    uid_t nobody = pw ? pw->pw_uid : 65534;
    copy_good(s, "other", 0644);
    assert_int_equal(chown(s->path, nobody, (gid_t)-1), 0);
    char want[128];
    snprintf(want, sizeof(want), "owned by uid %u, expected root (0) or the running user (0)",
             (unsigned)nobody);
    expect_copy_refused(s, "other", -EPERM, want);
}

static void test_not_regular_refused(void **state)
{
    struct scratch *s = *state;
    scratch_name(s, "fifo");
    assert_int_equal(mkfifo(s->path, 0644), 0);
    /* Must not block waiting for a writer. */
    expect_copy_refused(s, "fifo", -EPERM, "not a regular file");
    unlink(s->path);

    scratch_name(s, "dir");
    assert_int_equal(mkdir(s->path, 0755), 0);
    expect_copy_refused(s, "dir", -EPERM, "not a regular file");
}

static void test_not_elf_refused(void **state)
{
    struct scratch *s = *state;
    scratch_name(s, "text");
    FILE *f = fopen(s->path, "w");
    assert_non_null(f);
    fputs("not a shared object\n", f);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(chmod(s->path, 0644), 0);
    expect_copy_refused(s, "text", -ELIBBAD, "dlopen failed: ");
}

static void test_unload_null(void **state)
{
    (void)state;
    emx_plugin_unload(NULL);
}

static void test_symlink_checks_target(void **state)
{
    struct scratch *s = *state;
    scratch_name(s, "link");
    assert_int_equal(symlink(fake_path("discovery", "good"), s->path), 0);
    struct emx_plugin *p = NULL;
    assert_int_equal(emx_plugin_load(s->dir, "link", EMX_PLUGIN_DISCOVERY, &p, err, sizeof(err)),
                     0);
    emx_plugin_unload(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_discovery_loads),
        cmocka_unit_test(test_good_transport_loads),
        cmocka_unit_test(test_load_runs_no_plugin_code),
        cmocka_unit_test(test_load_twice),
        cmocka_unit_test(test_load_shared),
        cmocka_unit_test(test_stale_name_not_reused),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_wrong_major),
        cmocka_unit_test(test_newer_minor),
        cmocka_unit_test(test_short_struct),
        cmocka_unit_test(test_object_smaller_than_header),
        cmocka_unit_test(test_struct_size_beyond_object),
        cmocka_unit_test(test_no_name),
        cmocka_unit_test(test_wrong_kind_descriptor),
        cmocka_unit_test(test_transport_in_discovery_slot),
        cmocka_unit_test(test_no_symbol),
        cmocka_unit_test(test_missing_callback),
        cmocka_unit_test(test_bad_option_tables),
        cmocka_unit_test(test_bad_names),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_no_err_buffer),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test_setup_teardown(test_copy_with_safe_mode_loads, scratch_setup,
                                        scratch_teardown),
        cmocka_unit_test_setup_teardown(test_world_writable_refused, scratch_setup,
                                        scratch_teardown),
        cmocka_unit_test_setup_teardown(test_group_writable_refused, scratch_setup,
                                        scratch_teardown),
        cmocka_unit_test_setup_teardown(test_other_owner_refused, scratch_setup, scratch_teardown),
        cmocka_unit_test_setup_teardown(test_not_regular_refused, scratch_setup, scratch_teardown),
        cmocka_unit_test_setup_teardown(test_not_elf_refused, scratch_setup, scratch_teardown),
        cmocka_unit_test(test_unload_null),
        cmocka_unit_test_setup_teardown(test_symlink_checks_target, scratch_setup,
                                        scratch_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
