"""Properties a paper-scale run depends on, each stated as a sentence and checked directly on tiny
data or a tiny model: what the model says about an image, what masked LM corrupts, what each epoch
reads, which caption goes with which image, the resolution images are decoded at, the learning
rates each recipe runs, what frozen keeps, when a cache is reused, what a checkpoint or an export
holds, and what loss scaling changes. (The multi-process ones: test_properties_runs.py.)"""
import copy
import io
import itertools
import json
import math
import shutil
import tarfile
from dataclasses import asdict

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import probe
import train
import virtex
from conftest import CAPTIONS, run_probe, run_train, seeded_model

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------------------------
# Seams: the internal entry points these tests call, one line each, so that a reorganisation of
# the scripts re-points them here. The rest goes through the command lines, VirTex and the files.

def training_batches(flags, count, rank=0, world=1):
    """The first `count` batches the loop of `train.py FLAGS` trains on as `rank` of `world`
    processes: (network input, tokens, lengths, unreadable images met), on the CPU."""
    args = train.parse_args([str(flag) for flag in flags])
    source = train.read_source("--data", args.data, "train", stream=True)  # the train split alone
    cfg, data, _ = train.datasets(args, virtex.Tokenizer(args.vocab), source, None, rank, world)
    processes = virtex.Processes(rank, world, CPU)
    loader = itertools.islice(virtex.resumable_loader(data, cfg, 0, count, processes, virtex.collate),
                              count)
    return [train.on_device(batch[:4], CPU, args.decode, cfg.image_size) for batch in loader]


def probe_features(visual, images, batch_size):
    """The probe's features of uint8 images, extracted in batches of `batch_size` (fp32)."""
    batches = virtex.shard(list(range(len(images))), batch_size=batch_size)
    return probe.extract(visual, virtex.EvalSet(list(images), batches, workers=0), CPU, amp="off")


def classification_view(path, size, seed):
    """The classification probe's training view of an image file (uint8), drawn from `seed`."""
    return probe.TrainViews([(path, 0)], size)[(0, seed)][0]


def voc07_features(visual, size, root, cache=None):
    """probe.py's VOC07 features {split: (x, labels)}, kept in the file `cache` (--features)."""
    voc = probe.VOC07(root, size, workers=0)
    return voc.cached_features(visual, CPU, cache) if cache else voc.features(visual, CPU)


def export_detectron2(model):
    """The state dict `virtex.py export --format detectron2` writes for a model."""
    return virtex.export_backbone(model, "detectron2")["model"]


# ----------------------------------------------------------------------------------------------
# Tiny data: solid-colour images whose one caption names their colour first, as a COCO folder or
# as img2dataset's tar shards. A colour survives every augmentation (a crop or a flip of a solid
# image is that image; ColorJitter's hue shift of at most 0.1 turn keeps its strongest channel).

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
TINY_MODEL = dict(backbone="resnet18", hidden=32, heads=2, vocab_size=64, image_size=32)


def named(colour, i):
    """The i-th caption that names `colour` first; none says left or right, which a flip swaps."""
    return [c for c in CAPTIONS if "above" in c and c.split()[2] == colour][i]


