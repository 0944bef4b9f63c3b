// FasterDiffusion strategy editor: a row of step cells under the `strategy` input of the FasterDiffusion
// nodes.  The STRING widget stays the saved value (so workflows and API prompts work without this file);
// the editor only reads and writes it.
import { app } from "../../../scripts/app.js";   // served at /extensions/<pack>/js/
import { StrategyError, fromShareable, groups, keySteps, parseStrategy, predictedCost, strategyFor,
         toShareable } from "./strategy.js";

const FD_NODES = new Set(["FasterDiffusionApply", "FasterDiffusionSampler", "FasterDiffusionKSampler",
                              "FasterDiffusionCompare"]);
const DEFAULT_STEPS = 20;

const CSS = `
.fd-editor { font: 11px sans-serif; color: var(--input-text, #ddd); display: flex; flex-direction: column; gap: 4px; padding: 2px 4px; box-sizing: border-box; }
.fd-editor .fd-row { display: flex; gap: 4px; align-items: center; flex-wrap: wrap; }
.fd-editor button { font: 11px sans-serif; padding: 1px 6px; cursor: pointer; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #555; border-radius: 3px; }
.fd-editor input[type=number] { width: 42px; font: 11px sans-serif; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #555; }
.fd-editor .fd-cells { display: flex; gap: 1px; height: 18px; }
.fd-editor .fd-cell { flex: 1 1 0; min-width: 2px; background: #3b4a5a; cursor: pointer; border-radius: 1px; }
.fd-editor .fd-cell.fd-key { background: #e8a33d; }
.fd-editor .fd-cell.fd-group-start { margin-left: 3px; }
.fd-editor .fd-info { opacity: 0.85; }
.fd-editor .fd-msg { color: #f88; min-height: 0; }
.fd-editor textarea { width: 100%; height: 54px; font: 10px monospace; background: var(--comfy-input-bg, #222); color: inherit; }
`;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, attrs);
  for (const c of children) e.append(c);
  return e;
}

function linkOf(graph, id) {
  return graph?.links?.get?.(id) ?? graph?.links?.[id];
}

function stepsWidgetValue(node) {
  const w = node?.widgets?.find((w) => w.name === "steps");
  return w && Number.isInteger(w.value) ? w.value : null;
}

// The step count of the sampler this node feeds, where the graph tells it.
function connectedSteps(node) {
  const own = stepsWidgetValue(node);
  if (own) return own;
  const graph = node.graph ?? app.graph;
  for (const out of node.outputs ?? []) {
    for (const id of out.links ?? []) {
      const target = graph.getNodeById(linkOf(graph, id)?.target_id);
      const direct = stepsWidgetValue(target);
      if (direct) return direct;
      const sigmasInput = target?.inputs?.find((i) => i.name === "sigmas");   // SamplerCustom <- a scheduler
      const source = sigmasInput?.link != null ? graph.getNodeById(linkOf(graph, sigmasInput.link)?.origin_id) : null;
      const viaScheduler = stepsWidgetValue(source);
      if (viaScheduler) return viaScheduler;
    }
  }
  return null;
}

