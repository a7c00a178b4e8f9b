"""Learning-curve and oracle-assignment figures, checked by reading the PNG back."""

from __future__ import annotations

import csv

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pycaffe_mpi import errors
from pycaffe_mpi.reports import assignment, plot, results

TAB10 = [tuple(int(255 * v) for v in matplotlib.colors.to_rgb(f"C{i}")) for i in range(10)]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _has_colour(img: np.ndarray, rgb: tuple[int, int, int], at_least: int = 30) -> bool:
    return int((np.abs(img.astype(int) - rgb).max(axis=2) <= 2).sum()) >= at_least


def _run(label: str, scale: float) -> plot.Run:
    train = [{"NumIters": i, "Seconds": i / 10, "LearningRate": 0.01, "loss": scale / (1 + i)}
             for i in range(0, 100, 10)]
    test = [{"NumIters": i, "Seconds": i / 10 + 0.5, "LearningRate": 0.01,
             "accuracy": 1 - scale / (2 + i), "loss": scale / (1 + i) + 0.1}
            for i in range(0, 100, 25)]
    return plot.Run(label, train, test)


def test_two_runs_one_figure(tmp_path):
    out = tmp_path / "curves" / "c.png"
    fig = plot.plot([_run("a", 2.0), _run("b", 1.0)], out)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy"]
    loss_ax, acc_ax = fig.axes
    # loss is in both tables of each run: train and test curve per run; accuracy: test only
    assert [ln.get_label() for ln in loss_ax.lines] == ["a (train)", "a (test)", "b (train)",
                                                        "b (test)"]
    assert [ln.get_label() for ln in acc_ax.lines] == ["a", "b"]
    img = _pixels(out)
    assert img.shape[:2] == (round((2.2 + 2.8 * 2) * 100), 900)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
    assert _has_colour(img, TAB10[0]) and _has_colour(img, TAB10[1])  # one colour per run
    assert not _has_colour(img, TAB10[2])


def test_seconds_and_chosen_outputs(tmp_path):
    fig = plot.plot([_run("a", 1.0)], tmp_path / "s.png", x="seconds", y=["accuracy"])
    (ax,) = fig.axes
    assert ax.get_xlabel() == "seconds"
    assert list(ax.lines[0].get_xdata()) == pytest.approx([0.5, 3.0, 5.5, 8.0])
    with pytest.raises(errors.PycaffeError, match=r"top5 not found.*accuracy, loss"):
        plot.plot([_run("a", 1.0)], tmp_path / "x.png", y=["top5"])
    with pytest.raises(errors.PycaffeError, match="x must be"):
        plot.plot([_run("a", 1.0)], tmp_path / "x.png", x="epochs")


def _ensemble_results(path, members: int = 3) -> None:
    with results.ResultsWriter(path) as w:
        for it in range(0, 50, 10):
            w.write_train(it, 0.001, it / 5, {"loss": 2.0 / (1 + it)})
            acc = [0.3 + 0.01 * it + 0.05 * m for m in range(members)]
            w.write_test(it, it / 5 + 1, {"ensemble_accuracy": max(acc) + 0.02,
                                          "oracle_accuracy": max(acc) + 0.2,
                                          "member_accuracy": acc})


