"""caffe.Classifier and caffe.Detector, against pycaffe's classifier.py/detector.py steps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pycaffe_mpi as caffe
from pycaffe_mpi import errors
from pycaffe_mpi import layers as L


@pytest.fixture()
def deploy(tmp_path):
    """A 3x6x6 -> 4-class deploy net and its weights."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[5, 3, 6, 6]))
    n.score = L.InnerProduct(n.data, num_output=4, weight_filler=dict(type="gaussian", std=0.1))
    n.prob = L.Softmax(n.score)
    model = tmp_path / "deploy.prototxt"
    model.write_text(str(n.to_proto()))
    weights = tmp_path / "w.caffemodel"
    caffe.Net(str(model), caffe.TEST, seed=5).save(str(weights))
    return str(model), str(weights)


def probabilities(net: caffe.Net, images: np.ndarray, mean: np.ndarray, raw_scale: float,
                  swap: tuple[int, ...]) -> np.ndarray:
    """The deploy net by hand on N x 6 x 6 x 3 crops: preprocess, linear layer, softmax."""
    w, b = (p.data.astype(np.float64) for p in net.params["score"])
    out = []
    for im in images:
        x = im.transpose(2, 0, 1)[list(swap)] * raw_scale - mean[:, None, None]
        s = w @ x.ravel() + b
        e = np.exp(s - s.max())
        out.append(e / e.sum())
    return np.array(out)


def test_classifier_predict_centre_crop_and_oversample(deploy):
    model, weights = deploy
    mean = np.array([0.1, 0.2, 0.3])
    clf = caffe.Classifier(model, weights, image_dims=(8, 8), mean=mean, raw_scale=2.0,
                           channel_swap=(2, 1, 0))
    assert clf.phase == caffe.TEST and tuple(clf.crop_dims) == (6, 6)
    rng = np.random.default_rng(0)
    images = [rng.random((8, 8, 3)).astype(np.float32) for _ in range(3)]
    centre = clf.predict(images, oversample=False)
    stacked = np.stack(images)
    want = probabilities(clf, stacked[:, 1:7, 1:7], mean, 2.0, (2, 1, 0))
    np.testing.assert_allclose(centre, want, rtol=1e-4, atol=1e-6)
    over = clf.predict(images)  # 30 crops in batches of 5, averaged per image
    crops = caffe.io.oversample(stacked, (6, 6))
    want = probabilities(clf, crops, mean, 2.0, (2, 1, 0)).reshape(3, 10, 4).mean(1)
    assert over.shape == (3, 4)
    np.testing.assert_allclose(over, want, rtol=1e-4, atol=1e-6)


def test_detector_detect_windows(deploy, tmp_path):
    model, weights = deploy
    det = caffe.Detector(model, weights, raw_scale=255.0)
    assert tuple(det.crop_dims) == (6, 6, 3)
    pixels = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = tmp_path / "im.png"
    Image.fromarray(pixels).save(path)
    windows = [np.array([0, 0, 6, 6]), np.array([2, 3, 8, 9])]
    dets = det.detect_windows([(str(path), windows)])
    assert [d["filename"] for d in dets] == [str(path)] * 2
    image = pixels / 255.0
    crops = np.stack([image[0:6, 0:6], image[2:8, 3:9]])
    want = probabilities(det, crops, np.zeros(3), 255.0, (0, 1, 2))
    np.testing.assert_allclose(np.stack([d["prediction"] for d in dets]), want, rtol=1e-4,
                               atol=1e-6)
    assert (dets[1]["window"] == windows[1]).all()
    with pytest.raises(errors.PycaffeError, match="not provided"):
        det.detect_selective_search([str(path)])


def test_detector_context_padding_fills_with_the_mean(deploy):
    model, weights = deploy
    mean = np.array([0.5, 0.25, 0.75])
    det = caffe.Detector(model, weights, mean=mean, context_pad=1)
    assert det.crop_mean.shape == (6, 6, 3)
    image = np.ones((10, 10, 3), dtype=np.float32)
    crop = det.crop(image, np.array([0, 0, 4, 4]))  # context leaves the image at the top-left
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0, 0], mean)
    np.testing.assert_allclose(crop[-1, -1], 1.0)
