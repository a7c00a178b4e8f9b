"""pycaffe's ``caffe.Classifier`` and ``caffe.Detector``: Nets that take images.

Both build the net in the TEST phase, prepare images with a :class:`~pycaffe_mpi.io.Transformer`
on the net's first input (H x W x K images, transposed to K x H x W, then ``channel_swap``,
``raw_scale``, ``mean``, ``input_scale`` as given) and classify with ``forward_all``.

``Detector`` offers ``detect_windows`` (and ``crop``/``configure_crop`` with R-CNN context
padding); ``detect_selective_search`` is not provided: it needs the MATLAB selective-search
code pycaffe shells out to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pycaffe_mpi import errors
from pycaffe_mpi import io as caffe_io
from pycaffe_mpi.layer import TEST
from pycaffe_mpi.net import Net


def _transformer(net: Net, mean: Any, input_scale: Any, raw_scale: Any,
                 channel_swap: Any) -> caffe_io.Transformer:
    in_ = net.inputs[0]
    tf = caffe_io.Transformer({in_: net.blobs[in_].data.shape})
    tf.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        tf.set_mean(in_, mean)
    if input_scale is not None:
        tf.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        tf.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        tf.set_channel_swap(in_, channel_swap)
    return tf


class Classifier(Net):
    """Image classification by scaling, centre cropping or oversampling.

    Args:
        model_file: deploy prototxt (first input: N x K x H x W images).
        pretrained_file: weights (.caffemodel), or None.
        image_dims: (height, width) images are resized to before cropping; default the net's
            input size (whole-image crop).
        mean, input_scale, raw_scale, channel_swap: preprocessing, see Transformer.
    """

    def __init__(self, model_file: Any, pretrained_file: str | None, image_dims: Any = None,
                 mean: Any = None, input_scale: Any = None, raw_scale: Any = None,
                 channel_swap: Any = None, **net_kwargs: Any) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file, **net_kwargs)
        self.transformer = _transformer(self, mean, input_scale, raw_scale, channel_swap)
        in_ = self.inputs[0]
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or not len(image_dims) \
            else np.array(image_dims)

    def predict(self, inputs: Sequence[Any], oversample: bool = True) -> np.ndarray:
        """Class probabilities (N x C) of N images (each H x W x K).

        With ``oversample`` (default) the prediction is the mean over the 10 crops of
        :func:`~pycaffe_mpi.io.oversample`; otherwise the centre crop alone.
        """
        dims = (int(self.image_dims[0]), int(self.image_dims[1]))
        input_ = np.zeros((len(inputs), *dims, np.shape(inputs[0])[2]), dtype=np.float32)
        for ix, in_ in enumerate(inputs):
            input_[ix] = caffe_io.resize_image(in_, dims)
        if oversample:
            input_ = caffe_io.oversample(input_, self.crop_dims)
        else:
            center = np.array(dims) / 2.0
            crop = (np.tile(center, 2) + np.concatenate([-self.crop_dims / 2.0,
                                                         self.crop_dims / 2.0])).astype(int)
            input_ = input_[:, crop[0]:crop[2], crop[1]:crop[3], :]
        name = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(name, im) for im in input_])
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions


class Detector(Net):
    """Windowed detection: classify given crops of images (R-CNN style context padding).

    Args:
        model_file, pretrained_file: as for :class:`Classifier`.
        mean, input_scale, raw_scale, channel_swap: preprocessing, see Transformer.
        context_pad: pixels of the net's input that are context around the window.
    """

    def __init__(self, model_file: Any, pretrained_file: str | None, mean: Any = None,
                 input_scale: Any = None, raw_scale: Any = None, channel_swap: Any = None,
                 context_pad: int | None = None, **net_kwargs: Any) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file, **net_kwargs)
        self.transformer = _transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows: Iterable[tuple[str, Sequence[Any]]]
                       ) -> list[dict[str, Any]]:
        """Classify windows (ymin, xmin, ymax, xmax) of image files, warped to the input size.

        Returns:
            one ``{"window", "prediction", "filename"}`` dict per window, in input order.
        """
        images_windows = [(f, list(w)) for f, w in images_windows]
        crops = []
        for fname, windows in images_windows:
            image = caffe_io.load_image(fname).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(name, c) for c in crops])
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]
        detections, ix = [], 0
        for fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix],
                                   "filename": fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames: Sequence[str]) -> list[dict[str, Any]]:
        raise errors.PycaffeError("Detector.detect_selective_search is not provided (it needs "
                                  "the MATLAB selective search code); compute windows "
                                  "elsewhere and call detect_windows")

    def crop(self, im: np.ndarray, window: Sequence[int]) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of ``im``, with ``context_pad`` context if set."""
        window = np.asarray(window)
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop
        box = window.astype(float)
        crop_size = self.blobs[self.inputs[0]].width  # assumes a square input, as pycaffe
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (box[2] - box[0] + 1) / 2.0
        half_w = (box[3] - box[1] + 1) / 2.0
        center = (box[0] + half_h, box[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = round(max(0, -box[0]) * scale_h)  # how far the box leaves the image
        pad_x = round(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        crop_h = min(round(clip_h * scale_h), crop_size - pad_y)
        crop_w = min(round(clip_w * scale_w), crop_size - pad_x)
        b = box.astype(int)
        context = caffe_io.resize_image(im[b[0]:b[2], b[1]:b[3]], (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad: int | None) -> None:
        """Crop size (H x W x K of the input) and, with context, the mean used as padding."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(np.broadcast_to(mean, self.blobs[in_].data.shape[1:]),
                             dtype=np.float32).transpose(inv_tpose)
        order = self.transformer.channel_swap.get(in_)
        if order is not None:
            crop_mean = crop_mean[:, :, [list(order).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
