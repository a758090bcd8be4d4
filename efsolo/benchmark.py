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

from pathlib import Path

import numpy as np
import torch

from efsolo.config import Params, load_params
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
    freemask_short: int
    freemask_long: int
    iters: int = 3
    pretrain_batch: int = 32  # DenseCL pretraining: crops a view
    pretrain_crop: int = 96


def size_from_params(name: str, p: Params, iters: int, batch: int | None = None, square: bool | None = None) -> Size:
    """The sizes a params file trains and labels at: FreeSOLO's network, its largest training side,
    its batch (``batch`` overrides it), Free Mask's level, scales and side, and the pretraining's batch
    and crop. Synthetic images are square (``square`` None: from ``data.source``); other images are
    measured at the long-side cap."""
    i, f = p.freesolo.input, p.freemask
    square = p.data.source == "synthetic" if square is None else square
    short = max(i.train_short_sides)
    arch = SOLOArch(backbone=p.backbone.arch, embed_dim=f.embed_dim, **asdict(p.freesolo.model))
    return Size(name, arch, short, short if square else i.max_side, batch or p.freesolo.solver.batch_size,
                f.feature_level, f.query_scales, f.short_side, f.short_side if square else f.max_side, iters=iters,
                pretrain_batch=p.backbone.pretrain.batch_size, pretrain_crop=p.backbone.pretrain.crop_size)


TINY = Size("tiny", SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16,
                             kernel_dim=8, grids=(8, 6, 4, 3, 2), freeze_at=4), 64, 64, 2, "c3", (0.5,), 64, 64, iters=1,
            pretrain_batch=4, pretrain_crop=48)
SIZE_NAMES = ("demo", "paper", "tiny")


def size_named(name: str, params_path: str | Path = "params.yaml") -> Size:
    """``demo``: the sizes of ``params_path``; ``paper``: the paper profile's (the params defaults),
    one image a step (eight at 800 x 1333 take minutes a step on a CPU); ``tiny``: for the tests."""
    if name == "tiny":
        return TINY
    if name == "paper":
        return size_from_params("paper", Params(), iters=2, batch=1, square=False)
    return size_from_params("demo", load_params(params_path), iters=5)


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

    trunk = ResNetTrunk(size.arch.backbone, 32).to(device).eval()
    amp = device.type == "cuda"
    if amp:
        trunk = trunk.to(memory_format=torch.channels_last)
    sz = replace(size, short_side=size.freemask_short, long_side=size.freemask_long)
    x, _, _ = _inputs(sz, size.batch, device)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = trunk(normalise(x))[size.freemask_level]
        free_mask(feats.float(), size.freemask_scales, keep_top=20)

    sec = _timed(step, device, size.iters)
    return {"images_per_second": size.batch / sec, "input": f"{sz.short_side}x{sz.long_side}"}


def _train_parts(size: Size, device: torch.device, precision: str = "float32"):
    from efsolo.config import LossSettings
    from efsolo.modeling.inference import normalise
    from efsolo.modeling.solo_loss import solo_losses
    from efsolo.data.views import copy_paste, strong_view

    model = SOLO(size.arch).to(device).train()
    amp = _amp(precision)
    if device.type == "cuda":
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
        if device.type == "cuda":
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


def bench_train(size: Size, device: torch.device, precision: str = "float32") -> dict:
    step, forward_loss, opt = _train_parts(size, device, precision)
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
    out["precision"] = precision
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            out["share_of_peak_bf16"] = out["achieved_tflops"] / peak
    else:
        peak = cpu_peak()[precision]
        if peak:  # nominal, from the CPU's flags, cores and clock (``peak_gflops``)
            out[f"share_of_peak_{'bf16' if precision == 'bfloat16' else 'fp32'}"] = \
                out["achieved_tflops"] * 1000 / peak
    return out


