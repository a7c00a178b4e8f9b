"""What the fuzz suite found, each as its minimal input: a located PycaffeError, no traceback
of another type, no runaway thread or allocation."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import harness
import pytest

from pycaffe_mpi import errors, solvers
from pycaffe_mpi.net import Net

NET = """name: "tiny"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 4 } }
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "net.prototxt") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_non_utf8_prototxt_is_a_located_prototxt_error(tmp_path: Path):
    path = _write(tmp_path, NET.encode().replace(b'"tiny"', b'"ti\xffny"'))
    with pytest.raises(errors.PrototxtError, match=rf"{path}:1:10: byte 0xff is not UTF-8"):
        Net(str(path), 0)


def test_non_utf8_solver_is_a_located_prototxt_error(tmp_path: Path):
    path = _write(tmp_path, b'base_lr: 0.1\nnet: "caf\xe9.prototxt"\n', "solver.prototxt")
    with pytest.raises(errors.PrototxtError, match=rf"{path}:2:10: byte 0xe9"):
        solvers.Solver(str(path))


def test_non_utf8_bytes_in_comments_are_read_as_caffe_reads_them(tmp_path: Path):
    # Caffe's parser skips a comment's bytes; a '#' inside quotes starts no comment
    net = _write(tmp_path, b"# r\xe9seau de caf\xe9\n" + NET.encode().replace(
        b'"tiny"', b'"tiny#1" # \xff\xfe "'))
    solver = _write(tmp_path, f'net: "{net}" # caf\xe9\r\nbase_lr: 0.1 # \xe9'.encode(
        "latin-1"), "solver.prototxt")
    s = solvers.Solver(str(solver))
    assert s.net.name == "tiny#1" and s.param.base_lr == pytest.approx(0.1)


def test_singular_field_written_twice_is_refused(tmp_path: Path):
    path = _write(tmp_path, NET.replace("num_output: 4", "num_output: 4 num_output: 8"))
    with pytest.raises(errors.PrototxtError, match=rf'{path}:4:\d+ .*multiple "num_output"'):
        Net(str(path), 0)


def test_singular_message_written_twice_is_refused(tmp_path: Path):
    text = NET.replace("inner_product_param { num_output: 4 }",
                       "inner_product_param { num_output: 4 } "
                       "inner_product_param { bias_term: false }")
    with pytest.raises(errors.PrototxtError, match='multiple "inner_product_param"'):
        Net(str(_write(tmp_path, text)), 0)


def test_repeated_fields_still_repeat(tmp_path: Path):
    text = NET.replace('top: "y"', 'top: "y" loss_weight: 1')
    net = Net(str(_write(tmp_path, text)), 0)
    assert net.blob_loss_weights["y"] == 1


def test_solver_check_names_the_solver_file_and_line(tmp_path: Path):
    net = _write(tmp_path, NET)
    path = _write(tmp_path, f'net: "{net}"\ntest_iter: 1\ntest_interval: 0\nbase_lr: 0.1\n',
                  "solver.prototxt")
    with pytest.raises(errors.SolverError, match=rf"^{path}:3: test_interval must be > 0"):
        solvers.Solver(str(path))


def test_solver_without_a_net_names_the_solver_file(tmp_path: Path):
    path = _write(tmp_path, "base_lr: 0.1\n", "solver.prototxt")
    with pytest.raises(errors.SolverError, match=rf"^{path}: SolverParameter must specify"):
        solvers.Solver(str(path))


def test_unreadable_net_file_names_the_solver_line(tmp_path: Path):
    path = _write(tmp_path, 'base_lr: 0.1\nnet: "no/such.prototxt"\n', "solver.prototxt")
    with pytest.raises(errors.PrototxtError,
                       match=rf"^{path}:2: cannot read no/such.prototxt"):
        solvers.Solver(str(path))


