"""Load a checkpoint safely and predict class probabilities from cached uint8 images."""
from __future__ import annotations

import io

import numpy as np
import torch

from core import storage
from core.experiment import Checkpoint
from trainer import model as models
from trainer.device import Device, device_of


def to_input(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, augment=None,
             memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """uint8 BxHxWx3 (already on the device) -> normalised float Bx3xHxW (channels_last on a CUDA device, or
    as ``memory_format`` says)."""
    x = batch.permute(0, 3, 1, 2).float()
    # (x / 255 - mean) / std as one fused pass (addcmul), in place: this is
    # memory-bound, and every extra pass over the batch shows on a CPU.
    if augment is not None:
        x = augment(x.div_(255))
        x = torch.addcmul(-mean / std, x, 1 / std, out=x)
    else:
        x = torch.addcmul(-mean / std, x, 1 / (255 * std), out=x)
    if memory_format is None:
        memory_format = torch.channels_last if x.is_cuda else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


def norm_stats(model: torch.nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.pretrained_cfg
    shape = (1, 3, 1, 1)
    return (torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(shape),
            torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(shape))


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray, rows: np.ndarray | None = None,
                  batch_size: int = 256, tta: bool = False, dev: Device | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) float32; with ``tta`` averaged with the mirror image. ``dev``: the
    branch it runs on (default: the model's device's, ``device_of``)."""
    dev = dev or device_of(model)
    mean, std = norm_stats(model, dev.device)
    rows = np.arange(len(images)) if rows is None else rows
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(np.asarray(images[rows[start:start + batch_size]])).to(dev.device)
        x = to_input(batch, mean, std, memory_format=dev.memory_format())
        with dev.autocast():
            p = model(x).float().softmax(1)
            if tta:
                p = (p + model(x.flip(3)).float().softmax(1)) / 2
        out.append(p.cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def save_weights(model: torch.nn.Module, path) -> None:
    """The state dict to a file path or a writable buffer (read back with weights_only=True)."""
    torch.save(model.state_dict(), path)


def load_model(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A checkpoint folder (local or URI) -> (model in eval mode, its config)."""
    folder = Checkpoint(checkpoint)
    config = folder.config()
    model = models.create(config["arch"], config["num_classes"], config["image_size"])
    # weights_only: a checkpoint from a bucket must not be able to run code.
    state = torch.load(io.BytesIO(storage.read_bytes(folder.model)), map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), config
