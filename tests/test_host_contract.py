"""Every ComfyUI symbol the pack relies on, pinned one test each: a future ComfyUI that moves or reshapes one
fails here with its name, instead of the pack failing to load or sampling wrong.

Checked against the host the tests boot (ComfyUI 0.3.75); README "ComfyUI versions" says what was read of newer
releases.  The UNet forward the split mirrors is pinned by its outline (fasterdiffusion/ldm.py) and, bit for bit,
by tests/test_comfy_unet.py."""
from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

import testmodel as tm

# module path -> attributes the pack (nodes/, patches/comfy_*.py, testmodel/) uses
ATTRIBUTES = {
    "comfy.patcher_extension": ["WrapperExecutor", "WrappersMP.OUTER_SAMPLE", "WrappersMP.PREDICT_NOISE",
                                "WrappersMP.APPLY_MODEL", "WrappersMP.DIFFUSION_MODEL"],
    "comfy.model_patcher": ["create_model_options_clone", "ModelPatcher.clone", "ModelPatcher.add_wrapper_with_key",
                            "ModelPatcher.remove_wrappers_with_key", "ModelPatcher.get_wrappers",
                            "ModelPatcher.get_model_object"],
    "comfy.samplers": ["KSAMPLER", "KSampler", "Sampler", "CFGGuider", "sampler_object", "calculate_sigmas",
                       "SAMPLER_NAMES", "SCHEDULER_NAMES"],
    "comfy.sample": ["prepare_noise", "sample_custom", "sample", "fix_empty_latent_channels"],
    "comfy.utils": ["PROGRESS_BAR_ENABLED"],
    "comfy.model_sampling": ["ModelSamplingDiscrete", "ModelSamplingDiscreteEDM", "StableCascadeSampling", "EPS",
                             "V_PREDICTION", "EDM", "X0"],
    "comfy.ldm.modules.diffusionmodules.openaimodel": ["UNetModel", "UNetModel._forward", "forward_timestep_embed",
                                                       "timestep_embedding", "apply_control"],
    "comfy.controlnet": ["ControlNet", "ControlBase.control_merge"],
    "latent_preview": ["prepare_callback"],
    "comfy.model_management": ["load_models_gpu", "get_torch_device"],
    "nodes": ["common_ksampler"],                            # the Compare node's runs are KSampler's
    "server": ["PromptServer.send_progress_text"],          # on PromptServer.instance (set by a running server)
    "comfy_api.v0_0_2": ["io", "ComfyExtension"],
    "comfy_api.latest": ["io", "ComfyExtension"],
}
V3_IO = ["ComfyNode", "Schema", "NodeOutput", "Hidden.unique_id", "Int.Input", "Float.Input", "String.Input",
         "Boolean.Input", "Combo.Input", "Model.Input", "Model.Output", "Latent.Input", "Latent.Output",
         "Conditioning.Input", "Sampler.Output", "String.Output", "Vae.Input", "Image.Output",
         "ComfyNode.validate_inputs", "ComfyNode.hidden"]

# callable -> the leading parameters the pack passes or reads by position
SIGNATURES = {
    "comfy.samplers.CFGGuider.outer_sample": ["self", "noise", "latent_image", "sampler", "sigmas"],  # args[2], [3]
    "comfy.samplers.CFGGuider.predict_noise": ["self", "x", "timestep", "model_options", "seed"],
    "comfy.samplers.KSAMPLER.__init__": ["self", "sampler_function", "extra_options", "inpaint_options"],
    "comfy.samplers.KSAMPLER.sample": ["self", "model_wrap", "sigmas", "extra_args", "callback", "noise",
                                       "latent_image", "denoise_mask", "disable_pbar"],
    "comfy.samplers.KSampler.__init__": ["self", "model", "steps", "device", "sampler", "scheduler", "denoise",
                                         "model_options"],
    "comfy.sample.sample_custom": ["model", "noise", "cfg", "sampler", "sigmas", "positive", "negative",
                                   "latent_image", "noise_mask", "callback", "disable_pbar", "seed"],
    "comfy.sample.prepare_noise": ["latent_image", "seed", "noise_inds"],
    "comfy.sample.fix_empty_latent_channels": ["model", "latent_image"],
    "latent_preview.prepare_callback": ["model", "steps"],
    "nodes.common_ksampler": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                              "latent"],
    "comfy.model_base.BaseModel._apply_model": ["self", "x", "t", "c_concat", "c_crossattn", "control",
                                                "transformer_options"],
    "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel._forward": [
        "self", "x", "timesteps", "context", "y", "control", "transformer_options"],
    "comfy.ldm.modules.diffusionmodules.openaimodel.forward_timestep_embed": [
        "ts", "x", "emb", "context", "transformer_options", "output_shape", "time_context", "num_video_frames",
        "image_only_indicator"],
    "comfy.ldm.modules.diffusionmodules.openaimodel.timestep_embedding": ["timesteps", "dim", "max_period",
                                                                          "repeat_only"],
    "server.PromptServer.send_progress_text": ["self", "text", "node_id"],
}