def test_solver_error_during_solve_names_the_solver_file(tmp_path: Path):
    """An unknown lr_policy is found at the first step (as in Caffe), after set-up."""
    net = _write(tmp_path, NET.replace("inner_product_param", 'loss_weight: 1 '
                                       "inner_product_param"))
    path = _write(tmp_path, f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "bogus"\nmax_iter: 1\n'
                  "snapshot_after_train: false\n", "solver.prototxt")
    solver = solvers.Solver(str(path))
    with pytest.raises(errors.SolverError, match=rf'^{path}:3: Unknown learning rate policy'):
        solver.solve()


def test_cli_solver_error_names_the_solver_file(tmp_path: Path):
    path = _write(tmp_path, "base_lr: 0.1\n", "solver.prototxt")
    code, err = harness.run_cli(["train", "--solver", str(path)])
    assert code == 1
    assert f"error: {path}: SolverParameter must specify" in err


def test_duplicate_layer_name_gives_file_and_line(tmp_path: Path):
    text = NET + 'layer { name: "ip" type: "ReLU" bottom: "y" top: "y" }\n'
    path = _write(tmp_path, text)
    with pytest.raises(errors.NetError, match=rf'{path}:5: layer "ip" \(type ReLU\).*duplicate '
                                              rf'layer name "ip".*{path}:3'):
        Net(str(path), 0)


def test_blob_over_int_max_names_the_layer(tmp_path: Path):
    path = _write(tmp_path, NET.replace("dim: 2 dim: 3", "dim: 2147483648 dim: 3"))
    with pytest.raises(errors.ShapeError, match=rf'{path}:2: layer "in".*exceeds INT_MAX'):
        Net(str(path), 0)


def _prefetchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pycaffe-data-prefetch"]


def _settle(before: int) -> int:
    for _ in range(50):
        if len(_prefetchers()) <= before:
            break
        time.sleep(0.02)
    return len(_prefetchers())


def test_huge_data_batch_fails_before_reading(tmp_path: Path):
    """batch_size: 2147483647 used to start the prefetch thread before the shape check, which
    then read records without end in the background."""
    data = harness.make_data(tmp_path)
    text = harness.localise_net((harness.ROOT / "models/cifar10_quick/train_test.prototxt")
                                .read_text(), data).replace("batch_size: 2", "batch_size: "
                                                            "2147483647", 1)
    path = _write(tmp_path, text)
    before = len(_prefetchers())
    with harness.limits(), pytest.raises(errors.ShapeError,
                                         match=rf'{path}:\d+: layer "cifar".*INT_MAX'):
        Net(str(path), 0)
    assert _settle(before) == before


def test_failed_net_stops_the_prefetch_threads_it_started(tmp_path: Path):
    data = harness.make_data(tmp_path)
    text = harness.localise_net((harness.ROOT / "models/cifar10_quick/train_test.prototxt")
                                .read_text(), data)
    path = _write(tmp_path, text.replace('bottom: "pool3"', 'bottom: "missing"'))
    before = len(_prefetchers())
    with pytest.raises(errors.NetError, match="missing"):
        Net(str(path), 0)
    assert _settle(before) == before


def test_python_layer_without_module_names_file_and_line(tmp_path: Path):
    text = NET + 'layer { name: "py" type: "Python" bottom: "y" top: "z" }\n'
    path = _write(tmp_path, text)
    with pytest.raises(errors.NetError, match=rf'{path}:5: layer "py" \(type Python\), field '
                                              "python_param.module"):
        Net(str(path), 0)


def test_nul_byte_in_a_net_path_is_a_prototxt_error(tmp_path: Path):
    path = _write(tmp_path, b'net: "a\x00b.prototxt"\n', "solver.prototxt")
    with pytest.raises(errors.PrototxtError, match=rf"^{path}: cannot read 'a\\x00b"):
        solvers.Solver(str(path))


QUICK = """name: "q"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "x" top: "p"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
"""


def _forward_backward(path: Path) -> None:
    net = Net(str(path), 0)
    net.forward()
    net.backward()


