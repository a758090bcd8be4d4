"""FreeSOLO self-training (and the base of Exemplar-FreeSOLO training).

SGD with linear warm-up; each iteration loads a batch of images with their pseudo-labels,
makes a weak view (resize, flip) and a strong view (colour, grayscale, blur, erasing,
copy-paste) on the training device, and minimises L_mask + L_cate over both views, plus an
optional extra term (the EEC loss). CUDA when present (channels_last), CPU otherwise; the
network under bf16 autocast when ``precision`` is bfloat16 (losses and SGD in float32);
several processes with ``torchrun`` (DDP; DVCLive and checkpoints on rank 0).
Checkpoints every N iterations make a killed run resumable with the same result.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from efsolo.config import InputSettings, LossSettings, SolverSettings, TrainingRuntime
from efsolo.data.images import file_sha256
from efsolo.data.pseudo_labels import Batch, PseudoLabelSet, make_batch
from efsolo.data.views import copy_paste, strong_view
from efsolo.engine import resume
from efsolo.engine.live import make_live
from efsolo.modeling.inference import normalise
from efsolo.modeling.solo_loss import solo_losses
from efsolo.modeling.model_io import build_model, save_model
from efsolo.modeling.solo_model import SOLO, SOLOArch, SOLOOutput
from efsolo.utils.distributed import dist_env
from efsolo.utils.seeding import seed_everything
from efsolo.utils.errors import TrainingError

TRAIN_STATE_FORMAT = "efsolo-train-state-v1"


LR_SCHEDULES = ("constant", "step", "cosine")


def lr_at(step: int, base: float, iters: int, warmup_iters: int, warmup_factor: float, schedule: str = "constant",
          steps: tuple[float, ...] = (), decay: float = 0.1) -> float:
    """The learning rate of iteration ``step`` (0-based) of ``iters``.

    Linear warm-up from ``warmup_factor * base`` over ``warmup_iters``, then ``constant`` (the
    FreeSOLO release), ``step`` (times ``decay`` at each fraction of ``iters`` in ``steps``) or
    ``cosine`` (from ``base`` at the end of warm-up down to 0 at ``iters``).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "step":
        lr = base * decay ** sum(step >= f * iters for f in steps)
    elif schedule == "cosine" and step >= warmup_iters:
        lr = base * 0.5 * (1 + math.cos(math.pi * (step - warmup_iters) / max(1, iters - warmup_iters)))
    else:
        lr = base
    if step >= warmup_iters:
        return lr
    alpha = step / max(1, warmup_iters)
    return lr * (warmup_factor * (1 - alpha) + alpha)


class WeightAverage:
    """An exponential moving average of a model's floating-point weights and buffers.

    ``update`` after each optimiser step: avg <- d * avg + (1 - d) * w with
    d = min(decay, (1 + t) / (10 + t)), so early updates follow the weights closely.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.avg:
                self.avg[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``model`` holding the averaged weights."""
        out = copy.deepcopy(model)
        out.load_state_dict({**model.state_dict(), **self.avg})
        return out

    def state_dict(self) -> dict:
        return {"updates": self.updates, "avg": self.avg}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.avg = {k: v.clone() for k, v in state["avg"].items()}


