"""Bad input gets a clear answer, and no crash or signal loses a checkpoint."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import probe
import train
import virtex
from conftest import ROOT, TINY, run_train

FAST = ["--batch-size", "6", "--warmup", "1", "--log-every", "1"]


def run(data, out, *flags):
    run_train(out, "--data", data, *FAST, *flags)


@pytest.mark.slow
def test_corrupt_missing_and_cmyk_images_are_reported_and_replaced(coco, tmp_path, capsys):
    images = coco / "train2017"
    (images / "000000000002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (images / "000000000003.jpg").unlink()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(images / "000000000004.jpg")
    Image.new("I;16", (40, 30), 30000).save(images / "000000000005.png")
    captions = json.loads((coco / "annotations" / "captions_train2017.json").read_text())
    captions["images"][4]["file_name"] = "000000000005.png"
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    run(coco, tmp_path / "out", "--iterations", "4", "--checkpoint-every", "100")
    output = capsys.readouterr().out
    # each named (once per run)
    assert "000000000002.jpg" in output and "000000000003.jpg" in output
    # CMYK and 16-bit are fine
    assert "000000000004.jpg" not in output and "000000000005.png" not in output
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert sum(line.get("unreadable_images", 0) for line in log) >= 2
    assert virtex.load_checkpoint(tmp_path / "out" / "last.pt")["iteration"] == 4


@pytest.mark.slow
def test_an_unreadable_val_image_is_named_at_the_evaluation(coco, tmp_path, capsys):
    (coco / "val2017" / "000000000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run(coco, tmp_path / "out", "--iterations", "2", "--checkpoint-every", "2")
    assert "warning: " + str(coco / "val2017" / "000000000001.jpg") in capsys.readouterr().out


@pytest.mark.parametrize("views, key", [(lambda path: probe.Images([path], 32), 0),
                                        (lambda path: probe.TrainViews([(path, 0)], 32), (0, 7))])
def test_an_unreadable_probe_image_stops_with_one_line_naming_it(views, key, tmp_path):
    """Evaluation and classification images cannot be replaced (each counts): the run stops, and
    the error raised in a loader worker still reads as one line."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    loader = torch.utils.data.DataLoader(views(bad), sampler=[key], num_workers=1, collate_fn=list)
    line = None
    try:
        next(iter(loader))
    except ValueError as error:
        line = virtex.error_line(error)
        error.__traceback__ = None  # lets the loader go now: kept alive, its worker takes 5 s to end
    assert line == f"{bad}: unreadable image (cannot identify image file '{bad}')"


def test_empty_captions_are_dropped_and_captionless_images_skipped(coco, capsys):
    path = coco / "annotations" / "captions_train2017.json"
    captions = json.loads(path.read_text())
    for ann in captions["annotations"]:
        if ann["image_id"] == 1:
            ann["caption"] = "   "
        if ann["image_id"] == 2:
            ann["caption"] = None if ann["id"] % 2 else "  a red circle  "
    captions["annotations"].append({"id": 999, "image_id": 3,
                                    "caption": "Größer als ein großer Kreis, très long " * 20})
    path.write_text(json.dumps(captions))
    items = dict((p.name, c) for p, c in virtex.read_captions(coco, "train"))
    assert "000000000001.jpg" not in items and items["000000000002.jpg"] in (
        ["a red circle"], ["a red circle"] * 2)
    assert "1 images without a non-empty caption skipped" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere is not a folder"),
    (["--data", "{tmp}/empty"], "captions_train2017.json: missing"),
    (["--data", "{coco}", "--voc", "{tmp}/empty"], "ImageSets/Main: missing"),
    (["--data", "{coco}", "--batch-size", "0"], "batch size must be at least 1"),
    (["--data", "{coco}", "--image-size", "16"], "image size 16 is too small"),
    (["--data", "{coco}", "--backbone", "vgg16"], "must be a torchvision ResNet"),
    (["--data", "{coco}", "--vocab", "{tmp}/v.model", "--vocab-size", "100"],
     "has 64 tokens, not --vocab-size 100"),
    (["--data", "{coco}", "--vocab", "{tmp}/typo.model"], "--vocab {tmp}/typo.model: no such file"),
    (["--data", "{coco}", "--vocab", "{tmp}/notes.txt"],
     "{tmp}/notes.txt: not a SentencePiece model"),
    (["--data", "{tmp}/no_images"], "{tmp}/no_images/train2017: missing"),
])
def test_wrong_invocations_end_with_one_clear_line(flags, message, coco, tmp_path, tokenizer):
    import shutil
    (tmp_path / "empty").mkdir()
    (tmp_path / "v.model").write_bytes(tokenizer.model)
    (tmp_path / "notes.txt").write_text("not a vocabulary")
    shutil.copytree(coco / "annotations", tmp_path / "no_images" / "annotations")
    fill = lambda s: s.format(tmp=tmp_path, coco=coco)
    with pytest.raises(SystemExit, match=f"^error: .*{fill(message)}"):
        train.cli([*TINY, *FAST, "--out", str(tmp_path / "out"), *map(fill, flags)])


