"""Exact margins (``mip``) of small MLPs, every estimator's ratio to them, and margin brackets.

Models: an 8x8-digits MLP 64-32-32-10 and an MNIST MLP 784-64-64-10, each trained with the three
recipes of ``marginlab.training.recipes.RECIPES`` (standard; constraint = orthogonality penalty;
regularized = average margin + orthogonality, reference weights) by a short SGD loop (Nesterov, batch
128, one learning rate for every recipe so that the short runs compare like with like); then the
reference MNIST-CNN (``mnist-cnn``), briefly trained, for brackets only (no exact margins).

For ``--n`` test points (a seeded draw) and each norm: the exact margin (``mip``, box domain,
``--time-limit`` seconds per point, on the first ``--n-exact`` points) and, over the correctly classified
points solved exactly, each estimator's ratio ``|estimate| / |exact|`` (median, worst, share within 1%)
and time; then the bracket ratio ``|best| / |crown|`` (median over every correctly classified point).

    python benchmarks/bench_exact.py                                   # full run: 100 points, slow
    python benchmarks/bench_exact.py --n 20 --n-exact 8 --time-limit 15 --norms inf
"""

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from marginlab.data import load_dataset
from marginlab.estimators import ESTIMATORS, build_estimator
from marginlab.nets.models import MarginNet, build_model
from marginlab.training.recipes import RegularizerConfig, build_regularizers

RECIPES = ("standard", "constraint", "regularized")


