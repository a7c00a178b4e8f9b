"""Well-known Caffe nets, generated with NetSpec in the shapes of their public deploy files.

Each builder returns a ``NetParameter`` whose layer names, types, parameters and blob shapes
follow the public deploy prototxt of that net (ResNet-50, SqueezeNet v1.1, MobileNet v1,
DenseNet-121, FCN-32s/8s, GoogLeNet, CaffeNet), plus a Siamese LeNet trained with
ContrastiveLoss and a small LSTM sequence model. They are written here, not copied, so tests and
benchmarks can build them; ``size`` and ``batch`` shrink the input for quick runs, and
``num_output``-style widths are the deploy files' own.

Every builder takes ``batch`` (N) and, for image nets, ``size`` (H = W). Nets ending in a
fixed-size pooling window (ResNet-50's 7×7 ``pool5``, GoogLeNet's ``pool5/7x7_s1``) need the
deploy size (224); the others accept any size their strides allow. With ``loss=True`` a label
``Input`` and a ``SoftmaxWithLoss`` replace the deploy ``Softmax``, so the net trains.
"""

from __future__ import annotations

from typing import Any

from pycaffe_mpi import net_spec
from pycaffe_mpi.net_spec import layers as L
from pycaffe_mpi.net_spec import params as P

# The fillers a training prototxt would give; deploy files omit them (weights come from a model).
_MSRA = {"type": "msra"}
_XAVIER = {"type": "xavier"}
_CONST0 = {"type": "constant", "value": 0}


def _head(n: Any, top: Any, batch: int, num_classes: int, loss: bool) -> None:
    """The deploy ``prob`` (Softmax) or, with ``loss``, a label input and SoftmaxWithLoss."""
    if loss:
        n.label = L.Input(shape={"dim": [batch]})
        n.loss = L.SoftmaxWithLoss(top, n.label)
    else:
        n.prob = L.Softmax(top)


def _finish(n: Any, loss: bool) -> Any:
    """The NetParameter; a training variant's BatchNorm layers use batch statistics (the
    deploy files' ``use_global_stats: true`` needs trained statistics), as train_val files do."""
    param = n.to_proto()
    if loss:
        for lp in param.layer:
            if lp.type == "BatchNorm":
                lp.batch_norm_param.ClearField("use_global_stats")
    return param


def _data(n: Any, batch: int, channels: int, size: int) -> Any:
    n.data = L.Input(shape={"dim": [batch, channels, size, size]})
    return n.data


# -- ResNet-50 (He et al.; the authors' deploy file) ---

def _res_conv(n: Any, bottom: Any, name: str, num_output: int, kernel: int, stride: int,
              relu: bool) -> Any:
    conv = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride,
                         pad=(kernel - 1) // 2, bias_term=False, weight_filler=_MSRA)
    setattr(n, f"res{name}", conv)
    n[f"bn{name}"] = L.BatchNorm(conv, use_global_stats=True, in_place=True)
    n[f"scale{name}"] = L.Scale(conv, bias_term=True, in_place=True)
    if relu:
        n[f"res{name}_relu"] = L.ReLU(conv, in_place=True)
    return conv


def _res_block(n: Any, bottom: Any, name: str, width: int, stride: int, project: bool) -> Any:
    shortcut = (_res_conv(n, bottom, f"{name}_branch1", 4 * width, 1, stride, False)
                if project else bottom)
    x = _res_conv(n, bottom, f"{name}_branch2a", width, 1, stride, True)
    x = _res_conv(n, x, f"{name}_branch2b", width, 3, 1, True)
    x = _res_conv(n, x, f"{name}_branch2c", 4 * width, 1, 1, False)
    n[f"res{name}"] = L.Eltwise(shortcut, x)
    n[f"res{name}_relu"] = L.ReLU(n[f"res{name}"], in_place=True)
    return n[f"res{name}"]


