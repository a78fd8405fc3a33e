"""CapPa's parallel prediction (--parallel) and zero-shot classification by captions."""
import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probe
import train
import virtex
from conftest import run_probe, run_train, seeded_model, torchrun

MAX_LENGTH = 12


def captions(*rows):
    """Right-padded [SOS] .. [EOS] batch from lists of word ids."""
    rows = [torch.tensor([virtex.SOS, *r, virtex.EOS]) for r in rows]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True)


def tiny(cfg, **changes):
    return seeded_model(dataclasses.replace(cfg, max_length=MAX_LENGTH, **changes))


def recorded(model, images, tokens, seed=0):
    """(decoder inputs, hidden states) of the forward head in one training step, read by hooks."""
    seen = {}

    def keep(name, value):  # the first call: the forward head's (the embedding is shared)
        seen.setdefault(name, value)

    hooks = [model.textual.embedding.register_forward_hook(lambda m, a, _: keep("inputs", a[0])),
             model.textual.transformer.register_forward_hook(lambda m, _, h: keep("hidden", h))]
    torch.manual_seed(seed)
    try:
        model(images, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["inputs"], seen["hidden"]


# -- parallel prediction -----------------------------------------------------------------------

@pytest.mark.parametrize("task", ["captioning", "bicaptioning"])
def test_parallel_0_is_the_teacher_forced_loss_bit_for_bit_and_draws_nothing(task, cfg):
    model = tiny(cfg, task=task, parallel=0.0).train()  # dropout's draws must stay where they were
    images, tokens = torch.randn(3, 3, 64, 64), captions([5, 6, 7, 8], [9], [10, 11])
    torch.manual_seed(1)
    loss = model(images, tokens)["loss"]
    after = torch.get_rng_state()
    torch.manual_seed(1)  # by hand: each head's next-token cross-entropy over the real targets
    memory = model.textual.project(model.visual(images))
    heads = [(model.textual, tokens)]
    if task == "bicaptioning":
        backward = virtex.reverse_captions(tokens, virtex.lengths_of(tokens))
        heads.append((model.backward_textual, backward))
    expected = 0
    for head, t in heads:
        keep = t[:, 1:] != virtex.PAD
        logits = head.output(head(memory, t[:, :-1])[keep]).float()
        expected = expected + F.cross_entropy(logits, t[:, 1:][keep])
    assert torch.equal(loss, expected) and torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("task", ["captioning", "bicaptioning"])
def test_a_parallel_caption_is_predicted_from_the_image_alone(task, cfg):
    model = tiny(cfg, task=task, parallel=1.0, dropout=0.0).train()
    images = torch.randn(3, 3, 64, 64)
    inputs, hidden = recorded(model, images, captions([5, 6, 7, 8], [9], [10, 11]))
    assert inputs.shape == (3, MAX_LENGTH - 1) and (inputs == virtex.MASK).all()  # padding too
    _, other = recorded(model, images, captions([12, 13], [14, 15, 16, 17, 18, 19], [20]))
    assert torch.equal(hidden, other)  # other words, other lengths, other neighbours
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)  # but a function of its image


def test_a_mixed_batch_keeps_its_teacher_forced_captions_causal(cfg):
    model = tiny(cfg, task="captioning", parallel=0.5, dropout=0.0).train()
    images, tokens = torch.randn(8, 3, 64, 64), captions(*[[5 + i, 6, 7 + i, 8] for i in range(8)])
    inputs, hidden = recorded(model, images, tokens, seed=3)
    parallel = (inputs == virtex.MASK).all(1)
    assert 0 < parallel.sum() < 8  # this seed draws both kinds
    padded = F.pad(tokens, (0, MAX_LENGTH - tokens.shape[1]))[:, :-1]
    assert torch.equal(inputs[~parallel], padded[~parallel])
    changed = tokens.clone()
    changed[:, 4] = 40  # the last word, at position 4 of [SOS] w w w w [EOS]
    _, other = recorded(model, images, changed, seed=3)
    assert torch.equal(other[parallel], hidden[parallel])
    causal = (~parallel).nonzero().squeeze(1)
    assert torch.equal(other[causal, :4], hidden[causal, :4])  # earlier positions cannot see it
    assert not torch.allclose(other[causal, 4], hidden[causal, 4], atol=1e-3)  # read where it is
    memory = model.textual.project(model.visual(images))  # the whole batch: BatchNorm's statistics
    plain = model.textual(memory[causal], tokens[causal, :-1])
    torch.testing.assert_close(hidden[causal, :5], plain)  # as plain captioning computes them