def image_bytes(picture, suffix="jpg"):
    """An image file's bytes: a colour's 48x40 solid image, a PIL image, or bytes as they are."""
    if isinstance(picture, bytes):
        return picture
    image = Image.new("RGB", (48, 40), COLOURS[picture]) if isinstance(picture, str) else picture
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if suffix == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def write_captioned(root, samples, suffix="jpg"):
    """A COCO train split of [(picture, caption)]: image i is samples[i], with its one caption."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i, (picture, caption) in enumerate(samples, 1):
        (root / "train2017" / f"{i:012d}.{suffix}").write_bytes(image_bytes(picture, suffix))
        images.append({"id": i, "file_name": f"{i:012d}.{suffix}"})
        annotations.append({"id": i, "image_id": i, "caption": caption})
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def write_shards(root, samples, per_shard, suffix="jpg"):
    """The same samples as tar shards of `per_shard` (KEY.jpg + KEY.txt); a None picture or
    caption leaves that member out."""
    root.mkdir(parents=True)
    for first in range(0, len(samples), per_shard):
        with tarfile.open(root / f"{first // per_shard:05d}.tar", "w") as tar:
            for i, (picture, caption) in enumerate(samples[first:first + per_shard], first):
                members = {suffix: None if picture is None else image_bytes(picture, suffix),
                           "txt": None if caption is None else caption.encode()}
                for kind, data in members.items():
                    if data is not None:
                        info = tarfile.TarInfo(f"{i:06d}.{kind}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root


def write_image_folder(root, train_images=4):
    """An ImageFolder (train/, val/) of red and green images, `train_images` of each in train."""
    for split, n in (("train", train_images), ("val", 1)):
        for colour in ("red", "green"):
            (root / split / colour).mkdir(parents=True)
            for i in range(n):
                (root / split / colour / f"{i}.jpg").write_bytes(image_bytes(colour))
    return root


def write_checkpoint(path, cfg, seed=0):
    virtex.save_checkpoint(path, {"model": seeded_model(cfg, seed).state_dict(), "config": asdict(cfg)})
    return path


@pytest.fixture
def vocab(tokenizer, tmp_path):
    (tmp_path / "vocab.model").write_bytes(tokenizer.model)
    return tmp_path / "vocab.model"


@pytest.fixture
def shards(tmp_path):
    """8 red samples in 4 tar shards: pretraining without an evaluation (no val split)."""
    return write_shards(tmp_path / "shards", [("red", named("red", i)) for i in range(8)], 2)


def levels(x):
    """Network input (B, 3, S, S) back to pixel levels 0..255."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (virtex.MEAN, virtex.STD))
    return (x * std + mean) * 255


def colour_of(image):
    return list(COLOURS)[int(levels(image).mean((-2, -1)).argmax())]


def caption_of(tokens, length, tokenizer):
    return tokenizer.decode([t for t in tokens[:length].tolist() if t > virtex.MASK])


# ----------------------------------------------------------------------------------------------
# Batch invariance

def captioner(cfg):
    """A tiny model whose captions differ from image to image (an initial one says the same of
    all): its head's matrices drawn at scale 1, [EOS] made likely enough to end some early."""
    model = seeded_model(cfg).eval()
    with torch.no_grad():
        for p in model.textual.parameters():
            if p.dim() == 2:
                p.normal_()
        model.textual.output.bias[virtex.EOS] += 6
    return model


