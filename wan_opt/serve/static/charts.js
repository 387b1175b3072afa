// wan-opt's charts: small SVG drawings made from JSON numbers. Text goes in as text nodes, never as markup.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return node;
  }

  function fmt(x, digits = 2) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const size = Math.abs(x);
    if (size >= 100) return x.toFixed(0);
    if (size >= 10) return x.toFixed(1);
    if (size >= 0.1 || size === 0) return x.toFixed(digits);
    return x.toPrecision(2);  // a tiny model's milliseconds stay readable
  }

  // A "nice" axis end and step for values up to `max`.
  function niceScale(max, ticks = 5) {
    if (!(max > 0)) return { end: 1, step: 0.2 };
    const raw = max / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
    return { end: Math.ceil(max / step) * step, step };
  }

  // Horizontal bars. rows: [{label, value, cls, note}]; lines: [{value, label, cls}] drawn across every row.
  function bars({ rows, unit = "", lines = [], width = 640, rowHeight = 26, labelWidth = null, title = null }) {
    const longest = Math.max(0, ...rows.map(r => r.label.length));
    labelWidth = labelWidth || Math.min(300, Math.max(90, longest * 7 + 16));
    const fits = Math.floor((labelWidth - 16) / 7);
    const shown = rows.filter(r => r.value !== null && r.value !== undefined);
    const max = Math.max(...shown.map(r => r.value), ...lines.map(l => l.value || 0), 0);
    const { end, step } = niceScale(max * 1.05);
    const drawn = lines.filter(l => l.value > 0);  // each limit's label gets a row of its own above the bars
    const plotW = width - labelWidth - 80, top = (title ? 34 : 14) + 14 * drawn.length, h = top + rows.length * rowHeight + 34;
    const x = v => labelWidth + (v / end) * plotW;
    const root = svg("svg", { viewBox: `0 0 ${width} ${h}`, class: "chart bars", role: "img" });
    if (title) root.append(svg("text", { x: 0, y: 16, class: "chart-title" }, title));
    for (let t = 0; t <= end + 1e-9; t += step) {
      root.append(svg("line", { x1: x(t), x2: x(t), y1: top - 4, y2: h - 26, class: "grid" }),
                  svg("text", { x: x(t), y: h - 10, class: "tick", "text-anchor": "middle" }, fmt(t, 1)));
    }
    root.append(svg("text", { x: width - 4, y: h - 10, class: "tick", "text-anchor": "end" }, unit));
    rows.forEach((r, i) => {
      const y = top + i * rowHeight;
      root.append(svg("text", { x: labelWidth - 8, y: y + rowHeight / 2 + 4, class: "label", "text-anchor": "end" },
                      r.label.length > fits ? "…" + r.label.slice(r.label.length - fits + 1) : r.label));
      if (r.value === null || r.value === undefined) return;
      const bar = svg("rect", { x: labelWidth, y: y + 4, width: Math.max(1, x(r.value) - labelWidth),
                                height: rowHeight - 8, rx: 3, class: "bar " + (r.cls || "") });
      bar.append(svg("title", {}, `${r.label}: ${fmt(r.value)} ${unit}${r.note ? " · " + r.note : ""}`));
      root.append(bar, svg("text", { x: x(r.value) + 6, y: y + rowHeight / 2 + 4, class: "value" },
                           fmt(r.value) + (r.note ? "  " + r.note : "")));
    });
    drawn.forEach((l, k) => {
      const y = top - 6 - 14 * (drawn.length - 1 - k);
      root.append(svg("line", { x1: x(l.value), x2: x(l.value), y1: y - 10, y2: h - 26, class: "limit " + (l.cls || "") }),
                  svg("text", { x: x(l.value) - 5, y, class: "limit-label " + (l.cls || ""), "text-anchor": "end" }, l.label));
    });
    return root;
  }

  // Lines over frames. series: [{name, values (null = off the chart), cls}]; onPick(frame) when clicked.
  function lines({ series, ylabel = "", xlabel = "frame", width = 640, height = 200, yMin = null, yMax = null, onPick = null, title = null }) {
    const values = series.flatMap(s => s.values.filter(v => v !== null && v !== undefined));
    const n = Math.max(...series.map(s => s.values.length), 1);
    let lo = yMin !== null ? yMin : Math.min(...values), hi = yMax !== null ? yMax : Math.max(...values);
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08; lo -= yMin === null ? pad : 0; hi += yMax === null ? pad : 0;
    const left = 52, right = 12, top = title ? 30 : 12, bottom = 40, plotW = width - left - right, plotH = height - top - bottom;
    const x = i => left + (n === 1 ? plotW / 2 : (i / (n - 1)) * plotW);
    const y = v => top + (1 - (v - lo) / (hi - lo)) * plotH;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart lines", role: "img" });
    if (title) root.append(svg("text", { x: 0, y: 16, class: "chart-title" }, title));
    for (let k = 0; k <= 4; k++) {
      const v = lo + (hi - lo) * k / 4;
      root.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }),
                  svg("text", { x: left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmt(v, 3)));
    }
    const every = Math.max(1, Math.ceil(n / 10));
    for (let i = 0; i < n; i += every)
      root.append(svg("text", { x: x(i), y: height - 22, class: "tick", "text-anchor": "middle" }, String(i)));
    root.append(svg("text", { x: left + plotW / 2, y: height - 4, class: "tick", "text-anchor": "middle" }, xlabel),
                svg("text", { x: 4, y: top - 2, class: "tick" }, ylabel));
    series.forEach((s, k) => {
      let d = "", pen = false;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`; pen = true;
      });
      root.append(svg("path", { d, class: "series s" + k + " " + (s.cls || "") }));
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) return;
        const dot = svg("circle", { cx: x(i), cy: y(v), r: 2.6, class: "dot s" + k });
        dot.append(svg("title", {}, `${s.name}, frame ${i}: ${fmt(v, 4)}`));
        root.append(dot);
      });
    });
    const cursor = svg("line", { x1: left, x2: left, y1: top, y2: top + plotH, class: "cursor" });
    root.append(cursor);
    root.setCursor = i => { const cx = x(Math.min(Math.max(i, 0), n - 1)); cursor.setAttribute("x1", cx); cursor.setAttribute("x2", cx); };
    if (onPick) {
      root.classList.add("pickable");
      root.addEventListener("click", ev => {
        const box = root.getBoundingClientRect(), px = (ev.clientX - box.left) * width / box.width;
        onPick(Math.round(Math.min(Math.max((px - left) / plotW, 0), 1) * (n - 1)));
      });
    }
    return root;
  }

  function legend(items) {
    const box = document.createElement("div");
    box.className = "legend";
    items.forEach((item, k) => {
      const key = document.createElement("span");
      key.className = "key s" + (item.k !== undefined ? item.k : k) + " " + (item.cls || "");
      const label = document.createElement("span");
      label.textContent = item.label;
      box.append(key, label);
    });
    return box;
  }

  return { svg, bars, lines, legend, fmt };
})();
