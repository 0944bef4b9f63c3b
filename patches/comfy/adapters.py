"""Which adapter serves which ComfyUI diffusion model: one adapter class per model class (the exact class, as
diffusers' ``ADAPTERS``), each a runtime ``UNetAdapter`` plus the glue's side of it:

  unet_class                 the diffusion model class it mirrors
  unsupported_reason(unet)   why it cannot serve this instance (a host whose forward it does not know), or None
  make_call(unet, a, slot)   the runtime's ModelCall from the forward's bound arguments ``a`` (name -> value)
  for_run(unet, settings)    the adapter for one call of a run (transformers read ``settings.encoder_blocks``)

The DIFFUSION_MODEL wrapper (``unet.py``) binds the host's arguments against the class's ``_forward`` and hands
the call to the run with the adapter this table names; every other class runs untouched.
"""
from __future__ import annotations

import functools
import inspect

from .flux import FluxAdapter
from .ldm import LdmUNetAdapter
from .wan import WanAdapter

ADAPTERS = (LdmUNetAdapter, FluxAdapter, WanAdapter)
SERVED = "ComfyUI's UNetModel: SD1.x, SD2.x, SDXL, SVD; Flux; Wan 2.x"


def adapter_class(unet):
    """The adapter class for ``unet``'s exact class, or None."""
    return next((a for a in ADAPTERS if type(unet) is a.unet_class), None)


def unsupported_reason(unet) -> str | None:
    """Why FasterDiffusion cannot serve this diffusion model, or None if it can."""
    cls = adapter_class(unet)
    if cls is None:
        return f"{type(unet).__name__} is not a model FasterDiffusion serves ({SERVED})"
    return cls.unsupported_reason(unet)


@functools.cache
def _signature(cls):
    return inspect.signature(getattr(cls, "_forward", cls.forward))


def bind(unet, args, kwargs) -> dict:
    """The arguments of one DIFFUSION_MODEL call by name, defaults filled (``**kwargs`` of the forward under
    ``"kwargs"``)."""
    bound = _signature(type(unet)).bind(unet, *args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    a.pop(next(iter(a)))     # self
    return a


def call_args(unet, a: dict) -> tuple[list, dict]:
    """``a`` (as ``bind`` gives it, possibly changed) back as positional and keyword arguments of the forward."""
    params = list(_signature(type(unet)).parameters.values())[1:]
    args, kwargs = [], {}
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            kwargs.update(a.get(p.name, {}))
        elif p.kind is p.VAR_POSITIONAL:
            args.extend(a.get(p.name, ()))
        elif p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = a[p.name]
        else:
            args.append(a[p.name])
    return args, kwargs
