#!/usr/bin/env python
"""pycaffe-mpi in pycaffe's words: build LeNet with NetSpec, train it with SGDSolver, classify.

The script a pycaffe user knows from Caffe's "Learning LeNet" notebook, run unchanged except for
the import line:

1. ``caffe.NetSpec`` with ``caffe.layers``/``caffe.params`` writes the train, test and deploy
   prototxts (LMDB ``Data`` layers scaling pixels to [0, 1]);
2. a solver prototxt is written and ``caffe.SGDSolver`` trains (``solver.step``), with the test
   net's accuracy read through ``solver.test_nets[0].forward()``;
3. the weights are saved, a deploy ``caffe.Net`` loads them, and PNG files are classified with
   ``caffe.io.load_image``, ``caffe.io.Transformer`` and ``Net.forward``.

Data: Fashion-MNIST when its IDX files are installed (``apt-get install dataset-fashion-mnist``,
see tools/get_fashion_mnist.py), else a small synthetic 10-class set (a bright square whose
place gives the class, plus noise) written to LMDBs the same way.

Example:
    python docs/pycaffe_example.py --workdir /tmp/lenet --iters 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import pycaffe_mpi as caffe
from pycaffe_mpi import datasets
from pycaffe_mpi import layers as L
from pycaffe_mpi import params as P


def lenet(source: str | None, batch_size: int) -> caffe.NetSpec:
    """LeNet as in Caffe's notebook; ``source=None`` gives the deploy net (Input + Softmax)."""
    n = caffe.NetSpec()
    if source is None:
        n.data = L.Input(shape=dict(dim=[batch_size, 1, 28, 28]))
    else:
        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=source,
                                 transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    if source is None:
        n.prob = L.Softmax(n.score)
    else:
        n.loss = L.SoftmaxWithLoss(n.score, n.label)
        n.accuracy = L.Accuracy(n.score, n.label)
    return n


def synthetic(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 1x28x28 uint8 images: class k is a bright 8x8 square at the k-th place."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 60, (count, 1, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        y, x = 2 + 14 * (k // 5), 1 + 5 * (k % 5)
        images[i, 0, y:y + 8, x:x + 8] = 230
    return images, labels


def prepare_data(workdir: Path, force_synthetic: bool, count: int) -> dict[str, Path]:
    """Train/test LMDBs: Fashion-MNIST if installed, else synthetic."""
    src = Path(datasets.FASHION_MNIST_SRC)
    if not force_synthetic and any(src.glob("train-images-idx3-ubyte*")):
        return datasets.get_fashion_mnist(workdir / "fashion_mnist", src)
    paths = {}
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = synthetic(count, seed)
        paths[f"{split}_db"] = workdir / f"synthetic_{split}_lmdb"
        datasets.write_datum_lmdb(paths[f"{split}_db"], images, labels, key_format="%08d",
                                  overwrite=True)
    return paths


SOLVER = """train_net: "{train}"
test_net: "{test}"
test_iter: {test_iter}
test_interval: 1000000
test_initialization: false
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: {display}
max_iter: {iters}
snapshot: 0
snapshot_after_train: false
snapshot_prefix: "{prefix}"
random_seed: {seed}
solver_mode: CPU
"""


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="lenet_example", help="where files go")
    ap.add_argument("--iters", type=int, default=200, help="training iterations")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--synthetic", action="store_true",
                    help="use the synthetic set even if Fashion-MNIST is installed")
    ap.add_argument("--count", type=int, default=2000, help="synthetic examples per split")
    ap.add_argument("--classify", type=int, default=8, help="test images to classify")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    caffe.set_mode_cpu()
    data = prepare_data(work, args.synthetic, args.count)

    # 1. nets, written as prototxt by NetSpec
    files = {"train": work / "lenet_train.prototxt", "test": work / "lenet_test.prototxt",
             "deploy": work / "lenet_deploy.prototxt"}
    files["train"].write_text(str(lenet(str(data["train_db"]), args.batch_size).to_proto()))
    files["test"].write_text(str(lenet(str(data["test_db"]), 100).to_proto()))
    files["deploy"].write_text(str(lenet(None, args.classify).to_proto()))

    # 2. train
    solver_path = work / "lenet_solver.prototxt"
    solver_path.write_text(SOLVER.format(train=files["train"], test=files["test"], test_iter=1,
                                         display=max(1, args.iters // 5), iters=args.iters,
                                         prefix=work / "lenet", seed=1))
    solver = caffe.SGDSolver(str(solver_path))
    print("blobs:", [(k, v.data.shape) for k, v in solver.net.blobs.items()])
    print("params:", [(k, v[0].data.shape) for k, v in solver.net.params.items()])
    solver.step(args.iters)
    train_loss = float(solver.net.blobs["loss"].data)
    test_net = solver.test_nets[0]
    test_net.share_with(solver.net)  # as Solver.test() does before each test
    test_out = test_net.forward(blobs=["label"])
    print(f"after {args.iters} iterations: train loss {train_loss:.3f}, test accuracy "
          f"{float(test_out['accuracy']):.3f} on one batch of 100")
    weights = work / "lenet.caffemodel"
    solver.net.save(str(weights))

    # 3. classify image files with the deploy net: the test batch's first images, as PNGs
    from PIL import Image

    images = np.round(test_net.blobs["data"].data[:args.classify, 0] * 255).astype(np.uint8)
    labels = test_out["label"][:args.classify].astype(int)
    paths = []
    for i, image in enumerate(images):
        paths.append(work / f"test_{i}.png")
        Image.fromarray(image).save(paths[-1])
    net = caffe.Net(str(files["deploy"]), caffe.TEST, weights=str(weights))
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))  # H x W x 1 -> 1 x H x W; pixels in [0, 1]
    for i, path in enumerate(paths):
        net.blobs["data"].data[i] = transformer.preprocess(
            "data", caffe.io.load_image(str(path), color=False))
    prob = net.forward()["prob"]
    predicted = prob.argmax(axis=1)
    print("predicted:", predicted.tolist())
    print("true:     ", labels.tolist())
    return {"train_loss": train_loss, "test_accuracy": float(test_out["accuracy"]),
            "deploy_accuracy": float((predicted == labels).mean())}


if __name__ == "__main__":
    main(sys.argv[1:])