@pytest.mark.slow
def test_a_bad_invocation_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nowhere")],
                            cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr == f"error: --data {tmp_path / 'nowhere'} is not a folder\n"


def test_a_vocabulary_that_does_not_match_the_checkpoint_is_refused(tmp_path, model, cfg):
    from dataclasses import asdict
    virtex.save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": asdict(cfg)})
    virtex.Tokenizer.train([f"word{i} thing{i}" for i in range(300)], tmp_path / "other",
                           vocab_size=100)
    Image.new("RGB", (40, 40)).save(tmp_path / "x.jpg")
    with pytest.raises(SystemExit, match="carries no vocabulary"):
        virtex.main(["caption", "--ckpt", str(tmp_path / "m.pt"), str(tmp_path / "x.jpg")])
    with pytest.raises(SystemExit, match="has 100 tokens but .* predicts 64"):
        virtex.main(["caption", "--ckpt", str(tmp_path / "m.pt"),
                     "--vocab", str(tmp_path / "other.model"), str(tmp_path / "x.jpg")])


@pytest.mark.slow
def test_a_foreign_or_other_vocabulary_last_pt_refuses_to_resume(coco, tmp_path, tokenizer):
    run(coco, tmp_path / "a", "--iterations", "4", "--stop-after", "2")
    virtex.Tokenizer.train([f"word{i} thing{i}" for i in range(300)], tmp_path / "other",
                           vocab_size=64)
    with pytest.raises(SystemExit, match="other settings \\(vocabulary\\)"):
        run(coco, tmp_path / "a", "--iterations", "4", "--vocab", str(tmp_path / "other.model"))
    (tmp_path / "b").mkdir()
    virtex.save_checkpoint(tmp_path / "b" / "last.pt",
                           {"model": virtex.load_checkpoint(tmp_path / "a" / "last.pt")["model"]})
    with pytest.raises(SystemExit,
                       match="b/last.pt is not a train.py checkpoint \\(no optimizer, iteration, config, vocab\\)"):
        run(coco, tmp_path / "b", "--iterations", "4")


def make_both_last_pts(coco, toy, out):
    """A train.py and a probe.py last.pt (out/train, out/probe), each as its script saves it at
    iteration 1 of an fp32 run (a disabled loss scaler); (train.py's flags, probe.py's inputs)."""
    flags = ["--out", str(out / "train"), *TINY, "--data", str(coco), *FAST, "--amp", "off"]
    train.save(train.prepare(train.parse_args(flags), 0, 1, torch.device("cpu"))[0], 1)
    recipe = probe.Recipe(epochs=1, batch_size=32, workers=0, amp="off")
    visual, _ = probe.load_backbone("random", "resnet18")
    probing = (visual, probe.read_splits(toy / "imagenet"), 32)
    (out / "probe").mkdir()
    probe.save(probe.start_run(*probing, out / "probe", recipe, virtex.init_processes()), 1)
    return flags, probing, recipe


def test_either_script_resumes_an_fp32_run_with_fp16_loss_scaling(coco, toy, tmp_path, monkeypatch):
    """On a GPU --amp fp16 scales the loss; a resume into it starts a fresh scale (here a CPU scaler
    stands in for the GPU's)."""
    flags, probing, recipe = make_both_last_pts(coco, toy, tmp_path)
    gpu_like = lambda device, amp: torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    monkeypatch.setattr(virtex, "loss_scaler", gpu_like)
    args = train.parse_args([*flags, "--amp", "fp16"])
    pretraining, _, _ = train.prepare(args, 0, 1, torch.device("cpu"))
    recipe = dataclasses.replace(recipe, amp="fp16")
    linear = probe.start_run(*probing, tmp_path / "probe", recipe, virtex.init_processes())
    for run in (pretraining, linear):
        assert run.start == 1 and run.scaler.is_enabled() and run.scaler.get_scale() == 2.0 ** 16