function addStrategyEditor(node) {
  const strategy = node.widgets?.find((w) => w.name === "strategy");
  if (!strategy) return;
  node.properties ??= {};
  const cells = el("div", { className: "fd-cells" });
  const info = el("div", { className: "fd-info" });
  const msg = el("div", { className: "fd-msg" });
  const stepsInput = el("input", { type: "number", min: 1, max: 1000, title: "Steps to preview (no sampler with a steps value is connected)" });
  const kInput = el("input", { type: "number", min: 1, max: 100, value: 4, title: "K for uniform:K" });
  const share = el("textarea", { placeholder: "Strategy JSON: Copy fills this in; paste one here and press Use", hidden: true });
  const button = (label, title, onclick) => el("button", { textContent: label, title, onclick });
  const root = el("div", { className: "fd-editor" },
    el("div", { className: "fd-row" },
      button("paper", "The paper's key steps: dense early, sparse late", () => set("paper")),
      button("uniform", "Every K-th step is a key step", () => set(`uniform:${Math.max(1, kInput.valueAsNumber || 1)}`)), kInput,
      button("all", "Every step is a key step: identical to no FasterDiffusion", () => set("all")),
      el("span", { textContent: " steps" }), stepsInput),
    cells, info, msg,
    el("div", { className: "fd-row" },
      button("Copy", "Copy this strategy as a small JSON document", copyJson),
      button("Paste…", "Show a box to paste a strategy JSON document into", () => { share.hidden = !share.hidden; }),
      button("Use", "Use the strategy JSON pasted in the box", useJson)),
    share);

  let lastKey = "";
  function stepCount() {
    const connected = connectedSteps(node);
    stepsInput.disabled = connected != null;
    return connected ?? (node.properties.fd_preview_steps || DEFAULT_STEPS);
  }
  function render(force = false) {
    root.dataset.nodeId = node.id;     // ids are assigned when the node joins a graph, after creation
    const n = stepCount();
    const propagation = node.widgets?.find((w) => w.name === "propagation")?.value ?? "reuse";
    const key = `${strategy.value}|${n}|${propagation}`;
    if (!force && key === lastKey) return;
    lastKey = key;
    stepsInput.value = n;
    let keys;
    try { keys = keySteps(strategy.value, n); msg.textContent = ""; }
    catch (e) { cells.replaceChildren(); info.textContent = ""; msg.textContent = `Invalid strategy: ${e.message}`; return; }
    const starts = new Set(groups(keys, n).map((g) => g[0]));
    cells.replaceChildren(...Array.from({ length: n }, (_, i) => el("div", {
      className: `fd-cell${keys.includes(i) ? " fd-key" : ""}${i > 0 && starts.has(i) ? " fd-group-start" : ""}`,
      title: `step ${i}: ${keys.includes(i) ? "key (encoder runs)" : `propagated (decoder only, ${propagation === "forecast" ? "forecast" : "reused"} features)`} — click to toggle`,
      onclick: () => toggle(i, keys, n) })));
    const cost = predictedCost(keys, n);
    const sizes = groups(keys, n).map((g) => g.length);
    info.textContent = `${keys.length} of ${n} steps run the encoder · groups ${sizes.join(" ")} · UNet FLOPs ` +
      `${Math.round(cost.flops * 100)}% · SD1.5 GPU time with parallel decoders ≈ ${Math.round(cost.gpu * 100)}% ` +
      `(${(1 / cost.gpu).toFixed(1)}× faster) · non-key steps: ` +
      (propagation === "forecast" ? "features forecast from the last two key steps" : "the last key step's features reused");
  }
  function set(text) {
    try { parseStrategy(text); } catch (e) { msg.textContent = `Invalid strategy: ${e.message}`; return false; }
    strategy.value = text;
    strategy.callback?.(text);
    node.setDirtyCanvas?.(true, true);
    render(true);
    return true;
  }
  function toggle(i, keys, n) {
    if (i === 0) { msg.textContent = "Step 0 is always a key step: nothing is cached before it."; return; }
    const next = keys.includes(i) ? keys.filter((k) => k !== i) : [...keys, i].sort((a, b) => a - b);
    set(strategyFor(next, n));
  }
  function copyJson() {
    let doc;
    try { doc = toShareable(strategy.value, stepCount(), node.title); } catch (e) { msg.textContent = `Invalid strategy: ${e.message}`; return; }
    share.value = JSON.stringify(doc, null, 1);
    share.hidden = false;
    navigator.clipboard?.writeText(share.value).catch(() => {});
  }
  function useJson() {
    try { set(fromShareable(share.value)); share.hidden = true; }
    catch (e) { msg.textContent = `Not a FasterDiffusion strategy: ${e instanceof StrategyError ? e.message : e}`; }
  }
  stepsInput.onchange = () => { node.properties.fd_preview_steps = Math.max(1, stepsInput.valueAsNumber || DEFAULT_STEPS); render(true); };

  const widget = node.addDOMWidget("strategy_editor", "FD_STRATEGY_EDITOR", root, {
    serialize: false,                  // never shifts the node's saved widgets_values
    getMinHeight: () => 96,
    getValue: () => strategy.value,
    setValue: () => {},
  });
  widget.serialize = false;
  const poll = setInterval(() => render(), 400);   // sampler steps or the strategy text changed elsewhere
  const onRemoved = node.onRemoved;
  node.onRemoved = function () { clearInterval(poll); return onRemoved?.apply(this, arguments); };
  const strategyCallback = strategy.callback;
  strategy.callback = function () { const r = strategyCallback?.apply(this, arguments); render(true); return r; };
  render(true);
}

app.registerExtension({
  name: "FasterDiffusion.StrategyEditor",
  setup() {
    document.head.append(el("style", { textContent: CSS }));
    window.__fasterDiffusionEditor = true;   // tests wait for this
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!FD_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      addStrategyEditor(this);
      return r;
    };
  },
});
