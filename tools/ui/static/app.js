// The web UI's page logic: plain DOM code over the JSON API of tools/ui/app.py (no build step).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

async function api(path, body, method) {
  const opts = { method: method || (body === undefined ? "GET" : "POST"), headers: {} };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const res = await fetch(path, opts);
  let data = {};
  try { data = await res.json(); } catch (e) { data = { error: res.statusText }; }
  data._status = res.status;
  return data;
}

const fmt = {
  num: (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(d)),
  secs: (s) => {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
  },
  bytes: (b) => (b === null || b === undefined ? "–" : b > 1 << 30 ? (b / (1 << 30)).toFixed(2) + " GiB" : (b / (1 << 20)).toFixed(1) + " MiB"),
};

// --- tabs -------------------------------------------------------------------------------------------
const pages = ["new", "dataset", "runs", "live", "results"];
function show(page) {
  if (!pages.includes(page)) page = "new";
  for (const p of pages) {
    $(`#page-${p}`).classList.toggle("active", p === page);
    $(`#tab-${p}`).classList.toggle("active", p === page);
  }
  if (page === "runs") refreshRuns();
  if (page === "live" || page === "results") fillRunSelects().then(() => {
    if (page === "live" && !live.id && runs.length) { $("#live-run").value = runs[0].id; attach(runs[0].id); }
  });
}
window.addEventListener("hashchange", () => show(location.hash.slice(1).split("/")[0]));

// --- New run: the form from the typed options ---------------------------------------------------------
let schema = null;
const widgets = {};  // option key -> {info, input}

function widgetFor(opt) {
  const id = "opt-" + opt.key.replace(/\./g, "__");
  let input;
  if (opt.kind === "bool" && !opt.optional) {
    input = el("input", { type: "checkbox", id, "data-key": opt.key });
    input.checked = !!opt.default;
  } else if (opt.kind === "choice" || opt.kind === "bool") {
    const choices = opt.kind === "bool" ? [true, false] : opt.choices;
    input = el("select", { id, "data-key": opt.key });
    if (opt.optional) input.append(el("option", { value: "", text: "(unset)" }));
    for (const c of choices) input.append(el("option", { value: JSON.stringify(c), text: String(c) }));
    input.value = opt.default === null ? "" : JSON.stringify(opt.default);
  } else {
    const placeholder = opt.default === null ? (opt.required ? "required" : "unset")
      : opt.kind === "toml" ? JSON.stringify(opt.default) : String(opt.default);
    input = el("input", { type: "text", id, "data-key": opt.key, placeholder, autocomplete: "off", spellcheck: "false" });
  }
  return input;
}

function buildForm() {
  const root = $("#form-tables");
  root.textContent = "";
  for (const table of schema.tables) {
    const box = el("details", { class: "table", id: `table-${table.table}`, open: ["model", "training", "saving"].includes(table.table) });
    box.append(el("summary", { text: `[${table.table}]` + (table.doc ? ` — ${table.doc}` : "") }));
    for (const opt of table.options) {
      const input = widgetFor(opt);
      widgets[opt.key] = { info: opt, input };
      const row = el("div", { class: "option", id: `row-${opt.key.replace(/\./g, "__")}` },
        el("label", { for: input.id }, opt.name, opt.required ? el("span", { class: "required", text: " *" }) : null),
        input,
        el("p", { class: "help", text: `${opt.help} (${opt.allowed}${opt.default !== null && opt.kind !== "bool" ? "; default " + JSON.stringify(opt.default) : ""})` }),
        el("div", { class: "error", "data-error-for": opt.key }));
      box.append(row);
    }
    root.append(box);
  }
}

function setValue(key, value) {
  const w = widgets[key];
  if (!w) return;
  const { info, input } = w;
  if (input.type === "checkbox") input.checked = !!value;
  else if (input.tagName === "SELECT") input.value = value === null ? "" : JSON.stringify(value);
  else if (info.kind === "toml") input.value = JSON.stringify(value);
  else input.value = value === null ? "" : String(value);
}

function resetForm() {
  for (const { info, input } of Object.values(widgets)) {
    if (input.type === "checkbox") input.checked = !!info.default;
    else if (input.tagName === "SELECT") input.value = info.default === null ? "" : JSON.stringify(info.default);
    else input.value = "";
  }
}

