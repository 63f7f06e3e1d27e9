/* A signal watcher without handlers or global state (signals.c). */
#ifndef FLOWSERVICE_SIGNALS_H
#define FLOWSERVICE_SIGNALS_H

#include "lua.h"

#include "internal.h"

FS_INTERNAL_BEGIN

/* Adds signals to the module table on top of the stack. */
void fs_signals_register(lua_State *L);

FS_INTERNAL_END

#endif
