"""Four CPU processes under torchrun (gloo): what two cannot show. A ring all-reduce over 3+ ranks
rounds by where each gradient sits in its bucket (two ranks' a + b = b + a hides that); four readers
of shards resume; ranks without a batch still count. (Evaluations at four: test_properties_runs.py.)"""
import pytest
import torch

import virtex
from conftest import TINY, run_probe, torchrun

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


def test_four_processes_resume_a_linear_probe_bit_identically_and_score_as_one(toy, tmp_path,
                                                                               capsys):
    flags = ["--init", "random", "--backbone", "resnet18", "--image-size", 32, "--epochs", 1,
             "--batch-size", 64, "--workers", 0, "--imagenet", toy / "imagenet"]  # 7 iterations
    run_probe(*flags, "--out", tmp_path / "one")
    one = capsys.readouterr().out.strip().splitlines()
    whole = torchrun4("probe.py", *flags, "--out", tmp_path / "a")
    torchrun4("probe.py", *flags, "--out", tmp_path / "b", "--stop-after", 2)
    assert virtex.load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 2
    resumed = torchrun4("probe.py", *flags, "--out", tmp_path / "b")
    assert "resuming" in resumed.stdout and resumed.stdout.count("top-1: ") == 1  # rank 0 alone
    assert resumed.stdout.splitlines()[-1] == whole.stdout.splitlines()[-1]
    a, b, alone = (virtex.load_checkpoint(tmp_path / d / "last.pt")["model"]
                   for d in ("a", "b", "one"))
    assert a.keys() == {"weight", "bias"} and all(torch.equal(a[k], b[k]) for k in a)
    for key in a:  # the same global batches: one process's head, up to rounding in the mean
        torch.testing.assert_close(a[key], alone[key], rtol=0, atol=1e-5)
    assert abs(float(one[-1].split()[-1]) - float(whole.stdout.split()[-1])) <= 1.0, one[-1]
    # The 100 val images are two batches, ranks 2 and 3 have none: the counts summed over the four
    # ranks are one process's counts with the saved head (the finished run, evaluated again).
    run_probe(*flags, "--out", tmp_path / "b")
    again = capsys.readouterr().out.strip().splitlines()
    assert "nothing to train" in again[-3] and again[-2:] == resumed.stdout.splitlines()[-2:]
