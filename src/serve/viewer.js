// The viewer: a form over GET /v1/events and /v1/export. Every value from the API is written
// with textContent, never as HTML. Parameters can be prefilled from the fragment
// (#tenant=acme&from=...&to=...&run=1); the fragment never reaches the server.
"use strict";
(function () {
  const FILTERS = ["tenant", "from", "to", "actor", "actor_type", "action", "resource_type",
    "resource_id", "outcome", "trace_id", "session_id"];
  const byId = (id) => document.getElementById(id);
  const statusLine = byId("status");
  let cursors = [];
  let nextCursor = null;

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.className = isError ? "error" : "";
  }

  function params(extra) {
    const query = new URLSearchParams();
    for (const name of FILTERS) {
      const value = byId(name).value.trim();
      if (value) query.set(name, value);
    }
    for (const [name, value] of Object.entries(extra || {})) {
      if (value !== null && value !== undefined && value !== "") query.set(name, value);
    }
    return query;
  }

  function headers() {
    const token = byId("token").value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (className) td.className = className;
    row.appendChild(td);
  }

  function render(events) {
    const body = byId("rows");
    body.replaceChildren();
    for (const event of events) {
      const row = document.createElement("tr");
      row.dataset.eventId = event.event_id;
      cell(row, event.occurred_at);
      cell(row, event.actor_id + " (" + event.actor_type + ")");
      cell(row, event.action);
      cell(row, event.resource_type + "/" + event.resource_id);
      cell(row, event.outcome);
      cell(row, event.event_id, "event-id");
      cell(row, event.details === null ? "" : JSON.stringify(event.details), "details");
      body.appendChild(row);
    }
    byId("row-count").textContent = String(events.length);
  }

  async function explain(response) {
    try {
      const body = await response.json();
      return body.message || response.statusText;
    } catch (_) {
      return response.statusText;
    }
  }

  async function load(cursor) {
    setStatus("loading…", false);
    const query = params({ order: byId("order").value, limit: byId("limit").value, cursor });
    try {
      const response = await fetch("/v1/events?" + query.toString(), { headers: headers() });
      if (!response.ok) {
        setStatus(response.status + ": " + (await explain(response)), true);
        return;
      }
      const page = await response.json();
      render(page.events);
      nextCursor = page.next_cursor;
      byId("next").disabled = !nextCursor;
      byId("first").disabled = cursors.length <= 1;
      byId("page-number").textContent = String(cursors.length);
      setStatus(page.events.length + " events" + (nextCursor ? ", more on the next page" : ", last page") +
        " (cache: " + (response.headers.get("x-auditflow-cache") || "?") + ")", false);
    } catch (err) {
      setStatus("request failed: " + err, true);
    }
  }

  function search() {
    cursors = [null];
    load(null);
  }

  async function exportAs(format) {
    setStatus("exporting…", false);
    try {
      const response = await fetch("/v1/export?" + params({ format }).toString(), { headers: headers() });
      if (!response.ok) {
        setStatus(response.status + ": " + (await explain(response)), true);
        return;
      }
      const blob = await response.blob();
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = "auditflow-export." + format;
      link.click();
      URL.revokeObjectURL(link.href);
      setStatus("export downloaded (" + blob.size + " bytes)", false);
    } catch (err) {
      setStatus("export failed: " + err, true);
    }
  }

  byId("query").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  byId("next").addEventListener("click", () => { cursors.push(nextCursor); load(nextCursor); });
  byId("first").addEventListener("click", search);
  byId("export-ndjson").addEventListener("click", () => exportAs("ndjson"));
  byId("export-csv").addEventListener("click", () => exportAs("csv"));

  const fragment = new URLSearchParams(window.location.hash.slice(1));
  for (const name of FILTERS.concat(["order", "limit", "token"])) {
    if (fragment.has(name)) byId(name).value = fragment.get(name);
  }
  if (fragment.get("run") === "1") search();
})();