class _Clock:
    """Wall-clock sums by name (seconds), with device synchronisation around each section."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.sums = device, {}

    def section(self, name: str, fn):  # noqa: ANN001, ANN201
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.sums[name] = self.sums.get(name, 0.0) + time.perf_counter() - t0
        return out


def _cut(x):  # noqa: ANN001, ANN202
    """A leaf copy of a tensor (or list of them) that collects the gradient arriving there."""
    if isinstance(x, (list, tuple)):
        return [_cut(t) for t in x]
    return x.detach().requires_grad_(x.requires_grad)


def _grads(cut) -> list:  # noqa: ANN001
    flat = cut if isinstance(cut, list) else [cut]
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in flat]


def _flat(x) -> list:  # noqa: ANN001
    return [t for v in x for t in (_flat(v) if isinstance(v, (list, tuple)) else [v])]


def _amp(precision: str) -> bool:
    """Whether the networks run under bf16 autocast (``precision`` bfloat16; float32 otherwise)."""
    return precision == "bfloat16"


def bench_train_profile(size: Size, device: torch.device, precision: str = "float32") -> dict:
    """Where one FreeSOLO training iteration's time goes: the data loader (decoded images and
    masks resized, flipped, padded: ``make_batch``), the strong views and copy-paste, the forward
    and backward of each trunk stage, the FPN, the instance head and the mask branch, each loss
    term's forward (target assignment and the rest: ``loss other``), the loss terms' backward,
    and the SGD step. The network is cut between its parts (each part's input a leaf that
    collects its gradient), so each backward is timed on its own; the arithmetic is the training
    step's. Seconds per iteration, and shares."""
    import efsolo.modeling.solo_loss as solo_loss  # its loss terms are wrapped with clocks below
    from efsolo.config import LossSettings
    from efsolo.data.pseudo_labels import make_batch
    from efsolo.data.views import copy_paste, strong_view
    from efsolo.modeling.inference import normalise
    from efsolo.modeling.solo_model import SOLOOutput, level_features

    model = SOLO(size.arch).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x, masks, embeds = _inputs(size, size.batch, device)
    samples = [((x[i].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8), masks[i].cpu().numpy(),
                embeds[i].cpu().numpy()) for i in range(size.batch)]
    g = torch.Generator(device=device).manual_seed(0)
    clock = _Clock(device)
    stages = model.trunk._stages()
    names = ["trunk stem", "trunk res2", "trunk res3", "trunk res4", "trunk res5"]
    terms = ("max_projection_loss", "avg_projection_loss", "pairwise_loss", "focal_loss", "semantic_loss",
             "colour_similarity")
    originals = {n: getattr(solo_loss, n) for n in terms}

    def timed(n: str):  # noqa: ANN202
        return lambda *a, **k: clock.section(f"loss {n.replace('_loss', '').replace('_', ' ')}",
                                             lambda: originals[n](*a, **k))

    ls = LossSettings()

    def one() -> None:
        clock.section("data loader", lambda: make_batch(samples, size.short_side, size.long_side, [True] * size.batch))
        strong, s_masks, s_embeds = clock.section("views and copy-paste",
                                                  lambda: copy_paste(strong_view(x, g), masks, embeds, g, 0.5))
        images = torch.cat([x, strong])
        parts = []  # (name, output, input leaf): backward runs from the loss back through them
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_amp(precision)):
            h = clock.section("network other forward", lambda: normalise(images))
            x_in = h
            feats = {}
            for i, (name, stage) in enumerate(zip(names, stages)):
                leaf = _cut(h)
                h = clock.section(f"{name} forward", lambda: stage(leaf))  # noqa: B023
                parts.append((name, h, leaf))
                if i >= 1:
                    feats[f"c{i + 1}"] = h
            c = [_cut(feats[k]) for k in ("c2", "c3", "c4", "c5")]
            ps = clock.section("fpn forward", lambda: model.fpn(c))
            parts.append(("fpn", ps, c))
            ps_head, ps_mask = _cut(ps), _cut(ps[:4])
            # as training runs it: kernels and embeddings at the positive cells only (in "loss other")
            h = clock.section("head forward", lambda: model.head(level_features(ps_head), dense=False))
            parts.append(("head", [h.cates, h.kernel_feats, h.cate_feats], ps_head))
            mask_feat = clock.section("mask branch forward", lambda: model.mask_branch(ps_mask, x_in))
            parts.append(("mask branch", mask_feat, ps_mask))
        outs = _cut([h.cates, h.kernel_feats, h.cate_feats, mask_feat])
        out = SOLOOutput(outs[0], None, None, outs[3], trunk=None, mask_stride=model.mask_branch.stride,
                         head=model.head, kernel_feats=outs[1], cate_feats=outs[2])
        loss = clock.section("losses forward", lambda: solo_loss.solo_losses(out, images, masks + s_masks, embeds + s_embeds,
                                                                      size.arch.grids, ls, step=10**6)["total"])
        opt.zero_grad(set_to_none=True)
        clock.section("loss terms backward", loss.backward)
        arriving = {"head": _grads(outs[0]) + _grads(outs[1]) + _grads(outs[2]), "mask branch": _grads(outs[3])}
        for name, out_t, leaf in reversed(parts):
            flat = _flat(out_t) if isinstance(out_t, (list, tuple)) else [out_t]
            if not any(t.requires_grad for t in flat):
                continue  # a fixed trunk stage: no backward
            if name in arriving:
                grads = arriving[name]
            elif name == "fpn":
                gh, gm = _grads(ps_head), _grads(ps_mask)
                grads = [a + b for a, b in zip(gh, gm + [torch.zeros_like(gh[-1])])]
            else:  # trunk stage k: its output feeds the FPN (C2..C5) and the next stage
                k = names.index(name)
                grad = torch.zeros_like(flat[0])
                if k >= 1 and c[k - 1].grad is not None:
                    grad = grad + c[k - 1].grad
                if k + 1 < len(names) and parts[k + 1][2].grad is not None:
                    grad = grad + parts[k + 1][2].grad
                grads = [grad]
            clock.section(f"{name} backward", lambda: torch.autograd.backward(flat, grads))  # noqa: B023
        clock.section("optimizer", opt.step)

    for n in terms:
        setattr(solo_loss, n, timed(n))
    try:
        one()  # warm-up
        clock.sums.clear()
        for _ in range(size.iters):
            one()
    finally:
        for n, f in originals.items():
            setattr(solo_loss, n, f)
    s = {k: v / size.iters for k, v in clock.sums.items()}
    s["loss other"] = s.pop("losses forward") - sum(v for k, v in s.items() if k.startswith("loss ")
                                                    and k != "loss terms backward")
    step = sum(s.values())
    parts = {k: round(v, 4) for k, v in s.items()}
    return {"precision": precision, "step_s": round(step, 4), "images_per_second": size.batch / step,
            "input": f"{size.short_side}x{size.long_side}", "parts_s": parts,
            "parts_share": {k: round(v / step, 3) for k, v in parts.items()}}


