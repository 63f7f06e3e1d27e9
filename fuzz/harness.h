/*
** The fuzz targets' common half: one Lua 5.4 state per process with the
** real modules (lua/ from the checkout, flowservice.core compiled into
** the fuzzer, lua-cjson from Debian), a driver script per target, and
** Lua line coverage fed to libFuzzer next to the C edge coverage.
**
** A driver (fuzz/<target>.lua) returns function(input). It calls the real
** code under pcall and judges what comes back; a property that does not
** hold fails through fuzz.fail(why), which prints why and aborts, and so
** does an error the driver lets through: libFuzzer keeps the input.
*/
#ifndef FLOWSERVICE_FUZZ_HARNESS_H
#define FLOWSERVICE_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "lua.h"
#include "lauxlib.h"

/* Opens the state, preloads flowservice.core, adds extra (or NULL) to the
** global table fuzz, and loads fuzz/<name>.lua. */
lua_State *fuzz_init(const char *name, const luaL_Reg *extra);
/* Calls the driver with the input as one Lua string; aborts if it raises. */
void fuzz_run(lua_State *L, const uint8_t *data, size_t size);

#endif
