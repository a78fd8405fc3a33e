"""Four CPU processes under torchrun (gloo): what two cannot show. A ring all-reduce over 3+ ranks
rounds by where each gradient sits in its bucket (two ranks' a + b = b + a hides that); every rank
evaluates its share of batches with the statistics it holds; four readers of shards resume."""
import json
import random
from types import SimpleNamespace

import pytest
import torch

import probe
import train
import virtex
from conftest import TINY, torchrun

pytestmark = pytest.mark.slow


def torchrun4(script, *flags):
    result = torchrun(script, *flags, nproc=4)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_four_processes_resumed_on_shards_end_bit_identical_to_the_uninterrupted(toy, tmp_path):
    # DDP (by default) reduces a process's first steps in other buckets than the later ones: step 3
    # is the resumed process's first, the uninterrupted run's third.
    flags = ["--data", toy / "shards", *TINY, "--iterations", 3, "--checkpoint-every", 100]
    torchrun4("train.py", *flags, "--out", tmp_path / "a")
    torchrun4("train.py", *flags, "--out", tmp_path / "b", "--stop-after", 2)
    torchrun4("train.py", *flags, "--out", tmp_path / "b")
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["iteration"] == b["iteration"] == 3 and a["shards"] == b["shards"]
    assert set(a["shards"]["positions"]) == {0, 1, 2, 3}  # each rank's reader, where it stands
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["slow"], b["optimizer"]["slow"]))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])


def test_four_processes_evaluate_exactly_the_weights_and_statistics_they_save(tmp_path):
    # Evaluation batches hold 64 images: 200 val and 200 + 200 VOC07 images give each rank one.
    virtex.write_toy_coco(tmp_path / "coco", random.Random(0), 32, {"train": 48, "val": 200})
    virtex.write_toy_voc(tmp_path / "voc", random.Random(1), 32, 200)
    flags = ["--data", tmp_path / "coco", "--voc", tmp_path / "voc", *TINY, "--iterations", 2,
             "--checkpoint-every", 2, "--cider-images", 1, "--out", tmp_path / "out"]
    torchrun4("train.py", *flags)  # (CIDEr is 0 this early: one image is enough)
    log = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, log) if "val_loss" in r)
    # probe.py on the checkpoint, in one process. Ranks 1-3 evaluating with the BatchNorm
    # statistics their own last batch left (rank 0's are saved) moved this mAP by 0.13.
    model, _ = virtex.load_model(tmp_path / "out" / "checkpoint_2.pt")
    cpu = torch.device("cpu")
    aps = probe.voc07(model.visual, tmp_path / "voc", 32, cpu, model.cfg.amp, workers=0)
    assert aps.mean().item() == pytest.approx(record["voc_map"], abs=1e-3)
    run, _, val_data = train.prepare(train.parse_args([str(f) for f in flags]), 0, 1, cpu)
    sets = train.eval_sets(run, val_data)  # the val loss: each rank sums its batch's share
    assert train.validate(run, sets["val"]) == pytest.approx(record["val_loss"], rel=1e-6)


def test_four_processes_resume_a_linear_probe_bit_identically_and_count_top1_as_one(toy, tmp_path):
    flags = ["--init", "random", "--backbone", "resnet18", "--image-size", 32, "--epochs", 1,
             "--batch-size", 64, "--workers", 0, "--imagenet", toy / "imagenet"]  # 7 iterations
    whole = torchrun4("probe.py", *flags, "--out", tmp_path / "a")
    torchrun4("probe.py", *flags, "--out", tmp_path / "b", "--stop-after", 2)
    resumed = torchrun4("probe.py", *flags, "--out", tmp_path / "b")
    assert resumed.stdout.count("top-1: ") == 1  # rank 0 alone prints
    assert resumed.stdout.splitlines()[-1] == whole.stdout.splitlines()[-1]
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt")["model"] for d in "ab")
    assert a.keys() == {"weight", "bias"} and all(torch.equal(a[k], b[k]) for k in a)
    # The 100 val images are two batches, ranks 2 and 3 have none: the counts summed over the four
    # ranks are one process's counts with the saved head.
    classifier = probe.Classifier(probe.load_backbone("random", "resnet18")[0], 20)
    classifier.fc.load_state_dict(a)
    run = SimpleNamespace(processes=(0, 1, torch.device("cpu"), None), model=classifier,
                          trained=classifier.fc, recipe=SimpleNamespace(workers=0, amp="off"))
    record = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
    val = probe.read_splits(toy / "imagenet").val
    assert probe.evaluate(run, val, 32) == (record["top1"], record["top5"])
