"""Draws the curves of a training run from its metrics.jsonl (written by `convnext train
--output_dir DIR`): training loss, learning rate, and test accuracy per epoch (and the EMA's,
when it was evaluated), into one PNG.

    python3 tools/plot_metrics.py runs/fashion_mnist/metrics.jsonl -o curves.png

Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import sys


def read(path):
    train, evals = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"plot_metrics: {path}:{n}: not JSON: {e}")
            (train if record.get("type") == "train" else evals).append(record)
    if not train and not evals:
        sys.exit(f"plot_metrics: {path}: no metrics")
    return train, evals


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="metrics.jsonl of a run")
    p.add_argument("-o", "--output", default="metrics.png", help="PNG to write")
    a = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        sys.exit("plot_metrics: needs matplotlib (Debian: apt-get install python3-matplotlib)")
    try:
        train, evals = read(a.metrics)
    except OSError as e:
        sys.exit(f"plot_metrics: {e}")

    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="test loss")
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set_xlabel("optimiser step")
    ax_lr.set_title("learning rate")
    if evals:
        epochs = [r["epoch"] + 1 for r in evals]
        ax_acc.plot(epochs, [r["acc1"] for r in evals], "o-", label="Acc@1")
        ax_acc.plot(epochs, [r["acc5"] for r in evals], "o-", label="Acc@5")
        if any("ema_acc1" in r for r in evals):
            ax_acc.plot([r["epoch"] + 1 for r in evals if "ema_acc1" in r],
                        [r["ema_acc1"] for r in evals if "ema_acc1" in r], "o--", label="EMA Acc@1")
        ax_acc.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_acc.set_title("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(a.output, dpi=100)
    print(f"wrote {a.output}: {len(train)} training points, {len(evals)} evaluations")


if __name__ == "__main__":
    main()