# Every sampler the pack has classified (fasterdiffusion/samplers.py; tools/sampler_survey.py measured them):
# ComfyUI 0.3.75's list.  A sampler a newer ComfyUI adds is served unsurveyed until someone measures it.
SURVEYED_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde"]      # ComfyUI 0.33: docs/quality/sampler_survey_comfyui_0.33.md


def resolve(dotted: str):
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.fixture(scope="module")
def host(pack):
    """The booted ComfyUI with the pack loaded (so server.PromptServer and comfy_api are importable)."""
    return pack


@pytest.mark.parametrize("symbol", [f"{m}.{a}" for m, attrs in ATTRIBUTES.items() for a in attrs])
def test_host_symbol_exists(host, symbol):
    try:
        resolve(symbol)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"ComfyUI no longer has {symbol}: {e}")


@pytest.mark.parametrize("name", V3_IO)
def test_v3_io_symbol_exists(host, name):
    from comfy_api.v0_0_2 import io
    obj = io
    for part in name.split("."):
        assert hasattr(obj, part), f"comfy_api io.{name} is gone"
        obj = getattr(obj, part)


@pytest.mark.parametrize("symbol", list(SIGNATURES))
def test_host_signature(host, symbol):
    params = list(inspect.signature(resolve(symbol)).parameters)
    assert params[:len(SIGNATURES[symbol])] == SIGNATURES[symbol], f"{symbol}{inspect.signature(resolve(symbol))}"


def test_loader_takes_comfy_entrypoint(host):
    """No NODE_CLASS_MAPPINGS in the pack: ComfyUI's loader must call comfy_entrypoint (and it takes
    NODE_CLASS_MAPPINGS first when a module has both)."""
    import nodes
    source = inspect.getsource(nodes.load_custom_node)
    assert "comfy_entrypoint" in source and "get_node_list" in source


def test_unet_forward_runs_the_diffusion_model_wrappers(host):
    """The DIFFUSION_MODEL wrapper (patches/comfy: unet, calibrate, onepass) is what UNetModel.forward runs."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    source = inspect.getsource(UNetModel.forward)
    assert "WrappersMP.DIFFUSION_MODEL" in source and "self._forward" in source


def test_unet_forward_is_the_mirrored_one(host):
    """The mirror knows this host's forward, and reads the patch points it honours from its source: ComfyUI 0.33
    added middle_block_after_patch and an output patch's hsp=None (April 2026, SUPIR); 0.3.75 has neither."""
    import comfyui_version
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    forward = host.split.host_forward(UNetModel)
    assert forward.difference is None, forward.difference
    new = tuple(int(p) for p in comfyui_version.__version__.split(".")[:2]) >= (0, 33)
    assert forward == host.split.HostForward(emb_patch=True, middle_after_patch=new, optional_skip=new)


