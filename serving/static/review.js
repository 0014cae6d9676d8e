// spamlingo review page (serving/review.py). Plain JavaScript, no dependencies, no build step.
//
// Messages are untrusted: every piece of text reaches the DOM through textContent or createElement, never
// innerHTML, and the page's Content-Security-Policy forbids inline script besides.
"use strict";

(function () {
  const MAX_MESSAGES = 100; // per run
  const BATCH = 16; // texts per request: the server's default --explain-max-texts
  const KEY_STORAGE = "spamlingo.apiKey";
  const LANG_ATTR = { zh: "zh", ja: "ja", ko: "ko", en: "en" };

  const $ = (id) => document.getElementById(id);
  const form = $("classify-form");
  const textarea = $("messages");
  const fileInput = $("file");
  const fileInfo = $("file-info");
  const fileSummary = $("file-summary");
  const keyInput = $("api-key");
  const submitButton = $("submit");
  const statusLine = $("status");
  const results = $("results");

  let fileMessages = null; // messages of the loaded file, or null: the textarea is used

  // ------------------------------------------------------------------ DOM helpers (text only)

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else node.setAttribute(k, v);
      }
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  // ------------------------------------------------------------------ API key (sessionStorage)

  function loadKey() {
    try {
      keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (e) {
      /* storage disabled: the field still works for this page */
    }
  }

  function saveKey() {
    try {
      if (keyInput.value) sessionStorage.setItem(KEY_STORAGE, keyInput.value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) {
      /* storage disabled */
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "application/json" };
    const key = keyInput.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ------------------------------------------------------------------ API calls

  // -> {status, ok, body (parsed JSON or null), error: {kind, message} | null}
  async function post(path, payload) {
    let response;
    try {
      response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(payload) });
    } catch (e) {
      return { status: 0, ok: false, body: null, error: { kind: "network", message: "could not reach the server (" + e.message + ")" } };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    let error = null;
    if (!response.ok) {
      const detail = body && body.error && typeof body.error === "object" ? body.error : {};
      error = {
        kind: typeof detail.kind === "string" ? detail.kind : "http_" + response.status,
        message: typeof detail.message === "string" ? detail.message : response.statusText || "request failed",
      };
    }
    return { status: response.status, ok: response.ok, body: body, error: error };
  }

  function describeError(r) {
    if (r.status === 401) return "401 unauthorized: the API key is missing or wrong (enter the server's --api-key above). " + r.error.message;
    if (r.status === 0) return r.error.message;
    return r.status + " " + r.error.kind + ": " + r.error.message;
  }

  // A per-text refusal fails the whole request: such a batch is retried one text at a time.
  const PER_TEXT = new Set(["text_too_long", "empty_text", "invalid_unicode", "invalid_request"]);

  async function classifyAll(texts, onResults) {
    let size = BATCH; // lowered for good when the server's limits are lower than the defaults
    let oneByOneUntil = 0; // texts before this index go one per request (a batch a text of it failed)
    let i = 0;
    let model = null;
    while (i < texts.length) {
      const chunk = texts.slice(i, i + (i < oneByOneUntil ? 1 : size));
      const r = await post("v1/classify", { texts: chunk, explain: true });
      if (r.ok && r.body && Array.isArray(r.body.results) && r.body.results.length === chunk.length) {
        model = r.body.model || model;
        onResults(i, chunk, r.body.results, null);
        i += chunk.length;
        continue;
      }
      if (r.ok) return { model: model, fatal: "unexpected response from /v1/classify" };
      if (r.status === 413 && r.error.kind === "too_many_texts" && chunk.length > 1) {
        size = Math.max(1, Math.floor(chunk.length / 2));
        continue;
      }
      if (PER_TEXT.has(r.error.kind) && chunk.length > 1) {
        oneByOneUntil = i + chunk.length;
        continue;
      }
      if (PER_TEXT.has(r.error.kind) || r.error.kind === "too_many_texts") {
        onResults(i, chunk, null, describeError(r));
        i += chunk.length;
        continue;
      }
      return { model: model, fatal: describeError(r) }; // 401, 503, network...: the rest would fail alike
    }
    return { model: model, fatal: null };
  }

  // ------------------------------------------------------------------ highlighting

  // utf16[i] = the UTF-16 index of code point i (the server's offsets are Python str indices, code points;
  // a JavaScript string counts an emoji or an astral ideograph as two units); utf16[n] = text.length.
  function codePointOffsets(text) {
    const utf16 = [];
    let u = 0;
    for (const ch of text) {
      utf16.push(u);
      u += ch.length;
    }
    utf16.push(u);
    return utf16;
  }

  // 3 decimals; effects under 0.001 with 2 significant digits instead of a misleading 0.000
  function magnitude(x) {
    const a = Math.abs(x);
    return a === 0 ? "0" : a >= 0.001 ? a.toFixed(3) : a.toPrecision(2);
  }

  function effectText(effect) {
    const sign = effect > 0 ? "+" : effect < 0 ? "\u2212" : "\u00b1";
    return sign + magnitude(effect);
  }

  function spanTitle(effect) {
    if (effect > 0) return "raised p(spam) by " + magnitude(effect);
    if (effect < 0) return "lowered p(spam) by " + magnitude(effect);
    return "no effect on p(spam)";
  }

  function validSpans(text, spans) {
    const n = codePointOffsets(text).length - 1;
    return spans.filter(
      (s) => s && Number.isInteger(s.start) && Number.isInteger(s.end) && typeof s.effect === "number" &&
        s.start >= 0 && s.start < s.end && s.end <= n
    );
  }

  // The text with its spans as <mark> elements; overlapping spans (none from this server) keep the first.
  function highlighted(text, spans) {
    const utf16 = codePointOffsets(text);
    const out = document.createDocumentFragment();
    const maxAbs = Math.max(0.02, ...spans.map((s) => Math.abs(s.effect)));
    let pos = 0;
    for (const s of [...spans].sort((a, b) => a.start - b.start)) {
      if (s.start < pos) continue;
      if (s.start > pos) out.append(document.createTextNode(text.slice(utf16[pos], utf16[s.start])));
      const kind = s.effect > 0 ? "raise" : s.effect < 0 ? "lower" : "zero";
      const mark = el("mark", { class: "span " + kind, title: spanTitle(s.effect), dataset: { effect: String(s.effect) } });
      mark.textContent = text.slice(utf16[s.start], utf16[s.end]);
      const alpha = (0.12 + 0.6 * Math.min(1, Math.abs(s.effect) / maxAbs)).toFixed(3);
      // CSSOM, not a style attribute: allowed by the page's style-src 'self'
      if (kind === "raise") mark.style.backgroundColor = "rgba(220, 38, 38, " + alpha + ")";
      else if (kind === "lower") mark.style.backgroundColor = "rgba(22, 163, 74, " + alpha + ")";
      out.append(mark);
      pos = s.end;
    }
    if (pos < utf16.length - 1) out.append(document.createTextNode(text.slice(utf16[pos])));
    return out;
  }

  function spanTable(text, spans) {
    const utf16 = codePointOffsets(text);
    const body = el("tbody");
    for (const s of spans) { // the server's order: |effect| descending
      const kind = s.effect > 0 ? "raise" : s.effect < 0 ? "lower" : "zero";
      body.append(el("tr", null,
        el("td", { class: "text", text: text.slice(utf16[s.start], utf16[s.end]) }),
        el("td", { class: "effect " + kind, text: effectText(s.effect) })));
    }
    return el("table", { class: "spans" },
      el("thead", null, el("tr", null, el("th", { scope: "col", text: "span" }), el("th", { scope: "col", text: "effect on p(spam)" }))),
      body);
  }

  // ------------------------------------------------------------------ results

  function fact(name, value, cls) {
    return el("div", null, el("dt", { text: name }), el("dd", { class: cls, text: value }));
  }

  function thresholdText(r) {
    const scope = typeof r.threshold_scope === "string" ? r.threshold_scope : "global";
    const where = scope.startsWith("lang:") ? scope.slice(5) + "'s own" : "global";
    return Number(r.threshold).toFixed(3) + " (" + where + ")";
  }

  function messageBlock(lang) {
    const p = el("p", { class: "message" });
    if (LANG_ATTR[lang]) p.lang = LANG_ATTR[lang];
    return p;
  }

  function renderResult(index, text, r) {
    const label = r.label === "spam" ? "spam" : "ham";
    const item = el("li", { class: "result " + label, dataset: { label: label, index: String(index) } });
    const probability = Number(r.spam_probability);
    item.append(el("dl", { class: "facts" },
      fact("#", String(index + 1), "index"),
      fact("verdict", label, "verdict"),
      fact("p(spam)", probability.toFixed(3), "probability"),
      fact("language", String(r.lang), "lang"),
      fact("threshold", thresholdText(r), "threshold")));
    if (r.truncated) {
      item.append(el("p", { class: "note warn", text: "Truncated: the model read only the start (and end) of this text." }));
    }

    const message = messageBlock(r.lang);
    const explanation = r.explanation;
    if (explanation && Array.isArray(explanation.spans)) {
      const spans = validSpans(text, explanation.spans);
      message.append(highlighted(text, spans));
      item.append(message);
      if (spans.length) {
        const how = typeof explanation.method === "string" ? " (" + explanation.method + ")" : "";
        const details = el("details", { class: "why" },
          el("summary", { text: "Why: " + spans.length + " span" + (spans.length === 1 ? "" : "s") + how }));
        details.append(spanTable(text, spans));
        item.append(details);
      } else {
        item.append(el("p", { class: "note", text: "No part of this text changed the spam probability much." }));
      }
    } else {
      message.textContent = text;
      item.append(message);
      item.append(el("p", { class: "note explain-missing", text: "No explanation in the response (this server does not explain verdicts)." }));
    }

    item.append(feedbackControl(text, label));
    return item;
  }

  function renderFailure(index, text, why) {
    const item = el("li", { class: "result failed", dataset: { index: String(index) } });
    item.append(el("dl", { class: "facts" }, fact("#", String(index + 1), "index"), fact("verdict", "not classified", "verdict")));
    const message = messageBlock("");
    message.textContent = text;
    item.append(message, el("p", { class: "row-error", role: "alert", text: why }));
    return item;
  }

  // ------------------------------------------------------------------ feedback

  function feedbackControl(text, label) {
    const opposite = label === "spam" ? "ham" : "spam";
    const button = el("button", { type: "button", class: "secondary report", text: "Verdict is wrong: report as " + opposite });
    const outcome = el("span", { class: "outcome", role: "status", "aria-live": "polite" });
    button.addEventListener("click", async () => {
      button.disabled = true;
      outcome.className = "outcome";
      outcome.textContent = "Sending…";
      const r = await post("v1/feedback", { text: text, label: opposite });
      if (r.ok && r.body && typeof r.body.id === "number") {
        outcome.classList.add("ok");
        outcome.textContent = r.body.duplicate
          ? "Already reported as " + opposite + " (report #" + r.body.id + ")."
          : "Reported as " + opposite + " (report #" + r.body.id + "), thank you.";
        outcome.dataset.status = String(r.status);
        return;
      }
      outcome.classList.add("error");
      outcome.dataset.status = String(r.status);
      if (r.ok) outcome.textContent = "Unexpected response from /v1/feedback.";
      else if (r.status === 503 && r.error.kind === "feedback_disabled") outcome.textContent = "This server stores no feedback: " + r.error.message;
      else outcome.textContent = describeError(r);
      button.disabled = false;
    });
    return el("div", { class: "feedback" }, button, outcome);
  }

  // ------------------------------------------------------------------ input: textarea and files

  function textareaMessages() {
    const value = textarea.value;
    const split = form.querySelector('input[name="split"]:checked');
    if (split && split.value === "whole") return value.trim() ? [value] : [];
    return value.split(/\r\n|\r|\n/).filter((line) => line.trim());
  }

  function parseCsv(src) {
    const rows = [];
    let row = [];
    let field = "";
    let quoted = false;
    for (let i = 0; i < src.length; i++) {
      const c = src[i];
      if (quoted) {
        if (c === '"') {
          if (src[i + 1] === '"') { field += '"'; i++; } else quoted = false;
        } else field += c;
      } else if (c === '"' && field === "") quoted = true;
      else if (c === ",") { row.push(field); field = ""; }
      else if (c === "\n" || c === "\r") {
        if (c === "\r" && src[i + 1] === "\n") i++;
        row.push(field); rows.push(row); row = []; field = "";
      } else field += c;
    }
    if (field !== "" || row.length) { row.push(field); rows.push(row); }
    return rows;
  }

  // -> {messages, skipped, how}
  function parseFile(name, src) {
    src = src.replace(/^\ufeff/, "");
    const lower = name.toLowerCase();
    if (lower.endsWith(".jsonl") || lower.endsWith(".ndjson")) {
      const messages = [];
      let skipped = 0;
      for (const line of src.split(/\r\n|\r|\n/)) {
        if (!line.trim()) continue;
        try {
          const row = JSON.parse(line);
          if (row && typeof row === "object" && typeof row.text === "string" && row.text.trim()) messages.push(row.text);
          else skipped++;
        } catch (e) {
          skipped++;
        }
      }
      return { messages: messages, skipped: skipped, how: 'the "text" key of each line' };
    }
    if (lower.endsWith(".csv")) {
      const rows = parseCsv(src).filter((r) => r.some((cell) => cell.trim()));
      let column = 0;
      let how = "the first column";
      if (rows.length) {
        const header = rows[0].map((cell) => cell.trim().toLowerCase());
        const at = header.indexOf("text");
        if (at >= 0) { column = at; rows.shift(); how = 'the "text" column'; }
      }
      const messages = [];
      let skipped = 0;
      for (const r of rows) {
        const cell = r[column];
        if (typeof cell === "string" && cell.trim()) messages.push(cell);
        else skipped++;
      }
      return { messages: messages, skipped: skipped, how: how };
    }
    return { messages: src.split(/\r\n|\r|\n/).filter((line) => line.trim()), skipped: 0, how: "one message per line" };
  }

  async function onFile() {
    const file = fileInput.files && fileInput.files[0];
    if (!file) { clearFile(); return; }
    let parsed;
    try {
      parsed = parseFile(file.name, await file.text());
    } catch (e) {
      clearFile();
      setStatus("Could not read " + file.name + ": " + e.message, true);
      return;
    }
    fileMessages = parsed.messages;
    fileSummary.textContent = file.name + ": " + parsed.messages.length + " message" + (parsed.messages.length === 1 ? "" : "s") +
      " (" + parsed.how + (parsed.skipped ? "; " + parsed.skipped + " rows without text skipped" : "") + ").";
    fileInfo.hidden = false;
    setStatus("", false);
  }

  function clearFile() {
    fileMessages = null;
    fileInput.value = "";
    fileInfo.hidden = true;
    fileSummary.textContent = "";
  }

  // ------------------------------------------------------------------ submit

  async function onSubmit(event) {
    event.preventDefault();
    saveKey();
    let texts = fileMessages !== null ? fileMessages : textareaMessages();
    if (!texts.length) {
      setStatus(fileMessages !== null ? "The file holds no messages." : "Type or paste at least one message.", true);
      return;
    }
    let capped = "";
    if (texts.length > MAX_MESSAGES) {
      capped = " (the first " + MAX_MESSAGES + " of " + texts.length + ")";
      texts = texts.slice(0, MAX_MESSAGES);
    }
    results.replaceChildren();
    $("results-title").hidden = true;
    $("legend").hidden = true;
    submitButton.disabled = true;
    setStatus("Classifying " + texts.length + " message" + (texts.length === 1 ? "" : "s") + capped + "…", false);
    const counts = { spam: 0, ham: 0, failed: 0 };
    try {
      const done = await classifyAll(texts, (start, chunk, rows, why) => {
        $("results-title").hidden = false;
        chunk.forEach((text, k) => {
          if (rows) {
            counts[rows[k].label === "spam" ? "spam" : "ham"]++;
            results.append(renderResult(start + k, text, rows[k]));
            if (rows[k].explanation) $("legend").hidden = false;
          } else {
            counts.failed++;
            results.append(renderFailure(start + k, text, why));
          }
        });
      });
      const summary = counts.spam + " spam, " + counts.ham + " ham" + (counts.failed ? ", " + counts.failed + " not classified" : "");
      const m = done.model;
      const by = m && m.bundle ? " by " + m.bundle + " (" + m.variant + ", " + m.sha256 + ")" : "";
      if (done.fatal) setStatus("Error: " + done.fatal + (counts.spam + counts.ham ? " (so far: " + summary + ")" : ""), true);
      else setStatus(texts.length + " message" + (texts.length === 1 ? "" : "s") + capped + " classified" + by + ": " + summary + ".", counts.failed > 0);
    } finally {
      submitButton.disabled = false;
    }
  }

  loadKey();
  keyInput.addEventListener("input", saveKey);
  fileInput.addEventListener("change", onFile);
  $("file-clear").addEventListener("click", clearFile);
  form.addEventListener("submit", onSubmit);
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  document.documentElement.dataset.ready = "1"; // for tests: the script ran
})();
