"""How a victim loads each sample: Python source run as ``python -c SRC FILE``.

Each loader is the plain, idiomatic call a training script makes, with no
safety flags beyond the library defaults of the day.  Only ever run these in a
subprocess, on files from this package.
"""

from __future__ import annotations

_EXTRACT_THEN = """
import os, sys, tempfile
{imports}
def members(path, dest):
{extract}
    for root, _dirs, files in os.walk(dest):
        for name in sorted(files):
            yield os.path.join(root, name)
with tempfile.TemporaryDirectory() as dest:
    for member in members(sys.argv[1], dest):
        if member.endswith(({suffixes})):
{load}
"""

LOADERS: dict[str, str] = {
    # pickle.load reads one pickle and ignores whatever follows its STOP.
    "pickle": """
import pickle, sys
with open(sys.argv[1], 'rb') as f:
    pickle.load(f)
""",
    # Readers of appended records (logs, caches) call load until EOF.
    "pickle-stream": """
import pickle, sys
with open(sys.argv[1], 'rb') as f:
    while True:
        try:
            pickle.load(f)
        except EOFError:
            break
""",
    # A reader that keeps serialized objects inside its state (a run's checkpoint
    # holding pickled callbacks, RLlib-style) unpickles those bytes after loading.
    "pickle-nested": """
import pickle, sys
with open(sys.argv[1], 'rb') as f:
    state = pickle.load(f)
for value in state.values():
    if isinstance(value, bytes):
        pickle.loads(value)
""",
    "torch": """
import sys, torch
torch.load(sys.argv[1], map_location='cpu', weights_only=False)
""",
    # The safe default since torch 2.6.
    "torch-weights-only": """
import sys, torch
torch.load(sys.argv[1], map_location='cpu', weights_only=True)
""",
    # torch.load forwards unknown keyword arguments to its zip loader, whose
    # `pickle_file` picks the member to unpickle (the CVE-2025-1889 proof loads
    # `config.json` this way through functools.partial(torch.load, ...)).
    "torch-pickle-file": """
import sys, torch
torch.load(sys.argv[1], map_location='cpu', weights_only=False, pickle_file='config.json')
""",
    # Sleepy Pickle leaves no trace but altered weights: the check writes the
    # canary named in the checkpoint when the weights differ from the intended.
    "torch-check-weights": """
import sys, torch
ckpt = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
if ckpt['state_dict']['weight'].tolist() != ckpt['intended']:
    open(ckpt['canary'], 'w').close()
""",
    # Gradients hooked at load time show only in training: one backward pass, and
    # the canary named in the checkpoint when the gradient is not the true one.
    "torch-check-grad": """
import sys, torch
ckpt = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
p = ckpt['param']
(p * 1.0).sum().backward()
if p.grad is None or p.grad.tolist() != [1.0] * p.numel():
    open(ckpt['canary'], 'w').close()
""",
    # torch.jit.load runs the archive's __setstate__ methods; a forward pass the rest.
    "torch-jit-forward": """
import sys, torch
m = torch.jit.load(sys.argv[1])
m(torch.ones(1, 4))
""",
    # PackageImporter imports the archive's module that defines a pickled class.
    "torch-package": """
import sys, torch.package
torch.package.PackageImporter(sys.argv[1]).load_pickle('pkg', 'obj.pkl')
""",
    # A module changed by the load (an attribute swapped) writes the canary it names.
    "pickle-check-globals": """
import pickle, sys, os.path, json.decoder
watched = (os.path, json.decoder)
before = [dict(vars(m)) for m in watched]
with open(sys.argv[1], 'rb') as f:
    state = pickle.load(f)
if any(vars(m).get(k) is not v for m, b in zip(watched, before) for k, v in b.items()):
    open(state['canary'], 'w').close()
""",
    "numpy": """
import sys, numpy
numpy.load(sys.argv[1], allow_pickle=True)
""",
    "numpy-npz": """
import sys, numpy
with numpy.load(sys.argv[1], allow_pickle=True) as z:
    for key in z.files:
        z[key]
""",
    "joblib": """
import sys, joblib
joblib.load(sys.argv[1])
""",
    "gzip-pickle": """
import gzip, pickle, sys
with gzip.open(sys.argv[1], 'rb') as f:
    pickle.load(f)
""",
    "bz2-pickle": """
import bz2, pickle, sys
with bz2.open(sys.argv[1], 'rb') as f:
    pickle.load(f)
""",
    "lzma-pickle": """
import lzma, pickle, sys
with lzma.open(sys.argv[1], 'rb') as f:
    pickle.load(f)
""",
    "tar-torch": _EXTRACT_THEN.format(
        imports="import tarfile, torch",
        extract="""    with tarfile.open(path) as tar:
        if hasattr(tarfile, 'data_filter'):
            tar.extractall(dest, filter='data')
        else:
            tar.extractall(dest)""",
        suffixes="'.pt', '.pth', '.bin', '.ckpt'",
        load="            torch.load(member, map_location='cpu', weights_only=False)",
    ),
    "zip-torch": _EXTRACT_THEN.format(
        imports="import zipfile, torch",
        extract="""    with zipfile.ZipFile(path) as zf:
        zf.extractall(dest)""",
        suffixes="'.pt', '.pth', '.bin', '.ckpt'",
        load="            torch.load(member, map_location='cpu', weights_only=False)",
    ),
    # nullifAI: PyTorch-named pickles shipped in 7z, unpacked then unpickled.
    "7z-pickle": _EXTRACT_THEN.format(
        imports="import pickle, py7zr",
        extract="""    with py7zr.SevenZipFile(path, 'r') as archive:
        archive.extractall(dest)""",
        suffixes="'.pt', '.pth', '.bin', '.pkl'",
        load="""            with open(member, 'rb') as f:
                pickle.load(f)""",
    ),
}

