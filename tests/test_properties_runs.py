"""Properties of whole runs at several processes: every number a run records is the same at one
and at two processes on the same checkpoint (each of the two ranks evaluating a share)."""
import json
import shutil

import pytest
from PIL import Image

import virtex
from conftest import CAPTIONS, TINY, run_train, torchrun
from test_properties import TINY_MODEL, run_probe, write_captioned, write_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world at 32 px with 80 val and 130 + 130 VOC07 images (100 in the ImageNet val
    split): two or three evaluation batches of 64, so that both ranks have a share of every split
    and rank 0 two batches of VOC07's, which the gathered features must put back in order."""
    root = tmp_path_factory.mktemp("world")
    virtex.make_toy_world(root, size=32, train=16, val=80, voc=130)
    return root


def evaluations(out):
    figures = ("val_loss", "val_cider", "voc_map")
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [[r[k] for k in figures] for r in records if "val_loss" in r]


def pretraining_figures(world, tmp_path, train_images):
    """The evaluation records of one step of pretraining at one process and a batch of 4, and at
    two processes and a batch of 8. The step runs at LR 0 (the first of the warmup), and rank 0's
    4 images are the 4 of one process: one checkpoint, the same weights and BatchNorm statistics."""
    voc = world / "voc" / "VOCdevkit" / "VOC2007"
    flags = ["--data", train_images, "--val", world / "coco", "--voc", voc, *TINY,
             "--iterations", 1, "--cider-images", 80]
    run_train(tmp_path / "one", *flags, "--batch-size", 4)
    result = torchrun("train.py", "--out", tmp_path / "two", *flags, "--batch-size", 8,
                      "--vocab", tmp_path / "one" / "vocab.model")
    assert result.returncode == 0, result.stderr[-2000:]
    return evaluations(tmp_path / "one"), evaluations(tmp_path / "two")


def test_a_pretraining_evaluation_records_the_same_figures_at_one_and_two_processes(world,
                                                                                      tmp_path):
    """The val loss, val CIDEr and VOC07 mAP of one checkpoint are the same evaluated by one
    process as by two, each evaluating a share. (Trained on black images, which every augmentation
    leaves black: rank 1's step sees what rank 0's does, and keeps the same BatchNorm statistics.)"""
    black = [(Image.new("RGB", (40, 40)), caption) for caption in CAPTIONS[:16]]
    one, two = pretraining_figures(world, tmp_path, write_captioned(tmp_path / "black", black))
    assert len(one) == 1 and two == one


def test_every_rank_evaluates_the_checkpoint_that_rank_0_saves(world, tmp_path):
    """Trained on images of every colour, rank 1's last step updates its BatchNorm statistics from
    other images than rank 0's: the figures of the two processes are still those of the checkpoint
    rank 0 saves, which one process evaluates."""
    one, two = pretraining_figures(world, tmp_path, world / "coco")
    assert len(one) == 1 and two == one


def test_the_voc07_probe_prints_the_same_map_at_one_and_two_processes(world, tmp_path, capsys):
    """probe.py's VOC07 mAP of one checkpoint is the same computed by one process as by two."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", virtex.Config(**TINY_MODEL))
    voc = ["--ckpt", checkpoint, "--voc", world / "voc" / "VOCdevkit" / "VOC2007", "--workers", 0]
    run_probe(*voc)
    one = capsys.readouterr().out.strip().splitlines()[-1]
    result = torchrun("probe.py", *voc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == one and one.startswith("mAP: ")


def test_a_classification_checkpoint_scores_the_same_at_one_and_two_processes(world, tmp_path,
                                                                              capsys):
    """The top-1 and top-5 of one classification checkpoint (the backbone and the linear layer
    trained on it) are the same computed by one process as by two."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", virtex.Config(**TINY_MODEL))
    linear = ["--ckpt", checkpoint, "--imagenet", world / "imagenet", "--epochs", 1,
              "--batch-size", 64, "--workers", 0]
    run_probe(*linear, "--out", tmp_path / "one")  # trained: last.pt holds the layer at its end
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    run_probe(*linear, "--out", tmp_path / "one")  # nothing left to train: the checkpoint evaluated
    one = capsys.readouterr().out.strip().splitlines()
    result = torchrun("probe.py", *linear, "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-2000:]
    two = result.stdout.strip().splitlines()
    assert "nothing to train" in one[-3] and "top-5" in one[-2] and two[-2:] == one[-2:]
