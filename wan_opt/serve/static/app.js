// wan-opt's page: the router, shared helpers, the gallery and a run's own view.
// Everything from the server is JSON and goes into the page as text nodes (el() below), never as markup.
"use strict";

const Page = (() => {
  const PAGE = 60;  // cards added at a time as the gallery scrolls
  const state = {
    version: null,
    picked: JSON.parse(sessionStorage.getItem("picked") || "[]"),
    gallery: { set: "", q: "", status: "", where: {}, low: {}, high: {}, extra: [], sort: "created", order: "desc" },
    shown: PAGE,
    cards: new Map(),   // id -> card element, reused across refreshes so playing previews keep playing
    last: null,         // the last /api/runs answer
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;  // through the CSSOM: the page's policy refuses style attributes
      else if (k in node && typeof v !== "string") node[k] = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // replaceChildren, with the same leniency as el(): nested lists flattened, null and false left out.
  function put(node, ...children) {
    node.replaceChildren(...children.flat(Infinity).filter(c => c !== null && c !== undefined && c !== false));
    return node;
  }

  async function api(path, options) {
    const response = await fetch(path, options);
    const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function post(path, data) {
    return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data) });
  }

  const fileUrl = ref => "/files/" + ref.split("/").map(encodeURIComponent).join("/");
  const fmt = Charts.fmt;

  function savePicked() {
    sessionStorage.setItem("picked", JSON.stringify(state.picked));
    const badge = document.getElementById("picked-count");
    badge.textContent = state.picked.length ? String(state.picked.length) : "";
  }

  function togglePick(id, on) {
    state.picked = state.picked.filter(p => p !== id);
    if (on) state.picked.push(id);
    if (state.picked.length > 4) state.picked.shift();
    savePicked();
    document.querySelectorAll(".card").forEach(card => {
      const box = card.querySelector(".pick input");
      if (box) box.checked = state.picked.includes(card.dataset.id);
      card.classList.toggle("picked", state.picked.includes(card.dataset.id));
    });
    renderPickBar();
  }

  // -- previews: load and play only what is on screen (hundreds of videos stay cheap) --------------------
  const previews = new IntersectionObserver(entries => {
    for (const { target: video, isIntersecting } of entries) {
      if (isIntersecting) {
        if (!video.getAttribute("src")) video.setAttribute("src", video.dataset.src);
        video.play().catch(() => {});
      } else if (video.getAttribute("src")) {
        video.pause();
        video.removeAttribute("src");
        video.load();  // frees the decoder: the browser keeps only a few dozen
      }
    }
  }, { rootMargin: "300px 0px" });

  function preview(ref) {
    const video = el("video", { muted: true, loop: true, playsInline: true, preload: "none", "data-src": fileUrl(ref) });
    video.muted = true;
    previews.observe(video);
    return video;
  }

  // -- the gallery ------------------------------------------------------------------------------------------
  function galleryParams() {
    const g = state.gallery, params = new URLSearchParams();
    for (const key of ["set", "q", "status", "sort", "order"]) if (g[key]) params.set(key, g[key]);
    for (const [key, values] of Object.entries(g.where)) for (const v of values) params.append("f", `${key}=${v}`);
    for (const [key, v] of Object.entries(g.low)) if (v !== "") params.append("min", `${key}=${v}`);
    for (const [key, v] of Object.entries(g.high)) if (v !== "") params.append("max", `${key}=${v}`);
    for (const key of g.extra) params.append("facet", key);
    return params;
  }

  function figureLine(record, labels) {
    const parts = [];
    for (const [name, value] of Object.entries(record.figures || {})) {
      if (name === "load_s" || name === "plan_host_gb") continue;
      const [label, unit] = labels[name] || [name, ""];
      const shown = name === "deviation" ? `${(value * 100).toFixed(2)}%` : `${fmt(value)} ${unit}`;
      parts.push(el("span", { class: "figure", title: label }, el("b", {}, label), " ", shown));
    }
    return el("div", { class: "figures" }, parts);
  }

  function chips(record, differing) {
    const k = record.knobs || {};
    const out = [];
    if (k["hardware.name"] || record.profile) out.push(el("span", { class: "chip profile" }, k["hardware.name"] || record.profile));
    if (k.mode) out.push(el("span", { class: "chip mode" }, k.mode));
    if (k["model.name"]) out.push(el("span", { class: "chip" }, k["model.name"]));
    if (k.seed !== undefined) out.push(el("span", { class: "chip" }, `seed ${k.seed}`));
    for (const key of differing) {
      if (["hardware.name", "mode", "model.name", "seed"].includes(key) || !(key in k)) continue;
      out.push(el("span", { class: "chip differs", title: key }, `${key.split(".").pop()}=${k[key]}`));
    }
    return el("div", { class: "chips" }, out);
  }

  function card(record, answer) {
    if (record.status !== "ok") {
      return el("article", { class: "card failed", "data-id": record.id },
        el("div", { class: "media failed-media" }, el("span", {}, record.outcome || "failed")),
        el("div", { class: "body" },
          el("div", { class: "prompt", title: record.prompt }, record.prompt || record.item),
          el("p", { class: "error" }, record.error),
          el("div", { class: "chips" }, record.job ? el("span", { class: "chip" }, `job ${record.job}`) : null,
             record.item !== "prompt" ? el("span", { class: "chip" }, record.item) : null),
          chips(record, answer.differing)));
    }
    const box = el("input", { type: "checkbox", checked: state.picked.includes(record.id),
                              onchange: e => togglePick(record.id, e.target.checked) });
    return el("article", { class: "card" + (state.picked.includes(record.id) ? " picked" : ""), "data-id": record.id },
      el("div", { class: "media" }, el("a", { href: `#run/${record.id}`, "aria-label": "open this run" }, preview(record.video)),
         el("label", { class: "pick", title: "pick for side by side" }, box, "compare")),
      el("div", { class: "body" },
        el("a", { class: "prompt", href: `#run/${record.id}`, title: record.prompt }, record.prompt || record.name),
        chips(record, answer.differing), figureLine(record, answer.figure_labels)));
  }

  function renderPickBar() {
    const bar = document.getElementById("pick-bar");
    if (!bar) return;
    put(bar, 
      el("span", {}, state.picked.length ? `${state.picked.length} picked` : "Tick 2 to 4 videos to compare them"),
      state.picked.length >= 2 ? el("a", { class: "button primary", href: `#compare/${state.picked.join(",")}`, id: "open-compare" },
                                    "Side by side") : null,
      state.picked.length ? el("button", { class: "button", onclick: () => { state.picked = []; togglePick(null, false); } }, "Clear") : null);
  }

  function filtersPanel() {
    const g = state.gallery;
    const search = el("input", { type: "search", id: "search", placeholder: "prompt or error contains…", value: g.q });
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { g.q = search.value; reloadGallery(); }, 250); });
    const status = el("select", { id: "status", onchange: e => { g.status = e.target.value; reloadGallery(); } },
      [["", "all items"], ["ok", "videos"], ["failed", "failed items"]].map(([v, t]) => el("option", { value: v, selected: g.status === v }, t)));
    const sort = el("select", { id: "sort", onchange: e => { g.sort = e.target.value; reloadGallery(); } });
    const order = el("button", { class: "button small", id: "order", title: "reverse the order",
                                 onclick: () => { g.order = g.order === "desc" ? "asc" : "desc"; reloadGallery(); } });
    const sets = el("select", { id: "set", onchange: e => { g.set = e.target.value; g.where = {}; g.extra = []; reloadGallery(); } });
    return el("aside", { class: "filters" },
      el("label", {}, "Set", sets), el("label", {}, "Search", search), el("label", {}, "Show", status),
      el("label", {}, "Sort by", el("div", { class: "row" }, sort, order)),
      el("div", { id: "facets" }));
  }

  function updateFilters(answer) {
    const g = state.gallery;
    const sets = document.getElementById("set");
    put(sets, el("option", { value: "" }, `every set (${answer.sets.length})`),
      ...answer.sets.map(s => el("option", { value: s.id, selected: s.id === g.set },
                                 `${s.kind}: ${s.name} · ${s.runs}${s.failed ? ` + ${s.failed} failed` : ""}`)));
    const sort = document.getElementById("sort");
    const keys = [["created", "newest"], ...answer.figures.map(f => [f, answer.figure_labels[f][0]]),
                  ...answer.keys.map(k => [k, k]), ["prompt", "prompt"]];
    put(sort, ...keys.map(([v, t]) => el("option", { value: v, selected: v === g.sort }, t)));
    document.getElementById("order").textContent = g.order === "desc" ? "↓" : "↑";
    const facets = document.getElementById("facets");
    const boxes = [];
    for (const [key, counts] of Object.entries(answer.facets)) {
      const chosen = new Set(g.where[key] || []);
      boxes.push(el("fieldset", { class: "facet", "data-key": key }, el("legend", {}, key),
        Object.entries(counts).map(([value, count]) => el("label", { class: "check" },
          el("input", { type: "checkbox", checked: chosen.has(value), "data-value": value, onchange: e => {
            const now = new Set(g.where[key] || []);
            e.target.checked ? now.add(value) : now.delete(value);
            if (now.size) g.where[key] = [...now]; else delete g.where[key];
            reloadGallery();
          } }), el("span", {}, value), el("small", {}, String(count))))));
    }
    const others = answer.keys.filter(k => !(k in answer.facets));
    if (others.length) {
      boxes.push(el("select", { class: "more", "aria-label": "filter by another knob", onchange: e => {
        if (e.target.value) { g.extra.push(e.target.value); reloadGallery(); } } },
        el("option", { value: "" }, "+ filter by another knob"), others.map(k => el("option", { value: k }, k))));
    }
    const spread = answer.figures.filter(f => answer.ranges[f] && answer.ranges[f][0] !== answer.ranges[f][1]);
    const ranges = spread.map(f => {
      const [label, unit] = answer.figure_labels[f], [lo, hi] = answer.ranges[f] || [null, null];
      const input = (which, bound) => el("input", { type: "number", step: "any", value: which[f] ?? "",
        placeholder: fmt(bound), "aria-label": `${label} ${which === g.low ? "at least" : "at most"}`,
        onchange: e => { which[f] = e.target.value; reloadGallery(); } });
      return el("div", { class: "range" }, el("span", {}, `${label}${unit ? ` (${unit})` : ""}`), input(g.low, lo), "–", input(g.high, hi));
    });
    if (ranges.length) boxes.push(el("fieldset", { class: "facet ranges" }, el("legend", {}, "figures"), ranges));
    put(facets, ...boxes);
  }

  function renderGrid(answer) {
    const grid = document.getElementById("grid");
    const records = answer.records.slice(0, state.shown);
    const wanted = new Set(records.map(r => r.id));
    for (const [id, node] of state.cards) if (!wanted.has(id)) { node.remove(); state.cards.delete(id); }
    records.forEach((record, i) => {
      let node = state.cards.get(record.id);
      const stamp = JSON.stringify([record.knobs, record.figures, answer.differing, record.error]);
      if (!node || node.dataset.stamp !== stamp) {
        const fresh = card(record, answer);
        fresh.dataset.stamp = stamp;
        if (node) node.replaceWith(fresh);
        node = fresh;
        state.cards.set(record.id, node);
      }
      if (grid.children[i] !== node) grid.insertBefore(node, grid.children[i] || null);
    });
    const summary = document.getElementById("summary");
    const failed = answer.records.filter(r => r.status !== "ok").length;
    put(summary, 
      el("span", { class: "count" }, `${answer.count} of ${answer.total}`), ` item${answer.total === 1 ? "" : "s"}`,
      failed ? el("span", { class: "failed-count" }, ` · ${failed} failed`) : null,
      answer.differing.length ? el("span", { class: "differing" }, " · differ: ",
        answer.differing.map((k, i) => [i ? ", " : "", el("code", {}, k)])) : " · every knob the same");
    document.getElementById("empty").hidden = answer.records.length > 0;
  }

  async function reloadGallery() {
    try {
      const answer = await api("/api/runs?" + galleryParams());
      state.last = answer;
      state.version = answer.version;
      if (!document.getElementById("grid")) return;
      updateFilters(answer);
      renderGrid(answer);
    } catch (err) { showError(err); }
  }

  function showGallery() {
    state.cards.clear();
    state.shown = PAGE;
    const sentinel = el("div", { class: "sentinel" });
    view(el("div", { class: "gallery" }, filtersPanel(),
      el("section", { class: "results" },
        el("div", { class: "toolbar" }, el("div", { id: "summary" }), el("div", { id: "pick-bar", class: "pick-bar" })),
        el("p", { id: "empty", class: "empty", hidden: true },
           "No runs here yet. They appear as soon as a run writes its video and sidecar under the served folders."),
        el("div", { id: "grid", class: "grid" }), sentinel)));
    new IntersectionObserver(entries => {
      if (entries[0].isIntersecting && state.last && state.shown < state.last.records.length) {
        state.shown += PAGE;
        renderGrid(state.last);
      }
    }, { rootMargin: "600px" }).observe(sentinel);
    renderPickBar();
    reloadGallery();
  }

  // -- one run -------------------------------------------------------------------------------------------------
  function planChart(plan) {
    if (!plan) return el("p", { class: "muted" }, "No memory plan recorded.");
    const rows = plan.stages.map(s => ({ label: s.name.replace(/_/g, " "), value: s.gpu_gb, cls: "gpu" }));
    const lines = [];
    if (plan.vram_budget_gb) lines.push({ value: plan.vram_budget_gb, label: `card budget ${fmt(plan.vram_budget_gb)} GB`, cls: "budget" });
    if (plan.usable_gb) lines.push({ value: plan.usable_gb, label: `planned to ${fmt(plan.usable_gb)}`, cls: "usable" });
    if (plan.measured_peak_gpu_gib) lines.push({ value: plan.measured_peak_gpu_gib, label: `measured ${fmt(plan.measured_peak_gpu_gib)}`, cls: "measured" });
    const device = plan.vram_budget_gb ? "GPU memory" : "Memory (CPU profile)";
    const parts = [Charts.bars({ rows, unit: "GB", lines, title: `${device} by stage (predicted)` })];
    const hostRows = plan.stages.filter(s => s.host_gb !== null && s.host_gb !== undefined)
      .map(s => ({ label: s.name.replace(/_/g, " "), value: s.host_gb, cls: "host" }));
    if (!hostRows.length && plan.predicted_host_gb !== null) hostRows.push({ label: "weights in host RAM", value: plan.predicted_host_gb, cls: "host" });
    const hostLines = plan.host_ram_gb ? [{ value: plan.host_ram_gb, label: `host RAM ${fmt(plan.host_ram_gb)} GB`, cls: "budget" }] : [];
    parts.push(Charts.bars({ rows: hostRows, unit: "GB", lines: hostLines, title: "Host memory (predicted)" }));
    const verdict = plan.fits === false ? el("span", { class: "bad" }, "does not fit") : el("span", { class: "good" }, "fits");
    const knobs = Object.entries(plan.mechanisms).map(([k, v]) =>
      el("tr", {}, el("td", {}, k), el("td", {}, String(v)), el("td", { class: "muted" }, plan.decided_by[k] || "")));
    return el("div", { class: "plan" },
      el("p", {}, "Plan ", verdict, `: peak ${fmt(plan.predicted_peak_gpu_gb)} GB`,
         plan.vram_budget_gb ? ` of a ${fmt(plan.vram_budget_gb)} GB budget (from the ${plan.budget_source || "profile"})` : " (CPU profile: no GPU budget)"),
      parts, el("table", { class: "knobs compact" }, el("tr", {}, el("th", {}, "memory knob"), el("th", {}, "value"), el("th", {}, "set by")), knobs),
      plan.fallbacks.length ? el("p", { class: "bad" }, `Ran out of GPU memory ${plan.fallbacks.length}x and fell back to a leaner plan.`) : null);
  }

  function knobTable(knobs) {
    return el("table", { class: "knobs" }, Object.entries(knobs).sort().map(([k, v]) =>
      el("tr", {}, el("td", {}, k), el("td", {}, v === null ? "null" : String(v)))));
  }

  async function showRun(id) {
    view(el("p", { class: "muted" }, "Loading…"));
    let run;
    try { run = await api(`/api/runs/${encodeURIComponent(id)}`); } catch (err) { return showError(err); }
    const labels = run.figure_labels;
    const head = el("div", { class: "run-head" },
      el("h1", { class: "prompt-full" }, run.prompt || run.item || run.name),
      chips(run, []), run.status === "ok" ? figureLine(run, labels) : el("p", { class: "error" }, run.error));
    const left = [head];
    if (run.status === "ok") {
      left.unshift(el("video", { class: "big", src: fileUrl(run.video), controls: true, loop: true, muted: true, autoplay: true, playsInline: true }));
      left.push(el("p", { class: "links" }, el("a", { href: fileUrl(run.video) }, run.name), " · ",
        el("a", { href: fileUrl(run.sidecar) }, "sidecar JSON"), " · ",
        el("button", { class: "button small", onclick: () => { togglePick(run.id, true); location.hash = "#gallery"; } }, "pick for side by side")));
      if (run.image) left.push(el("figure", {}, el("img", { src: fileUrl(run.image), alt: "input image" }), el("figcaption", {}, "input image")));
    }
    const right = [el("h2", {}, "Memory plan"), planChart(run.plan)];
    if (run.step_seconds && run.step_seconds.length) {
      right.push(el("h2", {}, "Seconds per step"),
        Charts.lines({ series: [{ name: "seconds", values: run.step_seconds }], ylabel: "s", xlabel: "step", yMin: 0 }));
    }
    right.push(el("h2", {}, "Knobs"), knobTable(run.knobs),
      el("details", {}, el("summary", {}, run.status === "ok" ? "The whole sidecar" : "The whole record"), el("pre", { class: "json" }, JSON.stringify(run.recorded, null, 2))));
    view(el("div", { class: "run" }, el("section", {}, left), el("section", {}, right)));
  }

  // -- frame -------------------------------------------------------------------------------------------------
  function view(...nodes) {
    document.querySelectorAll("#view video").forEach(v => { previews.unobserve(v); v.pause(); });
    put(document.getElementById("view"), ...nodes);
  }

  function showError(err) {
    document.getElementById("view").append(el("p", { class: "error banner" }, String(err.message || err)));
  }

  const views = {};
  function route() {
    const [name, arg] = (location.hash.slice(1) || "gallery").split("/");
    document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.view === name));
    if (name === "run" && arg) return showRun(arg);
    if (views[name]) return views[name](arg);
    return showGallery();
  }

  async function follow() {
    try {
      const { version } = await api("/api/version");
      document.getElementById("live").classList.remove("lost");
      if (version !== state.version && document.getElementById("grid")) await reloadGallery();
      state.version = version;
    } catch (err) { document.getElementById("live").classList.add("lost"); }
  }

  window.addEventListener("hashchange", route);
  window.addEventListener("DOMContentLoaded", () => { savePicked(); route(); setInterval(follow, 2000); });
  return { el, put, api, post, fileUrl, fmt, view, views, showError, planChart, knobTable, state, togglePick };
})();
