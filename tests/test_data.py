"""Caption sources: --data and --val told apart in one place, and files of image,caption rows
(JSON lines, CSV) read as a COCO folder is, bad rows named by file and line."""
import csv
import json

import pytest
import torch

import train
import virtex
from conftest import TINY, run_train

FAST = ["--iterations", "2", "--checkpoint-every", "100", "--batch-size", "6", "--warmup", "1"]
FIRST, SECOND = "train2017/000000000001.jpg", "train2017/000000000002.jpg"  # of the coco fixture


def write_rows(path, rows):
    """rows [(image, caption)] as JSON lines or CSV (by the suffix); returns the path."""
    with open(path, "w", newline="") as f:
        if path.suffix == ".csv":
            csv.writer(f).writerows([("image", "caption"), *rows])
        else:
            f.writelines(json.dumps({"image": image, "caption": c}) + "\n" for image, c in rows)
    return path


def rows_of(coco):
    """The COCO train split as rows, an image's captions far apart: every image's first caption,
    then every image's second, ..., image paths relative to the folder."""
    items = virtex.read_captions(coco, "train")
    return [(f"train2017/{path.name}", captions[k]) for k in range(3) for path, captions in items]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_of_an_image_are_its_captions_in_order_of_first_appearance(coco, suffix):
    source = virtex.caption_source(write_rows(coco / f"rows{suffix}", rows_of(coco)), "train")
    assert source.items == virtex.read_captions(coco, "train")
    assert source.shards is None and not source.splits  # indexed; no val split to default to


def test_each_kind_of_data_is_told_apart_by_caption_source(coco, toy):
    rows = write_rows(coco / "rows.jsonl", rows_of(coco))
    folder = virtex.caption_source(coco, "val")
    assert folder.splits and len(folder.items) == 4
    assert len(virtex.caption_source(rows, "train", stream=True).items) == 12  # a file is indexed
    pattern = f"{toy}/shards/{{00000..00011}}.tar"
    for shards in (toy / "shards", pattern, toy / "shards" / "00003.tar"):
        streamed, indexed = (virtex.caption_source(shards, "train", s) for s in (True, False))
        assert streamed.items is None and streamed.shards == virtex.expand_shards(shards)
        assert indexed.shards is None and {len(captions) for _, captions in indexed.items} == {5}


@pytest.mark.slow
def test_a_file_of_rows_trains_exactly_as_the_coco_folder_it_lists(coco, tmp_path, monkeypatch):
    """The same images and captions in the same order: the same vocabulary, samples and weights."""
    monkeypatch.setattr(train, "evaluate", lambda *_: {})  # the data is under test, not evaluation
    sources = [coco] + [write_rows(coco / f"rows{kind}", rows_of(coco))
                        for kind in (".jsonl", ".csv")]
    for k, data in enumerate(sources):
        run_train(tmp_path / str(k), "--data", data, *FAST)
    runs = [virtex.load_checkpoint(tmp_path / str(k) / "last.pt") for k in range(3)]
    assert runs[0]["iteration"] == 2 and runs[0]["vocab"] == runs[1]["vocab"] == runs[2]["vocab"]
    for run in runs[1:]:
        assert all(torch.equal(runs[0]["model"][key], run["model"][key]) for key in run["model"])


def test_an_absolute_path_inside_the_folder_another_path_of_an_image_a_quoted_comma_are_read(coco):
    image = coco / FIRST
    rows = [(str(image), "a red circle, left of a square"), (f"train2017/../{FIRST}", "a square")]
    items = virtex.caption_source(write_rows(coco / "rows.csv", rows), "train").items
    assert items == [(image, ["a red circle, left of a square", "a square"])]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_empty_caption_is_skipped_with_a_warning_naming_its_line(coco, suffix, capsys):
    third = "train2017/000000000003.jpg"
    rows = [(FIRST, "  "), (SECOND, "a red circle"), (SECOND, ""), (third, "a square")]
    path = write_rows(coco / f"rows{suffix}", rows)
    items = virtex.caption_source(path, "train").items
    assert [(p.name, c) for p, c in items] == [("000000000002.jpg", ["a red circle"]),
                                               ("000000000003.jpg", ["a square"])]
    first = 1 if suffix == ".jsonl" else 2  # a CSV's line 1 is its header
    warning = f"warning: {path}: 2 empty captions skipped (line {first}, {first + 2})"
    assert warning in capsys.readouterr().err


