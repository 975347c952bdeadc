"""Test-time segmentation (sliding windows, scales, flip) against whole-image inference where they must agree,
with tiny local models whose predictions cannot see across windows."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqlab.segmentation.inference import ORIGINAL_TEST_SCALES, resize_long_side, segment

C = 3


class LocalNet(nn.Module):
    """1x1 convolutions (translation- and flip-equivariant, no spatial receptive field); then optionally
    ``pool``: 4x4 average pooling (logits at 1/4 resolution, as MDEQ's), ``blocks``: the pooled logits
    repeated back to full resolution (each 4x4 block on its own), ``ramp``: a left-to-right ramp added (not
    flip-equivariant). ``info["fwd"]`` counts the calls in ``nstep``, ``nfe`` (one more) and ``rel_lowest`` (0.1
    per call)."""

    def __init__(self, pool=False, blocks=False, ramp=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, C, 1))
        self.pool, self.blocks, self.ramp = pool or blocks, blocks, ramp
        self.calls = 0

    def forward(self, x, train_step=0, f_thres=None):
        assert train_step == -1 and f_thres == 5
        y = 4 * self.net(x)
        if self.pool:
            y = F.avg_pool2d(y, 4)
        if self.blocks:
            y = y.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
        if self.ramp:
            y = y + torch.linspace(0, 2, y.shape[-1])
        self.calls += 1
        return y, {"fwd": {"nstep": self.calls, "nfe": self.calls + 1,
                           "rel_lowest": torch.full((len(x),), 0.1 * self.calls)}}


def image(h, w, batch=2, seed=0):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def run(model, x, crop=None, **kw):
    kw.setdefault("base_size", None)
    logits, summary, _ = segment(model, x, num_classes=C, crop_size=crop, f_thres=5, **kw)
    return logits, summary


@pytest.mark.parametrize("h,w,crop", [(13, 22, (9, 7)), (7, 9, (12, 10)), (10, 30, (12, 16))])
def test_sliding_windows_equal_whole_image_for_a_pixelwise_model(h, w, crop):
    # Windows padded at the border; an image that fits in one window; an image lower than the window padded
    # before sliding. Padding never reaches a real pixel's prediction and overlapping windows agree, so the
    # result is the model's logits.
    model, x = LocalNet(), image(h, w)
    whole, _ = run(model, x)
    windows, _ = run(model, x, crop)
    assert windows.shape == (2, C, h, w)
    torch.testing.assert_close(whole, model(x, -1, 5)[0])
    torch.testing.assert_close(windows, whole, rtol=1e-5, atol=1e-5)


def test_sliding_windows_equal_whole_image_when_windows_align_with_the_models_blocks():
    model, x = LocalNet(blocks=True), image(16, 24)
    whole, _ = run(model, x)
    aligned, _ = run(model, x, (12, 12))  # stride 8: every window starts on a 4x4 block boundary
    torch.testing.assert_close(aligned, whole, rtol=1e-5, atol=1e-5)
    shifted, _ = run(model, x, (9, 9))  # stride 6: windows cut through blocks, so their logits differ
    assert (shifted - whole).abs().max() > 1e-2


def test_quarter_resolution_logits_are_upsampled_with_aligned_corners_as_in_training():
    model, x = LocalNet(pool=True), image(16, 24)
    low = model(x, -1, 5)[0]
    whole, _ = run(model, x)
    one_window, _ = run(model, x, (24, 16))  # the window is the image: one call
    expected = F.interpolate(low, size=(16, 24), mode="bilinear", align_corners=True)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(one_window, expected)
    unaligned = F.interpolate(low, size=(16, 24), mode="bilinear", align_corners=False)
    assert (whole - unaligned).abs().max() > 1e-2


def test_flip_averages_with_the_mirrored_prediction():
    x = image(12, 20)
    equivariant = LocalNet()
    plain, _ = run(equivariant, x)
    flipped, _ = run(equivariant, x, (8, 8), flip=True)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-5)
    ramp = LocalNet(ramp=True)
    plain, _ = run(ramp, x)
    flipped, _ = run(ramp, x, flip=True)
    mirrored = ramp(x.flip(-1), -1, 5)[0].flip(-1)
    torch.testing.assert_close(flipped, (plain + mirrored) / 2)
    assert (flipped - plain).abs().max() > 0.5


def test_scales_are_fused_in_exp_space_at_the_images_resolution():
    model, x = LocalNet(), image(12, 20)
    single, _ = run(model, x, (8, 8))
    for scales in ((1.0,), (1.0, 1.0)):
        torch.testing.assert_close(run(model, x, (8, 8), scales=scales)[0], single, rtol=1e-5, atol=1e-5)
    # Scale 0.5 of a long side of 20: the image at 6x10, predicted, exp'ed and resized back; the mean of the
    # two scales' exp values, as the original's sum over scales (the log differs by log 2 only).
    fused, _ = run(model, x, scales=(1.0, 0.5))
    half = model(resize_long_side(x, 10), -1, 5)[0]
    assert half.shape[-2:] == (6, 10)
    expected = ((single.double().exp() + F.interpolate(half.double().exp(), size=(12, 20), mode="bilinear",
                                                       align_corners=False)) / 2).log()
    torch.testing.assert_close(fused, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_size,crop,flip,scales", [
    (40, (16, 16), False, (1.0,)), (10, (16, 16), True, (1.0,)), (30, None, False, ORIGINAL_TEST_SCALES),
    (None, (7, 5), True, (0.5, 1.25))])
def test_the_output_always_has_the_images_size(base_size, crop, flip, scales):
    x = image(10, 17, batch=1)
    out, _ = run(LocalNet(pool=True), x, crop, base_size=base_size, flip=flip, scales=scales)
    assert out.shape == (1, C, 10, 17) and torch.isfinite(out).all()


def test_solver_stats_are_averaged_over_every_call():
    model, x = LocalNet(), image(16, 24)
    # windows of 12x12 with stride 8: 2 rows x 3 columns, twice with flip: calls report steps 1..12
    _, solve = run(model, x, (12, 12), flip=True)
    assert model.calls == 12
    assert solve.steps == pytest.approx(6.5) and solve.nfe == pytest.approx(7.5)
    assert solve.residual == pytest.approx(0.65)


def test_a_model_without_solver_stats_and_a_wrong_class_count():
    class Unrolled(LocalNet):
        def forward(self, x, train_step=0, f_thres=None):
            return super().forward(x, train_step, f_thres)[0], {"fwd": None}

    assert run(Unrolled(), image(8, 8))[1] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="the model predicts 3 classes, expected num_classes=4"):
        segment(LocalNet(), image(8, 8), num_classes=4, crop_size=None, base_size=None, f_thres=5)


def original_procedure(model, x, crop_h, crop_w, base_size, scales, flip):
    """HRNet's BaseDataset.multi_scale_inference (+ ``inference``) for one image, step by step: windows with a
    2/3 stride padded at the border (black), exp of the flip-averaged logits, sum over scales."""
    _, _, height, width = x.shape
    pad = torch.tensor([-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]).view(1, 3, 1, 1)

    def pad_image(a):
        h, w = a.shape[-2:]
        out = pad.expand(1, 3, max(h, crop_h), max(w, crop_w)).clone()
        out[..., :h, :w] = a
        return out

    def inference(a):
        # window logits upsampled as in training (align_corners=True); the original's test code used False
        up = lambda t: F.interpolate(model(t, -1, 5)[0], size=a.shape[-2:], mode="bilinear", align_corners=True)
        pred = (up(a) + up(a.flip(-1)).flip(-1)) * 0.5 if flip else up(a)
        return pred.double().exp()

    final = 0
    for scale in scales:
        long = int(base_size * scale + 0.5)
        size = (long, int(width * long / height + 0.5)) if height > width else (int(height * long / width + 0.5), long)
        img = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        h, w = size
        if max(h, w) <= min(crop_h, crop_w):
            preds = inference(pad_image(img))[..., :h, :w]
        else:
            img = pad_image(img)
            full_h, full_w = img.shape[-2:]
            sh, sw = int(crop_h * 2 / 3), int(crop_w * 2 / 3)
            preds, count = torch.zeros(1, C, full_h, full_w, dtype=torch.float64), torch.zeros(full_h, full_w)
            for r in range(-(-(full_h - crop_h) // sh) + 1):
                for c in range(-(-(full_w - crop_w) // sw) + 1):
                    h0, w0 = r * sh, c * sw
                    h1, w1 = min(h0 + crop_h, full_h), min(w0 + crop_w, full_w)
                    preds[..., h0:h1, w0:w1] += inference(pad_image(img[..., h0:h1, w0:w1]))[..., :h1 - h0, :w1 - w0]
                    count[h0:h1, w0:w1] += 1
            preds = (preds / count)[..., :h, :w]
        final = final + F.interpolate(preds, (height, width), mode="bilinear", align_corners=False)
    return final


@pytest.mark.parametrize("h,w,crop,base_size,scales,flip", [
    (20, 36, (16, 12), 36, (1.0,), False), (20, 36, (16, 12), 40, (0.5, 0.75, 1.25), True),
    (9, 30, (12, 16), 30, (1.0,), True), (10, 12, (16, 16), 12, (1.0, 1.5), False)])
def test_a_model_with_a_receptive_field_gets_the_originals_prediction(h, w, crop, base_size, scales, flip):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, C, 3, padding=1), nn.AvgPool2d(4))
    model = lambda x, train_step=-1, f_thres=None: (3 * conv(x), {"fwd": None})  # noqa: E731
    x = image(h, w, batch=1)
    ours, _, _ = segment(model, x, num_classes=C, crop_size=crop, base_size=base_size, scales=scales, flip=flip,
                         f_thres=5)
    expected = (original_procedure(model, x, crop[1], crop[0], base_size, scales, flip) / len(scales)).log()
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-5)
