"""Vectorised exact multiclass linear margins vs a per-point Python loop, on 60k MNIST-sized inputs.

The baseline is the reference code's approach: loop over the points and, for each, take the min over the
other classes of ``((w_y - w_k).x + b_y - b_k) / ||w_y - w_k||_q`` (vectorised over k within a point,
which is generous to it). The loop runs on a subset and its time is extrapolated linearly to all points.

    python benchmarks/bench_linear_margins.py [--loop-points 3000] [--repeats 7]
"""

import argparse
import math
import statistics
import time

import torch

from marginlab.base.errors import DataError
from marginlab.core.linear import linear_margins
from marginlab.core.norms import Norm


def load_inputs() -> tuple[torch.Tensor, torch.Tensor, str]:
    """The 60k MNIST training images [N, 784] and labels, or random data of the same shape."""
    try:
        from marginlab.data import load_dataset

        data = load_dataset("mnist", "train")
        return data.x.flatten(1), data.y, f"real MNIST training set ({data.source})"
    except (DataError, ImportError) as err:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(60_000, 784, generator=g), torch.randint(0, 10, (60_000,), generator=g)
        return x, y, f"random data of MNIST's shape (MNIST unavailable: {err})"


def fit_linear(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """A quickly trained 784x10 model: ridge least squares on one-hot targets (closed form, float64)."""
    z = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    t = torch.nn.functional.one_hot(y, 10).double()
    theta = torch.linalg.solve(z.T @ z + ridge * torch.eye(z.shape[1], dtype=torch.float64), z.T @ t)
    return theta[:-1].T.float().contiguous(), theta[-1].float()


def loop_margins(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, p: float
) -> torch.Tensor:
    """The baseline: one point at a time."""
    q = Norm.parse(p).q
    out = torch.empty(len(x), dtype=x.dtype)
    for i in range(len(x)):
        c = int(y[i])
        diff = w[c] - w  # [K, D]
        ratio = (diff @ x[i] + (b[c] - b)) / torch.linalg.vector_norm(diff, ord=q, dim=1)
        ratio[c] = math.inf
        out[i] = ratio.min()
    return out


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop-points", type=int, default=3000, help="points the loop baseline runs on")
    ap.add_argument("--repeats", type=int, default=7, help="runs of the vectorised version (median)")
    args = ap.parse_args()
    x, y, what = load_inputs()
    w, b = fit_linear(x, y)
    acc = float((torch.argmax(x @ w.T + b, dim=1) == y).float().mean())
    print(f"data: {what}; x {tuple(x.shape)} {x.dtype}; model 784x10 ridge fit, train accuracy {acc:.4f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    n_loop = min(args.loop_points, len(x))
    header = ["p", "vectorised (median)", "loop (extrapolated)", "speed-up", "max |diff|"]
    print(f"{header[0]:>4} {header[1]:>21} {header[2]:>22} {header[3]:>9} {header[4]:>11}")
    for p in [2, math.inf, 1]:
        linear_margins(w, b, x[:100], y[:100], p=p)  # warm-up
        t_vec, m = timed(lambda p=p: linear_margins(w, b, x, y, p=p), args.repeats)
        t_loop, m_loop = timed(lambda p=p: loop_margins(w, b, x[:n_loop], y[:n_loop], p), 1)
        t_loop_all = t_loop * len(x) / n_loop
        diff = float((m[:n_loop] - m_loop).abs().max())
        print(
            f"{p:>4} {t_vec * 1e3:>21.1f} ms {t_loop_all:>19.2f} s {t_loop_all / t_vec:>8.0f}x {diff:>11.2e}"
        )
    print(f"(loop: first {n_loop} points, timed once, scaled to {len(x)}; vectorised: all points)")


if __name__ == "__main__":
    main()
