/* edgemux: the executable. Parses the command line, then either checks a
 * configuration (-t) or runs the server on it. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "edgemux/plugin.h"
#include "server.h"
#include "setup.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: edgemux [-t] -c FILE [-p DIR]\n"
            "\n"
            "  -c, --config FILE       configuration file (YAML)\n"
            "  -t, --test              check the configuration and its plugins, then exit\n"
            "                          (0: valid; 1: every error printed as file:line: key: what)\n"
            "  -p, --plugins-dir DIR   load plugins from DIR instead of plugins.dir\n"
            "  -h, --help              this text, and the core settings\n"
            "  -V, --version           version and plugin ABI\n"
            "\n"
            "edgemux accepts ThingWorx AlwaysOn edge connections and routes their messages\n"
            "to platform instances found by a discovery plugin. See docs/configuration.md.\n");
}

static const char *type_name(enum emx_opt_type t)
{
    switch (t) {
    case EMX_OPT_STRING:
        return "string";
    case EMX_OPT_BOOL:
        return "bool";
    case EMX_OPT_INT:
        return "int";
    case EMX_OPT_SIZE:
        return "size";
    case EMX_OPT_DURATION:
        return "duration";
    case EMX_OPT_STRING_LIST:
        return "list";
    case EMX_OPT_SECRET:
        return "secret";
    }
    return "?";
}

static void print_table(const char *section, const struct emx_option *t)
{
    for (; t->name; t++) {
        char key[96];
        snprintf(key, sizeof(key), "%s.%s", section, t->name);
        printf("  %-30s %-8s %-10s %s%s%s\n", key, type_name(t->type),
               t->def ? t->def : (t->required ? "(required)" : "-"), t->help ? t->help : "",
               t->alias ? "; alias " : "", t->alias ? t->alias : "");
    }
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"test", no_argument, NULL, 't'},
        {"plugins-dir", required_argument, NULL, 'p'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *config = NULL, *plugins_dir = NULL;
    int test = 0, c;
    while ((c = getopt_long(argc, argv, "c:tp:hV", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 't':
            test = 1;
            break;
        case 'p':
            plugins_dir = optarg;
            break;
        case 'h':
            usage(stdout);
            printf("\ncore settings (section.key type default help):\n");
            print_table("server", emx_core_options_server);
            print_table("edge", emx_core_options_edge);
            print_table("platform", emx_core_options_platform);
            return 0;
        case 'V':
            printf("edgemux %s (plugin ABI %d.%d)\n", EMX_VERSION, EMX_ABI_MAJOR, EMX_ABI_MINOR);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!config || optind != argc) {
        usage(stderr);
        return 2;
    }

    struct emx_setup setup;
    struct emx_errors errs = {0};
    if (emx_setup_load(config, plugins_dir, &setup, &errs) != 0) {
        for (size_t i = 0; i < errs.count; i++)
            fprintf(stderr, "%s\n", errs.msgs[i]);
        if (errs.count == 0)
            fprintf(stderr, "%s: cannot load the configuration\n", config);
        fprintf(stderr, "edgemux: configuration %s has %zu error(s)\n", config, errs.count);
        emx_errors_free(&errs);
        return 1;
    }
    emx_errors_free(&errs);
    if (test) {
        printf("edgemux: configuration %s is valid (transport %s %s, discovery %s %s)\n", config,
               setup.transport->hdr->name, setup.transport->hdr->version,
               setup.discovery->hdr->name, setup.discovery->hdr->version);
        emx_setup_free(&setup);
        return 0;
    }
    int rc = emx_server_run(&setup);
    emx_setup_free_at_exit(&setup);
    return rc == 0 ? 0 : 1;
}
