/* edgemux plugin SDK: everything a plugin needs, in one include. */
#ifndef EDGEMUX_EDGEMUX_H
#define EDGEMUX_EDGEMUX_H

#include "edgemux/discovery.h"
#include "edgemux/host.h"
#include "edgemux/option.h"
#include "edgemux/plugin.h"
#include "edgemux/transport.h"

#endif
