// FasterDiffusion step editor for AUTOMATIC1111 / Forge: fills every `.fd-webui-editor` container (the
// txt2img/img2img accordion and the FasterDiffusion tab) with one cell per sampling step, presets, the
// predicted cost and JSON copy/paste.  The rules are web/js/strategy.js, the very file the ComfyUI widget
// uses (served by the extension at /fasterdiffusion/strategy.js).  The strategy textbox stays the value
// that is sent, saved and written to the infotext: without this script everything still works by typing.

const app = () => (typeof gradioApp === "function" ? gradioApp() : document);

async function loadRules() {
  const candidates = [new URL("../web/js/strategy.js", import.meta.url).href,
                      new URL("fasterdiffusion/strategy.js", document.baseURI).href];
  for (const url of candidates) {
    try { return await import(url); } catch (e) { /* the next one */ }
  }
  throw new Error("FasterDiffusion: could not load strategy.js");
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, attrs);
  for (const c of children) e.append(c);
  return e;
}

function setInput(input, value) {
  input.value = value;
  input.dispatchEvent(new Event("input", { bubbles: true }));
  input.dispatchEvent(new Event("change", { bubbles: true }));
}

function attach(S, root) {
  if (root.dataset.fdReady) return;
  const strategyBox = () => app().querySelector(`#${root.dataset.strategyId} textarea, #${root.dataset.strategyId} input`);
  const stepsBox = () => app().querySelector(`#${root.dataset.stepsId} input[type=number], #${root.dataset.stepsId} input`);
  if (!strategyBox()) return;
  root.dataset.fdReady = "1";
  const cells = el("div", { className: "fd-cells" });
  const info = el("div", { className: "fd-info" });
  const msg = el("div", { className: "fd-msg" });
  const kInput = el("input", { type: "number", min: 1, max: 100, value: 4, className: "fd-k", title: "K for uniform:K" });
  const share = el("textarea", { className: "fd-share", hidden: true, placeholder: "Strategy JSON: Copy fills this in; paste one and press Use" });
  const button = (label, title, onclick) => el("button", { textContent: label, title, onclick, className: "fd-button", type: "button" });
  root.replaceChildren(
    el("div", { className: "fd-row" },
      button("paper", "The paper's key steps: dense early, sparse late", () => set("paper")),
      button("uniform", "Every K-th step is a key step", () => set(`uniform:${Math.max(1, kInput.valueAsNumber || 1)}`)), kInput,
      button("all", "Every step is a key step: identical to FasterDiffusion off", () => set("all")),
      button("Copy", "Put this strategy into a small JSON document (the ComfyUI widget's format)", copyJson),
      button("Paste…", "Show a box to paste a strategy JSON document into", () => { share.hidden = !share.hidden; }),
      button("Use", "Use the strategy JSON pasted in the box", useJson)),
    cells, info, msg, share);

  let last = "";
  const steps = () => { const v = Number(stepsBox()?.value); return Number.isInteger(v) && v > 0 ? Math.min(v, 1000) : 20; };
  function render(force = false) {
    const text = strategyBox()?.value ?? "paper";
    const n = steps();
    if (!force && `${text}|${n}` === last) return;
    last = `${text}|${n}`;
    let keys;
    try { keys = S.keySteps(text, n); msg.textContent = ""; }
    catch (e) { cells.replaceChildren(); info.textContent = ""; msg.textContent = `Invalid strategy: ${e.message}`; return; }
    const starts = new Set(S.groups(keys, n).map((g) => g[0]));
    cells.replaceChildren(...Array.from({ length: n }, (_, i) => el("div", {
      className: `fd-cell${keys.includes(i) ? " fd-key" : ""}${i > 0 && starts.has(i) ? " fd-group-start" : ""}`,
      title: `step ${i}: ${keys.includes(i) ? "key (encoder runs)" : "propagated (decoder only)"} (click to toggle)`,
      onclick: () => toggle(i, keys, n) })));
    const cost = S.predictedCost(keys, n);
    info.textContent = `${keys.length} of ${n} steps run the encoder · groups ${S.groups(keys, n).map((g) => g.length).join(" ")} · ` +
      `UNet FLOPs ${Math.round(cost.flops * 100)}% · SD1.5 GPU time with parallel decoders ≈ ${Math.round(cost.gpu * 100)}% ` +
      `(${(1 / cost.gpu).toFixed(1)}× faster)`;
  }
  function set(text) {
    try { S.parseStrategy(text); } catch (e) { msg.textContent = `Invalid strategy: ${e.message}`; return; }
    setInput(strategyBox(), text);
    render(true);
  }
  function toggle(i, keys, n) {
    if (i === 0) { msg.textContent = "Step 0 is always a key step: nothing is cached before it."; return; }
    const next = keys.includes(i) ? keys.filter((k) => k !== i) : [...keys, i].sort((a, b) => a - b);
    set(S.strategyFor(next, n));
  }
  function copyJson() {
    try {
      const doc = JSON.stringify(S.toShareable(strategyBox().value, steps()), null, 1);
      share.value = doc; share.hidden = false;
      navigator.clipboard?.writeText(doc).catch(() => {});
    } catch (e) { msg.textContent = `Invalid strategy: ${e.message}`; }
  }
  function useJson() {
    try { set(S.fromShareable(share.value)); share.hidden = true; }
    catch (e) { msg.textContent = `Not used: ${e.message}`; }
  }
  render(true);
  setInterval(render, 400);     // values also change from Python (paste, presets, XYZ restore)
}

let rules = null;
async function scan() {
  rules ??= await loadRules();
  for (const root of app().querySelectorAll(".fd-webui-editor")) attach(rules, root);
}

const whenLoaded = typeof onUiLoaded === "function" ? onUiLoaded : (cb) => window.addEventListener("load", cb);
whenLoaded(() => { scan(); setInterval(scan, 2000); });
