// FasterDiffusion strategies in the browser: the same rules as fasterdiffusion/strategy.py (a test runs
// both on the same inputs and compares).  Pure functions, no ComfyUI imports.

export const PAPER_KEYS_50 = [0, 1, 2, 3, 5, 10, 15, 25, 35];

// DeepFloyd-IF's per-stage rules of the official code, as [native step count, key list there] (IF_PRESETS in
// strategy.py); at other step counts each key k moves to round(k * n / native).
const range = (n) => [...Array(n).keys()];
export const IF_PRESETS = {
  if1: [100, range(100).filter((i) => i < 10 || i > 85 || i % 5 === 0)],
  if2: [50, range(50).filter((i) => i < 20 || i > 40 || i % 2 === 0)],
  if3: [75, [0, 2, 5, 9, 14, 20, 27, 35, 44, 54, 65]],
};
const NAMES = ["paper", "all", ...Object.keys(IF_PRESETS)];

// Measured on an H100 with ComfyUI's SD1.5 UNet, eager fp16, 512x512, CFG (shared/docs/gpu.md): ms per
// call of the full UNet, of encoder+middle, and of one decoder batch holding w steps.
const GPU_MS = { full: 34.6, encoder: 14.5, decoder: [[1, 19.3], [2, 20.0], [4, 23.6], [5, 26.1], [8, 34.6], [10, 41.1], [15, 58.1]] };
export const ENCODER_FLOP_SHARE = 0.31;   // SD1.5: encoder + middle = 31 % of UNet FLOPs (paper Table 10)

export class StrategyError extends Error {}

// The same reading as Python's parse_strategy, character for character: ASCII whitespace, ASCII case,
// digits 0-9 only, numbers up to MAX_STEP, and at most ECHO_CHARS of the input quoted in a message.
export const MAX_STEP = 100000;
const ECHO_CHARS = 60;
const SPACE = "[ \\t\\n\\r\\f\\v]";
const TRIM = new RegExp(`^${SPACE}+|${SPACE}+$`, "g");
const UNIFORM = new RegExp(`^uniform${SPACE}*:${SPACE}*([0-9]+)$`);
const INDEX = /^[0-9]+$/;

export function shorten(text) {
  const chars = Array.from(text);   // code points, as Python counts
  return chars.length <= ECHO_CHARS ? text : chars.slice(0, ECHO_CHARS).join("") + "…";
}

function index(digits, tooBig) {
  const significant = digits.replace(/^0+/, "") || "0";
  if (significant.length > String(MAX_STEP).length || Number(significant) > MAX_STEP) throw new StrategyError(tooBig);
  return Number(significant);
}

export function parseStrategy(text) {
  const s = String(text ?? "").replace(TRIM, "").replace(/[A-Z]+/g, (m) => m.toLowerCase());
  if (NAMES.includes(s)) return { kind: s };
  if (s.startsWith("uniform")) {
    const m = UNIFORM.exec(s);
    if (!m) throw new StrategyError("uniform needs a whole number, e.g. uniform:4");
    const k = index(m[1], `uniform:K needs K <= ${MAX_STEP}`);
    if (k < 1) throw new StrategyError("uniform:K needs K >= 1");
    return { kind: "uniform", every: k };
  }
  const steps = new Set();
  for (const raw of s.replace(/;/g, ",").split(",")) {
    const part = raw.replace(TRIM, "");
    if (!INDEX.test(part)) throw new StrategyError(`'${shorten(part)}' is neither a known name nor a step index`);
    steps.add(index(part, `step '${shorten(part)}' is beyond any real step count (at most ${MAX_STEP})`));
  }
  const sorted = [...steps].sort((a, b) => a - b);
  if (sorted[0] !== 0) throw new StrategyError("step 0 must be a key step: nothing is cached before it");
  return { kind: "list", steps: sorted };
}

