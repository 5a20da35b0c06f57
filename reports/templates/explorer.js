// Interactive embedding panels (data from evalkit/explorer.py, drawn by regl-scatterplot).
// Every PNG panel of the grid gets a WebGL view on top of it: zoom and pan, hover shows the
// sample, and ONE selection (lasso, box or click in any panel) is shown in every panel.
// All panels share one WebGL context (regl-scatterplot's shared renderer), because a
// browser keeps only about 16 live contexts and a report can have dozens of panels.
// Without WebGL, or if anything here fails, the PNG panels simply stay.
// Class names, ids and model names are data: they only ever go into textContent.
(function () {
  "use strict";
  var source = document.getElementById("explorer-data");
  var api = { ready: false, webgl: false, error: null };
  window.evalkitExplorer = api;
  if (!source || typeof createScatterplot === "undefined") { api.error = "no data"; return; }

  var GREY = "#c3c7cd", WRONG = "#d62728", DISAGREE = "#e6550d";
  // While a view moves (pan, zoom), it draws a fixed sample of about MOVING_POINTS points,
  // and all of them again once it has rested REST_MS. A frame costs per point drawn (in the
  // vertex stage: SwiftShader, Chromium's software WebGL, pays about a microsecond a point),
  // so 70,000 points panned at 5-10 frames a second on two busy cores, 10,000 at about 20.
  var MOVING_POINTS = 10000, REST_MS = 180;
  // A light-to-dark sequential ramp (low scores dark, so they stand out on white).
  var RAMP = ["#2d0a4e", "#6a1c6e", "#a8325e", "#de5a3a", "#f8944b", "#fcd38a", "#fdf3c7"];
  var CSS = [
    // No overflow:hidden here: clipping the canvases to rounded corners costs the compositor
    // an extra pass over each on every frame (about 10 ms a frame on SwiftShader).
    ".explorer-view{position:relative;width:280px;height:280px;background:#fff;border:1px solid #d8dde3;",
    "border-radius:4px}",
    "@media (max-width:1180px){.explorer-view{width:236px;height:236px}}",
    ".explorer-view canvas{display:block;width:100%;height:100%;cursor:grab}",
    "td.explorer-on figure>img{display:none}",
    ".explorer-expand{position:absolute;top:4px;right:4px;z-index:2;border:1px solid #c9ced6;",
    "background:rgba(255,255,255,.9);border-radius:4px;font:14px/1 sans-serif;padding:3px 5px;cursor:pointer}",
    ".explorer-bar{position:sticky;top:36px;z-index:4;display:flex;flex-wrap:wrap;gap:.4em 1.2em;",
    "align-items:center;background:#f6f8fa;border:1px solid #d8dde3;border-radius:6px;padding:.45em .8em;",
    "margin:.6em 0;font-size:14px}",
    ".explorer-bar .group{display:inline-flex;gap:.35em;align-items:center}",
    ".explorer-bar button,.explorer-sel button{font:inherit;padding:.15em .6em;border:1px solid #b9c0c9;",
    "border-radius:4px;background:#fff;cursor:pointer}",
    ".explorer-bar button[aria-pressed=true]{background:#1f6feb;border-color:#1f6feb;color:#fff}",
    ".explorer-bar select{font:inherit;max-width:16em}",
    ".explorer-key{display:inline-flex;gap:.6em;align-items:center;color:#444}",
    ".explorer-key .sw{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.25em;vertical-align:-1px}",
    ".explorer-key .ramp{display:inline-block;width:7em;height:.7em;vertical-align:-1px}",
    ".explorer-sel{position:fixed;left:0;right:0;bottom:0;z-index:60;display:none;gap:.5em 1em;",
    "flex-wrap:wrap;align-items:center;background:#1b1f24;color:#fff;padding:.55em 1em;font-size:14px}",
    ".explorer-sel.on{display:flex}",
    ".explorer-sel .mix{display:inline-flex;flex-wrap:wrap;gap:.2em .8em}",
    ".explorer-sel .sw{display:inline-block;width:.75em;height:.75em;border-radius:50%;margin-right:.25em}",
    ".explorer-sel .status{color:#9fd08c}",
    ".explorer-tip{position:fixed;z-index:80;pointer-events:none;display:none;background:#fff;",
    "border:1px solid #9aa3ad;border-radius:5px;padding:6px 8px;font-size:13px;box-shadow:0 2px 8px rgba(0,0,0,.2);max-width:260px}",
    ".explorer-tip canvas{display:block;margin-top:4px;image-rendering:pixelated;background:#000}",
    ".explorer-tip .cls{font-weight:600}",
    ".explorer-modal{position:fixed;inset:0;z-index:50;background:rgba(20,24,30,.55);display:none}",
    ".explorer-modal.on{display:block}",
    ".explorer-modal .box{position:absolute;inset:2vh 2vw 3.2em 2vw;background:#fff;border-radius:8px;",
    "padding:.6em .9em;display:flex;flex-direction:column;gap:.4em}",
    ".explorer-modal .head{display:flex;justify-content:space-between;align-items:center;gap:1em}",
    ".explorer-modal .head h3{margin:0;font-size:16px}",
    ".explorer-modal .stage{flex:1;position:relative;min-height:200px}",
    ".explorer-modal .stage canvas{position:absolute;inset:0;width:100%;height:100%}",
    ".explorer-modal .explorer-bar{position:static;margin:0}",
    "@media print{.explorer-view,.explorer-bar,.explorer-sel,.explorer-tip,.explorer-modal{display:none!important}",
    "td.explorer-on figure>img{display:inline!important}}"
  ].join("\n");

  try {
    start(JSON.parse(source.textContent));
  } catch (err) {
    api.error = String(err && err.message || err);
    fallBack();
    if (window.console) { console.warn("evalkit explorer: showing pictures only:", api.error); }
  }

  function fallBack() {
    Array.prototype.forEach.call(document.querySelectorAll(".explorer-view"), function (el) {
      el.parentNode.removeChild(el);
    });
    Array.prototype.forEach.call(document.querySelectorAll("td.explorer-on"), function (td) {
      td.classList.remove("explorer-on");
    });
    ["explorer-bar", "explorer-sel", "explorer-tip", "explorer-modal"].forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { el.parentNode.removeChild(el); }
    });
  }

  function hasWebGL() {
    try {
      var probe = document.createElement("canvas");
      var gl = probe.getContext("webgl") || probe.getContext("experimental-webgl");
      if (!gl) { return false; }
      var lose = gl.getExtension("WEBGL_lose_context");
      if (lose) { lose.loseContext(); }  // give the context back: browsers cap live ones
      return true;
    } catch (e) {
      return false;
    }
  }

  // ------------------------------------------------------------------ decoding
  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) { out[i] = s.charCodeAt(i); }
    return out;
  }
  function ints(b64, wide) {  // little-endian, as numpy writes "<u2" / "<u4" here
    var b = bytes(b64);
    if (wide === 4) { return new Uint32Array(b.buffer, 0, b.length >> 2); }
    if (wide === 2) { return new Uint16Array(b.buffer, 0, b.length >> 1); }
    return b;
  }
  function hexRGB(h) { return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)]; }
  function rampColors(steps) {
    var out = [];
    for (var i = 0; i < steps; i++) {
      var t = i / (steps - 1) * (RAMP.length - 1), j = Math.min(Math.floor(t), RAMP.length - 2), f = t - j;
      var a = hexRGB(RAMP[j]), b = hexRGB(RAMP[j + 1]);
      out.push("#" + [0, 1, 2].map(function (c) {
        return ("0" + Math.round(a[c] + (b[c] - a[c]) * f).toString(16)).slice(-2);
      }).join(""));
    }
    return out;
  }
  // Point size and opacity as evalkit.plots.marker_style (log-interpolated by point count).
  function markerStyle(n) {
    var t = (Math.log(Math.max(n, 1)) - Math.log(500)) / (Math.log(70000) - Math.log(500));
    t = Math.min(Math.max(t, 0), 1);
    var d = Math.exp(Math.log(8) + t * (Math.log(0.6) - Math.log(8)));
    return { size: Math.max(d, 1.5), opacity: 0.85 + t * (0.35 - 0.85) };
  }
  function shuffled(n) {  // a fixed order, so no class is always painted over the others
    var order = new Int32Array(n), seed = 12345;
    for (var i = 0; i < n; i++) { order[i] = i; }
    for (var j = n - 1; j > 0; j--) {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      var k = seed % (j + 1), t = order[j];
      order[j] = order[k]; order[k] = t;
    }
    return Array.from(order);
  }

  // A fixed sample of about k of the points: each class in proportion (at least one point of
  // each), taken in the shuffled order so that it covers the whole panel. Sorted indices.
  function stratified(labels, order, k) {
    var n = order.length, counts = {}, quota = {}, out = [];
    for (var i = 0; i < n; i++) { counts[labels[i]] = (counts[labels[i]] || 0) + 1; }
    Object.keys(counts).forEach(function (c) { quota[c] = Math.max(1, Math.round(counts[c] * k / n)); });
    order.forEach(function (j) { if (quota[labels[j]] > 0) { quota[labels[j]]--; out.push(j); } });
    return out.sort(function (u, v) { return u - v; });
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  // ------------------------------------------------------------------ the page
  function start(data) {
    if (data.version !== 1) { throw new Error("unknown explorer data version " + data.version); }
    if (!hasWebGL()) { api.error = "no WebGL"; return; }
    var n = data.n;
    var labels = ints(data.labels, data.label_dtype === "uint16" ? 2 : 1);
    var indices = data.indices ? ints(data.indices, 4) : null;
    var ids = data.ids;
    var names = data.label_names, colors = data.colors;
    var style = markerStyle(n);
    var baseOrder = shuffled(n);
    var movingSample = n > MOVING_POINTS ? stratified(labels, baseOrder, MOVING_POINTS) : null;
    var movingStyle = movingSample && markerStyle(movingSample.length);
    var predictions = {};
    (data.knn.feature_sets || []).forEach(function (fs) {
      predictions[fs.key] = { fs: fs, labels: ints(fs.predicted, labels.BYTES_PER_ELEMENT) };
    });
    var fsKeys = (data.knn.feature_sets || []).map(function (fs) { return fs.key; });
    var thumbs = data.thumbnails, sprite = null;
    if (thumbs) { sprite = new Image(); sprite.src = thumbs.png; }

    var style_ = el("style"); style_.textContent = CSS; document.head.appendChild(style_);

    // The shared renderer draws every view into its own canvas, then copies the middle of it
    // into the view's canvas. By default that canvas is screen-sized and every frame pays for
    // all of it (a software renderer pays a lot): keep it as small as the largest live view.
    var renderer = createScatterplot.createRenderer({ canvas: document.createElement("canvas") });
    var rendererSize = [0, 0];
    function fitRenderer() {
      var w = 1, h = 1;
      views.forEach(function (v) { w = Math.max(w, v.plot.get("width")); h = Math.max(h, v.plot.get("height")); });
      if (w === rendererSize[0] && h === rendererSize[1]) { return; }
      rendererSize = [w, h];
      renderer.resize(w, h);
      renderer.refresh();
      views.forEach(function (v) { v.plot.redraw(); });
    }
    var state = {
      selection: new Int32Array(0), mode: "class",
      a: fsKeys[0] || null, b: fsKeys[fsKeys.length - 1] || null, drag: "pan"
    };
    var views = [];  // every live view: grid panels and the large one

    function panelPoints(panel) {
      var q = ints(panel.xy, 2), b = panel.bounds;
      var cx = (b[0] + b[1]) / 2, cy = (b[2] + b[3]) / 2;
      var half = Math.max(b[1] - b[0], b[3] - b[2]) / 2 * 1.04 || 1;
      var sx = (b[1] - b[0]) / 65534, sy = (b[3] - b[2]) / 65534;
      var x = new Float32Array(n), y = new Float32Array(n), valid = [];
      for (var i = 0; i < n; i++) {
        var qx = q[i], qy = q[n + i];
        if (qx === 65535 || qy === 65535) { x[i] = 0; y[i] = 0; continue; }
        x[i] = (b[0] + qx * sx - cx) / half;
        y[i] = (b[2] + qy * sy - cy) / half;
        valid.push(i);
      }
      return { x: x, y: y, valid: valid.length < n ? valid : null };
    }

    // What colours the points of one panel in the current mode:
    // {values, colors, categorical, order, key: [[colour, text]...] or ramp}.
    function encoding(panel) {
      var mode = state.mode, values = new Float32Array(n), i;
      if (mode === "class") {
        for (i = 0; i < n; i++) { values[i] = labels[i]; }
        return { values: values, colors: colors, categorical: true, order: baseOrder };
      }
      if (mode === "knn" || mode === "disagree") {
        var p, q, flag = new Uint8Array(n), ok = false;
        if (mode === "knn") {
          p = predictions[panel.model + "/" + panel.layer];
          if (p) { ok = true; for (i = 0; i < n; i++) { flag[i] = p.labels[i] !== labels[i] ? 1 : 0; } }
        } else {
          p = predictions[state.a]; q = predictions[state.b];
          if (p && q) { ok = true; for (i = 0; i < n; i++) { flag[i] = p.labels[i] !== q.labels[i] ? 1 : 0; } }
        }
        for (i = 0; i < n; i++) { values[i] = flag[i]; }
        var order = baseOrder.filter(function (j) { return !flag[j]; })
          .concat(baseOrder.filter(function (j) { return flag[j]; }));  // flagged on top
        return { values: values, colors: [GREY, mode === "knn" ? WRONG : DISAGREE],
                 categorical: true, order: order, missing: !ok };
      }
      // per-point trustworthiness / continuity, continuous in [0, 1]
      var scores = data.point_scores[panel.key], s = scores && scores[mode];
      if (!s) {
        return { values: values, colors: [GREY], categorical: true, order: baseOrder, missing: true };
      }
      var raw = ints(s.q, 1), fill = [];
      for (i = 0; i < n; i++) { values[i] = raw[i] === 255 ? 1 : raw[i] / 254; }
      for (i = 0; i < n; i++) { fill.push(i); }
      fill.sort(function (u, v) { return values[v] - values[u]; });  // lowest on top
      return { values: values, colors: rampColors(64), categorical: false, order: fill,
               lo: s.lo, hi: s.hi };
    }

    function makeView(panel, canvas, width, height) {
      var points = panelPoints(panel);
      var plot = createScatterplot.default({
        renderer: renderer, canvas: canvas, width: width, height: height,
        pointSize: style.size, opacity: style.opacity, pointSizeSelected: 2,
        pointOutlineWidth: 1.5, backgroundColor: "#ffffff", pointColorHover: "#000000",
        lassoColor: "#1f6feb", lassoMinDelay: 0, lassoMinDist: 2,
        opacityInactiveScale: 0.35, spatialIndexUseWorker: false, syncEvents: true,
        deselectOnEscape: false, deselectOnDblClick: true
      });
      var view = { panel: panel, plot: plot, canvas: canvas, points: points, index: null,
                   drawn: null, settled: false, moving: false, restTimer: null,
                   movingPoints: movingSample && points.valid
                     ? intersect(movingSample, points.valid) : movingSample };
      // A redraw with another camera than the last one: the view moves (by mouse, wheel or
      // code; the "view" event misses the last).
      plot.subscribe("draw", function (e) { if (cameraMoved(view, e && e.view)) { move(view); } });
      plot.subscribe("lassoStart", function () { rest(view); });  // select from every point
      canvas.addEventListener("mousedown", function () { rest(view); }, true);  // a click, too
      plot.subscribe("select", function (e) { setSelection(e.points, view); });
      plot.subscribe("deselect", function () { setSelection([], view); });
      plot.subscribe("pointover", function (i) { hover(i, view); });
      plot.subscribe("pointout", function () { hover(-1, view); });
      canvas.addEventListener("mousemove", function (e) { tip.x = e.clientX; tip.y = e.clientY; });
      canvas.addEventListener("mouseleave", function () { hover(-1, view); });
      applyDrag(view);
      if (window.IntersectionObserver) {  // panels off screen are not marked on hover
        new IntersectionObserver(function (entries) {
          view.visible = entries[entries.length - 1].isIntersecting;
        }).observe(canvas);
      }
      views.push(view);
      view.drawn = paint(view);
      return view;
    }

    function paint(view) {
      var enc = encoding(view.panel), plot = view.plot;
      view.settled = false; view.moving = false;  // draw() below drops any filter
      clearTimeout(view.restTimer);
      view.encoding = enc;
      plot.set({ pointColor: enc.colors, pointColorActive: enc.colors, colorBy: "valueA" });
      var options = { zDataType: enc.categorical ? "categorical" : "continuous" };
      if (view.index) { options.spatialIndex = view.index; }
      var pts = view.points;
      return plot.draw({ x: pts.x, y: pts.y, valueA: enc.values }, options).then(function () {
        if (!view.index) { view.index = plot.get("spatialIndex"); }
        plot.set({ pointOrder: enc.order });  // after draw: a first draw resets the order
        if (pts.valid) { plot.filter(pts.valid, { preventEvent: true }); }
        showSelection(view);
        view.settled = true;
      });
    }

    // The view moves: draw the sample (with the marker size and opacity of its own count, so
    // the panel looks the same, only sparser) until it has not moved for REST_MS.
    function move(view) {
      if (!view.movingPoints || !view.settled) { return; }
      clearTimeout(view.restTimer);
      view.restTimer = setTimeout(function () { rest(view); }, REST_MS);
      if (view.moving) { return; }
      view.moving = true;
      view.plot.set({ pointSize: movingStyle.size, opacity: movingStyle.opacity });
      view.plot.filter(view.movingPoints, { preventEvent: true });
    }
    // ... and at rest every point again, and the whole selection (a filter keeps only the
    // selected points it shows). Hover, clicks and lasso only ever see a view at rest.
    function rest(view) {
      clearTimeout(view.restTimer);
      if (!view.moving || view.plot.get("isDestroyed")) { return; }
      view.moving = false;
      view.plot.set({ pointSize: style.size, opacity: style.opacity });
      if (view.points.valid) { view.plot.filter(view.points.valid, { preventEvent: true }); }
      else { view.plot.unfilter({ preventEvent: true }); }
      showSelection(view);
    }
    function cameraMoved(view, matrix) {
      if (!matrix) { return false; }
      var last = view.lastCamera, moved = false;
      for (var i = 0; last && i < 16 && !moved; i++) { moved = last[i] !== matrix[i]; }
      view.lastCamera = Float32Array.from(matrix);
      return moved;
    }
    function intersect(sorted, other) {
      var keep = new Uint8Array(n);
      other.forEach(function (i) { keep[i] = 1; });
      return sorted.filter(function (i) { return keep[i]; });
    }

    function showSelection(view) {
      if (view.plot.get("isDestroyed")) { return; }
      if (state.selection.length) {
        view.plot.select(Array.from(state.selection), { preventEvent: true });
      } else {
        view.plot.deselect({ preventEvent: true });
      }
    }

    function setSelection(points, from) {
      var seen = new Uint8Array(n), list = [];
      (points || []).forEach(function (i) {
        if (i >= 0 && i < n && !seen[i]) { seen[i] = 1; list.push(i); }
      });
      list.sort(function (u, v) { return u - v; });
      state.selection = Int32Array.from(list);
      views.forEach(function (v) { if (v !== from) { showSelection(v); } });
      updateSelectionBar();
    }

    function applyDrag(view) {
      view.plot.set({ mouseMode: state.drag === "pan" ? "panZoom" : "lasso",
                      lassoType: state.drag === "box" ? "rectangle" : "freeform" });
    }

    // ---------------------------------------------------------------- hover
    var tip = el("div", "explorer-tip"); tip.id = "explorer-tip"; tip.x = 0; tip.y = 0;
    tip.setAttribute("role", "status");
    document.body.appendChild(tip);
    var tipIndex = -1, echoTimer = null, echoed = [], pressed = false;
    document.addEventListener("mousedown", function () { pressed = true; }, true);
    document.addEventListener("mouseup", function () { pressed = false; }, true);
    // The hovered sample is also marked in the other panels on screen, once the pointer
    // rests: each mark redraws a whole panel, too slow to do on every move of a big run.
    function echo(i, from) {
      echoed.forEach(function (v) { if (views.indexOf(v) >= 0) { v.plot.hover(-1, { preventEvent: true }); } });
      echoed = [];
      if (i < 0 || pressed) { return; }
      echoed = views.filter(function (v) { return v !== from && v.visible !== false; });
      echoed.forEach(function (v) { v.plot.hover(i, { preventEvent: true }); });
    }
    function hover(i, from) {
      if (i === tipIndex) { return; }
      tipIndex = i;
      clearTimeout(echoTimer);
      echoTimer = setTimeout(function () { echo(i, from); }, i < 0 ? 0 : 120);
      if (i < 0 || pressed) { tip.style.display = "none"; tip.removeAttribute("data-point"); return; }
      tip.textContent = "";
      tip.setAttribute("data-point", String(i));
      var head = el("div");
      head.appendChild(el("span", "idx", "#" + (indices ? indices[i] : i)));
      head.appendChild(document.createTextNode(" \u00b7 "));
      head.appendChild(el("span", "cls", names[labels[i]]));
      tip.appendChild(head);
      if (ids) { tip.appendChild(el("div", "sid", ids[i])); }
      var panel = from && from.panel, enc = from && from.encoding;
      if (panel && (state.mode === "knn") && predictions[panel.model + "/" + panel.layer]) {
        var pl = predictions[panel.model + "/" + panel.layer].labels[i];
        tip.appendChild(el("div", "knn", "kNN on raw features: " + names[pl] +
                           (pl === labels[i] ? " (correct)" : " (wrong)")));
      } else if (state.mode === "disagree" && predictions[state.a] && predictions[state.b]) {
        tip.appendChild(el("div", "knn", state.a + ": " + names[predictions[state.a].labels[i]] +
                           "; " + state.b + ": " + names[predictions[state.b].labels[i]]));
      } else if (enc && !enc.categorical) {
        tip.appendChild(el("div", "knn", state.mode + " (this point): " +
                           (enc.lo + enc.values[i] * (enc.hi - enc.lo)).toPrecision(3)));
      }
      if (sprite && i < thumbs.n) {
        var c = el("canvas", "thumb"), scale = Math.max(1, Math.floor(96 / Math.max(thumbs.w, thumbs.h)));
        c.width = thumbs.w; c.height = thumbs.h;
        c.style.width = thumbs.w * scale + "px"; c.style.height = thumbs.h * scale + "px";
        c.setAttribute("data-thumb", String(i));
        var ctx = c.getContext("2d");
        var draw = function () {
          ctx.drawImage(sprite, (i % thumbs.cols) * thumbs.w, Math.floor(i / thumbs.cols) * thumbs.h,
                        thumbs.w, thumbs.h, 0, 0, thumbs.w, thumbs.h);
        };
        if (sprite.complete) { draw(); } else { sprite.addEventListener("load", draw, { once: true }); }
        tip.appendChild(c);
      }
      tip.style.display = "block";
      var left = tip.x + 14, top = tip.y + 14, w = tip.offsetWidth, h = tip.offsetHeight;
      if (left + w > window.innerWidth - 4) { left = tip.x - w - 14; }
      if (top + h > window.innerHeight - 4) { top = tip.y - h - 14; }
      tip.style.left = Math.max(4, left) + "px"; tip.style.top = Math.max(4, top) + "px";
    }

    // ---------------------------------------------------------------- toolbar
    var bar = el("div", "explorer-bar"); bar.id = "explorer-bar";
    var dragGroup = el("span", "group");
    dragGroup.appendChild(el("span", "", "Drag:"));
    var dragButtons = {};
    [["pan", "pan & zoom"], ["lasso", "lasso"], ["box", "box"]].forEach(function (d) {
      var b = el("button", "", d[1]); b.type = "button"; b.setAttribute("data-drag", d[0]);
      b.setAttribute("aria-pressed", String(d[0] === state.drag));
      b.addEventListener("click", function () { setDrag(d[0]); });
      dragButtons[d[0]] = b; dragGroup.appendChild(b);
    });
    bar.appendChild(dragGroup);

    var colorGroup = el("span", "group");
    var colorLabel = el("label", "", "Colour by: ");
    var colorSelect = el("select"); colorSelect.id = "explorer-color";
    colorLabel.appendChild(colorSelect); colorGroup.appendChild(colorLabel);
    var modes = [["class", "class"]];
    if (fsKeys.length) { modes.push(["knn", "kNN on raw features: correct / wrong"]); }
    if (fsKeys.length > 1) { modes.push(["disagree", "kNN disagreement of two feature sets"]); }
    var scoreKeys = Object.keys(data.point_scores || {});
    ["trustworthiness", "continuity"].forEach(function (m) {
      if (scoreKeys.some(function (k) { return data.point_scores[k][m]; })) {
        modes.push([m, m + " per point"]);
      }
    });
    modes.forEach(function (m) {
      var o = el("option", "", m[1]); o.value = m[0]; colorSelect.appendChild(o);
    });
    colorSelect.addEventListener("change", function () { setColor(colorSelect.value); });
    var pair = el("span", "group"); pair.style.display = "none";
    function fsSelect(which) {
      var s = el("select"); s.setAttribute("data-which", which);
      fsKeys.forEach(function (k) {
        var o = el("option", "", k); o.value = k; s.appendChild(o);
      });
      s.value = state[which];
      s.addEventListener("change", function () { state[which] = s.value; repaint(); });
      return s;
    }
    pair.appendChild(fsSelect("a")); pair.appendChild(el("span", "", "vs")); pair.appendChild(fsSelect("b"));
    colorGroup.appendChild(pair);
    bar.appendChild(colorGroup);
    var key = el("span", "explorer-key"); bar.appendChild(key);
    var help = el("span", "explorer-key", "?");
    help.title = "Wheel: zoom. Shift+drag: lasso in any mode. Click a point: select it. " +
      "Double-click: clear the selection. \u2922: open a panel large.";
    bar.appendChild(help);

    function setDrag(d) {
      state.drag = d;
      Object.keys(dragButtons).forEach(function (k) { dragButtons[k].setAttribute("aria-pressed", String(k === d)); });
      views.forEach(applyDrag);
    }
    function setColor(mode) {
      if (!modes.some(function (m) { return m[0] === mode; })) { throw new Error("no colour mode " + mode); }
      state.mode = mode; colorSelect.value = mode;
      pair.style.display = mode === "disagree" ? "" : "none";
      return repaint();
    }
    function repaint() {
      updateKey();
      return Promise.all(views.map(function (v) { v.drawn = paint(v); return v.drawn; }));
    }
    function swatch(color, text) {
      var s = el("span"); var d = el("span", "sw"); d.style.background = color;
      s.appendChild(d); s.appendChild(document.createTextNode(text)); return s;
    }
    function updateKey() {
      key.textContent = "";
      if (state.mode === "class") { key.appendChild(el("span", "", "colours as in the legend above")); }
      else if (state.mode === "knn") {
        key.appendChild(swatch(GREY, "correct")); key.appendChild(swatch(WRONG, "wrong"));
        key.appendChild(el("span", "", "(leave-one-out, k = " + data.knn.k + ", this panel's feature set)"));
      } else if (state.mode === "disagree") {
        key.appendChild(swatch(GREY, "same prediction")); key.appendChild(swatch(DISAGREE, "different"));
      } else {
        key.appendChild(el("span", "", "low"));
        var r = el("span", "ramp"); r.style.background = "linear-gradient(90deg," + RAMP.join(",") + ")";
        key.appendChild(r); key.appendChild(el("span", "", "high (range of each panel)"));
      }
    }
    updateKey();
    var section = document.getElementById("grid");
    var gridScroll = section && section.querySelector(".grid-scroll");
    if (gridScroll) { gridScroll.parentNode.insertBefore(bar, gridScroll); } else { document.body.insertBefore(bar, document.body.firstChild); }
    var nav = document.querySelector("nav.toc");
    if (nav) { bar.style.top = Math.ceil(nav.getBoundingClientRect().height) + "px"; }  // below it

    // ---------------------------------------------------------------- selection bar
    var sel = el("div", "explorer-sel"); sel.id = "explorer-sel"; sel.setAttribute("role", "region");
    sel.setAttribute("aria-label", "selection");
    var count = el("strong", "count"), mix = el("span", "mix"), status = el("span", "status");
    sel.appendChild(count); sel.appendChild(mix);
    [["csv", "download CSV"], ["json", "download JSON"], ["copy", "copy indices"], ["clear", "clear"]].forEach(function (b) {
      var button = el("button", "", b[1]); button.type = "button"; button.setAttribute("data-action", b[0]);
      button.addEventListener("click", function () { action(b[0]); });
      sel.appendChild(button);
    });
    sel.appendChild(status);
    document.body.appendChild(sel);

    function classMix() {
      var counts = {};
      state.selection.forEach(function (i) { counts[labels[i]] = (counts[labels[i]] || 0) + 1; });
      return Object.keys(counts).map(Number).sort(function (u, v) { return counts[v] - counts[u] || u - v; })
        .map(function (c) { return { label: c, name: names[c], count: counts[c] }; });
    }
    function updateSelectionBar() {
      var k = state.selection.length;
      sel.classList.toggle("on", k > 0);
      status.textContent = "";
      count.textContent = k + " selected";
      mix.textContent = "";
      var entries = classMix();
      entries.slice(0, 10).forEach(function (e) {
        var s = swatch(colors[e.label % colors.length], e.name + " " + e.count);
        s.setAttribute("data-class", String(e.label));
        mix.appendChild(s);
      });
      if (entries.length > 10) { mix.appendChild(el("span", "", "+" + (entries.length - 10) + " more classes")); }
    }
    function datasetIndex(i) { return indices ? indices[i] : i; }
    function csvField(s) { s = String(s); return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
    function exportText(format) {
      var rows = Array.from(state.selection);
      if (format === "json") {
        var out = { count: rows.length, indices: rows.map(datasetIndex), positions: rows,
                    classes: rows.map(function (i) { return names[labels[i]]; }) };
        if (ids) { out.ids = rows.map(function (i) { return ids[i]; }); }
        return JSON.stringify(out);
      }
      if (format === "csv") {
        var lines = ["index,position,class" + (ids ? ",id" : "")];
        rows.forEach(function (i) {
          lines.push([datasetIndex(i), i, csvField(names[labels[i]])].concat(ids ? [csvField(ids[i])] : []).join(","));
        });
        return lines.join("\n") + "\n";
      }
      return rows.map(datasetIndex).join(",");  // "copy": the dataset indices
    }
    function download(format) {
      var blob = new Blob([exportText(format)], { type: format === "json" ? "application/json" : "text/csv" });
      var a = el("a"); a.href = URL.createObjectURL(blob);
      a.download = "selection." + format;
      document.body.appendChild(a); a.click(); document.body.removeChild(a);
      setTimeout(function () { URL.revokeObjectURL(a.href); }, 1000);
      api.lastDownload = { name: a.download, format: format };
      status.textContent = "saved " + a.download;
    }
    function copy() {
      var text = exportText("copy");
      api.lastCopy = text;
      function fallback() {
        var area = el("textarea"); area.value = text; area.style.position = "fixed"; area.style.opacity = "0";
        document.body.appendChild(area); area.select();
        var ok = false;
        try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
        document.body.removeChild(area);
        status.textContent = ok ? "copied " + state.selection.length + " indices" : "copy failed: select and copy by hand";
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () {
          status.textContent = "copied " + state.selection.length + " indices";
        }, fallback);
      } else {
        fallback();
      }
    }
    function action(name) {
      if (name === "clear") { setSelection([], null); }
      else if (name === "copy") { copy(); }
      else { download(name); }
    }

    // ---------------------------------------------------------------- large view
    var modal = el("div", "explorer-modal"); modal.id = "explorer-modal";
    modal.setAttribute("role", "dialog"); modal.setAttribute("aria-modal", "true");
    var box = el("div", "box"), head = el("div", "head"), title = el("h3");
    var close = el("button", "", "close \u2715"); close.type = "button"; close.setAttribute("data-action", "close");
    head.appendChild(title); head.appendChild(close);
    var stage = el("div", "stage");
    box.appendChild(head); box.appendChild(stage); modal.appendChild(box);
    document.body.appendChild(modal);
    var large = null;
    function openLarge(panelKey) {
      var panel = data.panels.find(function (p) { return p.key === panelKey; });
      if (!panel) { throw new Error("no panel " + panelKey); }
      closeLarge();
      title.textContent = panel.model + " / " + panel.layer + " \u00b7 " + panel.method;
      box.insertBefore(bar, stage);
      modal.classList.add("on");
      var canvas = el("canvas"); stage.appendChild(canvas);
      var r = stage.getBoundingClientRect();
      large = makeView(panel, canvas, Math.max(200, Math.floor(r.width)), Math.max(200, Math.floor(r.height)));
      large.large = true;
      fitRenderer();
      api.large = panel.key;
      close.focus();
      return large.drawn;
    }
    function closeLarge() {
      if (!large) { return; }
      views.splice(views.indexOf(large), 1);
      large.plot.destroy();
      fitRenderer();
      stage.textContent = "";
      large = null; api.large = null;
      modal.classList.remove("on");
      if (gridScroll) { gridScroll.parentNode.insertBefore(bar, gridScroll); }
    }
    close.addEventListener("click", closeLarge);
    modal.addEventListener("click", function (e) { if (e.target === modal) { closeLarge(); } });
    document.addEventListener("keydown", function (e) { if (e.key === "Escape") { closeLarge(); } });

    // ---------------------------------------------------------------- grid panels
    var byKey = {};
    data.panels.forEach(function (p) { byKey[p.key] = p; });
    var grid = [];
    Array.prototype.forEach.call(document.querySelectorAll("td.panel[data-key]"), function (td) {
      var panel = byKey[td.getAttribute("data-key")], img = td.querySelector("figure > img");
      if (!panel || !img) { return; }
      var box = el("div", "explorer-view");
      var canvas = el("canvas"); canvas.setAttribute("aria-label", img.getAttribute("alt") || panel.key);
      canvas.setAttribute("role", "img");
      var expand = el("button", "explorer-expand", "\u2922"); expand.type = "button";
      expand.title = "open large"; expand.setAttribute("aria-label", "open " + panel.key + " large");
      expand.addEventListener("click", function () { openLarge(panel.key); });
      box.appendChild(canvas); box.appendChild(expand);
      img.parentNode.insertBefore(box, img);
      td.classList.add("explorer-on");
      grid.push(makeView(panel, canvas, box.clientWidth || 280, box.clientHeight || 280));
    });
    fitRenderer();
    window.addEventListener("resize", function () {  // the grid's panels shrink on narrow screens
      grid.forEach(function (v) {
        var w = v.canvas.parentNode.clientWidth, h = v.canvas.parentNode.clientHeight;
        if (w && h && (w !== v.plot.get("width") || h !== v.plot.get("height"))) {
          v.plot.set({ width: w, height: h });
        }
      });
      fitRenderer();
    });

    // ---------------------------------------------------------------- the API (tests, users)
    function find(panelKey) {  // the grid's view of a panel
      var v = grid.find(function (x) { return x.panel.key === panelKey; });
      if (!v) { throw new Error("no panel " + panelKey); }
      return v;
    }
    api.webgl = true;
    api.n = n;
    api.panels = grid.map(function (v) { return v.panel.key; });
    api.select = function (points) { setSelection(points, null); return api.selection(); };
    api.clear = function () { setSelection([], null); };
    api.selection = function () { return Array.from(state.selection); };
    api.selected = function (panelKey) {  // what a panel itself shows as selected
      return Array.from(find(panelKey).plot.get("selectedPoints")).sort(function (u, v) { return u - v; });
    };
    api.selectedLarge = function () {
      return large ? Array.from(large.plot.get("selectedPoints")).sort(function (u, v) { return u - v; }) : null;
    };
    api.screenPosition = function (panelKey, i) {  // viewport px of point i; "large": the big view
      var v = panelKey === "large" ? large : find(panelKey);
      var p = v.plot.getScreenPosition(i), r = v.canvas.getBoundingClientRect();
      return p ? { x: r.left + p[0], y: r.top + p[1] } : null;
    };
    api.colorBy = function (mode, a, b) {
      if (a) { state.a = a; } if (b) { state.b = b; }
      Array.prototype.forEach.call(bar.querySelectorAll("select[data-which]"), function (s) { s.value = state[s.getAttribute("data-which")]; });
      return setColor(mode);
    };
    api.colors = function (panelKey) {  // colour of each point in a panel, as drawn now
      var enc = find(panelKey).encoding;
      return Array.from(enc.values, function (v) {
        return enc.categorical ? enc.colors[v % enc.colors.length] : enc.colors[Math.round(v * (enc.colors.length - 1))];
      });
    };
    api.mode = function () { return state.mode; };
    api.drawnPoints = function (panelKey) {  // how many points the view draws now
      var plot = panelKey === "large" ? large.plot : find(panelKey).plot;
      return plot.get("isPointsFiltered") ? plot.get("filteredPoints").length : n;
    };
    api.movingPoints = movingSample ? movingSample.length : n;
    api.plot = function (panelKey) { return panelKey === "large" ? large && large.plot : find(panelKey).plot; };
    api.setDrag = setDrag;
    api.exportText = exportText;
    api.open = openLarge;
    api.close = closeLarge;
    api.whenDrawn = function () { return Promise.all(views.map(function (v) { return v.drawn; })).then(function () { return true; }); };
    api.ready = true;
  }
})();
