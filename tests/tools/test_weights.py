"""The weights tool: offline verification of a model directory, and the resumable hub download
(with hf_hub_download replaced by a fake hub that serves the tiny model's files; no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

from app.tools import weights

SPEC_KANDINSKY_TEMPLATE = {
    "name": "kandinsky",
    "dalle": {"checkpoint": "rudalle_kandinsky.bin", "num_layers": 64},
    "tokenizer": {"path": "tokenizer/bpe.model"},
    "vqgan": {"checkpoint": "vae/vqgan.gumbelf8-sber.model.ckpt"},
    "realesrgan": {"checkpoint": "x4/RealESRGAN_x4.pth"},
    "ruclip": {"path": "ruclip-vit-large-patch14-336"},
}


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory that a test may break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _manifest(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "model.json").read_text(encoding="utf-8"))


def _rewrite_dalle(model_dir: Path, edit: Any) -> str:
    path = model_dir / _manifest(model_dir)["dalle"]["checkpoint"]
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ verify


def test_verify_passes_on_a_good_model_dir(model_dir: Path) -> None:
    report = weights.verify(model_dir)
    assert report.ok, report.render()
    m = _manifest(model_dir)
    checked = "\n".join(report.checked)
    for rel in (m["dalle"]["checkpoint"], m["vqgan"]["checkpoint"], m["realesrgan"]["checkpoint"],
                m["ruclip"]["path"] + "/pytorch_model.bin", m["tokenizer"]["path"]):
        assert rel in checked


def test_verify_names_a_missing_file_and_the_cli_exits_non_zero(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = _manifest(model_dir)["realesrgan"]["checkpoint"]
    (model_dir / rel).unlink()
    report = weights.verify(model_dir)
    assert not report.ok
    assert any("file not found" in p and rel in p for p in report.problems)
    assert weights.main(["verify", str(model_dir)]) == 1
    out = capsys.readouterr().out
    assert rel in out and "FAILED" in out


def test_verify_names_a_missing_tensor(model_dir: Path) -> None:
    name = "transformer.layers.0.attention.dense.weight"
    path = _rewrite_dalle(model_dir, lambda sd: sd.pop(name))
    report = weights.verify(model_dir)
    assert not report.ok
    assert any(name in p and "missing" in p and path in p for p in report.problems), report.problems


def test_verify_names_a_tensor_with_the_wrong_shape(model_dir: Path) -> None:
    name = "to_logits.1.weight"

    def grow(sd: dict[str, torch.Tensor]) -> None:
        sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])

    _rewrite_dalle(model_dir, grow)
    report = weights.verify(model_dir)
    assert not report.ok
    assert any(name in p and "shape" in p for p in report.problems), report.problems


def test_verify_reports_every_broken_file_not_only_the_first(model_dir: Path) -> None:
    m = _manifest(model_dir)
    (model_dir / m["vqgan"]["checkpoint"]).unlink()
    _rewrite_dalle(model_dir, lambda sd: sd.pop("text_embeddings.weight"))
    problems = "\n".join(weights.verify(model_dir).problems)
    assert m["vqgan"]["checkpoint"] in problems and "text_embeddings.weight" in problems


def test_verify_rejects_a_directory_without_manifest(tmp_path: Path) -> None:
    report = weights.verify(tmp_path)
    assert not report.ok and "model.json" in report.problems[0]


def test_sha256_digests_written_by_the_cli_verify_and_a_changed_file_fails(
    model_dir: Path, tmp_path: Path
) -> None:
    sums = tmp_path / "sums.json"
    assert weights.main(["sha256", str(model_dir), "--output", str(sums)]) == 0
    digests = json.loads(sums.read_text())
    assert len(digests) == 7  # transformer, tokenizer, VQ-GAN, RealESRGAN, ruCLIP's three files
    assert weights.main(["verify", str(model_dir), "--sha256", str(sums)]) == 0

    rel = _manifest(model_dir)["tokenizer"]["path"]
    with open(model_dir / rel, "ab") as fh:
        fh.write(b"\0")
    report = weights.verify(model_dir, sha256=digests)
    assert [p for p in report.problems if "sha256 mismatch" in p and rel in p]


# ---------------------------------------------------------------------------------------------- download


class FakeHub:
    """Stands in for hf_hub_download: serves local files by (repo_id, filename), 404s the rest."""

    def __init__(self, files: dict[tuple[str, str], Path], fail_after: int | None = None) -> None:
        self.files = files
        self.calls: list[tuple[str, str]] = []
        self.served = 0
        self.fail_after = fail_after

    def __call__(self, repo_id: str, filename: str, *, local_dir: Path, **_: Any) -> str:
        self.calls.append((repo_id, filename))
        if (repo_id, filename) not in self.files:
            if any(r == repo_id for r, _ in self.files):
                raise EntryNotFoundError(f"404 Client Error: {filename} not in {repo_id}")
            raise RepositoryNotFoundError(f"404 Client Error: repository {repo_id} not found")
        if self.fail_after is not None and self.served >= self.fail_after:
            raise ConnectionError("connection reset by peer")
        self.served += 1
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[(repo_id, filename)], out)
        return str(out)


def _hub_from_tiny(tiny: Path, kandinsky_repo: str, ruclip_repo: str) -> dict[tuple[str, str], Path]:
    m = _manifest(tiny)
    clip = tiny / m["ruclip"]["path"]
    return {
        (kandinsky_repo, "pytorch_model.bin"): tiny / m["dalle"]["checkpoint"],
        ("shonenkov/rudalle-utils", "bpe.model"): tiny / m["tokenizer"]["path"],
        ("sberbank-ai/rudalle-utils", "vqgan.gumbelf8-sber.model.ckpt"): tiny / m["vqgan"]["checkpoint"],
        ("sberbank-ai/Real-ESRGAN", "RealESRGAN_x4.pth"): tiny / m["realesrgan"]["checkpoint"],
        **{(ruclip_repo, f): clip / f for f in weights.RUCLIP_FILES},
    }


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(_hub_from_tiny(tiny_model_dir, "sberbank-ai/rudalle-Kandinsky",
                                  "sberbank-ai/ruclip-vit-large-patch14-336"))
    monkeypatch.setattr(weights, "hf_hub_download", fake)
    return fake


def test_download_places_every_file_in_the_manifest_layout_and_verifies(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    template = tiny_model_dir / "model.json"
    fetched = weights.download("kandinsky", dest, template=template)
    assert len(fetched) == 7
    assert (dest / "model.json").read_bytes() == template.read_bytes()
    m = _manifest(tiny_model_dir)
    for rel in (m["dalle"]["checkpoint"], m["tokenizer"]["path"], m["vqgan"]["checkpoint"],
                m["realesrgan"]["checkpoint"]):
        assert (dest / rel).read_bytes() == (tiny_model_dir / rel).read_bytes()
    assert not (dest / weights.STAGING_DIR).exists()
    assert weights.verify(dest).ok


def test_download_falls_back_to_the_next_repository_on_not_found(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kandinsky only under its second home, ruCLIP only under the renamed organisation.
    fake = FakeHub(_hub_from_tiny(tiny_model_dir, "shonenkov-AI/Kandinsky",
                                  "ai-forever/ruclip-vit-large-patch14-336"))
    monkeypatch.setattr(weights, "hf_hub_download", fake)
    weights.download("kandinsky", tmp_path / "dest", template=tiny_model_dir / "model.json")
    kandinsky_calls = [r for r, f in fake.calls if f == "pytorch_model.bin" and "Kandinsky" in r]
    assert kandinsky_calls == ["sberbank-ai/rudalle-Kandinsky", "ai-forever/rudalle-Kandinsky",
                               "shonenkov-AI/Kandinsky"]
    assert ("ai-forever/ruclip-vit-large-patch14-336", "config.json") in fake.calls
    assert weights.verify(tmp_path / "dest").ok


def test_download_reports_every_source_tried_when_none_has_the_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "hf_hub_download", FakeHub({}))
    with pytest.raises(weights.WeightsError) as err:
        weights.download("kandinsky", tmp_path / "dest", template=tiny_model_dir / "model.json")
    assert "shonenkov-AI/Kandinsky/pytorch_model.bin" in str(err.value)
    assert _manifest(tiny_model_dir)["dalle"]["checkpoint"] in str(err.value)


def test_second_download_skips_complete_files(hub: FakeHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    weights.download("kandinsky", dest, template=tiny_model_dir / "model.json")
    first = len(hub.calls)
    assert weights.download("kandinsky", dest, template=tiny_model_dir / "model.json") == []
    assert len(hub.calls) == first


def test_interrupted_download_resumes_with_the_missing_files_only(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _hub_from_tiny(tiny_model_dir, "sberbank-ai/rudalle-Kandinsky",
                           "sberbank-ai/ruclip-vit-large-patch14-336")
    broken = FakeHub(files, fail_after=3)
    monkeypatch.setattr(weights, "hf_hub_download", broken)
    dest = tmp_path / "dest"
    with pytest.raises(weights.WeightsError, match="connection reset"):
        weights.download("kandinsky", dest, template=tiny_model_dir / "model.json")
    assert not (dest / "model.json").exists()  # only a complete directory gets its manifest
    # A network failure is not a missing file: no other repository was tried for the failing file.
    assert len(broken.calls) == 4

    healed = FakeHub(files)
    monkeypatch.setattr(weights, "hf_hub_download", healed)
    fetched = weights.download("kandinsky", dest, template=tiny_model_dir / "model.json")
    assert len(fetched) == 7 - 3 and len(healed.calls) == 4
    assert weights.verify(dest).ok


def test_download_without_a_template_fails_before_fetching(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(weights.WeightsError, match="model.json template"):
        weights.download("kandinsky", tmp_path / "dest", template=tmp_path / "missing" / "model.json")
    assert hub.calls == []


def test_download_into_the_template_directory_keeps_its_model_json(
    hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copyfile(tiny_model_dir / "model.json", dest / "model.json")  # `make weights` layout
    weights.download("kandinsky", dest, template=dest / "model.json")
    assert weights.verify(dest).ok


def test_download_plan_follows_spec_sources_and_template_paths() -> None:
    plan = {f.dest: f.sources for f in weights.download_plan("kandinsky", SPEC_KANDINSKY_TEMPLATE)}
    assert plan["rudalle_kandinsky.bin"] == (
        ("sberbank-ai/rudalle-Kandinsky", "pytorch_model.bin"),
        ("ai-forever/rudalle-Kandinsky", "pytorch_model.bin"),
        ("shonenkov-AI/Kandinsky", "pytorch_model.bin"),
    )
    assert plan["tokenizer/bpe.model"][0] == ("shonenkov/rudalle-utils", "bpe.model")
    assert ("ai-forever/rudalle-utils", "bpe.model") in plan["tokenizer/bpe.model"]
    assert plan["vae/vqgan.gumbelf8-sber.model.ckpt"][0] == (
        "sberbank-ai/rudalle-utils", "vqgan.gumbelf8-sber.model.ckpt")
    assert plan["x4/RealESRGAN_x4.pth"][1] == ("ai-forever/Real-ESRGAN", "RealESRGAN_x4.pth")
    for f in ("bpe.model", "config.json", "pytorch_model.bin"):
        assert plan[f"ruclip-vit-large-patch14-336/{f}"] == (
            ("sberbank-ai/ruclip-vit-large-patch14-336", f), ("ai-forever/ruclip-vit-large-patch14-336", f))
    malevich = weights.download_plan("malevich", SPEC_KANDINSKY_TEMPLATE)[0]
    assert malevich.sources == (("sberbank-ai/rudalle-Malevich", "pytorch_model_v3.bin"),
                                ("ai-forever/rudalle-Malevich", "pytorch_model_v3.bin"))


@pytest.mark.parametrize("name", weights.MODELS)
def test_repository_templates_give_a_complete_download_plan(name: str) -> None:
    path = weights.template_path(name)
    if not path.is_file():
        pytest.fail(f"{path} is missing: `python -m app.tools.weights download {name}` needs it")
    from app.engine.store import load_manifest

    manifest = load_manifest(path.parent)  # the template is a valid manifest for the layout it names
    plan = weights.download_plan(name, weights.load_template(name))
    assert len(plan) == 7 and len({f.dest for f in plan}) == 7
    assert plan[0].dest == manifest.dalle_checkpoint.name
    assert {f.dest for f in plan} == {str(rel) for rel in weights.manifest_files(path.parent)}


def test_verify_cli_lists_each_missing_file_once_with_the_fetch_command(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _manifest(model_dir)
    gone = [m["dalle"]["checkpoint"], m["tokenizer"]["path"], m["vqgan"]["checkpoint"],
            m["realesrgan"]["checkpoint"], m["ruclip"]["path"] + "/pytorch_model.bin"]
    for rel in gone:
        (model_dir / rel).unlink()
    # A relative directory, as `make verify` passes it: the checks' paths are absolute.
    monkeypatch.chdir(model_dir.parent)
    assert weights.main(["verify", model_dir.name]) == 1
    out = capsys.readouterr().out
    for rel in gone:
        assert out.count(rel) == 1, out  # not once as given and again as the manifest resolved it
    assert f"FAILED: {len(gone)} problem(s)" in out
    assert "make weights MODEL=" in out
    assert out.count("make weights MODEL=") == 1


def test_verify_of_a_published_model_names_its_make_command(model_dir: Path) -> None:
    raw = _manifest(model_dir)
    raw["name"] = "malevich"
    (model_dir / "model.json").write_text(json.dumps(raw), encoding="utf-8")
    (model_dir / raw["realesrgan"]["checkpoint"]).unlink()
    rendered = weights.verify(model_dir).render()
    assert "make weights MODEL=malevich" in rendered