def epoch_order(n: int, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """The (batch_size,) image indices of iteration ``step``: the images in a seeded random order,
    epoch after epoch, each epoch a new order; every image is seen once an epoch. A function of
    its arguments only, so a resumed run draws the same batches."""
    first = step * batch_size
    out = []
    for epoch in range(first // n, (first + batch_size - 1) // n + 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        lo, hi = max(first - epoch * n, 0), min(first + batch_size - epoch * n, n)
        out.append(perm[lo:hi])
    return torch.cat(out)


# extra_loss(model, out, images, masks, step, rows, total): rows (B,) are the global indices of
# this process's views among the ``total`` views of the global batch
ExtraLoss = Callable[..., dict[str, torch.Tensor]]
# evaluate(model) -> named validation metrics (e.g. segm AP), logged every ``eval_every`` iterations
Evaluator = Callable[[SOLO], dict[str, float]]


def gradient_ratio(extra: torch.Tensor, base: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """||d extra / d params|| / ||d base / d params||: how much an extra loss term pulls on the
    parameters it shares with the base loss (0 when it does not reach them). The graph is kept."""
    params = [p for p in params if p.requires_grad]

    def norm(t: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=t.device)

    e = norm(extra) if extra.requires_grad else torch.zeros((), device=extra.device)
    return (e / norm(base).clamp_min(1e-12)).detach()


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's parameters, in its order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def _save_state(path: str | Path, fp: str, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                ema: WeightAverage | None, g_cpu: torch.Generator, g_dev: torch.Generator,
                extra_means: dict | None = None) -> None:
    """The whole training state after ``step`` iterations: this run's checkpoints (with the running
    sums of the extra term's diagnostics, ``extra_means``), and the state another run starts from
    (``load_training_state``)."""
    resume.save_checkpoint(path, fp, step, {
        "format": TRAIN_STATE_FORMAT, "model": model.state_dict(), "opt": opt.state_dict(),
        "param_names": _param_names(model, opt), "g_cpu": g_cpu.get_state(), "g_dev": g_dev.get_state(),
        **({"ema": ema.state_dict()} if ema is not None else {}),
        **({"extra_means": extra_means} if extra_means is not None else {})})


def _has_state(path: str | Path, fp: str, step: int) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # the header only: tensors stay on disk
    return blob.get("fingerprint") == fp and blob.get("step") == step


def load_training_state(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        ema: WeightAverage | None, g_cpu: torch.Generator, g_dev: torch.Generator) -> int:
    """Continue from a training state written by another run (``state_path``): weights, moving
    average, SGD momentum and random generators. The model may have modules the state lacks
    (``extra.*``, e.g. the EEC module): they keep their own initialisation and start without
    momentum. Returns the iteration to start at."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such training state file")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != TRAIN_STATE_FORMAT:
        raise TrainingError(f"{path}: not an efsolo training state file")
    try:
        missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    except RuntimeError as err:  # shapes differ
        raise TrainingError(f"{path}: its network differs from this one ({str(err).splitlines()[1].strip()})") from None
    if unexpected or any(not k.startswith("extra.") for k in missing):
        raise TrainingError(f"{path}: its network differs from this one (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    names, saved = _param_names(model, opt), blob["param_names"]
    if not set(saved) <= set(names) or any(not n.startswith("extra.") for n in set(names) - set(saved)):
        raise TrainingError(f"{path}: its trainable parameters differ from this network's")
    by_name = {saved[i]: st for i, st in blob["opt"]["state"].items()}  # SGD momentum, matched by name
    opt.load_state_dict({"state": {j: by_name[n] for j, n in enumerate(names) if n in by_name},
                         "param_groups": opt.state_dict()["param_groups"]})
    if ema is not None:
        if "ema" not in blob:
            raise TrainingError(f"{path}: the state has no weight average, but this run keeps one (ema_decay)")
        ema.updates = blob["ema"]["updates"]
        ema.avg.update({k: v.clone() for k, v in blob["ema"]["avg"].items()})
    g_cpu.set_state(blob["g_cpu"])
    g_dev.set_state(blob["g_dev"])
    resume.set_rng_state(blob["rng"])
    return int(blob["step"])


class _TrainStep(torch.nn.Module):
    """The network's forward and the extra term in one forward, so that DDP sees every parameter
    the loss uses (the EEC projection included) and synchronises its gradients."""

    def __init__(self, model: SOLO, extra_loss: ExtraLoss | None) -> None:
        super().__init__()
        self.model = model
        self.extra_loss = extra_loss

    def forward(self, x: torch.Tensor, images: torch.Tensor, masks: list[torch.Tensor], step: int,
                rows: torch.Tensor, total: int) -> tuple[SOLOOutput, dict[str, torch.Tensor]]:
        out = self.model(x)
        extra = (self.extra_loss(self.model, out, images, masks, step, rows, total)
                 if self.extra_loss is not None else {})
        return out, extra


def train(*, labels: str | Path, embeddings: str | Path | None, backbone: str | Path, out_path: str | Path,
          ckpt_dir: str | Path, live_dir: str | Path, arch: SOLOArch, seed: int, solver: SolverSettings,
          inputs: InputSettings, losses: LossSettings, runtime: TrainingRuntime, device: torch.device,
          evaluator: Evaluator | None = None, label_min_score: float = 0.0, label_max_per_image: int = 100,
          extra_modules: dict[str, torch.nn.Module] | None = None, extra_loss: ExtraLoss | None = None,
          fingerprint_extra: dict | None = None, log_prefix: str = "train", state_at: int = -1,
          state_path: str | Path | None = None, init_state: str | Path | None = None,
          model_meta: dict | None = None, precision: str = "float32") -> dict:
    """Train a SOLO network on pseudo-labels and write ``out_path``.

    ``solver`` (``freesolo.solver``), ``inputs`` (``freesolo.input``), ``losses`` (``freesolo.loss``)
    and ``runtime`` (``runtime.freesolo``: logging, checkpoint and evaluation intervals, which do not
    change the result) are the settings objects of ``params.yaml``'s sections.

    ``model_meta`` is recorded in the model file's metadata (e.g. ``{"test": ...}``: the
    inference settings that ``efsolo predict`` then defaults to), with the training ``precision``
    (float32, or bfloat16: the network under bf16 autocast); the precision is part of the run's
    fingerprint, so a checkpoint of the other precision is not resumed.

    ``extra_modules`` are trained alongside the network (e.g. the EEC projection) and passed,
    as ``model.extra``, to ``extra_loss(model, out, images, masks, step, rows, total)``, whose
    ``total`` is added to the loss and whose other entries are logged. With ``eval_every`` > 0,
    ``evaluator(model)`` runs every that many iterations (and at the end) on rank 0 and its
    metrics are logged as ``<log_prefix>/val/<name>`` with the elapsed training seconds;
    ``evaluated_at_end`` in the returned stats says whether it saw the saved weights.
    With ``ema_decay`` > 0 an exponential moving average of the weights is kept (decay
    min(ema_decay, (1 + t) / (10 + t)) at update t); it is what is evaluated and saved.
    With ``state_path``, the whole training state after ``state_at`` iterations (weights, moving
    average, optimiser, random generators) is written there; ``init_state`` starts a run from such
    a file (``load_training_state``), so two runs share the same first iterations and data stream.
    With an extra term, the norm of its gradient relative to the rest of the loss's, on the
    parameters they share (the trunk's trainable ones), is logged as ``eec/grad_ratio``.
    """
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    seed_everything(seed)
    data = PseudoLabelSet(labels, embeddings, label_min_score, label_max_per_image)
    if len(data) == 0:
        raise TrainingError(f"{labels}: no images to train on")
    model = build_model(arch, backbone)
    model.extra = torch.nn.ModuleDict(extra_modules or {})
    model.sparse_training_outputs = world == 1  # DDP must see every parameter the loss uses in the forward
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay)
    fp = resume.fingerprint(arch=asdict(arch), seed=seed, solver=asdict(solver), inputs=asdict(inputs),
                            losses=asdict(losses), world=world, precision=precision, labels=file_sha256(labels),
                            backbone=file_sha256(backbone), extra=fingerprint_extra or {})
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=device).manual_seed(seed + 1)
    ckpt_path = Path(ckpt_dir) / "last.pt"
    start = 0
    ema = WeightAverage(model, solver.ema_decay) if solver.ema_decay > 0 else None
    ck = resume.load_checkpoint(ckpt_path, fp)
    if ck is not None and state_path is not None and ck["step"] > state_at and not _has_state(state_path, fp, state_at):
        print(f"{state_path}: the training state after {state_at} iterations is not on disk; training again "
              f"from iteration 0 (same seed, same result)")
        ck = None
    if ck is None and init_state is not None:
        start = load_training_state(init_state, model, opt, ema, g_cpu, g_dev)
        if rank == 0:
            print(f"starting from iteration {start} ({init_state})")
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        g_cpu.set_state(ck["g_cpu"])
        g_dev.set_state(ck["g_dev"])
        resume.set_rng_state(ck["rng"])
        start = ck["step"]
        if rank == 0:
            print(f"resuming training from iteration {start} ({ckpt_path})")
    net: torch.nn.Module = _TrainStep(model, extra_loss)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    live = make_live(live_dir, resume_at=start if ck is not None else None) if rank == 0 else None
    shared = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("trunk.")]
    # running sums of the extra term's diagnostics over this training's iterations (kept in the
    # checkpoints, so a resumed run reports the means of the whole training)
    extra_sums: dict[str, torch.Tensor] = {}
    extra_steps, ratio_sum, ratio_n = 0, torch.zeros((), device=device), 0
    # and over the training's last quarter: an extra term that went silent late is not hidden by its
    # mean over the whole run
    tail_from = solver.iters - max(1, solver.iters // 4)
    tail_sums: dict[str, torch.Tensor] = {}
    tail_steps = 0
    if ck is not None and "extra_means" in ck:
        sums = ck["extra_means"]
        extra_sums = {k: v.to(device) for k, v in sums["sums"].items()}
        extra_steps, ratio_sum, ratio_n = sums["steps"], sums["ratio_sum"].to(device), sums["ratio_n"]
        tail_sums = {k: v.to(device) for k, v in sums.get("tail_sums", {}).items()}
        tail_steps = sums.get("tail_steps", 0)
    use_amp = precision == "bfloat16"
    model.train()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    logs: dict[str, torch.Tensor] = {}
    t0, seen, t_eval = time.time(), 0, 0.0
    bar = tqdm(range(start, solver.iters), desc=log_prefix, initial=start, total=solver.iters,
               disable=None if rank == 0 else True)
    for step in bar:
        if state_path is not None and step == state_at and rank == 0:
            _save_state(state_path, fp, step, model, opt, ema, g_cpu, g_dev)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, solver.lr, solver.iters, solver.warmup_iters, solver.warmup_factor,
                                solver.lr_schedule, solver.lr_steps)
        idx = epoch_order(len(data), seed, step, solver.batch_size)
        flips = (torch.rand(solver.batch_size, generator=g_cpu) < 0.5).tolist()
        side = inputs.train_short_sides[int(torch.randint(len(inputs.train_short_sides), (1,), generator=g_cpu))]
        mine = list(range(rank, solver.batch_size, world))  # this process's share of the global batch
        batch: Batch = make_batch([data.load(int(idx[i])) for i in mine], side, inputs.max_side,
                                  [flips[i] for i in mine]).to(device)
        strong = strong_view(batch.images, g_dev, solver.batch_size, torch.tensor(mine))
        strong, s_masks, s_embeds = copy_paste(strong, batch.masks, batch.embeds, g_dev, inputs.copy_paste_prob)
        images = torch.cat([batch.images, strong])
        masks, embeds = batch.masks + s_masks, batch.embeds + s_embeds
        x = normalise(images)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            view_rows = torch.tensor(mine + [solver.batch_size + i for i in mine])  # weak views, then strong
            out, extra = net(x, images, masks, step, view_rows, 2 * solver.batch_size)
        terms = solo_losses(out, images, masks, embeds, arch.grids, losses, step)
        loss = terms["total"]
        at_log = (step + 1) % runtime.log_every == 0 or step + 1 == solver.iters
        if extra:
            extra_total = extra.pop("total")
            if at_log and world == 1 and shared and extra_total.requires_grad:
                extra["grad_ratio"] = gradient_ratio(extra_total, terms["total"], shared)
                ratio_sum, ratio_n = ratio_sum + extra["grad_ratio"], ratio_n + 1
            loss = loss + extra_total
            terms.update({f"eec/{k}": v for k, v in extra.items()})
            extra_steps += 1
            tail_steps += step >= tail_from
            for k, v in extra.items():
                if k != "grad_ratio":
                    extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float()
                    if step >= tail_from:
                        tail_sums[k] = tail_sums.get(k, 0.0) + v.detach().float()
        bad |= ~torch.isfinite(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if solver.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm)
        opt.step()
        if ema is not None:
            ema.update(model)
        seen += solver.batch_size
        logs = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items() if k != "total"}}
        at_ckpt = (step + 1) % runtime.checkpoint_every == 0 or step + 1 == solver.iters
        if at_log or at_ckpt:
            if bool(bad):
                raise TrainingError(f"{log_prefix}: non-finite loss before iteration {step + 1}; stopped, the last "
                                    f"good checkpoint is kept in {ckpt_path}")
        at_eval = evaluator is not None and runtime.eval_every > 0 and (
            (step + 1) % runtime.eval_every == 0 or step + 1 == solver.iters)
        if (at_log or at_eval) and live is not None:
            live.step = step + 1
            if at_log:
                for k, v in logs.items():
                    live.log_metric(f"{log_prefix}/{k}", float(v))
                live.log_metric(f"{log_prefix}/lr", opt.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{float(logs['loss']):.3f}")
            if at_eval:
                t1 = time.time()
                shown = ema.averaged(model) if ema is not None else model
                shown.eval()
                val = evaluator(shown)
                model.train()
                t_eval += time.time() - t1
                for k, v in val.items():
                    live.log_metric(f"{log_prefix}/val/{k}", float(v))
                # training seconds so far (evaluation excluded): AP against time as well as iterations
                live.log_metric(f"{log_prefix}/val/train_seconds", round(time.time() - t0 - t_eval, 1))
            live.next_step()
        if at_ckpt and rank == 0:
            _save_state(ckpt_path, fp, step + 1, model, opt, ema, g_cpu, g_dev,
                        {"sums": extra_sums, "steps": extra_steps, "ratio_sum": ratio_sum, "ratio_n": ratio_n,
                         "tail_sums": tail_sums, "tail_steps": tail_steps}
                        if extra_loss is not None else None)
    seconds = time.time() - t0 - t_eval
    stats = {"iters": solver.iters, "precision": precision, "seconds": round(seconds, 1),
             "images_per_second": round(seen * world / max(seconds, 1e-9), 2),
             "final": {k: round(float(v), 4) for k, v in logs.items()},
             # the loop evaluates its last iteration whenever it runs one
             "evaluated_at_end": (live is not None and evaluator is not None and runtime.eval_every > 0
                                  and start < solver.iters)}
    if extra_steps:  # this run's mean of each extra diagnostic (eec/frac_used, ...)
        stats["extra_mean"] = {k: round(float(v) / extra_steps, 4) for k, v in extra_sums.items()}
        if ratio_n:  # measured at the logging steps only
            stats["extra_mean"]["grad_ratio"] = round(float(ratio_sum) / ratio_n, 4)
    if tail_steps:  # the same means over the training's last quarter (iterations tail_from + 1 ..)
        stats["extra_tail_mean"] = {"from_iter": tail_from,
                                    **{k: round(float(v) / tail_steps, 4) for k, v in tail_sums.items()}}
    if device.type == "cuda":
        stats["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    if rank == 0:
        if live is not None:
            live.end()
        # deterministic metadata only (timings are in the stage's metrics), so identical
        # weights give an identical file and DVC does not re-run what depends on it
        save_model(out_path, ema.averaged(model) if ema is not None else model, {
            "fingerprint": fp, "iters": solver.iters, "precision": precision,
            "input_size": [max(inputs.train_short_sides), inputs.max_side],
            **(model_meta or {})})
    if world > 1:
        dist.barrier()
    return stats