def test_parallel_rows_attend_both_ways_and_the_others_causally(cfg):
    head = tiny(cfg, task="captioning").eval().textual
    memory, parallel = torch.randn(2, 4, cfg.hidden), torch.tensor([True, False])
    a, b = captions([5, 6, 7], [5, 6, 7]), captions([5, 6, 9], [5, 6, 9])  # differ at position 3
    ha, hb = head(memory, a, parallel=parallel), head(memory, b, parallel=parallel)
    assert not torch.allclose(ha[0, :3], hb[0, :3], atol=1e-3)  # earlier positions see it
    assert torch.equal(ha[1, :3], hb[1, :3])


def test_evaluation_is_teacher_forced_whatever_parallel(cfg):
    images, tokens = torch.randn(2, 3, 64, 64), captions([5, 6, 7], [8])
    plain = tiny(cfg, parallel=0.0).eval()(images, tokens)["loss"]
    assert torch.equal(tiny(cfg, parallel=1.0).eval()(images, tokens)["loss"], plain)


@pytest.mark.parametrize("changes, message", [
    (dict(parallel=1.5), r"parallel is a probability, in \[0, 1\], not 1.5"),
    (dict(parallel=0.5, task="masked_lm"), "is for captioning and bicaptioning, not masked_lm")])
def test_parallel_outside_a_probability_or_a_captioning_task_is_refused(changes, message, cfg):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, **changes)


@pytest.mark.slow
def test_a_parallel_run_resumes_exactly(coco, tmp_path):
    flags = ["--data", coco, "--parallel", "0.5", "--batch-size", "6", "--iterations", "4",
             "--checkpoint-every", "100"]
    run_train(tmp_path / "a", *flags)
    run_train(tmp_path / "b", *flags, "--stop-after", "2")
    run_train(tmp_path / "b", *flags)
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["config"]["parallel"] == 0.5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# -- zero-shot classification by captions ------------------------------------------------------

def test_a_class_caption_is_the_token_sequence_training_predicts(tokenizer, cfg):
    """Zero-shot scores the caption as the model learnt to emit it, ending ([EOS]) included."""
    classes = ["red_circle", "blue_square", "green_triangle"]
    captions = probe.class_captions(tokenizer, classes, "a picture of a {}", cfg.max_length)
    trained = virtex.CaptioningDataset([], tokenizer, cfg, train=False)
    for row, name in zip(captions, classes):
        expected = trained.tokens(f"a picture of a {probe.class_words(name)}")
        assert row[:len(expected)].tolist() == expected.tolist()
        assert (row[len(expected):] == virtex.PAD).all()


def test_class_names_read_as_words():
    names = ("red_circle", "diningtable", "pottedplant", "tvmonitor", "aeroplane")
    assert [probe.class_words(n) for n in names] == [
        "red circle", "dining table", "potted plant", "tv monitor", "aeroplane"]


def test_zero_shot_scores_are_log_likelihoods_summed_token_by_token(tokenizer, cfg):
    model = tiny(cfg, task="bicaptioning").eval()
    names = ["red_circle", "bright_yellow_square", "blue_triangle"]
    captions = probe.class_captions(tokenizer, names, "a {}", MAX_LENGTH)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores = probe.caption_log_likelihoods(model, images, captions, pairs=4)  # 2 classes a call
        memory = model.textual.project(model.visual(images))
        for b in range(2):
            for c, caption in enumerate(captions):
                tokens = caption[:int(virtex.lengths_of(caption[None]))]  # [SOS] a red circle [EOS]
                for k, (head, t) in enumerate([(model.textual, tokens),
                                               (model.backward_textual, tokens.flip(0))]):
                    steps = [head.output(head(memory[b:b + 1], t[None, :i])[0, -1]).log_softmax(-1)
                             for i in range(1, len(t))]  # log p(token i | image, the tokens before)
                    by_hand = sum(step[t[i]] for i, step in enumerate(steps, 1))
                    torch.testing.assert_close(scores[k][b, c], by_hand)
        alone = probe.caption_log_likelihoods(model, images[1:], captions)
    torch.testing.assert_close(alone, [s[1:] for s in scores])  # an image's scores are its own


def test_sum_and_mean_scorings_of_one_head_and_of_both():
    scores = torch.tensor([[[-4.0, -3.0]], [[-2.0, -6.0]]])  # (heads, images, classes)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])  # 3 and 2 tokens scored
    expected = {"forward, sum": [[-4, -3]], "forward, mean": [[-4 / 3, -3 / 2]],
                "forward + backward, sum": [[-6, -9]], "forward + backward, mean": [[-1, -9 / 4]]}
    expected = {k: torch.tensor(v).float() for k, v in expected.items()}
    torch.testing.assert_close(probe.scorings(scores, captions), expected)


@pytest.mark.parametrize("prompt, message", [("a picture", "must hold {} once"),
                                             ("a {}" + " a" * 40, "more than the 30")])
