"""fit(): the loss goes down, kill-and-resume equals an uninterrupted run, what-trains modes, DDP on gloo."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from mmcross.config import load_run_cfg
from mmcross.data.records import Record
from mmcross.factory import create_matcher, load_checkpoint
from mmcross.train import EpochPlan, fit, known_matches, set_trainable
from tests.train_helpers import make_shapes, short_run


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=16, n_dev=6)


def _run(manifest: Path, sets: dict[str, str] | None = None, **train) -> object:
    """`short_run` of a few steps; `sets`: more `--set` overrides (`fusion.dim`, `model`)."""
    base = {
        "train.batch_size": "8",
        "train.max_steps": "6",
        "train.lr": "1e-3",
        "train.augment": "false",
        "fusion.dropout": "0.1",
        **(sets or {}),
    }
    return short_run(manifest, base, **train)


def _log(run_dir: Path) -> list[dict]:
    """The loss lines of a run's log (not its eval lines, nor its final stop line)."""
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in e]


def test_short_run_lowers_the_loss(shapes, tmp_path):
    result = fit(_run(shapes, max_steps=8, itm_weight=0.5, vse_weight=0.5), tmp_path / "run", progress=False)
    losses = [e["loss"] for e in result.losses]
    assert len(losses) == 8 and all(k in result.losses[0] for k in ("itc", "itm", "vse", "lr", "samples_per_s"))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert [e["step"] for e in _log(tmp_path / "run")] == list(range(1, 9))
    assert load_checkpoint(tmp_path / "run" / "last.safetensors") is not None


REGULARISE = dict(augment_hflip=True, caption_word_drop=0.2)


# augment: random crops on the decoded-image cache (with mirrors and caption word dropout in the last cases, the
# very last streaming its images from their files instead); per_image: captions of one image per batch
@pytest.mark.parametrize(
    ("augment", "per_image", "extra"),
    [(False, 1, {}), (True, 1, {}), (True, 2, REGULARISE), (True, 2, {**REGULARISE, "decode_cache": "none"})],
    ids=["plain", "crops", "regularised", "regularised-streamed"],
)
def test_kill_and_resume_equals_uninterrupted(shapes, tmp_path, augment, per_image, extra):
    cfg = _run(shapes, ckpt_every=2, augment=augment, captions_per_image=per_image, **extra)
    full = fit(cfg, tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill_at_3(entry):
        if entry["step"] == 3:  # after the step-2 checkpoint, before the next one
            raise Killed

    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress=False, on_step=kill_at_3)
    with pytest.raises(ValueError, match="--resume"):
        fit(cfg, tmp_path / "resumed", progress=False)
    resumed = fit(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert [e["step"] for e in resumed.losses] == [3, 4, 5, 6]
    a, b = _log(tmp_path / "full"), _log(tmp_path / "resumed")
    assert [e["step"] for e in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "itc", "itm", "lr", "temperature"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
    wa = load_checkpoint(tmp_path / "full" / "last.safetensors").state_dict()
    wb = load_checkpoint(tmp_path / "resumed" / "last.safetensors").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert full.step == resumed.step == 6


def test_what_trains(tiny_cfg):
    matcher = create_matcher(tiny_cfg)
    set_trainable(matcher, "last_n", 1)
    names = {n for n, p in matcher.named_parameters() if p.requires_grad}
    assert any(".resblocks.3." in n for n in names) and not any(".resblocks.2." in n for n in names)
    assert any(n.startswith("fusion.") for n in names) and any(n.startswith("head.") for n in names)
    assert "text_encoder.text_projection" in names
    set_trainable(matcher, "fusion")
    assert all(n.startswith(("fusion.", "head.")) for n, p in matcher.named_parameters() if p.requires_grad)
    set_trainable(matcher, "all")
    assert all(p.requires_grad for p in matcher.parameters())


def test_feature_cache_trains_the_fusion_only(shapes, tmp_path):
    result = fit(_run(shapes, trainable="fusion", feature_cache="true", max_steps=3), tmp_path / "run", progress=False)
    assert result.step == 3
    before = create_matcher(load_run_cfg(None, {}).model).state_dict()
    after = load_checkpoint(tmp_path / "run" / "last.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("image_encoder", "text_encoder")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fusion"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, manifest: str, out: str, port: int, extra: dict[str, str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg = load_run_cfg(
        None,
        {
            "train.data": manifest,
            "train.batch_size": "4",
            "train.max_steps": "2",
            "train.log_every": "1",
            "train.augment": "false",
            "train.eval_split": "none",
            "train.device": "cpu",
            **extra,
        },
    )
    result = fit(cfg, out, progress=False)
    import torch.distributed as dist

    # every rank ends with the same weights (DDP averaged the gradients)
    flat = torch.cat([p.detach().flatten() for p in result.matcher.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.allclose(gathered[0], gathered[1])
    assert result.step == int(extra.get("train.max_steps", 2)) + int(extra.get("train.fusion_steps", 0))
    dist.barrier()  # neither leaves while the other still talks to it (gloo aborts the process then)
    dist.destroy_process_group()
    # and no interpreter teardown: gloo's threads, destroyed at exit, sometimes abort the process ("terminate called
    # without an active exception") after every check passed; a failed check raised before this line
    os._exit(0)


# the fusion phase re-wraps the model in DDP over what still trains (the fusion and head)
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"train.fusion_steps": "2", "train.itm_start": "1.0", "train.fusion_batch_size": "4"}],
    ids=["towers", "fusion-phase"],
)
def test_ddp_two_processes_gloo(shapes, tmp_path, extra):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(shapes), str(tmp_path / "ddp"), _free_port(), extra), nprocs=2, join=True)
    log = _log(tmp_path / "ddp")
    steps = 2 + int(extra.get("train.fusion_steps", 0))
    assert [e["step"] for e in log] == list(range(1, steps + 1)) and all(e["loss"] == e["loss"] for e in log)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["rank-1-only", "both-ranks"])
