--[[
command.lua — apply one license command, atomically and once per command_id.

KEYS
  1 license     hash    period_id, starts_ms, ends_ms, credits, granted, balance, flags
  2 members     hash    user_id -> role
  3 disallowed  set     user_ids disallowed from using credits
  4 sequence    string  the organisation's ledger sequence
  5 command     hash    fp, rec: the stored outcome of this command_id
  6 grants      hash    grant_id -> command_id, so a top-up is never added twice
  7 limits      hash    user_id -> the member's credit limit per period
  8 holds       hash    open holds (charge.lua's)
  9 expiries    zset    holds by expiry (charge.lua's)
  charge.refund only:
  10 usage      hash    the usage counters (charge.lua's)
  11 request    hash    the refunded request's stored decision (fp, rec, req), res: a
                        hold's resolution (charge.lua's), and ref: its refunded items
                        (JSON, 1-based item indexes)
  12… windows   string  the request's windows, in its call's order (charge.lua's)
ARGV
  1 now_ms  2 known sequence (as in charge.lua)  3 command_id  4 fingerprint  5 type
  6 idempotency_ttl_ms, then by type:
  license.start_period        7 period_id  8 starts_ms  9 ends_ms  10 credits
  credits.grant               7 grant_id  8 credits  9 max_period_credits (credits and
                              grants of a period together, at most)
  member.upsert               7 user_id  8 role
  member.remove               7 user_id
  member.set_credits_allowed  7 user_id  8 allowed ("1" | "0")  9 set_by
  member.set_credit_limit     7 user_id  8 limit ("" = none)  9 set_by
  charge.refund               7 the stored decision's fingerprint as the worker read it
                              ("": none found)  8 per item of the request its window's
                              and its company's KEYS index (JSON, 0 = none)  9 the items
                              named (JSON, 1-based item indexes)
  invalid                     7 detail (the command was readable but not valid)
RETURNS
  {status, record_json}, status "decided", "replay", "conflict", "behind" or "unknown"
  as in charge.lua.
  The record: status applied|rejected, reason, detail, seq, the resulting state, and
  for balance changes delta, balance and expired credits.
]]

local license_key, members_key, disallowed_key = KEYS[1], KEYS[2], KEYS[3]
local sequence_key, command_key, grants_key = KEYS[4], KEYS[5], KEYS[6]
local limits_key, holds_key, expiries_key = KEYS[7], KEYS[8], KEYS[9]

local now = tonumber(ARGV[1])
local known_sequence = tonumber(ARGV[2])
local command_id = ARGV[3]
local fingerprint = ARGV[4]
local kind = ARGV[5]
local ttl_ms = tonumber(ARGV[6])
-- the arguments of each type, from 1
local args = {unpack(ARGV, 7)}

-- a Redis that forgot: never decide on state older than what the ledger has published
if known_sequence then
  local stored_sequence = redis.call("GET", sequence_key)
  if known_sequence < 0 then
    if not stored_sequence then return {"unknown", ""} end
  elseif (tonumber(stored_sequence) or 0) < known_sequence then
    return {"behind", stored_sequence or "0"}
  end
end

local stored = redis.call("HMGET", command_key, "fp", "rec")
if stored[1] then
  if stored[1] == fingerprint then return {"replay", stored[2]} end
  return {"conflict", stored[2]}
end

local record = {command_id = command_id, fp = fingerprint, at = now, status = "rejected"}

local function license_state()
  local l = redis.call("HMGET", license_key,
    "period_id", "starts_ms", "ends_ms", "credits", "granted", "balance")
  if not l[1] then return {period_id = false} end
  return {period_id = l[1], starts_ms = tonumber(l[2]), ends_ms = tonumber(l[3]),
          credits = tonumber(l[4]), granted = tonumber(l[5]), balance = tonumber(l[6])}
end

local function member_state(user_id)
  local role = redis.call("HGET", members_key, user_id)
  return {user_id = user_id, role = role or false,
          credits_allowed = role and redis.call("SISMEMBER", disallowed_key, user_id) == 0,
          credit_limit = tonumber(redis.call("HGET", limits_key, user_id)) or false}
end

local function finish(applied, state, reason, detail)
  record.state, record.reason, record.detail = state, reason, detail
  if applied then record.status = "applied" end
  -- a rejected command takes a sequence too: it gets a ledger entry, so that a rebuild
  -- restores this record and a replay after it gets this same answer
  record.seq = redis.call("INCR", sequence_key)
  local encoded = cjson.encode(record)
  redis.call("HSET", command_key, "fp", fingerprint, "rec", encoded)
  redis.call("PEXPIRE", command_key, ttl_ms)
  return {"decided", encoded}
end

if kind == "invalid" then
  return finish(false, nil, "invalid_command", args[1])

elseif kind == "license.start_period" then
  -- no rollover: whatever was left of the old period is gone, and a hold does not
  -- survive its period: every open hold is due now, for the worker's sweep to end it
  local before = license_state()
  local open = redis.call("ZRANGE", expiries_key, 0, -1)
  for _, hold_id in ipairs(open) do
    redis.call("ZADD", expiries_key, now, hold_id)
  end
  record.holds_ended = #open
  local credits = tonumber(args[4])
  redis.call("DEL", license_key)
  redis.call("HSET", license_key, "period_id", args[1], "starts_ms", args[2],
    "ends_ms", args[3], "credits", credits, "granted", 0, "balance", credits)
  record.expired = before.balance or 0
  record.delta = credits - record.expired
  record.balance = credits
  return finish(true, license_state())

elseif kind == "credits.grant" then
  local state = license_state()
  if not state.period_id then return finish(false, state, "no_active_license") end
  if now >= state.ends_ms then
    -- grants expire with their period: one added to an ended period could never be used
    return finish(false, state, "no_active_license", "period " .. state.period_id .. " has ended")
  end
  local grant_id, credits, max_period = args[1], tonumber(args[2]), tonumber(args[3])
  if redis.call("HEXISTS", grants_key, grant_id) == 1 then
    return finish(false, state, "duplicate_grant",
      "grant " .. grant_id .. " was applied by command " .. redis.call("HGET", grants_key, grant_id))
  end
  -- the one bound validation cannot check, as it depends on the period: balances stay
  -- far below where Redis integers, Lua numbers or cjson would lose or fail a write
  if state.credits + state.granted + credits > max_period then
    return finish(false, state, "invalid_command", string.format(
      "invalid command: credits: %d more would give period %s %d credits, more than the " ..
      "%d a period may hold", credits, state.period_id, state.credits + state.granted + credits,
      max_period))
  end
  redis.call("HSET", grants_key, grant_id, command_id)
  redis.call("HINCRBY", license_key, "granted", credits)
  record.balance = redis.call("HINCRBY", license_key, "balance", credits)
  record.delta = credits
  return finish(true, license_state())

elseif kind == "member.upsert" then
  redis.call("HSET", members_key, args[1], args[2])
  return finish(true, member_state(args[1]))

elseif kind == "member.remove" then
  local user_id = args[1]
  if redis.call("HEXISTS", members_key, user_id) == 0 then
    return finish(false, member_state(user_id), "not_a_member")
  end
  redis.call("HDEL", members_key, user_id)
  redis.call("SREM", disallowed_key, user_id)
  redis.call("HDEL", limits_key, user_id)
  return finish(true, member_state(user_id))

elseif kind == "member.set_credits_allowed" then
  local user_id, allowed, set_by = args[1], args[2] == "1", args[3]
  if redis.call("HGET", members_key, set_by) ~= "admin" then
    return finish(false, member_state(user_id), "not_an_admin", set_by .. " is not an admin")
  end
  if redis.call("HEXISTS", members_key, user_id) == 0 then
    return finish(false, member_state(user_id), "not_a_member")
  end
  if allowed then
    redis.call("SREM", disallowed_key, user_id)
  else
    redis.call("SADD", disallowed_key, user_id)
  end
  return finish(true, member_state(user_id))

elseif kind == "member.set_credit_limit" then
  local user_id, limit, set_by = args[1], args[2], args[3]
  if redis.call("HGET", members_key, set_by) ~= "admin" then
    return finish(false, member_state(user_id), "not_an_admin", set_by .. " is not an admin")
  end
  if redis.call("HEXISTS", members_key, user_id) == 0 then
    return finish(false, member_state(user_id), "not_a_member")
  end
  if limit == "" then
    redis.call("HDEL", limits_key, user_id)
  else
    redis.call("HSET", limits_key, user_id, limit)
  end
  return finish(true, member_state(user_id))

elseif kind == "charge.refund" then
  -- the credits of charged items of a decided request of the current period go back to
  -- the balance, each item once; a window this request opened closes once no charged
  -- item of it that is not refunded used that window
  local usage_key, request_key = KEYS[10], KEYS[11]
  local expected_fp, item_keys, named = args[1], cjson.decode(args[2]), cjson.decode(args[3])
  local state = license_state()
  local stored = redis.call("HMGET", request_key, "fp", "rec", "req", "ref", "res")
  if not stored[2] or stored[1] ~= expected_fp then
    return finish(false, state, "request_not_found")
  end
  local decided, summary = cjson.decode(stored[2]), cjson.decode(stored[3])
  if decided.status == "held" then
    -- a hold charges when it settles: what its settlement charged is what is refunded
    -- (its outcomes and the windows it opened, in the hold's own window slots)
    local res = stored[5] and cjson.decode(stored[5])
    if not res or res.status ~= "settled" then
      return finish(false, state, "nothing_to_refund",
        res and ("the hold was " .. res.status .. ": it charged nothing")
          or "the hold is not settled yet: it charged nothing")
    end
    decided = res
  elseif decided.status ~= "approved" then
    return finish(false, state, "nothing_to_refund", "the request charged nothing")
  end
  if not state.period_id or decided.period ~= state.period_id or now >= state.ends_ms then
    return finish(false, state, "license_period_ended",
      "request " .. decided.request_id .. " was decided in period " .. decided.period ..
      ", which is over")
  end
  local refunded = {}
  for _, index in ipairs(stored[4] and cjson.decode(stored[4]) or {}) do
    refunded[index] = true
  end
  local now_refunded, already, seen = {}, {}, {}
  for _, index in ipairs(named) do
    if not seen[index] and decided.outcomes[index] == "charged" then
      seen[index] = true
      if refunded[index] then
        table.insert(already, index)
      else
        table.insert(now_refunded, index)
        refunded[index] = true
      end
    end
  end
  record.already = already
  if #now_refunded == 0 then
    return finish(false, state, "nothing_to_refund",
      #already > 0 and "every item named was refunded before" or "no item named was charged")
  end
  -- the windows still used by a charged item that is not refunded
  local used = {}
  for i, outcome in ipairs(decided.outcomes) do
    if outcome == "charged" and not refunded[i] then
      used[item_keys[2 * i - 1]] = true
      used[item_keys[2 * i]] = true
    end
  end
  local closed = {}
  for _, opened in ipairs(decided.opened) do
    local index = opened[1] + 12  -- a 0-based window slot; windows are KEYS 12…
    if not used[index] and tonumber(redis.call("GET", KEYS[index])) == opened[2] then
      redis.call("DEL", KEYS[index])
      table.insert(closed, opened[1])
    end
  end
  local all = {}
  for index in pairs(refunded) do table.insert(all, index) end
  table.sort(all)
  redis.call("HSET", request_key, "ref", cjson.encode(all))
  local credits = #now_refunded
  record.balance = redis.call("HINCRBY", license_key, "balance", credits)
  redis.call("HINCRBY", usage_key,
    decided.period .. "|" .. (summary.user_id or "") .. "|" .. summary.action .. "|refunded",
    credits)
  record.delta, record.refunded, record.refunded_all, record.closed = credits, now_refunded, all,
    closed
  record.request = {user_id = summary.user_id, action = summary.action, period = decided.period}
  return finish(true, license_state())
end

return redis.error_reply("unknown command type " .. kind)
