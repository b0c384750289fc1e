// slimtune ui: polls the JSON API every 2 s; text from run folders goes in with textContent only.
"use strict";
const $ = (s) => document.querySelector(s);
let selected = null, selectedStudy = null, rowsByName = {};
const POLL_MS = 2000;

async function api(path, body) {
  const opt = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opt);
  const d = await r.json().catch(() => ({error: `HTTP ${r.status}`}));
  if (!r.ok) throw new Error(d.error || `HTTP ${r.status}`);
  return d;
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = text; if (cls) e.className = cls; return e; }
const fmt = (v, d = 4) => v === null || v === undefined ? "" : (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : String(v));
const secs = (s) => s == null ? "" : s < 90 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;

// ---- tabs
document.querySelectorAll("nav button").forEach((b) => b.onclick = () => {
  document.querySelectorAll("nav button").forEach((x) => x.classList.toggle("on", x === b));
  for (const t of ["runs", "new", "studies", "try"]) $(`#tab-${t}`).hidden = t !== b.dataset.tab;
  if (b.dataset.tab === "new" && !$("#yaml").value) formToYaml();
  if (b.dataset.tab === "try") loadModels();
});

// ---- runs
async function refreshRuns() {
  let d;
  try { d = await api("/api/runs"); } catch (e) { $("#root").textContent = `(${e.message})`; return; }
  $("#root").textContent = d.root;
  const tb = $("#runs-table tbody"); tb.replaceChildren();
  rowsByName = {};
  for (const r of d.runs) {
    rowsByName[r.name] = r;
    const tr = el("tr"); tr.dataset.name = r.name; tr.dataset.status = r.status;
    if (r.name === selected) tr.classList.add("sel");
    const best = r.best != null ? `${r.metric} ${fmt(r.best)}` + (r.before != null ? ` (from ${fmt(r.before)})` : "") : "";
    const prog = r.step != null ? `${r.step}${r.total_steps ? " / " + r.total_steps : ""}` : "";
    const cells = [r.name, r.status, prog, fmt(r.loss), best, r.trainable_pct != null ? fmt(r.trainable_pct, 3) : "",
                   secs(r.wall_s), r.peak_mem_mb != null ? `${fmt(r.peak_mem_mb, 0)} MB` : ""];
    cells.forEach((c, i) => { const td = el("td", c); if (i === 1) { td.className = `st-${r.status}`; td.title = r.why || ""; } tr.append(td); });
    tr.append(el("td", r.why ? String(r.why).slice(0, 80) : ""));
    tr.onclick = () => { selected = r.name; refreshRun(); refreshRuns(); };
    tb.append(tr);
  }
  const ul = $("#studies-list"); ul.replaceChildren();
  for (const s of d.studies) {
    const li = el("li"); const a = el("a", `${s.name} (${s.kind})`); a.href = "#"; a.dataset.name = s.name;
    a.onclick = (ev) => { ev.preventDefault(); selectedStudy = s.name; refreshStudy(); };
    li.append(a); ul.append(li);
  }
}

function curve(div, traces, title) {
  const data = traces.filter((t) => t.x.length);
  $(div).dataset.points = data.reduce((n, t) => n + t.x.length, 0);
  Plotly.react($(div), data, {title: {text: title, font: {size: 13}}, margin: {t: 30, r: 10, b: 35, l: 50},
    xaxis: {title: {text: "step"}}, legend: {orientation: "h"}}, {displayModeBar: false, responsive: true});
}

async function refreshRun() {
  if (!selected) return;
  let d;
  try { d = await api(`/api/run?name=${encodeURIComponent(selected)}`); }
  catch (e) { $("#run-detail").hidden = false; $("#run-name").textContent = selected; $("#run-status").textContent = e.message; return; }
  $("#run-detail").hidden = false;
  $("#run-name").textContent = d.name;
  const st = $("#run-status"); st.textContent = `${d.status}` + (d.why ? `: ${d.why}` : "") +
    (d.step != null ? ` — step ${d.step}${d.total_steps ? " of " + d.total_steps : ""}` : "");
  st.className = `st-${d.status}`; st.dataset.status = d.status;
  const acts = $("#run-actions"); acts.replaceChildren();
  if (d.status === "running" || d.status === "starting") {
    const b = el("button", "Stop (Ctrl-C: checkpoint kept)"); b.id = "stop";
    b.onclick = async () => { try { await api("/api/stop", {name: d.name}); b.textContent = "stopping…"; } catch (e) { alert(e.message); } };
    acts.append(b);
  } else if (d.status === "interrupted" || d.status === "failed") {
    const b = el("button", "Resume"); b.id = "resume";
    b.onclick = async () => { try { await api("/api/resume", {name: d.name}); } catch (e) { alert(e.message); } refreshRuns(); };
    acts.append(b);
  }
  const recs = d.records || [];
  const pick = (k) => { const r = recs.filter((x) => typeof x[k] === "number"); return {x: r.map((x) => x.step), y: r.map((x) => x[k])}; };
  curve("#chart-loss", [{...pick("loss"), name: "train loss", mode: "lines"}, {...pick("eval_loss"), name: "eval loss", mode: "lines+markers"}], "loss");
  curve("#chart-lr", [{...pick("lr"), name: "lr", mode: "lines"}], "learning rate");
  const skip = new Set(["step", "loss", "eval_loss", "lr", "tokens_per_s", "grad_norm", "peak_mem_mb", "epoch"]);
  const keys = [...new Set(recs.flatMap((r) => Object.keys(r)))].filter((k) => !skip.has(k) && recs.some((r) => typeof r[k] === "number"));
  curve("#chart-metric", keys.map((k) => ({...pick(k), name: k, mode: "lines+markers"})), "held-out metrics");
  const rep = $("#run-report");
  if (d.report_html) rep.innerHTML = d.report_html;  // markdown-it with raw HTML escaped (server side)
  else rep.textContent = "(no report yet: it is written when the run ends or stops)";
  $("#run-log").textContent = d.launched && !d.log_tail ? d.launched.output : (d.log_tail || "");
  $("#run-config").textContent = d.config || "";
}

