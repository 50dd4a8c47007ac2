"""The core every other module builds on: one-line user errors, the shared CLI, device / precision / seed /
torchrun set-up, and checkpoint files. Nothing in here knows about a particular GAN.

The shared code, each module about one thing, each importing only the ones above it:

    common.py     errors, the flags every script shares, devices and DDP, checkpoint files
    dataset.py    images decoded once into a uint8 tensor, shuffled batches, the labels CSV
    sampling.py   a generator rebuilt from a checkpoint, samples, grids, --sample / --export
    plots.py      loss curves and FID curves (matplotlib)
    training.py   the recipe helpers (EMA, DiffAugment) and the run: checkpoint state, progress log, loop

A model script keeps its own model, losses and training loop, and calls these for the rest.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

CKPT_FORMAT = 1
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, 'data', 'faces')


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1, no traceback."""


def fail(msg):
    raise UserError(msg)


def main_guard(fn, argv=None):
    """Run a script's main(): user errors become one line on stderr and exit code 1."""
    try:
        return fn(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# CLI: the flags every script shares, declared once

def base_parser(script, doc, epochs, batch_size, sizes=(64,)):
    """The flags every training script shares; sizes: the --image-size values its models are built for."""
    p = argparse.ArgumentParser(prog=f'{script}.py', description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(sizes=sizes)
    a = p.add_argument
    a('--data', default=DEFAULT_DATA, help='folder of images (recursive), a .zip of images, or a data '
      'cache .pt written by an earlier run (default: the bundled sample, %(default)s)')
    a('--out', default=None, help='run folder (default: runs/<script>; with --sample: <ckpt dir>/sample)')
    a('--epochs', type=int, default=epochs, help='passes over the data (default: %(default)s)')
    a('--batch-size', type=int, default=batch_size, help='global batch size (default: %(default)s)')
    a('--image-size', type=int, default=64, help=f'images are center-cropped and resized to this; one of '
      f'{", ".join(map(str, sizes))} (default: %(default)s)')
    a('--flip', action=argparse.BooleanOptionalAction, default=False,
      help='random horizontal flips of the real images (default: %(default)s)')
    a('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
      help='auto = cuda, else mps, else cpu (default: %(default)s)')
    a('--precision', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
      help='autocast dtype; auto = bf16 on CPUs with native bf16 and on CUDA GPUs with bf16, else fp32; '
      'fp16 only on CUDA, with loss scaling; weights stay fp32 (default: %(default)s)')
    a('--channels-last', action=argparse.BooleanOptionalAction, default=True,
      help='NHWC memory layout, faster convolutions on CPU and tensor cores (default: %(default)s)')
    a('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the models: compiling '
      'first (~30 s on 2 CPU cores), then faster steps; a D with a gradient penalty (R1, WGAN-GP) '
      'stays eager, as torch.compile cannot take a double backward (default: off)')
    a('--seed', type=int, default=0, help='seeds weights, noise, data order and the fixed grid z (default: %(default)s)')
    a('--deterministic', action='store_true', help='deterministic kernels only (slower on CUDA)')
    a('--resume', action='store_true', help='continue the run in --out from its ckpt.pt, exactly; '
      'flags not given again keep the values the run started with; flags given again (--epochs, --lr-g, ...) apply from there on')
    a('--log-every', type=int, default=50, help='steps between progress lines / losses.csv rows (default: %(default)s)')
    a('--grid-every', type=int, default=0, help='steps between fixed-z sample grids, the frames of progress.gif; '
      '0 = as many steps as make about 60 grids over the run, whatever its length (default: %(default)s)')
    a('--save-every', type=int, default=1000, help='steps between checkpoints (default: %(default)s)')
    a('--snapshot-every', type=int, default=10,
      help='epochs between generator snapshots in snapshots/, for scoring later; 0 = off (default: %(default)s)')
    a('--keep-checkpoints', action='store_true',
      help='with each snapshot also keep the full checkpoint (G, D, optimisers) as snapshots/ckpt_epochNNNN.pt, so a '
      'run that collapses can go on from before: copy one over <out>/ckpt.pt and --resume (default: off)')
    a('--lr-halve-at', default='', metavar='EPOCHS',
      help='comma list of epochs at which every learning rate is halved, e.g. 28,44 (the step decay of the shipped '
      'DCGAN and LSGAN, results/README.md); a resumed run applies the halvings it has passed (default: none)')
    a('--fid-every', type=int, default=0, metavar='EPOCHS',
      help='score G with FID every this many epochs (needs --fid-stats), logged to losses.csv; 0 = off (default: %(default)s)')
    a('--fid-stats', default=None, help='statistics .npz of the real data, from `python fid.py DATA --save-stats OUT.npz`')
    a('--fid-n', type=int, default=2000, help='generated images per --fid-every score (default: %(default)s)')
    a('--n-samples', type=int, default=0, help='individual PNGs written to samples/ at the end; FID needs none: '
      '`python fid.py RUN/ckpt.pt STATS.npz` samples the checkpoint in memory (default: %(default)s)')
    a('--sample', type=int, default=0, metavar='N',
      help='only generate: write N images and grids from --ckpt, then exit')
    a('--ckpt', default=None, help='checkpoint for --sample and --export (default: <out>/ckpt.pt)')
    a('--export', default=None, metavar='OUT.pt',
      help='only export: write the generator of --ckpt that samples (the EMA one where kept) in fp16 with its '
      'args, small enough to share and to --sample from alone, then exit')
    a('--export-d', action='store_true',
      help='with --export: keep the trained G and D too (fp16, ~3x the size), so that the file can start a '
      'conditional fine-tune with a D as old as its G: `acgan.py --recipe from-dcgan --init-g OUT.pt` (default: off)')
    return p


def at_least(low, kind=float):
    """An argparse type: a number >= low; anything else is an error that names the flag."""
    def parse(text):
        v = kind(text)
        if v < low:
            raise argparse.ArgumentTypeError(f'must be >= {low}, got {text}')
        return v
    parse.__name__ = kind.__name__   # argparse names the type in its "invalid float value" message
    return parse


def add_adam_args(parser, lr_g, lr_d, beta1, beta2):
    """--lr-g --lr-d --beta1 --beta2: the two players' Adam optimisers."""
    parser.add_argument('--lr-g', type=float, default=lr_g, help='Adam learning rate of G (default: %(default)s)')
    parser.add_argument('--lr-d', type=float, default=lr_d, help='Adam learning rate of D (default: %(default)s)')
    parser.add_argument('--beta1', type=float, default=beta1, help='Adam beta1 (default: %(default)s)')
    parser.add_argument('--beta2', type=float, default=beta2, help='Adam beta2 (default: %(default)s)')


def add_r1_args(parser, gamma=0.0, gamma_help='0 = off, and D keeps its BatchNorm; > 0 builds D without it'):
    """--r1 GAMMA and --r1-every: the R1 penalty on real images, applied lazily (StyleGAN2)."""
    parser.add_argument('--r1', type=at_least(0.0), default=gamma,
                        help=f'R1 gamma: add gamma/2 * E||grad_x D(x)||^2 on real images to D\'s loss; {gamma_help} '
                        '(default: %(default)s)')
    parser.add_argument('--r1-every', type=at_least(1, int), default=16, help='the R1 penalty every this many steps, '
                        'weighted by as much (lazy regularisation, StyleGAN2) (default: %(default)s)')


def add_recipe_arg(parser, best, measured, more=None):
    """--recipe reports|best. reports: the source reports' settings, the flags' defaults. best: the flags of
    the shipped generator (`best`, {flag: value}); `measured` says where and at what length. more: further
    named recipes, {name: ({flag: value}, what it is for)}. Flags given explicitly override any recipe; the
    values in force are saved with the run, so --resume needs no flags."""
    more = more or {}
    parser.recipes = {'reports': {}, 'best': best, **{name: values for name, (values, _) in more.items()}}
    shown = lambda values: ' '.join(f'--{k.replace("_", "-")}' + ('' if v is True else f' {v}') for k, v in values.items())
    others = ''.join(f'; {name} = {shown(values)} ({why})' for name, (values, why) in more.items())
    parser.add_argument('--recipe', choices=list(parser.recipes), default='reports',
                        help=f'reports = the source reports\' settings (the defaults here); best = {shown(best)} ({measured})'
                        f'{others}; a flag given explicitly overrides the recipe (default: %(default)s)')


def add_conditional_args(parser):
    """The flags of the conditional scripts (acgan.py, wacgan_gp.py)."""
    parser.add_argument('--labels', default=os.path.join(HERE, 'data', 'labels.csv'),
                        help='CSV `file,attr1,attr2,...` joined to --data by file name; empty = unknown; for the shared '
                        'faces use results/anime-faces-64-labels.csv (default: the bundled hand labels, %(default)s)')
    parser.add_argument('--attr', action='append', metavar='K=V', default=None,
                        help='with --sample: ask for this attribute value, repeatable, e.g. --attr hair=blonde --attr eyes=blue')
    parser.add_argument('--cls-weight', type=float, default=1.0, help='weight of the classification losses (default: %(default)s)')
    parser.add_argument('--control-n', type=at_least(0, int), default=2000, help='generated faces on which control.json '
                        'measures D\'s heads at the end; 0 = off (default: %(default)s)')


def parse_args(parser, argv=None, renamed=None):
    """Parse flags. With --resume, the run's saved flags become the defaults, so `python dcgan.py --out RUN
    --resume` continues with exactly the settings it started with. renamed: {old flag: [new flags]} for a
    flag a script has since renamed, so that a run saved under the old name resumes with its values."""
    args = parser.parse_args(argv)
    run_dir = os.path.join('runs', parser.prog[:-3])   # the default run folder: runs/<script>
    recipe = getattr(parser, 'recipes', {}).get(getattr(args, 'recipe', None))
    if recipe and not args.resume:   # the recipe's values become the defaults: a flag given explicitly still wins
        parser.set_defaults(**recipe)
        args = parser.parse_args(argv)
    if args.resume and not (args.sample or args.export):
        path = os.path.join(args.out or run_dir, 'ckpt.pt')
        if not os.path.exists(path):
            parser.error(f'--resume: no checkpoint at {path}; start a new run without --resume')
        saved = dict(load_checkpoint(path)['args'])
        for old, new in (renamed or {}).items():
            saved.update({n: saved[old] for n in new if old in saved})
        known = {a.dest for a in parser._actions} - {'resume', 'sample', 'ckpt', 'export', 'export_d'}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known})
        args = parser.parse_args(argv)
    if args.sample or args.export:
        args.ckpt = args.ckpt or os.path.join(args.out or run_dir, 'ckpt.pt')
    else:
        args.out = args.out or run_dir
    check_args(parser, args)
    return args


