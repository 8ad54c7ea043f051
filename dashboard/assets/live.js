// BN Scope live view: one EventSource per viewed run. Batches that arrive within EVERY ms are
// merged; each figure of the open section then grows by one extendData (or, for "latest" and
// "channels" figures, is rebuilt), each in its own task so the page stays responsive. What
// feeds each figure comes from the live specs that dashboard/figures.py sends with it.
(function () {
  const B = (window.bnscope = window.bnscope || {});
  const EVERY = 50;
  // seconds from a record's creation in the worker until it is drawn here: in the first figure
  // that shows it (latencies), and once every figure of the open section has it (latenciesAll)
  B.latencies = [];
  B.latenciesAll = [];
  B.source = null;
  B.runId = null;
  B.pending = [];
  B.timer = null;
  B.spec = null;
  B.redrawAsked = false;

  const set = (id, props) => window.dash_clientside.set_props(id, props);
  const say = (text) => set("live-indicator", {children: text});
  const log10 = (v) => (v === null || !(v > 0) ? null : Math.log10(v));

  B.watch = function (runId) {
    if (runId === B.runId) return;
    if (B.source) B.source.close();
    Object.assign(B, {source: null, runId: runId || null, pending: []});
    if (!runId) { say(""); return; }
    const es = new EventSource("/api/runs/" + runId + "/stream");  // reconnects by itself
    B.source = es;
    es.onopen = () => say("live");
    es.onerror = () => say(es.readyState === EventSource.CLOSED ? "" : "reconnecting…");
    es.addEventListener("records", (e) => {
      B.pending.push(JSON.parse(e.data));
      if (!B.timer) B.timer = setTimeout(B.deliver, EVERY);
    });
    es.addEventListener("status", (e) => {
      const run = JSON.parse(e.data);
      set("live-status", {data: run});
      if (!["queued", "running"].includes(run.status)) { es.close(); say("finished"); }
    });
    es.addEventListener("reset", () => set("live-reset", {data: Date.now()}));
  };

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
    const gd = plotted(spec.graph);
    if (!gd) return null;
    let data;
    if (spec.kind === "latest") {
      const last = {};
      table.step.forEach((s, i) => { last[table.layer[i]] = i; });
      data = gd.data.map((t, k) => Object.assign({}, t, {
        y: spec.layers.map((l) => (l in last ? table[spec.columns[k]][last[l]] : null))}));
    } else {  // channels: each layer's row (figures.channel_figure) gets its latest arrays
      data = gd.data.map((t, k) => Object.assign({}, t, {z: (t.y || []).map((layer, r) => {
        const i = table.layer.lastIndexOf(layer);
        if (i < 0) return t.z ? t.z[r] : null;
        const row = table[k === 0 ? "pre_mean" : "pre_var"][i];
        return k === 0 ? row : row.map(log10);
      })}));
    }
    return ["figure", {data: data, layout: gd.layout}];
  }

  B.deliver = function () {
    B.timer = null;
    if (!B.pending.length || !B.spec) return;
    const batch = B.merge(B.pending);
    B.pending = [];
    const layers = batch.layers && batch.layers.layer;
    if (layers && layers.length && !(B.spec.layers || []).length && !B.redrawAsked) {
      B.redrawAsked = true;  // drawn before the run said which layers it has
      set("live-reset", {data: Date.now()});
    }
    const steps = batch.steps && batch.steps.step;
    if (steps && steps.length) set("run-step", {children: String(steps[steps.length - 1])});
    const lines = {};
    const work = [];  // line figures first: the step's loss shows before the heatmaps
    for (const spec of B.spec.specs || []) {
      const ext = (lines[spec.graph] = lines[spec.graph] || {x: [], y: [], traces: []});
      const u = update(spec, batch, ext);
      if (u) work.push([spec.graph, u]);
    }
    for (const [graph, ext] of Object.entries(lines).reverse()) {
      if (ext.traces.length) {
        work.unshift([graph, ["extendData", [{x: ext.x, y: ext.y}, ext.traces, ext.max]]]);
      }
    }
    const created = batch.steps && batch.steps.time;
    work.forEach(([graph, [prop, value]], n) => {
      setTimeout(() => {
        set(graph, {[prop]: value});
        if ((n === 0 || n === work.length - 1) && created && created.length) {
          const oldest = created[0];  // the record that waited longest
          const into = n === 0 ? B.latencies : B.latenciesAll;
          requestAnimationFrame(() => into.push(Date.now() / 1000 - oldest));
        }
      }, 0);
    });
  };

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    bnscope: {
      watch: function (runId) { B.watch(runId); return runId || null; },
      follow: function (spec) {
        B.spec = spec || null;
        if (spec && (spec.layers || []).length) B.redrawAsked = false;
        return spec ? spec.run : null;
      },
    },
  });
})();
