"""Train a small NumPy MLP on the digits data set, with and without batch norm.

The network is written out in plain NumPy (linear layers, ReLU, softmax
cross-entropy, mini-batch SGD without momentum or weight decay); the only
layer taken from a library is ``bncore.BatchNorm1d``, inserted as
``Linear -> BatchNorm1d -> ReLU`` in every hidden layer of the second
variant. Both variants start from the same weights and see the same
mini-batches at each learning rate, so the curves differ only by the batch
norm layers.

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
classes, no download), split 75/25 stratified with a fixed seed, pixels
standardised with the training set's statistics.

A run *converges* when, after the last epoch,

* its training loss (the mean over that epoch's mini-batches) is finite and
  below ``LOSS_FRACTION * ln(10)``, a tenth of the loss of guessing the ten
  classes uniformly, and
* its test accuracy is at least ``MIN_ACCURACY`` (90 %).

The report names, for each variant, the highest learning rate of the sweep
at which the run converges.

Usage::

    python examples/train_mlp.py [--epochs N] [--lrs LR ...] [--plot PATH]
                                 [--no-plot] [--json PATH] [--seed S]

Needs the ``examples`` extra: ``pip install -e ".[examples]"``.
"""

import argparse
import importlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import bncore

HIDDEN = (64, 64)  # two hidden layers; the default sweep runs in seconds on 2 cores
BATCH_SIZE = 32
DEFAULT_EPOCHS = 20
DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SPLIT_SEED = 0  # the train/test split never changes; --seed varies weights and batch order
N_CLASSES = 10

# Convergence criterion (see the module docstring).
LOSS_FRACTION = 0.1
LOSS_THRESHOLD = LOSS_FRACTION * math.log(N_CLASSES)  # 0.230
MIN_ACCURACY = 0.9

HERE = Path(__file__).resolve().parent


def require(module):
    """Import an optional dependency, or exit saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        sys.exit(
            f"{Path(__file__).name} needs {package}, which is not installed; "
            f'install the examples extra: pip install -e ".[examples]"'
        )


# -- data ------------------------------------------------------------------


def load_data():
    """(X_train, y_train, X_test, y_test): float32 standardised pixels, int labels."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    X, y = datasets.load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = model_selection.train_test_split(
        X, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y
    )
    # Statistics from the training set only, so nothing leaks from the test
    # set. Border pixels are always 0 there: give them std 1, not 0/0.
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    std[std == 0] = 1.0
    X_train, X_test = ((a - mean) / std for a in (X_train, X_test))
    return X_train.astype(np.float32), y_train, X_test.astype(np.float32), y_test


# -- the network -------------------------------------------------------------
# Every layer has forward(x) and backward(grad_output) -> grad_input; layers
# with parameters name them weight/bias and their gradients grad_weight/
# grad_bias, as bncore.BatchNorm1d does, so one SGD step serves all layers.


class Linear:
    """Affine layer ``y = x @ weight + bias`` with weight of shape (n_in, n_out)."""

    def __init__(self, n_in, n_out, rng):
        # He et al. (2015): std sqrt(2 / n_in) keeps the activations' variance
        # constant through ReLUs, so the plain network trains from the start.
        self.weight = (rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)).astype(
            np.float32
        )
        self.bias = np.zeros(n_out, np.float32)

    def forward(self, x):
        self.x = x  # kept for the weight gradient
        return x @ self.weight + self.bias

    def backward(self, grad_output):
        self.grad_weight = self.x.T @ grad_output
        self.grad_bias = grad_output.sum(axis=0)
        return grad_output @ self.weight.T


class ReLU:
    """max(x, 0), remembering where x > 0 for the backward pass."""

    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, grad_output):
        return grad_output * self.positive


def build_mlp(sizes, batchnorm, rng):
    """Linear [-> BatchNorm1d] -> ReLU for each hidden layer, then a Linear to the logits."""
    *hidden, output = itertools.pairwise(sizes)
    layers = []
    for n_in, n_out in hidden:
        # The Linear keeps its bias even before BatchNorm1d (which subtracts
        # it again, so it gets no gradient): the variants then differ only
        # by the inserted layers.
        layers.append(Linear(n_in, n_out, rng))
        if batchnorm:
            layers.append(bncore.BatchNorm1d(n_out))
        layers.append(ReLU())
    # BatchNorm1d draws no random numbers, so both variants get the same
    # Linear weights from the same seed.
    layers.append(Linear(*output, rng))
    return layers