def bench_pretrain_profile(size: Size, device: torch.device, precision: str = "float32") -> dict:
    """Where one DenseCL pretraining iteration's time goes (``size``'s backbone, ``pretrain_batch``
    crops of ``pretrain_crop`` px in two views): augmentation, the query encoder's forward, the
    momentum encoder's update and forward, the loss, backward, the SGD step. Seconds and shares."""
    from efsolo.engine.pretrain import DenseCLEncoder, densecl_loss, make_augment

    import copy
    import torch.nn.functional as F

    batch, crop = size.pretrain_batch, size.pretrain_crop
    enc_q = DenseCLEncoder(size.arch.backbone, 128).to(device).train()
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    opt = torch.optim.SGD(enc_q.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    queue = F.normalize(torch.randn(128, 2048, device=device), dim=0)
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 160, 160, generator=g) * 255).to(torch.uint8) for _ in range(batch)]
    augment = make_augment(crop, 0.0, 0.0)
    clock = _Clock(device)

    def one() -> None:
        v1, v2 = clock.section("augmentation", lambda: (torch.stack([augment(im) for im in images]).to(device),
                                                        torch.stack([augment(im) for im in images]).to(device)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_amp(precision)):
            f_q, g_q, d_q = clock.section("query encoder forward", lambda: enc_q(v1))

            def key() -> tuple:
                with torch.no_grad():
                    for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters()):
                        p_k.mul_(0.99).add_(p_q.detach(), alpha=0.01)
                    return enc_k(v2)

            f_k, g_k, d_k = clock.section("momentum encoder update and forward", key)
        loss = clock.section("loss", lambda: densecl_loss(g_q.float(), g_k.float(), d_q.float(), d_k.float(),
                                                          f_q.float(), f_k.float(), queue, queue, 0.2, 0.5)[0])
        opt.zero_grad(set_to_none=True)
        clock.section("backward", loss.backward)
        clock.section("optimizer", opt.step)

    one()
    clock.sums.clear()
    for _ in range(size.iters):
        one()
    s = {k: round(v / size.iters, 4) for k, v in clock.sums.items()}
    step = sum(s.values())
    return {"precision": precision, "step_s": round(step, 4), "images_per_second": 2 * batch / step,
            "input": f"{crop}x{crop}", "parts_s": s, "parts_share": {k: round(v / step, 3) for k, v in s.items()}}


def peak_gflops(flags: list[str], cores: int, mhz: float) -> dict:
    """Nominal peak of a CPU from its flags: float32 FMA lanes per cycle (two 256-bit FMA units
    with avx2 + fma: 32 FLOP a cycle a core; 64 with avx512f) x cores x clock; bf16 dot products
    (avx512_bf16 / amx_bf16) double it, and without them bf16 is emulated (no bf16 peak)."""
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags and "avx2" in flags else 8
    fp32 = per_cycle * cores * mhz / 1000
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return {"float32": round(fp32, 1), "bfloat16": round(2 * fp32, 1) if has_bf16 else None,
            "bf16_instructions": has_bf16}


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


MEASURES = {"freemask": bench_freemask, "train_step": bench_train, "train_profile": bench_train_profile, "pretrain_profile": bench_pretrain_profile,
            "inference": bench_inference}