// ---- new run
async function formToYaml() {
  const f = Object.fromEntries(new FormData($("#new-form")).entries());
  try { $("#yaml").value = (await api("/api/form", f)).yaml; say(""); } catch (e) { say(e.message, true); }
}
function say(msg, err) { const m = $("#message"); m.textContent = msg; m.className = err ? "err" : "ok"; }
$("#new-form").addEventListener("input", formToYaml);
$("#validate").onclick = async () => {
  try { const d = await api("/api/validate", {yaml: $("#yaml").value}); say(`ok: ${d.method} on ${d.model}, into ${d.output_dir}`); }
  catch (e) { say(e.message, true); }
};
$("#start").onclick = async () => {
  try {
    const d = await api("/api/start", {yaml: $("#yaml").value});
    say(`started ${d.name} (pid ${d.pid})`); selected = d.name;
    document.querySelector('nav button[data-tab="runs"]').click(); refreshRuns(); refreshRun();
  } catch (e) { say(e.message, true); }
};

// ---- compare & search
async function refreshStudy() {
  if (!selectedStudy) return;
  let d;
  try { d = await api(`/api/study?name=${encodeURIComponent(selectedStudy)}`); } catch (e) { $("#study-name").textContent = e.message; return; }
  $("#study-name").textContent = `${d.name} (${d.kind})`;
  const t = el("table"); const rows = d.table || [];
  if (rows.length) {
    const h = el("tr"); Object.keys(rows[0]).forEach((k) => h.append(el("th", k))); t.append(h);
    rows.forEach((r) => { const tr = el("tr"); Object.values(r).forEach((v) => tr.append(el("td", v))); t.append(tr); });
  }
  $("#study-table").replaceChildren(t);
  const figs = $("#study-figs"); figs.replaceChildren();
  for (const s of d.studies || []) {
    for (const [k, j] of Object.entries(s.figures || {})) {
      if (k === "error") { figs.append(el("p", j)); continue; }
      const div = el("div", null, "chart wide"); div.dataset.figure = k; figs.append(div);
      const f = JSON.parse(j); Plotly.react(div, f.data, f.layout, {displayModeBar: false});
    }
  }
  if (d.error) figs.append(el("p", `study: ${d.error}`, "st-failed"));
  const imgs = $("#study-images"); imgs.replaceChildren();
  for (const p of d.images || []) { const i = el("img"); i.src = `/api/file?path=${encodeURIComponent(p)}`; i.style.maxWidth = "48%"; imgs.append(i); }
  const rep = $("#study-report");
  if (d.report_html) rep.innerHTML = d.report_html; else rep.textContent = "";
}

// ---- try it: through the page's server, to the one `slimtune serve` it was given
let baseModel = null, speechModels = new Set();
function showInputs() {  // a speech model takes a file, a text model a prompt
  const speech = speechModels.has($("#try-model").value);
  $("#try-speech").hidden = !speech; $("#try-text").hidden = speech;
  for (const id of ["#try-mode", "#try-max", "#try-user"]) $(id).closest("label").hidden = speech;
}
$("#try-model").onchange = showInputs;
async function loadModels() {
  const sel = $("#try-model"); let d;
  try { d = await api("/api/try/models"); } catch (e) { $("#try-server").textContent = e.message; return; }
  $("#try-server").textContent = d.server ? `server: ${d.server}` : "no server: start `slimtune serve` and give its address to `slimtune ui --serve URL`";
  sel.replaceChildren(); baseModel = null; speechModels = new Set();
  for (const m of d.models) {
    if (m.kind === "base") baseModel = m.id;
    if (m.audio) speechModels.add(m.id);
    const o = el("option", `${m.id} (${m.kind})`); o.value = m.id; sel.append(o);
  }
  const first = d.models.find((m) => m.kind !== "base"); if (first) sel.value = first.id;
  showInputs();
}
async function ask(path, body) {  // answers side by side (text or transcripts)
  const out = $("#try-out"); out.replaceChildren(); $("#try-message").textContent = "…";
  try {
    const d = await api(path, {...body, model: $("#try-model").value, base: $("#try-base").checked ? baseModel : null});
    for (const a of d.answers) {
      const box = el("div", null, "answer"); box.dataset.model = a.model;
      box.append(el("h3", a.model + (a.route ? ` → ${a.adapter}` : "")), el("pre", a.text),
                 el("small", a.usage ? `${a.usage.completion_tokens} tokens` : ""));
      out.append(box);
    }
    $("#try-message").textContent = "";
  } catch (e) { $("#try-message").textContent = e.message; }
}
$("#try-send").onclick = () => ask("/api/try", {prompt: $("#try-prompt").value, mode: $("#try-mode").value,
  max_tokens: $("#try-max").value, user: $("#try-user").value});
$("#try-transcribe").onclick = () => {
  const f = $("#try-audio").files[0];
  if (!f) { $("#try-message").textContent = "choose an audio file first"; return; }
  const r = new FileReader();  // the page's POSTs are JSON: the file goes as base64
  r.onload = () => ask("/api/try/audio", {name: f.name, audio: String(r.result).split(",", 2)[1] || ""});
  r.onerror = () => { $("#try-message").textContent = `could not read ${f.name}`; };
  r.readAsDataURL(f);
};

refreshRuns();
setInterval(() => { refreshRuns(); refreshRun(); }, POLL_MS);