def test_what_the_model_says_of_an_image_does_not_depend_on_the_rest_of_its_batch(cfg):
    """An image's captions (greedy and beam search, any beam size), where the model looked for
    each of their words, and its probe feature are the same for the image alone as in a batch of
    other images."""
    model = captioner(cfg)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 4 - 2
    for beam in (1, 3):
        together = model.caption(images, beam=beam, max_steps=8)
        assert len(set(map(tuple, together))) >= 3 and [] in together  # different; some end at once
        alone = [model.caption(image[None], beam=beam, max_steps=8)[0] for image in images]
        assert alone == together, beam
    maps = virtex.cross_attention(model, images, together)  # (B, T, h, w)
    for image, caption, in_batch in zip(images, together, maps):
        alone = virtex.cross_attention(model, image[None], [caption])[0]
        torch.testing.assert_close(alone, in_batch[:len(alone)])
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    alone = torch.cat([probe_features(model.visual, [image], 1) for image in pixels])
    torch.testing.assert_close(probe_features(model.visual, pixels, 4), alone, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Masking only what may be masked

def test_masked_lm_corrupts_and_supervises_only_the_words_of_each_caption():
    """In a batch of captions of every length (no word, one, many; one cut without [EOS]), masked
    LM changes and supervises word tokens only, never [SOS], [EOS] or padding; what it supervises
    is the word that was there, and each word of a caption that ends is chosen in some draw."""
    T, draws = 12, 300
    rows = [[virtex.SOS, *range(4, 4 + n), virtex.EOS] for n in range(T - 1)]  # 0..10 words
    rows.append([virtex.SOS, *range(4, 4 + T - 1)])  # cut at T tokens: no [EOS]
    tokens = nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    torch.manual_seed(0)
    batch = tokens.repeat(draws, 1)
    inputs, labels = virtex.mask_tokens(batch, lengths.repeat(draws), 64)
    word, supervised = batch > virtex.MASK, labels != virtex.PAD
    assert not ((inputs != batch) & ~word).any() and not (supervised & ~word).any()
    assert torch.equal(labels[supervised], batch[supervised])
    assert (inputs[supervised] == virtex.MASK).all()
    chosen = supervised.view(draws, len(rows), T).any(0)  # (rows, T)
    assert torch.equal(chosen[:-1], tokens[:-1] > virtex.MASK)


# ----------------------------------------------------------------------------------------------
# Every epoch, every sample, a new order

def test_every_loader_trains_on_each_sample_once_an_epoch_in_a_new_order(tmp_path, tokenizer,
                                                                          vocab):
    """From a COCO folder or tar shards, with or without loader workers, in one process or two,
    each epoch trains on every sample exactly once (no rank or worker reads one twice), in another
    order than the epoch before, and draws the samples' augmentations anew."""
    samples = [(colour, named(colour, i)) for i in range(4) for colour in ("red", "green")]
    sources = [write_captioned(tmp_path / "coco", samples),
               write_shards(tmp_path / "tars", samples, 2)]
    # 8 samples, 4 a step: an epoch is 2 steps. (With shards, each of the 1 or 4 readers then reads
    # 4 or 1 shards an epoch: a whole number of its batches, so that epochs do not overlap.)
    for data, (workers, world) in itertools.product(sources, [(0, 1), (2, 2)]):
        flags = ["--data", data, "--vocab", vocab, "--batch-size", 4, "--workers", workers,
                 "--image-size", 32]
        ranks = [training_batches(flags, 4, rank, world) for rank in range(world)]
        batches = [batch for step in zip(*ranks) for batch in step]  # in the order of the samples
        seen = [caption_of(t, n, tokenizer) for _, tokens, lengths, _ in batches
                for t, n in zip(tokens, lengths)]
        where = f"{data.name}, {workers} workers, {world} processes"
        assert sorted(seen[:8]) == sorted(seen[8:]) == sorted(c for _, c in samples), where
        assert seen[:8] != seen[8:], where
        images = [image for batch in batches for image in batch[0]]
        first, second = (dict(zip(seen[e:e + 8], images[e:e + 8])) for e in (0, 8))
        # Solid images: only the colour jitter shows, and an image may draw none twice; not all do.
        assert any(not torch.equal(first[c], second[c]) for c in first), where


# ----------------------------------------------------------------------------------------------
# An image keeps its caption on every path

def test_every_path_trains_each_image_with_its_own_caption(tmp_path, tokenizer, vocab):
    """Wherever an image is replaced or left out (a file that is no image, a JPEG that does not
    decode, a shard member without its partner) and wherever it is decoded (--decode loader or
    device), the caption trained on names the colour of the image trained on."""
    blue = image_bytes("blue")
    header = blue[:blue.index(b"\xff\xda") + 14]  # a JPEG without pixels: it opens, never decodes
    good = [(colour, named(colour, i)) for i in range(3) for colour in ("red", "green")]
    bad = [(b"no image", named("blue", 0)), (header, named("blue", 1))]  # no blue image decodes
    samples = good[:3] + bad[:1] + good[3:] + bad[1:]
    unpaired = [("blue", None), (None, named("blue", 2))]  # an image without caption, and reverse
    sources = [write_captioned(tmp_path / "coco", samples),
               write_shards(tmp_path / "tars", samples + unpaired, 3)]
    for data, decode in itertools.product(sources, ["loader", "device"]):
        flags = ["--data", data, "--vocab", vocab, "--decode", decode, "--batch-size", 4,
                 "--workers", 0, "--image-size", 32]
        batches = training_batches(flags, 6)  # 3 epochs
        pairs = [(colour_of(image), caption_of(t, n, tokenizer).split()[2])
                 for images, tokens, lengths, _ in batches
                 for image, t, n in zip(images, tokens, lengths)]
        assert all(a == b for a, b in pairs), (data.name, decode, pairs)
        assert sum(len(unreadable) for *_, unreadable in batches) >= 3, (data.name, decode)


# ----------------------------------------------------------------------------------------------
# Decode at full resolution

def test_every_training_path_crops_the_image_decoded_at_its_full_size(tmp_path, vocab):
    """Training views (the caption loader, --decode device, tar shards, the classification probe)
    are cut from the image decoded at its full size: a JPEG's views are those of the same pixels
    stored losslessly (PNG), which no decoder reduces (a JPEG decoded at 1/8 gives other views)."""
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(noise.numpy()).resize((256, 256), Image.BILINEAR)  # detail of ~8 px
    views = {}
    for suffix in ("jpg", "png"):
        coco = write_captioned(tmp_path / suffix / "coco", [(image, named("red", 0))], suffix)
        tars = write_shards(tmp_path / suffix / "tars", [(image, named("red", 0))], 1, suffix)
        for data, decode in itertools.product([coco, tars], ["loader", "device"]):
            flags = ["--data", data, "--vocab", vocab, "--decode", decode, "--batch-size", 4,
                     "--workers", 0, "--image-size", 32]
            views[data.name, decode, suffix] = levels(training_batches(flags, 1)[0][0])  # 4 views
        path = next((coco / "train2017").iterdir())
        views["probe", "", suffix] = torch.stack([classification_view(path, 32, seed).float()
                                                  for seed in range(4)])
    for (*where, suffix), view in views.items():
        if suffix == "jpg":
            difference = (view - views[(*where, "png")]).abs().mean().item()
            assert difference < 3, (where, difference)  # levels of 255


# ----------------------------------------------------------------------------------------------
# The recipe that runs is the recipe that is written

def optimizer_steps(run):
    """run(), and for each optimizer step it took the (lr, momentum, weight decay) of every
    parameter group, sorted and flattened, read from the optimizer as it steps."""
    seen = []
    groups = lambda opt: sorted((g["lr"], g["momentum"], g["weight_decay"])
                                for g in opt.param_groups)
    handle = register_optimizer_step_pre_hook(lambda opt, *_: seen.append(sum(groups(opt), ())))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.slow
def test_every_recipe_steps_at_its_published_learning_rates(tmp_path, vocab, shards):
    """Each optimizer step runs at the LR, momentum and weight decay of its recipe as published:
    pretraining (SGD 0.9, warmup from 0 then cosine to 0, the CNN's LR and the heads', decay off
    for the heads' norms and biases), the linear evaluation (0.3, cosine to 0, no decay) and
    fine-tuning (0.025, x0.1 at 70% and 90% of the steps, decay 1e-4). Step s follows s steps."""
    pretraining = optimizer_steps(lambda: run_train(
        tmp_path / "pretrain", "--data", shards, "--vocab", vocab, "--batch-size", 4,
        "--iterations", 4, "--warmup", 2, "--lr", 0.01, "--cnn-lr", 0.1, "--checkpoint-every", 100))
    cosine = lambda s, total: (1 + math.cos(math.pi * s / total)) / 2
    factors = [s / 2 if s < 2 else cosine(s - 2, 2) for s in range(4)]
    groups = ((0.01, 0.0), (0.01, 1e-4), (0.1, 1e-4))  # heads' norms and biases, heads, CNN
    expected = lambda f: sum(((lr * f, 0.9, decay) for lr, decay in groups), ())
    assert pretraining == [pytest.approx(expected(f)) for f in factors]
    images = write_image_folder(tmp_path / "images", 10)  # 20 images, batch 2: an epoch of 10 steps
    flags = ["--init", "random", "--backbone", "resnet18", "--image-size", 32, "--imagenet", images,
             "--epochs", 1, "--batch-size", 2, "--workers", 0]
    linear = optimizer_steps(lambda: run_probe(*flags, "--out", tmp_path / "linear"))
    assert linear == [pytest.approx((0.3 * cosine(s, 10), 0.9, 0.0)) for s in range(10)]
    finetune = optimizer_steps(lambda: run_probe(*flags, "--finetune", "--out", tmp_path / "ft"))
    step_decay = lambda s: 0.1 ** ((s >= 7) + (s >= 9))
    assert finetune == [pytest.approx((0.025 * step_decay(s), 0.9, 1e-4)) for s in range(10)]


# ----------------------------------------------------------------------------------------------
# Frozen means frozen

def test_a_linear_evaluation_leaves_the_backbone_as_loaded(tmp_path, monkeypatch):
    """Several epochs of linear evaluation, with an evaluation after each, leave the frozen
    backbone's weights and BatchNorm statistics exactly as they were loaded."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", virtex.Config(**TINY_MODEL))
    loaded, load_model = [], virtex.load_model
    monkeypatch.setattr(virtex, "load_model", lambda *a: loaded.append(load_model(*a)) or loaded[-1])
    run_probe("--ckpt", checkpoint, "--imagenet", write_image_folder(tmp_path / "images"),
              "--epochs", 3, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "linear")
    (model, _), = loaded
    saved = virtex.load_checkpoint(checkpoint)["model"]
    for key, value in model.visual.state_dict().items():
        assert torch.equal(value, saved[f"visual.{key}"]), key


# ----------------------------------------------------------------------------------------------
# A cache is reused only for the same inputs

def test_a_feature_cache_is_reused_only_for_the_inputs_that_made_it(tmp_path, toy):
    """VOC07 features kept in a --features file are reused only for the weights, image size and
    VOC folder that made them: each changed alone (other weights, other BatchNorm statistics, the
    same numbers in other places, another size, another folder) gives fresh features or a refusal
    naming the file, never the stored ones."""
    voc, path = toy / "voc" / "VOCdevkit" / "VOC2007", tmp_path / "features.pt"
    other_voc = shutil.copytree(voc, tmp_path / "VOC2007")
    labels = other_voc / "ImageSets" / "Main" / "red_circle_test.txt"  # other positives
    labels.write_text(labels.read_text().replace(" 1\n", "-1\n").replace("-1\n", " 1\n", 3))
    visual = virtex.VirTex(virtex.Config(**TINY_MODEL)).visual
    voc07_features(visual, 32, voc, path)
    variants = {"other weights": virtex.VirTex(virtex.Config(**TINY_MODEL)).visual}
    swapped = lambda v: v.cnn.conv1.weight.copy_(v.cnn.conv1.weight[[1, 0, *range(2, 64)]])
    for what, edit in [("other BatchNorm statistics", lambda v: v.cnn.bn1.running_var.mul_(2)),
                       ("the same numbers in other places", swapped)]:
        variants[what] = copy.deepcopy(visual)
        with torch.no_grad():
            edit(variants[what])
    inputs = [(what, v, 32, voc) for what, v in variants.items()]
    inputs += [("another image size", visual, 64, voc),
               ("another VOC folder", visual, 32, other_voc)]
    for what, *key in inputs:
        try:
            got = voc07_features(*key, path)
        except ValueError as e:
            assert str(path) in str(e), what
            continue
        expected = voc07_features(*key)
        for split in ("trainval", "test"):
            assert torch.equal(got[split][0], expected[split][0]), what
            assert torch.equal(got[split][1], expected[split][1]), what


# ----------------------------------------------------------------------------------------------
# What is loaded is all that was saved; what is exported is what its consumer loads

def refusal(load):
    """The message `load()` stops with (SystemExit from a command line, or ValueError), one line."""
    with pytest.raises((SystemExit, ValueError)) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def hollow(value):
    """`value` with each floating-point tensor replaced by zeros of its shape that take no room
    (one number, expanded): a checkpoint that a reader refuses need not weigh megabytes."""
    if torch.is_tensor(value) and value.is_floating_point():
        return torch.zeros((), dtype=value.dtype).expand(value.shape)
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        hollowed = {k: hollow(v) for k, v in items}
        return hollowed if isinstance(value, dict) else type(value)(hollowed.values())
    return value


def edits(state, *missing):
    """{what: a copy of the state dict without one of the `missing` keys, or with a weight more}."""
    edited = {f"no {key}": {k: v for k, v in state.items() if k != key} for key in missing}
    return {**edited, "one weight too many": {**state, "textual.extra.weight": torch.zeros(2)}}


@pytest.mark.slow
def test_a_checkpoint_is_loaded_whole_or_refused_with_one_line_naming_it(tmp_path, tokenizer, vocab,
                                                                         shards):
    """Every reader of weights (our checkpoints and the official code's, a torchvision state dict
    for `probe.py --init`, the last.pt a pretraining or a classification run resumes from) refuses
    a file with a weight missing or one too many with one line naming it, instead of loading the
    rest and leaving the missing ones as initialised."""
    cfg = virtex.Config(**{**TINY_MODEL, "vocab_size": len(tokenizer)})
    state = hollow(virtex.VirTex(cfg).state_dict())
    ours = lambda edited: {"model": edited, "config": asdict(cfg), "vocab": tokenizer.model}
    export = lambda path: virtex.main(["export", "--ckpt", str(path), str(tmp_path / "out.pth")])
    readers = [(f"ours, {what}", ours(edited), export)
               for what, edited in edits(state, "visual.cnn.layer1.0.conv1.weight").items()]
    official = edits(state, "visual.cnn.layer1.0.conv1.weight",
                     "textual.transformer.layers.0.linear1.weight")
    probe_ckpt = lambda path: run_probe("--ckpt", path, "--voc", tmp_path)
    readers += [(f"official, {what}", edited, probe_ckpt)
                for what, edited in official.items() if what.startswith("no ")]  # one more: as ours
    cnn = {k[len("visual.cnn."):]: v for k, v in state.items() if k.startswith("visual.cnn.")}
    no_bias = {k: v for k, v in cnn.items() if k != "layer1.0.bn1.bias"}  # one more: as ours
    readers.append(("torchvision, no layer1.0.bn1.bias", no_bias,
                    lambda path: run_probe("--init", f"torchvision:{path}")))
    pretraining = ["--data", shards, "--vocab", vocab, "--batch-size", 4, "--iterations", 2,
                   "--checkpoint-every", 100]
    run_train(tmp_path / "pretrain", *pretraining, "--stop-after", 1)
    last = hollow(virtex.load_checkpoint(tmp_path / "pretrain" / "last.pt"))
    readers += [(f"pretraining last.pt, {what}", {**last, "model": edited},
                 lambda path: run_train(path.parent, *pretraining))
                for what, edited in edits(last["model"], "textual.output.bias").items()]
    classification = ["--init", "random", "--backbone", "resnet18", "--image-size", 32,
                      "--imagenet", write_image_folder(tmp_path / "images", 2), "--epochs", 2,
                      "--batch-size", 4, "--workers", 0]
    run_probe(*classification, "--stop-after", 1, "--out", tmp_path / "linear")
    last = virtex.load_checkpoint(tmp_path / "linear" / "last.pt")
    readers += [(f"linear evaluation last.pt, {what}", {**last, "model": edited},
                 lambda path: run_probe(*classification, "--out", path.parent))
                for what, edited in edits(last["model"], "bias").items()]
    for n, (what, content, load) in enumerate(readers):
        path = tmp_path / f"file{n}" / "last.pt"
        path.parent.mkdir()
        torch.save(content, path)
        assert str(path) in refusal(lambda: load(path)), what


def detectron2_keys(depth):
    """The backbone keys of detectron2's ResNet of `depth`, as its modules name them: the stem's
    conv1 and the blocks of res2..res5, each conv with its .norm, a shortcut where the shape
    changes (BatchNorm buffers but num_batches_tracked, which FrozenBatchNorm2d has not)."""
    blocks, convs = {18: ([2, 2, 2, 2], 2), 50: ([3, 4, 6, 3], 3)}[depth]
    norm = ("weight", "bias", "running_mean", "running_var")
    conv = lambda name: [f"{name}.weight", *(f"{name}.norm.{k}" for k in norm)]
    keys = conv("stem.conv1")
    for stage, count in enumerate(blocks, 2):
        for block in range(count):
            keys += sum((conv(f"res{stage}.{block}.conv{c}") for c in range(1, convs + 1)), [])
            if block == 0 and (stage > 2 or convs == 3):  # R-18's res2 keeps 64 channels
                keys += conv(f"res{stage}.0.shortcut")
    return keys


def test_each_export_loads_whole_into_its_consumer(tmp_path, tokenizer):
    """`virtex.py export` writes what its consumer loads with every weight matched: for torchvision,
    a state dict its ResNet loads strictly (fc replaced by an identity) and then computes the
    backbone's features with; for detectron2, a file torch.load reads as {"model", "__author__",
    "matching_heuristics"} whose names are exactly its ResNet's (R-18's and the paper's R-50)."""
    cfg = virtex.Config(**{**TINY_MODEL, "vocab_size": len(tokenizer), "image_size": 64})
    model = seeded_model(cfg).eval()
    checkpoint = {"model": model.state_dict(), "config": asdict(cfg), "vocab": tokenizer.model}
    virtex.save_checkpoint(tmp_path / "m.pt", checkpoint)
    for format in ("torchvision", "detectron2"):
        virtex.main(["export", "--ckpt", str(tmp_path / "m.pt"), "--format", format,
                     str(tmp_path / f"{format}.pth")])
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(torch.load(tmp_path / "torchvision.pth", weights_only=True))  # strict
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(resnet.eval()(images), virtex.pooled(model.visual(images)))
    exported = torch.load(tmp_path / "detectron2.pth", weights_only=True)
    assert exported.keys() == {"model", "__author__", "matching_heuristics"}
    assert exported["matching_heuristics"] is True
    shapes = lambda state: sorted(v.shape for v in state.values())
    assert shapes(exported["model"]) == shapes(resnet.state_dict())
    r50 = virtex.VirTex(virtex.Config(**{**TINY_MODEL, "backbone": "resnet50"}))
    for depth, state in ((18, exported["model"]), (50, export_detectron2(r50))):
        names = {k for k in state if not k.endswith(".num_batches_tracked")}
        assert names == set(detectron2_keys(depth)), depth


