--[[
charge.lua — decide one charge request, or resolve one hold, atomically.

Every check runs before the first write, because Redis does not roll a script back
when it fails half-way: idempotency → member → credits allowed → period → repeat
windows → max_credits → the member's credit limit → balance → writes.

KEYS
  1  license      hash   period_id, starts_ms, ends_ms, credits, granted, balance,
                         held (by open holds), thr:<percent>, insufficient_notified,
                         uln:<user> (limit reached, notified)
  2  members      hash   user_id -> role ("admin" | "member")
  3  disallowed   set    user_ids an admin disallowed from using credits
  4  sequence     string the organisation's ledger sequence (gap-free)
  5  request      hash   fp, rec: the stored decision of this request_id (kept until
                         the period's end plus the idempotency lifetime: finish())
  6  usage        hash   "<period>|<user>|<action>|<metric>" -> count, and per period
                         "<period>|*users" (its users) and "<period>|<user>|*" markers
  7  history      zset   request_ids of this user and action, scored by decision time
  8  limits       hash   user_id -> the member's credit limit per period (none: no limit)
  9  holds        hash   request_id -> its open hold (JSON: exp, credits, user, action,
                         period); gone once resolved
  10 expiries     zset   request_ids of holds not yet resolved by expiry, scored by their
                         expiry (the worker's sweep reads it and removes an expired one
                         once its hold.expired is published)
  11… windows     string window end (ms); each also expires at that time. The items
                         below point at these keys by their index in KEYS.
  To resolve a hold (modes settle, release, expire), KEYS 5 is the settlement's own
  record (settle, release; expire: unused), 7 the hold's request (its stored decision;
  "res": its resolution once resolved) and the windows are the hold's items'.
ARGV
  1 now_ms  2 known sequence: the organisation's last ledger sequence the worker has
    seen published (-1: none seen; "": no check, for tools and tests; see RETURNS)
  3 window_ms  4 idempotency_ttl_ms  5 threshold percents, comma-separated
  6 mode ("charge" | "quote": quote decides the same way and writes nothing; "settle",
    "release", "expire": resolve a hold)
  7 the request, a JSON array: request_id, user_id, action, fingerprint, partial
    (true | false), max_credits (null = none), verified_email_found (true | false |
    null), preset reason ("" or a reason decided before, e.g. invalid_request), preset
    detail, two numbers per item: its window key index, and the index of the
    company window a contact opens (0 = none); then a hold's expiry in ms from now (null:
    not a hold). To resolve a hold: the settlement_id ("" for an expiry), "", "", the
    settlement's fingerprint, false, null, null, preset reason, detail, the hold's items'
    window key indexes (as above), null, then the hold's request_id, its stored decision's
    fingerprint as the worker read it ("": none found; not checked for an expiry) and the
    delivered items (settle: 1-based indexes into the hold's items, 0 = no item of it)
  8 the request as reports show it (JSON: user_id, action, items, reference), stored
    beside the decision
RETURNS
  {status, record_json}; status is "decided", "replay" (the stored decision) or
  "conflict" (the stored decision of another body with this request_id); an expiry also
  "gone" (no open hold, nothing to publish) or "notdue" (not expired yet); or, writing
  nothing, {"behind", sequence} when Redis's sequence is below the known one, and
  {"unknown", ""} when the worker knows no sequence and Redis has none either: Redis may
  have forgotten ledger entries, and the worker heals the organisation from the ledger
  before it sends the call again (stream/healing.py).
  The record holds outcomes per item, credits, balance, sequence, notifications and
  the windows it opened (as 0-based window slots with their end);
  times are integer milliseconds since the epoch.
]]

local license_key, members_key, disallowed_key = KEYS[1], KEYS[2], KEYS[3]
local sequence_key, request_key, usage_key, history_key = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local limits_key, holds_key, expiries_key = KEYS[8], KEYS[9], KEYS[10]

