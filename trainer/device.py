"""Where the trainer runs, and the one place where a CPU and a CUDA device must differ.

The trainer has two branches:

- the accelerator branch: augmentation on the tensor's device (kornia),
  autocast, channels_last tensors and model;
- the plain CPU branch: albumentations in the loader's worker processes
  over the node cache, float32.

A CUDA device takes the accelerator branch. ``--gpu-path-on-cpu``
(``TrialContext.gpu_path_on_cpu``) takes it on a CPU too, so the code a GPU
runs is run, trained, checkpointed and predicted with, on a machine that has
none. What cannot be the same is decided in ``device_for`` alone: autocast's
dtype (CPU autocast supports bfloat16 only; a GPU without bfloat16 needs
float16, and float16 needs loss scaling), pinned host memory (CUDA only),
and oneDNN, which the branch does not use on a CPU: on a CPU with bfloat16
instructions (AVX512-BF16), oneDNN 3.12's bfloat16 channels_last weight
gradient of a convolution came back with blocks of 96 NaN or 1e21-1e31
values in 17 of 120 steps of test_resnet at 16 px (layer4.0.conv1; measured
2026-12-06 on an AMD EPYC), and 0 of 120 with oneDNN off, at the same speed.
The scaler, the loss and the optimiser step are the same code on both: a
``GradScaler`` that is not enabled passes the loss through.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    device: torch.device
    accelerated: bool                 # the accelerator branch: kornia on the device, autocast, channels_last
    amp_dtype: torch.dtype | None     # autocast's dtype; None: no autocast
    loss_scaling: bool                # float16 autocast: a GradScaler scales the loss
    pin_memory: bool                  # page-locked host batches (CUDA copies them asynchronously)
    onednn: bool = True               # False: a training step runs without oneDNN (the CPU bfloat16 bug above)

    @property
    def type(self) -> str:
        return self.device.type

    def autocast(self):
        """Autocast in ``amp_dtype`` on this device, or nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def kernels(self):
        """Around a training step's forward and backward: the kernel libraries this branch may use. Only the
        enabled flag is switched (``mkldnn.flags()`` would also set TF32, and warn on every CPU build)."""
        if self.onednn:
            yield
            return
        was = torch.backends.mkldnn.set_flags(_enabled=False, _fp32_precision=None)[0]
        try:
            yield
        finally:
            torch.backends.mkldnn.set_flags(_enabled=was, _fp32_precision=None)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.accelerated else torch.contiguous_format


PLAIN_CPU = Device(torch.device("cpu"), False, None, loss_scaling=False, pin_memory=False)


def device_for(gpu_path_on_cpu: bool = False) -> Device:
    """The trainer's device: CUDA when there is one, else the CPU (the accelerator branch with the switch)."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return Device(torch.device("cuda"), True, torch.bfloat16 if bf16 else torch.float16, loss_scaling=not bf16,
                      pin_memory=True)
    if gpu_path_on_cpu:
        return Device(torch.device("cpu"), True, torch.bfloat16, loss_scaling=False, pin_memory=False, onednn=False)
    return PLAIN_CPU


def device_of(model: torch.nn.Module) -> Device:
    """The branch for a model already placed, when the caller does not say: a CUDA model the accelerator
    branch, a CPU model the plain one."""
    return device_for() if next(model.parameters()).device.type == "cuda" else PLAIN_CPU
