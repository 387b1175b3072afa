// Side by side: two to four runs playing in sync under one set of controls, the knobs that differ
// highlighted, and PSNR/SSIM per frame (wan_opt.compare, computed by the server) drawn against the playhead.
"use strict";

(() => {
  const { el, put, api, fileUrl, fmt, view, views, showError, state } = Page;
  const LETTERS = "ABCD";
  let onKey = null;  // the keyboard of the side-by-side on screen
  document.addEventListener("keydown", ev => { if (onKey && document.getElementById("play")) onKey(ev); });

  function player(videos, fps, onFrame) {
    const lead = videos[0];
    const frameOf = t => Math.floor(t * fps + 1e-3);
    const play = el("button", { class: "button primary", id: "play", title: "play or pause every video (space)" }, "Play");
    const seek = el("input", { type: "range", id: "seek", min: 0, max: 1000, value: 0, "aria-label": "seek" });
    const clock = el("span", { class: "clock", id: "clock" }, "0.00 s");
    const rate = el("select", { "aria-label": "speed", onchange: e => videos.forEach(v => { v.playbackRate = Number(e.target.value); }) },
      ["0.25", "0.5", "1", "2"].map(r => el("option", { value: r, selected: r === "1" }, `${r}x`)));
    const duration = () => Math.min(...videos.map(v => v.duration || Infinity));
    const seekAll = t => videos.forEach(v => { v.currentTime = Math.min(t, (v.duration || t) - 1e-3); });
    const step = by => { videos.forEach(v => v.pause()); seekAll(Math.max(0, lead.currentTime + by / fps)); };
    let dragging = false;

    play.addEventListener("click", () => {
      if (lead.paused) { seekAll(lead.currentTime); videos.forEach(v => v.play().catch(() => {})); }
      else videos.forEach(v => v.pause());
    });
    seek.addEventListener("input", () => { dragging = true; seekAll(seek.value / 1000 * duration()); });
    seek.addEventListener("change", () => { dragging = false; });

    // Keep the others on the lead's clock: a nudge when they drift by more than half a frame.
    function tick() {
      const t = lead.currentTime, d = duration();
      for (const v of videos.slice(1)) {
        if (!v.paused !== !lead.paused) lead.paused ? v.pause() : v.play().catch(() => {});
        if (Math.abs(v.currentTime - t) > 0.5 / fps && t < (v.duration || 0)) v.currentTime = t;
      }
      if (!dragging && Number.isFinite(d)) seek.value = String(Math.round(t / d * 1000));
      clock.textContent = `${t.toFixed(2)} s · frame ${frameOf(t)}`;
      play.textContent = lead.paused ? "Play" : "Pause";
      onFrame(frameOf(t));
      if (document.body.contains(lead)) requestAnimationFrame(tick);
    }
    requestAnimationFrame(tick);
    onKey = ev => {  // space plays and pauses, the arrows step a frame
      if (ev.target.closest("input, select, textarea")) return;
      if (ev.key === " ") { ev.preventDefault(); play.click(); }
      else if (ev.key === "ArrowLeft" || ev.key === "ArrowRight") { ev.preventDefault(); step(ev.key === "ArrowLeft" ? -1 : 1); }
    };
    return { bar: el("div", { class: "controls" }, play,
      el("button", { class: "button small", title: "one frame back (←)", onclick: () => step(-1) }, "◀ frame"),
      el("button", { class: "button small", title: "one frame on (→)", onclick: () => step(1) }, "frame ▶"),
      seek, clock, rate), seekFrame: f => { videos.forEach(v => v.pause()); seekAll((f + 0.5) / fps); } };
  }

  function knobRows(answer) {
    const differing = new Set(answer.differing);
    const onlyDiffering = el("input", { type: "checkbox", checked: true, id: "only-differing" });
    const table = el("table", { class: "knobs side" });
    function fill() {
      const keys = Object.keys(answer.knobs).filter(k => !onlyDiffering.checked || differing.has(k));
      put(table, el("tr", {}, el("th", {}, "knob"), answer.runs.map((_, i) => el("th", {}, LETTERS[i]))),
        keys.map(k => el("tr", { class: differing.has(k) ? "differs" : "" }, el("td", {}, k),
          answer.knobs[k].map(v => el("td", {}, v === null || v === undefined ? "–" : String(v))))));
    }
    onlyDiffering.addEventListener("change", fill);
    fill();
    return el("div", {}, el("label", { class: "check" }, onlyDiffering, differing.size === 1 ? "only the knob that differs" : `only the ${differing.size} knobs that differ`), table);
  }

  async function metrics(ids, box, cursors, seekFrame) {
    put(box, el("p", { class: "muted working" }, "Computing PSNR and SSIM per frame (wan_opt.compare)…"));
    let answer;
    try { answer = await api(`/api/metrics?ids=${ids.join(",")}`); } catch (err) { return put(box, el("p", { class: "error" }, err.message)); }
    const good = answer.pairs.filter(p => !p.error);
    const parts = answer.pairs.filter(p => p.error).map(p =>
      el("p", { class: "error" }, `${LETTERS[ids.indexOf(p.b)]} against A: ${p.error}`));
    if (good.length) {
      const name = p => `${LETTERS[ids.indexOf(p.b)]} vs A`;
      const psnr = Charts.lines({ title: "PSNR per frame (dB; identical frames off the top)", ylabel: "dB", onPick: seekFrame,
        series: good.map(p => ({ name: name(p), values: p.psnr })) });
      const ssim = Charts.lines({ title: "SSIM per frame", ylabel: "", yMax: 1, onPick: seekFrame,
        series: good.map(p => ({ name: name(p), values: p.ssim })) });
      cursors.push(psnr, ssim);
      parts.push(Charts.legend(good.map(p => ({ label: `${name(p)}: PSNR ${p.psnr_mean === null ? "∞ (identical)" : fmt(p.psnr_mean) + " dB"}, SSIM ${fmt(p.ssim_mean, 4)}` }))),
        el("div", { class: "metric-charts" }, psnr, ssim),
        el("p", { class: "links" }, "A | B | difference ×4: ",
          good.map((p, i) => [i ? " · " : "", el("a", { href: "/clips/" + p.clip, target: "_blank", rel: "noopener" }, name(p))])));
    }
    put(box, ...parts);
  }

  views.compare = async arg => {
    const ids = (arg ? arg.split(",") : state.picked).filter(Boolean).slice(0, 4);
    if (ids.length < 2) {
      return view(el("div", { class: "notice" }, el("h1", {}, "Side by side"),
        el("p", {}, "Tick the ", el("b", {}, "compare"), " box on two to four videos in the gallery, then open them here: they play in sync, ",
           "the knobs that differ are highlighted, and PSNR/SSIM per frame is drawn against the first."),
        el("a", { class: "button primary", href: "#gallery" }, "To the gallery")));
    }
    view(el("p", { class: "muted" }, "Loading…"));
    let answer;
    try { answer = await api(`/api/side-by-side?ids=${ids.join(",")}`); } catch (err) { return showError(err); }
    const fps = Number(answer.knobs.fps && answer.knobs.fps[0]) || 16;
    const videos = answer.runs.map(r => el("video", { src: fileUrl(r.video), muted: true, loop: true, playsInline: true, preload: "auto" }));
    videos.forEach(v => { v.muted = true; });
    const cursors = [];
    const { bar, seekFrame } = player(videos, fps, frame => cursors.forEach(c => c.setCursor(frame)));
    const tiles = answer.runs.map((r, i) => el("figure", { class: "tile" }, videos[i],
      el("figcaption", {}, el("b", {}, LETTERS[i]), " ", el("a", { href: `#run/${r.id}`, title: r.prompt }, r.prompt),
        el("div", { class: "chips" }, answer.differing.map(k => el("span", { class: "chip differs", title: k },
          `${k.split(".").pop()}=${answer.knobs[k][i]}`))))));
    const box = el("div", { class: "metrics" });
    view(el("div", { class: "compare" }, el("div", { class: `tiles n${videos.length}` }, tiles), bar,
      el("div", { class: "compare-lower" }, el("section", {}, el("h2", {}, "Knobs"), knobRows(answer)),
        el("section", {}, el("h2", {}, "Against A"), box))));
    metrics(ids, box, cursors, seekFrame);
  };
})();
