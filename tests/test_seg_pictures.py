"""Segmentation pictures: label PNGs decode back to the predicted trainIds, panels show image | truth |
prediction | errors, and seg_test.py --save_pred/--save_panels writes them for a real checkpoint."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deqlab.data.segmentation import label_lut, normalise
from deqlab.tasks import get_task
from deqlab.config import load_config
from deqlab.utils.seg_pictures import RIGHT, WRONG, IGNORED, class_colours, colourise, label_png, panel
from test_cli import run, tool

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("mapping, classes", [("cityscapes", 19), ("none", 11)])
def test_label_pngs_decode_back_to_the_predicted_classes(tmp_path, mapping, classes):
    pred = RNG.integers(0, classes, (12, 20))
    label_png(pred, mapping).save(tmp_path / "p.png")
    stored = Image.open(tmp_path / "p.png")
    assert stored.mode == "P"
    values = np.array(stored)
    if mapping == "cityscapes":  # label ids, e.g. road (trainId 0) is id 7, bicycle (18) is id 33
        assert set(np.unique(values)) <= set(range(7, 34))
        assert values[pred == 0].tolist() == [7] * int((pred == 0).sum())
    assert np.array_equal(label_lut(mapping, 255)[values], pred)  # the loader's own mapping inverts it


def test_panel_is_image_truth_prediction_errors():
    h, w = 10, 14
    rgb = torch.from_numpy(RNG.integers(0, 256, (3, h, w))).float()
    label, pred = RNG.integers(0, 19, (h, w)), RNG.integers(0, 19, (h, w))
    label[0] = 255
    colours = class_colours("cityscapes")
    picture = np.asarray(panel(normalise(rgb), label, pred, colours, 255))
    assert picture.shape == (h, 4 * w, 3)
    assert np.abs(picture[:, :w].astype(int) - rgb.permute(1, 2, 0).numpy()).max() <= 1  # de-normalised
    assert np.array_equal(picture[:, w:2 * w], colourise(label, colours, 255))
    assert (picture[0, w:2 * w] == IGNORED).all()
    assert np.array_equal(picture[:, 2 * w:3 * w], colourise(pred, colours))
    errors = picture[:, 3 * w:]
    assert (errors[1:][(pred == label)[1:]] == RIGHT).all() and (errors[1:][(pred != label)[1:]] == WRONG).all()
    assert (errors[0] == IGNORED).all()


def test_seg_test_saves_label_ids_colours_and_panels(tiny_seg_run):
    path, overrides, tmp = tiny_seg_run
    ckpt = tmp / "random_init.pth"
    torch.manual_seed(0)
    torch.save(get_task("seg", load_config(path, overrides)).build_model().state_dict(), ckpt)
    preds = tmp / "preds"
    proc = run(tool("seg_test.py") + ["--save_pred", str(preds), "--save_panels", "2", "--cfg", str(path),
                                      *overrides, "TEST.MODEL_FILE", str(ckpt)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = sorted(preds.glob("*.png"))
    panels = sorted((preds / "panels").glob("*.png"))
    assert len(labels) == 4 and len(list((preds / "colour").glob("*.png"))) == 4 and len(panels) == 2
    colours = class_colours("cityscapes")
    for label_file in labels:
        train_ids = label_lut("cityscapes", 255)[np.array(Image.open(label_file))]
        assert np.array_equal(np.asarray(Image.open(preds / "colour" / label_file.name)), colourise(train_ids, colours))
    for panel_file in panels:
        picture = np.asarray(Image.open(panel_file))
        h, w = picture.shape[0], picture.shape[1] // 4
        assert (w, h) == Image.open(preds / panel_file.name).size
        assert np.array_equal(picture[:, 2 * w:3 * w], np.asarray(Image.open(preds / "colour" / panel_file.name)))
    bad = run(tool("seg_test.py") + ["--save_panels", "2", "--cfg", str(path), *overrides, "TEST.MODEL_FILE",
                                     str(ckpt)], tmp)
    assert bad.returncode == 2 and "--save_panels N needs N >= 0 and --save_pred DIR" in bad.stderr


def test_make_cityscapes_lists_are_read_by_the_real_loader(tmp_path):
    from test_seg_data import make_cfg, write_tree
    from deqlab.data import build_dataset
    images = [(RNG.integers(0, 256, (8, 16, 3)).astype(np.uint8), RNG.integers(0, 34, (8, 16))) for _ in range(3)]
    write_tree(tmp_path, {"train": images[:2], "val": images[2:], "test": [(images[0][0], None)]})
    for lst in (tmp_path / "list" / "cityscapes").glob("*.lst"):
        lst.unlink()  # only the tree: the tool writes the lists
    proc = run([sys.executable, str(tool("make_cityscapes_lists.py")[1]), "--root", str(tmp_path / "cityscapes")],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{tmp_path / 'list/cityscapes/train.lst'}: 2 images"
    cfg = make_cfg(tmp_path, **{"DATASET.TEST_SET": "list/cityscapes/val.lst"})
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert [f.name for f in train.files] == ["city_000000_000019_leftImg8bit", "city_000001_000019_leftImg8bit"]
    _, label = val[0]
    assert torch.equal(label, torch.from_numpy(label_lut("cityscapes", 255)[images[2][1]]))
    assert (tmp_path / "list/cityscapes/test.lst").read_text() == \
        "leftImg8bit/test/city/city_000000_000019_leftImg8bit.png\n"
    (tmp_path / "cityscapes/gtFine/train/city/city_000001_000019_gtFine_labelIds.png").unlink()
    bad = run([sys.executable, str(tool("make_cityscapes_lists.py")[1]), "--root", str(tmp_path / "cityscapes")],
              tmp_path)
    assert bad.returncode == 2 and "city_000001_000019_gtFine_labelIds.png: label ids of" in bad.stderr
