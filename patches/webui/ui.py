"""AUTOMATIC1111 / Forge user interface: the txt2img/img2img accordion, the "FasterDiffusion" tab, the XYZ-plot
axes, and the route that serves the editor's strategy rules (``web/js/strategy.js``, shared with the ComfyUI
widget) to ``javascript/fasterdiffusion_webui.mjs``.

Only the gradio subset both hosts ship works here (A1111: gradio 3.41, Forge: 4.40; hosts.md C1): Checkbox,
Slider, Dropdown, Textbox, Number, HTML, Button, Row, Column and A1111's ``InputAccordion``; no ``.style()``,
no ``_js``/``js`` arguments (the editor finds its elements by id).  gradio and ``modules.*`` are imported
inside the functions, so this module imports without a host.
"""
from __future__ import annotations

import json
from pathlib import Path

from fasterdiffusion.strategy import StrategyError, make_plan, parse_strategy

from . import glue

ROOT = Path(__file__).resolve().parent.parent
STRATEGY_JS = ROOT / "web" / "js" / "strategy.js"
ROUTE = "/fasterdiffusion/strategy.js"
PRESETS = {"paper": "paper", "uniform:2": "uniform:2", "uniform:3": "uniform:3", "uniform:4": "uniform:4",
           "all (no speed-up: bit-identical)": "all"}


def editor_html(kind: str, strategy_id: str, steps_id: str) -> str:
    """The container the editor script fills: step cells, presets, cost line, JSON copy/paste.  Without the
    script (or before it runs) it says what the strategy box accepts."""
    return (f'<div class="fd-webui-editor" data-kind="{kind}" data-strategy-id="{strategy_id}" '
            f'data-steps-id="{steps_id}"><span class="fd-hint">Key steps: paper, uniform:K, all, or a list '
            f'such as 0,1,2,3,5,10 (step 0 always).</span></div>')


# --------------------------------------------------------------------------------------------------
# The accordion
# --------------------------------------------------------------------------------------------------

def accordion(script, is_img2img: bool):
    import gradio as gr
    from modules.ui_components import InputAccordion

    tab = "img2img" if is_img2img else "txt2img"
    with InputAccordion(False, label="FasterDiffusion", elem_id=script.elem_id("fd_enable")) as enabled:
        strategy = gr.Textbox(value="paper", label="Key steps (strategy)", lines=1, elem_id=script.elem_id("fd_strategy"))
        gr.HTML(editor_html(tab, script.elem_id("fd_strategy"), f"{tab}_steps"), elem_id=script.elem_id("fd_editor"))
        with gr.Row():
            parallel = gr.Checkbox(value=True, label="Parallel decoders (the GPU speed-up)", elem_id=script.elem_id("fd_parallel"))
            max_decoder_batch = gr.Slider(minimum=0, maximum=128, step=1, value=32, elem_id=script.elem_id("fd_max_batch"),
                                          label="Memory cap: most samples in one decoder batch (0 = no cap)")
            injection_alpha = gr.Slider(minimum=0.0, maximum=0.01, step=0.0005, value=0.0, elem_id=script.elem_id("fd_alpha"),
                                        label="Prior noise injection α (0 = off; paper 0.003; Euler, Euler a, DPM++ 2M, LMS)")
        propagation = gr.Dropdown(choices=list(glue.PROPAGATIONS), value=glue.DEFAULTS["propagation"],
                                  elem_id=script.elem_id("fd_propagation"),
                                  label="Non-key steps get: forecast (features extrapolated from the last key steps, "
                                        "closer to the full image) or reuse (the last key step's, the paper's)")
        controlnet_reuse = gr.Checkbox(value=glue.DEFAULTS["controlnet_reuse"], elem_id=script.elem_id("fd_controlnet_reuse"),
                                       label="ControlNet at key steps only (non-key steps reuse the key step's "
                                             "ControlNet residuals, weighted as each step weights them)")
    fields = glue.settings_from_infotext
    script.infotext_fields = [
        (enabled, lambda d: fields(d)["enabled"]),
        (strategy, lambda d: fields(d)["strategy"]),
        (parallel, lambda d: fields(d)["parallel"]),
        (max_decoder_batch, lambda d: fields(d)["max_decoder_batch"]),
        (injection_alpha, lambda d: fields(d)["injection_alpha"]),
        (propagation, lambda d: fields(d)["propagation"]),
        (controlnet_reuse, lambda d: fields(d)["controlnet_reuse"]),
    ]
    script.paste_field_names = [glue.KEY_STRATEGY, glue.KEY_PARALLEL, glue.KEY_MAX_BATCH, glue.KEY_ALPHA,
                                glue.KEY_PROPAGATION, glue.KEY_CONTROLNET]
    return [enabled, strategy, parallel, max_decoder_batch, injection_alpha, propagation, controlnet_reuse]   # glue.ARGS


# --------------------------------------------------------------------------------------------------
# The tab
# --------------------------------------------------------------------------------------------------