def test_a_prompt_without_one_place_for_the_name_or_too_long_is_refused(prompt, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        probe.class_captions(tokenizer, ["red_circle"], prompt, 30)


@pytest.fixture(scope="module")
def captioner(toy, tmp_path_factory):
    """A random bicaptioning checkpoint at 32 px with a vocabulary of the toy captions."""
    captions = [c for _, cs in virtex.read_captions(toy / "coco", "train") for c in cs]
    tokenizer = virtex.Tokenizer.train(captions, vocab_size=64)
    cfg = virtex.Config(backbone="resnet18", hidden=32, heads=2, vocab_size=64, image_size=32,
                        seed=3)
    torch.manual_seed(0)  # not the config's seed: these weights stand for trained ones
    path = tmp_path_factory.mktemp("captioner") / "last.pt"
    virtex.save_checkpoint(path, {"model": virtex.VirTex(cfg).state_dict(),
                                  "config": dataclasses.asdict(cfg), "vocab": tokenizer.model})
    return path


def zero_shot(*flags):
    run_probe("--zero-shot", "--workers", 0, *flags)


def scorings_of(path, paths, classes):
    """Every scoring's (N, C) scores of a checkpoint, computed here in one process."""
    model, tokenizer = virtex.load_model(path)
    captions = probe.class_captions(tokenizer, classes, probe.PROMPT, model.cfg.max_length)
    images = virtex.EvalSet(probe.Images(paths, 32), virtex.shard(list(range(len(paths)))), 0)
    scores = probe.zero_shot_scores(model, images, captions, torch.device("cpu"))
    return probe.scorings(scores, captions)


def test_zero_shot_on_an_image_folder_prints_every_scoring_and_both_heads_last(captioner, toy,
                                                                              capsys):
    zero_shot("--ckpt", captioner, "--imagenet", toy / "imagenet")
    lines = capsys.readouterr().out.strip().splitlines()
    items, classes = probe.read_image_folder(toy / "imagenet", "val")
    labels = torch.tensor([label for _, label in items])
    ways = scorings_of(captioner, [path for path, _ in items], classes)
    for way, scores in ways.items():
        assert f"| {way} | {'%.2f / %.2f' % probe.top1_top5(scores, labels)} |" in lines
    top1 = probe.top1_top5(ways["forward + backward, sum"], labels)[0]
    assert lines[-1] == f"zero-shot top-1: {top1:.2f}"


def test_zero_shot_on_voc07_grades_each_class_by_its_test_ap(captioner, toy, capsys):
    voc = toy / "voc" / "VOCdevkit" / "VOC2007"
    zero_shot("--ckpt", captioner, "--voc", voc)
    paths, labels, classes = probe.read_voc(voc, "test")
    scores = scorings_of(captioner, paths, classes)["forward + backward, sum"]
    expected = f"zero-shot mAP: {probe.voc07_aps(scores, labels).mean():.2f}"
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected


def test_init_random_scores_the_weights_training_started_from(captioner):
    args = probe.get_args_parser().parse_args(["--ckpt", str(captioner), "--init", "random"])
    (_, trained, _), (name, initial, _) = probe.captioners(args)
    start = train.new_model(trained.cfg, torch.device("cpu"))[0].state_dict()
    assert name.endswith("at init")
    assert all(torch.equal(v, start[k]) for k, v in initial.state_dict().items())
    assert not torch.equal(trained.state_dict()["visual.cnn.conv1.weight"],
                           start["visual.cnn.conv1.weight"])


def test_wordnet_id_folders_and_models_that_do_not_caption_are_refused(captioner, toy, tmp_path):
    for split in ("train", "val"):
        folder = tmp_path / "imagenet" / split / "n01440764"
        folder.mkdir(parents=True)
        shutil.copy(next((toy / "imagenet" / "val" / "red_circle").iterdir()), folder)
    with pytest.raises(ValueError, match="WordNet ids .* give --class-names FILE"):
        zero_shot("--ckpt", captioner, "--imagenet", tmp_path / "imagenet")
    checkpoint = virtex.load_checkpoint(captioner)
    cfg = virtex.Config.from_dict({**checkpoint["config"], "task": "token_classification"})
    virtex.save_checkpoint(tmp_path / "labels.pt", {**checkpoint, "config": dataclasses.asdict(cfg),
                                                    "model": virtex.VirTex(cfg).state_dict()})
    with pytest.raises(ValueError, match="for token_classification, which does not caption"):
        zero_shot("--ckpt", tmp_path / "labels.pt", "--voc", toy / "voc" / "VOCdevkit" / "VOC2007")


@pytest.mark.slow
def test_torchrun_zero_shot_prints_what_one_process_prints(captioner, toy, capsys):
    zero_shot("--ckpt", captioner, "--imagenet", toy / "imagenet")
    alone = capsys.readouterr().out.strip().splitlines()
    result = torchrun("probe.py", "--zero-shot", "--ckpt", captioner, "--imagenet",
                      toy / "imagenet", "--workers", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-7:] == alone[-7:]
