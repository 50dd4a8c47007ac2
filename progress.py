"""A training run's progress log: the scalars a loop tracks, summed on the device and read back every
--log-every steps into losses.csv and a progress line with img/s and ETA; FID scored in the run (--fid-every)."""
import csv
import math
import os
import time

import torch
import torch.distributed as dist

import fid
from common import UserError


class NonFiniteLoss(UserError):
    """A NaN or inf in the losses or weights: the run stops, its last good checkpoint kept."""


class Progress:
    """Sums the scalars a loop tracks on the device and reads them back only every --log-every steps (the one
    host sync), into a losses.csv row and a progress line with img/s and ETA."""

    def __init__(self, run, total):
        self.run, self.args, self.total = run, run.args, total
        self.csv_path = os.path.join(run.out, 'losses.csv')
        self.names, self.sums, self.n = [], None, 0
        self.fid = self.kid = None
        self.extractor = None
        self.t0, self.n0 = time.time(), 0

    def track(self, **scalars):
        vals = torch.stack([torch.as_tensor(v, device=self.run.device).detach().float() for v in scalars.values()])
        self.names = list(scalars)
        self.sums = vals if self.sums is None else self.sums + vals
        self.n += 1

    def start(self, step):
        self.t0, self.n0 = time.time(), step

    def score_fid(self, state):
        """FID (and KID) of --fid-n fresh samples against --fid-stats; its time is left out of the next img/s."""
        t = time.time()
        if self.extractor is None:
            self.extractor = fid.Extractor('fid').to(self.run.device)
        self.fid, self.kid = fid.score_generator(state.sampler(), state.sample_inputs, state.model_args, self.args.fid_n,
                                                 self.args.fid_stats, self.extractor, self.run.device, self.args.seed)
        self.run.log(f'FID {self.fid:.2f}' + (f' KID {self.kid * 1000:.2f}e-3' if self.kid is not None else '')
                     + f' at step {state.step} ({self.args.fid_n} samples vs {self.args.fid_stats}, {time.time() - t:.0f}s)')
        self.t0 += time.time() - t

    def line(self, state):
        """Write the averages since the last line; a non-finite one stops the run with the last good checkpoint."""
        if self.sums is None:
            return
        vals = self.sums / self.n
        if self.run.world > 1:
            dist.all_reduce(vals)
            vals /= self.run.world
        vals, self.sums, self.n = vals.tolist(), None, 0
        row = dict(zip(self.names, vals))
        if not all(math.isfinite(v) for v in vals):
            raise NonFiniteLoss(f'non-finite loss at step {state.step} ({", ".join(f"{k}={v:.4g}" for k, v in row.items())}); '
                                f'the last good checkpoint {self.run.ckpt_path} is kept; try --precision fp32 or a lower learning rate')
        ips = (state.step - self.n0) * self.args.batch_size / max(time.time() - self.t0, 1e-9)
        eta = (self.total - state.step) * self.args.batch_size / max(ips, 1e-9)
        if self.run.main:
            self.write_row(state, vals, ips)
            self.run.log(f'[{state.script}] ep {state.epoch:6.2f}/{self.args.epochs} step {state.step}/{self.total} | '
                         + ' '.join(f'{k} {v:.3f}' for k, v in row.items()) + f' | {ips:.0f} img/s | ETA {fmt_time(eta)}'
                         + (f' | FID {self.fid:.2f}' if self.fid is not None else ''))
        self.fid = self.kid = None
        self.start(state.step)

    def write_row(self, state, vals, ips):
        new = not os.path.exists(self.csv_path)
        scores = ['', ''] if self.fid is None else [f'{self.fid:.3f}', '' if self.kid is None else f'{self.kid:.6f}']
        with open(self.csv_path, 'a', newline='') as f:
            w = csv.writer(f)
            if new:
                w.writerow(['step', 'epoch', *self.names, 'img_per_s'] + ['fid', 'kid'] * bool(self.args.fid_every))
            w.writerow([state.step, f'{state.epoch:.3f}', *(f'{v:.5f}' for v in vals), f'{ips:.1f}']
                       + scores * bool(self.args.fid_every))


def fmt_time(s):
    s = int(s)
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def truncate_log(path, step):
    """On resume, drop losses.csv rows logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(keep)
