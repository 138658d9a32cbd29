--[[
command.lua — apply one license command, atomically and once per command_id.

KEYS
  1 license     hash    period_id, starts_ms, ends_ms, credits, granted, balance, flags
  2 members     hash    user_id -> role
  3 disallowed  set     user_ids disallowed from using credits
  4 sequence    string  the organisation's ledger sequence
  5 command     hash    fp, rec: the stored outcome of this command_id
  6 grants      hash    grant_id -> command_id, so a top-up is never added twice
ARGV
  1 now_ms  2 command_id  3 fingerprint  4 type  5 idempotency_ttl_ms, then by type:
  license.start_period        6 period_id  7 starts_ms  8 ends_ms  9 credits
  credits.grant               6 grant_id  7 credits  8 max_period_credits (credits and
                              grants of a period together, at most)
  member.upsert               6 user_id  7 role
  member.remove               6 user_id
  member.set_credits_allowed  6 user_id  7 allowed ("1" | "0")  8 set_by
  invalid                     6 detail (the command was readable but not valid)
RETURNS
  {status, record_json}, status "decided", "replay" or "conflict" as in charge.lua.
  The record: status applied|rejected, reason, detail, seq, the resulting state, and
  for balance changes delta, balance and expired credits.
]]

local license_key, members_key, disallowed_key = KEYS[1], KEYS[2], KEYS[3]
local sequence_key, command_key, grants_key = KEYS[4], KEYS[5], KEYS[6]

local now = tonumber(ARGV[1])
local command_id = ARGV[2]
local fingerprint = ARGV[3]
local kind = ARGV[4]
local ttl_ms = tonumber(ARGV[5])

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
          credits_allowed = role and redis.call("SISMEMBER", disallowed_key, user_id) == 0}
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
  return finish(false, nil, "invalid_command", ARGV[6])

elseif kind == "license.start_period" then
  -- no rollover: whatever was left of the old period is gone
  local before = license_state()
  local credits = tonumber(ARGV[9])
  redis.call("DEL", license_key)
  redis.call("HSET", license_key, "period_id", ARGV[6], "starts_ms", ARGV[7],
    "ends_ms", ARGV[8], "credits", credits, "granted", 0, "balance", credits)
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
  local grant_id, credits, max_period = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
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
  redis.call("HSET", members_key, ARGV[6], ARGV[7])
  return finish(true, member_state(ARGV[6]))

elseif kind == "member.remove" then
  local user_id = ARGV[6]
  if redis.call("HEXISTS", members_key, user_id) == 0 then
    return finish(false, member_state(user_id), "not_a_member")
  end
  redis.call("HDEL", members_key, user_id)
  redis.call("SREM", disallowed_key, user_id)
  return finish(true, member_state(user_id))

elseif kind == "member.set_credits_allowed" then
  local user_id, allowed, set_by = ARGV[6], ARGV[7] == "1", ARGV[8]
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
end

return redis.error_reply("unknown command type " .. kind)
