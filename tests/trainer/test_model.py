"""trainer.model: timm models with local pretrained weights, freezing, class weights, arch checks."""
from __future__ import annotations

import pytest
import timm
import torch

from core.errors import BadInput
from trainer.model import check_arch, class_weights, create, freeze
from trainer.weights import local_weights


def test_create_gives_the_requested_head_and_runs():
    model = create("test_resnet", num_classes=4, image_size=16)
    assert model.get_classifier().out_features == 4
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_create_passes_the_image_size_to_a_transformer():
    model = create("test_vit", num_classes=3, image_size=32)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_pretrained_weights_come_from_a_local_file(weights_dir):
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet").state_dict()  # what weights_dir/test_resnet.pth holds
    torch.manual_seed(123)  # a different init, so equality below means "loaded"
    model = create("test_resnet", num_classes=3, image_size=16, weights=local_weights("test_resnet", str(weights_dir)))
    state = model.state_dict()
    backbone = [k for k in reference if not k.startswith("fc.")]
    assert backbone
    for k in backbone:
        assert torch.equal(state[k], reference[k]), k
    # the head is new: 3 classes, not the file's 1000
    assert state["fc.weight"].shape == (3, reference["fc.weight"].shape[1])
    assert reference["fc.weight"].shape[0] == 1000


def test_without_a_weights_file_the_model_is_freshly_initialised(weights_dir):
    torch.manual_seed(123)
    model = create("test_resnet", num_classes=3, image_size=16)
    reference = torch.load(weights_dir / "test_resnet.pth", weights_only=True)
    assert not torch.equal(model.state_dict()["conv1.0.weight"], reference["conv1.0.weight"])


def test_local_weights_finds_a_tagged_name_and_suffixes(tmp_path):
    assert local_weights("test_resnet", None) is None
    assert local_weights("test_resnet", str(tmp_path)) is None
    (tmp_path / "test_resnet.safetensors").write_bytes(b"")
    assert local_weights("test_resnet.r160_in1k", str(tmp_path)) == str(tmp_path / "test_resnet.safetensors")
    (tmp_path / "test_resnet.r160_in1k.pth").write_bytes(b"")
    # the exact (tagged) name wins over the untagged one
    assert local_weights("test_resnet.r160_in1k", str(tmp_path)) == str(tmp_path / "test_resnet.r160_in1k.pth")


def test_freeze_half_the_backbone_never_the_head():
    model = create("test_resnet", num_classes=3, image_size=16)
    head = {id(p) for p in model.get_classifier().parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head]
    freeze(model, 0.5)
    frozen = [p for p in backbone if not p.requires_grad]
    assert abs(len(frozen) - len(backbone) / 2) <= 1
    # the first tensors are the frozen ones (the stem), the last stay trainable
    assert not backbone[0].requires_grad and backbone[-1].requires_grad
    assert all(p.requires_grad for p in model.get_classifier().parameters())


def test_freeze_everything_still_leaves_the_head_trainable():
    model = create("test_resnet", num_classes=3, image_size=16, freeze_fraction=1.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("fc.") for n in trainable)


def test_create_with_freeze_fraction_zero_freezes_nothing():
    model = create("test_resnet", num_classes=3, image_size=16, freeze_fraction=0.0)
    assert all(p.requires_grad for p in model.parameters())


def test_class_weights_power_zero_is_unweighted():
    w = class_weights([0, 0, 0, 0, 1, 1, 2], 3, power=0.0)
    assert torch.allclose(w, torch.ones(3))


def test_class_weights_power_one_is_inverse_frequency():
    labels = [0] * 8 + [1] * 4 + [2] * 2
    w = class_weights(labels, 3, power=1.0)
    assert w.shape == (3,)
    assert w[0] < w[1] < w[2]
    assert w.mean().item() == pytest.approx(1.0)
    # exactly proportional to 1 / count
    assert (w[2] / w[0]).item() == pytest.approx(4.0)
    assert (w[1] / w[0]).item() == pytest.approx(2.0)


def test_class_weights_half_power_lies_between():
    labels = [0] * 9 + [1]
    w0, w_half, w1 = (class_weights(labels, 2, p) for p in (0.0, 0.5, 1.0))
    ratio = lambda w: (w[1] / w[0]).item()  # noqa: E731
    assert ratio(w0) == pytest.approx(1.0)
    assert ratio(w_half) == pytest.approx(3.0)
    assert ratio(w1) == pytest.approx(9.0)


def test_class_weights_survive_a_class_absent_from_the_fold():
    w = class_weights([0, 0, 1], 3, power=1.0)
    assert torch.isfinite(w).all()


def test_check_arch_accepts_timm_names_and_rejects_unknown_ones():
    check_arch("test_resnet")
    check_arch("resnet50")
    with pytest.raises(BadInput, match="resnet_does_not_exist"):
        check_arch("resnet_does_not_exist")
