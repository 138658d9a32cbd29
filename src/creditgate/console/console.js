// The console: the platform's credit screens over creditgate's HTTP API.
//
// Plain JavaScript, no build step and nothing fetched from elsewhere. The token is kept
// in sessionStorage (this tab only) and sent as a bearer token; everything shown comes
// from the API, which checks the token's scope on every call, so a screen the token may
// not see shows the API's refusal rather than hiding it behind the page's own rules.
// Data is put in the page as text (textContent), never as HTML.

const STORE = { token: "creditgate.token", org: "creditgate.org", user: "creditgate.user" };
const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 3000;
const ACTIONS = ["export", "crm_push", "email_verification"];
const TITLES = { export: "My exports", crm_push: "My CRM pushes" };
const HISTORY_PAGE = 50;

const $ = (id) => document.getElementById(id);
const state = { me: null, org: null, user: null, screen: null, shown: HISTORY_PAGE, busy: false };

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.message)) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(STORE.token) || ""}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (options.raw && response.ok) return response;
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

const orgPath = () => `/v1/orgs/${encodeURIComponent(state.org)}`;

function when(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "–";
}
function day(iso) {
  return iso ? new Date(iso).toLocaleDateString(undefined, { dateStyle: "medium" }) : "–";
}
function number(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString(); }

function cell(row, label, content, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  if (className) td.className = className;
  if (content instanceof Node) td.append(content); else td.textContent = content;
  row.append(td);
  return td;
}

function lines(first, second, className) {
  const wrap = document.createElement("span");
  const top = document.createElement("span");
  top.textContent = first;
  if (className) top.className = className;
  wrap.append(top);
  if (second) {
    const small = document.createElement("span");
    small.className = "small";
    small.textContent = second;
    wrap.append(small);
  }
  return wrap;
}

function shout(id, error) {
  $(id).textContent = error ? error.message : "";
}

// ---- sign-in ---------------------------------------------------------------------------

function needsScopeFields(me) {
  return !(me.orgs && me.orgs.length === 1);
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  sessionStorage.setItem(STORE.token, token);
  shout("sign-in-error", null);
  try {
    const me = await api("/v1/me");
    if (needsScopeFields(me)) {
      $("scope-fields").hidden = false;
      const org = $("org").value.trim();
      if (!org) {
        $("org").focus();
        throw new Error("Choose the organisation to look at.");
      }
      sessionStorage.setItem(STORE.org, org);
      sessionStorage.setItem(STORE.user, $("user").value.trim());
    }
    $("token").value = "";
    await start();
  } catch (error) {
    if (error instanceof ApiError) sessionStorage.removeItem(STORE.token);
    shout("sign-in-error", error);
  }
}

function signOut() {
  for (const key of Object.values(STORE)) sessionStorage.removeItem(key);
  location.hash = "";
  location.reload();
}

async function start() {
  const me = await api("/v1/me");
  state.me = me;
  state.org = needsScopeFields(me) ? sessionStorage.getItem(STORE.org) : me.orgs[0];
  state.user = me.user_id || sessionStorage.getItem(STORE.user) || null;
  if (!state.org) throw new Error("no organisation chosen");
  const role = me.role === "*" ? "operator" : me.role;
  $("who").textContent = `${state.user || role} · ${state.org} · ${role}`;
  $("who").hidden = false;
  $("sign-out").hidden = false;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  // the tabs a role has; the screens still ask the API, which has the last word
  const reads = me.role !== "support";
  $("tab-exports").hidden = !reads || !state.user;
  $("tab-pushes").hidden = !reads || !state.user;
  $("tab-team").hidden = !["admin", "reader", "*"].includes(me.role);
  await show();
  setInterval(() => refresh().catch(() => {}), POLL_MS);
}

// ---- screens ---------------------------------------------------------------------------

