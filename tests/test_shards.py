"""Pretraining from tar shards (img2dataset's layout): brace patterns, readers of their own, exact
resume, bad samples named and skipped."""
import io
import json
import shutil
import tarfile

import pytest
import torch

import train
import virtex
from conftest import run_train


def test_brace_patterns_and_folders_name_the_same_sorted_shards(toy):
    folder = virtex.expand_shards(toy / "shards")
    assert [p.name for p in folder] == [f"{i:05d}.tar" for i in range(12)]
    assert virtex.expand_shards(f"{toy}/shards/{{00000..00011}}.tar") == folder
    with pytest.raises(FileNotFoundError, match="00012.tar: no such shard \\(1 of 13 missing\\)"):
        virtex.expand_shards(f"{toy}/shards/{{00000..00012}}.tar")


def test_every_reader_gets_shards_of_its_own_or_a_clear_error(toy, tokenizer, cfg):
    from dataclasses import replace
    shards = virtex.expand_shards(toy / "shards")
    samples = virtex.CaptioningDataset([], tokenizer, cfg)
    with pytest.raises(ValueError, match="12 shards for 4 processes x 4 loader workers"):
        virtex.CaptionShards(shards, samples, replace(cfg, workers=4), rank=0, world=4)
    streams = [iter(virtex.CaptionShards(shards, samples, replace(cfg, workers=0), r, 2)) for r in range(2)]
    first = [next(stream) for stream in streams]
    # reader = rank (one per rank without workers)
    assert [batch[4][0] for batch in first] == [0, 1]
    assert not torch.equal(first[0][1], first[1][1])  # different samples


def test_every_epoch_reads_the_shards_in_a_new_order(toy, tokenizer, cfg):
    from dataclasses import replace
    samples = virtex.CaptioningDataset([], tokenizer, cfg)
    stream = iter(virtex.CaptionShards(virtex.expand_shards(toy / "shards"), samples,
                                       replace(cfg, workers=0, batch_size=8)))
    batches = [next(stream) for _ in range(12)]  # two epochs of the 48 toy images
    assert [batch[4][1] for batch in batches] == [0] * 6 + [1] * 6  # the epoch of the next sample
    assert not torch.equal(batches[0][0], batches[6][0])


@pytest.mark.slow
def test_training_from_shards_resumes_exactly_with_loader_workers(toy, tmp_path):
    flags = ["--data", toy / "shards", "--val", toy / "coco", "--workers", "2", "--iterations", "4",
             "--checkpoint-every", "100"]
    run_train(tmp_path / "a", *flags)
    run_train(tmp_path / "b", *flags, "--stop-after", "3")
    saved = virtex.load_checkpoint(tmp_path / "b" / "last.pt")["shards"]
    assert saved["readers"] == 2 and set(saved["positions"]) == {0, 1}
    run_train(tmp_path / "b", *flags)
    a, b = (virtex.load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["shards"] == b["shards"]
    with pytest.raises(SystemExit, match="read other data"):  # another number of readers
        run_train(tmp_path / "b", *flags[:-4], "--workers", "3", "--iterations", "6")


def add_members(tar_path, members):
    with tarfile.open(tar_path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_a_corrupt_image_an_empty_caption_and_a_missing_image_are_named_and_skipped(toy, tmp_path,
                                                                                    capsys):
    shards = shutil.copytree(toy / "shards", tmp_path / "shards")
    image = (toy / "coco" / "train2017" / "000000000001.jpg").read_bytes()
    add_members(shards / "00000.tar",
                {"bad.jpg": b"\xff\xd8 not a jpeg", "bad.txt": b"a red circle",
                 "empty.jpg": image, "empty.txt": b"  \n ", "lonely.txt": b"a blue star"})
    run_train(tmp_path / "out", "--data", shards, "--iterations", "6", "--checkpoint-every", "100")
    output = capsys.readouterr().out
    for problem in ("00000.tar:bad.jpg: cannot identify image file", "00000.tar:empty: no caption",
                    "00000.tar:lonely: no image"):
        assert problem in output
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert sum(line.get("unreadable_images", 0) for line in log) == 3
    assert virtex.load_checkpoint(tmp_path / "out" / "last.pt")["iteration"] == 6


def test_a_vocabulary_is_built_from_at_most_the_stated_number_of_captions(toy, monkeypatch,
                                                                          tmp_path):
    captions = list(virtex.shard_captions(virtex.expand_shards(toy / "shards"), 7))
    assert len(captions) == 7 and captions[:5] == virtex.read_captions(toy / "coco", "train")[0][1]
    monkeypatch.setattr(train, "VOCAB_CAPTIONS", 50)
    seen = []
    trained = virtex.Tokenizer.train
    monkeypatch.setattr(virtex.Tokenizer, "train",
                        lambda c, *a: seen.extend(c) or trained(seen, *a))
    run_train(tmp_path, "--data", toy / "shards", "--iterations", "1", "--stop-after", "1")
    assert len(seen) == 50


def test_the_loader_benchmark_reads_shards(toy, capsys):
    train.cli(["--benchmark", "loader", "--data", str(toy / "shards"), "--batch-size", "8",
               "--workers", "0",
               "--iterations", "2", "--image-size", "32"])
    assert "img/s over 2 batches of 8" in capsys.readouterr().out
