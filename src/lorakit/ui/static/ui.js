// lorakit ui: the little JavaScript the pages need (live progress, charts, the try-it panel).
"use strict";
const lorakit = {};

lorakit.palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

lorakit.chart = function (el, title, names, xs, ys) {
  // One uPlot line chart: x values and one y series per name (null where a series has no point).
  el.innerHTML = "";
  if (!xs.length) { el.textContent = "no points yet"; return null; }
  const series = [{}].concat(names.map((n, i) => ({ label: n, stroke: lorakit.palette[i % 6], width: 2, spanGaps: true, points: { show: xs.length < 40 } })));
  const opts = { title: title, width: Math.min(el.clientWidth || 800, 900), height: 260, series: series, scales: { x: { time: false } }, axes: [{ label: "step" }, {}] };
  return new uPlot(opts, [xs].concat(ys), el);
};

// The columns of validation rows in one order on every load: step, epoch, loss, then by name.
lorakit.metricKeys = function (rows) {
  const seen = new Set();
  rows.forEach((r) => Object.keys(r).forEach((k) => seen.add(k)));
  const first = ["step", "epoch", "loss"].filter((k) => seen.has(k));
  return first.concat(Array.from(seen).filter((k) => !first.includes(k) && k !== "seconds").sort());
};

lorakit.curves = function (el, progress) {
  // Training loss and every validation metric of one run, on one chart keyed by step.
  const train = progress.train || [], val = progress.validation || [];
  const keys = lorakit.metricKeys(val).filter((k) => !["step", "epoch"].includes(k));
  const steps = Array.from(new Set(train.map((p) => p[0]).concat(val.map((r) => r.step)))).sort((a, b) => a - b);
  const at = (rows, f) => steps.map((s) => { const r = rows.find((x) => f(x)[0] === s); return r ? f(r)[1] : null; });
  const ys = [at(train, (p) => p)].concat(keys.map((k) => at(val, (r) => [r.step, r[k]])));
  return lorakit.chart(el, "loss and validation metrics", ["train loss"].concat(keys.map((k) => "validation " + k)), steps, ys);
};

lorakit.fmt = function (s) {
  if (s == null) return "";
  s = Math.round(s);
  return (s >= 3600 ? Math.floor(s / 3600) + " h " : "") + Math.floor((s % 3600) / 60) + " min " + (s % 60) + " s";
};