def forward(layers, x):
    for layer in layers:
        x = layer.forward(x)
    return x


def backward(layers, grad):
    for layer in reversed(layers):
        grad = layer.backward(grad)


def sgd_step(layers, lr):
    for layer in layers:
        if hasattr(layer, "weight"):
            # In place: the arrays stay float32 and stay the ones the layer reads.
            layer.weight -= lr * layer.grad_weight
            layer.bias -= lr * layer.grad_bias


def set_training(layers, mode):
    """Batch statistics while training, running statistics for evaluation."""
    for layer in layers:
        if isinstance(layer, bncore.BatchNorm):
            layer.train(mode)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the batch, and its gradient wrt the logits."""
    z = logits - logits.max(axis=1, keepdims=True)  # shift so exp() cannot overflow
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_p[rows, labels].mean()
    grad = np.exp(log_p)
    grad[rows, labels] -= 1.0
    return float(loss), grad / len(labels)


# -- training ----------------------------------------------------------------


def train(data, lr, batchnorm, epochs, seed, hidden=HIDDEN, batch_size=BATCH_SIZE):
    """Train one configuration; returns {"train_loss": [...], "test_acc": [...]}.

    ``train_loss[e]`` is the mean mini-batch loss during epoch e and
    ``test_acc[e]`` the test accuracy after it (batch norm in eval mode).
    A run whose loss becomes non-finite has diverged: it stops, and its
    remaining epochs are NaN.
    """
    X_train, y_train, X_test, y_test = data
    rng = np.random.default_rng(seed)  # same stream, same draws for both variants
    layers = build_mlp((X_train.shape[1], *hidden, N_CLASSES), batchnorm, rng)
    # Drop the ragged last batch: a batch norm step on a handful of samples
    # has noisy statistics (and one sample per channel is an error).
    n_batches = len(X_train) // batch_size
    history = {"train_loss": [math.nan] * epochs, "test_acc": [math.nan] * epochs}
    for epoch in range(epochs):
        set_training(layers, True)
        order = rng.permutation(len(X_train))
        losses = []
        for b in range(n_batches):
            batch = order[b * batch_size : (b + 1) * batch_size]
            loss, grad = cross_entropy(forward(layers, X_train[batch]), y_train[batch])
            if not math.isfinite(loss):
                return history  # diverged
            losses.append(loss)
            backward(layers, grad)
            sgd_step(layers, lr)
        set_training(layers, False)
        predicted = forward(layers, X_test).argmax(axis=1)
        history["train_loss"][epoch] = float(np.mean(losses))
        history["test_acc"][epoch] = float(np.mean(predicted == y_test))
    return history


def converged(history):
    """The convergence criterion of the module docstring."""
    loss, acc = history["train_loss"][-1], history["test_acc"][-1]
    return math.isfinite(loss) and loss < LOSS_THRESHOLD and acc >= MIN_ACCURACY


def outcome(history):
    """'converged', 'not converged' or 'diverged in epoch k', for the report."""
    if converged(history):
        return "converged"
    nan_epochs = [e for e, loss in enumerate(history["train_loss"], 1) if math.isnan(loss)]
    return f"diverged in epoch {nan_epochs[0]}" if nan_epochs else "not converged"


VARIANTS = {"plain": False, "batchnorm": True}


def sweep(data, lrs, epochs, seed):
    """{lr: {variant: history}} for every learning rate, printing each as it finishes."""
    results = {}
    for lr in lrs:
        results[lr] = {name: train(data, lr, bn, epochs, seed) for name, bn in VARIANTS.items()}
        print_epochs(lr, results[lr])
    return results


# -- report ------------------------------------------------------------------


def print_epochs(lr, runs):
    print(f"\nlr = {lr:g}")
    print("epoch  " + "".join(f"{name + ' loss':>16} {'test acc':>9}" for name in runs))
    for epoch in range(len(runs["plain"]["train_loss"])):
        cells = "".join(
            f"{h['train_loss'][epoch]:16.4f} {h['test_acc'][epoch]:9.3f}" for h in runs.values()
        )
        print(f"{epoch + 1:5d}  {cells}")


def highest_converging_lr(results, variant):
    ok = [lr for lr, runs in results.items() if converged(runs[variant])]
    return max(ok) if ok else None


def print_summary(results):
    print(f"\nfinal epoch (converged: loss < {LOSS_FRACTION:g} ln 10 = {LOSS_THRESHOLD:.3f}, "
          f"test acc >= {MIN_ACCURACY:g})")
    header = "".join(f"{name + ' loss':>16} {'acc':>6}  {'':20}" for name in VARIANTS)
    print(f"{'lr':>6}{header}".rstrip())
    for lr, runs in results.items():
        cells = "".join(
            f"{h['train_loss'][-1]:16.4f} {h['test_acc'][-1]:6.3f}  {outcome(h):20}"
            for h in runs.values()
        )
        print(f"{lr:6g}{cells}".rstrip())
    for variant in VARIANTS:
        best = highest_converging_lr(results, variant)
        print(f"highest converging lr, {variant}: {'none' if best is None else f'{best:g}'}")


def write_json(path, results, args):
    def finite_or_none(values):  # NaN is not valid JSON
        return [v if math.isfinite(v) else None for v in values]

    report = {
        "settings": {
            "epochs": args.epochs, "lrs": list(results), "seed": args.seed,
            "hidden": list(HIDDEN), "batch_size": BATCH_SIZE, "split_seed": SPLIT_SEED,
        },
        "convergence": {
            "max_final_train_loss": LOSS_THRESHOLD,
            "min_final_test_acc": MIN_ACCURACY,
        },
        "highest_converging_lr": {v: highest_converging_lr(results, v) for v in VARIANTS},
        "runs": [
            {
                "lr": lr, "variant": variant, "outcome": outcome(h),
                "train_loss": finite_or_none(h["train_loss"]),
                "test_acc": finite_or_none(h["test_acc"]),
            }
            for lr, runs in results.items()
            for variant, h in runs.items()
        ],
    }
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def plot(path, results):
    """One panel per learning rate, both variants, log-scaled loss."""
    figure_module = require("matplotlib.figure")  # no pyplot: no GUI backend needed
    ncols = min(4, len(results))
    nrows = math.ceil(len(results) / ncols)
    fig = figure_module.Figure(figsize=(4 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, (lr, runs) in zip(axes, results.items()):
        for (variant, h), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=True):
            epochs = np.arange(1, len(h["train_loss"]) + 1)
            label = f"{variant} ({outcome(h)})"
            ax.plot(epochs, h["train_loss"], marker=".", color=color, label=label)
        ax.axhline(LOSS_THRESHOLD, color="grey", ls=":", lw=1)
        ax.set(title=f"lr = {lr:g}", yscale="log", xlabel="epoch")
        ax.legend(fontsize="small")
    for ax in axes[::ncols]:
        ax.set_ylabel("training loss")
    for ax in axes[len(results):]:
        ax.set_visible(False)
    fig.suptitle("MLP on digits, with and without bncore.BatchNorm1d "
                 "(dotted: convergence threshold)")
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs per run")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                        help="learning rates to sweep")
    parser.add_argument("--plot", default=str(HERE / "train_mlp.png"), help="loss curves PNG")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (and matplotlib)")
    parser.add_argument("--json", default=str(HERE / "train_mlp.json"), help="per-epoch results")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not args.no_plot:
        require("matplotlib")  # fail now, not after the training

    start = time.perf_counter()
    # Divergence at high learning rates is an expected outcome here, not a
    # bug: silence NumPy's overflow warnings; train() records it as NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        results = sweep(load_data(), sorted(set(args.lrs)), args.epochs, args.seed)
    print_summary(results)
    write_json(args.json, results, args)
    print(f"\nwrote {args.json}")
    if not args.no_plot:
        plot(args.plot, results)
        print(f"wrote {args.plot}")
    print(f"{time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
