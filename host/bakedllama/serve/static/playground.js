// The bakedllama playground: streams /v1/completions (server-sent events) into the page.
// No build step, no dependencies; everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null, sysClk = null, controller = null;

function fmt(x, digits = 1) {
  return x == null || !isFinite(x) ? "\u2013" : x.toLocaleString("en-US", { maximumFractionDigits: digits });
}

function setStatus(msg, isError = false) {
  $("status").textContent = msg;
  $("status").className = "status" + (isError ? " error" : "");
}

async function refreshHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    modelId = h.model;
    sysClk = h.sys_clk_freq;
    const clock = h.sys_clk_freq ? `, ${(h.sys_clk_freq / 1e6).toFixed(0)} MHz` : "";
    const where = h.device === "golden" ? h.board : `${h.board}${clock} \u00b7 ${h.device}`;
    $("device").textContent = h.status === "ok" ? `${h.model} (${h.identity}) on ${where}` : `device down: ${h.error}`;
    $("device").className = "device" + (h.status === "ok" ? "" : " down");
    $("s-queue").textContent = `${h.queue} / ${h.max_queue}`;
  } catch (e) {
    $("device").textContent = "server unreachable";
    $("device").className = "device down";
  }
}

function num(id) { return Number($(id).value); }

async function generate(ev) {
  ev.preventDefault();
  if (controller) return;
  if (!modelId) await refreshHealth();
  const prompt = $("prompt").value;
  $("out-prompt").textContent = prompt;
  $("out-text").textContent = "";
  for (const id of ["s-tokens", "s-tps", "s-cycles", "s-chip", "s-ttft"]) $(id).textContent = "\u2013";
  setStatus("waiting for the device\u2026");
  controller = new AbortController();
  document.body.classList.add("running");
  document.body.dataset.state = "running";
  $("go").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null, n = 0, cycSum = 0, cycN = 0;
  try {
    const r = await fetch("/v1/completions", {
      method: "POST", signal: controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: modelId, prompt, stream: true, max_tokens: num("max_tokens"),
                             temperature: num("temperature"), seed: num("seed") }),
    });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || `HTTP ${r.status}`);
    }
    setStatus("generating\u2026");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const d = JSON.parse(data);
          if (d.error) throw new Error(d.error.message);
          const c = d.choices && d.choices[0];
          if (!c) continue;
          $("out-text").textContent += c.text;
          const now = performance.now();
          if (c.token_ids && c.token_ids.length) {
            n += c.token_ids.length;
            if (tFirst === null) { tFirst = now; $("s-ttft").textContent = `${fmt((now - t0) / 1000, 2)} s`; }
            $("s-tokens").textContent = n;
            if (n > 1) $("s-tps").textContent = fmt((n - 1) / ((now - tFirst) / 1000));
          }
          const b = d.bakedllama || {};
          if (b.cycles) {
            cycSum += b.cycles; cycN += 1;
            $("s-cycles").textContent = fmt(cycSum / cycN, 0);
            if (sysClk) $("s-chip").textContent = fmt(sysClk * cycN / cycSum, 0);
          }
          if (c.finish_reason) {
            if (b.cycles_per_token) $("s-cycles").textContent = fmt(b.cycles_per_token, 0);
            if (b.chip_tokens_per_s) $("s-chip").textContent = fmt(b.chip_tokens_per_s, 0);
            if (!b.cycles_per_token) { $("s-cycles").textContent = "n/a"; $("s-chip").textContent = "n/a"; }
            setStatus(`${n} tokens, finished (${c.finish_reason}); ${fmt(b.tokens_per_s)} tokens/s from ` +
                      `request to last token, ${fmt(b.queued_s, 3)} s in the queue`);
            document.body.dataset.finish = c.finish_reason;
          }
        }
      }
    }
    document.body.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") { setStatus(`stopped after ${n} tokens (the device aborted it)`); document.body.dataset.state = "stopped"; }
    else { setStatus(e.message, true); document.body.dataset.state = "error"; }
  } finally {
    controller = null;
    document.body.classList.remove("running");
    $("go").disabled = false;
    $("stop").disabled = true;
    refreshHealth();
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  refreshHealth();
  setInterval(refreshHealth, 2000);
});
