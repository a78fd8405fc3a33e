"""train.py: the toy world, a few iterations, exact resume, torchrun on CPU, the vocabulary in checkpoints."""
import json
import os
import subprocess

import pytest
import torch

import probe
import train
import virtex
from conftest import ROOT, TINY, one_thread_each, run_train, torchrun_command, two_nodes


def run(toy, out, *flags):
    run_train(out, "--toy-dir", toy, *flags)


def test_toy_world_is_valid_coco_and_voc(toy):
    items = virtex.read_captions(toy / "coco", "train")
    assert len(items) == 48 and all(len(captions) == 5 and path.is_file()
                                    for path, captions in items)
    instances = json.loads((toy / "coco" / "annotations" / "instances_val2017.json").read_text())
    # kinds only, no colours
    assert [c["name"] for c in instances["categories"]] == list(virtex.SHAPES)
    ids = {i["id"] for i in instances["images"]}
    assert {a["image_id"] for a in instances["annotations"]} <= ids
    paths, labels, classes = probe.read_voc(toy / "voc" / "VOCdevkit" / "VOC2007", "test")
    assert len(paths) == 24 and classes == sorted(virtex.TOY_CLASSES) and labels.shape == (24, 20)
    assert set(labels.unique().tolist()) <= {-1, 0, 1} and (labels == 1).any()
    classes = sorted(p.name for p in (toy / "imagenet" / "train").iterdir())
    assert classes == sorted(virtex.TOY_CLASSES)


def test_captions_name_what_the_image_shows():
    import random
    rng = random.Random(0)
    image, objects = virtex.toy_scene(rng, 64, kinds=[("red", "star"), ("blue", "square")])
    captions = virtex.toy_captions(rng, objects)
    assert len(captions) == 5 and all("red star" in c and "blue square" in c for c in captions)


def test_resume_after_stop_equals_uninterrupted_run(toy, tmp_path):
    run(toy, tmp_path / "a", "--iterations", "6", "--checkpoint-every", "100")
    run(toy, tmp_path / "b", "--iterations", "6", "--checkpoint-every", "100", "--stop-after", "3")
    assert virtex.load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    run(toy, tmp_path / "b", "--iterations", "6", "--checkpoint-every", "100")
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["iteration"] == b["iteration"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["slow"], b["optimizer"]["slow"]))
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "loss_forward", "loss_backward", "lr", "img_per_s"} <= set(logged[0])
    assert any("voc_map" in line and "val_loss" in line for line in logged)


@pytest.mark.slow
def test_checkpoint_carries_its_vocabulary_and_probes(toy, tmp_path):
    run(toy, tmp_path, "--iterations", "4", "--checkpoint-every", "2")
    assert {p.name for p in tmp_path.glob("*.pt")} == {"last.pt", "best.pt", "checkpoint_2.pt",
                                                       "checkpoint_4.pt"}
    model, tokenizer = virtex.load_model(tmp_path / "checkpoint_4.pt")
    assert tokenizer.model == (tmp_path / "vocab.model").read_bytes()
    assert model.cfg.image_size == 32 and len(tokenizer) == model.cfg.vocab_size
    assert "optimizer" not in virtex.load_checkpoint(tmp_path / "checkpoint_4.pt")


@pytest.mark.parametrize("task", ["captioning", "masked_lm", "token_classification",
                                  "multilabel_classification"])
@pytest.mark.slow
def test_every_task_trains_and_its_checkpoint_loads_back(task, toy, tmp_path):
    run(toy, tmp_path, "--task", task, "--iterations", "2", "--checkpoint-every", "2")
    model, _ = virtex.load_model(tmp_path / "last.pt")
    assert model.cfg.task == task and not hasattr(model, "backward_textual")
    assert model.cfg.vocab_size == (len(virtex.SHAPES) + 1 if task == "multilabel_classification" else 64)
    state = virtex.load_checkpoint(tmp_path / "last.pt")["model"]
    # the official reader sees the same model
    official = virtex.from_official(tmp_path / "last.pt", heads=2, task=task)
    assert all(torch.equal(official.state_dict()[k], v) for k, v in state.items())