# Modules each loader imports; a test skips the sample when one is missing.
LOADER_REQUIRES: dict[str, tuple[str, ...]] = {
    "pickle": (),
    "pickle-stream": (),
    "pickle-nested": (),
    "torch": ("torch",),
    "torch-weights-only": ("torch",),
    "torch-pickle-file": ("torch",),
    "torch-check-weights": ("torch",),
    "torch-check-grad": ("torch",),
    "torch-jit-forward": ("torch",),
    "torch-package": ("torch",),
    "pickle-check-globals": (),
    "numpy": ("numpy",),
    "numpy-npz": ("numpy",),
    "joblib": ("joblib",),
    "gzip-pickle": (),
    "bz2-pickle": (),
    "lzma-pickle": (),
    "tar-torch": ("torch",),
    "zip-torch": ("torch",),
    "7z-pickle": ("py7zr",),
}

# safetensors, GGUF and chat templates (samples/fmt_safetensors.py, samples/fmt_gguf.py).
# Servers rendered chat templates with a plain Environment (llama-cpp-python before
# 0.2.72, SGLang's reranker): every template in the file is rendered that way here.
_RENDER_ARGS = """dict(messages=[{'role': 'user', 'content': 'Hello'}], add_generation_prompt=True,
          bos_token='<s>', eos_token='</s>', raise_exception=lambda m: None)"""
LOADERS.update(
    {
        "safetensors": """
import sys
from safetensors.numpy import load_file
load_file(sys.argv[1])
""",
        "gguf-jinja": f"""
import sys, jinja2
from trainguard.samples.fmt_gguf import read_metadata
env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
for key, value in read_metadata(sys.argv[1]).items():
    if key == 'tokenizer.chat_template' or key.startswith('tokenizer.chat_template.'):
        env.from_string(value).render(**{_RENDER_ARGS})
""",
        "jinja-tokenizer-config": f"""
import json, sys, jinja2
with open(sys.argv[1]) as f:
    found = json.load(f)['chat_template']
for t in [found] if isinstance(found, str) else [x['template'] for x in found]:
    jinja2.Template(t).render(**{_RENDER_ARGS})
""",
    }
)
LOADER_REQUIRES.update(
    {
        "safetensors": ("safetensors", "numpy"),
        "gguf-jinja": ("jinja2",),
        "jinja-tokenizer-config": ("jinja2",),
    }
)
