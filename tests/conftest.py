"""Shared fixtures: a throwaway vocabulary, a tiny model config and a tiny COCO folder."""
import json
import random

import pytest
import torch
from PIL import Image

import virtex

CAPTIONS = [f"a {size} {color} {shape} {rel} a {color2} {shape2}"
            for size in ("small", "large") for color in ("red", "green", "blue", "bright yellow")
            for shape in ("circle", "square", "triangle") for rel in ("left of", "right of", "above")
            for color2 in ("red", "blue") for shape2 in ("circle", "square")]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return virtex.Tokenizer.train(CAPTIONS, tmp_path_factory.mktemp("vocab") / "toy", vocab_size=64)


@pytest.fixture
def cfg(tokenizer):
    return virtex.Config(backbone="resnet18", hidden=32, heads=2, vocab_size=len(tokenizer), image_size=64,
                         batch_size=4, workers=0, warmup=2, iterations=20)


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return virtex.VirTex(cfg)


def write_coco(root, split, n, captions_per_image=3, seed=0, size=(80, 60)):
    """A COCO Captions split with n random-colour images."""
    rng = random.Random(seed)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}.jpg"
        Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(root / f"{split}2017" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for _ in range(captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "caption": rng.choice(CAPTIONS)})
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))


@pytest.fixture
def coco(tmp_path):
    write_coco(tmp_path, "train", 12)
    write_coco(tmp_path, "val", 4, seed=1)
    return tmp_path