function screenOfHash() {
  const [name, user] = location.hash.replace(/^#/, "").split(":");
  if (name === "team") return { name: "team" };
  if (name === "crm_push" || name === "exports" || name === "export") {
    return { name: "history", action: name === "crm_push" ? "crm_push" : "export", user: user || state.user };
  }
  if (state.user && state.me.role !== "support") return { name: "history", action: "export", user: state.user };
  if (!$("tab-team").hidden) return { name: "team" };
  return { name: "credits" };
}

async function show() {
  state.screen = screenOfHash();
  state.shown = HISTORY_PAGE;
  const screen = state.screen;
  $("history").hidden = screen.name !== "history";
  $("team").hidden = screen.name !== "team";
  for (const [tab, current] of [
    ["tab-exports", screen.name === "history" && screen.action === "export"],
    ["tab-pushes", screen.name === "history" && screen.action === "crm_push"],
    ["tab-team", screen.name === "team"],
  ]) {
    if (current) $(tab).setAttribute("aria-current", "page"); else $(tab).removeAttribute("aria-current");
  }
  await refresh();
}

async function refresh() {
  const jobs = [loadCredits()];
  if (state.screen.name === "history") jobs.push(loadHistory());
  if (state.screen.name === "team") jobs.push(loadTeam());
  await Promise.all(jobs);
  $("updated").textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${POLL_MS / 1000}s`;
}

async function loadCredits() {
  try {
    const c = await api(`${orgPath()}/credits`);
    const total = c.period_credits + c.granted;
    $("credits-remaining").textContent = number(c.remaining);
    $("credits-total").textContent = number(total);
    $("credits-used").textContent = number(c.used);
    // credits reserved by open holds: shown only while there are some
    $("credits-held").textContent = number(c.held || 0);
    $("credits-held-row").hidden = !c.held;
    $("credits-period-credits").textContent = number(c.period_credits);
    $("credits-granted").textContent = number(c.granted);
    $("credits-period").textContent = `${c.period_id}: ${day(c.starts_at)} – ${day(c.ends_at)}`;
    $("credits-meter").max = Math.max(total, 1);
    $("credits-meter").value = c.used;
    shout("credits-error", null);
  } catch (error) {
    shout("credits-error", error);
  }
}

function reference(ref) {
  if (!ref) return "–";
  const parts = Object.entries(ref).map(([k, v]) => `${k.replace(/_/g, " ")}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
  return parts.join(", ");
}

function historyPath(format) {
  const { action, user } = state.screen;
  const query = new URLSearchParams({ action, limit: String(state.shown) });
  if (format) query.set("format", format);
  return `${orgPath()}/users/${encodeURIComponent(user)}/charges?${query}`;
}

// a hold is shown by what became of it: held until it expires, then settled (what it
// cost), released or expired
const HOLD_RESULTS = { open: "Held", settled: "Settled", released: "Released", expired: "Expired" };

function result(c) {
  if (c.hold) {
    const open = c.hold.status === "open";
    const detail = open ? `${number(c.credits_held)} held until ${when(c.hold_expires_at)}` : c.hold.message;
    return lines(HOLD_RESULTS[c.hold.status], detail, c.hold.status === "settled" ? "approved" : null);
  }
  const approved = c.type === "charge.approved";
  return lines(approved ? "Approved" : "Rejected", approved ? null : c.message,
    approved ? "approved" : "rejected");
}

async function loadHistory() {
  const { action, user } = state.screen;
  const own = user === state.user;
  $("history-title").textContent = own ? TITLES[action] : `${TITLES[action].replace("My", `${user}'s`)}`;
  $("history-about").textContent = "Every request of the current license period, newest first. " +
    "Repeating an item within 30 days of its first export or push costs no extra credit.";
  try {
    const page = await api(historyPath());
    const body = $("history-table").tBodies[0];
    const rows = page.charges.map((c) => {
      const row = document.createElement("tr");
      row.dataset.requestId = c.request_id;
      cell(row, "When", when(c.decided_at));
      cell(row, "Items", number(c.item_count), "num");
      cell(row, "Credits charged", c.credits_refunded
        ? lines(number(c.credits_charged), `${number(c.credits_refunded)} refunded`)
        : number(c.credits_charged), "num credits");
      const free = c.items_by_outcome.free_repeat;
      cell(row, "Free repeats", free ? lines(`${free} free`, `until ${day(c.free_repeats_until)}`) : "–");
      cell(row, "Reference", reference(c.reference));
      cell(row, "Result", result(c));
      return row;
    });
    body.replaceChildren(...rows);
    $("history-empty").hidden = rows.length > 0;
    $("history-more").hidden = !page.next_before || state.shown >= 500;
    shout("history-error", null);
  } catch (error) {
    $("history-table").tBodies[0].replaceChildren();
    $("history-empty").hidden = true;
    shout("history-error", error);
  }
}

async function loadTeam() {
  try {
    const team = await api(`${orgPath()}/members`);
    const admin = ["admin", "*"].includes(state.me.role);
    const rows = team.members.map((m) => {
      const row = document.createElement("tr");
      row.dataset.user = m.user_id;
      const link = document.createElement("a");
      link.href = `#exports:${m.user_id}`;
      link.textContent = m.user_id;
      link.title = `${m.user_id}'s exports`;
      cell(row, "User", link);
      cell(row, "Role", m.role || "no longer a member");
      cell(row, "Credits used", number(m.credits_used), "num");
      for (const [action, label] of [["export", "Exports"], ["crm_push", "CRM pushes"], ["email_verification", "Email checks"]]) {
        cell(row, label, number((m.by_action[action] || {}).credits_used || 0), "num");
      }
      cell(row, "Limit", m.credit_limit === null || m.credit_limit === undefined ? "none" : number(m.credit_limit), "num");
      cell(row, "Credits use", m.credits_allowed ? "Allowed" : "Disallowed", m.credits_allowed ? "allowed" : "off");
      const actions = cell(row, "Action", "");
      // an admin is not offered to disallow themselves (the API would let an operator)
      if (admin && m.role && m.user_id !== state.user) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = m.credits_allowed ? "danger" : "allow";
        button.textContent = m.credits_allowed ? "Disallow credits use" : "Allow";
        button.setAttribute("aria-label", `${button.textContent}: ${m.user_id}`);
        button.addEventListener("click", () => setAllowed(m.user_id, !m.credits_allowed, button));
        actions.append(button);
      }
      return row;
    });
    if (!state.busy) $("team-table").tBodies[0].replaceChildren(...rows);
    shout("team-error", null);
  } catch (error) {
    $("team-table").tBodies[0].replaceChildren();
    shout("team-error", error);
  }
}

