#!/bin/sh
# lua5.4 with the given arguments under valgrind memcheck. Exits 99 on any
# memory error or definite/indirect leak; suppressions cover only code that
# is not ours (spec/support/valgrind.supp).
here=$(dirname "$0")
exec valgrind --quiet --error-exitcode=99 --leak-check=full --keep-debuginfo=yes \
  --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
  --suppressions="$here/valgrind.supp" --trace-children=no \
  lua5.4 "$@"
