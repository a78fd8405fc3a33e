"""probe.py classification: the iNaturalist layout, exact resume, fine-tuning, refusals. (At
four processes: test_four_processes.py.)"""
import json
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

import probe
import virtex
from conftest import run_probe

# A random ResNet-18 at 32 px, one epoch of the toy's 400 train images: 13 iterations of batch 32.
TINY = ["--init", "random", "--backbone", "resnet18", "--image-size", "32", "--epochs", "1",
        "--batch-size", "32", "--workers", "0"]


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_toy_inaturalist_is_read_as_the_official_reads_it(toy):
    splits = probe.read_splits(toy / "inaturalist", probe.read_inaturalist)
    assert (len(splits.train) == 400 and len(splits.val) == 100
            and splits.classes == virtex.TOY_CLASSES)
    assert all(path.is_file() for path, _ in splits.train + splits.val)
    path, label = splits.val[0]
    assert path.relative_to(toy / "inaturalist").parts[:3] == ("train_val2018", "Circle",
                                                               str(label))
    assert sorted({label for _, label in splits.train}) == list(range(20))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("annotations"), "not COCO-style images, annotations and categories"),
    (lambda d: d["annotations"][3].update(category_id=20),
     "annotation of image 3 names an image or category"),
    (lambda d: d["annotations"][0].update(image_id=10_000), "annotation of image 10000 names"),
    (lambda d: d["categories"][0].update(id="zero"), "category ids are not whole numbers"),
    (lambda d: d["images"][0].update(file_name="elsewhere/0.jpg"), "elsewhere/0.jpg: missing"),
])
def test_malformed_inaturalist_annotations_are_named(edit, message, toy, tmp_path):
    root = shutil.copytree(toy / "inaturalist" / "annotations", tmp_path / "annotations").parent
    (root / "train_val2018").symlink_to(toy / "inaturalist" / "train_val2018")
    data = json.loads((root / "annotations" / "train2018.json").read_text())
    edit(data)
    (root / "annotations" / "train2018.json").write_text(json.dumps(data))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        probe.read_splits(root, probe.read_inaturalist)


