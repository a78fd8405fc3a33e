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
    tokens = torch.tensor([[virtex.SOS, 5, 6, 7, 8, virtex.EOS], [virtex.SOS, 9, virtex.EOS, 0, 0, 0],
                           [virtex.SOS, 10, 11, 12, virtex.EOS, 0]])
    return images, tokens


def test_logits_only_at_targets_equal_the_full_computation(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    memory = model.textual.project(model.visual(images))
    logits = model.textual.output(model.textual(memory, tokens))  # every position, as the official computes
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
    torch.testing.assert_close(model(images, tokens)["loss_forward"], full)


def test_channels_last_gives_the_same_loss(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    expected = model(images, tokens)["loss"]
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(images.contiguous(memory_format=torch.channels_last), tokens)["loss"], expected,
                               rtol=1e-5, atol=1e-5)


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


@pytest.mark.skipif(not compiler_works(), reason="torch.compile has no working C++ toolchain here")
def test_compiled_model_equals_eager(model, cfg):
    model.eval()
    images, tokens = batch(cfg)
    expected = model(images, tokens)["loss"]
    torch.testing.assert_close(torch.compile(model)(images, tokens)["loss"], expected, rtol=1e-4, atol=1e-4)


def test_a_resume_that_flips_channels_last_keeps_optimizer_state_in_each_parameters_layout(toy, tmp_path):
    """Fused CUDA SGD requires parameters, gradients and momentum buffers to share strides."""
    run_train(tmp_path, "--toy-dir", toy, "--iterations", "4", "--stop-after", "2", "--no-channels-last")
    args = train.parse_args(["--toy-dir", str(toy), "--out", str(tmp_path), *TINY, "--iterations", "4"])
    run, _, _ = train.prepare(args, 0, 1, torch.device("cpu"))
    params = run.optimizer.params
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params)  # now channels_last
    for p, slow in zip(params, run.optimizer.slow):
        moments = [v for v in run.optimizer.optimizer.state[p].values() if v.shape == p.shape]
        assert len(moments) == 2 and all(v.stride() == p.stride() for v in moments)  # AdamW's two
        assert slow.stride() == p.stride()


def test_a_resume_into_fp16_starts_a_fresh_loss_scale():
    """A bf16 or fp32 run saves a disabled GradScaler, whose state is empty."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    train.load_scaler(scaler, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert scaler.get_scale() == 2.0 ** 16
    train.load_scaler(scaler, torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict())
    assert scaler.get_scale() == 1024.0


def test_compile_wraps_the_ddp_module(cfg, tmp_path):
    """Compiled after DDP (as PyTorch documents), so DDP's hooks overlap communication."""
    import torch.distributed as dist
    from dataclasses import replace
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = virtex.VirTex(replace(cfg, compile=True))
        wrapped = train.wrap_for_training(model, model.cfg, torch.device("cpu"), distributed=True)
        assert isinstance(wrapped._orig_mod, torch.nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()
