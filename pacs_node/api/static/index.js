/* Dashboard jobs table: GET /api/v1/jobs every 3 s. */
"use strict";

(() => {
  const { ready, el, getJson, notice, explain, shortUid, fmtTime, fmtSeconds, stateBadge, poll, updateHealth } = PacsNode;
  const STAGES = ["queue_wait", "load", "inference", "postprocess", "build", "delivery"];
  const filter = document.getElementById("state-filter");
  const body = document.getElementById("jobs-body");

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

  function row(job) {
    const href = "/jobs/" + job.id;
    const findings = job.findings_count === null || job.findings_count === undefined ? "" : String(job.findings_count);
    const score = typeof job.study_score === "number" ? job.study_score.toFixed(3) : "";
    return el("tr", { "data-job-id": job.id, "data-state": job.state, class: "state-" + job.state },
      el("td", {}, el("a", { href }, "#" + job.id)),
      el("td", { title: job.error || job.state }, stateBadge(job.state)),
      el("td", { class: "uid", title: job.study_instance_uid }, shortUid(job.study_instance_uid)),
      el("td", {}, job.accession_number || ""),
      el("td", {}, (job.modalities || []).join(", ")),
      el("td", { class: "nowrap" }, fmtTime(job.created_at)),
      timingsCell(job.timings || {}),
      el("td", { class: findings && findings !== "0" ? "num findings-positive" : "num" }, findings),
      el("td", { class: "num" }, score));
  }

  async function refresh() {
    const params = new URLSearchParams({ limit: "200" });
    if (filter.value) params.set("state", filter.value);
    try {
      const jobs = await getJson("/api/v1/jobs?" + params.toString());
      notice("");
      body.replaceChildren(...(jobs.length ? jobs.map(row) : [el("tr", { class: "placeholder" }, el("td", { colspan: 9 }, "no jobs yet"))]));
      const counts = {};
      for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
      document.getElementById("counts").textContent =
        jobs.length + " job(s)" + (jobs.length ? ": " + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") : "");
      document.getElementById("updated").textContent = "updated " + fmtTime(new Date().toISOString());
    } catch (err) {
      notice(explain(err));
    }
  }

  ready.then((session) => {
    if (!session) return;
    filter.addEventListener("change", refresh);
    poll(refresh);
    poll(updateHealth);
  }, (err) => notice(explain(err)));
})();