def test_pooling_huge_stride_runs_or_names_the_layer(tmp_path: Path):
    """A stride far past the input made AVE pooling ask NumPy for a stride² work buffer:
    a raw ValueError ("Maximum allowed dimension exceeded") in forward. Now it runs (as in
    Caffe) or, where a kernel needs that buffer, is a ShapeError naming the layer."""
    path = _write(tmp_path, "force_backward: true\n" +
                  QUICK.replace("stride: 2", "stride: 2147483647"))
    error = harness.expect_clean(_forward_backward, path)
    assert error is None or (isinstance(error, errors.ShapeError) and
                             f'{path}:4: layer "pool"' in str(error)), error


def test_lrn_huge_local_size_names_the_layer(tmp_path: Path):
    """local_size: 4294967295 made LRN ask NumPy for 8 TiB in forward: a raw MemoryError."""
    text = QUICK.replace('type: "Pooling"', 'type: "LRN" lrn_param { local_size: 4294967295 }')
    path = _write(tmp_path, text.replace("pooling_param { pool: AVE kernel_size: 3 stride: 2 }",
                                         ""))
    with harness.limits(), pytest.raises(errors.ShapeError,
                                         match=rf'{path}:3: layer "pool" \(type LRN\)'):
        Net(str(path), 0).forward()


def test_backward_caffe_lacks_is_a_located_net_error(tmp_path: Path):
    """STOCHASTIC pooling has no TEST-phase backward (as in Caffe): through the Net that is a
    NetError naming the layer, not a bare NotImplementedError."""
    text = "force_backward: true\n" + QUICK.replace("pool: AVE", "pool: STOCHASTIC")
    path = _write(tmp_path, text)
    net = Net(str(path), 1)
    net.forward()
    with pytest.raises(errors.NetError, match=rf'{path}:4: layer "pool".*no backward'):
        net.backward()


def test_data_layer_errors_give_file_and_line(tmp_path: Path):
    """Layers name themselves in their errors but do not know their line; the Net adds it."""
    data = harness.make_data(tmp_path)
    text = harness.localise_net((harness.ROOT / "models/cifar10_quick/train_test.prototxt")
                                .read_text(), data)
    path = _write(tmp_path, text.replace(f'source: "{data / "db"}"', 'source: "nowhere"', 1))
    with pytest.raises(errors.DataError, match=rf'^{path}:4: layer "cifar" \(type Data\), '
                                               "field data_param.source"):
        Net(str(path), 0)


EMPTY = """force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 0 dim: 3 dim: 8 dim: 8 } } }
layer { name: "l" type: "%s" bottom: "x" top: "y" %s }
"""


