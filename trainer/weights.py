"""Pretrained weights, resolved once before any trial starts.

For each architecture the driver looks, in this order, in ``--weights-dir``
(``DIR/<arch>.safetensors`` or ``.pth``), in the local Hugging Face and torch
hub caches that timm's own download fills, and on the hub only when it
answers within a few seconds. A trial is then given a file to load, or none,
and never calls timm's hub download itself: offline, that download retries
for minutes before it fails, once per trial.

Air-gapped machines: ``python -m trainer.weights fetch ARCH ... --out DIR`` on
a machine that is online (timm downloads them), then copy DIR over and pass
``--weights-dir DIR``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass

from core.errors import BadInput

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_TIMEOUT_S = 3.0
MODES = ("auto", "yes", "no")


@dataclass(frozen=True)
class Resolved:
    arch: str
    file: str | None     # a local file that holds the weights, None: train from scratch
    source: str          # weights-dir | hf-cache | torch-cache | hub | none: where it was found, or why not


def local_weights(arch: str, weights_dir: str | None) -> str | None:
    """<weights_dir>/<arch>{.safetensors,.pth,...}, also without a '.tag' suffix."""
    if not weights_dir:
        return None
    for name in (arch, arch.split(".")[0]):
        for suffix in WEIGHT_SUFFIXES:
            path = os.path.join(weights_dir, name + suffix)
            if os.path.exists(path):
                return path
    return None


def _pretrained_cfg(arch: str):
    import timm.models

    try:
        return timm.models.get_pretrained_cfg(arch, allow_unregistered=False)
    except (RuntimeError, ValueError):
        return None


def _hub_files(cfg) -> list[str]:
    if getattr(cfg, "hf_hub_filename", None):
        return [cfg.hf_hub_filename]
    return ["model.safetensors", "pytorch_model.bin"]


def cached_weights(arch: str) -> tuple[str, str] | None:
    """(file, source) from the Hugging Face cache or torch hub's checkpoint folder, without any network call."""
    cfg = _pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for name in _hub_files(cfg):
            path = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(path, str) and os.path.exists(path):
                return path, "hf-cache"
    if cfg.url:
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(cfg.url).path))
        if os.path.exists(path):
            return path, "torch-cache"
    return None


def hub_answers(endpoint: str | None = None, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub accepts a connection within ``timeout`` seconds.

    Only a TCP connect: enough to tell an offline machine (no route, no DNS, a
    firewall that drops packets) from an online one, and bounded in time,
    unlike the download's own retries. ``HF_HUB_OFFLINE=1`` means no.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(arch: str) -> str | None:
    """The hub's weight file for ``arch``, downloaded into the Hugging Face cache; None if it has none."""
    from huggingface_hub import hf_hub_download

    cfg = _pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for name in _hub_files(cfg):
        try:
            return hf_hub_download(repo, name, revision=revision or None, etag_timeout=HUB_TIMEOUT_S)
        except Exception:  # missing file, or the connection broke: try the next name
            continue
    return None


def resolve(archs: list[str], weights_dir: str | None, mode: str = "auto",
            endpoint: str | None = None, timeout: float = HUB_TIMEOUT_S) -> dict[str, Resolved]:
    """Every architecture's weights, or the reason it has none; BadInput under ``mode='yes'`` if any is missing."""
    if mode not in MODES:
        raise BadInput(f"--pretrained {mode!r}: choose one of {', '.join(MODES)}")
    if weights_dir and not os.path.isdir(weights_dir):
        raise BadInput(f"--weights-dir {weights_dir}: folder not found")
    if mode == "no":
        return {a: Resolved(a, None, "none") for a in archs}
    found: dict[str, Resolved] = {}
    for arch in archs:
        path = local_weights(arch, weights_dir)
        hit = (path, "weights-dir") if path else cached_weights(arch)
        if hit:
            found[arch] = Resolved(arch, *hit)
    missing = [a for a in archs if a not in found]
    online = bool(missing) and hub_answers(endpoint, timeout)
    for arch in missing:
        path = download(arch) if online else None
        found[arch] = Resolved(arch, path, "hub" if path else "none")
    lacking = [a for a in archs if found[a].file is None]
    if mode == "yes" and lacking:
        raise BadInput(
            f"--pretrained yes: no pretrained weights for {', '.join(lacking)} "
            f"(not in --weights-dir{' ' + weights_dir if weights_dir else ''}, not in the Hugging Face cache"
            f"{', and the hub did not answer' if not online else ''}); on a machine that is online run "
            f"`python -m trainer.weights fetch {' '.join(lacking)} --out DIR` and pass --weights-dir DIR, "
            "or use --pretrained auto")
    return {a: found[a] for a in archs}


def describe(r: Resolved) -> str:
    if r.file is None:
        return f"{r.arch}: no pretrained weights found offline; trains from scratch"
    return f"{r.arch}: pretrained weights from {r.source} ({r.file})"


# --- python -m trainer.weights fetch: fill a --weights-dir on an online machine ----------

def fetch(archs: list[str], out: str) -> list[str]:
    """Save each architecture's pretrained state dict as ``out/<arch>.safetensors``, through timm's own download."""
    import safetensors.torch
    import timm

    os.makedirs(out, exist_ok=True)
    written = []
    for arch in archs:
        if not timm.is_model(arch):
            raise BadInput(f"unknown timm model {arch!r}; see timm.list_models() for the names")
        model = timm.create_model(arch, pretrained=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        path = os.path.join(out, arch + ".safetensors")
        safetensors.torch.save_file(state, path)
        written.append(path)
        print(f"{arch}: {path}", flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.weights",
                                description="Pretrained weights for offline machines: fetch them where there is a "
                                            "network, check what a search would find.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download weights with timm and save DIR/<arch>.safetensors for --weights-dir")
    f.add_argument("archs", nargs="+", help="timm model names, e.g. convnext_small.fb_in22k vit_small_patch16_224")
    f.add_argument("--out", required=True, help="folder to write (then pass it as --weights-dir)")
    c = sub.add_parser("check", help="show where each architecture's weights would come from, without downloading")
    c.add_argument("archs", nargs="+")
    c.add_argument("--weights-dir")
    args = p.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.archs, args.out)
        else:
            for arch in args.archs:
                path = local_weights(arch, args.weights_dir)
                hit = (path, "weights-dir") if path else cached_weights(arch)
                print(f"{arch}: {hit[1]} ({hit[0]})" if hit else f"{arch}: not found offline")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
