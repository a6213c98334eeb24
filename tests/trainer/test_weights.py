"""trainer.weights: pretrained weights resolved before the search, offline first.

The Hugging Face cache is a real cache folder laid out the way huggingface_hub
writes it (refs/main, snapshots/<revision>/model.safetensors) with a real
test_resnet state dict; the "hub" is a local port with nothing listening.
"""
from __future__ import annotations

import socket
import time

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from helpers import free_port

from core.errors import BadInput
from trainer import weights
from trainer.model import create

REVISION = "0" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder in use for this test, and the hub marked offline."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_hf_cache(cache, arch: str) -> str:
    """Write arch's weights where huggingface_hub (and so timm) caches them; returns the file."""
    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model(arch).state_dict().items()}
    safetensors.torch.save_file(state, snapshot / "model.safetensors")
    return str(snapshot / "model.safetensors")


def test_weights_dir_comes_first_then_the_hf_cache(tmp_path, hf_cache, weights_dir):
    cached = put_in_hf_cache(hf_cache, "test_resnet")
    put_in_hf_cache(hf_cache, "test_efficientnet")
    found = weights.resolve(["test_resnet", "test_efficientnet", "test_vit"], str(weights_dir), "auto")
    assert found["test_resnet"] == weights.Resolved("test_resnet", str(weights_dir / "test_resnet.pth"), "weights-dir")
    assert found["test_efficientnet"].source == "hf-cache" and found["test_efficientnet"].file.endswith(
        "model.safetensors")
    assert found["test_vit"] == weights.Resolved("test_vit", None, "none")
    # without the weights dir, the cached file is found for test_resnet too
    assert weights.resolve(["test_resnet"], None, "auto")["test_resnet"].file == cached


def test_a_cached_file_loads_into_the_model(hf_cache):
    path = put_in_hf_cache(hf_cache, "test_resnet")
    model = create("test_resnet", num_classes=3, image_size=16, weights=path)
    reference = safetensors.torch.load_file(path)
    assert torch.equal(model.state_dict()["conv1.0.weight"], reference["conv1.0.weight"])
    assert model.get_classifier().out_features == 3


def test_yes_names_every_architecture_without_weights_and_how_to_get_them(hf_cache, weights_dir):
    with pytest.raises(BadInput) as e:
        weights.resolve(["test_resnet", "test_efficientnet", "test_vit"], str(weights_dir), "yes")
    message = str(e.value)
    assert "test_efficientnet, test_vit" in message and "test_resnet," not in message
    assert "python -m trainer.weights fetch test_efficientnet test_vit --out DIR" in message
    assert "\n" not in message


def test_no_trains_everything_from_scratch(weights_dir):
    found = weights.resolve(["test_resnet"], str(weights_dir), "no")
    assert found["test_resnet"].file is None


def test_bad_mode_and_missing_weights_dir_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="--pretrained 'maybe'"):
        weights.resolve(["test_resnet"], None, "maybe")
    with pytest.raises(BadInput, match="--weights-dir .*nowhere: folder not found"):
        weights.resolve(["test_resnet"], str(tmp_path / "nowhere"), "auto")


def test_a_hub_that_does_not_answer_costs_seconds_not_minutes(hf_cache, monkeypatch):
    """A refused connection (nothing listening on a local port) counts as offline, at once."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    port = free_port()   # bound and closed again: nothing listens there
    start = time.monotonic()
    assert not weights.hub_answers(f"http://127.0.0.1:{port}", timeout=2.0)
    found = weights.resolve(["test_resnet"], None, "auto", endpoint=f"http://127.0.0.1:{port}", timeout=2.0)
    assert found["test_resnet"].file is None
    assert time.monotonic() - start < 5


def test_a_listening_hub_counts_as_online(hf_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert weights.hub_answers(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=2.0)


def test_hf_hub_offline_means_no_probe(hf_cache):
    assert not weights.hub_answers("http://127.0.0.1:9", timeout=2.0)


def test_describe_says_where_or_that_it_trains_from_scratch():
    assert weights.describe(weights.Resolved("a", None, "none")) == \
        "a: no pretrained weights found offline; trains from scratch"
    assert weights.describe(weights.Resolved("a", "/w/a.pth", "weights-dir")) == \
        "a: pretrained weights from weights-dir (/w/a.pth)"


def test_check_cli_shows_the_source(weights_dir, hf_cache, capsys):
    assert weights.main(["check", "test_resnet", "test_vit", "--weights-dir", str(weights_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"test_resnet: weights-dir ({weights_dir / 'test_resnet.pth'})", "test_vit: not found offline"]


def test_fetch_of_an_unknown_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert weights.main(["fetch", "no_such_model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown timm model 'no_such_model'") and "\n" not in err
