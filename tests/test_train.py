"""Training: resume-after-interrupt equivalence, 2-process DDP (gloo) vs one process, non-finite stop."""
import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from efsolo.config import DataParams, SyntheticParams
from efsolo.data import datasets
from efsolo.engine import resume
from efsolo.engine.live import make_live
from efsolo.modeling.backbone import ResNetTrunk, save_backbone
from efsolo.modeling.solo_model import SOLOArch
from efsolo.config import InputSettings, LossSettings, SolverSettings, TrainingRuntime
from efsolo.engine.train import TrainingError, train
from efsolo.modeling.model_io import load_model

ARCH = SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16, kernel_dim=8,
                embed_dim=4, grids=(8, 6, 4, 3, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    datasets.prepare_dataset(root / "data", DataParams(synthetic=SyntheticParams(num_train=4, num_val=1, image_size=64)), seed=0)
    gt = json.loads((root / "data" / "train_gt.json").read_text())
    for a in gt["annotations"]:
        a["score"] = 1.0
    (root / "labels.json").write_text(json.dumps(gt))
    ids = np.array([a["id"] for a in gt["annotations"]])
    np.savez(root / "emb.npz", ann_ids=ids, embeddings=np.random.default_rng(0).normal(size=(len(ids), 4)))
    torch.manual_seed(0)
    save_backbone(root / "backbone.pt", "resnet18", ResNetTrunk("resnet18").state_dict(), "test")
    return root


SOLVER = SolverSettings(iters=4, batch_size=2, lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_iters=2,
                        warmup_factor=0.1, clip_grad_norm=35.0, lr_steps=())
INPUTS = InputSettings(train_short_sides=(64,), max_side=64, copy_paste_prob=0.5)
RUNTIME = TrainingRuntime(log_every=1, checkpoint_every=2)


def _kwargs(root, name, **over):
    """train()'s arguments on the tiny set; an override of a solver, input or runtime field
    replaces it in that settings object."""
    sections = {"solver": SOLVER, "inputs": INPUTS, "runtime": RUNTIME}
    for key, obj in sections.items():
        fields = {f.name for f in dataclasses.fields(obj)}
        mine = {k: over.pop(k) for k in list(over) if k in fields}
        sections[key] = dataclasses.replace(obj, **mine)
    kw = dict(labels=root / "labels.json", embeddings=root / "emb.npz", backbone=root / "backbone.pt",
              out_path=root / f"{name}.pt", ckpt_dir=root / name, live_dir=root / f"live_{name}", arch=ARCH, seed=0,
              losses=LossSettings(pairwise_warmup=2), device=torch.device("cpu"), **sections)
    kw.update(over)
    return kw


def _weights(path):
    return load_model(path).state_dict()


@pytest.mark.parametrize("ema_decay,eec_refresh", [(0.0, 0), (0.9, 0), (0.0, 3)])
def test_resume_after_interrupt_matches_uninterrupted_run(tiny, monkeypatch, ema_decay, eec_refresh):
    """With the EEC term refreshing its exemplars every 3 iterations, the checkpoint at 2 keeps the
    exemplars' pooled queries and the running means of the EEC diagnostics: the resumed run ends
    at the same weights and reports the means of the whole training."""
    extra = (lambda: _eec_kwargs(refresh=eec_refresh)) if eec_refresh else dict
    name = f"{ema_decay}_{eec_refresh}"
    stats = train(**_kwargs(tiny, f"straight{name}", ema_decay=ema_decay), **extra())
    assert stats["iters"] == 4 and np.isfinite(stats["final"]["loss"])
    saved = resume.save_checkpoint

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(**_kwargs(tiny, f"resumed{name}", ema_decay=ema_decay), **extra())
    monkeypatch.setattr(resume, "save_checkpoint", saved)
    resumed = train(**_kwargs(tiny, f"resumed{name}", ema_decay=ema_decay), **extra())
    a, b = _weights(tiny / f"straight{name}.pt"), _weights(tiny / f"resumed{name}.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.get("extra_mean") == stats.get("extra_mean")
    assert resumed.get("extra_tail_mean") == stats.get("extra_tail_mean")
    if eec_refresh:  # 4 iterations: the last quarter is the last one
        assert stats["extra_tail_mean"]["from_iter"] == 3 and "frac_used" in stats["extra_tail_mean"]
    assert (tiny / f"live_straight{name}" / "metrics.json").exists()


def test_val_curve_is_logged_and_leaves_the_training_unchanged(tiny):
    """eval_every logs the evaluator's metrics with the training seconds; evaluating in between
    draws no random numbers and touches no weights, so the trained weights are the same."""
    calls = []

    def evaluator(model):
        assert not model.training
        calls.append(1)
        return {"segm_AP": 1.5 * len(calls)}

    train(**_kwargs(tiny, "no_curve", copy_paste_prob=0.0))
    train(**_kwargs(tiny, "curve", copy_paste_prob=0.0, eval_every=3, evaluator=evaluator))
    assert len(calls) == 2  # iteration 3 and the last (4)
    a, b = _weights(tiny / "no_curve.pt"), _weights(tiny / "curve.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tiny / "live_curve" / "plots" / "metrics" / "train" / "val" / "segm_AP.tsv").read_text().split()
    assert rows[-4:] == ["3", "1.5", "4", "3.0"]
    assert (tiny / "live_curve" / "plots" / "metrics" / "train" / "val" / "train_seconds.tsv").exists()


def test_a_resumed_run_keeps_its_curves_up_to_the_checkpoint(tmp_path):
    """dvc.yaml persists the DVCLive folders: a run resumed at step 3 keeps the points up to 3
    and drops those the interrupted run logged after its last checkpoint; a fresh run starts
    with empty curves."""
    live = make_live(tmp_path)
    for step in range(1, 6):
        live.step = step
        live.log_metric("train/loss", 10.0 - step)
        live.next_step()
    live.end()
    tsv = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    assert [r.split()[0] for r in tsv.read_text().splitlines()[1:]] == ["1", "2", "3", "4", "5"]
    live = make_live(tmp_path, resume_at=3)
    live.step = 4
    live.log_metric("train/loss", 0.5)
    live.end()
    assert [r.split()[:2] for r in tsv.read_text().splitlines()[1:]] == [["1", "9.0"], ["2", "8.0"], ["3", "7.0"],
                                                                         ["4", "0.5"]]
    make_live(tmp_path).end()
    assert not tsv.exists()


def test_weight_average_follows_early_then_averages():
    from efsolo.engine.train import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = WeightAverage(model, 0.5)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # decay min(0.5, 2 / 11)
    assert ema.averaged(model).weight.item() == pytest.approx(9 / 11) and model.weight.item() == 1.0
    for _ in range(20):
        ema.update(model)
    torch.nn.init.zeros_(model.weight)
    ema.update(model)  # decay 0.5 by now
    assert ema.averaged(model).weight.item() == pytest.approx(0.5, abs=1e-3)


def test_lr_schedules():
    from efsolo.engine.train import lr_at

    assert lr_at(0, 1.0, 100, 10, 0.01) == pytest.approx(0.01) and lr_at(5, 1.0, 100, 10, 0.01) == pytest.approx(0.505)
    assert lr_at(50, 1.0, 100, 10, 0.01) == 1.0 == lr_at(99, 1.0, 100, 10, 0.01)  # constant (the release)
    assert lr_at(10, 1.0, 100, 10, 0.01, "cosine") == 1.0
    assert lr_at(55, 1.0, 100, 10, 0.01, "cosine") == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 10, 0.01, "cosine") == pytest.approx(0.0, abs=1e-12)
    steps = [lr_at(s, 1.0, 100, 10, 0.01, "step", (0.5, 0.8)) for s in (49, 50, 79, 80)]
    assert steps == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 100, 10, 0.01, "linear")


def test_epoch_order_sees_every_image_once_an_epoch():
    from efsolo.engine.train import epoch_order

    seen = torch.cat([epoch_order(10, 3, s, 4) for s in range(5)])  # 20 draws: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) == sorted(seen[10:].tolist())
    assert not torch.equal(seen[:10], seen[10:])  # a new order each epoch
    assert torch.equal(epoch_order(10, 3, 2, 4), seen[8:12])  # a function of its arguments (resume)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny, monkeypatch):
    import efsolo.engine.train as tr

    real = tr.solo_losses

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        if args[-1] >= 2:  # from iteration 3 on
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(tr, "solo_losses", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss before iteration 3"):
        train(**_kwargs(tiny, "nan", log_every=1))
    ck = torch.load(tiny / "nan" / "last.pt", weights_only=False)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def _eec_kwargs(weight=1.0, refresh=0, **eec_options):
    """The EEC term on six random exemplars; with ``refresh`` N, six exemplar objects cut from
    random images whose pooled queries are recomputed with the training trunk every N iterations."""
    from efsolo.config import EECParams
    from efsolo.exemplars.eec import EECModule, ExemplarFeatures, ExemplarObject, make_eec_loss

    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(6, 512, generator=g)
    features = None
    if refresh:
        rng = np.random.default_rng(0)
        objects = [ExemplarObject(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8), rng.random((48, 40)) > 0.3)
                   for _ in range(6)]
        features = ExemplarFeatures(objects, "crop", 64, 64, fixed_stages=ARCH.freeze_at)
    pool = {"feature_level": "c5", "upsample": 2, "short_side": 64, "max_side": 64, "pooled_queries": pooled}
    eec = EECParams(**{"tau": 0.1, "weight": weight, "logits": "projection", "centre": True, "pool_refresh": refresh,
                       **eec_options})
    # positive above cosine -0.5, negatives below 0.5: every row is used
    loss = make_eec_loss(pool, eec, (-0.5, 0.5), seed=0, free_mask_options={"query_scales": (0.5,)},
                         features=features)
    return {"extra_modules": {"eec": EECModule(512, 2, proj_dim=16, seed=0, exemplar_queries=pooled)},
            "extra_loss": loss}


@pytest.mark.parametrize("start", [0, 2])
def test_a_run_from_another_runs_state_continues_its_data_stream(tiny, start):
    """eec.start_iter: Exemplar-FreeSOLO from FreeSOLO's state after ``start`` iterations, with the
    EEC term weighted 0, ends at FreeSOLO's very weights (same init, batches, views, momentum)."""
    state = tiny / f"state{start}.pt"
    train(**_kwargs(tiny, f"base{start}", ema_decay=0.9, state_at=start, state_path=state))
    assert torch.load(state, weights_only=False)["step"] == start
    stats = train(**_kwargs(tiny, f"cont{start}", ema_decay=0.9, init_state=state), **_eec_kwargs(weight=0.0))
    base, cont = _weights(tiny / f"base{start}.pt"), _weights(tiny / f"cont{start}.pt")
    for k in base:
        assert torch.allclose(base[k], cont[k], atol=1e-6), k
    assert stats["extra_mean"]["frac_used"] > 0 and "eec/grad_ratio" in stats["final"]
    # fractions of the batch's views: one engaged needs a guide mask first
    assert stats["extra_mean"]["frac_used"] <= stats["extra_mean"]["frac_embedded"] <= 1.0
    assert stats["extra_mean"]["grad_ratio"] == 0.0  # weighted 0: no pull on the trunk
    # the EEC term moves the network once it weighs something
    weighted = train(**_kwargs(tiny, f"eec{start}", ema_decay=0.9, init_state=state), **_eec_kwargs(weight=1.0))
    assert weighted["extra_mean"]["grad_ratio"] > 0
    eec = _weights(tiny / f"eec{start}.pt")
    assert any(not torch.allclose(base[k], eec[k], atol=1e-6) for k in base if k.startswith("trunk."))


def test_logging_and_checkpoint_intervals_leave_the_training_unchanged(tiny):
    """The runtime section's intervals are not results: measuring the EEC gradient ratio at a
    logging step and saving a checkpoint change no weights (no stage declares them in dvc.yaml)."""
    often = train(**_kwargs(tiny, "often", log_every=1, checkpoint_every=1), **_eec_kwargs(weight=1.0))
    rarely = train(**_kwargs(tiny, "rarely", log_every=3, checkpoint_every=3), **_eec_kwargs(weight=1.0))
    assert often["extra_mean"]["grad_ratio"] > 0 and rarely["extra_mean"]["grad_ratio"] > 0
    a, b = _weights(tiny / "often.pt"), _weights(tiny / "rarely.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_without_its_state_trains_again(tiny, capsys):
    train(**_kwargs(tiny, "nostate"))
    train(**_kwargs(tiny, "nostate", state_at=1, state_path=tiny / "late_state.pt"))
    assert "training again from iteration 0" in capsys.readouterr().out
    assert torch.load(tiny / "late_state.pt", weights_only=False)["step"] == 1


def test_a_state_of_another_network_is_refused(tiny):
    train(**_kwargs(tiny, "other", iters=1, state_at=0, state_path=tiny / "other_state.pt"))
    wider = SOLOArch(**{**ARCH.__dict__, "fpn_channels": 32})
    with pytest.raises(TrainingError, match="other_state.pt: its network differs"):
        train(**_kwargs(tiny, "refused", arch=wider, init_state=tiny / "other_state.pt"))


def _ddp_worker(rank, port, root, out, with_eec=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    extra = _eec_kwargs() if with_eec else {}
    train(**_kwargs(root, out, iters=2, copy_paste_prob=0.0, checkpoint_every=100), **extra)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tiny):
    train(**_kwargs(tiny, "single", iters=2, copy_paste_prob=0.0, checkpoint_every=100))
    mp.spawn(_ddp_worker, args=(_free_port(), tiny, "ddp"), nprocs=2, join=True)
    train(**_kwargs(tiny, "zero_lr", iters=1, lr=1e-12, copy_paste_prob=0.0, checkpoint_every=100))
    init = _weights(tiny / "zero_lr.pt")  # the same initial weights, (practically) untrained
    single, ddp = _weights(tiny / "single.pt"), _weights(tiny / "ddp.pt")
    trained = [k for k in single if single[k].is_floating_point() and not torch.equal(single[k], init[k])]
    assert trained
    moved = sum((single[k] - init[k]).norm() ** 2 for k in trained) ** 0.5
    diff = sum((single[k] - ddp[k]).norm() ** 2 for k in trained) ** 0.5
    print(f"DDP vs one process: {diff:.4g}; moved by training: {moved:.4g}")
    assert diff < 0.02 * moved, f"DDP differs from one process by {diff:.3g}; training moved the weights {moved:.3g}"


def test_two_process_ddp_with_the_eec_term(tiny):
    """The EEC projection is used by the loss: DDP must synchronise its gradients too."""
    stats = train(**_kwargs(tiny, "single_eec", iters=2, copy_paste_prob=0.0, checkpoint_every=100), **_eec_kwargs())
    assert "eec/frac_used" in stats["final"] and stats["final"]["eec/frac_used"] > 0
    mp.spawn(_ddp_worker, args=(_free_port(), tiny, "ddp_eec", True), nprocs=2, join=True)
    single, ddp = _weights(tiny / "single_eec.pt"), _weights(tiny / "ddp_eec.pt")
    diff = sum((single[k] - ddp[k]).norm() ** 2 for k in single if single[k].is_floating_point()) ** 0.5
    assert diff < 0.05, diff


@pytest.mark.gpu
def test_cuda_bf16_training_and_inference(tiny):
    from efsolo.modeling.inference import TestSettings as Settings
    from efsolo.modeling.inference import predict_image

    dev = torch.device("cuda")
    stats = train(**_kwargs(tiny, "cuda", iters=3, device=dev), **_eec_kwargs())
    assert np.isfinite(stats["final"]["loss"]) and stats["peak_gpu_memory_mib"] > 0
    model = load_model(tiny / "cuda.pt").to(dev)
    masks, scores, emb = predict_image(model, np.zeros((48, 64, 3), np.uint8), 64, 96, Settings(), dev)
    assert masks.shape[1:] == (48, 64) and len(scores) == len(emb)


def test_two_rounds_relabel_the_training_set(tiny):
    from efsolo.engine import self_training
    from efsolo.modeling.inference import TestSettings as Settings

    kw = _kwargs(tiny, "unused", iters=2)
    for k in ("labels", "embeddings", "out_path", "ckpt_dir", "live_dir", "device"):
        kw.pop(k)
    stats = self_training.self_train(labels=tiny / "labels.json", embeddings=tiny / "emb.npz",
                         val_manifest=tiny / "data" / "val.json", train_manifest=tiny / "data" / "train.json",
                         model_path=tiny / "rounds" / "model.pt", predictions_path=tiny / "rounds" / "val.json",
                         stats_path=tiny / "rounds" / "stats.json", work_dir=tiny / "rounds" / "work",
                         live_dir=tiny / "rounds" / "live", rounds=2, relabel_score=0.0, relabel_max=3,
                         test=Settings(short_side=64, max_side=64, score_threshold=0.0),
                         device=torch.device("cpu"), **kw)
    assert set(stats) == {"round1", "round2", "val_inference"}
    relabelled = json.loads((tiny / "rounds" / "work" / "labels2" / "train.json").read_text())
    counts = {}
    for a in relabelled["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    assert len(relabelled["images"]) == 4 and all(c <= 3 for c in counts.values())
    with np.load(tiny / "rounds" / "work" / "labels2" / "train_embeddings.npz") as z:
        assert list(z["ann_ids"]) == [a["id"] for a in relabelled["annotations"]]
        assert z["embeddings"].shape == (len(relabelled["annotations"]), ARCH.embed_dim)
    assert (tiny / "rounds" / "model.pt").exists() and (tiny / "rounds" / "val.json").exists()


def test_val_predictions_reuse_the_curves_last_point_and_equal_a_fresh_prediction(tiny):
    """With the learning curve on and its last point at the final iteration, the stage's val
    predictions are that point's (no second pass over val), and they equal what the saved
    model file predicts."""
    from efsolo.data.datasets import load_manifest
    from efsolo.engine import self_training
    from efsolo.modeling.inference import TestSettings as Settings, predict_records

    test = Settings(short_side=64, max_side=64, score_threshold=0.0, update_threshold=0.0, mask_threshold=0.3)
    kw = _kwargs(tiny, "unused", iters=3, ema_decay=0.9)
    for k in ("labels", "embeddings", "out_path", "ckpt_dir", "live_dir", "device"):
        kw.pop(k)

    def run(name, eval_every):
        d = tiny / name
        return d, self_training.self_train(labels=tiny / "labels.json", embeddings=tiny / "emb.npz",
                               val_manifest=tiny / "data" / "val.json", train_manifest=tiny / "data" / "train.json",
                               val_gt=tiny / "data" / "val_gt.json", model_path=d / "model.pt",
                               predictions_path=d / "val.json", stats_path=d / "stats.json", work_dir=d / "work",
                               live_dir=d / "live", rounds=1, relabel_score=0.0, relabel_max=3, test=test,
                               device=torch.device("cpu"), **{**kw, "runtime": dataclasses.replace(
                                   kw["runtime"], eval_every=eval_every)})

    d, stats = run("reuse", 3)
    assert stats["val_inference"]["from_learning_curve"] is True
    fresh, _, _ = predict_records(load_model(d / "model.pt"), load_manifest(tiny / "data" / "val.json"), 64, 64,
                                  test, torch.device("cpu"))
    assert fresh and json.loads((d / "val.json").read_text()) == json.loads(json.dumps(fresh))
    _, stats = run("off", 0)
    assert stats["val_inference"]["from_learning_curve"] is False


def test_drop_loss_only_lowers_the_focal_term():
    from efsolo.modeling.solo_model import SOLO
    from efsolo.modeling.solo_loss import solo_losses

    torch.manual_seed(0)
    model = SOLO(ARCH).eval()
    images = torch.rand(2, 3, 64, 64)
    masks = [torch.zeros(2, 64, 64, dtype=torch.bool), torch.zeros(0, 64, 64, dtype=torch.bool)]
    masks[0][0, 8:30, 8:30] = True
    masks[0][1, 36:60, 30:58] = True
    embeds = [torch.randn(2, ARCH.embed_dim), torch.zeros(0, ARCH.embed_dim)]
    with torch.no_grad():
        out = model(images)
    terms = [solo_losses(out, images, masks, embeds, ARCH.grids, LossSettings(drop_loss_iou=iou), step=0) for iou in (0.0, 0.01)]
    off, on = terms
    assert on["focal"] < off["focal"]  # some negatives are dropped (the second view has no pseudo mask)
    for k in ("max_proj", "avg_proj", "pairwise", "sem", "positives"):
        assert on[k] == pytest.approx(off[k].item())


def test_bf16_training_records_its_precision_and_does_not_resume_a_float32_run(tiny, capsys):
    """precision: bfloat16 runs the network under bf16 autocast (emulated on a CPU without bf16
    instructions, so only 2 iterations here); the model file and the stats say so, and a float32
    checkpoint is not continued under bf16."""
    train(**_kwargs(tiny, "prec", iters=2, checkpoint_every=1))
    stats = train(**_kwargs(tiny, "prec", iters=2, checkpoint_every=1, precision="bfloat16"))
    assert "checkpoint is from other params" in capsys.readouterr().out
    assert stats["precision"] == "bfloat16" and np.isfinite(stats["final"]["loss"])
    blob = torch.load(tiny / "prec.pt", weights_only=True)
    assert blob["meta"]["precision"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in blob["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("option", ["per_level", "drop_loss", "eec_cosine_instances", "eec_projection_refresh"])
def test_bf16_training_runs_with_each_loss_option(tiny, option):
    """Under bf16 autocast (the default precision on bf16 CPUs and CUDA) every loss option trains:
    the losses read the network's bf16 outputs outside autocast. DropLoss failed there once."""
    losses = {"per_level": LossSettings(pairwise_warmup=2, level_average="per_level"),
              "drop_loss": LossSettings(pairwise_warmup=2, drop_loss_iou=0.01)}.get(option, LossSettings(pairwise_warmup=2))
    extra = {"eec_cosine_instances": lambda: _eec_kwargs(logits="cosine", granularity="instance"),
             "eec_projection_refresh": lambda: _eec_kwargs(refresh=1)}.get(option, dict)()
    stats = train(**_kwargs(tiny, f"bf16_{option}", iters=2, precision="bfloat16", losses=losses), **extra)
    assert stats["precision"] == "bfloat16" and np.isfinite(stats["final"]["loss"])
    assert stats["final"]["positives"] > 0


def test_per_level_average_weighs_each_level_once():
    """Three exact masks on one level and one wrong mask on another: pooled, the wrong one is a
    quarter of the max-projection term; per level (the release's), half."""
    from efsolo.modeling.losses import max_projection_loss
    from efsolo.modeling.solo_loss import _per_level_terms

    t = torch.zeros(4, 8, 8, dtype=torch.bool)
    t[:, 2:6, 2:6] = True
    logits = torch.where(t, 20.0, -20.0)
    logits[3] = -logits[3]  # the fourth mask is the complement of its target
    box = t.clone()
    sim = torch.ones(4, 8, 8, 8)
    emb = torch.randn(4, 3)
    wrong = max_projection_loss(torch.sigmoid(logits[3:]), t[3:]).item()
    assert wrong > 0.5
    pooled = max_projection_loss(torch.sigmoid(logits), t).item()
    assert pooled == pytest.approx(wrong / 4, rel=1e-4)
    split = lambda x: [x[:3], x[3:]]  # noqa: E731
    terms = _per_level_terms(split(logits), split(t), split(box), split(sim), split(emb), split(emb), [0, 1], LossSettings())
    assert terms[0].item() == pytest.approx(wrong / 2, rel=1e-4)
    assert terms[3].item() == pytest.approx(0.0, abs=1e-6)  # the embeddings equal their targets
    one = _per_level_terms([logits], [t], [box], [sim], [emb], [emb], [2], LossSettings())
    assert one[0].item() == pytest.approx(pooled, rel=1e-5)  # one level: the same as pooled


@pytest.mark.parametrize("level_average", ["pooled", "per_level"])
def test_mask_stride_two_trains_the_image_path_and_predicts_at_full_size(level_average):
    """mask_stride 2: the mask features are at half the input size, the loss reads them there, and
    its gradient reaches the image convolution; inference returns masks of the original size."""
    from efsolo.modeling.inference import TestSettings, predict_image
    from efsolo.modeling.solo_loss import solo_losses
    from efsolo.modeling.solo_model import SOLO

    torch.manual_seed(0)
    model = SOLO(dataclasses.replace(ARCH, mask_stride=2))
    images = torch.rand(2, 3, 64, 96)
    masks = [torch.zeros(2, 64, 96, dtype=torch.bool), torch.zeros(0, 64, 96, dtype=torch.bool)]
    masks[0][0, 8:30, 8:30] = True
    masks[0][1, 36:60, 30:58] = True
    embeds = [torch.randn(2, ARCH.embed_dim), torch.zeros(0, ARCH.embed_dim)]
    out = model(images)
    assert out.mask_feat.shape[-2:] == (32, 48) and out.mask_stride == 2
    terms = solo_losses(out, images, masks, embeds, ARCH.grids, LossSettings(level_average=level_average), step=0)
    assert terms["positives"] > 0 and all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert model.mask_branch.image[0].weight.grad.abs().sum() > 0
    found, scores, emb = predict_image(model.eval(), np.zeros((40, 50, 3), np.uint8), 64, 96, TestSettings(),
                                       torch.device("cpu"))
    assert found.shape[1:] == (40, 50) and len(scores) == len(found) == len(emb)
