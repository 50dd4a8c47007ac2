"""The run around a model script's training loop: the state a checkpoint holds (TrainState), and the run
itself (Run: device, precision, seed, torchrun, run folder, and the loop that logs, draws grids, scores and
saves between the steps).

    run = training.Run(args, 'dcgan')         # device, precision, seed, torchrun, run folder, log
    images = run.load_images()                # uint8 (N, 3, H, W), decoded once, cached in the run folder
    run.setup(G, D, opt_g, opt_d, model_args, sample_inputs, images, G_ema=G_ema)   # --resume loads it all back
    for step, real in run.batches():          # logs, grids, checkpoints and FID happen between the steps
        ...                                   # the script's GAN step: run.autocast(), run.backward(), run.step()
    run.finish()                              # final checkpoint, loss curve, progress.gif, samples/
"""
import json
import os
import signal
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

import plots
from common import (CKPT_FORMAT, atomic_save, cpu_has_bf16, fail, load_checkpoint, lr_halvings, pick_precision,
                    seed_everything, setup_distributed)
from dataset import ImageBatches, join_labels, label_model_args, load_images
from progress import NonFiniteLoss, Progress, truncate_log
from recipes import standing_stats
from sampling import attribute_grids, generate, generator_checkpoint, make_gif, sample_rng, save_grid, write_samples

GIF_FRAMES = 60   # progress grids over a run (--grid-every 0) and frames of its progress.gif


# ----------------------------------------------------------------------------------------------------
# The state a checkpoint holds, set in one place

class TrainState:
    """Models (an EMA generator is one more), optimisers, loss scalers, the step, the fixed inputs of the
    progress grids, and the learning-rate schedule: what ckpt.pt holds, written by checkpoint() and read back
    by restore(), so a resumed run goes on exactly as if it had never stopped."""

    def __init__(self, run, models, optims, model_args, sample_inputs, sample_model, steps_per_epoch):
        self.script, self.args, self.log = run.script, run.args, run.log
        self.models, self.optims, self.model_args = models, optims, model_args
        self.sample_inputs, self.sample_model, self.steps_per_epoch = sample_inputs, sample_model, steps_per_epoch
        self.batch = run.args.batch_size // run.world   # one process's batch
        self.scalers = {k: torch.amp.GradScaler('cuda') for k in optims} if run.dtype == torch.float16 else {}
        # the inputs of the progress grids, from a stream of their own so that they do not shift the training noise
        self.fixed = tuple(t.to(run.device) for t in sample_inputs(model_args, 64, 'cpu', sample_rng(self.args.seed)))
        self.step = 0
        # --lr-halve-at: the learning rates the optimisers were built with, from this invocation's flags
        self.base_lr = {k: [g['lr'] for g in o.param_groups] for k, o in optims.items()}
        self.halve_at = lr_halvings(self.args.lr_halve_at)
        self._standing_step = None

    @property
    def epoch(self):
        return self.step / self.steps_per_epoch

    def set_lr(self, epoch):
        """Every learning rate = its flag's value / 2 per --lr-halve-at epoch passed by `epoch`."""
        f = 0.5 ** sum(epoch >= e for e in self.halve_at)
        for k, o in self.optims.items():
            for g, lr in zip(o.param_groups, self.base_lr[k]):
                g['lr'] = lr * f

    def sampler(self):
        """The model that samples. Where that is an EMA copy (a model without an optimiser), its BatchNorm
        statistics are first recomputed under its own weights, once per step (standing_stats)."""
        G = self.models[self.sample_model]
        if self.sample_model not in self.optims and self._standing_step != self.step:
            standing_stats(G, self.sample_inputs, self.model_args, self.batch, seed=self.args.seed)
            self._standing_step = self.step
        return G

    def checkpoint(self, rngs=None, light=False):
        """The state as one self-describing dict; light: only the sampling generator (a snapshot)."""
        ckpt = {'format': CKPT_FORMAT, 'script': self.script, 'model_args': self.model_args, 'args': vars(self.args),
                'step': self.step, 'epoch': self.epoch, 'sample_model': self.sample_model,
                'models': {self.sample_model: self.sampler().state_dict()}, 'fixed': [t.cpu() for t in self.fixed],
                'versions': {'torch': str(torch.__version__), 'python': sys.version.split()[0]}}
        if light:
            return ckpt
        return {**ckpt, 'models': {k: m.state_dict() for k, m in self.models.items()},
                'optims': {k: o.state_dict() for k, o in self.optims.items()},
                'scalers': {k: s.state_dict() for k, s in self.scalers.items()},
                'rng': [{k: v.cpu() for k, v in r.items()} for r in rngs]}

    def restore(self, ckpt, path):
        """Load a checkpoint's weights, optimisers, scalers, fixed inputs and step into this state."""
        if ckpt['script'] != self.script:
            fail(f'{path} was written by {ckpt["script"]}.py, not {self.script}.py')
        self.set_lr(ckpt['epoch'])   # the halvings the run has passed, before the saved state is compared
        for k, m in self.models.items():
            try:
                m.load_state_dict(ckpt['models'][k])
            except RuntimeError:   # e.g. `--resume --ndf 128`: the flags build another architecture
                changed = [f'--{a.replace("_", "-")}' for a, v in ckpt['args'].items() if getattr(self.args, a, v) != v]
                fail(f'{path}: its {k} does not fit the model these flags build; resume without changing the flags '
                     f'that shape the networks (changed since the run started: {", ".join(changed) or "none"})')
        for k, o in self.optims.items():
            # load_state_dict also restores the saved lr and betas; the optimisers were built from this
            # invocation's flags (the saved ones unless given again), so `--resume --lr-g 1e-4` must win
            wanted = [{h: v for h, v in g.items() if h != 'params'} for g in o.param_groups]
            o.load_state_dict(ckpt['optims'][k])
            for g, w in zip(o.param_groups, wanted):
                changed = {h: (g[h], v) for h, v in w.items() if g.get(h) != v}
                if changed:
                    self.log(f'resume: {k} optimiser ' + ', '.join(f'{h} {a} -> {b}' for h, (a, b) in changed.items()))
                g.update(w)
        for k, s in self.scalers.items():
            if k in ckpt.get('scalers', {}):
                s.load_state_dict(ckpt['scalers'][k])
        self.fixed = tuple(t.to(self.fixed[0].device) for t in ckpt['fixed'])
        self.step = ckpt['step']