function formValues() {
  const values = {};
  for (const [key, { info, input }] of Object.entries(widgets)) {
    if (input.type === "checkbox") {
      if (input.checked !== !!info.default) values[key] = input.checked;
    } else if (input.tagName === "SELECT") {
      if (input.value === "") continue;
      const v = JSON.parse(input.value);
      if (JSON.stringify(v) !== JSON.stringify(info.default)) values[key] = v;
    } else if (input.value.trim() !== "") {
      values[key] = input.value.trim();
    }
  }
  return values;
}

function clearErrors() {
  $$("[data-error-for]").forEach((n) => (n.textContent = ""));
  $$(".option.invalid").forEach((n) => n.classList.remove("invalid"));
  $("#general-errors").textContent = "";
  $("#form-message").textContent = "";
}

function showErrors(errors) {
  const general = [];
  for (const { field, message } of errors) {
    const slot = field && $(`[data-error-for="${CSS.escape(field)}"]`);
    if (slot) {
      slot.textContent = (slot.textContent ? slot.textContent + "\n" : "") + message;
      const row = slot.closest(".option");
      if (row) { row.classList.add("invalid"); row.closest("details").open = true; }
    } else general.push(message);
  }
  $("#general-errors").textContent = general.join("\n");
  const first = $(".option.invalid, [data-error-for='__dataset__']:not(:empty)");
  if (first) first.scrollIntoView({ block: "center" });
}

function showToml(result) {
  $("#raw-toml").textContent = "# config.toml\n" + (result.toml || "") +
    (result.dataset_toml ? "\n# dataset.toml\n" + result.dataset_toml : "");
  $("#resolved-toml").textContent = result.resolved || "(fix the mistakes above to see the resolved config)";
}

function request() {
  return { name: $("#run-name").value, values: formValues(), dataset_toml: $("#dataset-toml").value };
}

async function validateForm() {
  clearErrors();
  const result = await api("/api/validate", request());
  showToml(result);
  if (result.ok) $("#form-message").textContent = "The config is valid.";
  else showErrors(result.errors || [{ field: null, message: result.error }]);
  return result;
}

async function startRun(queue) {
  clearErrors();
  const result = await api("/api/runs", { ...request(), queue });
  if (result.toml) showToml(result);
  if (!result.ok) { showErrors(result.errors || [{ field: null, message: result.error }]); return; }
  $("#form-message").textContent = queue ? `Queued ${result.run.id}.` : `Started ${result.run.id}.`;
  if (!queue) { await fillRunSelects(); openLive(result.run.id); }
}

async function loadPresets() {
  const { presets } = await api("/api/presets");
  const sel = $("#preset");
  sel.append(el("option", { value: "", text: "(defaults)" }));
  for (const p of presets) sel.append(el("option", { value: p.name, text: p.name, title: p.description }));
}

async function loadPreset() {
  resetForm();
  clearErrors();
  const name = $("#preset").value;
  if (!name) { $("#dataset-toml").value = ""; return; }
  const preset = await api(`/api/presets/${encodeURIComponent(name)}`);
  for (const [k, v] of Object.entries(preset.values)) setValue(k, v);
  $("#dataset-toml").value = preset.dataset_toml;
  $("#run-name").value = name;
  $("#form-message").textContent = `Loaded preset ${name}.`;
}

// --- Runs ---------------------------------------------------------------------------------------------
let runs = [];
async function refreshRuns() {
  const data = await api("/api/runs");
  runs = data.runs || [];
  const body = $("#runs-table tbody");
  body.textContent = "";
  for (const r of runs) {
    const actions = el("td");
    const act = (label, fn) => actions.append(el("button", { type: "button", "data-action": label, onclick: fn, text: label }), " ");
    act("live", () => openLive(r.id));
    if (r.status === "running" || r.status === "starting") {
      act("stop", () => runCommand(r.id, "stop"));
      act("save", () => runCommand(r.id, "save"));
      act("sample", () => runCommand(r.id, "sample"));
    } else if (r.status === "queued") {
      act("cancel", async () => { await api(`/api/runs/${r.id}/cancel`, {}); refreshRuns(); });
    } else {
      act("resume", async () => {
        const res = await api(`/api/runs/${r.id}/resume`, {});
        $("#runs-message").textContent = res.error || `Resumed ${r.id}.`;
        refreshRuns();
      });
    }
    act("details", () => runDetail(r.id));
    act("results", () => { location.hash = "results"; setTimeout(() => { $("#results-run").value = r.id; loadResults(); }, 50); });
    body.append(el("tr", { "data-run": r.id },
      el("td", {}, el("b", { text: r.name }), el("br"), el("span", { class: "help", text: r.id })),
      el("td", {}, el("span", { class: `status status-${r.status}`, text: r.status }),
        r.error ? el("div", { class: "error", text: r.error }) : null),
      el("td", { text: `${r.step}${r.max_steps ? " / " + r.max_steps : ""}` }),
      el("td", { text: fmt.num(r.loss_avg) }),
      el("td", { text: r.status === "running" ? fmt.secs(r.eta_s) : "–" }),
      actions));
  }
}

