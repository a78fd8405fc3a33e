"""probe.py: AP and folds as scikit-learn computes them, the SVM optimum, the VOC07 protocol and its CLI."""

import pytest
import torch

import probe
import virtex
from conftest import run_probe, seeded_model


def test_average_precision_matches_hand_computed_cases():
    assert probe.average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert probe.average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert probe.average_precision([0.1, 0.8, 0.9], [1, 0, 0]) == pytest.approx(1 / 3)
    # all tied: the prevalence
    assert probe.average_precision([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)
    assert probe.average_precision([0.3, 0.2], [0, 0]) == 0.0  # no positives: 0, like scikit-learn


def test_average_precision_equals_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        targets = torch.rand(40, generator=g) < 0.3
        assert probe.average_precision(scores, targets) == pytest.approx(
            metrics.average_precision_score(targets.numpy(), scores.numpy()), abs=1e-12)


def test_stratified_folds_equal_scikit_learn():
    assert probe.stratified_folds(torch.tensor([1, 1, 1, 0, 0, 0])).tolist() == [0, 1, 2, 0, 1, 2]
    assert probe.stratified_folds(torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0])).tolist() == [
        0, 0, 0, 1, 2, 1, 1, 2, 2]
    assert probe.stratified_folds(torch.tensor([-1, -1, 1, -1, 1, -1, -1, -1])).tolist() == [
        0, 0, 0, 1, 1, 1, 2, 2]


def svm_objective(w, x, y, cost):
    return 0.5 * (w * w).sum() + (cost * (1 - y * (x @ w)).clamp(min=0) ** 2).sum()


def exact_newton(x, y, cost, steps=100):
    """Reference: full-Hessian Newton in float64 (finite for the squared hinge)."""
    x, y, cost = x.double(), y.double(), cost.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(steps):
        active = cost * ((1 - y * (x @ w)) > 0)
        hessian = torch.eye(len(w), dtype=torch.float64) + 2 * x.T @ (active[:, None] * x)
        w = torch.linalg.solve(hessian, 2 * x.T @ (active * y))  # the optimum for this active set
    return w


def test_svm_solution_reaches_the_reference_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 20, generator=g).relu() + 0.5, dim=1)
    y = torch.where(x[:, 0] + 0.1 * torch.randn(300, generator=g) > x[:, 0].median(), 1.0, -1.0)
    for C in (0.01, 0.1, 1.0, 10.0):
        cost = C * torch.where(y > 0, 2.0, 1.0)
        ours = probe.solve_svms(x, y[:, None], cost[:, None], tol=1e-8)[0]
        best = svm_objective(exact_newton(x, y, cost), x.double(), y.double(), cost.double())
        objective = svm_objective(ours.double(), x.double(), y.double(), cost.double())
        assert objective == pytest.approx(best.item(), rel=1e-6)