def to_shareable(strategy: str, steps: int, name: str = "") -> dict:
    """The ComfyUI widget's Copy document (web/js/strategy.js ``toShareable``)."""
    steps = int(steps)
    keys = list(make_plan(strategy, steps).keys)
    return {"name": name or str(strategy), "steps": steps, "key_steps": keys, "strategy": str(strategy),
            "description": f"FasterDiffusion key steps for {steps} sampling steps: {len(keys)} encoder passes"}


def from_shareable(text: str) -> str:
    """The strategy string of a shared document (web/js/strategy.js ``fromShareable``); StrategyError if
    it is malformed."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise StrategyError(str(text)[:60], f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StrategyError(str(text)[:60], "expected a JSON object")
    keys = doc.get("key_steps")
    if isinstance(doc.get("strategy"), str) and not isinstance(keys, list):
        parse_strategy(doc["strategy"])
        return doc["strategy"].strip()
    if not isinstance(keys, list) or not keys or not all(type(k) is int and k >= 0 for k in keys):
        raise StrategyError(str(text)[:60], "'key_steps' must be a list of step indices (whole numbers from 0)")
    text2 = ",".join(map(str, sorted(set(keys))))
    parse_strategy(text2)
    return text2


def export_json(strategy, steps):
    try:
        return json.dumps(to_shareable(strategy, int(steps or 20)), indent=1), ""
    except StrategyError as e:
        return "", f"Invalid strategy: {e.problem}"


def import_json(text, steps):
    try:
        s = from_shareable(text or "")
    except StrategyError as e:
        return glue_update(), f"Not imported: {e.problem}"
    return s, glue.describe(s, int(steps or 20))


def glue_update():
    import gradio as gr
    return gr.update()


def tab():
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Row():
            with gr.Column():
                strategy = gr.Textbox(value="paper", label="Key steps (strategy)", lines=1, elem_id="fd_tab_strategy")
                with gr.Row():
                    steps = gr.Number(value=20, precision=0, label="Sampling steps", elem_id="fd_tab_steps")
                    preset = gr.Dropdown(choices=list(PRESETS), value="paper", label="Preset", elem_id="fd_tab_preset")
                gr.HTML(editor_html("tab", "fd_tab_strategy", "fd_tab_steps"), elem_id="fd_tab_editor")
                check = gr.Button("Check and predict cost", elem_id="fd_tab_check")
                info = gr.Textbox(label="Plan and predicted cost", interactive=False, lines=2, elem_id="fd_tab_info")
            with gr.Column():
                share = gr.Textbox(label="Strategy JSON (the ComfyUI widget's Copy/Paste format)", lines=8,
                                   elem_id="fd_tab_json")
                with gr.Row():
                    export = gr.Button("Export", elem_id="fd_tab_export")
                    load = gr.Button("Import", elem_id="fd_tab_import")
        preset.change(fn=lambda name, n: (PRESETS.get(name, "paper"), glue.describe(PRESETS.get(name, "paper"), int(n or 20))),
                      inputs=[preset, steps], outputs=[strategy, info])
        check.click(fn=lambda s, n: glue.describe(s, int(n or 20)), inputs=[strategy, steps], outputs=[info])
        export.click(fn=export_json, inputs=[strategy, steps], outputs=[share, info])
        load.click(fn=import_json, inputs=[share, steps], outputs=[strategy, info])
    return [(block, "FasterDiffusion", "fasterdiffusion")]


# --------------------------------------------------------------------------------------------------
# XYZ plot, the JS route
# --------------------------------------------------------------------------------------------------

def add_xyz_axes():
    """[FasterDiffusion] Enabled / Strategy / Propagation / ControlNet reuse axes on the built-in X/Y/Z plot script (hosts.md C1)."""
    from modules import scripts
    found = [d for d in scripts.scripts_data if d.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid")]
    if not found:
        return False
    xyz = found[0].module
    if any(getattr(o, "label", "").startswith("[FasterDiffusion]") for o in xyz.axis_options):
        return True
    xyz.axis_options.extend([
        xyz.AxisOption("[FasterDiffusion] Enabled", str, _apply_field("fd_enabled"), choices=lambda: ["True", "False"]),
        xyz.AxisOption("[FasterDiffusion] Strategy", str, _apply_field("fd_strategy"), confirm=_confirm_strategies),
        xyz.AxisOption("[FasterDiffusion] Propagation", str, _apply_field("fd_propagation"),
                       choices=lambda: list(glue.PROPAGATIONS)),
        xyz.AxisOption("[FasterDiffusion] ControlNet reuse", str, _apply_field("fd_controlnet_reuse"),
                       choices=lambda: ["True", "False"]),
    ])
    return True


def _apply_field(name):
    """xyz_grid's ``apply_field`` (Forge Classic's xyz_grid has none): the axis value goes onto ``p``."""
    def apply(p, x, xs):
        setattr(p, name, x)
    return apply


def _confirm_strategies(p, xs):
    for x in xs:
        parse_strategy(x)       # a bad strategy stops the grid before it starts, with the grammar


def add_route(_demo, app):
    """Serve web/js/strategy.js to the editor script (the same file the ComfyUI widget imports)."""
    from fastapi.responses import Response

    def strategy_js():
        return Response(STRATEGY_JS.read_text(encoding="utf-8"), media_type="text/javascript")

    app.add_api_route(ROUTE, strategy_js, methods=["GET"])