def resnet50(batch: int = 1, size: int = 224, num_classes: int = 1000,
             loss: bool = False) -> Any:
    """ResNet-50: conv1 7×7/2, four stages of bottleneck blocks (3, 4, 6, 3), pool5 7×7, fc1000.

    Shapes (size 224): conv1 (N,64,112,112), pool1 (N,64,56,56), res2c (N,256,56,56),
    res3d (N,512,28,28), res4f (N,1024,14,14), res5c (N,2048,7,7), pool5 (N,2048,1,1),
    fc1000 (N,1000).
    """
    n = net_spec.NetSpec()
    data = _data(n, batch, 3, size)
    n.conv1 = L.Convolution(data, num_output=64, kernel_size=7, stride=2, pad=3,
                            weight_filler=_MSRA, bias_filler=_CONST0)
    n.bn_conv1 = L.BatchNorm(n.conv1, use_global_stats=True, in_place=True)
    n.scale_conv1 = L.Scale(n.conv1, bias_term=True, in_place=True)
    n.conv1_relu = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n.pool1
    for stage, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=2):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 2 else 1
            x = _res_block(n, x, f"{stage}{'abcdef'[b]}", width, stride, project=b == 0)
    n.pool5 = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n.fc1000 = L.InnerProduct(n.pool5, num_output=num_classes, weight_filler=_MSRA)
    _head(n, n.fc1000, batch, num_classes, loss)
    return _finish(n, loss)


# -- SqueezeNet v1.1 ---

def _fire(n: Any, bottom: Any, name: str, squeeze: int, expand: int) -> Any:
    sq = n[f"{name}/squeeze1x1"] = L.Convolution(bottom, num_output=squeeze, kernel_size=1,
                                                 weight_filler=_XAVIER)
    n[f"{name}/relu_squeeze1x1"] = L.ReLU(sq, in_place=True)
    e1 = n[f"{name}/expand1x1"] = L.Convolution(sq, num_output=expand, kernel_size=1,
                                                weight_filler=_XAVIER)
    n[f"{name}/relu_expand1x1"] = L.ReLU(e1, in_place=True)
    e3 = n[f"{name}/expand3x3"] = L.Convolution(sq, num_output=expand, kernel_size=3, pad=1,
                                                weight_filler=_XAVIER)
    n[f"{name}/relu_expand3x3"] = L.ReLU(e3, in_place=True)
    n[f"{name}/concat"] = L.Concat(e1, e3)
    return n[f"{name}/concat"]


def squeezenet_v11(batch: int = 1, size: int = 227, num_classes: int = 1000,
                   loss: bool = False) -> Any:
    """SqueezeNet v1.1: conv1 3×3/2, eight fire modules between three 3×3/2 max pools, conv10
    1×1 and a global average pool. Shapes (size 227): conv1 (N,64,113,113), pool1 (N,64,56,56),
    fire3 (N,128,56,56), pool3 (N,128,28,28), fire5 (N,256,28,28), pool5 (N,256,14,14),
    fire9 (N,512,14,14), conv10 (N,1000,14,14), pool10 (N,1000,1,1).
    """
    n = net_spec.NetSpec()
    data = _data(n, batch, 3, size)
    n.conv1 = L.Convolution(data, num_output=64, kernel_size=3, stride=2, weight_filler=_XAVIER)
    n.relu_conv1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _fire(n, n.pool1, "fire2", 16, 64)
    x = _fire(n, x, "fire3", 16, 64)
    n.pool3 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = _fire(n, n.pool3, "fire4", 32, 128)
    x = _fire(n, x, "fire5", 32, 128)
    n.pool5 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n.pool5
    for i, (sq, ex) in enumerate(((48, 192), (48, 192), (64, 256), (64, 256)), start=6):
        x = _fire(n, x, f"fire{i}", sq, ex)
    n.drop9 = L.Dropout(x, dropout_ratio=0.5, in_place=True)
    n.conv10 = L.Convolution(x, num_output=num_classes, kernel_size=1,
                             weight_filler={"type": "gaussian", "mean": 0.0, "std": 0.01})
    n.relu_conv10 = L.ReLU(n.conv10, in_place=True)
    n.pool10 = L.Pooling(n.conv10, pool=P.Pooling.AVE, global_pooling=True)
    _head(n, n.pool10, batch, num_classes, loss)
    return n.to_proto()


# -- MobileNet v1 ---

def _conv_bn(n: Any, bottom: Any, name: str, num_output: int, kernel: int, stride: int,
             group: int = 1) -> Any:
    conv = n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel,
                                   stride=stride, pad=(kernel - 1) // 2, group=group,
                                   bias_term=False, weight_filler=_MSRA)
    n[f"{name}/bn"] = L.BatchNorm(conv, use_global_stats=True, in_place=True)
    n[f"{name}/scale"] = L.Scale(conv, bias_term=True, in_place=True)
    n[f"relu{name[4:]}"] = L.ReLU(conv, in_place=True)
    return conv


