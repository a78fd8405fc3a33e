"""Properties of whole runs at several processes: every number a run records is the same at one
and at several processes on the same checkpoint, each rank evaluating a share. (Resume at four
processes: test_four_processes.py; probe.py's classification scores: its linear probe test.)"""
import json

import pytest

import virtex
from conftest import TINY, run_probe, run_train, torchrun
from test_properties import TINY_MODEL, write_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world at 32 px with 200 val and 200 + 200 VOC07 images: four evaluation batches of
    64, so that each of four ranks has a share of every split, and of two, rank 0 two batches,
    which the gathered features must put back in order."""
    root = tmp_path_factory.mktemp("world")
    virtex.make_toy_world(root, size=32, train=16, val=200, voc=200)
    return root


def evaluations(out):
    figures = ("val_loss", "val_cider", "voc_map")
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [[r[k] for k in figures] for r in records if "val_loss" in r]


def test_four_ranks_evaluate_the_checkpoint_rank_0_saves_as_one_process_does(world, tmp_path):
    """The val loss, val CIDEr and VOC07 mAP that four processes record after a step are those one
    process records of the same checkpoint. The step runs at LR 0 (the first of the warmup) and
    rank 0's 4 images are the 4 of one process: the same weights and BatchNorm statistics are
    saved. Ranks 1-3 updated theirs from other images; evaluating with those (not the saved ones)
    moved the mAP by 0.13."""
    voc = world / "voc" / "VOCdevkit" / "VOC2007"
    flags = ["--data", world / "coco", "--voc", voc, *TINY, "--iterations", 1,
             "--cider-images", 200]
    run_train(tmp_path / "one", *flags, "--batch-size", 4)
    result = torchrun("train.py", "--out", tmp_path / "four", *flags, "--batch-size", 16,
                      "--vocab", tmp_path / "one" / "vocab.model", nproc=4)
    assert result.returncode == 0, result.stderr[-2000:]
    (loss, cider, voc_map), = evaluations(tmp_path / "one")
    (four_loss, four_cider, four_map), = evaluations(tmp_path / "four")
    # each rank sums its batch's share of the loss: four partial sums, added in a ring's order
    assert four_loss == pytest.approx(loss, rel=1e-6) and (four_cider, four_map) == (cider, voc_map)


def test_the_voc07_probe_prints_the_same_map_at_one_and_two_processes(world, tmp_path, capsys):
    """probe.py's VOC07 mAP of one checkpoint is the same computed by one process as by two."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", virtex.Config(**TINY_MODEL))
    voc = ["--ckpt", checkpoint, "--voc", world / "voc" / "VOCdevkit" / "VOC2007", "--workers", 0]
    run_probe(*voc)
    one = capsys.readouterr().out.strip().splitlines()[-1]
    result = torchrun("probe.py", *voc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == one and one.startswith("mAP: ")