def test_ensemble_run_mean_oracle_and_members(tmp_path):
    res = tmp_path / "mcl.jsonl"
    _ensemble_results(res)
    out = tmp_path / "e.png"
    assert plot.main([str(res), "-o", str(out), "--label", "mcl", "-y", "loss"]) == 0
    run = plot.load_run(res, "mcl")
    assert run.members() == [f"member_accuracy_{m}" for m in range(3)]
    # per-member outputs are left to the ensemble panel
    assert plot.default_outputs([run, _run("single", 1.0)]) == [
        "loss", "ensemble_accuracy", "oracle_accuracy", "accuracy"]
    fig = plot.plot([run, _run("single", 1.0)], out, y=["loss"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "mcl: ensemble accuracy"]
    labels = [ln.get_label() for ln in fig.axes[-1].lines]
    assert labels == ["member 0", "member 1", "member 2", "ensemble mean", "oracle"]
    img = _pixels(out)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def _cell_colours(fig, path, rows: int, cols: int) -> np.ndarray:
    """The colour near the left of each cell, read from the PNG (away from the value text)."""
    img = _pixels(path)
    box = fig.axes[0].get_window_extent()
    height = img.shape[0]
    out = np.zeros((rows, cols, 3), int)
    for m in range(rows):
        for c in range(cols):
            x = box.x0 + (c + 0.15) * box.width / cols
            y = box.y1 - (m + 0.5) * box.height / rows
            out[m, c] = img[int(height - y), int(x)]
    return out


def test_assignment_figure_and_csv(tmp_path):
    # 4 members x 10 classes, 40 values far enough apart to get 40 colours
    share = np.random.default_rng(5).permutation(np.linspace(0.01, 0.99, 40)).reshape(4, 10)
    labels = tmp_path / "labels.txt"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    labels.write_text("\n".join(names) + "\n\n")
    assert assignment.read_class_names(labels) == names
    csv_path, png_path = assignment.write_assignment(
        share, tmp_path / "out" / "mcl_iter_500_assignment", 500, names)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["member", *names]
    assert np.array([[float(v) for v in r[1:]] for r in rows[1:]]) == pytest.approx(share,
                                                                                    abs=5e-5)
    img = _pixels(png_path)
    assert img.shape[1] >= 800 and img.shape[0] >= 300  # readable, not 170 x 78
    fig = assignment.assignment_figure(share, 500, names)
    fig.savefig(tmp_path / "again.png")
    assert fig.axes[0].get_title() == "Oracle assignment at iteration 500"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names
    assert len(fig.axes) == 2  # the matrix and its colour bar
    assert len(fig.axes[0].texts) == 40  # every value written in its cell
    cells = _cell_colours(fig, tmp_path / "again.png", 4, 10)
    viridis = matplotlib.colormaps["viridis"]
    expected = np.array([[np.round(np.array(viridis(v)[:3]) * 255) for v in r] for r in share])
    assert np.abs(cells - expected).max() <= 3  # each cell has its own value's colour
    assert len({tuple(c) for c in cells.reshape(-1, 3)}) == 40


def test_assignment_without_names_and_errors(tmp_path):
    share = np.array([[0.75, np.nan], [0.25, 0.0]])
    csv_path, png_path = assignment.write_assignment(share, tmp_path / "a", 0)
    with open(csv_path) as f:
        assert f.read().splitlines() == ["member,0,1", "0,0.7500,nan", "1,0.2500,0.0000"]
    img = _pixels(png_path)
    assert img.shape[0] >= 300 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    with pytest.raises(errors.PycaffeError, match="3 class names for 2 classes"):
        assignment.write_assignment(share, tmp_path / "b", 0, ["a", "b", "c"])
    with pytest.raises(errors.PycaffeError, match="members x classes"):
        assignment.write_assignment(np.zeros(3), tmp_path / "b", 0)
    labels = tmp_path / "l.txt"
    labels.write_text("cat\ndog\n")
    csv_named, _ = assignment.write_assignment(share, tmp_path / "named", 3, labels)
    with open(csv_named) as f:
        assert f.readline().strip() == "member,cat,dog"
    out = tmp_path / "redrawn.png"
    assert assignment.main([csv_path, "-o", str(out), "--labels", str(labels)]) == 0
    assert _pixels(out).shape[0] >= 300


def test_assignment_many_classes_stays_a_page():
    share = np.random.default_rng(0).dirichlet(np.ones(8), size=100).T  # 8 members x 100 classes
    fig = assignment.assignment_figure(share, 1000)
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 2400 and height <= 1200
    assert not fig.axes[0].texts  # too small to write values in; the CSV has them
    assert len(fig.axes[0].get_xticklabels()) == 100