async function runDetail(id) {
  const d = await api(`/api/runs/${id}`);
  const box = $("#run-detail");
  box.textContent = "";
  box.append(el("h3", { text: `${d.name} (${d.status})` }),
    d.error ? el("div", { class: "error", text: "error: " + d.error }) : null,
    el("p", { class: "help", text: `output ${d.output_dir}; ${d.launches} launch(es): ${(d.argv || []).join(" ")}` }),
    el("h4", { text: "Log (last lines)" }), el("pre", { class: "log", id: "log-tail", text: (d.log_tail || []).join("\n") }),
    el("h4", { text: "config.toml" }), el("pre", { class: "toml", text: d.config_toml + (d.dataset_toml ? "\n# dataset.toml\n" + d.dataset_toml : "") }));
}

async function runCommand(id, command) {
  const res = await api(`/api/runs/${id}/command`, { command });
  const note = res.error ? res.error : `${command} sent (id ${res.id})`;
  $("#runs-message").textContent = note;
  $("#live-command").textContent = note;
  if (res.error) return;
  for (let i = 0; i < 120; i++) {
    await new Promise((r) => setTimeout(r, 500));
    const ack = await api(`/api/runs/${id}/command/${res.id}`);
    if (ack.acknowledged) {
      $("#live-command").textContent = `${command} acknowledged at step ${ack.event.step}`;
      $("#runs-message").textContent = $("#live-command").textContent;
      return;
    }
  }
}

async function fillRunSelects() {
  const data = await api("/api/runs");
  runs = data.runs || [];
  for (const id of ["#live-run", "#results-run", "#compare-a", "#compare-b"]) {
    const sel = $(id);
    const keep = sel.value;
    sel.textContent = "";
    for (const r of runs) sel.append(el("option", { value: r.id, text: `${r.name} — ${r.status} (${r.id})` }));
    if (keep && runs.some((r) => r.id === keep)) sel.value = keep;
  }
  if (runs.length > 1 && $("#compare-a").value === $("#compare-b").value) $("#compare-b").value = runs[1].id;
}

// --- Live view ----------------------------------------------------------------------------------------
const live = { id: null, source: null, steps: [], loss: [], avg: [], lr: {}, gamma: null, samples: [], charts: {}, pending: false };

function chart(name, series, data, opts = {}) {
  const box = $(`#chart-${name}`);
  box.dataset.points = String(data[0].length);
  const width = Math.max(300, (box.clientWidth || 422) - 2);
  if (live.charts[name] && live.charts[name].series.length === series.length + 1) {
    live.charts[name].setData(data);
    return;
  }
  if (live.charts[name]) live.charts[name].destroy();
  box.textContent = "";
  live.charts[name] = new uPlot({
    width, height: 220,
    scales: { x: { time: false }, ...(opts.scales || {}) },
    // three significant digits: uPlot's default rounds small learning rates to equal labels
    axes: [{ label: opts.xlabel || "step" }, { size: 60, values: (u, vals) => vals.map((v) => (v === null ? "" : String(+v.toPrecision(3)))) }],
    series: [{ label: opts.xlabel || "step" }, ...series],
    ...(opts.extra || {}),
  }, data, box);
}

const COLOURS = ["#2f6fdb", "#e8710a", "#2e7d32", "#8e24aa", "#c62828", "#00838f"];