export function keySteps(strategy, n) {
  if (typeof strategy === "string") strategy = parseStrategy(strategy);
  if (n < 1) return [];
  let keys;
  if (strategy.kind === "all") keys = range(n);
  else if (strategy.kind === "uniform") keys = range(n).filter((i) => i % strategy.every === 0);
  else if (strategy.kind === "list") keys = strategy.steps;
  else if (Object.hasOwn(IF_PRESETS, strategy.kind)) keys = moved(...IF_PRESETS[strategy.kind], n);
  else if (n <= 50) keys = PAPER_KEYS_50;
  else keys = [...PAPER_KEYS_50.map((k) => pyRound((k * n) / 50)), 0, 1, 2, 3];
  return [...new Set(keys)].filter((k) => k < n).sort((a, b) => a - b);
}

// An IF preset's keys on n steps: each native key at the same place in the run (key_steps in strategy.py).
function moved(native, nativeKeys, n) {
  return nativeKeys.map((k) => pyRound((k * n) / native));
}

// Python's round(): halves go to the even neighbour.
function pyRound(x) {
  const f = Math.floor(x), d = x - f;
  if (Math.abs(d - 0.5) < 1e-12) return f % 2 === 0 ? f : f + 1;
  return Math.round(x);
}

export function groups(keys, n) {
  const bounds = [...keys, n];
  return keys.map((k, i) => Array.from({ length: bounds[i + 1] - k }, (_, j) => k + j));
}

// Relative UNet cost of a plan: FLOPs (sequential or parallel alike), and the GPU time the parallel
// decoders give on an eager SD1.5 UNet.
export function predictedCost(keys, n) {
  if (n === 0) return { flops: 1, gpu: 1 };
  const flops = (keys.length + (n - keys.length) * (1 - ENCODER_FLOP_SHARE)) / n;
  let gpu = 0;
  for (const g of groups(keys, n)) gpu += g.length === 1 ? GPU_MS.full : GPU_MS.encoder + decoderMs(g.length);
  return { flops, gpu: gpu / (n * GPU_MS.full) };
}

function decoderMs(w) {
  const pts = GPU_MS.decoder;
  for (let i = 1; i < pts.length; i++) {
    const [w0, t0] = pts[i - 1], [w1, t1] = pts[i];
    if (w <= w1) return t0 + ((t1 - t0) * (w - w0)) / (w1 - w0);
  }
  const [wa, ta] = pts[pts.length - 2], [wb, tb] = pts[pts.length - 1];
  return tb + ((tb - ta) * (w - wb)) / (wb - wa);
}

// The strategy string for a set of key steps: a preset name where one matches, else an explicit list.
export function strategyFor(keys, n) {
  const same = (a) => a.length === keys.length && a.every((k, i) => k === keys[i]);
  for (const name of NAMES) if (same(keySteps(name, n))) return name;
  return keys.join(",");
}

// A strategy shared as a small JSON document: {name, steps, key_steps, description}.
export function toShareable(strategyText, n, name = "") {
  const keys = keySteps(strategyText, n);
  return { name: name || String(strategyText), steps: n, key_steps: keys, strategy: String(strategyText),
           description: `FasterDiffusion key steps for ${n} sampling steps: ${keys.length} encoder passes` };
}

export function fromShareable(text) {
  let doc;
  try { doc = JSON.parse(text); } catch (e) { throw new StrategyError(`not JSON (${e.message})`); }
  if (!doc || typeof doc !== "object" || Array.isArray(doc)) throw new StrategyError("expected a JSON object");
  if (typeof doc.strategy === "string" && !Array.isArray(doc.key_steps)) { parseStrategy(doc.strategy); return doc.strategy.trim(); }
  const keys = doc.key_steps;
  if (!Array.isArray(keys) || !keys.length || !keys.every((k) => Number.isInteger(k) && k >= 0))
    throw new StrategyError("'key_steps' must be a list of step indices (whole numbers from 0)");
  const text2 = [...new Set(keys)].sort((a, b) => a - b).join(",");
  parseStrategy(text2);
  return text2;
}