def test_a_changed_forward_is_detected_and_named(host):
    """Mutations of the host's own forward source: each is named, and the model would pass through; a patch point
    the mirror knows is read, not refused."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    read = host.split.read_forward
    source = inspect.getsource(UNetModel._forward)
    new_patch = source.replace('"input_block_patch_after_skip" in transformer_patches',
                               '"middle_block_patch" in transformer_patches')
    assert new_patch != source
    assert "uses keys middle_block_patch" in read(new_patch).difference
    emb_block = r'if "emb_patch" in transformer_patches:.*?emb = p\(emb, self.model_channels, transformer_options\)'
    no_emb_patch = re.sub(emb_block, "pass", source, flags=re.DOTALL)
    assert no_emb_patch != source
    assert read(no_emb_patch).difference is None and not read(no_emb_patch).emb_patch
    new_block = source.replace("h = apply_control(h, control, 'middle')",
                               "h = apply_control(self.middle_block_out(h), control, 'middle')")
    assert new_block != source
    assert "uses self middle_block_out" in read(new_block).difference
    new_helper = source.replace("h = apply_control(h, control, 'middle')", "h = apply_middle_control(h, control)")
    assert new_helper != source
    assert "uses calls apply_middle_control" in read(new_helper).difference
    reformatted = source.replace("transformer_options", "transformer_options ")
    assert read(reformatted) == read(source), "formatting is not a difference"


def test_a_changed_forward_passes_the_model_through_with_one_log_line(host, digits, monkeypatch, caplog):
    monkeypatch.setattr(host.split, "host_forward",
                        lambda cls: host.split.HostForward(difference="this host's UNetModel forward differs"))
    with caplog.at_level("INFO", logger="FasterDiffusion"):
        (out,) = host.Apply.execute(digits[0], "paper", True, 32)
    assert out is digits[0]
    assert [r.getMessage() for r in caplog.records] == [
        "FasterDiffusion: passing the model through unchanged: this host's UNetModel forward differs"]


def test_every_host_sampler_has_been_surveyed(host):
    import comfy.samplers
    new = [name for name in comfy.samplers.SAMPLER_NAMES if name not in SURVEYED_SAMPLERS]
    assert not new, (f"ComfyUI has samplers FasterDiffusion has not classified: {', '.join(new)}. Run "
                     f"tools/sampler_survey.py (it measures every host sampler), classify them in "
                     f"fasterdiffusion/samplers.py and add them to SURVEYED_SAMPLERS here")


def test_transformer_options_keys_the_glue_reads(host, digits):
    """What the DIFFUSION_MODEL wrapper reads from transformer_options during a real KSampler run: the step's
    sigmas (placing the call on its step), cond_or_uncond and uuids (the call's slot)."""
    import comfy.patcher_extension
    import comfy.sample
    model, tokens = digits
    seen = []

    def spy(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        seen.append(dict(transformer_options))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "contract_spy", spy)
    pos, neg = tm.digit_conditioning(tokens, [3])
    latent = torch.zeros(1, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)
    comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), 2, 3.0, "euler", "normal", pos, neg, latent)
    assert seen, "the DIFFUSION_MODEL wrapper never ran"
    for key in ("sigmas", "cond_or_uncond", "uuids", "sample_sigmas"):
        assert all(key in to for to in seen), f"transformer_options[{key!r}] is no longer set"


def test_controlnet_residuals_come_keyed_input_middle_output(host):
    """The ldm split adds ControlNet residuals per block from control['input'|'middle'|'output']."""
    import comfy.controlnet
    source = inspect.getsource(comfy.controlnet.ControlBase.control_merge)
    assert all(f"'{k}'" in source or f'"{k}"' in source for k in ("input", "middle", "output"))


def test_multigpu_threads_name_their_device(host):
    """ComfyUI 0.33's MultiGPU CFG split tells each device thread's calls which device they run on
    (``transformer_options["multigpu_thread_device"]``): the glue keeps a run state per device by it
    (tests/test_multigpu.py drives the path)."""
    import comfy.samplers
    if not hasattr(comfy.samplers, "_calc_cond_batch_multigpu"):
        pytest.skip("no MultiGPU CFG split in this host")
    assert '"multigpu_thread_device"' in inspect.getsource(comfy.samplers._calc_cond_batch_multigpu)