# ----------------------------------------------------------------------------------------------------
# The run: its environment, the optimisation helpers the loops call, and the loop

class Run:
    """One training run: device, precision, seed and torchrun set up in __init__; the training state, the data
    and the progress log in setup(); then batches() drives the loop and finish() writes the outputs."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.main = self.rank == 0
        self.dtype = pick_precision(args.precision, self.device)
        seed_everything(args.seed, args.deterministic)
        self.out = args.out
        self.ckpt_path = os.path.join(self.out, 'ckpt.pt')
        if not args.resume and os.path.exists(self.ckpt_path):
            fail(f'{self.ckpt_path} exists; pass --resume to continue that run, or choose another --out')
        if self.main:
            os.makedirs(self.out, exist_ok=True)
        if self.dtype == torch.bfloat16 and self.device.type == 'cpu' and not cpu_has_bf16():
            self.log('warning: --precision bf16 on a CPU without native bf16 (avx512_bf16) is emulated: a DCGAN training '
                     'step was 23x slower than fp32 on an AVX2 EPYC; --precision auto picks fp32 on such a CPU')
        self._stop_signal = None
        self.files = None
        self.resumed = load_checkpoint(self.ckpt_path) if args.resume else None   # on the CPU; load_state_dict moves it

    def log(self, msg):
        if self.main:
            print(msg, flush=True)
            with open(os.path.join(self.out, 'log.txt'), 'a') as f:
                f.write(msg + '\n')

    def write_json(self, name, obj):
        if self.main:
            with open(os.path.join(self.out, name), 'w') as f:
                json.dump(obj, f, indent=2)

    def load_images(self):
        """--data as uint8 (N, 3, H, W); rank 0 decodes once into <out>/data_<size>.pt, later runs read that."""
        cache = os.path.join(self.out, f'data_{self.args.image_size}.pt')
        if self.world > 1:   # rank 0 decodes and writes the cache, the others read it
            if self.main:
                load_images(self.args.data, self.args.image_size, cache, self.log)
            dist.barrier()
        images, self.files = load_images(self.args.data, self.args.image_size, cache, self.log)
        return images

    def load_labels(self):
        """--labels for the images load_images returned -> (LongTensor (N, A), -1 = unknown; the label part of
        model_args). A resumed run keeps its checkpoint's classes, so class indices keep their meaning."""
        if self.resumed:
            saved = self.resumed['model_args']
            y, _ = join_labels(self.args.labels, self.files, saved['vocab'])
            return y, {k: saved[k] for k in ('vocab', 'label_prior')}
        y, vocab = join_labels(self.args.labels, self.files)
        return y, label_model_args(y, vocab, self.args.labels)

    def prepare(self, module, compilable=True):
        """To the device, channels_last, and with --compile compiled in place (its state_dict keeps its keys, no
        `_orig_mod.`). compilable=False for a D whose gradient penalty needs a double backward, which
        torch.compile cannot do."""
        module = module.to(self.device)
        if self.args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.args.compile and compilable:
            module.compile()
        return module

    def autocast(self):
        """Mixed precision for the forward passes; losses are computed in fp32 by the scripts."""
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def setup(self, G, D, opt_g, opt_d, model_args, sample_inputs, images, labels=None, G_ema=None):
        """The training state (with --resume: loaded back, RNG included), the batches and the progress log.
        G_ema, where given, samples; G trains."""
        models = {'G': G, 'D': D, **({'G_ema': G_ema} if G_ema is not None else {})}
        a = self.args
        self.data = ImageBatches(images, a.batch_size, a.seed, a.flip, self.device, self.rank, self.world, labels=labels)
        self.state = TrainState(self, models, {'G': opt_g, 'D': opt_d}, model_args, sample_inputs,
                                'G_ema' if G_ema is not None else 'G', self.data.steps_per_epoch)
        self.total = a.epochs * self.data.steps_per_epoch
        self.grid_every = a.grid_every or max(1, self.total // GIF_FRAMES)   # about GIF_FRAMES grids, whatever --epochs
        self.progress = Progress(self, self.total)
        if self.resumed:
            self.state.restore(self.resumed, self.ckpt_path)
            self.restore_rng(self.resumed['rng'])
            self.log(f'resumed {self.ckpt_path} at step {self.state.step}')
            self.resumed = None   # its tensors are in the models now
        elif self.world > 1:   # same init everywhere, different noise per process
            for m in models.values():
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, 0)
            torch.manual_seed(a.seed + 7919 * self.rank)
        if self.main:   # the flags of this invocation (a resume may have changed --epochs, say)
            truncate_log(self.progress.csv_path, self.state.step)
            with open(os.path.join(self.out, 'args.json'), 'w') as f:
                json.dump(vars(a), f, indent=2)

    def restore_rng(self, rng):
        if len(rng) == self.world:
            torch.set_rng_state(rng[self.rank]['cpu'])
            if 'cuda' in rng[self.rank] and self.device.type == 'cuda':
                torch.cuda.set_rng_state(rng[self.rank]['cuda'], self.device)
        else:   # a different process count cannot replay the same noise; continue with fresh noise
            torch.manual_seed(self.args.seed + 7919 * self.rank + self.state.step)

    @property
    def global_step(self):
        return self.state.step

    # -- the optimisation helpers the loops call ----------------------------------------------------
    def backward(self, loss, name):
        scaler = self.state.scalers.get(name)
        (scaler.scale(loss) if scaler else loss).backward()

    def step(self, name):
        """Average gradients over processes (torchrun), then take the optimiser step."""
        model, opt, scaler = self.state.models[name], self.state.optims[name], self.state.scalers.get(name)
        if self.world > 1:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def track(self, **scalars):
        """Record this step's scalars (tensors), summed on the device: no host sync in the hot loop."""
        self.progress.track(**scalars)

    # -- the loop -----------------------------------------------------------------------------------
    def batches(self):
        """Yield (step, real batch), or (step, real batch, its labels) for a conditional run, until --epochs are
        done; between the steps, everything else (after_step)."""
        s = self.state
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.log(f'{self.script}: {len(self.data.images)} images, {s.steps_per_epoch} steps/epoch, {self.args.epochs} epochs, '
                 f'batch {self.args.batch_size}{f" x{self.world} processes" if self.world > 1 else ""}, device {self.device}, '
                 f'precision {str(self.dtype or "fp32").replace("torch.", "")}, out {self.out}')
        self.log('flags in force: ' + ' '.join(f'--{k.replace("_", "-")} {v}' for k, v in sorted(vars(self.args).items())
                                               if k not in ('sizes', 'sample', 'ckpt', 'export', 'export_d', 'attr')))
        self.progress.start(s.step)
        if s.step == 0 and self.main:
            self.grid()
        while s.step < self.total:
            x = self.data.get(s.step)
            x, y = x if self.data.labels is not None else (x, None)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (s.step, x) if y is None else (s.step, x, y)
            s.step += 1
            self.after_step()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def after_step(self):
        """The learning-rate schedule, FID, the log line, grids, checkpoints, snapshots and a clean stop on a signal."""
        a, s, spe = self.args, self.state, self.state.steps_per_epoch
        if s.step % spe == 0 and s.step // spe in s.halve_at:
            s.set_lr(s.step // spe)
            self.log(f'epoch {s.step // spe}: learning rates halved (--lr-halve-at) to ' + ', '.join(
                f'{k} {o.param_groups[0]["lr"]:g}' for k, o in s.optims.items()))
        fid_due = a.fid_every and s.step % (a.fid_every * spe) == 0
        if fid_due and self.main:
            self.progress.score_fid(s)
        if s.step % a.log_every == 0 or s.step == self.total or fid_due:
            self.progress.line(s)
        if self.main and (s.step % self.grid_every == 0 or s.step == self.total):
            self.grid()
        if s.step % a.save_every == 0:
            self.save()
        if a.snapshot_every and s.step % (a.snapshot_every * spe) == 0:
            self.snapshot()
        if self._should_stop():
            self.save()
            self.plots()
            self.log(f'stopped by signal at step {s.step} (epoch {s.epoch:.2f}); checkpoint {self.ckpt_path}; '
                     f'continue with: python {self.script}.py --out {self.out} --resume')
            sys.exit(128 + self._stop_signal)

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C stops at once
        self._stop_signal = signum
        if self.main:
            print(f'\n{signal.Signals(signum).name}: saving a checkpoint after this step...', flush=True)

    def _should_stop(self):
        if self.world > 1:   # every process must stop at the same step, or the next all_reduce hangs
            t = torch.tensor([self._stop_signal or 0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self._stop_signal = int(t.item()) or None
        return self._stop_signal is not None

    # -- outputs ------------------------------------------------------------------------------------
    def checkpoint(self):
        """The full checkpoint dict, with every process's RNG state (collective under torchrun)."""
        rng = {'cpu': torch.get_rng_state(), **({'cuda': torch.cuda.get_rng_state(self.device)} if self.device.type == 'cuda' else {})}
        rngs = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        return self.state.checkpoint(rngs)

    def save(self):
        """Write ckpt.pt (atomically), but never a checkpoint with NaN/inf weights."""
        for k, m in self.state.models.items():
            if not all(torch.isfinite(p).all() for p in m.parameters()):
                raise NonFiniteLoss(f'{k} has NaN/inf weights at step {self.state.step}; kept the last good '
                                    f'checkpoint {self.ckpt_path}; try --precision fp32 or a lower learning rate')
        ckpt = self.checkpoint()   # collective in DDP: every rank must get here
        if self.main:
            atomic_save(ckpt, self.ckpt_path)
        return ckpt

    def grid(self):
        save_grid(generate(self.state.sampler(), self.state.fixed), os.path.join(self.out, 'grids', f'step_{self.state.step:08d}.png'))

    def snapshot(self):
        name = f'epoch{round(self.state.epoch):04d}.pt'
        full = self.checkpoint() if self.args.keep_checkpoints else None   # collective in DDP
        if self.main:
            atomic_save(generator_checkpoint(self.state.checkpoint(light=True)), os.path.join(self.out, 'snapshots', 'G_' + name))
            if full is not None:
                atomic_save(full, os.path.join(self.out, 'snapshots', 'ckpt_' + name))

    def plots(self):
        if self.main:
            plots.plot_losses(self.progress.csv_path, os.path.join(self.out, 'loss_curve.png'))
            # the top-left 4 x 4 faces of each grid, at most GIF_FRAMES frames: a GIF small enough to share
            make_gif(os.path.join(self.out, 'grids'), os.path.join(self.out, 'progress.gif'), GIF_FRAMES,
                     crop=(4 * (self.args.image_size + 2) + 2,) * 2)

    def finish(self):
        """After the last step: checkpoint, plots, GIF, --n-samples PNGs in samples/, attribute grids."""
        self.save()
        self.plots()
        s = self.state
        if self.main and self.args.n_samples:
            folder = os.path.join(self.out, 'samples')
            write_samples(s.sampler(), s.sample_inputs, s.model_args, self.args.n_samples, folder, self.device, self.args.seed + 1)
            self.log(f'wrote {self.args.n_samples} samples to {folder}')
        if self.main and 'vocab' in s.model_args:
            attribute_grids(s.sampler(), s.sample_inputs, s.model_args, self.out, self.device, self.args.seed + 1)
        self.log(f'done: {self.out} (checkpoint, grids/, progress.gif, loss_curve.png, losses.csv)')
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