# (name, input channels, output channels, depthwise stride) of the 13 separable blocks
_MOBILENET = (("2_1", 32, 64, 1), ("2_2", 64, 128, 2), ("3_1", 128, 128, 1),
              ("3_2", 128, 256, 2), ("4_1", 256, 256, 1), ("4_2", 256, 512, 2),
              ("5_1", 512, 512, 1), ("5_2", 512, 512, 1), ("5_3", 512, 512, 1),
              ("5_4", 512, 512, 1), ("5_5", 512, 512, 1), ("5_6", 512, 1024, 2),
              ("6", 1024, 1024, 1))


def mobilenet_v1(batch: int = 1, size: int = 224, num_classes: int = 1000,
                 loss: bool = False) -> Any:
    """MobileNet v1 (width 1.0): conv1 3×3/2, 13 depthwise (group = channels) + pointwise pairs,
    a global average pool and fc7 as a 1×1 convolution. Shapes (size 224): conv1 (N,32,112,112),
    conv2_2/sep (N,128,56,56), conv3_2/sep (N,256,28,28), conv4_2/sep (N,512,14,14),
    conv6/sep (N,1024,7,7), pool6 (N,1024,1,1), fc7 (N,1000,1,1).
    """
    n = net_spec.NetSpec()
    x = _conv_bn(n, _data(n, batch, 3, size), "conv1", 32, 3, 2)
    for name, cin, cout, stride in _MOBILENET:
        x = _conv_bn(n, x, f"conv{name}/dw", cin, 3, stride, group=cin)
        x = _conv_bn(n, x, f"conv{name}/sep", cout, 1, 1)
    n.pool6 = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    n.fc7 = L.Convolution(n.pool6, num_output=num_classes, kernel_size=1, weight_filler=_MSRA,
                          bias_filler=_CONST0)
    _head(n, L.Flatten(n.fc7) if loss else n.fc7, batch, num_classes, loss)
    return _finish(n, loss)


# -- DenseNet-121 ---

def _bn_relu_conv(n: Any, bottom: Any, name: str, num_output: int, kernel: int) -> Any:
    bn = n[f"{name}/bn"] = L.BatchNorm(bottom, use_global_stats=True, eps=1e-5)
    n[f"{name}/scale"] = L.Scale(bn, bias_term=True, in_place=True)
    n[f"relu{name[4:]}"] = L.ReLU(bn, in_place=True)
    n[name] = L.Convolution(bn, num_output=num_output, kernel_size=kernel,
                            pad=(kernel - 1) // 2, bias_term=False, weight_filler=_MSRA)
    return n[name]


def densenet121(batch: int = 1, size: int = 224, num_classes: int = 1000,
                loss: bool = False, growth: int = 32) -> Any:
    """DenseNet-121: conv1 7×7/2 + 3×3/2 max pool, dense blocks of 6, 12, 24, 16 layers
    (BN-ReLU-1×1 conv to 4k, BN-ReLU-3×3 conv to k = 32, concatenated) with transitions
    (BN-ReLU-1×1 conv halving the channels, 2×2/2 average pool), a global average pool and fc6
    as a 1×1 convolution. Channels after each block: 256, 512, 1024, 1024.
    """
    n = net_spec.NetSpec()
    n.conv1 = L.Convolution(_data(n, batch, 3, size), num_output=2 * growth, kernel_size=7,
                            stride=2, pad=3, bias_term=False, weight_filler=_MSRA)
    n["conv1/bn"] = L.BatchNorm(n.conv1, use_global_stats=True, eps=1e-5, in_place=True)
    n["conv1/scale"] = L.Scale(n.conv1, bias_term=True, in_place=True)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2, pad=1)
    x, channels = n.pool1, 2 * growth
    for block, depth in enumerate((6, 12, 24, 16), start=2):
        for i in range(1, depth + 1):
            y = _bn_relu_conv(n, x, f"conv{block}_{i}/x1", 4 * growth, 1)
            y = _bn_relu_conv(n, y, f"conv{block}_{i}/x2", growth, 3)
            n[f"concat_{block}_{i}"] = L.Concat(x, y)
            x, channels = n[f"concat_{block}_{i}"], channels + growth
        if block < 5:
            channels //= 2
            y = _bn_relu_conv(n, x, f"conv{block}_blk", channels, 1)
            n[f"pool{block}"] = L.Pooling(y, pool=P.Pooling.AVE, kernel_size=2, stride=2)
            x = n[f"pool{block}"]
    n["conv5_blk/bn"] = L.BatchNorm(x, use_global_stats=True, eps=1e-5)
    n["conv5_blk/scale"] = L.Scale(n["conv5_blk/bn"], bias_term=True, in_place=True)
    n.relu5_blk = L.ReLU(n["conv5_blk/bn"], in_place=True)
    n.pool5 = L.Pooling(n["conv5_blk/bn"], pool=P.Pooling.AVE, global_pooling=True)
    n.fc6 = L.Convolution(n.pool5, num_output=num_classes, kernel_size=1, weight_filler=_MSRA)
    _head(n, L.Flatten(n.fc6) if loss else n.fc6, batch, num_classes, loss)
    return _finish(n, loss)


