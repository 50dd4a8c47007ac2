"""How tests/legacy/*.pt were made, with the code of commit 88de5a7 (before the shared code was split into modules):
tiny fp32 runs stopped after epoch 1 of 2, and the first 4 faces of their fixed grids. Run from the repo root
at that commit: `git checkout 88de5a7 && python tests/legacy/make_legacy.py`. tests/test_legacy.py loads them."""
import os, shutil, sys, torch
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, 'tests'))
import common, dcgan, acgan, stylegan
from conftest import TINY, FACES
src = '/tmp/legacy_faces'
shutil.rmtree(src, ignore_errors=True); os.makedirs(src)
for name in sorted(os.listdir(FACES))[:16]:
    shutil.copy(os.path.join(FACES, name), src)
out = os.path.join(ROOT, 'tests', 'legacy')
common_flags = ['--data', src, '--precision', 'fp32', '--epochs', '1', '--n-samples', '0', '--snapshot-every', '0']
pairs = [TINY[i:i + 2] for i in range(0, len(TINY), 2)]
tiny = [a for p in pairs if p[0] not in ('--n-samples', '--ngf', '--ndf') for a in p] + ['--z-dim', '16', '--ngf', '4', '--ndf', '4']
style = [a for p in pairs if p[0] not in ('--n-samples', '--ngf', '--ndf') for a in p]
runs = {
 'dcgan': (dcgan, tiny + ['--upsample', '--r1', '0.1', '--r1-every', '2', '--ema-kimg', '0.02', '--diffaug', 'color,translation,cutout']),
 'acgan': (acgan, tiny + ['--labels', os.path.join(ROOT, 'data', 'labels.csv'), '--control-n', '0', '--ema-kimg', '0.02']),
 'stylegan': (stylegan, style + ['--ch-base', '128', '--ch-max', '16', '--z-dim', '16', '--n-mlp', '2', '--lr', '0.002']),
}
for name, (m, flags) in runs.items():
    d = f'/tmp/legacy_runs/{name}'
    shutil.rmtree(d, ignore_errors=True)
    m.main(common_flags + flags + ['--out', d])
    ck = common.load_checkpoint(f'{d}/ckpt.pt')
    G, mod = common.load_generator(ck)
    x = common.generate(G, tuple(ck['fixed']))
    ck['args']['data'] = ck['args']['out'] = 'set-by-test'
    if 'labels' in ck['args']: ck['args']['labels'] = 'set-by-test'
    torch.save(ck, f'{out}/{name}_ckpt.pt')
    torch.save({'fixed_grid': torch.from_numpy(common.to_uint8(x[:4]))}, f'{out}/{name}_samples.pt')