def test_ddp_streamed_with_rejected_images_trains_and_records_every_reject(shapes, tmp_path, where):
    # a rejected image left one rank's batch short: ITC's all-gather failed (gloo "collective mismatch"), a rank
    # skipping a micro-batch alone hung the other; and only rank 0 wrote rejects.jsonl, so an image only rank 1 met
    # was never recorded
    import torch.multiprocessing as mp

    from mmcross.data.records import read_rejects

    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    train = [i for i, row in enumerate(rows) if row.get("split") == "train"]
    if where == "rank-1-only":  # one image of rank 1's first micro-batch (4 rows a rank), and a single step
        plan = EpochPlan(len(train), [len(rows[i]["captions"]) for i in train], 4, 2, 0)
        bad, steps = [train[plan.micro_batch(0, 1)[1][0]]], "1"
    else:
        bad, steps = train[:4], "4"  # 4 steps of 2 x 4 rows: every train image, on either rank
    for i, row in enumerate(rows):
        row["image"] = str(shapes.parent / row["image"])
        if i in bad:
            row["image"] = str(tmp_path / f"bad{i}.png")
            (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG not really")
    manifest = tmp_path / "damaged.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {"train.decode_cache": "none", "train.max_steps": steps}
    mp.spawn(_ddp_worker, args=(str(manifest), str(tmp_path / "ddp"), _free_port(), extra), nprocs=2, join=True)
    recorded = sorted(Path(r["path"]).name for r in read_rejects(tmp_path / "ddp" / "rejects.jsonl"))
    assert recorded == sorted(f"bad{i}.png" for i in bad)


def test_dataset_negatives_enter_the_itm_loss(tmp_path, monkeypatch):
    """With train.dataset_negatives, every caption of each image (label 1) and its swapped negative (label 0) are
    scored as extra ITM pairs; the caption drawn for ITC is not repeated."""
    import mmcross.losses as losses
    from mmcross.data.synth import read_negatives, write_synth

    synth = tmp_path / "synth"
    write_synth(synth, n_images=30, seed=1, image_size=32)
    negative_of = read_negatives(synth)
    seen = []
    original = losses.itm_loss

    def spy(matcher, image, text, similarity, pairs=None, known=None, uniform=0.0, rank=0.0):
        seen.append(None if pairs is None else pairs)
        return original(matcher, image, text, similarity, pairs, known, uniform, rank)

    monkeypatch.setattr(losses, "itm_loss", spy)
    fit(_run(synth, max_steps=2, dataset_negatives="true"), tmp_path / "with", progress=False)
    assert len(seen) == 2
    for rows, _, labels in seen:
        assert len(rows) == len(labels) and set(rows.tolist()) == set(range(8))  # batch_size 8: every image
        for row in range(8):
            mine = labels[rows == row]
            # n captions, each with a negative: n - 1 more positives (the drawn one is the ITM's own) and n negatives
            n = int((mine == 0).sum())
            assert n >= 1 and int((mine == 1).sum()) == n - 1
    total_pairs = sum(len(v) for v in negative_of.values())
    assert all(len(rows) <= 2 * total_pairs for rows, _, _ in seen)
    seen.clear()
    fit(_run(synth, max_steps=2), tmp_path / "without", progress=False)
    assert seen == [None, None]
    bad = _run(synth, dataset_negatives="true", feature_cache="true", trainable="fusion")
    with pytest.raises(ValueError, match="negatives"):
        fit(bad, tmp_path / "bad", progress=False)


def test_known_matches_compare_captions_word_for_word():
    records = [
        Record("a", ["A red square.", "a red square left of a blue circle"]),
        Record("b", ["a red  square"]),
        Record("c", ["a blue circle"]),
    ]
    drawn = ["a red square left of a blue circle", "a red square", "a blue circle"]
    assert known_matches(records, drawn).tolist() == [
        [True, True, False],  # image a: its own caption, and b's "a red square" is one of a's too
        [False, True, False],
        [False, False, True],
    ]
    also_true = {"c": ["a red square left of a blue circle"]}  # true of image c, though not one of its captions
    assert known_matches(records, drawn, also_true)[2].tolist() == [True, False, True]


def test_fit_tells_the_losses_which_in_batch_captions_are_true(tmp_path, monkeypatch):
    """Synth scenes share one-object captions ("a red square"): fit passes those pairs to the losses as known."""
    import mmcross.losses as losses
    from mmcross.data.synth import write_synth

    synth = tmp_path / "synth"
    write_synth(synth, n_images=40, seed=3, image_size=32)
    seen = []
    original = losses.itm_loss

    def spy(matcher, image, text, similarity, pairs=None, known=None, uniform=0.0, rank=0.0):
        seen.append(known)
        return original(matcher, image, text, similarity, pairs, known, uniform, rank)

    monkeypatch.setattr(losses, "itm_loss", spy)
    fit(_run(synth, max_steps=4, batch_size=16), tmp_path / "run", progress=False)
    assert len(seen) == 4 and all(k.shape == (16, 16) and k.diagonal().all() for k in seen)
    assert sum(int((k & ~torch.eye(16, dtype=torch.bool)).sum()) for k in seen) > 0  # shared captions were found


def test_uniform_share_outside_zero_one_is_a_clear_error(shapes, tmp_path):
    with pytest.raises(ValueError, match=r"share in \[0, 1\]"):
        fit(_run(shapes, itm_uniform_negatives=1.5), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


class Killed(Exception):
    """Stands for kill -9 at one point of a checkpoint write (fit never catches it)."""


def _die_in_commit(monkeypatch, how: str) -> None:
    """Make the step-4 checkpoint commit die as a kill -9 there would leave it: "weights" half way through
    last.safetensors.tmp, "state" half way through state.safetensors.tmp (the weights' .tmp whole), "json" half way
    through state.json.tmp, "renaming" after last.safetensors was renamed into place but before the state was."""
    import mmcross.train.state as state

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    if how == "weights":
        real_write = state.write_checkpoint_file

        def write(matcher, path, metadata=None):
            real_write(matcher, path, metadata)
            if metadata["step"] == "4":
                truncate(path)
                raise Killed

        monkeypatch.setattr(state, "write_checkpoint_file", write)
    elif how in ("state", "json"):
        real_save = state.save_state

        def save(run_dir, optimizer, scheduler, loss, info, rename=True):
            real_save(run_dir, optimizer, scheduler, loss, info, rename)
            if info["step"] == 4:
                if how == "state":  # state.json.tmp is written after the tensors: a kill here leaves none
                    truncate(run_dir / "state.safetensors.tmp")
                    (run_dir / "state.json.tmp").unlink()
                else:
                    truncate(run_dir / "state.json.tmp")
                raise Killed

        monkeypatch.setattr(state, "save_state", save)
    else:
        real_replace = Path.replace

        def replace(self, target):
            if Path(target).name == "state.safetensors":
                if json.loads(self.with_name("state.json.tmp").read_text())["step"] == 4:
                    raise Killed
            return real_replace(self, target)

        monkeypatch.setattr(Path, "replace", replace)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    fit(_run(shapes, ckpt_every=2), run_dir, progress=False)
    return run_dir


# a kill while a checkpoint is written leaves the previous one whole; a kill between its renames is finished on resume
@pytest.mark.parametrize(("how", "resumed_from"), [("weights", 2), ("state", 2), ("json", 2), ("renaming", 4)])
def test_kill_during_a_checkpoint_write_then_resume_equals_uninterrupted(
    shapes, uninterrupted, tmp_path, monkeypatch, how, resumed_from
):
    cfg, run_dir = _run(shapes, ckpt_every=2), tmp_path / "run"
    with monkeypatch.context() as patch:
        _die_in_commit(patch, how)
        with pytest.raises(Killed):
            fit(cfg, run_dir, progress=False)
    assert list(run_dir.glob("*.tmp"))  # what the kill left behind
    resumed = fit(cfg, run_dir, resume=True, progress=False)
    assert [e["step"] for e in resumed.losses] == list(range(resumed_from + 1, 7))
    assert not list(run_dir.glob("*.tmp"))
    full = load_checkpoint(uninterrupted / "last.safetensors").state_dict()
    got = load_checkpoint(run_dir / "last.safetensors").state_dict()
    assert all(torch.allclose(full[k], got[k], atol=1e-4) for k in full)
    assert [e["loss"] for e in _log(run_dir)] == pytest.approx([e["loss"] for e in _log(uninterrupted)], rel=1e-5)


def test_checkpoints_record_the_steps_that_trained_the_head(shapes, tmp_path):
    from mmcross.factory import checkpoint_metadata

    fit(_run(shapes, max_steps=2), tmp_path / "itm", progress=False)
    meta = checkpoint_metadata(tmp_path / "itm" / "last.safetensors")
    assert (meta["head_trained"], meta["head_steps"]) == ("true", "2")
    # itm_weight 0: the head never learns, so the dev evaluation does not re-rank by it and the checkpoint says so
    result = fit(
        _run(shapes, max_steps=2, itm_weight=0, eval_split="dev", eval_rerank_k=4), tmp_path / "itc", progress=False
    )
    meta = checkpoint_metadata(tmp_path / "itc" / "last.safetensors")
    assert (meta["head_trained"], meta["head_steps"]) == ("false", "0")
    assert result.eval["rerank_metrics"] is None and result.eval["rerank_skipped"] == "untrained head"
    assert not load_checkpoint(tmp_path / "itc" / "best.safetensors").head_trained


def test_itm_start_keeps_the_fusion_out_of_the_first_steps(shapes, tmp_path):
    from mmcross.factory import checkpoint_metadata, load_matcher

    def head(matcher):
        return torch.cat([p.detach().flatten() for p in matcher.head.parameters()])

    cfg = _run(shapes, max_steps=4, itm_start=0.5)
    initial = head(load_matcher(cfg.model_ref()))  # the seeded initialisation `fit` starts from
    early = fit(_run(shapes, max_steps=2, itm_start=0.99), tmp_path / "early", progress=False)
    assert torch.equal(head(early.matcher), initial)  # ITC alone: the head has not moved
    assert checkpoint_metadata(tmp_path / "early" / "last.safetensors")["head_trained"] == "false"
    result = fit(cfg, tmp_path / "run", progress=False)
    assert ["itm" in e for e in _log(tmp_path / "run")] == [False, False, True, True]
    assert checkpoint_metadata(tmp_path / "run" / "last.safetensors")["head_steps"] == "2"
    assert not torch.equal(head(result.matcher), initial)


FUSION_PHASE = dict(max_steps=3, fusion_steps=3, itm_start=1.0, fusion_batch_size=6, fusion_warmup_steps=1)


def _towers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(("image_encoder", "text_encoder"))}


def test_fusion_phase_trains_the_fusion_alone_on_the_frozen_towers(shapes, tmp_path):
    from mmcross.factory import checkpoint_metadata, load_matcher

    cfg = _run(shapes, ckpt_every=3, eval_split="dev", eval_rerank_k=4, **FUSION_PHASE)
    result = fit(cfg, tmp_path / "run", progress=False)
    assert result.step == 6 and result.stopped_by == "max_steps"
    log = _log(tmp_path / "run")
    # the towers' steps: ITC alone (itm_start 1.0); then the fusion phase: the ITM alone, its own schedule
    assert [("itc" in e, "itm" in e, e.get("phase")) for e in log] == [(True, False, None)] * 3 + [
        (False, True, "fusion")
    ] * 3
    assert log[3]["lr"] == pytest.approx(1e-3)  # warm-up of one step, then its own cosine from the peak
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [e for e in lines if "eval" in e]
    assert [e["step"] for e in evals] == [3, 6]  # the towers' last step is evaluated: the dual encoder is final
    assert evals[0]["eval"]["rerank_skipped"] == "untrained head" and evals[1]["eval"]["rerank_metrics"]
    assert evals[0]["eval"]["metrics"] == evals[1]["eval"]["metrics"]  # frozen towers: the same dual ranking
    assert lines[-1]["fusion_steps"] == 3 and lines[-1]["max_steps"] == 3
    assert lines[-1]["versions"]["torch"] == torch.__version__  # runs of one recipe differ across torch builds
    # the towers end where a run of the towers' steps alone ends; the fusion moved only in its phase
    towers_only = fit(
        _run(shapes, **{**FUSION_PHASE, "fusion_steps": 0, "itm_start": 0.99}), tmp_path / "t", progress=False
    )
    alone, after = towers_only.matcher.state_dict(), result.matcher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in _towers(alone).items())
    assert torch.equal(
        alone["fusion.image_proj.1.weight"], load_matcher(cfg.model_ref()).state_dict()["fusion.image_proj.1.weight"]
    )
    assert any(not torch.equal(v, after[k]) for k, v in alone.items() if k.startswith(("fusion", "head")))
    # the tie on the dual rsum goes to the fusion phase's checkpoint: its head is the trained one
    assert checkpoint_metadata(tmp_path / "run" / "best.safetensors")["head_steps"] == "3"