function redraw() {
  live.pending = false;
  chart("loss", [
    { label: "loss", stroke: "#9aa5b8", width: 1 },
    { label: "moving average", stroke: "#2f6fdb", width: 2 },
  ], [live.steps, live.loss, live.avg]);
  const groups = Object.keys(live.lr);
  if (groups.length) chart("lr", groups.map((g, i) => ({ label: g, stroke: COLOURS[i % COLOURS.length], width: 2 })),
    [live.steps, ...groups.map((g) => live.lr[g])]);
  $("#gamma-box").style.display = live.gamma ? "" : "none";
  if (live.gamma) {
    const g = live.gamma.gamma || [];
    const x = live.gamma.bins && live.gamma.bins.length === g.length ? live.gamma.bins : g.map((_, i) => i);
    chart("gamma", [{ label: "gamma", stroke: "#e8710a", fill: "rgba(232,113,10,.3)", paths: uPlot.paths.bars({ size: [0.8] }), points: { show: false } }],
      [x, g], { xlabel: live.gamma.bins ? "timestep (bin start)" : "timestep bin", scales: { y: { range: [0, 1] } } });
    $("#gamma-note").textContent = `loss weight ${fmt.num(live.gamma.loss_weight, 3)} at step ${live.gamma.step}`;
  }
}

function schedule() { if (!live.pending) { live.pending = true; requestAnimationFrame(redraw); } }

function sampleUrl(path) { return `/api/runs/${live.id}/file?path=${encodeURIComponent(path)}`; }

function renderGallery() {
  const root = $("#gallery");
  root.textContent = "";
  for (const s of [...live.samples].reverse()) {
    const thumbs = el("div", { class: "thumbs" });
    for (const img of s.images) {
      thumbs.append(el("figure", { class: "thumb" },
        el("img", { src: sampleUrl(img.path), alt: img.prompt || "", class: "sample-image" }),
        el("figcaption", { text: `${img.base ? "[base model] " : ""}${img.prompt || ""}${img.seed !== undefined ? " (seed " + img.seed + ")" : ""}` })));
    }
    const grid = s.grid ? el("details", {}, el("summary", { text: "the whole grid (base model beside the LoRA where sample_compare_base is on)" }),
      el("img", { src: sampleUrl(s.grid), class: "sample-grid", style: "max-width:100%;image-rendering:pixelated" })) : null;
    root.append(el("div", { class: "gallery-step" }, el("h4", { text: `step ${s.step}` }), thumbs, grid));
  }
}

function onTrainerEvent(ev) {
  if (ev.type === "start") {
    $("#live-stats").dataset.method = ev.method || "";
  } else if (ev.type === "step") {
    live.steps.push(ev.step); live.loss.push(ev.loss); live.avg.push(ev.loss_avg);
    for (const [g, v] of Object.entries(ev.lr || {})) {
      if (!live.lr[g]) live.lr[g] = live.steps.slice(0, -1).map(() => null);
      live.lr[g].push(v);
    }
    for (const g of Object.keys(live.lr)) if (live.lr[g].length < live.steps.length) live.lr[g].push(null);
    if (ev.apt) live.gamma = { ...ev.apt, step: ev.step };
    $("#live-stats").textContent = "";
    $("#live-stats").append(
      el("span", {}, "step ", el("b", { id: "stat-step", text: `${ev.step}${live.max ? " / " + live.max : ""}` })),
      el("span", {}, "epoch ", el("b", { text: String(ev.epoch ?? "–") })),
      el("span", {}, "s/step ", el("b", { id: "stat-speed", text: fmt.num(ev.s_per_step, 3) })),
      el("span", {}, "ETA ", el("b", { id: "stat-eta", text: fmt.secs(ev.eta_s) })),
      el("span", {}, "peak memory ", el("b", { id: "stat-memory", text: fmt.bytes(ev.peak_memory_bytes) })));
    schedule();
  } else if (ev.type === "sample") {
    live.samples.push({ step: ev.step, images: ev.images || [], grid: ev.grid });
    renderGallery();
  } else if (ev.type === "error") {
    $("#live-error").textContent = "error: " + ev.message;
  } else if (ev.type === "warning") {
    $("#live-error").textContent = "warning: " + ev.message;
  }
}

