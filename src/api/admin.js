// The admin page's script: reads /admin/state every two seconds and renders it; the action
// buttons post to /admin/<action> with the session's CSRF token. No build step.
"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const logoutCsrf = document.getElementById("logout-csrf");
if (logoutCsrf) logoutCsrf.value = csrf;

function duration(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min";
  const h = Math.floor(m / 60);
  if (h < 48) return h + " h " + (m % 60) + " min";
  return Math.floor(h / 24) + " d";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function say(text, error) {
  const p = document.getElementById("message");
  p.textContent = text;
  p.className = error ? "error" : "muted";
}

async function act(action, id) {
  say(action + " " + id + "…");
  try {
    const r = await fetch("/admin/" + action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ instanceId: id }),
    });
    const body = await r.json().catch(() => ({}));
    if (r.ok) say(action + " " + id + ": done");
    else say(action + " " + id + ": " + (body.error || r.status), true);
  } catch (e) {
    say(action + " " + id + ": " + e, true);
  }
  refresh();
}

function render(state) {
  const pools = document.querySelector("#pools tbody");
  pools.replaceChildren();
  for (const [purpose, p] of Object.entries(state.pools)) {
    const row = pools.insertRow();
    cell(row, purpose);
    cell(row, p.freeReady + p.freeLaunching);
    cell(row, p.assigned);
    cell(row, p.freeLaunching + p.pendingLaunches + p.resuming);
    cell(row, p.paused);
    cell(row, p.terminating);
    cell(row, p.minFree);
    cell(row, p.max);
    cell(row, p.launchesPaused ? "paused: " + p.launchesPaused : "running", p.launchesPaused ? "error" : "");
  }
  // Cents once there is a unit's worth; before that, enough digits to see it move.
  const money = (v) => v.toFixed(v >= 1 ? 2 : 4) + " " + state.currency;
  const costs = document.querySelector("#costs tbody");
  costs.replaceChildren();
  const users = document.querySelector("#user-costs tbody");
  users.replaceChildren();
  for (const [purpose, c] of Object.entries(state.costs)) {
    const row = costs.insertRow();
    cell(row, purpose);
    cell(row, c.warmPolicy);
    cell(row, c.keepFree);
    cell(row, money(c.today.cost));
    cell(row, money(c.today.byState.free.cost + c.today.byState.launching.cost));
    cell(row, money(c.total.cost));
    cell(row, c.total.instanceHours.toFixed(1));
    document.getElementById("costs-since").textContent = "(books since " + c.since + ")";
    document.getElementById("period").textContent = "(" + c.period + ")";
    for (const [user, u] of Object.entries(c.users)) {
      const r = users.insertRow();
      cell(r, user);
      cell(r, purpose);
      cell(r, u.byState.assigned_active.hours.toFixed(1));
      cell(r, u.byState.assigned_idle.hours.toFixed(1));
      cell(r, u.byState.paused.hours.toFixed(1));
      cell(r, money(u.cost));
    }
  }
  const instances = document.querySelector("#instances tbody");
  instances.replaceChildren();
  for (const i of state.instances) {
    const row = instances.insertRow();
    row.dataset.id = i.id;
    cell(row, i.id);
    cell(row, i.purpose);
    cell(row, i.owner || "—");
    const s = cell(row, "");
    const badge = document.createElement("span");
    badge.className = "state state-" + i.state;
    badge.textContent = i.state;
    s.appendChild(badge);
    cell(row, duration(i.ageMs));
    cell(row, duration(i.idleForMs));
    cell(row, i.address || "");
    const actions = cell(row, "");
    const button = (label, action) => {
      const b = document.createElement("button");
      b.textContent = label;
      b.className = action;
      b.onclick = () => act(action, i.id);
      actions.appendChild(b);
    };
    if (i.pausable) button("Pause", "pause");
    if (i.state === "paused") button("Resume", "resume");
    if (i.state !== "terminating") button("Terminate", "terminate");
  }
  document.getElementById("count").textContent = "(" + state.instances.length + ")";
  const events = document.querySelector("#events tbody");
  events.replaceChildren();
  for (const e of state.events) {
    const row = events.insertRow();
    cell(row, new Date(e.at_ms).toLocaleTimeString());
    cell(row, e.event);
    cell(row, e.user || "");
    cell(row, e.instance || "");
    cell(row, e.purpose || "");
    cell(row, e.cause, "cause");
  }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const r = await fetch("/admin/state", { credentials: "same-origin" });
    if (r.status === 401) { location.reload(); return; }
    render(await r.json());
  } catch (e) {
    say("cannot reach the pool: " + e, true);
  }
}

refresh();
setInterval(refresh, 2000);