# -- FCN-32s / FCN-8s (VGG-16 trunk, as the authors' voc-fcn deploy files) ---

_VGG = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


def _fcn_trunk(n: Any, data: Any, width: int) -> dict[int, Any]:
    """conv1_1 (pad 100) .. pool5, fc6 (7×7) and fc7 as convolutions; returns the pools."""
    x, pools = data, {}
    for stage, reps, channels in _VGG:
        for r in range(1, reps + 1):
            name = f"conv{stage}_{r}"
            n[name] = L.Convolution(x, num_output=channels // width, kernel_size=3,
                                    pad=100 if name == "conv1_1" else 1)
            n[f"relu{stage}_{r}"] = L.ReLU(n[name], in_place=True)
            x = n[name]
        n[f"pool{stage}"] = pools[stage] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=2,
                                                     stride=2)
        x = n[f"pool{stage}"]
    n.fc6 = L.Convolution(x, num_output=4096 // width, kernel_size=7)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.Convolution(n.fc6, num_output=4096 // width, kernel_size=1)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    return pools


def _upsample(bottom: Any, classes: int, factor: int) -> Any:
    """A fixed bilinear-initialised Deconvolution: kernel 2f, stride f, no bias."""
    return L.Deconvolution(bottom, convolution_param={
        "num_output": classes, "kernel_size": 2 * factor, "stride": factor, "bias_term": False,
        "weight_filler": {"type": "bilinear"}}, param=[{"lr_mult": 0}])


def fcn32s(batch: int = 1, size: int = 500, num_classes: int = 21, width: int = 1,
           loss: bool = False) -> Any:
    """FCN-32s: the VGG-16 trunk with conv1_1 padded by 100, score_fr (1×1), a ×32
    Deconvolution and a Crop (axis 2, offset 19) back to the input's size: score (N,21,H,W).
    ``width`` divides the trunk's channels (1 = the deploy file's)."""
    n = net_spec.NetSpec()
    data = _data(n, batch, 3, size)
    _fcn_trunk(n, data, width)
    n.score_fr = L.Convolution(n.fc7, num_output=num_classes, kernel_size=1)
    n.upscore = _upsample(n.score_fr, num_classes, 32)
    n.score = L.Crop(n.upscore, data, axis=2, offset=19)
    if loss:
        n.label = L.Input(shape={"dim": [batch, 1, size, size]})
        n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param={"ignore_label": 255,
                                                                "normalize": False})
    return n.to_proto()