# ----------------------------------------------------------------------------------------------
# Loss scaling changes nothing but the scale

@pytest.mark.slow
def test_fp16_loss_scaling_applies_the_gradients_of_an_unscaled_step(tmp_path, vocab, shards,
                                                                     monkeypatch):
    """With fp16 loss scaling on (the GPU path of --amp fp16, its GradScaler enabled on the CPU,
    where autocast keeps fp32), pretraining clips and applies the very gradients of a run without
    it, and fine-tuning applies them: the same logged gradient norms, weights, optimizer state."""
    pretraining = ["--data", shards, "--vocab", vocab, "--amp", "fp16", "--batch-size", 4,
                   "--iterations", 2, "--clip-grad", 0.5, "--lookahead-k", 2, "--log-every", 1,
                   "--checkpoint-every", 100]
    finetuning = ["--init", "random", "--backbone", "resnet18", "--image-size", 32, "--finetune",
                  "--imagenet", write_image_folder(tmp_path / "images", 2), "--amp", "fp16",
                  "--epochs", 1, "--batch-size", 2, "--workers", 0]
    scaler = torch.amp.GradScaler
    for scaled in (False, True):
        if scaled:  # what new_model and start_run build on a GPU
            monkeypatch.setattr(torch.amp, "GradScaler", lambda device, *_, **__: scaler(device))
        run_train(tmp_path / f"pretraining{scaled:d}", *pretraining)
        run_probe(*finetuning, "--out", tmp_path / f"finetuning{scaled:d}")
    momentum = lambda saved: [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    for run, state in (("pretraining", "model"), ("finetuning", "model")):
        plain, scaled = (virtex.load_checkpoint(tmp_path / f"{run}{s}" / "last.pt") for s in (0, 1))
        assert scaled["scaler"]["scale"] == 2.0 ** 16 and not plain["scaler"]  # it did scale
        for key, value in plain[state].items():
            assert torch.equal(value, scaled[state][key]), (run, key)
        assert all(map(torch.equal, momentum(plain), momentum(scaled))), run
    logged = lambda s: map(json.loads, (tmp_path / f"pretraining{s}" / "log.jsonl").open())
    norms = [[record["grad_norm"] for record in logged(s) if "grad_norm" in record] for s in (0, 1)]
    assert norms[0] == norms[1] and len(norms[0]) == 2 and min(norms[0]) > 0.5  # each step clipped
