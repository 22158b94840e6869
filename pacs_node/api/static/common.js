/* pacs-node dashboard: shared helpers (no framework, no build step). */
"use strict";

const PacsNode = (() => {
  const REFRESH_MS = 3000;
  const SAFE = ["GET", "HEAD", "OPTIONS"];
  /* The logged-in session ({name, scopes, via, csrf_token}); the session
     cookie itself is HttpOnly and never visible to this script. */
  let session = null;

  class HttpError extends Error {
    constructor(status, detail) {
      super(`HTTP ${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  function toLogin() {
    const here = window.location.pathname + window.location.search;
    window.location.replace("/login?next=" + encodeURIComponent(here));
  }

  async function request(url, options = {}) {
    const method = (options.method || "GET").toUpperCase();
    const headers = { ...(options.headers || {}) };
    if (!SAFE.includes(method) && session && session.csrf_token) headers["X-CSRF-Token"] = session.csrf_token;
    const resp = await fetch(url, { ...options, headers, credentials: "same-origin", cache: "no-store" });
    if (!resp.ok) {
      let detail = resp.statusText;
      try { const body = await resp.json(); detail = body.detail || detail; } catch (e) { /* not JSON */ }
      if (resp.status === 401) toLogin();
      throw new HttpError(resp.status, detail);
    }
    return resp;
  }

  async function getJson(url) {
    return (await request(url)).json();
  }

  /* True when the session has the scope (admin has every scope). */
  function can(scope) {
    return !!session && (session.scopes.includes(scope) || session.scopes.includes("admin"));
  }

  function showUser() {
    const box = document.getElementById("user");
    if (!box || !session) return;
    const logout = document.createElement("a");
    logout.href = "/login";
    logout.id = "logout";
    logout.textContent = "log out";
    logout.addEventListener("click", async (event) => {
      event.preventDefault();
      try { await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin" }); } finally {
        window.location.replace("/login");
      }
    });
    box.replaceChildren(document.createTextNode(`${session.name} (${session.scopes.join(", ")}) · `), logout);
    if (session.via !== "session") logout.hidden = true;
  }

  /* Resolves with the session once known; sends the browser to /login when
     nobody is logged in. Pages start polling after it. */
  const ready = (async () => {
    const resp = await fetch("/api/v1/session", { credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401) { toLogin(); return null; }
    if (!resp.ok) throw new HttpError(resp.status, resp.statusText);
    session = await resp.json();
    showUser();
    return session;
  })();

  function notice(message) {
    const box = document.getElementById("notice");
    if (!box) return;
    box.hidden = !message;
    box.textContent = message || "";
  }

  function explain(err) {
    if (err instanceof HttpError && err.status === 401) return "Not logged in: opening the login page…";
    if (err instanceof HttpError && err.status === 403) return "This token may not do that (" + err.detail + ").";
    if (err instanceof HttpError) return "The node API answered " + err.message;
    return "Cannot reach the node API: " + err.message;
  }

  /* DICOM PN "Family^Given^Middle^Prefix^Suffix" (alphabetic group) as "Family, Given Middle". */
  function fmtName(pn) {
    if (!pn) return "";
    const [family, given, middle, prefix, suffix] = String(pn).split("=")[0].split("^").map((p) => p.trim());
    const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
    return family && rest ? `${family}, ${rest}` : family || rest || "";
  }

  /* DICOM DA "YYYYMMDD" as "YYYY-MM-DD" (other values as they are). */
  function fmtDate(da) {
    if (!da) return "";
    return /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : String(da);
  }

  /* The worker's stages in order (jobs.stage; queue_wait while queued). */
  const STAGES = ["queue_wait", "load", "inference", "postprocess", "build", "delivery"];
  const WORKING = ["queued", "running", "delivering"];

  function stageName(stage) {
    return stage ? stage.replace("_", " ") : "";
  }

  /* "inference (3/6) · 12 s" for a queued, running or delivering job; "" otherwise. */
  function stageText(job, now = Date.now()) {
    if (!WORKING.includes(job.state) || !job.stage) return "";
    const i = STAGES.indexOf(job.stage);
    let text = stageName(job.stage) + (i >= 0 ? ` (${i + 1}/${STAGES.length})` : "");
    const since = job.stage === "queue_wait" ? job.queued_at || job.updated_at : job.stage_started_at;
    const t = since ? Date.parse(since) : NaN;
    if (Number.isFinite(t)) text += " · " + fmtSeconds(Math.max(0, (now - t) / 1000));
    return text;
  }

  /* Element builder: el("td", {class: "x", title: "y"}, "text", child...). Text is
     always set with textContent (never parsed as HTML). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function shortUid(uid) {
    if (!uid) return "";
    return uid.length > 22 ? uid.slice(0, 10) + "…" + uid.slice(-8) : uid;
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtSeconds(v) {
    if (typeof v !== "number" || !Number.isFinite(v)) return "";
    if (v < 1) return (v * 1000).toFixed(0) + " ms";
    if (v < 120) return v.toFixed(1) + " s";
    return (v / 60).toFixed(1) + " min";
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function stateBadge(state) {
    return el("span", { class: "badge badge-" + (state || "unknown") }, state || "?");
  }

  /* Poll fn every REFRESH_MS (the next run starts after the previous ends). */
  function poll(fn) {
    const run = async () => {
      try { await fn(); } finally { window.setTimeout(run, REFRESH_MS); }
    };
    run();
  }

  async function updateHealth() {
    const badge = document.getElementById("health");
    if (!badge) return;
    try {
      const resp = await fetch("/healthz", { credentials: "same-origin", cache: "no-store" });
      const body = await resp.json();
      const failed = Object.entries(body.checks || {}).filter(([, c]) => !c.ok).map(([k]) => k);
      badge.className = "badge " + (body.ok ? "badge-done" : "badge-failed");
      badge.textContent = body.ok ? "healthy" : "unhealthy: " + failed.join(", ");
    } catch (e) {
      badge.className = "badge badge-failed";
      badge.textContent = "unreachable";
    }
  }

  return {
    ready, can, request, getJson, notice, explain, el, shortUid, fmtTime, fmtSeconds, fmtBytes, fmtName, fmtDate,
    stateBadge, poll, updateHealth, HttpError, STAGES, WORKING, stageName, stageText,
  };
})();