def test_bad_dataset_folders_end_with_one_line_naming_the_file(toy, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train2018.json").write_text('{"images": [')
    with pytest.raises(SystemExit) as stop:
        probe.cli([*TINY, "--inaturalist", str(tmp_path)])
    assert stop.value.code == f"error: {tmp_path}/annotations/train2018.json: not valid JSON " \
                              "(Expecting value: line 1 column 13 (char 12))"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/val: missing"):
        probe.read_splits(shutil.copytree(toy / "imagenet" / "train", tmp_path / "train").parent)


@pytest.mark.slow
def test_finetuning_resumed_after_a_stop_equals_the_uninterrupted_run(toy, tmp_path, capsys):
    flags = [*TINY, "--finetune", "--inaturalist", toy / "inaturalist"]
    run_probe(*flags, "--out", tmp_path / "a")
    whole = last_line(capsys)
    run_probe(*flags, "--out", tmp_path / "b", "--stop-after", 5)  # within the first epoch
    assert "stopped after iteration 5" in last_line(capsys)
    run_probe(*flags, "--out", tmp_path / "b")
    assert last_line(capsys) == whole and whole.startswith("top-1: ")
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["iteration"] == b["iteration"] == 13
    for key in a["model"]:  # the whole network, BatchNorm statistics included
        assert torch.equal(a["model"][key], b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    initial, _ = probe.load_backbone("random", "resnet18")  # what --init random started from
    for key in ("cnn.conv1.weight", "cnn.layer4.1.bn2.weight", "cnn.bn1.running_mean"):
        assert not torch.equal(initial.state_dict()[key], a["model"][f"visual.{key}"]), key
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert {"loss", "lr", "img_per_s", "top1", "top5"} <= set(log[0])


@pytest.mark.slow
def test_sigterm_saves_at_its_step_and_the_resumed_run_equals_the_uninterrupted(
        toy, tmp_path, capsys, monkeypatch):
    flags = [*TINY, "--imagenet", toy / "imagenet"]
    run_probe(*flags, "--out", tmp_path / "straight")
    whole = last_line(capsys)
    lr_factor = probe.lr_factor
    def preempt_at_third_step(step, total, finetune):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # delivered while iteration 3 runs
        return lr_factor(step, total, finetune)
    monkeypatch.setattr(probe, "lr_factor", preempt_at_third_step)
    run_probe(*flags, "--out", tmp_path / "preempted")
    assert "stopped by a signal after iteration 3" in last_line(capsys)
    assert virtex.load_checkpoint(tmp_path / "preempted" / "last.pt")["iteration"] == 3
    monkeypatch.setattr(probe, "lr_factor", lr_factor)
    run_probe(*flags, "--out", tmp_path / "preempted")
    assert last_line(capsys) == whole
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt")["model"]
            for d in ("straight", "preempted"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_top1_and_top5_count_the_best_and_the_five_best_classes(toy):
    class Ranked(torch.nn.Module):  # every image gets the same ranking: class 0 first, 19 last
        def forward(self, x):
            return torch.arange(20.0, 0, -1).expand(len(x), 20)
    model = Ranked()
    run = SimpleNamespace(processes=virtex.Processes(0, 1, torch.device("cpu")), model=model,
                          trained=model,
                          recipe=SimpleNamespace(batch_size=32, workers=0, amp="off"))
    val = probe.read_splits(toy / "imagenet").val  # 5 images of each of the 20 classes
    assert probe.evaluate(run, val, 32) == (5.0, 25.0)


def test_an_unreadable_val_image_stops_the_run_after_the_epoch_is_saved(toy, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(toy / "imagenet" / "train")
    val = shutil.copytree(toy / "imagenet" / "val", tmp_path / "data" / "val")
    bad = sorted(val.glob("*/*.jpg"))[-1]
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{bad}: unreadable image"):
        run_probe(*TINY, "--imagenet", tmp_path / "data", "--out", tmp_path / "out")
    # the epoch trained is kept
    assert virtex.load_checkpoint(tmp_path / "out" / "last.pt")["iteration"] == 13


def test_fine_tuning_lr_drops_tenfold_at_epochs_70_and_90_and_linear_decays_to_zero():
    steps = (0, 119_699, 119_700, 153_899, 153_900, 170_999)
    assert [probe.lr_factor(s, 171_000, True) for s in steps] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert [probe.lr_factor(s, 500_500, False) for s in (0, 250_250, 500_500)] == pytest.approx(
        [1, 0.5, 0])


@pytest.mark.slow
def test_a_last_pt_of_other_settings_or_another_backbone_is_refused(toy, tmp_path):
    flags = [*TINY, "--imagenet", toy / "imagenet", "--out", tmp_path]
    run_probe(*flags, "--stop-after", 1)
    with pytest.raises(ValueError, match=r"last.pt: made with other settings \(lr\)"):
        run_probe(*flags, "--lr", 0.1)
    with pytest.raises(ValueError, match=r"\(backbone\)"):
        run_probe(*flags, "--backbone", "resnet34")
    with pytest.raises(ValueError, match=r"\(finetune, weight_decay\)"):
        run_probe(*flags, "--finetune", "--lr", 0.3)


@pytest.mark.slow
def test_several_backbones_get_a_folder_each_and_a_table(toy, tmp_path, capsys):
    from dataclasses import asdict
    tiny = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    cfg = virtex.Config(backbone="resnet18", hidden=32, heads=2, vocab_size=64, image_size=32)
    virtex.save_checkpoint(tiny, {"model": virtex.VirTex(cfg).state_dict(), "config": asdict(cfg)})
    run_probe(*TINY, "--ckpt", tiny, "--imagenet", toy / "imagenet", "--out", tmp_path / "out")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(list((tmp_path / "out").glob("*/last.pt"))) == 2 and (tmp_path / "out" / "random").is_dir()
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0] == "| backbone | top-1 | top-5 |" and len(rows) == 3 and rows[2].startswith("| random | ")
    assert lines[-1].startswith(f"top-1: {tiny} ") and " | random " in lines[-1]
