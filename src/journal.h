/* Durable, exclusive, 0600 appends for the bulk job's journal (journal.c). */
#ifndef FLOWSERVICE_JOURNAL_H
#define FLOWSERVICE_JOURNAL_H

#include "lua.h"

#include "internal.h"

FS_INTERNAL_BEGIN

/* Adds journal_open to the module table on top of the stack. */
void fs_journal_register(lua_State *L);

FS_INTERNAL_END

#endif