@pytest.mark.parametrize(
    ("kill_at", "neighbours"), [(1, 0), (2, 0), (4, 0), (4, 1)], ids=["towers", "boundary", "fusion", "neighbours"]
)
def test_kill_and_resume_across_the_fusion_phase_equals_uninterrupted(
    shapes, tmp_path, kill_at, neighbours, monkeypatch
):
    from mmcross.train import plan

    drawn = []  # the phase's batches come from the neighbourhood plan when train.neighbour_batches is set
    original = plan.NeighbourPlan.micro_batch
    monkeypatch.setattr(plan.NeighbourPlan, "micro_batch", lambda self, m, r: drawn.append(m) or original(self, m, r))
    cfg = _run(
        shapes, ckpt_every=1, **{**FUSION_PHASE, "max_steps": 2, "fusion_steps": 4, "neighbour_batches": neighbours}
    )
    fit(cfg, tmp_path / "full", progress=False)
    assert drawn == ([0, 1, 2, 3] if neighbours else [])

    class Killed(Exception):
        pass

    def kill(entry):
        if entry["step"] == kill_at:
            raise Killed

    # a checkpoint every step: the kill comes after step kill_at's checkpoint, so resuming starts at kill_at + 1
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress=False, on_step=kill)
    resumed = fit(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert [e["step"] for e in resumed.losses] == list(range(kill_at + 1, 7))
    a, b = _log(tmp_path / "full"), _log(tmp_path / "resumed")
    assert [e["step"] for e in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"]) == pytest.approx((y["loss"], y["lr"]), rel=1e-5, abs=1e-6), x["step"]
    wa = load_checkpoint(tmp_path / "full" / "last.safetensors").state_dict()
    wb = load_checkpoint(tmp_path / "resumed" / "last.safetensors").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_bf16_autocast_on_a_cpu_without_bf16_units_stays_fp32(shapes, tmp_path, monkeypatch, caplog):
    from mmcross.train import loop

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    with loop.autocast_context("bf16", torch.device("cpu")):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32
    with caplog.at_level("WARNING", logger="mmcross.train.loop"):
        fit(_run(shapes, max_steps=1, autocast="bf16"), tmp_path / "run", progress=False)
    assert "no native bf16" in caplog.text and "stays fp32" in caplog.text


def test_cpu_bf16_attention_takes_the_plain_path_not_the_fused_kernel_and_accumulates(shapes, tmp_path):
    from mmcross.train.loop import autocast_context, cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: train.autocast=bf16 stays fp32 here")
    q = torch.randn(2, 4, 20, 32, requires_grad=True)
    ops = {}
    for setting in ("bf16", "off"):
        with torch.profiler.profile() as prof:
            with autocast_context(setting, torch.device("cpu")):
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out.float().sum().backward()
        ops[setting] = " ".join(e.key for e in prof.key_averages())
    assert "flash" not in ops["bf16"] and "bmm" in ops["bf16"]  # the slow bf16 backward is avoided
    assert "flash" in ops["off"]  # fp32 keeps the fused kernel (both cost the same there)
    # one fresh context per micro-batch: two micro-batches per step run and learn
    result = fit(_run(shapes, max_steps=2, autocast="bf16", accum_steps=2), tmp_path / "acc", progress=False)
    assert len(result.losses) == 2 and all(math.isfinite(e["loss"]) for e in result.losses)


def test_bf16_autocast_runs_the_towers_in_bf16_and_keeps_fp32_weights(shapes, tmp_path):
    from mmcross.train.loop import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: train.autocast=bf16 stays fp32 here")
    dtypes = set()

    def record(module, args, output):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(output, torch.Tensor):
            dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        mixed = fit(_run(shapes, max_steps=3, autocast="bf16"), tmp_path / "bf16", progress=False)
    finally:
        hook.remove()
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in load_checkpoint(tmp_path / "bf16" / "last.safetensors").parameters())
    exact = fit(_run(shapes, max_steps=3, autocast="off"), tmp_path / "fp32", progress=False)
    # the same steps in fp32 and in bf16: the losses agree to bf16's precision, not bit for bit
    for a, b in zip(mixed.losses, exact.losses, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05) and a["loss"] != b["loss"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_steps", 0, "max_steps must be at least 1"),
        ("max_steps", -5, "at least 1"),
        ("lr", -1, "lr must be positive"),
        ("caption_word_drop", 1.0, "caption_word_drop is a probability"),
        ("itm_start", 1.0, "itm_start is a share"),
        ("fusion_steps", -1, "fusion_steps must be at least 0"),
        ("fusion_lr", 0, "fusion_lr must be positive"),
        ("autocast", "fp16", "autocast is one of auto, bf16, off"),
        ("neighbour_batches", 2, "neighbour_batches builds batches from the feature cache"),
        ("neighbour_batches", -1, "neighbour_batches must be at least 0"),
    ],
)
def test_bad_numbers_are_refused_before_the_run(shapes, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        fit(_run(shapes, **{key: value}), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_neighbourhoods_that_do_not_fill_the_fusion_batch_are_refused_before_the_run(shapes, tmp_path):
    with pytest.raises(ValueError, match=r"fusion_batch_size \(6\) must be a multiple of train.neighbour_batches \+ 1"):
        fit(_run(shapes, **{**FUSION_PHASE, "neighbour_batches": 3}), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="at most 16"):
        fit(_run(shapes, **{**FUSION_PHASE, "neighbour_batches": 17}), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_fusion_batch_larger_than_the_data_is_refused_before_the_towers_steps(shapes, tmp_path):
    # it was found when the phase began, after every towers' step, and named only "one global batch"
    steps = []
    with pytest.raises(ValueError, match=r"fewer than one fusion-phase batch: train.fusion_batch_size \(400\)"):
        fit(
            _run(shapes, **{**FUSION_PHASE, "fusion_batch_size": 400}),
            tmp_path / "big",
            progress=False,
            on_step=steps.append,
        )
    assert steps == []


def test_train_reads_a_table_with_its_own_columns_and_image_root(shapes, tmp_path):
    """train.image_root, image_col and caption_col: a CSV whose paths were written for another folder trains as it
    is, and its dev split is read the same way (train had no way to say either)."""
    from typer.testing import CliRunner

    from cli import app

    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    table = tmp_path / "elsewhere" / "pairs.csv"
    table.parent.mkdir()
    lines = ["pic,words,split"] + [f"{r['image']},{r['captions'][0]},{r['split']}" for r in rows]
    table.write_text("\n".join(lines) + "\n")
    sets = {
        "model": "tiny",
        "train.data": str(table),
        "train.image_root": str(shapes.parent),
        "train.image_col": "pic",
        "train.caption_col": "words",
        "train.max_steps": "2",
        "train.batch_size": "4",
        "train.eval_max_images": "4",
        "train.eval_rerank_k": "0",
        "train.decode_cache": str(tmp_path / "decoded"),
    }

    def train(out: str, **more: str):
        options = [a for k, v in {**sets, **more}.items() for a in ("--set", f"{k}={v}")]
        return CliRunner().invoke(app, ["train", "--out", str(tmp_path / out), "--quiet", *options])

    result = train("run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["step"] == 2
    evals = [json.loads(x)["eval"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and evals[-1]["images"] == 4 and evals[-1]["rejects"] == 0
    without = train("run2", **{"train.image_root": ""})  # the paths resolve against the table's folder: none there
    assert without.exit_code == 1 and "none of the training images" in without.output


def test_gpu_finetune_config_runs_its_recipe_through_the_cli_on_the_tiny_model(shapes, tmp_path):
    """configs/flickr30k-finetune.yaml (pretrained ViT-B-32 on a GPU) is not run here; its recipe is: last-n
    blocks trainable, head from the ITC, towers' steps by ITC alone, then the fusion phase on look-alike batches."""
    from typer.testing import CliRunner

    from cli import app
    from mmcross.factory import load_matcher

    config = Path(__file__).parent.parent / "configs" / "flickr30k-finetune.yaml"
    small = {
        "model": "tiny",  # 4 blocks a tower: the last 2 train
        "pretrained": "none",
        "train.data": str(shapes),
        "train.format": "auto",
        "train.last_n_blocks": "2",
        "train.max_steps": "2",
        "train.fusion_steps": "2",
        "train.batch_size": "8",
        "train.fusion_batch_size": "8",
        "train.warmup_steps": "1",
        "train.fusion_warmup_steps": "1",
        "train.workers": "0",
        "train.eval_max_images": "6",
        "train.eval_rerank_k": "4",
        "train.eval_every": "2",
        "train.log_every": "1",
        "train.decode_cache": str(tmp_path / "decoded"),
    }
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(
        app, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", *sets]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["step"] == 4
    log = _log(tmp_path / "run")
    assert [("itm" in e, e.get("phase")) for e in log] == [(False, None)] * 2 + [(True, "fusion")] * 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [e["eval"] for e in lines if "eval" in e]
    assert evals[0]["rerank_skipped"] == "untrained head" and evals[-1]["rerank_metrics"]
    chosen = [e for e in lines if "paraphrase_share" in e]  # the mask as a share: the cosine it chose, at the phase
    assert [(e["step"], e["paraphrase_share"]) for e in chosen] == [(2, 0.03)]
    assert -1.0 <= chosen[0]["paraphrase_cosine"] <= 1.0
    start = load_matcher(load_run_cfg(str(config), small).model_ref()).state_dict()
    end = load_checkpoint(tmp_path / "run" / "last.safetensors").state_dict()
    for tower in ("image_encoder.visual.transformer", "text_encoder.transformer"):
        moved = [
            not torch.equal(start[k], end[k]) for k in (f"{tower}.resblocks.{b}.mlp.c_fc.weight" for b in range(4))
        ]
        assert moved == [False, False, True, True]  # trainable: last_n


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"itc_weight": 0, "itm_start": 0.5}, "leave steps without any loss term"),  # was: 'float' has no backward
        ({"itc_weight": 0, "itm_weight": 0}, "leave steps without any loss term"),
        ({"itm_rank_weight": -1}, "itm_rank_weight must be 0 or more"),
        ({"min_lr_ratio": -1}, r"min_lr_ratio is a fraction of the peak learning rate in \[0, 1\]"),
        ({"vse_margin": -1}, "vse_margin must be 0 or more"),
        ({"decode_cache_max_gb": -1}, "decode_cache_max_gb must be 0 or more"),
        ({"init_temperature": 0}, "init_temperature must be positive"),  # was: ZeroDivisionError
        ({"init_temperature": -0.1}, "init_temperature must be positive"),  # was: math domain error
        ({"lr": "inf"}, "train.lr: .inf. is not a finite number"),
        ({"itm_rank_weight": "nan"}, "itm_rank_weight: .nan. is not a finite number"),
        ({"device": "GPU"}, "train.device is auto, cpu, cuda or cuda:N, not 'GPU'"),  # was: CPU, silently
    ],
)
def test_settings_without_a_loss_or_out_of_range_are_refused_before_the_run(shapes, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        fit(_run(shapes, **settings), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_cuda_device_without_cuda_is_refused_before_the_run(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device=cuda, but this machine has no CUDA device"):
        fit(_run(shapes, device="cuda"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_resume_keeps_the_runs_settings_and_refuses_others(shapes, tmp_path):
    from mmcross.train import train_from_config

    run_dir = tmp_path / "run"
    fit(_run(shapes, max_steps=2), run_dir, progress=False)
    saved = (run_dir / "config.json").read_text()
    refused = [
        (
            _run(shapes, max_steps=2, sets={"fusion.dim": "64", "itc_weight": "7"}),
            "fusion.dim: the run has 128, not 64",
        ),
        (_run(shapes, max_steps=2, sets={"itc_weight": "7"}), "itc_weight: the run has 1.0, not 7.0"),
        (_run(shapes, max_steps=2, sets={"model": "rn-small"}), 'model: the run has "tiny", not "rn-small"'),
        (_run(shapes, max_steps=2, lr=0.01), "train.lr: the run has 0.001, not 0.01"),
    ]
    for cfg, message in refused:
        with pytest.raises(ValueError, match=message):
            fit(cfg, run_dir, resume=True, progress=False)
    assert (run_dir / "config.json").read_text() == saved  # nothing was written
    # without --config the run's own config.json is the base (not the defaults) that --set changes
    train_from_config(None, run_dir, {"fusion.dim": "128"}, resume=True, progress=False)  # the run's own value
    assert (run_dir / "config.json").read_text() == saved  # not rewritten: nothing changed
    train_from_config(None, run_dir, {"train.log_every": "5", "train.max_minutes": "3"}, resume=True, progress=False)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["train"]["log_every"], config["train"]["max_minutes"]) == (5, 3.0)  # operational: may change
    assert config["train"]["data"] == str(shapes) and config["train"]["batch_size"] == 8  # the rest kept
    # a train field given with --set is a change on purpose (a longer schedule): taken, and said in the summary and
    # in the log at the step it took effect; the architecture never is (above)
    result = train_from_config(None, run_dir, {"train.max_steps": "4"}, resume=True, progress=False)
    assert result.step == 4 and result.resumed_with == {"max_steps": [2, 4]}
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "resumed_with": {"max_steps": [2, 4]}} in lines
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 4
    # what trains decides the optimiser's parameter groups, which the restored state must match: refused
    for field, value in (("trainable", "fusion"), ("last_n_blocks", "5")):
        with pytest.raises(ValueError, match=f"train.{field}: the run has .*parameter groups"):
            train_from_config(None, run_dir, {f"train.{field}": value}, resume=True, progress=False)
    assert json.loads((run_dir / "config.json").read_text())["train"]["trainable"] == "all"
    # a learning rate or weight decay given on purpose is used (the restored groups' values silently won before)
    sets = {"train.max_steps": "5", "train.lr": "0.01", "train.weight_decay": "0.3"}
    result = train_from_config(None, run_dir, sets, resume=True, progress=False)
    assert result.resumed_with == {"max_steps": [4, 5], "lr": [0.001, 0.01], "weight_decay": [0.05, 0.3]}
    state = json.loads((run_dir / "state.json").read_text())
    assert {g["initial_lr"] for g in state["param_groups"]} == {0.01}
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.0, 0.3}  # no decay on biases and norms
    # a finished run takes no step with a change: refused, config.json left saying what its steps were taken with
    saved = (run_dir / "config.json").read_text()
    with pytest.raises(ValueError, match="train.lr changed: it has taken all 5 of its steps"):
        train_from_config(None, run_dir, {"train.lr": "0.02"}, resume=True, progress=False)
    assert (run_dir / "config.json").read_text() == saved


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_resume(shapes, tmp_path):
    class Killed(Exception):
        pass

    def kill_at_2(entry):
        if entry["step"] == 2:
            raise Killed

    cfg, run_dir = _run(shapes, max_steps=3), tmp_path / "run"
    with pytest.raises(Killed):
        fit(cfg, run_dir, progress=False, on_step=kill_at_2)
    assert (run_dir / "log.jsonl").is_file() and not (run_dir / "last.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(cfg, run_dir, resume=True, progress=False)
    result = fit(cfg, run_dir, progress=False)  # was: "already holds a run; pass --resume"
    assert result.step == 3
    assert [e["step"] for e in _log(run_dir)] == [1, 2, 3]  # the old log replaced, not appended to
