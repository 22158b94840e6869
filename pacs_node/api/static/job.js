/* Job page: GET /api/v1/jobs/{id} every 3 s; key images rendered by the node. */
"use strict";

(() => {
  const {
    ready, can, el, getJson, request, notice, explain, shortUid, fmtTime, fmtSeconds, fmtBytes, fmtName, fmtDate,
    stateBadge, poll, STAGES, WORKING, stageName, stageText,
  } = PacsNode;
  const match = window.location.pathname.match(/\/jobs\/(\d+)/);
  const jobId = match ? Number(match[1]) : NaN;
  const TERMINAL = ["done", "failed", "delivery_failed", "skipped", "cancelled"];
  let keyImagesVersion = null;

  function fill(tableId, rows) {
    const tbody = document.querySelector("#" + tableId + " tbody");
    const cols = document.querySelectorAll("#" + tableId + " thead th").length || 2;
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "placeholder" }, el("td", { colspan: cols }, "none"))]));
  }

  function summary(job) {
    const items = [
      ["Patient", fmtName(job.patient_name)],
      ["Patient ID", job.patient_id],
      ["Study date", fmtDate(job.study_date)],
      ["Description", job.study_description],
      ["Accession", job.accession_number],
      ["Study UID", job.study_instance_uid, "uid"],
      ["Study version", job.study_version],
      ["Modalities", (job.modalities || []).join(", ")],
      ["Series analysed", job.source_series_uid, "uid"],
      ["Instances / series", `${job.instance_count} / ${job.series_count}`],
      ["Profile", job.model_profile],
      ["Reason", job.reason],
      ["Attempts", job.attempts],
      ["Worker", job.worker_host],
      ["Created", fmtTime(job.created_at)],
      ["Queued", fmtTime(job.queued_at)],
      ["Started", fmtTime(job.started_at)],
      ["Finished", fmtTime(job.finished_at)],
      ["Study score", typeof job.study_score === "number" ? job.study_score.toFixed(4) : ""],
      ["Failed in stage", job.state === "failed" || job.state === "delivery_failed" ? stageName(job.stage) : ""],
      ["Error", job.error, "error"],
    ];
    const dl = document.getElementById("summary");
    dl.replaceChildren();
    for (const [k, v, cls] of items) {
      if (v === null || v === undefined || v === "") continue;
      dl.append(el("dt", {}, k), el("dd", { class: cls || null }, String(v)));
    }
  }

  /* The stage of a queued, running or delivering job, and how far along the stages it is. */
  function stage(job) {
    const box = document.getElementById("stage-box");
    const text = stageText(job);
    box.hidden = !text;
    box.dataset.stage = text ? job.stage : "";
    document.getElementById("stage-text").textContent = text ? "Stage: " + text : "";
    const bar = document.getElementById("stage-progress");
    bar.max = STAGES.length;
    bar.value = Math.max(0, STAGES.indexOf(job.stage));
  }

  /* "Open in viewer": the node builds the URL from http.viewer_url (UID URL-encoded). */
  function viewer(job) {
    const link = document.getElementById("viewer-link");
    const url = typeof job.viewer_url === "string" && /^https?:\/\//i.test(job.viewer_url) ? job.viewer_url : "";
    link.hidden = !url;
    if (url) link.href = url; else link.removeAttribute("href");
  }

  function timings(job) {
    const entries = Object.entries(job.timings || {}).filter(([, v]) => typeof v === "number");
    const max = Math.max(0.001, ...entries.map(([, v]) => v));
    fill("timings", entries.map(([stage, v]) => el("tr", {},
      el("th", {}, stage.replace("_", " ")),
      el("td", { class: "num" }, fmtSeconds(v)),
      el("td", { class: "barcell" }, el("span", { class: "bar", style: null, "data-w": Math.round((100 * v) / max) })))));
    for (const bar of document.querySelectorAll("#timings .bar")) bar.style.width = bar.dataset.w + "%";
  }

  function findings(job) {
    const f = job.findings || {};
    const items = Array.isArray(f.items) ? f.items : [];
    const count = job.findings_count;
    document.getElementById("findings-summary").textContent =
      count === null || count === undefined ? "not analysed yet" : count === 0 ? "no findings" : `${count} finding(s)`;
    const num = (v, d) => (typeof v === "number" ? v.toFixed(d) : "");
    fill("findings", items.map((it, i) => el("tr", {},
      el("td", {}, i + 1),
      el("td", { class: "num" }, num(it.volume_mm3, 1)),
      el("td", { class: "num" }, num(it.max_score, 3)),
      el("td", { class: "num" }, num(it.mean_score, 3)),
      el("td", {}, Array.isArray(it.centroid) ? it.centroid.map((c) => num(c, 1)).join(", ") : ""))));
  }

  /* findings.domain: the series checked against the model's training domain.
     Shown only when the check failed; the warnings are set as text. */
  function domain(job) {
    const d = (job.findings || {}).domain;
    const box = document.getElementById("domain-warning");
    const outside = d && typeof d === "object" && d.in_domain === false;
    box.hidden = !outside;
    if (!outside) { box.replaceChildren(); return; }
    const warnings = Array.isArray(d.warnings) ? d.warnings : [];
    box.replaceChildren(
      el("strong", {}, "Series outside the model's training domain: interpret the result with caution."),
      el("ul", {}, ...warnings.map((w) => el("li", {}, String(w)))));
  }

  function events(job) {
    fill("events", (job.events || []).map((e) => el("tr", {},
      el("td", { class: "nowrap" }, fmtTime(e.at)),
      el("td", {}, e.from_state ? stateBadge(e.from_state) : ""),
      el("td", {}, stateBadge(e.to_state)),
      el("td", {}, e.message || ""),
      el("td", {}, e.host || ""))));
  }

  function outputs(job) {
    fill("outputs", (job.outputs || []).map((o) => el("tr", {},
      el("td", {}, o.kind),
      el("td", { class: "uid", title: o.sop_instance_uid }, shortUid(o.sop_instance_uid)),
      el("td", { class: "num" }, fmtBytes(o.size_bytes)),
      el("td", {}, o.validation || ""))));
  }

  function deliveries(job) {
    fill("deliveries", (job.deliveries || []).map((d) => el("tr", {},
      el("td", {}, d.destination),
      el("td", { class: "num" }, d.attempt),
      el("td", {}, el("span", { class: "badge badge-" + (d.status === "success" ? "done" : "failed") }, d.status)),
      el("td", { class: "num" }, d.status_code === null ? "" : d.status_code),
      el("td", { class: "nowrap" }, fmtTime(d.started_at)),
      el("td", { class: "error" }, d.error || ""))));
  }

  /* An image that failed to load: ask the node why and show it in the image's place. */
  async function imageFailed(img, figure, url) {
    let why = "the image did not load";
    try {
      await request(url);
      why = "the image could not be decoded";
    } catch (err) {
      why = err instanceof PacsNode.HttpError ? `HTTP ${err.status}: ${err.detail}` : err.message;
    }
    figure.classList.add("keyimage-failed");
    img.replaceWith(el("div", { class: "keyimage keyimage-error", role: "alert" }, "Key image not available: " + why));
  }

  /* The PNGs are loaded by <img> tags: the session cookie authenticates them.
     A key image that fails shows its own error in its place; a failed list
     says so in the section (neither is a node-wide error). */
  async function keyImages(job) {
    const version = `${job.state}/${(job.outputs || []).map((o) => o.sha256).join(",")}`;
    if (version === keyImagesVersion) return;
    const msg = document.getElementById("keyimages-msg");
    let info;
    try {
      info = await getJson(`/jobs/${jobId}/keyimages`);
    } catch (err) {
      if (err instanceof PacsNode.HttpError && err.status === 401) throw err;
      msg.textContent = "Key images not available: " + err.message;
      msg.classList.add("error");
      return;
    }
    msg.classList.remove("error");
    const box = document.getElementById("keyimages");
    const figures = info.images.map((img) => {
      const where = `slice ${img.slice_index + 1}/${info.slices}`;
      const caption = img.outlined
        ? `finding ${img.finding ?? img.n + 1} · ${where} · anomaly area ${img.area_px} px`
        : `${where} (middle) · no findings`;
      // ?v= : a new image URL when the job's outputs change (the browser's image cache).
      const url = `${img.url}?v=${encodeURIComponent(version)}`;
      const tag = el("img", { src: url, alt: caption, class: "keyimage" });
      const figure = el("figure", { "data-key-image": img.n, "data-finding": img.finding ?? null },
        tag, el("figcaption", {}, caption));
      tag.addEventListener("error", () => imageFailed(tag, figure, url), { once: true });
      return figure;
    });
    box.replaceChildren(...figures);
    msg.textContent = info.message;
    keyImagesVersion = version;
  }

  const retryButton = document.getElementById("retry");
  retryButton.addEventListener("click", async () => {
    const msg = document.getElementById("retry-msg");
    try {
      const resp = await request(`/api/v1/jobs/${jobId}/retry`, { method: "POST" });
      const body = await resp.json();
      msg.textContent = "retry accepted: " + body.state;
    } catch (err) {
      msg.textContent = err.message;
    }
  });

  async function refresh() {
    if (!Number.isFinite(jobId)) { notice("No job id in the address."); return; }
    try {
      const job = await getJson(`/api/v1/jobs/${jobId}`);
      notice("");
      document.title = `pacs-node · job ${job.id} (${job.state})`;
      document.getElementById("title").textContent = `Job #${job.id}`;
      document.getElementById("state").replaceWith(Object.assign(stateBadge(job.state), { id: "state" }));
      retryButton.hidden = !(can("write") && TERMINAL.includes(job.state));
      summary(job); stage(job); viewer(job); timings(job); domain(job); findings(job); events(job); outputs(job);
      deliveries(job);
      await keyImages(job);
    } catch (err) {
      if (err instanceof PacsNode.HttpError && err.status === 404) notice(`Job ${jobId} does not exist.`);
      else notice(explain(err));
    }
  }

  ready.then((session) => { if (session) poll(refresh); }, (err) => notice(explain(err)));
})();
