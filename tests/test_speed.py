"""The speed features change how the maths runs, not its result."""
import pytest
import torch
import torch.nn.functional as F

import train
import virtex
from conftest import TINY, run_train


def batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.tensor([[virtex.SOS, 5, 6, 7, 8, virtex.EOS],
                           [virtex.SOS, 9, virtex.EOS, 0, 0, 0],
                           [virtex.SOS, 10, 11, 12, virtex.EOS, 0]])
    return images, tokens


def test_logits_only_at_targets_equal_the_full_computation(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    memory = model.textual.project(model.visual(images))
    # every position, as the official computes
    logits = model.textual.output(model.textual(memory, tokens))
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
    torch.testing.assert_close(model(images, tokens)["loss_forward"], full)


def test_channels_last_gives_the_same_loss(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    expected = model(images, tokens)["loss"]
    model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(images, tokens)["loss"], expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_loss_is_close_to_fp32(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    expected = model(images, tokens)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(images, tokens)["loss"]
    assert got.dtype == torch.float32 and abs(got.item() - expected.item()) < 0.02 * expected.item()


def test_train_step_runs_the_configured_speed_path(model, cfg):
    """One step with channels_last equals one without (CPU: no autocast, no scaler)."""
    from dataclasses import replace
    images, tokens = batch(cfg)
    lengths = virtex.lengths_of(tokens)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        m = virtex.VirTex(replace(cfg, channels_last=channels_last))
        c = m.cfg
        optimizer = virtex.build_optimizer(m, c)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        m = train.wrap_for_training(m, c, torch.device("cpu"), distributed=False).train()
        torch.manual_seed(1)
        stats = train.train_step(m, optimizer, scaler, images, tokens, lengths, 5, c)
        results.append((stats, [p.detach().clone() for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for p, q in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(p, q.contiguous(), rtol=1e-4, atol=1e-5)


def compiler_works():
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not compiler_works(), reason="torch.compile has no working C++ toolchain here")
def test_compiled_model_equals_eager(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    expected = model(images, tokens)["loss"]
    torch.testing.assert_close(torch.compile(model)(images, tokens)["loss"], expected, rtol=1e-4,
                               atol=1e-4)


def test_a_resume_that_flips_channels_last_keeps_optimizer_state_in_each_parameters_layout(
        toy, tmp_path):
    """Fused CUDA SGD requires parameters, gradients and momentum buffers to share strides."""
    run_train(tmp_path, "--toy-dir", toy, "--iterations", "4", "--stop-after", "2",
              "--no-channels-last")
    args = train.parse_args(["--toy-dir", str(toy), "--out", str(tmp_path), *TINY,
                             "--iterations", "4"])
    run, _, _ = train.prepare(args, 0, 1, torch.device("cpu"))
    params = run.optimizer.params
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params)  # now channels_last
    for p, slow in zip(params, run.optimizer.slow):
        moments = [v for v in run.optimizer.optimizer.state[p].values() if v.shape == p.shape]
        assert len(moments) == 2 and all(v.stride() == p.stride() for v in moments)  # AdamW's two
        assert slow.stride() == p.stride()


def test_a_resume_into_fp16_starts_a_fresh_loss_scale(model, tmp_path):
    """A bf16 or fp32 run saves a disabled GradScaler, whose state is empty."""
    optimizer, last = torch.optim.SGD(model.parameters(), 0.1), tmp_path / "last.pt"
    for saved, scale in ((torch.amp.GradScaler("cpu", enabled=False), 2.0 ** 16),
                         (torch.amp.GradScaler("cpu", init_scale=1024.0), 1024.0)):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 1}
        virtex.save_checkpoint(last, {**state, "config": {}, "scaler": saved.state_dict()})
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        virtex.resume(last, "train.py", {}, model, optimizer, scaler)
        assert scaler.get_scale() == scale


def test_compile_wraps_the_ddp_module(cfg, tmp_path):
    """Compiled after DDP (as PyTorch documents), so DDP's hooks overlap communication."""
    import torch.distributed as dist
    from dataclasses import replace
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = virtex.VirTex(replace(cfg, compile=True))
        wrapped = train.wrap_for_training(model, model.cfg, torch.device("cpu"), distributed=True)
        assert isinstance(wrapped._orig_mod, torch.nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()


# -- --decode device: the same samples, decoded and augmented on the device -------------------

def test_shift_hue_equals_torchvision_adjust_hue():
    import torchvision.transforms.functional as TF
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, :, :2] = 0.5  # grey pixels have no hue
    shifts = torch.tensor([0.0, 0.1, -0.1, 0.5])
    got = train.shift_hue(x, shifts.view(4, 1, 1, 1))
    for image, shift, result in zip(x, shifts.tolist(), got):
        torch.testing.assert_close(result, TF.adjust_hue(image, shift), atol=1e-5, rtol=0)


def scenes_with_captions(root, n=6, size=96):
    """A COCO train split of textured toy scenes whose captions say left or right."""
    import json
    import random
    rng = random.Random(0)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(1, n + 1):
        virtex.toy_scene(rng, size)[0].save(root / "train2017" / f"{i}.jpg", quality=95)
        images.append({"id": i, "file_name": f"{i}.jpg"})
        annotations.append({"id": i, "image_id": i, "caption": "a red circle left of a blue square"})
    captions = {"images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    return root


def test_both_decode_paths_draw_the_same_samples_and_agree_in_pixels(tmp_path, tokenizer, cfg):
    from dataclasses import replace
    cfg = replace(cfg, crop_scale=0.2)
    root = scenes_with_captions(tmp_path)
    items = virtex.read_captions(root, "train")
    loader_path = virtex.CaptioningDataset(items, tokenizer, cfg)
    device_path = train.EncodedCaptions(items, tokenizer, cfg)
    keys = [(i % 6, seed) for i, seed in enumerate(range(100, 124))]
    expected = virtex.collate([loader_path[k] for k in keys])
    images, tokens, lengths, _ = train.decode_on_device(virtex.collate([device_path[k] for k in keys]),
                                                        torch.device("cpu"), cfg.image_size)
    assert torch.equal(tokens, expected[1]) and torch.equal(lengths, expected[2])  # captions, swaps
    flipped = sum("right of" in tokenizer.decode(row.tolist()) for row in tokens)
    assert 0 < flipped < len(keys)  # both kinds of sample
    difference = (images.float() - expected[0].float()).abs()
    assert difference.mean() < 2.0 and difference.flatten(1).mean(1).max() < 4.0  # levels of 255


def test_a_jpeg_that_does_not_decode_on_the_device_is_replaced_and_named(tmp_path, tokenizer, cfg):
    root = scenes_with_captions(tmp_path, n=2)
    data = train.EncodedCaptions(virtex.read_captions(root, "train"), tokenizer, cfg)
    (pixels, numbers, path), tokens, skipped = data[(1, 0)]
    broken = (torch.cat([pixels[:200], torch.zeros(100, dtype=torch.uint8)]), numbers, "broken.jpg")
    batch = virtex.collate([data[(0, 0)], (broken, tokens, skipped)])
    images, _, _, unreadable = train.decode_on_device(batch, torch.device("cpu"), cfg.image_size)
    assert torch.equal(images[0], images[1]) and unreadable == ["broken.jpg: not a JPEG that decodes"]


@pytest.mark.slow
def test_resume_with_decoding_on_the_device_equals_an_uninterrupted_run(toy, tmp_path):
    flags = ["--toy-dir", toy, "--decode", "device", "--iterations", "4",
             "--checkpoint-every", "100"]
    run_train(tmp_path / "a", *flags)
    run_train(tmp_path / "b", *flags, "--stop-after", "2")
    run_train(tmp_path / "b", *flags)
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt")["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- --benchmark demo: where the demo's time goes ---------------------------------------------

@pytest.mark.slow
def test_benchmark_demo_counts_each_part_as_often_as_the_demo_runs_it(toy, capsys):
    import re
    train.cli(["--benchmark", "demo", "--toy-dir", str(toy), *TINY, "--iterations", "50",
               "--checkpoint-every", "10", "--eval-every", "20", "--cider-images", "4"])
    lines = capsys.readouterr().out.splitlines()
    row = re.compile(r"^(.*?) +([\d.]+) s +(\d+)(?: +([\d.]+) s)?$")
    rows = {m[1].strip(): (float(m[2]), int(m[3]), m[4] and float(m[4]))
            for m in map(row.match, lines) if m}
    assert rows["training step"][1] == 47 and rows["checkpoint"][1] == 5  # 3 steps start the loader
    evaluations = rows["val CIDEr (4 images, beam 5)"][1], rows["VOC07 SVMs"][1]
    assert evaluations == (3, 3)  # at 20, 40 and the end
    step_parts = ("data", "forward", "backward", "optimizer", "logging", "other")
    parts = [each for name, (each, _, _) in rows.items() if name in step_parts]
    assert len(parts) == 6 and sum(parts) == pytest.approx(rows["training step"][0], abs=0.004)
    total = float(re.search(r"^total +([\d.]+) s", lines[-2])[1])
    assert total == pytest.approx(sum(row[2] for row in rows.values() if row[2] is not None), abs=1.0)