def check_args(parser, args):
    """What the flags' types cannot check alone: ranges, and flags that need each other."""
    for name in ('epochs', 'batch_size', 'log_every', 'save_every'):
        if getattr(args, name) <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if args.image_size not in args.sizes:
        parser.error(f'{parser.prog} builds {" / ".join(f"{s}x{s}" for s in args.sizes)} models, got --image-size '
                     f'{args.image_size}')
    if min(args.n_samples, args.sample, args.snapshot_every, args.fid_every, args.grid_every) < 0:
        parser.error('--n-samples, --sample, --snapshot-every, --fid-every and --grid-every must be >= 0')
    try:
        ok = all(e > 0 for e in lr_halvings(args.lr_halve_at))
    except ValueError:
        ok = False
    if not ok:
        parser.error(f'--lr-halve-at: expected a comma list of positive epochs such as 28,44, got {args.lr_halve_at!r}')
    if args.export_d and not args.export:
        parser.error('--export-d goes with --export OUT.pt: it keeps G and D in the exported file')
    if args.fid_every and args.fid_n < 2:
        parser.error(f'--fid-n must be at least 2 (FID needs a covariance; 2048+ for numbers that compare), got {args.fid_n}')
    if args.fid_every and not (args.fid_stats and os.path.isfile(args.fid_stats)):
        parser.error(f'--fid-every needs --fid-stats FILE.npz (got {args.fid_stats}); make it with '
                     f'`python fid.py DATA --save-stats FILE.npz`')


