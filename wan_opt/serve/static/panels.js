// The other views: benchmark results as charts, saved memory plans, and the request form with its queue.
"use strict";

(() => {
  const { el, put, api, post, fileUrl, fmt, view, views, showError, planChart } = Page;

  // -- benchmarks ----------------------------------------------------------------------------------------------
  function benchChart(b) {
    const c = b.chart, out = [];
    const meta = [c.device, c.size && `${c.size} × ${c.frames} frames`, c.steps && `${c.steps} steps`].filter(Boolean).join(" · ");
    out.push(el("h1", {}, b.name), el("p", { class: "muted" }, meta), el("p", {}, el("code", { class: "command" }, c.command || "")));
    const timed = c.rows.filter(r => r.seconds_per_step !== null && r.seconds_per_step !== undefined);
    if (timed.length) {
      out.push(Charts.bars({ title: c.kind === "bench" ? "Seconds per CFG step (lower is faster)" : "Seconds per step",
        unit: "s", rows: timed.map(r => ({ label: r.name, value: r.seconds_per_step, cls: r.name === c.baseline ? "baseline" : "gpu" })) }));
    }
    const rated = c.rows.filter(r => r.ratio);
    if (rated.length) {
      out.push(Charts.bars({ title: `Speed against ${c.baseline || "the baseline"} (×, higher is faster)`, unit: "×",
        rows: rated.map(r => ({ label: r.name, value: r.ratio, cls: r.name === c.baseline ? "baseline" : "ratio" })),
        lines: [{ value: 1, label: "baseline", cls: "usable" }] }));
    }
    // wan_opt.bench's stage seconds repeat its seconds per step; other benchmarks' are their only timing.
    const staged = c.kind === "bench" ? [] : c.rows.filter(r => r.stages && Object.keys(r.stages).length);
    for (const r of staged.slice(0, 6)) {
      out.push(Charts.bars({ title: `Stage seconds: ${r.name}`, unit: "s",
        rows: Object.entries(r.stages).map(([k, v]) => ({ label: k.replace(/_/g, " "), value: v, cls: "host" })) }));
    }
    const numbered = c.rows.filter(r => r.numbers && Object.keys(r.numbers).length);
    if (numbered.length) {
      const keys = [...new Set(numbered.flatMap(r => Object.keys(r.numbers)))].slice(0, 14);
      out.push(el("div", { class: "scroll" }, el("table", { class: "knobs" },
        el("tr", {}, el("th", {}, ""), keys.map(k => el("th", {}, k))),
        numbered.map(r => el("tr", {}, el("td", {}, r.name), keys.map(k => el("td", {}, fmt(r.numbers[k] ?? null, 3))))))));
    }
    if (c.kind === "bench") {
      out.push(el("table", { class: "knobs" }, el("tr", {}, ["run", "s / step", "×", "peak GPU GiB", "forward deviation"].map(h => el("th", {}, h))),
        c.rows.map(r => el("tr", {}, el("td", {}, r.name), el("td", {}, fmt(r.seconds_per_step, 3)), el("td", {}, fmt(r.ratio, 3)),
          el("td", {}, fmt(r.peak_gpu_gib)), el("td", {}, r.deviation === null ? "–" : `${(r.deviation * 100).toFixed(2)}%`)))));
    }
    const failed = Object.entries(c.failed || {});
    if (failed.length) out.push(el("p", { class: "error" }, failed.map(([k, v]) => `${k}: ${v}`).join("; ")));
    return out;
  }

  views.bench = async arg => {
    let list;
    try { list = (await api("/api/benchmarks")).benchmarks; } catch (err) { return showError(err); }
    if (!list.length) {
      return view(el("div", { class: "notice" }, el("h1", {}, "Benchmarks"),
        el("p", {}, "No benchmark results in the served folders. Serve benchmarks/results/ too, e.g. ",
           el("code", {}, "wan-opt serve multirun/ benchmarks/results/"), ".")));
    }
    const current = list.find(b => b.id === arg) || list.find(b => b.name.startsWith("bench_")) || list[0];
    const side = el("nav", { class: "list" }, list.map(b => el("a", { href: `#bench/${b.id}`, class: b.id === current.id ? "active" : "" }, b.name)));
    const body = el("section", { class: "bench-body" }, el("p", { class: "muted" }, "Loading…"));
    view(el("div", { class: "two" }, side, body));
    try { put(body, ...benchChart(await api(`/api/benchmarks/${current.id}`))); } catch (err) { put(body, el("p", { class: "error" }, err.message)); }
  };

  // -- saved plans (plan=true) ----------------------------------------------------------------------------------
  views.plans = async () => {
    let plans;
    try { plans = (await api("/api/plans")).plans; } catch (err) { return showError(err); }
    view(el("div", { class: "plans" }, el("h1", {}, "Memory plans"),
      plans.length ? null : el("p", { class: "muted" }, "No plan.json in the served folders: ",
        el("code", {}, "wan-opt plan=true model=… prompt=…"), " writes one; every run's own plan is on its page."),
      plans.map(p => el("section", { class: "card-flat" }, el("h2", {}, `${p.model || ""} on ${p.profile || ""}`),
        el("p", { class: "muted" }, p.name), planChart(p.chart)))));
  };

  // -- the request form and the queue -----------------------------------------------------------------------------
  let schema = null, queueTimer = null;

  function field(label, input, hint) {
    return el("label", { class: "field" }, el("span", {}, label), input, hint ? el("small", {}, hint) : null);
  }

  function formValues(form) {
    const values = {};
    for (const input of form.querySelectorAll("[name]")) if (input.type !== "file") values[input.name] = input.value;
    return values;
  }

  function renderQueue(jobs) {
    const box = document.getElementById("queue");
    const active = jobs.filter(j => j.status === "queued" || j.status === "running").length;
    document.getElementById("queue-count").textContent = active ? String(active) : "";
    if (!box) return active;
    put(box, ...(jobs.length ? jobs.slice().reverse().map(j => {
      const done = j.steps ? j.step / j.steps : 0;
      return el("div", { class: `job ${j.status}`, "data-id": j.id },
        el("div", { class: "job-head" }, el("span", { class: `pill ${j.status}` }, j.status), el("b", {}, `#${j.id}`), " ", j.prompt),
        el("div", { class: "progress" }, el("div", { style: `width:${Math.round((j.status === "done" ? 1 : done) * 100)}%` })),
        el("small", {}, j.status === "running" ? `${j.stage}${j.steps ? ` · step ${j.step}/${j.steps}` : ""}${j.step_seconds ? ` · ${fmt(j.step_seconds)} s/step` : ""}` : j.stage),
        j.error ? el("p", { class: "error" }, j.error) : null,
        j.video ? el("p", {}, el("a", { href: fileUrl(j.video), target: "_blank", rel: "noopener" }, "the video")) : null,
        j.status === "queued" ? el("button", { class: "button small", onclick: async () => {
          try { await post(`/api/queue/${j.id}/cancel`, {}); pollQueue(); } catch (err) { alert(err.message); } } }, "cancel") : null);
    }) : [el("p", { class: "muted" }, "Nothing queued. Requests run one at a time, in order.")]));
    return active;
  }

  async function pollQueue() {
    clearTimeout(queueTimer);
    try {
      const { jobs } = await api("/api/queue");
      const active = renderQueue(jobs);
      queueTimer = setTimeout(pollQueue, active ? 800 : 4000);
    } catch (err) { queueTimer = setTimeout(pollQueue, 4000); }
  }

  function modelDefaults(form) {
    const m = schema.models[form.querySelector("[name=model]").value];
    if (!m) return;
    for (const key of ["steps", "frames", "fps", "guidance", "guidance_2"]) {
      const input = form.querySelector(`[name=${key}]`);
      input.placeholder = m[key] === null ? "–" : String(m[key]);
    }
    const sizes = form.querySelector("#sizes");
    put(sizes, ...m.sizes.map(s => el("option", { value: s })));
    form.querySelector("[name=size]").placeholder = m.sizes[0];
  }

  views.new = async () => {
    try { schema = schema || await api("/api/form"); } catch (err) { return showError(err); }
    if (!schema.enabled) {
      return view(el("div", { class: "notice" }, el("h1", {}, "New run"), el("p", {}, "The request form is off on this server (",
        el("code", {}, "--no-form"), "). Runs made on the command line still appear in the gallery.")));
    }
    const select = (name, options, chosen) => el("select", { name }, options.map(o => el("option", { value: o, selected: o === chosen }, o)));
    const text = (name, attrs) => el("input", { name, autocomplete: "off", ...attrs });
    const message = el("div", { id: "form-error", class: "error", role: "alert", hidden: true });
    const planBox = el("div", { id: "plan-preview" }, el("p", { class: "muted" }, "The memory plan shows here."));
    const form = el("form", { class: "request", id: "request-form" },
      el("div", { class: "row3" },
        field("Model", select("model", schema.groups.model, schema.defaults.model)),
        field("Profile", select("hardware", schema.groups.hardware, schema.defaults.hardware), schema.detected.reason),
        field("Mode", select("mode", schema.groups.mode, schema.defaults.mode))),
      field("Prompt", el("textarea", { name: "prompt", rows: 3, placeholder: "a red fox running through fresh snow" })),
      field("Negative prompt", el("textarea", { name: "negative_prompt", rows: 2, placeholder: "the model's own" })),
      schema.image ? field("Image (image-to-video)", el("input", { type: "file", id: "image-file", accept: "image/png,image/jpeg,image/webp" })) : null,
      el("div", { class: "row4" },
        field("Seed", text("seed", { placeholder: "0", inputmode: "numeric" })), field("Steps", text("steps", { inputmode: "numeric" })),
        field("Size (W*H)", text("size", { list: "sizes" })), field("Frames (4n+1)", text("frames", { inputmode: "numeric" }))),
      el("div", { class: "row4" },
        field("Guidance", text("guidance", { inputmode: "decimal" })), field("Guidance 2", text("guidance_2", { inputmode: "decimal" })),
        field("fps", text("fps", { inputmode: "numeric" }))),
      el("datalist", { id: "sizes" }), message,
      el("div", { class: "actions" }, el("button", { type: "submit", class: "button primary", id: "queue-run" }, "Queue this run"),
        el("small", { class: "muted" }, "Checked as the command line checks it; runs one at a time.")));
    modelDefaults(form);
    let timer = null;
    const showPlan = async () => {
      try {
        const plan = await post("/api/plan", formValues(form));
        put(planBox, el("p", { class: "muted" }, `${plan.model} on ${plan.profile}`), planChart(plan.chart));
        message.hidden = true;
      } catch (err) { message.textContent = err.message; message.hidden = false; }
    };
    form.addEventListener("input", e => {
      if (e.target.name === "model") modelDefaults(form);
      if (e.target.name === "prompt" || e.target.name === "negative_prompt") return;
      clearTimeout(timer); timer = setTimeout(showPlan, 400);
    });
    form.addEventListener("submit", async e => {
      e.preventDefault();
      const values = formValues(form);
      const file = document.getElementById("image-file");
      try {
        if (file && file.files.length) {
          const upload = await api("/api/upload", { method: "POST", headers: { "content-type": file.files[0].type }, body: file.files[0] });
          values.image = upload.image;
        }
        await post("/api/requests", values);
        message.hidden = true;
        pollQueue();
      } catch (err) { message.textContent = err.message; message.hidden = false; }
    });
    view(el("div", { class: "new" }, el("section", {}, el("h1", {}, "New run"), form),
      el("section", {}, el("h2", {}, "Memory plan"), planBox, el("h2", {}, "Queue"), el("div", { id: "queue" }))));
    showPlan();
    pollQueue();
  };

  window.addEventListener("DOMContentLoaded", () => api("/api/queue").then(q => renderQueue(q.jobs)).catch(() => {}));
})();