local now = tonumber(ARGV[1])
local known_sequence = tonumber(ARGV[2])
local window_ms = tonumber(ARGV[3])
local idempotency_ttl_ms = tonumber(ARGV[4])
local thresholds_csv = ARGV[5]
local mode = ARGV[6]
local quote = mode == "quote"
local resolving = mode == "settle" or mode == "release" or mode == "expire"
local request = cjson.decode(ARGV[7])
local request_summary = ARGV[8]
local request_id, user_id, action, fingerprint = request[1], request[2], request[3], request[4]
local partial = request[5] == true
local max_credits = request[6] ~= cjson.null and request[6] or nil
local verified = request[7]  -- true, false or cjson.null (not a verification)
local preset_reason, preset_detail = request[8], request[9]
local item_keys = request[10]
local hold_ms = request[11] ~= cjson.null and request[11] or nil
local n_items = #item_keys / 2
local FIRST_WINDOW = 11

local function ms(value)
  -- Lua numbers are doubles: format them as integers, never as 1.7e+12.
  return string.format("%d", value)
end

-- 0. a Redis that forgot: never decide on state older than what the ledger has published
if known_sequence and not quote then
  local stored_sequence = redis.call("GET", sequence_key)
  if known_sequence < 0 then
    if not stored_sequence then return {"unknown", ""} end
  elseif (tonumber(stored_sequence) or 0) < known_sequence then
    return {"behind", stored_sequence or "0"}
  end
end

