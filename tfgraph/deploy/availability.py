"""Where a target's artifact can run on this machine, said plainly.

* :func:`ran_instead` — the one line a compile prints near the top of its summary and records as
  ``manifest["verification"]["ran_on_instead"]`` when the target's execution providers are not
  installed here: what ran instead, and where the placement report comes from.
* :func:`session_providers` — the rule :func:`tfgraph.load` follows: an artifact opens on its
  target's providers; when none of its non-CPU providers can run here it raises
  :class:`~tfgraph.errors.ProviderUnavailableError` (naming them and how to install them), unless the
  caller asks for ``fallback="cpu"``, which opens it on the CPU EP with a warning. CPU targets open
  on the CPU as always. The same rule for every target (CUDA, TensorRT, OpenVINO, QNN).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from tfgraph.deploy import runtime
from tfgraph.errors import BadInputError, ProviderUnavailableError

FALLBACKS = (None, "cpu")

_LABELS = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TensorRT",
    "OpenVINOExecutionProvider": "OpenVINO",
    "QNNExecutionProvider": "QNN",
    "DmlExecutionProvider": "DirectML",
    "CoreMLExecutionProvider": "CoreML",
    "ROCMExecutionProvider": "ROCm",
    "MIGraphXExecutionProvider": "MIGraphX",
}


class CpuFallbackWarning(UserWarning):
    """An artifact for an accelerator was opened on the CPU EP (``fallback="cpu"``)."""


def ep_label(name: str) -> str:
    """``CUDAExecutionProvider`` → ``CUDA``."""
    return _LABELS.get(name, name.removesuffix("ExecutionProvider"))


def _eps(names: Sequence[str]) -> str:
    labels = [f"{ep_label(n)} EP" for n in names]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def ran_instead(profile, *, verified: bool) -> str | None:
    """One line when ``profile``'s accelerator EPs are not all available here, else None, e.g.
    ``CUDA EP not available here: verified the same graph on the CPU EP; placement from the CUDA
    operator table``."""
    accelerators = [p for p in profile.providers if p.name != runtime.CPU]
    if not accelerators:
        return None
    ok, missing = runtime.usable(accelerators)
    if not missing:
        return None
    standalone = runtime.standalone_runtime(profile)
    if standalone is not None:
        where, placement = standalone.NAME, f"placement from {standalone.NAME}"
    else:
        where = _eps([p.name for p in ok]) if ok else "the CPU EP"
        where = where if where.startswith("the ") else f"the {where}"
        placement = f"placement from the {ep_label(accelerators[0].name)} operator table"
    checked = f"verified the same graph on {where}" if verified else "outputs not verified (--no-verify)"
    return f"{_eps(list(missing))} not available here: {checked}; {placement}"


def session_providers(providers: Sequence, *, fallback: str | None = None, artifact: str = "this artifact") -> list:
    """The providers an artifact's session should use here (see the module docstring)."""
    from tfgraph.providers import Provider

    if fallback not in FALLBACKS:
        raise BadInputError(f"fallback={fallback!r}: use None (refuse to run elsewhere) or 'cpu'")
    providers = list(providers) or [Provider(runtime.CPU)]
    ok, missing = runtime.usable(providers)
    accelerators = [p for p in providers if p.name != runtime.CPU]
    if not accelerators or any(p.name != runtime.CPU for p in ok):
        return ok or [Provider(runtime.CPU)]
    names = [p.name for p in accelerators]
    reasons = "; ".join(f"{k}: {v}" for k, v in missing.items() if k in names)
    install = "; ".join(dict.fromkeys(p.install_hint() for p in accelerators))
    if fallback == "cpu":
        warnings.warn(f"{artifact}: {_eps(names)} not available here ({reasons}); running on the CPU EP instead "
                      "(fallback='cpu'): correct outputs, not the target's speed", CpuFallbackWarning, stacklevel=3)
        return [Provider(runtime.CPU)]
    raise ProviderUnavailableError(
        f"{artifact} is for the {_eps(names)}, which cannot run here ({reasons}); to run it here: {install}; "
        "or open it on the CPU EP on purpose with tfgraph.load(path, fallback='cpu')",
        missing={k: v for k, v in missing.items() if k in names}, install=install)
