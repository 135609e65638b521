"use strict";
const grouped = new Intl.NumberFormat("en-US");
const rate = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
const $ = (id) => document.getElementById(id);
const setText = (id, text) => { const el = $(id); if (el) el.textContent = text; };
const count = (n) => (n === null || n === undefined ? "—" : grouped.format(n));
const duration = (s) => {
  if (s === null || s === undefined) return "—";
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
};
function cell(text, id, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (id) td.id = id;
  if (cls) td.className = cls;
  return td;
}
function row(cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}
function fill(tbodyId, rows, emptyText, columns) {
  const body = $(tbodyId);
  if (rows.length === 0) {
    const td = cell(emptyText, null, "empty");
    td.colSpan = columns;
    body.replaceChildren(row([td]));
  } else {
    body.replaceChildren(...rows);
  }
}
function pill(id, ok, yes, no) {
  const el = $(id);
  el.textContent = ok ? yes : no;
  el.className = "pill " + (ok ? "yes" : "no");
}
function render(s) {
  setText("instance", s.instance);
  setText("version", s.version);
  setText("uptime", duration(s.uptime_s));
  const why = s.readiness.missing.map((m) => m === "joined_group" ? "not in group"
    : m.startsWith("schema_registry") ? "schema registry " + s.readiness.schema_registry
    : "database breaker " + (s.readiness.database_breaker || "missing").replace("_", "-"));
  pill("ready", s.readiness.ready, "ready", "not ready: " + why.join(", "));
  pill("joined", s.readiness.joined_group, "in consumer group", "not in consumer group");

  setText("rate-window", "(last " + Math.round(s.throughput.window_s) + " s)");
  const perSecond = (v) => (v === null ? "—" : rate.format(v));
  setText("rate-consumed", perSecond(s.throughput.consumed_per_s));
  setText("rate-stored", perSecond(s.throughput.stored_per_s));
  setText("total-consumed", count(s.totals.consumed));
  setText("total-stored", count(s.totals.stored));
  setText("total-duplicates", count(s.totals.duplicates));
  setText("total-dead-lettered", count(s.totals.dead_lettered));
  setText("pool-in-use", count(s.pool.in_use));
  setText("pool-idle", count(s.pool.idle));

  fill("breakers", s.breakers.map((b) => {
    const state = document.createElement("span");
    state.id = "breaker-" + b.dependency;
    state.className = "pill state-" + b.state;
    state.textContent = b.state.replace("_", "-");
    const td = document.createElement("td");
    td.append(state);
    return row([cell(b.dependency), td]);
  }), "none registered", 2);

  let lagTotal = 0, lagKnown = false;
  fill("lags", s.partitions.map((p) => {
    if (p.lag !== null) { lagTotal += p.lag; lagKnown = true; }
    return row([cell(p.topic), cell(String(p.partition), null, "num"),
                cell(p.lag === null ? "unknown" : count(p.lag), "lag-" + p.topic + "-" + p.partition, "num")]);
  }), "no partitions assigned", 3);
  setText("lag-total", lagKnown ? count(lagTotal) : "—");

  const registry = s.schema_registry;
  $("registry").hidden = !registry;
  if (registry) {
    const state = $("registry-state");
    state.textContent = registry.state;
    state.className = "pill " + (registry.state === "ok" ? "yes" : "no");
    $("registry-paused").hidden = !registry.paused;
    $("registry-paused").className = "pill no";
    setText("registry-cached", count(registry.cached_ids) + " / " + count(registry.cache_capacity));
    setText("registry-not-found", count(registry.not_found_ids));
    setText("registry-urls", registry.urls.join(", "));
    setText("registry-error", registry.last_error ? "last error: " + registry.last_error : "");
  }

  setText("dl-window", duration(s.dead_letters.recent_window_s).replace(" 0s", ""));
  fill("dead-letters", s.dead_letters.classes.map((c) => row([
    cell(c.class),
    cell(count(c.recent), "dl-recent-" + c.class, "num"),
    cell(count(c.total), "dl-total-" + c.class, "num"),
    cell(c.last_seen_s_ago === null ? "—" : duration(c.last_seen_s_ago) + " ago", null, "num"),
  ])), "none", 4);
}
async function refresh() {
  try {
    const response = await fetch("status.json", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    setText("updated", new Date().toLocaleTimeString());
    setText("conn", "live");
    $("conn").className = "";
  } catch (err) {
    setText("conn", "disconnected (" + err.message + ")");
    $("conn").className = "down";
  }
}
refresh();
setInterval(refresh, 1000);
