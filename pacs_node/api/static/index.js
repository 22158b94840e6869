/* Dashboard: jobs table (GET /api/v1/jobs) and the searchable, paged study
   list (GET /api/v1/studies), refreshed every 3 s. */
"use strict";

(() => {
  const {
    ready, el, request, notice, explain, shortUid, fmtTime, fmtSeconds, fmtName, fmtDate, stateBadge, poll,
    updateHealth, STAGES, stageText,
  } = PacsNode;
  const filter = document.getElementById("state-filter");
  const body = document.getElementById("jobs-body");
  const studiesBody = document.getElementById("studies-body");
  const form = document.getElementById("study-search");
  const prev = document.getElementById("studies-prev");
  const next = document.getElementById("studies-next");
  /* Studies per page: ?page_size=N in the address (1-1000), else 25. */
  const pageSize = (() => {
    const n = Number(new URLSearchParams(window.location.search).get("page_size"));
    return Number.isInteger(n) && n >= 1 && n <= 1000 ? n : 25;
  })();
  const SEARCH_FIELDS = { patient: "q-patient", accession: "q-accession", study_uid: "q-study-uid", date: "q-date" };
  /* The search as submitted (not as being typed) and the page shown. */
  let search = {};
  let offset = 0;

  function timingsCell(timings) {
    const parts = [];
    for (const stage of STAGES) {
      if (typeof timings[stage] === "number") parts.push(stage.replace("_", " ") + " " + fmtSeconds(timings[stage]));
    }
    for (const [stage, v] of Object.entries(timings)) {
      if (!STAGES.includes(stage) && typeof v === "number") parts.push(stage + " " + fmtSeconds(v));
    }
    return el("td", { class: "timings" }, parts.join(" · "));
  }

  function stateCell(job) {
    const stage = stageText(job);
    return el("td", { title: job.error || job.state },
      stateBadge(job.state),
      stage ? el("div", { class: "stage", "data-stage": job.stage }, stage) : null);
  }

  function row(job) {
    const href = "/jobs/" + job.id;
    const findings = job.findings_count === null || job.findings_count === undefined ? "" : String(job.findings_count);
    const score = typeof job.study_score === "number" ? job.study_score.toFixed(3) : "";
    return el("tr", { "data-job-id": job.id, "data-state": job.state, class: "state-" + job.state },
      el("td", {}, el("a", { href }, "#" + job.id)),
      stateCell(job),
      el("td", { class: "patient" }, fmtName(job.patient_name)),
      el("td", {}, job.patient_id || ""),
      el("td", { class: "nowrap" }, fmtDate(job.study_date)),
      el("td", {}, job.study_description || ""),
      el("td", {}, job.accession_number || ""),
      el("td", {}, (job.modalities || []).join(", ")),
      el("td", { class: "nowrap" }, fmtTime(job.created_at)),
      timingsCell(job.timings || {}),
      el("td", { class: findings && findings !== "0" ? "num findings-positive" : "num" }, findings),
      el("td", { class: "num" }, score));
  }

  function studyRow(st) {
    return el("tr", { "data-study-uid": st.study_instance_uid },
      el("td", { class: "patient" }, fmtName(st.patient_name)),
      el("td", {}, st.patient_id || ""),
      el("td", { class: "nowrap" }, fmtDate(st.study_date)),
      el("td", {}, st.study_description || ""),
      el("td", {}, st.accession_number || ""),
      el("td", { class: "uid", title: st.study_instance_uid }, shortUid(st.study_instance_uid)),
      el("td", {}, (st.modalities || []).join(", ")),
      el("td", { class: "num" }, st.num_instances),
      el("td", {}, st.latest_job_id === null || st.latest_job_id === undefined ? "" :
        el("a", { href: "/jobs/" + st.latest_job_id }, "#" + st.latest_job_id, " ", stateBadge(st.latest_job_state))),
      el("td", {}, st.viewer_url ?
        el("a", { href: st.viewer_url, class: "viewer-link", target: "_blank", rel: "noopener noreferrer" }, "open") : ""));
  }

  async function refreshJobs() {
    const params = new URLSearchParams({ limit: "200" });
    if (filter.value) params.set("state", filter.value);
    const resp = await request("/api/v1/jobs?" + params.toString());
    const jobs = await resp.json();
    body.replaceChildren(...(jobs.length ? jobs.map(row) :
      [el("tr", { class: "placeholder" }, el("td", { colspan: 12 }, "no jobs yet"))]));
    const counts = {};
    for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
    const total = Number(resp.headers.get("X-Total-Count"));
    const shown = Number.isFinite(total) && total > jobs.length ? `${jobs.length} of ${total}` : String(jobs.length);
    document.getElementById("counts").textContent =
      shown + " job(s)" + (jobs.length ? ": " + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") : "");
  }

  async function refreshStudies() {
    const params = new URLSearchParams({ limit: String(pageSize), offset: String(offset) });
    for (const [k, v] of Object.entries(search)) if (v) params.set(k, v);
    let studies, total;
    try {
      const resp = await request("/api/v1/studies?" + params.toString());
      studies = await resp.json();
      total = Number(resp.headers.get("X-Total-Count"));
    } catch (err) {
      if (err instanceof PacsNode.HttpError && err.status === 422) {
        /* a malformed search value: said in the list, not as a node failure */
        studiesBody.replaceChildren(el("tr", { class: "placeholder" },
          el("td", { colspan: 10, class: "error" }, "Search not understood: " + err.detail)));
        prev.disabled = next.disabled = true;
        document.getElementById("studies-page").textContent = "";
        return;
      }
      throw err;
    }
    if (!Number.isFinite(total)) total = offset + studies.length;
    if (!studies.length && offset > 0 && total > 0) { /* the page emptied (fewer studies now): go back */
      offset = Math.max(0, Math.floor((total - 1) / pageSize) * pageSize);
      return refreshStudies();
    }
    const filtered = Object.values(search).some(Boolean);
    studiesBody.replaceChildren(...(studies.length ? studies.map(studyRow) : [el("tr", { class: "placeholder" },
      el("td", { colspan: 10 }, filtered ? "no study matches the search" : "no studies yet"))]));
    prev.disabled = offset === 0;
    next.disabled = offset + studies.length >= total;
    document.getElementById("studies-page").textContent = studies.length
      ? `studies ${offset + 1}–${offset + studies.length} of ${total}` : `0 of ${total}`;
  }

  async function refresh() {
    try {
      await refreshJobs();
      await refreshStudies();
      notice("");
      document.getElementById("updated").textContent = "updated " + fmtTime(new Date().toISOString());
    } catch (err) {
      notice(explain(err));
    }
  }

  function readSearch() {
    const out = {};
    for (const [k, id] of Object.entries(SEARCH_FIELDS)) out[k] = document.getElementById(id).value.trim();
    return out;
  }

  ready.then((session) => {
    if (!session) return;
    filter.addEventListener("change", refresh);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      search = readSearch();
      offset = 0;
      refresh();
    });
    document.getElementById("q-clear").addEventListener("click", () => {
      form.reset();
      search = {};
      offset = 0;
      refresh();
    });
    prev.addEventListener("click", () => { offset = Math.max(0, offset - pageSize); refresh(); });
    next.addEventListener("click", () => { offset += pageSize; refresh(); });
    poll(refresh);
    poll(updateHealth);
  }, (err) => notice(explain(err)));
})();