def test_the_last_pt_of_one_script_is_refused_by_the_other(coco, toy, tmp_path):
    flags, probing, recipe = make_both_last_pts(coco, toy, tmp_path)
    with pytest.raises(SystemExit, match=r"probe/last.pt is not a train.py checkpoint \(no vocab\)"):
        train.cli([*flags, "--out", str(tmp_path / "probe")])
    with pytest.raises(ValueError, match=r"train/last.pt: made with other settings \(finetune, "):
        probe.start_run(*probing, tmp_path / "train", recipe, virtex.init_processes())
    with pytest.raises(ValueError, match="probe/last.pt: a probe.py checkpoint"):
        virtex.load_model(tmp_path / "probe" / "last.pt")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: not a PyTorch checkpoint that loads safely"):
        virtex.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_an_interrupted_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    virtex.save_checkpoint(tmp_path / "last.pt", {"iteration": 1, "w": torch.ones(3)})
    def killed(*_):
        raise KeyboardInterrupt  # as if killed between writing the temporary file and the rename
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        virtex.save_checkpoint(tmp_path / "last.pt", {"iteration": 2, "w": torch.zeros(3)})
    assert virtex.load_checkpoint(tmp_path / "last.pt")["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes_exactly(coco, tmp_path, monkeypatch):
    run(coco, tmp_path / "straight", "--iterations", "6", "--checkpoint-every", "100")
    set_lr = virtex.set_lr
    def preempt_at_third_step(optimizer, step, cfg):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # delivered while iteration 3 runs
        set_lr(optimizer, step, cfg)
    monkeypatch.setattr(virtex, "set_lr", preempt_at_third_step)
    run(coco, tmp_path / "preempted", "--iterations", "6", "--checkpoint-every", "100")
    assert virtex.load_checkpoint(tmp_path / "preempted" / "last.pt")["iteration"] == 3
    # saved, not evaluated
    assert "val_loss" not in (tmp_path / "preempted" / "log.jsonl").read_text()
    monkeypatch.setattr(virtex, "set_lr", set_lr)
    run(coco, tmp_path / "preempted", "--iterations", "6", "--checkpoint-every", "100")
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt")["model"]
            for d in ("straight", "preempted"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(coco, tmp_path,
                                                                                monkeypatch):
    forward, calls = virtex.VirTex.forward, []
    def nan_at_third_step(self, *args):
        output = forward(self, *args)
        calls.extend([1] if self.training else [])
        return {k: v * float("nan") for k, v in output.items()} if len(calls) == 3 else output
    monkeypatch.setattr(virtex.VirTex, "forward", nan_at_third_step)
    with pytest.raises(SystemExit, match="non-finite loss at iteration 3"):
        run(coco, tmp_path, "--iterations", "6", "--checkpoint-every", "2")
    checkpoint = virtex.load_checkpoint(tmp_path / "last.pt")
    weights = [v for v in checkpoint["model"].values() if v.is_floating_point()]
    assert checkpoint["iteration"] == 2 and all(v.isfinite().all() for v in weights)


@pytest.mark.slow
@pytest.mark.parametrize("column", ["grad_norm", "loss_backward"])
def test_one_non_finite_value_in_one_column_stops_the_run_at_its_step(coco, tmp_path, monkeypatch,
                                                                      column):
    """Checked once per log interval (here iterations 3-4), yet named at its own step."""
    calls = []
    if column == "grad_norm":
        clip = torch.nn.utils.clip_grad_norm_
        def inf_at_third_step(*args, **kwargs):
            calls.append(1)
            norm = clip(*args, **kwargs)
            return norm * float("inf") if len(calls) == 3 else norm
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_at_third_step)
    else:
        forward = virtex.VirTex.forward
        def nan_at_third_step(self, *args):
            output = forward(self, *args)
            calls.extend([1] if self.training else [])
            return {**output, column: output[column] * float("nan")} if len(calls) == 3 else output
        monkeypatch.setattr(virtex.VirTex, "forward", nan_at_third_step)
    with pytest.raises(SystemExit, match="non-finite loss at iteration 3"):
        run(coco, tmp_path, "--iterations", "6", "--checkpoint-every", "2", "--log-every", "4")