PRECISION_AWARE = ("train_step", "train_profile", "pretrain_profile")


def measure_one(spec: dict) -> dict:
    """Run one measurement in this process: ``{"what", "size", "device"[, "precision"]}`` -> figures
    + peak memory."""
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    size = size_named(spec["size"], spec.get("params", "params.yaml"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    extra = {"precision": spec["precision"]} if spec.get("precision") and spec["what"] in PRECISION_AWARE else {}
    out = MEASURES[spec["what"]](size, device, **extra)
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
    info["peak_gflops"] = cpu_peak()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_peak(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """``peak_gflops`` of this machine's CPU, for the threads torch uses (empty figures when
    /proc/cpuinfo cannot be read)."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return {"float32": None, "bfloat16": None, "bf16_instructions": False}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    mhz = next((float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")), 0.0)
    return {**peak_gflops(flags, torch.get_num_threads(), mhz), "mhz": mhz}


def run_benchmarks(names: list[str], devices: list[str], whats: list[str] | None = None, timeout: float = 3600,
                   precisions: tuple[str, ...] = ("float32",), params: str | Path = "params.yaml") -> dict:
    """Every (device, size, measurement) in its own process; a failure (e.g. out of memory) is
    recorded with its last error line, the others still run. The training loops run in each of
    ``precisions`` at the demo size (at other sizes in float32 on the CPU: emulated bf16 takes minutes
    a step there). The demo's sizes are ``params``'s."""
    rows = []
    specs = []
    for device in devices:
        for size in names:
            for what in whats or list(MEASURES):
                cpu_only_fp32 = device == "cpu" and size != "demo"
                for precision in (precisions if what in PRECISION_AWARE and not cpu_only_fp32 else ("float32",)):
                    specs.append({"what": what, "size": size, "device": device, "precision": precision,
                                  "params": str(params)})
    for spec in specs:
        proc = subprocess.run([sys.executable, "-m", "efsolo.benchmark", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            err = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            rows.append({**spec, "error": err[:300]})
        print(_row_text(rows[-1]), flush=True)
    return {"machine": machine(), "results": rows,
            "sizes": {s: asdict(size_named(s, params)) for s in names}}  # asdict recurses into arch


def _share(r: dict) -> str:
    """The step's share of its device's nominal peak, in the row's precision."""
    key = next((k for k in ("share_of_peak_bf16", "share_of_peak_fp32") if k in r), None)
    return f"{100 * r[key]:.1f}% of {key[len('share_of_peak_'):]} peak" if key else "-"


def _parts(r: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["parts_share"].items(), key=lambda kv: -kv[1])
                     if v >= 0.01)


def _row_text(r: dict) -> str:
    head = f"{r['device']:5} {r['size']:6} {r['what']:16} {r.get('precision', 'float32'):8}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    extra = f", {r['achieved_tflops'] * 1000:.1f} GFLOP/s, {_share(r)}" if "achieved_tflops" in r else ""
    if "parts_share" in r:
        extra += f", {r['step_s']:.3f} s a step ({_parts(r)})"
    return (f"{head} {r['images_per_second']:8.2f} img/s, peak RSS {r['peak_rss_mib']:.0f} MiB" +
            (f", GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else "") + extra)


def table(bench: dict) -> str:
    """The results as a Markdown table, with the machine they were measured on."""
    lines = ["| device | size (input) | loop | precision | img/s | peak RSS (MiB) | peak GPU (MiB) | train GFLOP/s | "
             "share of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        prec = r.get("precision", "float32")
        if "error" in r:
            lines.append(f"| {r['device']} | {r['size']} | {r['what']} | {prec} | failed: {r['error']} | | | | |")
            continue
        gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        flops = f"{r['achieved_tflops'] * 1000:.1f}" if "achieved_tflops" in r else "-"
        what = r["what"] + (f": {_parts(r)}" if "parts_share" in r else "")
        lines.append(f"| {r['device']} | {r['size']} ({r['input']}) | {what} | {prec} | {r['images_per_second']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {gpu} | {flops} | {_share(r)} |")
    m = bench["machine"]
    peak = m.get("peak_gflops", {})
    lines += ["", f"Measured on: {m['cpu']}, {m['cores']} threads" + (f", {m['gpu']}" if "gpu" in m else "") +
              f"; torch {m['torch']}. Nominal CPU peak: {peak.get('float32')} GFLOP/s float32, " +
              (f"{peak['bfloat16']} bf16" if peak.get("bfloat16") else "no bf16 instructions (bf16 is emulated)") +
              "."]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure_one(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m efsolo.benchmark --one SPEC (use benchmarks/bench.py)")
