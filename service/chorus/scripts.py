"""The broker's Lua scripts for changes to messages, typing and read markers (run by chorus.redis_broker).

Each runs in one step on the room's shard (its keys share the room's hash tag), so a check and
the append it guards cannot be split by another client.
"""

from __future__ import annotations

from typing import Final

# The checks an edit, delete or reaction needs, then XADD and PUBLISH, in one script: the
# target is a message the stream still holds, not deleted, and (for edits and deletes) the
# caller's own unless a moderator. Change entries carry `k` (their type); messages do not.
_TARGET_CHECK: Final = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[5], ARGV[5])
if #rows == 0 then return {'not_found'} end
local fields, data, kind = rows[1][2], nil, nil
for i = 1, #fields, 2 do
  if fields[i] == 'd' then data = fields[i + 1] elseif fields[i] == 'k' then kind = fields[i + 1] end
end
if kind or redis.call('HEXISTS', KEYS[3], 'x:' .. ARGV[5]) == 1 then return {'not_found'} end
"""
# After the XADD (which may trim), drop up to STATE_PRUNE_BATCH state fields whose target is
# older than the stream's first entry: the XRANGE above already answers `not_found` for them.
# Each change adds at most 3 fields and removes up to STATE_PRUNE_BATCH stale ones, so the
# state stays within a few fields per change entry the stream holds, at bounded cost per call,
# and plain messages (APPEND_AND_PUBLISH) pay nothing. Scores are target ms: a trimmed target
# that shares its ms with the first entry waits until that ms is trimmed too.
STATE_PRUNE_BATCH: Final = 16
_APPEND_CHANGE_TAIL: Final = f"""
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'd', ARGV[2], 's', ARGV[3], 'k', ARGV[4])
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf',
  '(' .. string.match(first[1][1], '^%d+'), 'LIMIT', 0, {STATE_PRUNE_BATCH})
if #stale > 0 then
  redis.call('HDEL', KEYS[3], unpack(stale))
  redis.call('ZREM', KEYS[4], unpack(stale))
end
redis.call('PUBLISH', KEYS[2],
  ARGV[3] .. ' {{"type":"' .. ARGV[4] .. '","id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return {{'ok', id}}
"""
# KEYS (both change scripts): stream, channel, state hash, state index (field -> target ms).
# ARGV: maxlen, tail, sender, kind (edit|delete), target, author name, moderator (1|0).
APPEND_CHANGE: Final = (
    _TARGET_CHECK
    + """
if ARGV[7] ~= '1' and cjson.decode(data)['user'] ~= ARGV[6] then return {'forbidden'} end
if ARGV[4] == 'delete' then
  redis.call('HSET', KEYS[3], 'x:' .. ARGV[5], '1')
  redis.call('ZADD', KEYS[4], string.match(ARGV[5], '^%d+'), 'x:' .. ARGV[5])
end
"""
    + _APPEND_CHANGE_TAIL
)
# ARGV: maxlen, tail, sender, 'reaction', target, user key, emoji, on (1|0), max distinct.
# State fields: r:<target>:<emoji>:<user>, e:<target>:<emoji> (users), n:<target> (emoji),
# each also in the index (the 'full' path leaves no new field: it returns before any is kept).
REACT: Final = (
    _TARGET_CHECK
    + """
local t, emoji = ARGV[5], ARGV[7]
local mine = 'r:' .. t .. ':' .. emoji .. ':' .. ARGV[6]
local per_emoji, distinct = 'e:' .. t .. ':' .. emoji, 'n:' .. t
if ARGV[8] == '1' then
  if redis.call('HEXISTS', KEYS[3], mine) == 1 then return {'same'} end
  if redis.call('HINCRBY', KEYS[3], per_emoji, 1) == 1 then
    if redis.call('HINCRBY', KEYS[3], distinct, 1) > tonumber(ARGV[9]) then
      redis.call('HINCRBY', KEYS[3], distinct, -1)
      redis.call('HDEL', KEYS[3], per_emoji)
      return {'full'}
    end
  end
  redis.call('HSET', KEYS[3], mine, '1')
  local ms = string.match(t, '^%d+')
  redis.call('ZADD', KEYS[4], ms, mine, ms, per_emoji, ms, distinct)
else
  if redis.call('HDEL', KEYS[3], mine) == 0 then return {'same'} end
  redis.call('ZREM', KEYS[4], mine)
  if redis.call('HINCRBY', KEYS[3], per_emoji, -1) <= 0 then
    redis.call('HDEL', KEYS[3], per_emoji)
    redis.call('ZREM', KEYS[4], per_emoji)
    redis.call('HINCRBY', KEYS[3], distinct, -1)
  end
end
"""
    + _APPEND_CHANGE_TAIL
)
# At most one typing event per user per room per interval, across replicas. KEYS: typing
# set, channel. ARGV: user key, interval ms, payload.
TYPING: Final = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
if last and ms - tonumber(last) < tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""
# A read marker only moves forward. KEYS: the user's markers. ARGV: room, id (ms-seq).
MARK_READ: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local cm, cs = string.match(cur, '(%d+)-(%d+)')
  local nm, ns = string.match(ARGV[2], '(%d+)-(%d+)')
  cm, cs, nm, ns = tonumber(cm), tonumber(cs), tonumber(nm), tonumber(ns)
  if nm < cm or (nm == cm and ns <= cs) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