def train(
    model: MarginNet,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: str,
    epochs: int,
    lr: float,
    adam: bool = False,
) -> float:
    """SGD (or Adam, for the one-epoch CNN) with the recipe's loss terms; returns the seconds taken."""
    name = "mnist-cnn" if adam else "mnist-mlp"  # the reference gamma: 40 for the CNN, 5 for the MLPs
    regs = build_regularizers(RegularizerConfig(recipe=recipe), model_name=name)
    if adam:
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            features = model.phi(x[idx])
            logits = model.head(features)
            loss = F.cross_entropy(logits, y[idx]) + sum(r(model, features, logits, y[idx]) for r in regs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def estimators_for(p: float) -> dict[str, list[str]]:
    """Attacks and the other estimators compared with the exact margin at norm ``p``."""
    attacks = ["deepfool", "ddn"] if p == 2.0 else ["deepfool", "fmn"]
    return {"attacks": attacks, "others": ["crown", "lipschitz", "first-order"]}


def margins(model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float) -> tuple[dict, dict]:
    """Signed margins and seconds of every estimator (``best`` = min over the attacks)."""
    names = estimators_for(p)
    values: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for name in [*names["others"], *names["attacks"]]:
        t0 = time.perf_counter()
        values[name] = build_estimator(name)(model, x, y, p=p)
        seconds[name] = time.perf_counter() - t0
    stacked = torch.stack([values[a] for a in names["attacks"]])
    values["best"] = stacked.gather(0, stacked.abs().argmin(0, keepdim=True))[0]
    seconds["best"] = sum(seconds[a] for a in names["attacks"])
    return values, seconds


def ratio_stats(est: torch.Tensor, exact: torch.Tensor, kind: str) -> dict[str, float]:
    """Median, worst (lower bounds: smallest; upper bounds: largest; else farthest from 1), within 1%."""
    r = est.abs() / exact.abs()
    if kind == "lower bound":
        worst = float(r.min())
    elif kind == "upper bound":
        worst = float(r.max())
    else:
        worst = float(r[(r.log().abs()).argmax()])
    return {
        "median": float(r.median()),
        "worst": worst,
        "within1": float(((r - 1).abs() <= 0.01).double().mean()),
    }


def run_model(
    label: str, model: MarginNet, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> list:
    """Rows of the estimator table and of the bracket table for one trained model."""
    rows, brackets = [], []
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    for p in args.norms:
        values, seconds = margins(model, x, y, p)
        ratio = values["best"].abs() / values["crown"].abs()
        brackets.append((label, p, float(ratio[correct].median()), float(correct.double().mean())))
        if args.n_exact == 0:
            continue
        k = min(args.n_exact, len(x))
        mip = build_estimator("mip", time_limit=args.time_limit)
        t0 = time.perf_counter()
        exact = mip(model, x[:k], y[:k], p=p)
        t_mip = time.perf_counter() - t0
        solved = torch.tensor([r.status == "exact" and r.upper < math.inf for r in mip.last_details])
        use = solved & correct[:k]
        note = f"{int(solved.sum())}/{k} solved"
        open_ = [r.upper / r.lower for r in mip.last_details if r.status != "exact" and r.lower > 0]
        if open_:  # time-limited points: how wide SCIP's bracket (raised to crown) still is
            note += f"; the others: upper/lower median {torch.tensor(open_).median():.2f}"
        rows.append((label, p, "mip", "exact", None, None, None, t_mip / k, note))
        if not use.any():
            continue
        for name, v in values.items():
            kind = "upper bound" if name == "best" else str(ESTIMATORS.get(name).kind)
            s = ratio_stats(v[:k][use], exact[use], kind)
            rows.append(
                (label, p, name, kind, s["median"], s["worst"], s["within1"], seconds[name] / len(x), "")
            )
    return rows + [("bracket", *b) for b in brackets]


def load(name: str, n_train: int, n_test: int, seed: int) -> tuple:
    train_set = load_dataset(name, "train", n=n_train, seed=seed)
    test_set = load_dataset(name, "test", n=n_test, seed=seed)
    return train_set.x, train_set.y, test_set.x, test_set.y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="test points per model (default 100)")
    ap.add_argument("--n-exact", type=int, help="of those, how many get exact margins (default: all)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="mip seconds per point (default 60)")
    ap.add_argument("--norms", default="inf,2", help="comma-separated: inf, 2 (default both)")
    ap.add_argument(
        "--models", default="digits,mnist", help='MLPs to run: digits, mnist (default both; "" for none)'
    )
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--epochs-digits", type=int, default=60)
    ap.add_argument("--epochs-mnist", type=int, default=5)
    ap.add_argument("--mnist-train", type=int, default=20000, help="MNIST training points (default 20000)")
    ap.add_argument("--n-cnn", type=int, default=20, help="MNIST-CNN bracket points (0: skip the CNN)")
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()
    args.norms = [math.inf if s.strip() == "inf" else 2.0 for s in args.norms.split(",")]
    args.n_exact = args.n if args.n_exact is None else args.n_exact
    torch.set_num_threads(1)
    rows: list[Any] = []
    specs = {
        "digits": ("digits", None, (32, 32), args.epochs_digits),
        "mnist": ("mnist", args.mnist_train, (64, 64), args.epochs_mnist),
    }
    for key in filter(None, args.models.split(",")):
        data, n_train, widths, epochs = specs[key]
        xtr, ytr, xte, yte = load(data, n_train, args.n, seed=0)
        for recipe in args.recipes.split(","):
            torch.manual_seed(0)
            model = build_model("mlp", input_shape=tuple(xtr.shape[1:]), widths=widths)
            secs = train(model, xtr, ytr, recipe, epochs, args.lr)
            label = f"{key}-{'-'.join(map(str, widths))} {recipe}"
            print(f"trained {label} in {secs:.0f} s", flush=True)
            rows += run_model(label, model, xte, yte, args)
            print_tables(rows)
    if args.n_cnn:
        xtr, ytr, xte, yte = load("mnist", 10000, args.n_cnn, seed=0)
        for recipe in args.recipes.split(","):
            torch.manual_seed(0)
            model = build_model("mnist-cnn")
            secs = train(model, xtr, ytr, recipe, 1, 1e-3, adam=True)
            print(f"trained mnist-cnn {recipe} (Adam, 1 epoch, 10k images) in {secs:.0f} s", flush=True)
            cnn_args = argparse.Namespace(**{**vars(args), "n_exact": 0})
            rows += run_model(f"mnist-cnn {recipe}", model, xte, yte, cnn_args)
    print_tables(rows)


def print_tables(rows: list) -> None:
    def norm(p: float) -> str:
        return "inf" if p == math.inf else "2"

    head = ("model", "p", "estimator", "kind", "median", "worst", "<=1%", "s/pt")
    fmt = "{:32s} {:>3s} {:12s} {:12s} {:>7s} {:>7s} {:>5s} {:>7s} {}"
    print("\n" + fmt.format(*head, ""))
    for r in rows:
        if r[0] == "bracket":
            continue
        label, p, name, kind, med, worst, within, sec, note = r
        cells = ("", "", "") if med is None else (f"{med:.3f}", f"{worst:.3f}", f"{within:.2f}")
        print(fmt.format(label, norm(p), name, kind, *cells, f"{sec:.3f}", note))
    print(f"\n{'bracket |best|/|crown|':32s} {'p':>3s} {'median':>7s} {'accuracy':>9s}")
    for r in rows:
        if r[0] == "bracket":
            print(f"{r[1]:32s} {norm(r[2]):>3s} {r[3]:7.2f} {r[4]:9.2f}")
    print(flush=True)


if __name__ == "__main__":
    main()