function setStatus(status) {
  const node = $("#live-status");
  node.textContent = status;
  node.className = `status status-${status}`;
  node.dataset.status = status;
  const option = $(`#live-run option[value="${CSS.escape(live.id || "")}"]`);
  if (option) option.textContent = option.textContent.replace(/ — \w+ \(/, ` — ${status} (`);
}

async function openLive(id) {
  if (location.hash !== "#live") location.hash = "live";
  await fillRunSelects();
  $("#live-run").value = id;
  attach(id);
}

function attach(id) {
  if (live.source) live.source.close();
  Object.values(live.charts).forEach((c) => c.destroy());
  Object.assign(live, { id, steps: [], loss: [], avg: [], lr: {}, gamma: null, samples: [], charts: {}, max: null });
  $$(".chart").forEach((c) => { c.textContent = ""; c.dataset.points = "0"; });
  $("#gallery").textContent = ""; $("#live-stats").textContent = ""; $("#live-error").textContent = ""; $("#live-command").textContent = "";
  if (!id) return;
  api(`/api/runs/${id}`).then((d) => { live.max = d.max_steps; if (d.error) $("#live-error").textContent = "error: " + d.error; });
  const src = new EventSource(`/api/runs/${id}/stream`);
  live.source = src;
  src.addEventListener("trainer", (e) => { const ev = JSON.parse(e.data); if (ev.type === "start") live.max = ev.max_steps; onTrainerEvent(ev); });
  src.addEventListener("status", (e) => setStatus(JSON.parse(e.data).status));
  src.addEventListener("done", async (e) => {
    setStatus(JSON.parse(e.data).status);
    src.close();
    const d = await api(`/api/runs/${id}`);
    if (d.error) $("#live-error").textContent = "error: " + d.error;
  });
}

// --- Results ------------------------------------------------------------------------------------------
function kv(obj) {
  return el("table", { class: "grid" }, ...Object.entries(obj || {}).map(([k, v]) =>
    el("tr", {}, el("th", { text: k }), el("td", { text: typeof v === "object" ? JSON.stringify(v) : String(v).slice(0, 400) }))));
}

async function loadResults() {
  const id = $("#results-run").value;
  const root = $("#results-files");
  root.textContent = "loading…";
  const data = await api(`/api/runs/${id}/results`);
  root.textContent = "";
  if (data.error) { root.append(el("div", { class: "error", text: data.error })); return; }
  if (!data.loras.length) root.append(el("p", { text: "No LoRA file in " + data.run.output_dir + " yet." }));
  for (const f of data.loras) {
    const s = f.summary || {};
    root.append(el("div", { class: "lora", "data-file": f.name },
      el("h4", { text: f.name }),
      f.error ? el("div", { class: "error", text: f.error }) : el("div", {},
        el("p", { text: `${s.architecture || "unknown"} · ${s.network_type} · ${s.modules} modules · ranks ${JSON.stringify(s.ranks)} · alphas ${JSON.stringify(s.alphas)} · ${fmt.bytes(f.size_bytes)}` }),
        el("p", { class: "help", text: Object.entries(s.compatibility || {}).map(([k, v]) => `${k}: ${v.loads ? "loads" : "does not load fully"}`).join(" · ") }),
        el("details", {}, el("summary", { text: "metadata" }), kv(f.metadata)))));
  }
}

async function compareRuns() {
  const a = $("#compare-a").value, b = $("#compare-b").value;
  const data = await api(`/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  const root = $("#compare-out");
  root.textContent = "";
  if (data.error) { root.append(el("div", { class: "error", text: data.error })); return; }
  root.append(el("div", { class: "pair" }, ...data.sides.map((s) => el("div", {},
    el("h4", { text: `${s.run.name} (${s.run.method || "?"}) — step ${s.samples.step ?? "–"}, loss ${fmt.num(s.run.loss_avg)}` })))));
  for (const p of data.pairs) {
    root.append(el("p", { class: "help", text: `${p.prompt} (seed ${p.seed})` }));
    root.append(el("div", { class: "pair" }, ...p.images.map((img, i) => img
      ? el("img", { src: `/api/runs/${data.sides[i].run.id}/file?path=${encodeURIComponent(img.path)}`, style: "max-width:100%;image-rendering:pixelated" })
      : el("div", { class: "help", text: "no sample for this prompt and seed" }))));
  }
}

// --- Dataset ------------------------------------------------------------------------------------------
async function scanDataset() {
  const resolution = parseInt($("#ds-resolution").value, 10) || null;
  const report = await api("/api/dataset/scan", { dataset_toml: $("#ds-toml").value, folder: $("#ds-folder").value, resolution });
  $("#ds-error").textContent = report.error || "";
  const root = $("#ds-report");
  root.textContent = "";
  if (report.error) return;
  $("#tool-folder").value = $("#tool-folder").value || (report.subsets[0] || {}).image_dir || "";
  const problems = [
    ...report.warnings.map((w) => "warning: " + w),
    ...report.missing_captions.map((p) => "no caption: " + p),
    ...report.bad_files.map((p) => "unreadable: " + p),
    ...report.long_captions.map((c) => `caption longer than 75 tokens (${c.tokens}): ${c.image}`),
  ];
  root.append(
    el("p", { text: `${report.images} images, ${report.batches_per_epoch} batches per epoch` }),
    el("table", { class: "grid", id: "ds-subsets" }, el("tr", {}, ...["subset", "folder", "images", "repeats", "samples/epoch"].map((h) => el("th", { text: h }))),
      ...report.subsets.map((s) => el("tr", {}, el("td", { text: `#${s.dataset}.${s.subset}${s.is_reg ? " (reg)" : ""}` }), el("td", { text: s.image_dir || s.metadata_file }),
        el("td", { text: s.images }), el("td", { text: s.num_repeats }), el("td", { text: s.samples_per_epoch })))),
    el("h4", { text: `Problems (${problems.length})` }),
    el("ul", { id: "ds-problems" }, ...problems.map((p) => el("li", { class: "error", text: p }))),
    el("div", { class: "columns" },
      el("div", {}, el("h4", { text: "Buckets" }), el("table", { class: "grid", id: "ds-buckets" },
        el("tr", {}, el("th", { text: "width × height" }), el("th", { text: "images" })),
        ...report.buckets.map((b) => el("tr", {}, el("td", { text: `${b.width} × ${b.height}` }), el("td", { text: b.count }))))),
      el("div", {}, el("h4", { text: "Tag frequency" }), el("table", { class: "grid", id: "ds-tags" },
        ...Object.entries(report.tag_frequency).slice(0, 60).map(([t, n]) => el("tr", {}, el("td", { text: t }), el("td", { text: n })))))),
    el("h4", { text: "Images and captions (edit a caption and leave the box to save it; the first edit keeps the original as .orig)" }));
  const grid = el("div", { class: "ds-grid" });
  for (const img of report.images_list) {
    const note = el("span", { class: "saved", text: img.backup ? "original kept as .orig" : "" });
    const box = el("textarea", { rows: 3, "data-caption-file": img.caption_file });
    box.value = img.caption;
    box.addEventListener("change", async () => {
      const res = await api("/api/dataset/caption", { caption_file: img.caption_file, text: box.value });
      note.textContent = res.error ? res.error : "saved" + (res.backup ? " (original kept as .orig)" : "");
    });
    grid.append(el("div", { class: "ds-item" }, el("img", { src: `/api/dataset/image?path=${encodeURIComponent(img.path)}`, alt: img.caption, loading: "lazy" }),
      el("div", { class: "help", text: `${img.path.split("/").pop()} ${img.size[0]}×${img.size[1]}` }), box, note));
  }
  root.append(grid);
}

