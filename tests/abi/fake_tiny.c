/* Exports the discovery symbol as an object smaller than the descriptor
 * header: the loader must refuse it before reading past its end. */
#include "edgemux/plugin.h"

EMX_PLUGIN_EXPORT const uint32_t emx_discovery_plugin = EMX_PLUGIN_MAGIC;