def toy_features(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 3, generator=g) < 0.3).long()
    x = labels.float() @ torch.randn(3, 16, generator=g) + torch.randn(n, 16, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    return x, labels


def test_difficult_images_are_negatives_in_training_and_ignored_at_test():
    x_train, y_train = toy_features(120, 0)
    x_test, y_test = toy_features(80, 1)
    hard = y_train.clone()
    hard[:10, 0] = torch.where(hard[:10, 0] == 0, -1, hard[:10, 0])  # difficult negatives
    base = probe.evaluate_svms(x_train, y_train, x_test, y_test)
    assert torch.equal(probe.evaluate_svms(x_train, hard, x_test, y_test), base)
    difficult = y_test.clone()
    difficult[:20, 0] = -1
    moved = x_test.clone()
    moved[:20] = -moved[:20]  # whatever their scores, difficult test images do not count
    torch.testing.assert_close(probe.evaluate_svms(x_train, y_train, moved, difficult)[0],
                               probe.evaluate_svms(x_train, y_train, x_test, difficult)[0])


def test_svm_protocol_matches_scikit_learn():
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = probe.synthetic_features(400, 300, 32, classes=4)
    reference = probe.sklearn_voc07(x_train, y_train, x_test, y_test)
    torch.testing.assert_close(probe.evaluate_svms(x_train, y_train, x_test, y_test),
                               reference.float(), atol=0.05, rtol=0)


# -- on the toy VOC ----------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path, toy):
    from dataclasses import asdict
    cfg = virtex.Config(backbone="resnet18", hidden=32, heads=2, vocab_size=64, image_size=32)
    virtex.save_checkpoint(tmp_path / "tiny.pt",
                           {"model": seeded_model(cfg).state_dict(), "config": asdict(cfg)})
    return tmp_path / "tiny.pt"


def test_cli_on_the_toy_voc_prints_classes_and_map_last(checkpoint, toy, tmp_path, capsys,
                                                        monkeypatch):
    voc = toy / "voc" / "VOCdevkit" / "VOC2007"
    run_probe("--ckpt", checkpoint, "--voc", voc, "--workers", 0, "--features", tmp_path / "f.pt")
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("| red_circle |") for line in lines) == 1
    model, _ = virtex.load_model(checkpoint)
    expected = probe.voc07(model.visual, voc, 32, torch.device("cpu"), workers=0).mean()
    assert lines[-1] == f"mAP: {expected:.2f}"  # the protocol's number, printed last
    monkeypatch.setattr(probe, "extract",
                        lambda *a, **k: pytest.fail("features were extracted again"))
    run_probe("--ckpt", checkpoint, "--voc", voc, "--workers", 0, "--features", tmp_path / "f.pt",
              "--costs", 1)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mAP: ")


def test_init_random_without_voc_probes_the_toy_voc_as_the_demo_probes_its_floor(toy, capsys):
    import train
    run_probe("--init", "random", "--toy-dir", toy, "--workers", 0)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    cfg = virtex.Config.from_dict({**train.TOY, "vocab_size": 128})
    floor = train.new_model(cfg, torch.device("cpu"))[0].visual  # the weights the demo's floor probes
    expected = probe.voc07(floor, toy / "voc" / "VOCdevkit" / "VOC2007", cfg.image_size,
                           torch.device("cpu"), workers=0)
    assert printed == f"mAP: {expected.mean():.2f}"
    args = probe.get_args_parser().parse_args(["--init", "random", "--voc", "VOC"])
    (_, visual, size, _), = probe.backbones(args)
    assert (visual.channels, size) == (2048, 224)  # a real VOC: the paper's ResNet-50 at 224 px


def test_backbone_stays_bit_identical_while_probing(checkpoint, toy, tmp_path):
    model, _ = virtex.load_model(checkpoint)
    visual, size = model.visual, model.cfg.image_size
    visual.train()
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    probe.voc07(visual, toy / "voc" / "VOCdevkit" / "VOC2007", size, torch.device("cpu"), workers=0)
    recipe = probe.Recipe(epochs=1, batch_size=64, workers=0)
    probe.classify(visual, probe.read_splits(toy / "imagenet"), size, tmp_path, recipe,
                   virtex.init_processes())
    assert all(torch.equal(before[k], v) for k, v in visual.state_dict().items())


def test_an_incomplete_voc_folder_names_the_missing_file(toy, tmp_path):
    import shutil
    voc = shutil.copytree(toy / "voc" / "VOCdevkit" / "VOC2007", tmp_path / "VOC2007")
    (voc / "JPEGImages" / "000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000003.jpg"):
        probe.read_voc(voc, "trainval")
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        probe.read_voc(tmp_path, "trainval")
    (voc / "ImageSets" / "Main" / "red_star_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="red_star_test.txt: missing"):
        probe.read_voc(voc, "test")


def test_random_inits_repeat_and_torchvision_weights_load(tmp_path):
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    visual, size = probe.load_backbone(f"torchvision:{tmp_path / 'r18.pth'}")
    assert visual.channels == 512 and size == 224
    a, _ = probe.load_backbone("random", "resnet18")
    b, _ = probe.load_backbone("random", "resnet18")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="--init"):
        probe.load_backbone("imagenet")


