"""Plots, with matplotlib: a run's loss curves (raw and smoothed) and FID against training hours of many runs.

    python plots.py losses runs/dcgan/losses.csv runs/dcgan/loss_curve.png
    python plots.py scores results/fid_curve.csv results/fid_vs_hours.png
"""
import argparse
import csv
import os

import numpy as np

import common

NOT_LOSSES = ('step', 'epoch', 'img_per_s', 'fid', 'kid')


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported on first use: only plotting
    pays its import time."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def read_losses(csv_path):
    """losses.csv -> (header, float array; '' = NaN). Rows of another length (a run resumed with --fid-every
    changed) are padded with NaN or cut to the header."""
    with open(csv_path, newline='') as f:
        rows = [r for r in csv.reader(f) if r]
    head = rows[0]
    return head, np.array([[float(v) if v else np.nan for v in (r + [''] * len(head))[:len(head)]] for r in rows[1:]])


def smooth(y, frac=0.05):
    """A centred moving average over ~frac of the points (NaNs ignored), so a trend shows through the noise."""
    k = max(1, int(len(y) * frac)) | 1
    ok = np.isfinite(y)
    num = np.convolve(np.where(ok, y, 0.0), np.ones(k), 'same')
    den = np.convolve(ok.astype(float), np.ones(k), 'same')
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def plot_losses(csv_path, png_path):
    """A run's loss_curve.png: each logged value against the epoch, raw (faint) and smoothed, one panel per
    quantity so that losses of different scales stay readable. Returns the names plotted."""
    if not os.path.exists(csv_path):
        return []
    head, data = read_losses(csv_path)
    names = [h for h in head if h not in NOT_LOSSES]
    if len(data) < 2 or not names:
        return []
    plt = pyplot()
    x = data[:, head.index('epoch')]
    cols = min(3, len(names))
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((len(names) + cols - 1) // cols)),
                             squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        y = data[:, head.index(name)]
        ax.plot(x, y, color='C0', alpha=0.3, lw=0.8, label='raw')
        ax.plot(x, smooth(y), color='C0', lw=1.8, label='smoothed')
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelbottom=True, labelsize=8)   # every panel keeps its epochs, also above an empty slot
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis('off')
    fig.supxlabel('epoch', fontsize=10)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc='upper right', fontsize=8, ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))   # room for the legend above the panels, off the data
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return names


def read_scores(csv_path):
    """A CSV of run,epoch,hours,fid,... rows -> a dict per row. A row with more fields than the header (a run name
    with a comma in it) would shift every number one column: a one-line error instead."""
    if not os.path.isfile(csv_path):
        common.fail(f'{csv_path}: no such file; give a CSV of run,epoch,hours,fid rows (results/fid_curve.csv)')
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        if None in r:
            common.fail(f'{csv_path} line {i + 2}: more fields than its header; a run name with a comma? '
                        f'quote it or drop the comma: {r["run"]!r}')
    return rows


def plot_score_curves(csv_path, png_path, x='hours', y='fid', xlabel='hours of training on 2 CPU cores',
                      ylabel='FID (2,048 samples, log scale)'):
    """FID against hours, one line per run of a CSV with a `run` column (results/fid_curve.csv), one panel per
    model family (the run name's first word, less `-DA`: DCGAN, WACGAN-GP, ...) with its legend beside it: a family's runs
    differ by colour, and the shared axes compare the families. Log y axis: the curves fall over an order of
    magnitude. Returns {family: [runs]}."""
    rows = read_scores(csv_path)
    families = {}
    for run in dict.fromkeys(r['run'] for r in rows):
        families.setdefault(run.split()[0].removesuffix('-DA'), []).append(run)   # DCGAN-DA is a DCGAN
    plt = pyplot()
    tall = [max(2.4, 0.2 * len(m)) for m in families.values()]       # a panel as tall as its legend needs
    fig, axes = plt.subplots(len(families), 1, figsize=(13, sum(tall) + 0.6), sharex=True, sharey=True,
                             squeeze=False, gridspec_kw={'height_ratios': tall})
    markers = 'osD^v<>ph*'
    for ax, (family, members) in zip(axes[:, 0], families.items()):
        for j, run in enumerate(members):
            pts = sorted((float(r[x]), float(r[y])) for r in rows if r['run'] == run)
            ax.plot(*zip(*pts), color=f'C{j % 10}', ls='-' if j < 10 else '--', marker=markers[j % len(markers)],
                    ms=3.5, lw=1.3, label=run)
        ax.set_title(family, loc='left', fontsize=10, fontweight='bold')
        ax.legend(fontsize=7.5, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)   # beside the data
        ax.grid(alpha=0.3, which='both')
        ax.tick_params(axis='both', which='both', labelsize=8, labelbottom=True)
    ax.set_yscale('log')   # shared: every panel alike
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    leading = lambda v: int(f'{v:e}'[0])   # 3 of 30 or 300
    # the minor ticks 20-50 and 200-500 labelled; 60-90 too would crowd a short panel
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}' if leading(v) <= 5 else ''))
    fig.supxlabel(xlabel, fontsize=10)
    fig.supylabel(ylabel, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return families


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('kind', choices=['losses', 'scores'], help='losses: a run\'s losses.csv; scores: a CSV of run,epoch,hours,fid rows')
    p.add_argument('csv', help='input CSV')
    p.add_argument('png', help='output PNG')
    args = p.parse_args(argv)
    (plot_losses if args.kind == 'losses' else plot_score_curves)(args.csv, args.png)
    print(f'wrote {args.png}')


if __name__ == '__main__':
    common.main_guard(main)
