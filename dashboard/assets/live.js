// BN Scope live view: one EventSource per viewed run; each `records` batch extends the figures
// in the browser, following the live specs that dashboard/figures.py sends with the figures.
(function () {
  const B = (window.bnscope = window.bnscope || {});
  B.latencies = [];  // seconds from a record's creation in the worker to its drawing here
  B.source = null;
  B.runId = null;
  B.pending = [];  // batches received since the last redraw
  B.timer = null;
  B.every = 200;  // ms: batches arriving faster are drawn together, one redraw per figure

  // One batch from several: columns concatenated; per-channel arrays, only the latest.
  B.merge = function (batches) {
    if (batches.length === 1) return batches[0];
    const out = {seq: batches[batches.length - 1].seq};
    for (const b of batches) {
      for (const [name, table] of Object.entries(b)) {
        if (name === "seq" || !table || !table.step) continue;
        if (name === "channels" || !out[name]) { out[name] = Object.assign({}, table); continue; }
        for (const [col, values] of Object.entries(table)) {
          out[name][col] = (out[name][col] || []).concat(values);
        }
      }
    }
    return out;
  };

  B.deliver = function () {
    B.timer = null;
    if (!B.pending.length) return;
    const batch = B.merge(B.pending);
    B.pending = [];
    dash_clientside.set_props("live-batch", {data: batch});
    const steps = batch.steps && batch.steps.step;
    if (steps && steps.length && document.getElementById("run-step")) {
      dash_clientside.set_props("run-step", {children: String(steps[steps.length - 1])});
    }
  };

  function say(text) {
    if (window.dash_clientside && dash_clientside.set_props) {
      dash_clientside.set_props("live-indicator", {children: text});
    }
  }

  B.watch = function (runId) {
    if (runId === B.runId) return;
    if (B.source) B.source.close();
    B.source = null;
    B.runId = runId || null;
    B.pending = [];
    if (!runId) { say(""); return; }
    const es = new EventSource("/api/runs/" + runId + "/stream");  // reconnects by itself
    B.source = es;
    es.onopen = () => say("live");
    es.onerror = () => say(es.readyState === EventSource.CLOSED ? "" : "reconnecting…");
    es.addEventListener("records", (e) => {
      B.pending.push(JSON.parse(e.data));
      if (!B.timer) B.timer = setTimeout(B.deliver, B.every);
    });
    es.addEventListener("status", (e) => {
      const run = JSON.parse(e.data);
      dash_clientside.set_props("live-status", {data: run});
      if (!["queued", "running"].includes(run.status)) { es.close(); say("finished"); }
    });
    es.addEventListener("reset", () => {
      dash_clientside.set_props("live-reset", {data: Date.now()});
    });
  };

  const rows = (table, layer) => {
    const idx = [];
    if (!table || !table.step) return idx;
    for (let i = 0; i < table.step.length; i++) {
      if (layer === undefined || table.layer[i] === layer) idx.push(i);
    }
    return idx;
  };
  const log10 = (v) => (v === null || !(v > 0) ? null : Math.log10(v));

  // Extend (or, for "latest" and "channels", rebuild) every graph from one batch.
  B.extend = function (batch, specs, graphIds, figures) {
    const nothing = window.dash_clientside.no_update;
    const out = {};
    for (const spec of specs || []) {
      const table = batch[spec.table];
      if (!table || !table.step || !table.step.length) continue;
      if (spec.kind === "line") {
        const idx = rows(table, spec.layer);
        if (!idx.length) continue;
        const ext = (out[spec.graph] = out[spec.graph] || {x: [], y: [], traces: [], max: spec.max});
        spec.columns.forEach((col, k) => {
          if (!table[col]) return;
          ext.x.push(idx.map((i) => table.step[i]));
          ext.y.push(idx.map((i) => table[col][i]));
          ext.traces.push(spec.traces[k]);
        });
      } else if (spec.kind === "heat") {
        const byStep = new Map();
        table.step.forEach((s, i) => {
          if (!byStep.has(s)) byStep.set(s, new Array(spec.layers.length).fill(null));
          const j = spec.layers.indexOf(table.layer[i]);
          if (j >= 0) byStep.get(s)[j] = spec.log ? log10(table[spec.column][i]) : table[spec.column][i];
        });
        out[spec.graph] = {heat: [[...byStep.keys()], [...byStep.values()]], max: spec.max};
      } else if (spec.kind === "latest") {
        const last = {};
        table.step.forEach((s, i) => { last[table.layer[i]] = i; });
        out[spec.graph] = {latest: spec.columns.map((col) =>
          spec.layers.map((l) => (l in last ? table[col][last[l]] : null)))};
      } else if (spec.kind === "channels") {
        out[spec.graph] = {channels: table};
      }
    }
    return graphIds.map((g, n) => {
      const e = out[g];
      if (!e) return nothing;
      if (e.heat) return [{x: [e.heat[0]], z: [e.heat[1]]}, [0], e.max];
      if (e.latest || e.channels) {
        const fig = figures[n];
        if (!fig) return nothing;
        const data = fig.data.map((t, k) => {
          if (e.latest) return Object.assign({}, t, {y: e.latest[k]});
          const col = k === 0 ? "pre_mean" : "pre_var";
          const z = (t.y || []).map((layer) => {
            const i = e.channels.layer.indexOf(layer);
            const old = t.z ? t.z[(t.y || []).indexOf(layer)] : null;
            if (i < 0) return old;
            const row = e.channels[col][i];
            return k === 0 ? row : row.map(log10);
          });
          return Object.assign({}, t, {z: z});
        });
        return Object.assign({}, fig, {data: data});
      }
      return [{x: e.x, y: e.y}, e.traces, e.max];
    });
  };

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    bnscope: {
      watch: function (runId) { B.watch(runId); return runId || null; },
      extend: function (batch, specs, ...figures) {
        // drawn before the run said which layers it has: redraw once they show up
        const haveLayers = specs && specs.layers && specs.layers.length;
        if (haveLayers) B.redrawAsked = false;
        else if (batch && batch.layers && batch.layers.layer && !B.redrawAsked) {
          B.redrawAsked = true;
          dash_clientside.set_props("live-reset", {data: Date.now()});
        }
        const graphIds = (specs && specs.graphs) || [];
        const result = B.extend(batch || {}, (specs && specs.specs) || [], graphIds, figures);
        const created = batch && batch.steps && batch.steps.time;
        if (created && created.length) {
          const oldest = created[0];  // the record that waited longest
          requestAnimationFrame(() => B.latencies.push(Date.now() / 1000 - oldest));
        }
        return result;
      },
    },
  });
})();