BAD_LINES = [  # (the second line of a .jsonl file, the error it gets)
    ('{"image": "none.jpg", "caption": "a star"}', "line 2: none.jpg: no such image"),
    ('{"image": "../outside.jpg", "caption": "a"}', "line 2: ../outside.jpg is outside {coco}"),
    ('{"image": "{tmp}/outside.jpg", "caption": "a"}', "line 2: {tmp}/outside.jpg is outside"),
    (f'{{"image": "{SECOND}", "caption": ', "line 2: not JSON"),
    (f'{{"image": "{SECOND}"}}', "line 2: no caption"),
    ('{"caption": "a star"}', "line 2: no image"),
    (f'["{SECOND}", "a star"]', "line 2: not an object with image and caption"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_json_line_is_refused_naming_the_file_and_line(line, message, coco, tmp_path):
    (tmp_path / "outside.jpg").write_bytes((coco / FIRST).read_bytes())
    path = coco / "rows.jsonl"
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{coco}", str(coco))
    path.write_text(json.dumps({"image": FIRST, "caption": "a circle"}) + "\n" + fill(line) + "\n")
    with pytest.raises((FileNotFoundError, ValueError), match=f"^{path}: {fill(message)}"):
        virtex.caption_source(path, "train")


@pytest.mark.parametrize("text, message", [
    (f"image,caption\n{FIRST},a circle\nnone.jpg,a star\n", "line 3: none.jpg: no such image"),
    ("image,caption\n../outside.jpg,a star\n", "line 2: ../outside.jpg is outside"),
    (f"image,text\n{FIRST},a circle\n", "line 1: the header names no caption column"),
    (f"image,caption\n{FIRST},a red circle, left of a star\n",
     "line 2: 3 values for the header's 2 columns \\(an unquoted comma in a caption\\?\\)"),
    (f"image,caption\n{FIRST}\n", "line 2: 1 values for the header's 2 columns"),
])
def test_a_bad_csv_row_is_refused_naming_the_file_and_line(text, message, coco):
    path = coco / "rows.csv"
    path.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=f"^{path}: {message}"):
        virtex.caption_source(path, "train")


def test_a_bad_row_ends_a_run_with_one_line_naming_the_flag_file_and_line(coco, tmp_path):
    path = write_rows(coco / "rows.jsonl", [(FIRST, "a circle"), ("none.jpg", "a star")])
    with pytest.raises(SystemExit, match=f"^error: --val {path}: line 2: none.jpg: no such image$"):
        train.cli(["--out", str(tmp_path), *TINY, "--data", str(coco), "--val", str(path)])
    with pytest.raises(SystemExit, match=f"^error: --data {tmp_path}/typo.jsonl: missing"):
        train.cli(["--out", str(tmp_path), *TINY, "--data", str(tmp_path / "typo.jsonl")])


def test_a_new_caption_source_is_one_reader_and_one_line(coco, monkeypatch):
    """The README's recipe ("Changing it"): a reader of items, and its line in CAPTION_SOURCES."""
    def read_tsv(path, split):  # image<TAB>caption, a row a line
        rows = [dict(zip(["image", "caption"], line.split("\t"))) for line in path.read_text().splitlines()]
        return virtex.caption_rows(path, enumerate(rows, 1))

    monkeypatch.setitem(virtex.CAPTION_SOURCES, ".tsv", read_tsv)
    path = coco / "rows.tsv"
    path.write_text("".join(f"{image}\t{caption}\n" for image, caption in rows_of(coco)))
    assert virtex.caption_source(path, "train").items == virtex.read_captions(coco, "train")
