// BN Scope live view: one EventSource per viewed run. Each figure of the open section grows by
// one extendData per delivery (or, for "latest" and "channels" figures, is rebuilt), each in
// its own task so the page stays responsive. One delivery is drawn at a time: batches that
// arrive meanwhile are merged into the next, so a slow machine draws larger batches less often
// instead of falling behind. What feeds each figure comes from the live specs that
// dashboard/figures.py sends with it.
(function () {
  const B = (window.bnscope = window.bnscope || {});
  // the run statuses still in progress: the server's own list (dashboard/app.py writes it)
  B.active = (window.bnscopeVocabulary || {}).active || [];
  // Heatmaps and rebuilt figures cost a full redraw each: at most one per HEAVY_EVERY ms, so
  // line figures (the step's loss first) keep up with the stream on a slow machine.
  const HEAVY_EVERY = 400;
  // seconds from a record's creation in the worker until it is drawn here: in the first figure
  // that shows it (latencies), and once every figure of the open section has it (latenciesAll)
  B.latencies = [];
  B.latenciesAll = [];
  B.source = null;
  B.runId = null;
  B.pending = [];
  B.timer = null;
  B.busy = false;  // a delivery is being drawn
  B.heavy = [];  // batches the heatmaps and rebuilt figures have not drawn yet
  B.heavyAt = 0;
  B.spec = null;
  B.redrawAsked = false;
  B.firstAsked = false;
  B.emptyAsked = false;

  const set = (id, props) => window.dash_clientside.set_props(id, props);
  const say = (text) => set("live-indicator", {children: text});
  const log10 = (v) => (v === null || !(v > 0) ? null : Math.log10(v));

  B.watch = function (runId) {
    if (runId === B.runId) return;
    if (B.source) B.source.close();
    Object.assign(B, {source: null, runId: runId || null, pending: [], heavy: []});
    if (!runId) { say(""); return; }
    const es = new EventSource("/api/runs/" + runId + "/stream");  // reconnects by itself
    B.source = es;
    es.onopen = () => say("live");
    es.onerror = () => {
      say(es.readyState === EventSource.CLOSED ? "" : "reconnecting…");
      B.health();  // say at once whether the server itself is gone
    };
    es.addEventListener("records", (e) => {
      B.pending.push(JSON.parse(e.data));
      B.schedule();
    });
    es.addEventListener("status", (e) => {
      const run = JSON.parse(e.data);
      set("live-status", {data: run});
      if (!B.active.includes(run.status)) { es.close(); say("ended: " + run.status); }
    });
    es.addEventListener("reset", () => set("live-reset", {data: Date.now()}));
    // the BN doctor made or changed a diagnosis: the Diagnosis panel is drawn again
    es.addEventListener("diagnosis", () => set("live-diagnosis", {data: Date.now()}));
  };

  // A run view whose drawing never came back (a lost or dropped callback answer: seen under
  // load) is asked for again: every 3 s, while a shown figure of the run tab is still the
  // empty placeholder, at most 5 times per run and section.
  B.retries = {key: null, n: 0};
  B.ensureDrawn = function () {
    const tab = document.querySelector("#section");
    if (!B.runId || !tab || tab.offsetParent === null) return;
    const shown = [...document.querySelectorAll(".js-plotly-plot")]
      .filter((gd) => gd.offsetParent !== null && tab.parentElement.contains(gd));
    const selected = document.querySelector("#section .tab--selected");
    const key = B.runId + "/" + (selected ? selected.innerText : "");
    if (B.retries.key !== key) B.retries = {key: key, n: 0};
    if (!shown.some((gd) => !gd.data || gd.data.length === 0) || B.retries.n >= 5) return;
    B.retries.n += 1;
    set("live-reset", {data: Date.now()});
  };
  setInterval(B.ensureDrawn, 3000);

  // A task of its own, queued ahead of timers: Chromium lets timers wait behind rendering
  // for 100 ms and more while a page streams.
  const task = (fn) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = fn;
    ch.port2.postMessage(null);
  };
  B.schedule = function () {
    if (B.busy) return;
    if (B.pending.length) {
      clearTimeout(B.timer);
      B.timer = null;
      B.busy = true;
      task(B.deliver);
    } else if (B.heavy.length && !B.timer) {  // the last records of a burst reach the heatmaps
      B.timer = setTimeout(B.deliver, Math.max(0, B.heavyAt + HEAVY_EVERY - Date.now()));
    }
  };
  // After the next paint; a hidden tab paints nothing, so also after at most 250 ms.
  const afterPaint = (fn) => {
    let done = false;
    const once = () => { if (!done) { done = true; fn(); } };
    requestAnimationFrame(once);
    setTimeout(once, 250);
  };
  const drawn = () => { B.busy = false; B.schedule(); };

  // One batch from several: columns concatenated; per-channel arrays, only the latest.
  B.merge = function (batches) {
    if (batches.length === 1) return batches[0];
    const out = {};
    for (const b of batches) {
      for (const [name, table] of Object.entries(b)) {
        if (!table || !table.step) continue;
        if (name === "channels" || !out[name]) { out[name] = Object.assign({}, table); continue; }
        for (const [col, values] of Object.entries(table)) {
          out[name][col] = (out[name][col] || []).concat(values);
        }
      }
    }
    return out;
  };

  const rows = (table, layer) => {
    const idx = [];
    for (let i = 0; i < table.step.length; i++) {
      if (layer === undefined || table.layer[i] === layer) idx.push(i);
    }
    return idx;
  };
  const plotted = (graph) => {
    const gd = document.querySelector("#" + graph + " .js-plotly-plot");
    return gd && gd.data ? gd : null;
  };

  // The update of one figure from one batch: [prop, value], or null if nothing changes.
  function update(spec, batch, ext) {
    const table = batch[spec.table];
    if (!table || !table.step || !table.step.length) return null;
    if (spec.kind === "line") {
      const idx = rows(table, spec.layer);
      if (!idx.length) return null;
      spec.columns.forEach((col, k) => {
        if (!table[col]) return;
        ext.x.push(idx.map((i) => table.step[i]));
        ext.y.push(idx.map((i) => table[col][i]));
        ext.traces.push(spec.traces[k]);
        ext.max = spec.max;
      });
      return null;  // lines of one figure are sent together, after all its specs
    }
    if (spec.kind === "heat") {
      const byStep = new Map();
      table.step.forEach((s, i) => {
        if (!byStep.has(s)) byStep.set(s, new Array(spec.layers.length).fill(null));
        const j = spec.layers.indexOf(table.layer[i]);
        const v = table[spec.column][i];
        if (j >= 0) byStep.get(s)[j] = spec.log ? log10(v) : v;
      });
      return ["extendData", [{x: [[...byStep.keys()]], z: [[...byStep.values()]]}, [0], spec.max]];
    }
    // rebuilt from the figure as it is when the task runs, not as it was when the batch came:
    // a redraw from the server in between must not be overwritten by an older figure
    return ["figure", () => {
      const gd = plotted(spec.graph);
      if (!gd) return null;
      let data;
      if (spec.kind === "latest") {
        // each layer's latest measured value of the batch; a layer the batch did not measure
        // (a script's gradients at some steps only) keeps the value it has
        data = gd.data.map((t, k) => {
          const col = table[spec.columns[k]];
          if (!col) return t;
          const last = {};
          table.step.forEach((s, i) => {
            if (col[i] !== null && col[i] === col[i]) last[table.layer[i]] = col[i];
          });
          return Object.assign({}, t, {y: spec.layers.map((l, j) => (l in last ? last[l] :
            (t.y ? t.y[j] : null)))});
        });
      } else {  // channels: each layer's row (figures.channel_figure) gets its latest arrays
        const layers = (B.spec && B.spec.layers) || [];
        if (!layers.length) return null;  // drawn before the run said which layers it has
        data = gd.data.map((t, k) => Object.assign({}, t, {y: layers, z: layers.map((layer) => {
          const i = table.layer.lastIndexOf(layer);
          const r = (t.y || []).indexOf(layer);
          if (i < 0) return t.z && r >= 0 ? t.z[r] : null;
          const row = table[k === 0 ? "pre_mean" : "pre_var"][i];
          return k === 0 ? row : row.map(log10);
        })}));
        const step = Math.max(...table.step);  // the title says which step it shows
        const title = Object.assign({}, gd.layout.title, {text: spec.title + "<br>step " + step});
        return {data: data, layout: Object.assign({}, gd.layout, {title: title})};
      }
      return {data: data, layout: gd.layout};
    }];
  }

  B.deliver = function () {
    Object.assign(B, {timer: null, busy: false});
    if (!B.spec || !(B.pending.length || B.heavy.length)) return;
    const fresh = B.pending.length > 0;
    const batch = fresh ? B.merge(B.pending) : {};
    B.pending = [];
    if (fresh) B.heavy.push(batch);
    const now = Date.now();
    let heavy = null;  // what heatmaps and rebuilt figures get this time, if they are due
    if (now - B.heavyAt >= HEAVY_EVERY) {
      heavy = B.merge(B.heavy);
      Object.assign(B, {heavy: [], heavyAt: now});
    }
    const layers = batch.layers && batch.layers.layer;
    if (layers && layers.length && !(B.spec.layers || []).length && !B.redrawAsked) {
      B.redrawAsked = true;  // drawn before the run said which layers it has
      set("live-reset", {data: Date.now()});
    }
    const steps = batch.steps && batch.steps.step;
    if (steps && steps.length && B.spec.waiting && !B.firstAsked) {
      B.firstAsked = true;  // drawn before any record, axes hidden: drawn again with them
      set("live-reset", {data: Date.now()});
    }
    // the banner's step, once the run's banner is on the page (the stream can come first:
    // Dash's set_props throws for a component it does not have)
    if (steps && steps.length && document.getElementById("run-step")) {
      set("run-step", {children: String(steps[steps.length - 1])});
    }
    const lines = {};
    const work = [];  // line figures first: the step's loss shows before the heatmaps
    for (const spec of B.spec.specs || []) {
      const ext = (lines[spec.graph] = lines[spec.graph] || {x: [], y: [], traces: []});
      const u = spec.kind === "line" ? update(spec, batch, ext) : heavy && update(spec, heavy, ext);
      if (u) work.push([spec.graph, u]);
    }
    for (const [graph, ext] of Object.entries(lines).reverse()) {
      const gd = ext.traces.length ? plotted(graph) : null;
      if (gd && gd.layout.meta && gd.layout.meta.empty && !B.emptyAsked) {
        B.emptyAsked = true;  // drawn empty, axes hidden, a note: drawn again with its data
        set("live-reset", {data: Date.now()});
      }
      if (ext.traces.length) {
        work.unshift([graph, ["extendData", [{x: ext.x, y: ext.y}, ext.traces, ext.max]]]);
      }
    }
    // the record that waited longest: for the first figure drawn, and for the last one
    const oldest = (b) => (b && b.steps && b.steps.time && b.steps.time.length ?
      b.steps.time[0] : null);
    const first = oldest(batch);
    const all = heavy ? oldest(heavy) : null;
    B.busy = work.length > 0;
    work.forEach(([graph, [prop, value]], n) => {
      const last = n === work.length - 1;
      task(() => {
        try {
          const v = typeof value === "function" ? value() : value;
          if (v !== null) set(graph, {[prop]: v});
        } finally {
          if (n === 0 && first !== null) {
            requestAnimationFrame(() => B.latencies.push(Date.now() / 1000 - first));
          }
          if (last && all !== null) {
            requestAnimationFrame(() => B.latenciesAll.push(Date.now() / 1000 - all));
          }
          if (last) afterPaint(drawn);
        }
      });
    });
    B.schedule();
  };

  // The connection: /healthz every second, and a banner over every tab while the server is
  // out of reach (what the page shows is then as of that moment); gone on its return.
  B.down = null;
  B.health = function () {
    if (!window.dash_clientside || !window.dash_clientside.set_props) return;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 1500);
    fetch("/healthz", {signal: ctl.signal, cache: "no-store"})
      .then((r) => {
        if (!r.ok) throw new Error("status " + r.status);
        if (B.down === null) return;
        B.down = null;
        set("conn-banner", {children: "", className: "conn-banner"});
        set("server-back", {data: Date.now()});
      })
      .catch(() => {
        if (B.down === null) B.down = new Date();
        const since = B.down.toLocaleTimeString();
        set("conn-banner", {
          className: "conn-banner down",
          children: "The server is unreachable since " + since + ": what you see is as of " +
            "then. Retrying every second; the page catches up by itself when it is back.",
        });
      })
      .finally(() => clearTimeout(timer));
  };
  setInterval(B.health, 1000);

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    bnscope: {
      watch: function (runId) { B.watch(runId); return runId || null; },
      follow: function (spec) {
        B.spec = spec || null;
        if (spec && (spec.layers || []).length) B.redrawAsked = false;
        if (spec && spec.waiting) B.firstAsked = false;
        B.emptyAsked = false;
        return spec ? spec.run : null;
      },
    },
  });
})();
