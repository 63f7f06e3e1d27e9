/*
** What the internal headers of the C modules share. Their functions are
** the module's own, not exported from its .so (only luaopen_* is): calls
** between its files are direct (no PLT), and no library loaded beside it
** can collide with their names. FS_COLD marks a function off every common
** path (a failure, a rare form of reply): kept out of line and apart from
** the hot code, so that a common call touches fewer cache lines of code.
*/
#ifndef FLOWSERVICE_INTERNAL_H
#define FLOWSERVICE_INTERNAL_H

#if defined(__GNUC__) && !defined(_WIN32) && !defined(__CYGWIN__)
#define FS_INTERNAL_BEGIN _Pragma("GCC visibility push(hidden)")
#define FS_INTERNAL_END _Pragma("GCC visibility pop")
#else
#define FS_INTERNAL_BEGIN
#define FS_INTERNAL_END
#endif

#if defined(__GNUC__)
#define FS_COLD __attribute__((cold, noinline))
#else
#define FS_COLD
#endif

#endif