@pytest.mark.parametrize(("type_", "params"), [
    ("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }"),
    ("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
    ("BatchNorm", ""),
    ("ArgMax", ""),
])
def test_empty_batch_is_a_located_shape_error(type_: str, params: str, tmp_path: Path):
    """``dim: 0`` (Caffe runs an empty batch as a no-op) used to end in raw ValueErrors and
    IndexErrors from the kernels: a layer runs it or says it cannot, naming itself."""
    path = _write(tmp_path, EMPTY % (type_, params))
    error = harness.expect_clean(_forward_backward, path)
    assert error is None or (isinstance(error, errors.ShapeError) and
                             re.search(rf'{path}:3: layer "l".*empty bottom', str(error))), error


@pytest.mark.parametrize(("type_", "params"), [
    ("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
    ("Im2col", "convolution_param { kernel_size: 3 }"),
    ("InnerProduct", "inner_product_param { num_output: 4 }"),
])
def test_in_place_layer_that_changes_the_shape_is_refused(type_: str, params: str,
                                                          tmp_path: Path):
    """A top named like its bottom on a pooling layer used to fail in forward with a raw
    ValueError (the layer read its input through the output's shape)."""
    text = (EMPTY % (type_, params)).replace("dim: 0", "dim: 2").replace('top: "y"', 'top: "x"')
    path = _write(tmp_path, text)
    with pytest.raises(errors.NetError, match=rf'{path}:3: layer "l".*in place would change '
                                              r'blob "x" from \(2, 3, 8, 8\)'):
        Net(str(path), 0)


def test_in_place_layers_that_keep_the_shape_still_work(tmp_path: Path):
    text = (EMPTY % ("ReLU", "")).replace("dim: 0", "dim: 2").replace('top: "y"', 'top: "x"')
    net = Net(str(_write(tmp_path, text)), 0)
    assert net.forward()["x"].shape == (2, 3, 8, 8)


V0 = """name: "v0"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 } bottom: "data"
  top: "conv1" }
layers { layer { name: "ip" type: "Silence" } bottom: "conv1" top: "ip" }
"""


def test_v0_upgrade_error_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path, V0)
    with pytest.raises(errors.PrototxtError, match=rf'^{path}:6: layer "ip": Unknown layer '
                                                   "name: Silence"):
        Net(str(path), 0)


def test_v1_upgrade_error_names_the_file(tmp_path: Path):
    text = 'layers { name: "a" type: RELU }\nlayer { name: "b" type: "ReLU" }\n'
    path = _write(tmp_path, text)
    with pytest.raises(errors.PrototxtError, match=rf"^{path}: Refusing to upgrade"):
        Net(str(path), 0)


def test_input_field_layer_errors_name_the_file(tmp_path: Path):
    """The Input layer made from ``input``/``input_dim`` fields has no line of its own."""
    text = 'input: "data"\ninput_dim: -2 input_dim: 3 input_dim: 8 input_dim: 8\n'
    path = _write(tmp_path, text)
    with pytest.raises(errors.ShapeError, match=rf'^{path}: layer "input" \(type Input\)'):
        Net(str(path), 0)


def _tiny_solver(tmp_path: Path, extra: str) -> Path:
    net = _write(tmp_path, NET.replace("inner_product_param", "loss_weight: 1 "
                                       "inner_product_param"))
    return _write(tmp_path, f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n'
                  f"snapshot_after_train: false\n{extra}\n", "solver.prototxt")


@pytest.mark.parametrize("extra", ["momentum2: 2", "momentum: 1", "momentum2: nan"])
def test_adam_betas_out_of_range_are_a_solver_error(extra: str, tmp_path: Path):
    """momentum2: 2 used to end the first Adam step in a raw "math domain error"."""
    path = _tiny_solver(tmp_path, f'type: "Adam"\n{extra}')
    with pytest.raises(errors.SolverError, match=rf"^{path}:\d+: Adam needs 0 <= momentum"):
        solvers.Solver(str(path)).solve()


def test_missing_solver_weights_name_the_solver_line(tmp_path: Path):
    path = _tiny_solver(tmp_path, 'weights: "/no/such.caffemodel"')
    with pytest.raises(errors.DataError, match=rf"^{path}:6: .*/no/such.caffemodel"):
        solvers.Solver(str(path))


def test_prefetcher_stopped_from_its_own_thread_ends_quietly(tmp_path: Path, monkeypatch):
    """A GC pass on the prefetch thread ran the layer's finalizer there: "Exception ignored
    ... RuntimeError: cannot join current thread", and the database stayed open."""
    import queue

    from pycaffe_mpi.datasets import db as dbm

    data = harness.make_data(tmp_path)
    text = harness.localise_net((harness.ROOT / "models/cifar10_quick/train_test.prototxt")
                                .read_text(), data)
    net = Net(str(_write(tmp_path, text)), 0)
    prefetcher = net.layer_dict["cifar"]._prefetcher
    read = prefetcher._batch

    def collected_while_reading(records):
        prefetcher.stop()  # what the finalizer does when the GC runs on this thread
        return read(records)

    monkeypatch.setattr(prefetcher, "_batch", collected_while_reading)
    items = []
    for _ in range(200):  # drain, so the thread reads again
        try:
            items.append(prefetcher.queue.get(timeout=0.05))
        except queue.Empty:
            if not prefetcher.thread.is_alive():
                break
    assert not prefetcher.thread.is_alive()
    assert not any(type(x).__name__ == "_Failure" for x in items), items  # no error raised
    assert all(entry[0] is not prefetcher.env for entry in dbm.SharedDB._open.values())
    net.layer_dict["cifar"]._prefetcher = None  # stopped already
    net.close()