def fcn8s(batch: int = 1, size: int = 500, num_classes: int = 21, width: int = 1,
          loss: bool = False) -> Any:
    """FCN-8s: FCN-32s' trunk, ×2 upsampling fused with scaled pool4 and pool3 scores (Scale
    by 0.01 and 0.0001, Crop offsets 5 and 9, Eltwise sums), then ×8 upsampling and a Crop
    (offset 31) to the input: score (N,21,H,W)."""
    n = net_spec.NetSpec()
    data = _data(n, batch, 3, size)
    pools = _fcn_trunk(n, data, width)
    n.score_fr = L.Convolution(n.fc7, num_output=num_classes, kernel_size=1)
    n.upscore2 = _upsample(n.score_fr, num_classes, 2)
    n.scale_pool4 = L.Scale(pools[4], filler={"type": "constant", "value": 0.01},
                            param=[{"lr_mult": 0}])
    n.score_pool4 = L.Convolution(n.scale_pool4, num_output=num_classes, kernel_size=1)
    n.score_pool4c = L.Crop(n.score_pool4, n.upscore2, axis=2, offset=5)
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=P.Eltwise.SUM)
    n.upscore_pool4 = _upsample(n.fuse_pool4, num_classes, 2)
    n.scale_pool3 = L.Scale(pools[3], filler={"type": "constant", "value": 0.0001},
                            param=[{"lr_mult": 0}])
    n.score_pool3 = L.Convolution(n.scale_pool3, num_output=num_classes, kernel_size=1)
    n.score_pool3c = L.Crop(n.score_pool3, n.upscore_pool4, axis=2, offset=9)
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=P.Eltwise.SUM)
    n.upscore8 = _upsample(n.fuse_pool3, num_classes, 8)
    n.score = L.Crop(n.upscore8, data, axis=2, offset=31)
    if loss:
        n.label = L.Input(shape={"dim": [batch, 1, size, size]})
        n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param={"ignore_label": 255,
                                                                "normalize": False})
    return n.to_proto()


# -- GoogLeNet (BVLC's bvlc_googlenet deploy) ---

_INCEPTION = {  # name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128)}


def _conv_relu(n: Any, bottom: Any, name: str, num_output: int, kernel: int, stride: int = 1,
               pad: int = 0) -> Any:
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride,
                            pad=pad, weight_filler=_XAVIER,
                            bias_filler={"type": "constant", "value": 0.2})
    n[f"{name.rsplit('/', 1)[0]}/relu_{name.rsplit('/', 1)[1]}"] = L.ReLU(n[name], in_place=True)
    return n[name]


def _inception(n: Any, bottom: Any, name: str) -> Any:
    c1, r3, c3, r5, c5, pp = _INCEPTION[name]
    p = f"inception_{name}"
    b1 = _conv_relu(n, bottom, f"{p}/1x1", c1, 1)
    b3 = _conv_relu(n, _conv_relu(n, bottom, f"{p}/3x3_reduce", r3, 1), f"{p}/3x3", c3, 3, pad=1)
    b5 = _conv_relu(n, _conv_relu(n, bottom, f"{p}/5x5_reduce", r5, 1), f"{p}/5x5", c5, 5, pad=2)
    n[f"{p}/pool"] = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=3, stride=1, pad=1)
    bp = _conv_relu(n, n[f"{p}/pool"], f"{p}/pool_proj", pp, 1)
    n[f"{p}/output"] = L.Concat(b1, b3, b5, bp)
    return n[f"{p}/output"]


