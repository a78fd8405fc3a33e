"""CapPa's parallel prediction (--parallel) and zero-shot classification by captions (probe.py --zero-shot)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import virtex
from conftest import run_train

MAX_LENGTH = 12


def captions(*rows):
    """Right-padded [SOS] .. [EOS] batch from lists of word ids."""
    return nn.utils.rnn.pad_sequence([torch.tensor([virtex.SOS, *r, virtex.EOS]) for r in rows], batch_first=True)


def tiny(cfg, **changes):
    torch.manual_seed(0)
    return virtex.VirTex(dataclasses.replace(cfg, max_length=MAX_LENGTH, **changes))


def recorded(model, images, tokens, seed=0):
    """(decoder inputs, hidden states) of the forward head in one training step, read by hooks."""
    seen = {}

    def keep(name, value):  # the first call: the forward head's (the embedding is shared)
        seen.setdefault(name, value)
    hooks = [model.textual.embedding.register_forward_hook(lambda m, args, _: keep("inputs", args[0])),
             model.textual.transformer.register_forward_hook(lambda m, _, out: keep("hidden", out))]
    torch.manual_seed(seed)
    try:
        model(images, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["inputs"], seen["hidden"]


# -- parallel prediction -----------------------------------------------------------------------

@pytest.mark.parametrize("task", ["captioning", "bicaptioning"])
def test_parallel_0_trains_on_the_teacher_forced_loss_bit_for_bit_and_draws_nothing(task, cfg):
    model = tiny(cfg, task=task, parallel=0.0).train()  # dropout on: its random draws must not move
    images, tokens = torch.randn(3, 3, 64, 64), captions([5, 6, 7, 8], [9], [10, 11])
    torch.manual_seed(1)
    loss = model(images, tokens)["loss"]
    after = torch.get_rng_state()
    torch.manual_seed(1)  # by hand: each head's next-token cross-entropy over the real targets
    memory = model.textual.project(model.visual(images))
    heads = [(model.textual, tokens)]
    if task == "bicaptioning":
        heads.append((model.backward_textual, virtex.reverse_captions(tokens, virtex.lengths_of(tokens))))
    expected = 0
    for head, t in heads:
        keep = t[:, 1:] != virtex.PAD
        expected = expected + F.cross_entropy(head.output(head(memory, t[:, :-1])[keep]).float(), t[:, 1:][keep])
    assert torch.equal(loss, expected) and torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("task", ["captioning", "bicaptioning"])
def test_a_parallel_caption_is_predicted_from_the_image_alone(task, cfg):
    model = tiny(cfg, task=task, parallel=1.0, dropout=0.0).train()
    images = torch.randn(3, 3, 64, 64)
    inputs, hidden = recorded(model, images, captions([5, 6, 7, 8], [9], [10, 11]))
    assert inputs.shape == (3, MAX_LENGTH - 1) and (inputs == virtex.MASK).all()  # padding too
    _, other = recorded(model, images, captions([12, 13], [14, 15, 16, 17, 18, 19], [20]))  # new words, lengths
    assert torch.equal(hidden, other)
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)  # but it is a function of its image


def test_a_mixed_batch_keeps_its_teacher_forced_captions_causal(cfg):
    model = tiny(cfg, task="captioning", parallel=0.5, dropout=0.0).train()
    rows = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(8)]
    images, tokens = torch.randn(8, 3, 64, 64), captions(*rows)
    inputs, hidden = recorded(model, images, tokens, seed=3)
    parallel = (inputs == virtex.MASK).all(1)
    assert 0 < parallel.sum() < 8  # this seed draws both kinds
    padded = F.pad(tokens, (0, MAX_LENGTH - tokens.shape[1]))[:, :-1]
    assert torch.equal(inputs[~parallel], padded[~parallel])
    changed = tokens.clone()
    changed[:, 4] = 40  # the last word (position 4 of [SOS] w w w w [EOS])
    _, other = recorded(model, images, changed, seed=3)
    assert torch.equal(other[parallel], hidden[parallel])
    causal = (~parallel).nonzero().squeeze(1)
    assert torch.equal(other[causal, :4], hidden[causal, :4])  # earlier positions cannot see the change
    assert not torch.allclose(other[causal, 4], hidden[causal, 4], atol=1e-3)  # it is read where it stands
    memory = model.textual.project(model.visual(images))  # the whole batch: BatchNorm reads batch statistics
    plain = model.textual(memory[causal], tokens[causal, :-1])
    torch.testing.assert_close(hidden[causal, :5], plain)  # as plain captioning computes them


def test_parallel_rows_attend_both_ways_and_the_others_causally(cfg):
    head = tiny(cfg, task="captioning").eval().textual
    memory, parallel = torch.randn(2, 4, cfg.hidden), torch.tensor([True, False])
    a, b = captions([5, 6, 7], [5, 6, 7]), captions([5, 6, 9], [5, 6, 9])  # differ at position 3
    ha, hb = head(memory, a, parallel=parallel), head(memory, b, parallel=parallel)
    assert not torch.allclose(ha[0, :3], hb[0, :3], atol=1e-3)  # earlier positions see the later word
    assert torch.equal(ha[1, :3], hb[1, :3])


def test_evaluation_is_teacher_forced_whatever_parallel(cfg):
    images, tokens = torch.randn(2, 3, 64, 64), captions([5, 6, 7], [8])
    plain = tiny(cfg, parallel=0.0).eval()(images, tokens)["loss"]
    assert torch.equal(tiny(cfg, parallel=1.0).eval()(images, tokens)["loss"], plain)


@pytest.mark.parametrize("changes, message", [
    (dict(parallel=1.5), r"parallel is a probability, in \[0, 1\], not 1.5"),
    (dict(parallel=0.5, task="masked_lm"), "parallel prediction is for captioning and bicaptioning, not masked_lm")])
def test_parallel_outside_a_probability_or_a_captioning_task_is_refused(changes, message, cfg):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, **changes)


def test_a_parallel_run_resumes_exactly(coco, tmp_path):
    flags = ["--data", coco, "--parallel", "0.5", "--batch-size", "6", "--iterations", "4", "--checkpoint-every", "100"]
    run_train(tmp_path / "a", *flags)
    run_train(tmp_path / "b", *flags, "--stop-after", "2")
    run_train(tmp_path / "b", *flags)
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["config"]["parallel"] == 0.5 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
