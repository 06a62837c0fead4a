"""The compiled artifact: model file(s) plus ``manifest.json``, written atomically; and loading it back."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.ir import DEFAULT_EXTERNAL_DATA_THRESHOLD, save

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
# The manifest's layout (tfgraph/deploy/manifest.schema.json); raised when a key's meaning changes.
MANIFEST_SCHEMA_VERSION = 2  # 2: profile.phases, pass records name their phase
MANIFEST_SCHEMA = pathlib.Path(__file__).with_name("manifest.schema.json")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return pathlib.Path(path.anchor or ".")


def check_output_dir(path: os.PathLike | str, *, force: bool) -> pathlib.Path:
    """Refuse an unusable output before any work is done: an existing one (unless ``force``), the
    current folder or one of its ancestors, names the file system cannot hold, and places this
    process cannot write. Missing parent folders are fine: they are created when the artifact is
    written."""
    raw = str(path)
    if not raw.strip() or "\0" in raw:
        raise BadInputError(f"{raw!r}: not a usable output path")
    path = pathlib.Path(path)
    resolved = path.resolve()
    cwd = pathlib.Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise BadInputError(f"{path}: is the current folder or one of its ancestors; name a new folder for the artifact")
    name_max = _pathconf(resolved, "PC_NAME_MAX", 255)
    for part in resolved.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise BadInputError(f"{path}: a path component is {len(os.fsencode(part))} bytes long, over the file "
                                f"system's limit of {name_max}; choose a shorter name")
    path_max = _pathconf(resolved, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(resolved))) + 64 > path_max:  # room for the temporary sibling's and the files' names
        raise BadInputError(f"{path}: the path is too long for the file system ({path_max} bytes)")
    if path.exists() and not force:
        raise BadInputError(f"{path}: output folder exists; choose another or pass --force to replace it")
    if os.path.lexists(path) and not path.is_dir():
        raise BadInputError(f"{path}: exists and is not a folder")
    anchor = _nearest_existing(resolved.parent)
    if not anchor.is_dir():
        raise BadInputError(f"{anchor}: is not a folder, so {path} cannot be created under it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        why = "the file system is read-only" if _read_only(anchor) else "permission denied"
        raise BadInputError(f"{anchor}: cannot write there ({why}); choose an output folder you can write to")
    return path


def _pathconf(path: pathlib.Path, name: str, default: int) -> int:
    try:
        return os.pathconf(_nearest_existing(path), name)
    except (OSError, ValueError):
        return default


def _read_only(path: pathlib.Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def atomic_write_dir(path: pathlib.Path, write: callable, *, force: bool) -> None:
    """Call ``write(tmp_dir)`` in a temporary sibling folder, then rename it to ``path``.

    Missing parent folders are created (and removed again if the write fails). The folder gets
    the permissions the process's umask gives a new folder. A failure anywhere leaves no ``path``
    (and an existing one untouched), and no temporary or backup folder behind.
    """
    path = pathlib.Path(path)
    check_output_dir(path, force=force)
    created = []
    for parent in reversed(path.absolute().parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        write(tmp)
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "previous", path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class Artifact:
    """A compiled model and its manifest. ``path`` is set once it has been written."""

    def __init__(self, model: ir.Model, manifest: dict[str, Any], path: pathlib.Path | None = None,
                 files: dict[str, bytes] | None = None):
        self.model = model
        self.manifest = manifest
        self.path = path
        # Files the deployment needs beside the model (tokenizer, config): name in the artifact → contents.
        self.files = dict(files or {})

    @property
    def verified(self) -> bool | None:
        return self.manifest.get("verification", {}).get("passed")

    def save(self, path: os.PathLike | str, *, force: bool = False, external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> pathlib.Path:
        path = pathlib.Path(path)

        def write(tmp: pathlib.Path) -> None:
            files = save(self.model, tmp / MODEL_FILE, external_data_threshold=external_data_threshold)
            for name, data in sorted(self.files.items()):
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                files.append(name)
            self.manifest["files"] = files
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

        atomic_write_dir(path, write, force=force)
        self.path = path
        return path

    def session(self, *, fallback: str | None = None):
        """An onnxruntime session for the artifact (from disk when saved); ``fallback`` as in :func:`load`."""
        if self.path is not None:
            return load(self.path, fallback=fallback)
        from tfgraph.deploy import runtime

        return runtime.session(self.model, _providers(self.manifest, fallback=fallback, artifact="this artifact"),
                               options=self.manifest.get("session_options"))


def _providers(manifest: dict, *, fallback: str | None = None, artifact: str = "this artifact") -> list:
    """The manifest's providers that run here (plugin EPs registered; CPU stays onnxruntime's fallback).
    None of its accelerators available: ProviderUnavailableError, or the CPU EP with a warning when
    ``fallback="cpu"`` (tfgraph/deploy/availability.py)."""
    from tfgraph.deploy import runtime
    from tfgraph.deploy.availability import session_providers
    from tfgraph.providers import Provider

    wanted = [Provider(p["name"], p.get("options", {}), p.get("plugin"), extra=p.get("extra"), install=p.get("install"))
              for p in manifest.get("providers") or [{"name": runtime.CPU}]]
    return session_providers(wanted, fallback=fallback, artifact=artifact)


def read_manifest(path: os.PathLike | str) -> dict:
    path = pathlib.Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BadInputError(f"{path}: not a tfgraph artifact (no {MANIFEST_FILE})")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"{manifest_path}: not valid JSON ({e})") from None


def load(path: os.PathLike | str, *, fallback: str | None = None, config: Mapping[str, str] | None = None,
         options: Mapping[str, Any] | None = None):
    """Open a compiled artifact: an onnxruntime ``InferenceSession`` with the profile's providers and options
    (``config``: extra session config entries, e.g. the generator's thread spinning; ``options``:
    SessionOptions attributes over the profile's, e.g. the generator's memory pattern).

    An artifact for an accelerator (CUDA, TensorRT, OpenVINO, QNN) whose execution providers cannot
    run here raises :class:`~tfgraph.errors.ProviderUnavailableError`, naming them and how to install
    them; ``fallback="cpu"`` opens it on the CPU EP instead, with a warning. CPU artifacts open on the CPU.
    """
    from tfgraph.deploy import runtime

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise BadInputError(f"{path}: artifact has no {MODEL_FILE}")
    target = manifest.get("target")
    providers = _providers(manifest, fallback=fallback, artifact=f"{path} ({target} artifact)" if target else str(path))
    merged = {**(manifest.get("session_options") or {}), **(options or {})}
    return runtime.session(str(model_path), providers, options=merged or None, config=config)
