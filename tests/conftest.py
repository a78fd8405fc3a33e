"""Shared fixtures and helpers: a throwaway vocabulary, a tiny model, a tiny COCO folder, the toy
world, and train.py and probe.py run in this process or under torchrun."""
import copy
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import probe
import train
import virtex

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    gc.freeze()  # torch's and pytest's objects live all session: full collections need not scan them
    config.addinivalue_line("markers", "slow: launches processes or trains for more than about a "
                            "second (left out of the quick tier)")


# A model small enough that a training step takes a few milliseconds on a CPU.
TINY = ["--backbone", "resnet18", "--image-size", "32", "--hidden", "32", "--heads", "2",
        "--feedforward", "64", "--vocab-size", "64", "--batch-size", "8", "--workers", "0",
        "--warmup", "2", "--log-every", "2"]

CAPTIONS = [f"a {size} {color} {shape} {rel} a {color2} {shape2}"
            for size in ("small", "large") for color in ("red", "green", "blue", "bright yellow")
            for shape in ("circle", "square", "triangle")
            for rel in ("left of", "right of", "above")
            for color2 in ("red", "blue") for shape2 in ("circle", "square")]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return virtex.Tokenizer.train(CAPTIONS, tmp_path_factory.mktemp("vocab") / "toy", vocab_size=64)


@pytest.fixture
def cfg(tokenizer):
    return virtex.Config(backbone="resnet18", hidden=32, heads=2, vocab_size=len(tokenizer),
                         image_size=64, batch_size=4, workers=0, warmup=2, iterations=20)


BUILT = {}


def seeded_model(cfg, seed=0):
    """virtex.VirTex(cfg) as built right after torch.manual_seed(seed), with the generator left as
    that build leaves it. Each model is built once and copied: a ResNet-18's initialisation takes
    0.2 s, which dozens of tests would repeat."""
    key = (repr(cfg), seed)
    if key not in BUILT:
        torch.manual_seed(seed)
        BUILT[key] = virtex.VirTex(cfg), torch.get_rng_state()
    model, generator = BUILT[key]
    torch.set_rng_state(generator)
    return copy.deepcopy(model)


@pytest.fixture
def model(cfg):
    return seeded_model(cfg)


def write_coco(root, split, n, captions_per_image=3, seed=0, size=(80, 60)):
    """A COCO Captions split with n random-colour images."""
    rng = random.Random(seed)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}.jpg"
        color = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", size, color).save(root / f"{split}2017" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for _ in range(captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "caption": rng.choice(CAPTIONS)})
    path = root / "annotations" / f"captions_{split}2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


@pytest.fixture
def coco(tmp_path):
    """A COCO Captions folder: 12 train and 4 val images, 3 captions each."""
    write_coco(tmp_path / "coco", "train", 12)
    write_coco(tmp_path / "coco", "val", 4, seed=1)
    return tmp_path / "coco"


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy world at 32 px: 48 train and 8 val COCO images, 24 + 24 VOC images."""
    root = tmp_path_factory.mktemp("toy")
    virtex.make_toy_world(root, size=32, train=48, val=8, voc=24)
    return root


def run_train(out, *flags):
    """train.py in this process, the tiny model; later flags win (e.g. --data or --toy-dir)."""
    train.cli(["--out", str(out), *TINY, *map(str, flags)])


def run_probe(*flags):
    """probe.py in this process; its errors raised as they are (not ended as one line)."""
    probe.main(probe.get_args_parser().parse_args([str(f) for f in flags]))


def torchrun_command(script, *flags, launch=("--standalone", "--nproc_per_node=2")):
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / script),
            *map(str, flags)]


def one_thread_each():
    """The environment of launched processes: the two cores are shared, one thread a process."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, *flags, nproc=2):
    """Run a script under torchrun with CPU processes (gloo); returns the finished process."""
    command = torchrun_command(script, *flags, launch=("--standalone", f"--nproc_per_node={nproc}"))
    return subprocess.run(command, cwd=ROOT, env=one_thread_each(), capture_output=True, text=True,
                          timeout=300)


def two_nodes(script, *flags):
    """Run a script as two single-process "nodes" on 127.0.0.1 (torchrun's multi-node rendezvous,
    gloo); returns both finished processes, node 0's first."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = lambda rank: ("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                         "--rdzv-backend", "static", "--rdzv-endpoint", f"127.0.0.1:{port}")
    nodes = [subprocess.Popen(torchrun_command(script, *flags, launch=node(rank)), cwd=ROOT,
                              env=one_thread_each(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    results = []
    for process in nodes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results