@pytest.mark.slow
def test_changed_settings_refuse_to_resume_but_training_longer_is_accepted(toy, tmp_path, capsys):
    run(toy, tmp_path, "--iterations", "4", "--stop-after", "2")
    with pytest.raises(SystemExit, match="hidden"):
        run(toy, tmp_path, "--iterations", "4", "--hidden", "64", "--heads", "2")
    run(toy, tmp_path, "--iterations", "5", "--checkpoint-every", "100")
    assert "--iterations 5, not 4: the LR schedule changes from iteration 2 on" in capsys.readouterr().out
    assert virtex.load_checkpoint(tmp_path / "last.pt")["iteration"] == 5


@pytest.mark.slow
def test_two_nodes_train_checkpoint_once_resume_and_evaluate_as_one_process(toy, tmp_path):
    flags = ["--toy-dir", toy, "--out", tmp_path, *TINY, "--iterations", "4",
             "--checkpoint-every", "100"]
    for node in two_nodes("train.py", *flags, "--stop-after", "2"):
        assert node.returncode == 0, node.stderr[-2000:]
    assert virtex.load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    first, second = two_nodes("train.py", *flags)
    assert first.returncode == second.returncode == 0, (first.stderr + second.stderr)[-2000:]
    assert "resuming" in first.stdout and "resuming" not in second.stdout  # rank 0 alone speaks
    assert virtex.load_checkpoint(tmp_path / "last.pt")["iteration"] == 4
    # The record the two ranks wrote together equals one process evaluating the same weights.
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # one writer, no duplicates
    assert [r["iteration"] for r in logged if "val_loss" in r] == [2, 4]
    shared = next(r for r in logged if r.get("iteration") == 4 and "val_loss" in r)
    run, _, val_data = train.prepare(train.parse_args([str(f) for f in flags]), 0, 1,
                                     torch.device("cpu"))
    sets = train.eval_sets(run, val_data)
    assert train.validate(run, sets["val"]) == pytest.approx(shared["val_loss"], rel=1e-3)
    assert train.val_cider(run, sets["val"], val_data) == pytest.approx(shared["val_cider"],
                                                                        abs=1e-6)
    splits = sets["voc"].features(run.model.visual, run.device)
    voc_map = sets["voc"].evaluate(splits, run.device).mean().item()
    assert voc_map == pytest.approx(shared["voc_map"], abs=0.05)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(toy, tmp_path):
    import re
    import select
    import signal
    command = torchrun_command("train.py", "--toy-dir", toy, "--out", tmp_path, *TINY,
                               "--iterations", "200",
                               "--checkpoint-every", "1000")
    process = subprocess.Popen(command, cwd=ROOT, env=one_thread_each(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = b""
    # rank 0's progress bar: training is under way
    while not re.search(rb"\b([2-9]|\d\d+)/200\b", progress):
        assert select.select([process.stderr], [], [], 300)[0], "no progress in 300 s"
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, progress.decode()[-2000:]
        progress += chunk
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    stdout, _ = process.communicate(timeout=120)
    assert "stopped by a signal after iteration" in stdout.decode()
    stopped = int(re.search(r"stopped by a signal after iteration (\d+)", stdout.decode())[1])
    assert virtex.load_checkpoint(tmp_path / "last.pt")["iteration"] == stopped


def test_a_batch_that_does_not_split_across_processes_is_refused(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(virtex, "init_processes",
                        lambda: virtex.Processes(0, 2, torch.device("cpu")))
    with pytest.raises(SystemExit,
                       match="^error: --batch-size 3 is not divisible by the 2 processes$"):
        run(toy, tmp_path, "--batch-size", "3")


@pytest.mark.slow
def test_eval_every_skips_evaluations_but_not_checkpoints_and_times_each_part(toy, tmp_path):
    run(toy, tmp_path, "--iterations", "4", "--checkpoint-every", "1", "--eval-every", "2")
    kept = {p.name for p in tmp_path.glob("checkpoint_*.pt")}
    assert kept == {f"checkpoint_{i}.pt" for i in range(1, 5)}
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in evaluated] == [2, 4]
    assert all(set(r["eval_seconds"]) == {"val_loss", "val_cider", "voc_map"} for r in evaluated)
    assert evaluated[0]["eval_cache_mb"] > 0  # the inputs decoded at the first evaluation, kept


@pytest.mark.slow
def test_each_rank_trains_on_its_own_slice_of_every_global_batch(toy, tmp_path, monkeypatch):
    loaded = []
    getitem = virtex.CaptioningDataset.__getitem__
    monkeypatch.setattr(virtex.CaptioningDataset, "__getitem__",
                        lambda self, key: loaded.extend([key[0]] if self.train else []) or getitem(self, key))
    monkeypatch.setattr(train, "evaluate", lambda *_: {})  # alone, a rank would wait for the others
    flags = ["--data", toy / "coco", "--iterations", "2", "--checkpoint-every", "100"]
    run_train(tmp_path / "alone", *flags)
    alone, ranks = list(loaded), []
    for rank in range(2):  # each process of a two-process run, in turn
        loaded.clear()
        monkeypatch.setattr(virtex, "init_processes",
                            lambda: virtex.Processes(rank, 2, torch.device("cpu")))
        run_train(tmp_path / f"rank{rank}", *flags, "--vocab", tmp_path / "alone" / "vocab.model")
        ranks.append(list(loaded))
    assert len(alone) == 16 and ranks == [alone[0:4] + alone[8:12], alone[4:8] + alone[12:16]]


@pytest.mark.slow
def test_best_pt_survives_a_resume_followed_by_a_worse_checkpoint(toy, tmp_path, monkeypatch):
    import itertools
    maps = itertools.chain([50.0, 10.0], itertools.repeat(0.0))
    monkeypatch.setattr(probe.VOC07, "evaluate",
                        lambda self, splits, device: torch.full((20,), next(maps)))
    run(toy, tmp_path, "--iterations", "4", "--checkpoint-every", "2", "--stop-after", "2")
    run(toy, tmp_path, "--iterations", "4", "--checkpoint-every", "2")
    best = virtex.load_checkpoint(tmp_path / "best.pt")
    assert best["iteration"] == 2 and best["voc_map"] == 50.0


@pytest.mark.slow
def test_best_pt_keeps_the_best_checkpoint_of_the_run_not_the_best_since_the_last(toy, tmp_path,
                                                                                monkeypatch):
    import itertools
    maps = itertools.chain([50.0, 10.0, 30.0], itertools.repeat(0.0))  # then the floor's probe
    monkeypatch.setattr(probe.VOC07, "evaluate",
                        lambda self, splits, device: torch.full((20,), next(maps)))
    run(toy, tmp_path, "--iterations", "3", "--checkpoint-every", "1", "--cider-images", "1")
    best = virtex.load_checkpoint(tmp_path / "best.pt")
    assert best["iteration"] == 1 and best["voc_map"] == 50.0


@pytest.mark.slow
def test_each_step_runs_at_the_scheduled_learning_rates(toy, tmp_path, monkeypatch):
    import math
    seen, step = [], virtex.LookAhead.step
    monkeypatch.setattr(virtex.LookAhead, "step",
                        lambda self: seen.append(sorted({g["lr"] for g in self.param_groups})) or step(self))
    run(toy, tmp_path, "--iterations", "6", "--warmup", "2", "--lr", "0.01", "--cnn-lr", "0.1",
        "--checkpoint-every", "100")
    # By hand: iteration i runs after i - 1 steps: warmup 0, 1/2, then cos^2 over the 4 remaining steps.
    factors = [0.0, 0.5, 1.0, math.cos(math.pi / 8) ** 2, 0.5, math.cos(3 * math.pi / 8) ** 2]
    assert seen == [pytest.approx(sorted({0.01 * f, 0.1 * f})) for f in factors]


@pytest.mark.slow
def test_dropout_is_drawn_anew_at_every_step(toy, tmp_path, monkeypatch):
    seeds, manual_seed = [], torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed) or manual_seed(seed))
    run(toy, tmp_path, "--iterations", "3", "--checkpoint-every", "100")
    # the loop's, iterations 1-3 of rank 0
    steps = seeds[seeds.index(virtex.mix_seed(0, 1, 0)):][:3]
    assert steps == [virtex.mix_seed(0, i, 0) for i in (1, 2, 3)] and len(set(steps)) == 3


@pytest.mark.slow
def test_evaluation_follows_the_runs_precision(toy, tmp_path, monkeypatch):
    asked, autocast = [], virtex.autocast
    monkeypatch.setattr(virtex, "autocast",
                        lambda device, amp="bf16": asked.append(amp) or autocast(device, amp))
    run(toy, tmp_path, "--iterations", "2", "--checkpoint-every", "100", "--amp", "off")
    # 2 training steps, val loss, CIDEr, 2 VOC07 splits
    assert len(asked) >= 6 and set(asked) == {"off"}