def googlenet(batch: int = 1, size: int = 224, num_classes: int = 1000,
              loss: bool = False) -> Any:
    """GoogLeNet (deploy form, no auxiliary heads): conv1 7×7/2, pool, LRN, conv2, LRN, pool,
    nine inception modules (Concat of 1×1, 3×3, 5×5 and pool-projection branches) with max
    pools after 3b and 4e, pool5 7×7 average, dropout 0.4, loss3/classifier.
    Shapes (size 224): inception_3b (N,480,28,28), inception_4e (N,832,14,14),
    inception_5b (N,1024,7,7), pool5/7x7_s1 (N,1024,1,1)."""
    n = net_spec.NetSpec()
    x = _conv_relu(n, _data(n, batch, 3, size), "conv1/7x7_s2", 64, 7, 2, 3)
    n["pool1/3x3_s2"] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n["pool1/norm1"] = L.LRN(n["pool1/3x3_s2"], local_size=5, alpha=0.0001, beta=0.75)
    x = _conv_relu(n, n["pool1/norm1"], "conv2/3x3_reduce", 64, 1)
    x = _conv_relu(n, x, "conv2/3x3", 192, 3, pad=1)
    n["conv2/norm2"] = L.LRN(x, local_size=5, alpha=0.0001, beta=0.75)
    n["pool2/3x3_s2"] = L.Pooling(n["conv2/norm2"], pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = n["pool2/3x3_s2"]
    for name in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"):
        x = _inception(n, x, name)
        if name in ("3b", "4e"):
            pool = f"pool{name[0]}/3x3_s2"
            n[pool] = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
            x = n[pool]
    n["pool5/7x7_s1"] = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    n["pool5/drop_7x7_s1"] = L.Dropout(n["pool5/7x7_s1"], dropout_ratio=0.4, in_place=True)
    n["loss3/classifier"] = L.InnerProduct(n["pool5/7x7_s1"], num_output=num_classes,
                                           weight_filler=_XAVIER, bias_filler=_CONST0)
    _head(n, n["loss3/classifier"], batch, num_classes, loss)
    return n.to_proto()


# -- CaffeNet (bvlc_reference_caffenet deploy) ---

def caffenet(batch: int = 1, size: int = 227, num_classes: int = 1000, width: int = 1,
             loss: bool = False) -> Any:
    """CaffeNet: conv1 11×11/4 (96), pool, LRN, conv2 5×5 group 2 (256), pool, LRN, conv3 (384),
    conv4 group 2 (384), conv5 group 2 (256), pool5, fc6/fc7 (4096, dropout), fc8.
    Shapes (size 227): conv1 (N,96,55,55), pool2 (N,256,13,13), pool5 (N,256,6,6), fc8 (N,1000).
    ``width`` divides every channel count (1 = the deploy file's)."""
    n = net_spec.NetSpec()
    data = _data(n, batch, 3, size)
    w = width
    # train_val's fillers: N(0, 0.01) convolutions, N(0, 0.005) fc6/fc7, biases 0 or 1
    g01, g005 = {"type": "gaussian", "std": 0.01}, {"type": "gaussian", "std": 0.005}
    b0, b1 = _CONST0, {"type": "constant", "value": 1}
    n.conv1 = L.Convolution(data, num_output=96 // w, kernel_size=11, stride=4,
                            weight_filler=g01, bias_filler=b0)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm1 = L.LRN(n.pool1, local_size=5, alpha=0.0001, beta=0.75)
    n.conv2 = L.Convolution(n.norm1, num_output=256 // w, pad=2, kernel_size=5, group=2,
                            weight_filler=g01, bias_filler=b1)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.norm2 = L.LRN(n.pool2, local_size=5, alpha=0.0001, beta=0.75)
    n.conv3 = L.Convolution(n.norm2, num_output=384 // w, pad=1, kernel_size=3,
                            weight_filler=g01, bias_filler=b0)
    n.relu3 = L.ReLU(n.conv3, in_place=True)
    n.conv4 = L.Convolution(n.conv3, num_output=384 // w, pad=1, kernel_size=3, group=2,
                            weight_filler=g01, bias_filler=b1)
    n.relu4 = L.ReLU(n.conv4, in_place=True)
    n.conv5 = L.Convolution(n.conv4, num_output=256 // w, pad=1, kernel_size=3, group=2,
                            weight_filler=g01, bias_filler=b1)
    n.relu5 = L.ReLU(n.conv5, in_place=True)
    n.pool5 = L.Pooling(n.conv5, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.fc6 = L.InnerProduct(n.pool5, num_output=4096 // w, weight_filler=g005,
                           bias_filler=b1)
    n.relu6 = L.ReLU(n.fc6, in_place=True)
    n.drop6 = L.Dropout(n.fc6, dropout_ratio=0.5, in_place=True)
    n.fc7 = L.InnerProduct(n.fc6, num_output=4096 // w, weight_filler=g005,
                           bias_filler=b1)
    n.relu7 = L.ReLU(n.fc7, in_place=True)
    n.drop7 = L.Dropout(n.fc7, dropout_ratio=0.5, in_place=True)
    n.fc8 = L.InnerProduct(n.fc7, num_output=num_classes, weight_filler=g01,
                           bias_filler=b0)
    _head(n, n.fc8, batch, num_classes, loss)
    return n.to_proto()


# -- Siamese LeNet with ContrastiveLoss (BVLC's mnist_siamese example, re-built) ---

def siamese_lenet(batch: int = 4, size: int = 28) -> Any:
    """Two LeNet towers with shared weights (ParamSpec names conv1_w, conv1_b, ...) on a pair
    slice of a 2-channel input, a 2-D feature each, and ContrastiveLoss (margin 1) on them.
    Shapes: pair_data (N,2,28,28) -> data, data_p (N,1,28,28) -> feat, feat_p (N,2)."""
    n = net_spec.NetSpec()
    n.pair_data = L.Input(shape={"dim": [batch, 2, size, size]})
    n.sim = L.Input(shape={"dim": [batch]})
    n.data, n.data_p = L.Slice(n.pair_data, slice_point=1, ntop=2)

    def tower(x: Any, suffix: str) -> Any:
        def shared(name: str) -> list[dict]:
            return [{"name": f"{name}_w", "lr_mult": 1}, {"name": f"{name}_b", "lr_mult": 2}]
        n[f"conv1{suffix}"] = L.Convolution(x, num_output=20, kernel_size=5,
                                            weight_filler=_XAVIER, param=shared("conv1"))
        n[f"pool1{suffix}"] = L.Pooling(n[f"conv1{suffix}"], pool=P.Pooling.MAX, kernel_size=2,
                                        stride=2)
        n[f"conv2{suffix}"] = L.Convolution(n[f"pool1{suffix}"], num_output=50, kernel_size=5,
                                            weight_filler=_XAVIER, param=shared("conv2"))
        n[f"pool2{suffix}"] = L.Pooling(n[f"conv2{suffix}"], pool=P.Pooling.MAX, kernel_size=2,
                                        stride=2)
        n[f"ip1{suffix}"] = L.InnerProduct(n[f"pool2{suffix}"], num_output=500,
                                           weight_filler=_XAVIER, param=shared("ip1"))
        n[f"relu1{suffix}"] = L.ReLU(n[f"ip1{suffix}"], in_place=True)
        n[f"ip2{suffix}"] = L.InnerProduct(n[f"ip1{suffix}"], num_output=10,
                                           weight_filler=_XAVIER, param=shared("ip2"))
        n[f"feat{suffix}"] = L.InnerProduct(n[f"ip2{suffix}"], num_output=2,
                                            weight_filler=_XAVIER, param=shared("feat"))
        return n[f"feat{suffix}"]

    feat, feat_p = tower(n.data, ""), tower(n.data_p, "_p")
    n.loss = L.ContrastiveLoss(feat, feat_p, n.sim, margin=1.0)
    return n.to_proto()


# -- An LSTM sequence model (the shape of BVLC's captioning nets, text only) ---

def lstm_language_model(time_steps: int = 5, batch: int = 3, vocab: int = 20,
                        hidden: int = 16) -> Any:
    """Word indices (T,N) -> Embed (T,N,H) -> LSTM with cont (T,N) -> InnerProduct on axis 2
    (T,N,V) -> SoftmaxWithLoss over axis 2 against targets (T,N)."""
    n = net_spec.NetSpec()
    n.input_sentence = L.Input(shape={"dim": [time_steps, batch]})
    n.cont_sentence = L.Input(shape={"dim": [time_steps, batch]})
    n.target_sentence = L.Input(shape={"dim": [time_steps, batch]})
    n.embedded_input_sentence = L.Embed(
        n.input_sentence, input_dim=vocab, num_output=hidden, bias_term=False,
        weight_filler={"type": "uniform", "min": -0.08, "max": 0.08})
    n.lstm1 = L.LSTM(n.embedded_input_sentence, n.cont_sentence, recurrent_param={
        "num_output": hidden, "weight_filler": {"type": "uniform", "min": -0.08, "max": 0.08},
        "bias_filler": {"type": "constant", "value": 0}})
    n.predict = L.InnerProduct(n.lstm1, num_output=vocab, axis=2,
                               weight_filler={"type": "uniform", "min": -0.08, "max": 0.08})
    n.cross_entropy_loss = L.SoftmaxWithLoss(n.predict, n.target_sentence,
                                             loss_param={"ignore_label": -1}, softmax_param={
                                                 "axis": 2})
    return n.to_proto()


NETS = {
    "resnet50": resnet50, "squeezenet_v11": squeezenet_v11, "mobilenet_v1": mobilenet_v1,
    "densenet121": densenet121, "fcn32s": fcn32s, "fcn8s": fcn8s, "googlenet": googlenet,
    "caffenet": caffenet, "siamese_lenet": siamese_lenet,
    "lstm_language_model": lstm_language_model,
}