lorakit.showProgress = function (p, running) {
  document.getElementById("bar").max = p.total || 1;
  document.getElementById("bar").value = p.step;
  document.getElementById("steps").textContent = "step " + p.step + " / " + (p.total || "?");
  const stepping = running && !lorakit.stopping && !p.phase;
  document.getElementById("eta").textContent = stepping && p.eta_seconds != null && p.step < p.total ? "· about " + lorakit.fmt(p.eta_seconds) + " left" : "";
  document.getElementById("phase").textContent = running && p.phase ? "· " + p.phase + "…" : "";
  // The log follows its tail, unless the reader scrolled up to read something.
  const log = document.getElementById("log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  log.textContent = (p.log || []).join("\n");
  if (atEnd || !lorakit.logShown) log.scrollTop = log.scrollHeight;
  lorakit.logShown = true;
  const evals = document.getElementById("evals");
  const rows = p.validation || [];
  if (rows.length) {
    const keys = lorakit.metricKeys(rows);
    evals.innerHTML = "<tr>" + keys.map((k) => "<th>" + k + "</th>").join("") + "</tr>" +
      rows.map((r) => "<tr>" + keys.map((k) => "<td class=num>" + (typeof r[k] === "number" && !Number.isInteger(r[k]) ? r[k].toFixed(4) : r[k]) + "</td>").join("") + "</tr>").join("");
  }
  lorakit.curves(document.getElementById("chart"), p);
};

lorakit.runPage = function (name, running, stopping) {
  document.addEventListener("DOMContentLoaded", () => {
    lorakit.stopping = stopping;
    const st = document.getElementById("status");
    const stopForm = document.getElementById("stop-form");
    if (stopForm) stopForm.addEventListener("submit", () => {  // at once, before the run has stopped
      lorakit.stopping = true;
      st.textContent = "stopping…";
      document.getElementById("eta").textContent = "";
    });
    lorakit.showProgress(JSON.parse(document.getElementById("progress-data").textContent), running);
    if (!running) return;
    const es = new EventSource("/runs/" + encodeURIComponent(name) + "/events");
    let was = st.dataset.status;
    es.addEventListener("progress", (e) => {
      const p = JSON.parse(e.data);
      lorakit.showProgress(p, p.status === "running");
      if (p.status !== was && was === "queued") { es.close(); location.reload(); return; }  // it started
      was = p.status;
      st.textContent = lorakit.stopping && p.status === "running" ? "stopping…" : p.status;
      st.className = "status " + p.status;
    });
    es.addEventListener("end", () => { es.close(); location.reload(); });
  });
};

lorakit.comparePage = function (metric, names) {
  // names: the runs in the order of the page's tables (object keys would put "2" before "a-run").
  document.addEventListener("DOMContentLoaded", () => {
    const curves = JSON.parse(document.getElementById("curves").textContent);
    for (const [id, part, title] of [["chart-loss", "train", "training loss"], ["chart-metric", "validation", "validation " + metric]]) {
      const steps = Array.from(new Set(names.flatMap((n) => curves[n][part].map((p) => p[0])))).sort((a, b) => a - b);
      const ys = names.map((n) => steps.map((s) => { const p = curves[n][part].find((q) => q[0] === s); return p ? p[1] : null; }));
      lorakit.chart(document.getElementById(id), title, names, steps, ys);
    }
  });
};

lorakit.post = async function (url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
};

lorakit.bars = function (predictions) {
  const out = document.getElementById("result");
  out.innerHTML = "";
  for (const p of predictions) {
    for (const t of p.top_k) {
      const row = document.createElement("div");
      row.className = "bar-row";
      row.innerHTML = '<span class="bar-label"></span><span class="bar"><span class="fill"></span></span><span class="bar-value"></span>';
      row.querySelector(".bar-label").textContent = t.label;
      row.querySelector(".fill").style.width = (100 * t.score).toFixed(1) + "%";
      row.querySelector(".bar-value").textContent = (100 * t.score).toFixed(1) + "%";
      out.appendChild(row);
    }
  }
};

// Labelled spans of a text (token classification): the text with each entity marked and its label.
lorakit.spans = function (text, predictions) {
  const out = document.getElementById("result");
  out.textContent = "";
  const p = document.createElement("p");
  let at = 0;
  for (const e of (predictions[0] || {}).entities || []) {
    if (e.start < at) continue;
    p.append(document.createTextNode(text.slice(at, e.start)));
    const mark = document.createElement("mark");
    mark.className = "entity";
    mark.title = e.label + " " + e.score.toFixed(3);
    mark.textContent = text.slice(e.start, e.end);
    const tag = document.createElement("small");
    tag.textContent = " " + e.label;
    mark.append(tag);
    p.append(mark);
    at = e.end;
  }
  p.append(document.createTextNode(text.slice(at)));
  out.append(p);
};

lorakit.tryPage = function (name, widget) {
  const api = "/api/runs/" + encodeURIComponent(name);
  const fail = (e) => { document.getElementById("try-error").textContent = e.message; };
  const ok = () => { document.getElementById("try-error").textContent = ""; };
  document.addEventListener("DOMContentLoaded", () => {
    const textForm = document.getElementById("text-form");
    if (textForm) textForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = document.getElementById("text").value;
      lorakit.post(api + "/predict", { inputs: [text], top_k: 10 }).then((d) => {
        ok();
        if (widget === "text-spans") lorakit.spans(text, d.predictions); else lorakit.bars(d.predictions);
      }, fail);
    });
    const chatForm = document.getElementById("chat-form");
    if (chatForm) chatForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      document.getElementById("answer-adapter").textContent = "…";
      document.getElementById("answer-base").textContent = "…";
      lorakit.post(api + "/chat", { message: document.getElementById("message").value }).then((d) => {
        ok();
        document.getElementById("answer-adapter").textContent = d.adapter;
        document.getElementById("answer-base").textContent = d.base;
      }, fail);
    });
    const drop = document.getElementById("drop");
    if (drop) {
      const send = (file) => {
        const reader = new FileReader();
        reader.onload = () => {
          document.getElementById("preview").src = reader.result;
          lorakit.post(api + "/predict", { inputs: [reader.result], top_k: 10 }).then((d) => { ok(); lorakit.bars(d.predictions); }, fail);
        };
        reader.readAsDataURL(file);
      };
      drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
      drop.addEventListener("dragleave", () => drop.classList.remove("over"));
      drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
      document.getElementById("image").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); });
    }
  });
};

// The new-run form: the page opens on its summary (problems, or the valid message and check output),
// a link to a field opens the "advanced" part it sits in, and the data preview follows data.* fields.
lorakit.reveal = function (id) {
  const el = document.getElementById(id);
  if (!el) return;
  for (let d = el.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  el.scrollIntoView({ block: "center" });
  el.focus();
};

lorakit.newPage = function () {
  document.addEventListener("DOMContentLoaded", () => {
    const top = document.getElementById("summary") || document.getElementById("result") || document.getElementById("check");
    if (top) top.scrollIntoView({ block: "start" });
    document.querySelectorAll('#summary a[href^="#f-"]').forEach((a) => a.addEventListener("click", (e) => {
      e.preventDefault();
      lorakit.reveal(a.getAttribute("href").slice(1));
    }));
    const form = document.getElementById("run-form"), box = document.getElementById("preview");
    if (!form || !box) return;
    let asked = 0;
    const refresh = () => {
      const mine = ++asked;
      fetch("/new/preview", { method: "POST", body: new FormData(form) }).then((r) => r.text()).then((html) => {
        if (mine === asked) box.innerHTML = html;
      });
    };
    form.querySelectorAll('[name^="data."]').forEach((el) => el.addEventListener("change", refresh));
    const train = form.querySelector('[name="data.train"]');
    if (train && train.value && !box.innerHTML.trim()) refresh();
  });
};