def test_a_feature_cache_of_other_weights_is_refused(checkpoint, toy, tmp_path):
    voc = toy / "voc" / "VOCdevkit" / "VOC2007"
    model, _ = virtex.load_model(checkpoint)
    visual, size = model.visual, model.cfg.image_size
    probe.VOC07(voc, size, workers=0).cached_features(visual, torch.device("cpu"),
                                                      tmp_path / "f.pt")
    other, _ = probe.load_backbone("random", "resnet18", seed=1)
    with pytest.raises(ValueError, match="f.pt: features of"):
        probe.VOC07(voc, size, workers=0).cached_features(other, torch.device("cpu"),
                                                          tmp_path / "f.pt")


def test_voc_labels_read_1_as_present_minus_1_as_absent_and_0_as_difficult(tmp_path):
    from PIL import Image
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "JPEGImages").mkdir()
    for i in ("000001", "000002", "000003"):
        Image.new("RGB", (8, 8)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
    for split in ("trainval", "test"):
        (main / f"dog_{split}.txt").write_text("000001  1\n000002 -1\n000003  0\n")
    paths, labels, classes = probe.read_voc(tmp_path, "test")
    assert classes == ["dog"] and [p.name for p in paths] == ["000001.jpg", "000002.jpg",
                                                               "000003.jpg"]
    assert labels[:, 0].tolist() == [1, 0, -1]  # present, absent, difficult (left out of AP)


def test_malformed_voc_labels_are_named(toy, tmp_path):
    import shutil
    voc = shutil.copytree(toy / "voc" / "VOCdevkit" / "VOC2007", tmp_path / "VOC2007")
    (voc / "ImageSets" / "Main" / "red_star_test.txt").write_text("000001 yes\n")
    with pytest.raises(ValueError, match="red_star_test.txt: not VOC labels"):
        probe.read_voc(voc, "test")


# -- evaluation shared by every rank, its inputs decoded once ---------------------------------

def test_cached_inputs_give_the_features_of_fresh_decoding(checkpoint, toy, monkeypatch):
    model, _ = virtex.load_model(checkpoint)
    voc, cpu = toy / "voc" / "VOCdevkit" / "VOC2007", torch.device("cpu")
    fresh = probe.VOC07(voc, 32, workers=0, cache=False).features(model.visual, cpu)
    cached = probe.VOC07(voc, 32, workers=0, cache=True)
    first = cached.features(model.visual, cpu)
    monkeypatch.setattr(probe.Images, "__getitem__", lambda *_: pytest.fail("decoded again"))
    second = cached.features(model.visual, cpu)
    for split in ("trainval", "test"):
        assert (torch.equal(first[split][0], fresh[split][0])
                and torch.equal(second[split][0], fresh[split][0]))
    assert sum(s.nbytes() for s, _ in cached.splits.values()) == 48 * 3 * 32 * 32  # uint8 images


def test_shards_are_the_same_batches_whatever_the_number_of_processes():
    keys = list(range(150))
    alone = virtex.shard(keys, batch_size=64)
    dealt = [virtex.shard(keys, rank, 2, batch_size=64) for rank in range(2)]
    assert (alone == [keys[:64], keys[64:128], keys[128:]]
            and dealt == [[keys[:64], keys[128:]], [keys[64:128]]])
    parts = [[(b, torch.tensor(b)) for b in batches] for batches in dealt]
    assert torch.cat([x for _, x in virtex.gather(parts[0] + parts[1], None)]).tolist() == keys


def test_probe_features_have_unit_norm(checkpoint, toy):
    model, _ = virtex.load_model(checkpoint)
    voc = probe.VOC07(toy / "voc" / "VOCdevkit" / "VOC2007", 32, workers=0)
    splits = voc.features(model.visual, torch.device("cpu"))
    for x, _ in splits.values():
        torch.testing.assert_close(x.norm(dim=1), torch.ones(len(x)))
