"""FasterDiffusion for AUTOMATIC1111 (v1.10) and Forge: the always-on "FasterDiffusion" accordion in txt2img and
img2img, the "FasterDiffusion" tab and the X/Y/Z plot axes.

A1111/Forge import every ``scripts/*.py`` of an extension with the extension folder on ``sys.path``; ComfyUI
never looks here (it imports the folder's ``__init__.py``, which never imports this).  The host glue lives in
``patches/webui/`` and is loaded under a private package name (``fasterdiffusion_webui_hosts``), so a
``patches`` package of another extension can never shadow it; the engine is the host-free ``fasterdiffusion``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from modules import script_callbacks, scripts

ROOT = Path(__file__).resolve().parent.parent
HOSTS = "fasterdiffusion_webui_hosts"


def _load_hosts():
    if HOSTS not in sys.modules:
        added = str(ROOT) not in sys.path
        if added:                       # the engine package sits in the extension folder
            sys.path.insert(0, str(ROOT))
        try:
            import fasterdiffusion.runtime  # noqa: F401  (imported now, while the folder is on the path)
            spec = importlib.util.spec_from_file_location(HOSTS, ROOT / "patches" / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / "patches")])
            package = importlib.util.module_from_spec(spec)
            sys.modules[HOSTS] = package
            spec.loader.exec_module(package)
            for name in ("compvis", "glue", "forge", "ui"):
                importlib.import_module(f"{HOSTS}.webui.{name}")
        finally:
            if added:
                sys.path.remove(str(ROOT))
    return sys.modules[HOSTS]


_hosts = _load_hosts()
glue = _hosts.webui.glue
ui = _hosts.webui.ui


class FasterDiffusionScript(scripts.Script):
    """API: ``"alwayson_scripts": {"fasterdiffusion": {"args": [enabled, strategy, parallel,
    max_decoder_batch, injection_alpha, propagation, controlnet_reuse]}}`` (shorter lists take the defaults)."""

    def title(self):
        return "FasterDiffusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.accordion(self, is_img2img)

    def process(self, p, *args):
        glue.cleanup_all("a new generation started")
        p._fasterdiffusion = None
        try:
            settings = glue.read_settings(p, args)
        except glue.StrategyError as e:
            # A1111 reports an exception from a script hook and generates anyway: say it here, under the image
            # too, and generate without FasterDiffusion (the infotext then has no FasterDiffusion key)
            text = f"FasterDiffusion is off for this generation: {str(e).splitlines()[0]}"
            print(text)
            if hasattr(p, "comment"):
                p.comment(text)
            return
        if settings is None:
            return
        p.extra_generation_params.update(glue.infotext(settings))
        p._fasterdiffusion = glue.Generation(settings, p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        gen = getattr(p, "_fasterdiffusion", None)
        if gen is not None:
            gen.before_sampling(p, **kwargs)

    def postprocess(self, p, processed, *args):
        gen = getattr(p, "_fasterdiffusion", None)
        if gen is not None:
            gen.cleanup()


script_callbacks.on_ui_tabs(ui.tab)
script_callbacks.on_before_ui(ui.add_xyz_axes)
script_callbacks.on_app_started(ui.add_route)
script_callbacks.on_script_unloaded(lambda: glue.cleanup_all("the script was unloaded"))