async function setAllowed(user, allowed, button) {
  state.busy = true;
  button.disabled = true;
  $("team-status").textContent = "";
  shout("team-error", null);
  try {
    const event = await api(`${orgPath()}/members/${encodeURIComponent(user)}/credits-allowed`, {
      method: "PUT",
      body: { allowed },
    });
    $("team-status").textContent = event.message;
  } catch (error) {
    shout("team-error", error);
  } finally {
    state.busy = false;
  }
  await loadTeam();
  const again = document.querySelector(`#team-table tr[data-user="${CSS.escape(user)}"] button`);
  if (again) again.focus();
}

async function download(path, name) {
  try {
    const response = await api(path, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (error) {
    shout(state.screen.name === "team" ? "team-error" : "history-error", error);
  }
}

// ---- wiring ----------------------------------------------------------------------------

$("sign-in-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
$("history-more").addEventListener("click", () => {
  state.shown = Math.min(state.shown + HISTORY_PAGE, 500);
  loadHistory();
});
$("history-csv").addEventListener("click", () =>
  download(historyPath("csv"), `${state.org}-${state.screen.user}-${state.screen.action}.csv`));
$("team-csv").addEventListener("click", () =>
  download(`${orgPath()}/members?format=csv`, `${state.org}-team.csv`));
window.addEventListener("hashchange", () => { if (state.me) show(); });

if (sessionStorage.getItem(STORE.token)) {
  start().catch((error) => {
    $("sign-in").hidden = false;
    shout("sign-in-error", error);
  });
} else {
  $("sign-in").hidden = false;
}

export { ACTIONS };
