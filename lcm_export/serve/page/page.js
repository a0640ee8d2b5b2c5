// The lcm-export playground: reads GET entry, sends POST generate (the JSON API), shows the image, the
// runtime's per-stage times and the server's one-line errors. Data goes into the page with textContent and
// attributes only (never as markup); requests go to this origin only, under the page's own route prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const url = (path) => new URL(path, document.baseURI).href;
  const JSON_NUMBER = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$/;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function showError(message, status) {
    const e = $("error");
    e.textContent = message;
    e.dataset.status = String(status);
    e.hidden = false;
  }

  function clearError() {
    const e = $("error");
    e.textContent = "";
    delete e.dataset.status;
    e.hidden = true;
  }

  // The server's message: {"error": "<one line>"}; anything else (a proxy's page) as its first line.
  async function errorOf(resp) {
    let text = "";
    try { text = await resp.text(); } catch (_) { /* no body */ }
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
    } catch (_) { /* not JSON */ }
    const first = text.trim().split("\n")[0].slice(0, 300);
    return `HTTP ${resp.status}${first ? ": " + first : ""}`;
  }

  // A form field as a JSON value, exactly as typed where it is a JSON number (a seed past 2^53 stays exact);
  // other text goes as a JSON string, so the server's type check names it. Empty: left out (the default).
  function numberJson(text) {
    const t = text.trim();
    if (t === "") return undefined;
    if (JSON_NUMBER.test(t)) return t;
    const n = Number(t);
    return Number.isFinite(n) ? JSON.stringify(n) : JSON.stringify(t);
  }

  function objectJson(pairs) {
    return "{" + pairs.filter(([, v]) => v !== undefined).map(([k, v]) => JSON.stringify(k) + ":" + v).join(",") + "}";
  }

  function requestBody(entry) {
    const pairs = [["prompt", JSON.stringify($("prompt").value)]];
    const negative = $("negative_prompt").value;
    if (negative !== "") pairs.push(["negative_prompt", JSON.stringify(negative)]);
    for (const id of ["seed", "steps", "guidance"]) pairs.push([id, numberJson($(id).value)]);
    const size = $("size").value.split("x");
    if (size.length === 2) pairs.push(["height", numberJson(size[0])], ["width", numberJson(size[1])]);
    const weights = [];
    for (const input of document.querySelectorAll("#adapter-list input")) {
      const v = numberJson(input.value);
      if (v !== undefined && Number(v) !== 0) weights.push([input.dataset.adapter, v]);
    }
    if (entry && entry.adapter_branches && weights.length) pairs.push(["adapters", objectJson(weights)]);
    pairs.push(["response_format", JSON.stringify("json")]);
    return objectJson(pairs);
  }

  function summaryRow(dl, key, value) {
    dl.append(el("dt", key), el("dd", value));
  }

  function showEntry(entry) {
    const dl = $("summary");
    dl.replaceChildren();
    summaryRow(dl, "name", entry.name);
    summaryRow(dl, "family", entry.family);
    summaryRow(dl, "backend", `${entry.backend} (${entry.device})`);
    summaryRow(dl, "precision", entry.precision);
    summaryRow(dl, "preset", entry.preset);
    if (entry.preset_trades) dl.lastChild.title = entry.preset_trades;
    summaryRow(dl, "sizes (HxW)", entry.resolutions.join(", "));
    summaryRow(dl, "batch", `${entry.batch} (guidance shapes: ${entry.guidance})`);
    summaryRow(dl, "adapters", entry.adapter_branches ? (entry.adapters.join(", ") || "none added yet") : "no adapter branches");
    $("demo-note").hidden = !entry.demo;
    $("headline").textContent = `${entry.name}: ${entry.family}, ${entry.backend} ${entry.precision}, preset ${entry.preset}`;
    document.title = `${entry.name} · lcm-export playground`;

    const size = $("size");
    size.replaceChildren();
    for (const r of entry.resolutions) {
      const o = el("option", r);
      o.value = r;
      o.selected = r === entry.default_resolution;
      size.append(o);
    }
    const lim = entry.limits || {};
    if (lim.steps) { $("steps").min = lim.steps[0]; $("steps").max = lim.steps[1]; }
    if (lim.guidance) { $("guidance").min = lim.guidance[0]; $("guidance").max = lim.guidance[1]; }

    const list = $("adapter-list");
    list.replaceChildren();
    for (const name of entry.adapters) {
      const id = "adapter-" + list.children.length;
      const row = el("div", undefined, "adapter");
      const label = el("label", name);
      label.htmlFor = id;
      const input = el("input");
      input.id = id;
      input.type = "number";
      input.step = "0.1";
      input.value = "0";
      input.dataset.adapter = name;
      if (lim.adapter_weight) { input.min = lim.adapter_weight[0]; input.max = lim.adapter_weight[1]; }
      row.append(label, input);
      list.append(row);
    }
    $("adapters").hidden = entry.adapters.length === 0;
    const none = $("no-adapters");
    none.hidden = entry.adapters.length > 0;
    none.textContent = entry.adapter_branches
      ? "This entry takes style adapters, but holds none yet (lcm-export adapter add)."
      : "This entry has no adapter branches (build with --adapters to use style adapters).";
  }

  const STAGES = [["tokenize", "tokenize"], ["text_encoder", "text encoder"], ["unet_steps", "UNet step"],
                  ["scheduler", "LCM scheduler (numpy)"], ["vae_input", "VAE input"], ["vae_decoder", "VAE decoder"],
                  ["postprocess", "post-process"], ["total", "runtime total"]];

  function ms(v) {
    return typeof v === "number" && Number.isFinite(v) ? (v < 10 ? v.toFixed(2) : v.toFixed(1)) : "–";
  }

  function showTimings(reply, roundTripMs) {
    const body = $("timings-body");
    body.replaceChildren();
    const add = (name, value, cls) => {
      const tr = el("tr", undefined, cls);
      tr.append(el("th", name), el("td", ms(value)));
      body.append(tr);
    };
    const s = reply.stages_ms || {};
    for (const [key, name] of STAGES) {
      if (Array.isArray(s[key])) s[key].forEach((v, i) => add(`${name} ${i + 1}`, v));
      else if (key in s) add(name, s[key], key === "total" ? "sum" : undefined);
    }
    add("engine call (server)", reply.runtime_ms, "sum");
    add("round trip (this browser)", roundTripMs, "sum");
    $("timings").hidden = false;
  }

  async function generate(entry) {
    clearError();
    const button = $("generate");
    button.disabled = true;
    $("busy").hidden = false;
    const t0 = performance.now();
    try {
      const resp = await fetch(url("generate"), {
        method: "POST", mode: "same-origin", credentials: "same-origin", cache: "no-store",
        headers: {"Content-Type": "application/json", "Accept": "application/json"}, body: requestBody(entry),
      });
      if (!resp.ok) {
        showError(await errorOf(resp), resp.status);
        return;
      }
      const reply = await resp.json();
      const roundTrip = performance.now() - t0;
      const img = $("image");
      await new Promise((resolve, reject) => {
        img.onload = resolve;
        img.onerror = () => reject(new Error("the image could not be decoded"));
        img.src = "data:image/png;base64," + reply.images[0];
      });
      $("figure").hidden = false;
      $("placeholder").hidden = true;
      $("caption").textContent = `${reply.height}x${reply.width} (HxW), seed ${reply.seed}` +
        (reply.call_batch > 1 ? `, merged with other requests into one call of ${reply.call_batch} images` : "");
      showTimings(reply, roundTrip);
      document.body.dataset.generated = String(Number(document.body.dataset.generated || 0) + 1);
    } catch (e) {
      showError(`the request failed: ${e && e.message ? e.message : e}`, 0);
    } finally {
      button.disabled = false;
      $("busy").hidden = true;
    }
  }

  async function start() {
    let entry = null;
    try {
      const resp = await fetch(url("entry"), {mode: "same-origin", credentials: "same-origin", cache: "no-store",
                                              headers: {"Accept": "application/json"}});
      if (!resp.ok) {
        showError(await errorOf(resp), resp.status);
        return;
      }
      entry = await resp.json();
      showEntry(entry);
    } catch (e) {
      showError(`the entry could not be read: ${e && e.message ? e.message : e}`, 0);
      return;
    }
    $("form").addEventListener("submit", (ev) => { ev.preventDefault(); generate(entry); });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("form").requestSubmit(); }
    });
    $("generate").disabled = false;
    document.body.dataset.ready = "1";
  }

  start();
})();