async function startTool() {
  const res = await api("/api/tools", { tool: $("#tool-name").value, folder: $("#tool-folder").value, args: $("#tool-args").value });
  const log = $("#tool-log");
  if (res.error) { log.textContent = "error: " + res.error; return; }
  log.textContent = res.argv.join(" ") + "\n";
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    const st = await api(`/api/tools/${res.job}`);
    log.textContent = res.argv.join(" ") + "\n" + st.log + (st.running ? "" : `\n[exit status ${st.exit_code}]`);
    if (!st.running) break;
  }
}

// --- start --------------------------------------------------------------------------------------------
async function init() {
  schema = await api("/api/options");
  buildForm();
  await loadPresets();
  $("#load-preset").addEventListener("click", loadPreset);
  $("#validate").addEventListener("click", validateForm);
  $("#start").addEventListener("click", () => startRun(false));
  $("#queue").addEventListener("click", () => startRun(true));
  $("#live-run").addEventListener("change", (e) => attach(e.target.value));
  $$("[data-command]").forEach((b) => b.addEventListener("click", () => live.id && runCommand(live.id, b.dataset.command)));
  $("#results-load").addEventListener("click", loadResults);
  $("#compare").addEventListener("click", compareRuns);
  $("#ds-scan").addEventListener("click", scanDataset);
  $("#ds-from-form").addEventListener("click", () => { $("#ds-toml").value = $("#dataset-toml").value; });
  $("#tool-start").addEventListener("click", startTool);
  setInterval(() => { if ($("#page-runs").classList.contains("active")) refreshRuns(); }, 2000);
  show(location.hash.slice(1) || "new");
  document.body.dataset.ready = "1";
}
init();