def lr_halvings(spec):
    """'28,44' -> [28, 44]: the epochs of --lr-halve-at."""
    return sorted(int(e) for e in spec.split(',') if e.strip())


# ----------------------------------------------------------------------------------------------------
# Devices, precision, seeding, distributed

def pick_device(name='auto', local_rank=0):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'cuda':
        if not torch.cuda.is_available():
            fail('--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu')
        return torch.device('cuda', local_rank)
    if name == 'mps' and not torch.backends.mps.is_available():
        fail('--device mps: MPS is not available on this machine; use --device cpu')
    return torch.device(name)


def cpu_has_bf16():
    fn = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    return bool(fn and fn())


def pick_precision(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == 'auto':
        if device.type == 'cuda':
            name = 'bf16' if torch.cuda.is_bf16_supported() else 'fp32'
        else:
            name = 'bf16' if device.type == 'cpu' and cpu_has_bf16() else 'fp32'
    if name == 'fp16' and device.type != 'cuda':
        fail('--precision fp16 needs CUDA (fp16 on CPU is slow and needs loss scaling); use bf16 or fp32')
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[name]


def seed_everything(seed, deterministic=False):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True   # fixed input shapes: let cuDNN pick the fastest kernels


def setup_distributed(device_name):
    """Set up torchrun's process group if launched by torchrun; returns (rank, world_size, device).

    Gradients are averaged across processes by Run.step with one all_reduce per model. A GAN step runs
    D several times before one backward and back-propagates the G loss through D, which the DDP wrapper
    handles awkwardly; the explicit all-reduce keeps every loop identical to its one-process form."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cpu':
        set_cpu_threads(int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    return rank, world, device


def set_cpu_threads(local_world=1):
    """Torch's CPU threads: the physical cores shared between this machine's processes, or, for one process,
    OMP_NUM_THREADS where the user set it (say 1, to score snapshots beside a training run without the two
    fighting over the cores). torchrun sets OMP_NUM_THREADS=1 for its processes itself, so DDP divides the cores."""
    env = os.environ.get('OMP_NUM_THREADS', '')
    n = int(env) if local_world == 1 and env.isdigit() and int(env) > 0 else max(1, physical_cores() // local_world)
    torch.set_num_threads(n)
    return n


def physical_cores():
    """Physical cores (hyper-threads share one core's vector units, so more threads than cores only adds
    contention); from /proc/cpuinfo on Linux, else os.cpu_count()."""
    try:
        pairs, phys = set(), None
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('physical id'):
                    phys = line.split(':')[1].strip()
                elif line.startswith('core id'):
                    pairs.add((phys, line.split(':')[1].strip()))
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        return max(1, min(len(pairs) or allowed, allowed))
    except OSError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one self-describing dict, written atomically, read as data (weights_only)

def atomic_save(obj, path):
    """torch.save to a temp file then rename: a crash mid-write never leaves a truncated checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        fail(f'checkpoint {path} not found; train first or pass --ckpt PATH')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f'checkpoint {path} is unreadable ({type(e).__name__}); it may be truncated: use an earlier one')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        fail(f'{path} is not a checkpoint of these scripts (format {CKPT_FORMAT})')
    return ckpt

