"""Throughput and memory of the three heavy loops, at the demo size and at the paper size.

Each measurement runs in its own process (``python -m efsolo.benchmark --one SPEC``), so its
peak resident memory is its own: Free Mask (trunk + Eq. 1 + NMS), one FreeSOLO training step
(weak and strong views, forward, losses, backward, SGD) and inference (forward + Matrix NMS).
On CUDA the figures are in bf16 with channels_last, as training runs, with peak GPU memory
and, for the training step, the share of the GPU's peak bf16 FLOP/s it reaches (FLOPs counted
by ``torch.utils.flop_counter``). Inputs are random images with random box pseudo-masks:
throughput does not depend on what the pixels show.
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from efsolo.modeling.solo_model import SOLO, SOLOArch

# dense bf16 peak of common GPUs (TFLOP/s), by a substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}


@dataclass(frozen=True)
class Size:
    """One benchmark setting: network, input size and batch."""

    name: str
    arch: SOLOArch
    short_side: int
    long_side: int
    batch: int
    freemask_level: str
    freemask_scales: tuple[float, ...]
    iters: int = 3


DEMO = Size("demo", SOLOArch(arch="resnet18", fpn_channels=64, head_channels=128, head_convs=2, mask_channels=64,
                             kernel_dim=64, grids=(24, 20, 16, 12, 8), freeze_at=4),
            160, 160, 4, "c3", (0.5, 0.25), iters=5)
PAPER = Size("paper", SOLOArch(), 800, 1333, 1, "c5", (1.0, 0.5, 0.25), iters=2)
TINY = Size("tiny", SOLOArch(arch="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16,
                             kernel_dim=8, grids=(8, 6, 4, 3, 2), freeze_at=4), 64, 64, 2, "c3", (0.5,), iters=1)
SIZES = {s.name: s for s in (DEMO, PAPER, TINY)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(size: Size, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = (size.short_side + 31) // 32 * 32, (size.long_side + 31) // 32 * 32
    images = torch.rand(batch, 3, h, w, generator=g)
    masks, embeds = [], []
    for _ in range(batch):
        m = torch.zeros(3, h, w, dtype=torch.bool)
        for k in range(3):
            y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            m[k, y0:y0 + h // 3, x0:x0 + w // 3] = True
        masks.append(m.to(device))
        embeds.append(torch.randn(3, size.arch.embed_dim, generator=g).to(device))
    return images.to(device), masks, embeds


def _timed(fn, device: torch.device, iters: int) -> float:
    fn()  # warm-up (allocator, kernels, autotuning)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def bench_freemask(size: Size, device: torch.device) -> dict:
    from efsolo.modeling.backbone import ResNetTrunk
    from efsolo.freemask.free_mask import free_mask
    from efsolo.modeling.inference import normalise

    trunk = ResNetTrunk(size.arch.arch, 32).to(device).eval()
    amp = device.type == "cuda"
    if amp:
        trunk = trunk.to(memory_format=torch.channels_last)
    # Free Mask runs at the size it is given; the demo's runs at twice the image size (320 px)
    scale = 2 if size.name == "demo" else 1
    sz = replace(size, short_side=size.short_side * scale, long_side=size.long_side * scale)
    x, _, _ = _inputs(sz, size.batch, device)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = trunk(normalise(x))[size.freemask_level]
        free_mask(feats.float(), size.freemask_scales, keep_top=20)

    sec = _timed(step, device, size.iters)
    return {"images_per_second": size.batch / sec, "input": f"{sz.short_side}x{sz.long_side}"}


def _train_parts(size: Size, device: torch.device):
    from efsolo.config import LossSettings
    from efsolo.modeling.inference import normalise
    from efsolo.engine.train import solo_losses
    from efsolo.data.views import copy_paste, strong_view

    model = SOLO(size.arch).to(device).train()
    amp = device.type == "cuda"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x, masks, embeds = _inputs(size, size.batch, device)
    g = torch.Generator(device=device).manual_seed(0)

    def forward_loss():
        strong = strong_view(x, g)
        strong, s_masks, s_embeds = copy_paste(strong, masks, embeds, g, 0.5)
        images = torch.cat([x, strong])
        inp = normalise(images)
        if amp:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(inp)
        return solo_losses(out, images, masks + s_masks, embeds + s_embeds, size.arch.grids, LossSettings(), step=10**6)["total"]

    def step() -> None:
        loss = forward_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, forward_loss, opt


def bench_train(size: Size, device: torch.device) -> dict:
    step, forward_loss, opt = _train_parts(size, device)
    sec = _timed(step, device, size.iters)
    out = {"images_per_second": size.batch / sec, "input": f"{size.short_side}x{size.long_side}",
           "batch": size.batch, "views_per_image": 2}
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = forward_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    flops = counter.get_total_flops()
    out["tflop_per_step"] = flops / 1e12
    out["achieved_tflops"] = flops / sec / 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            out["share_of_peak_bf16"] = out["achieved_tflops"] / peak
    return out


def bench_train_breakdown(size: Size, device: torch.device) -> dict:
    """Where a training iteration's time goes: views (strong view + copy-paste), the trunk's
    forward, the rest of the forward (FPN, heads, mask branch), the losses (target assignment
    included), backward, and the SGD step; seconds per iteration and shares."""
    from efsolo.config import LossSettings
    from efsolo.modeling.inference import normalise
    from efsolo.engine.train import solo_losses
    from efsolo.data.views import copy_paste, strong_view

    model = SOLO(size.arch).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x, masks, embeds = _inputs(size, size.batch, device)
    g = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda"
    parts = dict.fromkeys(("views", "trunk_forward", "heads_forward", "losses", "backward", "optimizer"), 0.0)

    def timed(name: str, fn):  # noqa: ANN001, ANN202
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        parts[name] += time.perf_counter() - t0
        return out

    def one() -> None:
        strong, s_masks, s_embeds = timed("views", lambda: copy_paste(strong_view(x, g), masks, embeds, g, 0.5))
        images = torch.cat([x, strong])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = timed("trunk_forward", lambda: model.trunk(normalise(images)))
            out = timed("heads_forward", lambda: model.forward_from_trunk(feats))
        loss = timed("losses", lambda: solo_losses(out, images, masks + s_masks, embeds + s_embeds, size.arch.grids,
                                                   LossSettings(), step=10**6)["total"])
        opt.zero_grad(set_to_none=True)
        timed("backward", loss.backward)
        timed("optimizer", opt.step)

    one()  # warm-up
    for k in parts:
        parts[k] = 0.0
    for _ in range(size.iters):
        one()
    total = sum(parts.values())
    out = {f"{k}_s": v / size.iters for k, v in parts.items()}
    out.update({f"{k}_share": v / total for k, v in parts.items()})
    out["images_per_second"] = size.batch * size.iters / total
    out["input"] = f"{size.short_side}x{size.long_side}"
    return out


def bench_inference(size: Size, device: torch.device) -> dict:
    from efsolo.config import TestSettings
    from efsolo.modeling.inference import predict_image

    model = SOLO(size.arch).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    img = (np.random.default_rng(0).random((size.short_side, size.long_side, 3)) * 255).astype(np.uint8)
    sec = _timed(lambda: predict_image(model, img, size.short_side, size.long_side, TestSettings(score_threshold=0.0),
                                       device), device, size.iters)
    return {"images_per_second": 1 / sec, "input": f"{size.short_side}x{size.long_side}"}


MEASURES = {"freemask": bench_freemask, "train_step": bench_train, "train_breakdown": bench_train_breakdown,
            "inference": bench_inference}


def measure_one(spec: dict) -> dict:
    """Run one measurement in this process: ``{"what", "size", "device"}`` -> figures + peak memory."""
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    size = SIZES[spec["size"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = MEASURES[spec["what"]](size, device)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {**spec, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}}


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(sizes: list[str], devices: list[str], whats: list[str] | None = None, timeout: float = 3600) -> dict:
    """Every (device, size, measurement) in its own process; a failure (e.g. out of memory) is
    recorded with its last error line, the others still run."""
    rows = []
    for device in devices:
        for size in sizes:
            for what in whats or list(MEASURES):
                spec = {"what": what, "size": size, "device": device}
                proc = subprocess.run([sys.executable, "-m", "efsolo.benchmark", "--one", json.dumps(spec)],
                                      capture_output=True, text=True, timeout=timeout)
                if proc.returncode == 0:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    err = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                    rows.append({**spec, "error": err[:300]})
                print(_row_text(rows[-1]), flush=True)
    return {"machine": machine(), "results": rows,
            "sizes": {s: {**asdict(SIZES[s]), "arch": asdict(SIZES[s].arch)} for s in sizes}}


def _row_text(r: dict) -> str:
    if "error" in r:
        return f"{r['device']:5} {r['size']:6} {r['what']:11} failed: {r['error']}"
    extra = f", {r['achieved_tflops'] * 1000:.1f} GFLOP/s" if "achieved_tflops" in r else ""
    if "views_share" in r:
        extra += " (" + ", ".join(f"{k[:-6]} {100 * r[k]:.0f}%" for k in r if k.endswith("_share")) + ")"
    return (f"{r['device']:5} {r['size']:6} {r['what']:11} {r['images_per_second']:8.2f} img/s, peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB" + (f", GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else "") + extra)


def table(bench: dict) -> str:
    """The results as a Markdown table, with the machine they were measured on."""
    lines = ["| device | size (input) | loop | img/s | peak RSS (MiB) | peak GPU (MiB) | train GFLOP/s | share of "
             "peak bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['size']} | {r['what']} | failed: {r['error']} | | | | |")
            continue
        gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        flops = f"{r['achieved_tflops'] * 1000:.1f}" if "achieved_tflops" in r else "-"
        share = f"{r['share_of_peak_bf16'] * 100:.1f}%" if "share_of_peak_bf16" in r else "-"
        what = r["what"]
        if "views_share" in r:  # the per-iteration breakdown, in percent of the iteration
            what += ": " + ", ".join(f"{k[:-6].replace('_', ' ')} {100 * r[k]:.0f}%" for k in r if k.endswith("_share"))
        lines.append(f"| {r['device']} | {r['size']} ({r['input']}) | {what} | {r['images_per_second']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {gpu} | {flops} | {share} |")
    m = bench["machine"]
    lines += ["", f"Measured on: {m['cpu']}, {m['cores']} threads" + (f", {m['gpu']}" if "gpu" in m else "") +
              f"; torch {m['torch']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure_one(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m efsolo.benchmark --one SPEC (use benchmarks/bench.py)")
