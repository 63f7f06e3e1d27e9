-- Fuzz driver 3 (fuzz/journal.c): journal text -> state.
--
-- Input: the text of a journal file, torn, doubled, reordered and foreign
-- lines included (the seeds are real journal lines).
--
-- Properties: folding never raises; every line is either applied or
-- counted in skipped_lines; each run's entry keeps a state string and
-- its new_ids and pendings lists; doubling every line in place leaves
-- each run's state and what was learned unchanged (a resumed job that
-- wrote a line twice reads the same); and the real file round trip
-- (journal.open on a file holding the text, one appended entry, close,
-- journal.read) gives the text's state plus that entry, whatever the
-- text's last line was (a torn line must not swallow the next). Only
-- inputs whose length is a multiple of 8 take the round trip (fsync).
local journal = require "flowservice.journal"

local format, gsub = string.format, string.gsub
local io_open, os_remove, os_tmpname = io.open, os.remove, os.tmpname
local pairs, pcall, tostring, type = pairs, pcall, tostring, type
local fail = fuzz.fail

local path = os_tmpname() -- one file per process, rewritten for each input
os_remove(path)

local function fold(text, what)
  local ok, state = pcall(journal.fold, text)
  if not ok then fail(format("folding %s raised: %s", what, tostring(state))) end
  return state
end

local function check_state(state, lines)
  if state.skipped_lines < 0 or state.skipped_lines > lines then
    fail(format("%d lines skipped of %d", state.skipped_lines, lines))
  end
  local n = 0
  for id, entry in pairs(state.runs) do
    n = n + 1
    if type(id) ~= "string" or type(entry.state) ~= "string" then fail("a run without id or state") end
    if type(entry.new_ids) ~= "table" then fail("run " .. id .. " has no new_ids list") end
    if (entry.state == "pending" or entry.state == "ambiguous") and type(entry.pendings) ~= "table" then
      fail("run " .. id .. " is " .. entry.state .. " without a pendings list")
    end
  end
  if n + state.skipped_lines > lines then fail("more runs than lines") end
end

local function same(a, b, what)
  for id, entry in pairs(a.runs) do
    if not b.runs[id] or b.runs[id].state ~= entry.state then
      fail(format("%s: run %q is %s, not %s", what, id, tostring(b.runs[id] and b.runs[id].state), entry.state))
    end
  end
  for id in pairs(b.runs) do
    if not a.runs[id] then fail(format("%s: run %q appeared", what, id)) end
  end
  for k, v in pairs(a.learned) do
    if b.learned[k] ~= v then fail(format("%s: learned %s differs", what, tostring(k))) end
  end
end

local ENTRY = { run = "fuzz-appended-run", flow = "fuzz-flow", state = "done", new_id = "fuzz-new-run",
  request_id = "fuzz-request-id" }

return function(input)
  local lines = 0
  for _ in input:gmatch("[^\n]+") do lines = lines + 1 end
  local state = fold(input, "the text")
  check_state(state, lines)
  local doubled = fold(gsub(input, "[^\n]+", "%0\n%0"), "the doubled text")
  check_state(doubled, 2 * lines)
  if doubled.skipped_lines ~= 2 * state.skipped_lines then fail("doubled lines skipped differently") end
  same(state, doubled, "doubled")

  -- the real file: open (lock, 0600, a newline after a torn end), append,
  -- read; for one input in eight (by length): the fsyncs cost milliseconds
  if #input % 8 ~= 0 then return end
  local f = io_open(path, "wb")
  f:write(input)
  f:close()
  local j, err = journal.open(path)
  if not j then fail("journal.open failed: " .. tostring(err and err.message)) end
  local ok, werr = j:write { ENTRY }
  j:close()
  if not ok then fail("journal write failed: " .. tostring(werr and werr.message)) end
  local rok, after = pcall(journal.read, path)
  if not rok then fail("journal.read raised: " .. tostring(after)) end
  os_remove(path)
  local got = after.runs[ENTRY.run]
  if not got or got.state ~= "done" or got.new_ids[#got.new_ids] ~= ENTRY.new_id then
    fail("the appended entry did not come back")
  end
  if after.skipped_lines ~= state.skipped_lines then
    fail(format("%d lines skipped after the append, %d before", after.skipped_lines, state.skipped_lines))
  end
  after.runs[ENTRY.run] = state.runs[ENTRY.run]
  same(state, after, "after an append")
end