-- 1. idempotency: the same request decides once; another body under its id is refused.
-- (An expiry is decided once by the hold's own state: its "res" and the open holds.)
if not quote and mode ~= "expire" then
  local stored = redis.call("HMGET", request_key, "fp", "rec")
  if stored[1] then
    if stored[1] == fingerprint then return {"replay", stored[2]} end
    return {"conflict", stored[2]}
  end
end

-- the threshold flags are read with the rest of the license, in the same call
local percents, threshold_fields = {}, {}
for percent in string.gmatch(thresholds_csv, "%d+") do
  table.insert(percents, tonumber(percent))
  table.insert(threshold_fields, "thr:" .. percent)
end
local license = redis.call("HMGET", license_key,
  "period_id", "starts_ms", "ends_ms", "credits", "granted", "balance", "insufficient_notified",
  unpack(threshold_fields))
local THRESHOLD_FLAGS = 7
local period_id = license[1]
local balance = tonumber(license[6]) or 0

-- Repeat windows (step 4 below). One pass over the items, in request order; `budget` is how many
-- items may still be charged (all of them on the first pass).
-- Every window end is read up front, in MGETs of at most WINDOW_READ keys (unpack has
-- a limit, and one call per item costs more than the items' keys in one call).
local WINDOW_READ = 1000
local stored_ends = {}
local function read_window_ends()
  for first = FIRST_WINDOW, #KEYS, WINDOW_READ do
    local last = math.min(#KEYS, first + WINDOW_READ - 1)
    local values = redis.call("MGET", unpack(KEYS, first, last))
    for offset = 1, #values do
      stored_ends[first + offset - 1] = tonumber(values[offset]) or 0
    end
  end
end

local function assess(budget, only)
  -- only: when set, the items assessed (a settlement's delivered ones); others "skip"
  local outcomes, untils, opened, seen = {}, {}, {}, {}
  local cost, charged, free = 0, 0, 0
  local new_end = now + window_ms
  for i = 1, n_items do
    local key, company = item_keys[2 * i - 1], item_keys[2 * i]
    local outcome, free_until = nil, 0
    if only and not only[i] then
      outcome = "skip"
    elseif verified == false then
      outcome = "no_verified_email"
    elseif seen[key] then
      outcome = "duplicate_in_request"
    else
      seen[key] = true
      local ends = opened[key] or stored_ends[key]
      if ends > now then
        outcome, free_until, free = "free_repeat", ends, free + 1
      else
        cost = cost + 1
        if charged < budget then
          outcome, free_until, charged = "charged", new_end, charged + 1
          opened[key] = new_end
          -- the company's data went out with the contact: its window opens too
          if company > 0 and (opened[company] or stored_ends[company]) <= now then
            opened[company] = new_end
          end
        else
          outcome = "not_charged"
        end
      end
    end
    outcomes[i], untils[i] = outcome, free_until
  end
  return outcomes, untils, opened, cost, charged, free
end

-- Redis expires keys by its own clock: when the decision clock runs behind it (a
-- negative offset), push a window's expiry out by the difference so no window is lost.
local function open_windows(opened, into)
  local time = redis.call("TIME")
  local skew = math.max(0, tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - now)
  for index, ends in pairs(opened) do
    redis.call("SET", KEYS[index], ms(ends), "PXAT", ms(ends + skew))
    -- recorded as the caller's 0-based window slot, not as a KEYS index
    table.insert(into, {index - FIRST_WINDOW, ends})
  end
  table.sort(into, function(a, b) return a[1] < b[1] end)
end

-- A hold resolved: settled with the items delivered, released, or expired. The same
-- checks-first order: idempotency (above) → the hold is found → still open → items
-- delivered were held → writes.
if resolving then
  local hold_key = KEYS[7]
  local hold_id, hold_fp, delivered = request[12], request[13], request[14]
  local rec = {
    request_id = hold_id, fp = fingerprint, at = now, status = "rejected", kind = mode,
    credits = 0, released = 0, delta = 0, needed = 0, balance = balance,
    period = period_id or "", outcomes = {}, ["until"] = {}, opened = {}, notes = {}, saved = 0,
  }
  if mode ~= "expire" then rec.settlement_id = request_id end

  local function done(status)
    rec.status = status
    rec.seq = redis.call("INCR", sequence_key)
    local encoded = cjson.encode(rec)
    if mode ~= "expire" then
      redis.call("HSET", request_key, "fp", fingerprint, "rec", encoded)
      redis.call("PEXPIRE", request_key, idempotency_ttl_ms)
    end
    if status ~= "rejected" then redis.call("HSET", hold_key, "res", encoded) end
    return {"decided", encoded}
  end
  local function refuse(reason, detail)
    if mode == "expire" then return {"gone", cjson.encode(rec)} end
    rec.reason, rec.detail = reason, detail
    return done("rejected")
  end

  if preset_reason ~= "" then return refuse(preset_reason, preset_detail) end
  local stored = redis.call("HMGET", hold_key, "fp", "rec", "res")
  if not stored[2] or (mode ~= "expire" and stored[1] ~= hold_fp) then
    return refuse("hold_not_found", nil)
  end
  local placed = cjson.decode(stored[2])
  if placed.status ~= "held" then
    return refuse("hold_not_found", "request " .. hold_id .. " is not a hold")
  end
  local open = redis.call("HGET", holds_key, hold_id)
  if not open then
    if mode == "expire" then
      if stored[3] then return {"replay", stored[3]} end
      return {"gone", cjson.encode(rec)}
    end
    local res = stored[3] and cjson.decode(stored[3])
    return refuse("hold_already_resolved", res and ("the hold was " .. res.status ..
      (res.settlement_id and (" by settlement " .. res.settlement_id) or "")) or nil)
  end
  local hold = cjson.decode(open)
  rec.user, rec.action, rec.hold_period = hold.user, hold.action, hold.period
  -- a hold does not survive its period: one of a period replaced is due at once
  local current = period_id == hold.period and now < tonumber(license[3])
  if current and now < hold.exp then
    if mode == "expire" then return {"notdue", cjson.encode(rec)} end
  elseif mode ~= "expire" then
    -- expired (or its period ended) and not yet swept: the expiry came first
    return refuse("hold_already_resolved", "the hold expired at " .. ms(hold.exp))
  end
  local only = {}
  if mode == "settle" then
    for _, index in ipairs(delivered) do
      if index == 0 or placed.outcomes[index] ~= "held" then
        return refuse("item_not_held", nil)
      end
      only[index] = true
    end
  end

  -- the delivered items charged as decided now: a window another request opened
  -- meanwhile makes an item free; every other held item is released
  if mode == "settle" and verified ~= false then read_window_ends() end
  local outcomes, untils, opened, _, charged, free = assess(math.huge, only)
  for i = 1, n_items do
    if outcomes[i] == "skip" then
      if placed.outcomes[i] == "held" then
        outcomes[i], untils[i] = "released", 0
      else
        outcomes[i], untils[i] = placed.outcomes[i], placed["until"][i]
      end
    end
  end
  local held = tonumber(hold.credits)
  rec.outcomes, rec["until"] = outcomes, untils
  rec.credits, rec.saved, rec.released = charged, free, held - charged
  -- the held credits not charged go back (to a period that has ended too, which keeps
  -- its arithmetic); those of a period replaced went with it
  rec.delta = period_id == hold.period and rec.released or 0
  rec.balance = balance + rec.delta
  open_windows(opened, rec.opened)
  if rec.delta > 0 then redis.call("HINCRBY", license_key, "balance", rec.delta) end
  if period_id == hold.period and held > 0 then
    redis.call("HINCRBY", license_key, "held", -held)
  end
  local prefix = hold.period .. "|" .. hold.user .. "|" .. hold.action .. "|"
  -- never an increment of -0: Lua writes it "-0", which HINCRBY refuses (the script
  -- would fail after its first writes); a hold of nothing has its counter at 0 already
  if held > 0 then redis.call("HINCRBY", usage_key, prefix .. "held", -held) end
  if charged > 0 then redis.call("HINCRBY", usage_key, prefix .. "credits", charged) end
  if free > 0 then redis.call("HINCRBY", usage_key, prefix .. "saved", free) end
  redis.call("HDEL", holds_key, hold_id)
  if mode ~= "expire" then redis.call("ZREM", expiries_key, hold_id) end
  return done(mode == "settle" and "settled" or (mode == "release" and "released" or "expired"))
end

local record = {
  request_id = request_id, fp = fingerprint, at = now, status = "rejected",
  credits = 0, needed = 0, balance = balance, period = period_id or "",
  outcomes = {}, ["until"] = {}, opened = {}, notes = {}, saved = 0,
}

-- A user's history (and the stored decisions it lists) is the platform's "My exports"
-- and "My CRM pushes" for the whole license period, which runs far longer than the
-- idempotency window: a decision is kept until its period ends plus the idempotency
-- lifetime (so last period's history stays readable for a while after a renewal), and
-- never less than the idempotency lifetime. The history keeps every entry of the
-- current period and, beyond it, those within the idempotency lifetime.
local function finish()
  if quote then return {"decided", cjson.encode(record)} end
  record.seq = redis.call("INCR", sequence_key)
  local encoded = cjson.encode(record)
  local keep_ms, floor = idempotency_ttl_ms, now - idempotency_ttl_ms
  local starts, ends = tonumber(license[2]), tonumber(license[3])
  if ends and ends > now then keep_ms = ends - now + idempotency_ttl_ms end
  if starts and starts < floor then floor = starts end
  redis.call("HSET", request_key, "fp", fingerprint, "rec", encoded, "req", request_summary)
  redis.call("PEXPIRE", request_key, keep_ms)
  redis.call("ZADD", history_key, now, request_id)
  redis.call("ZREMRANGEBYSCORE", history_key, "-inf", "(" .. ms(floor))
  redis.call("PEXPIRE", history_key, keep_ms)
  return {"decided", encoded}
end

-- Usage counters of the period, per user and action. The period's users are listed in
-- one field ("<period>|*users", in order of first use) so a team report reads
-- O(users) fields, never the counters of other periods; "*" is never in an id.
local user_listed = false
local function count_usage(metric, amount)
  if not user_listed then  -- once per decision, however many metrics it counts
    user_listed = true
    if redis.call("HSETNX", usage_key, period_id .. "|" .. user_id .. "|*", "1") == 1 then
      local list_field = period_id .. "|*users"
      local users = redis.call("HGET", usage_key, list_field)
      redis.call("HSET", usage_key, list_field, users and (users .. "," .. user_id) or user_id)
    end
  end
  redis.call("HINCRBY", usage_key, period_id .. "|" .. user_id .. "|" .. action .. "|" .. metric,
    amount)
end

local function not_charged_items()
  for i = 1, n_items do
    record.outcomes[i] = "not_charged"
    record["until"][i] = 0
  end
end

local function reject(reason, detail)
  record.reason = reason
  record.detail = detail
  not_charged_items()
  if not quote and period_id then
    count_usage("rejected", 1)
  end
  return finish()
end

if preset_reason ~= "" then return reject(preset_reason, preset_detail) end

-- 2. member and permission
if not redis.call("HGET", members_key, user_id) then
  return reject("not_a_member", nil)
end
if redis.call("SISMEMBER", disallowed_key, user_id) == 1 then
  table.insert(record.notes, {type = "credits.disallowed", to = "user"})
  return reject("credits_disallowed", nil)
end

-- 3. period
if not period_id then return reject("no_active_license", nil) end
if now < tonumber(license[2]) then
  return reject("no_active_license", "period " .. period_id .. " has not started yet")
end
if now >= tonumber(license[3]) then return reject("license_period_ended", nil) end

if verified ~= false then read_window_ends() end
local outcomes, untils, opened, cost, charged, free = assess(math.huge)
record.needed = cost
if quote then
  -- a quote itemises what each item would cost with the balance no obstacle, even
  -- when the request would be rejected for its balance or its max_credits
  record.assessed, record.assessed_until = outcomes, untils
end

-- 5. the quote the user accepted is a ceiling
if max_credits and cost > max_credits then
  return reject("exceeds_max_credits", nil)
end

-- 6. the member's credit limit of the period: what they were charged and hold, less
-- what was refunded to them, over every action, may not pass it
local limit = tonumber(redis.call("HGET", limits_key, user_id))
local limit_left = math.huge
if limit then
  local prefix = period_id .. "|" .. user_id .. "|"
  local used = 0
  for _, each in ipairs({"export", "crm_push", "email_verification"}) do
    local counts = redis.call("HMGET", usage_key,
      prefix .. each .. "|credits", prefix .. each .. "|held", prefix .. each .. "|refunded")
    used = used + (tonumber(counts[1]) or 0) + (tonumber(counts[2]) or 0)
      - (tonumber(counts[3]) or 0)
  end
  limit_left = math.max(0, limit - used)
  record.limit, record.limit_left = limit, limit_left
end
local limited = cost > limit_left
if limited then
  local flag = "uln:" .. user_id  -- once per period: the license hash goes with it
  if redis.call("HEXISTS", license_key, flag) == 0 then
    table.insert(record.notes, {type = "credits.user_limit_reached", to = "user"})
    table.insert(record.notes, {type = "credits.user_limit_reached", to = "admin"})
    if not quote then redis.call("HSET", license_key, flag, "1") end
  end
  if not partial then return reject("user_limit_reached", nil) end
end

-- 7. balance: all or nothing, or as many items as the balance (and the limit) covers
local short = cost > balance
if short then
  table.insert(record.notes, {type = "credits.insufficient", to = "user"})
  if license[7] ~= "1" then
    table.insert(record.notes, {type = "credits.insufficient", to = "admin"})
    if not quote then redis.call("HSET", license_key, "insufficient_notified", "1") end
  end
  if not partial then return reject("insufficient_credits", nil) end
end
if short or limited then
  outcomes, untils, opened, cost, charged, free = assess(math.min(balance, limit_left))
  if charged + free == 0 then
    return reject(limit_left < balance and "user_limit_reached" or "insufficient_credits", nil)
  end
end

-- 8. writes
record.status = "approved"
record.outcomes, record["until"] = outcomes, untils
record.credits, record.saved = charged, free
record.balance = balance - charged
if limit then record.limit_left = limit_left - charged end

-- a hold: its chargeable credits are taken from the balance and held, no window opens
-- until it is settled, and it expires by itself (at the latest when its period ends)
if hold_ms then
  for i = 1, n_items do
    if outcomes[i] == "charged" then outcomes[i], untils[i] = "held", 0 end
  end
  opened = {}
  record.status, record.credits, record.held = "held", 0, charged
  record.hold_exp = math.min(now + hold_ms, tonumber(license[3]))
end

if not quote then
  open_windows(opened, record.opened)
  if charged > 0 then redis.call("HINCRBY", license_key, "balance", -charged) end
  count_usage(hold_ms and "held" or "credits", charged)
  count_usage("requests", 1)
  if free > 0 then count_usage("saved", free) end
  if hold_ms then
    -- the period's open holds, for the credits view (the balance has them taken)
    if charged > 0 then redis.call("HINCRBY", license_key, "held", charged) end
    redis.call("HSET", holds_key, request_id, cjson.encode({exp = record.hold_exp,
      credits = charged, user = user_id, action = action, period = period_id}))
    redis.call("ZADD", expiries_key, record.hold_exp, request_id)
  end
end

-- thresholds of the period's credits (amount plus grants) used, once each per period
local total = (tonumber(license[4]) or 0) + (tonumber(license[5]) or 0)
if charged > 0 and total > 0 then
  local used = total - record.balance
  for i, percent in ipairs(percents) do
    if used * 100 >= percent * total and not license[THRESHOLD_FLAGS + i] then
      table.insert(record.notes, {type = "credits.threshold_reached", to = "admin",
        threshold = percent})
      if not quote then redis.call("HSET", license_key, threshold_fields[i], "1") end
    end
  end
end

return finish()
