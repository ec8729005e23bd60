"""Whole model repositories: configs that make transformers run the repository's code.

A repository is a folder, not a file, so these samples live in their own table,
:data:`REPOSITORIES`, beside ``MALICIOUS``/``BENIGN`` (whose builders return one
file each).  Each builder writes a small Hugging Face style repository into the
folder it is given and returns that folder.  The payloads only create the
canary; :data:`REPO_LOADERS` holds the call a victim makes, which runs them
only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from trainguard.samples.base import Verdict, sh_touch
from trainguard.samples.fmt_safetensors import safetensors_bytes

RepoBuilder = Callable[[Path, Path], Path]
_ADVISORY = "https://huggingface.co/docs/transformers/custom_models"


@dataclass(frozen=True)
class RepoSample:
    id: str
    title: str
    technique: str
    advisory: str
    loader: str  # key in REPO_LOADERS
    fires: bool  # the payload provably runs under ``loader``
    malicious: bool
    expect: Verdict  # minimal verdict for malicious samples, maximal for benign ones
    build: RepoBuilder  # build(out_dir, canary) -> the repository folder


REPOSITORIES: dict[str, RepoSample] = {}

# ``python -c SRC FOLDER`` in a throwaway HF_HOME, offline: the plain calls of a
# training script that trusts the repository.
_PRELUDE = """
import os, sys, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp())
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp()
"""
REPO_LOADERS: dict[str, str] = {
    "transformers-model": _PRELUDE
    + """
from transformers import AutoModel
AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
""",
    "transformers-tokenizer": _PRELUDE
    + """
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
""",
}


def repo_sample(
    id: str,
    title: str,
    technique: str,
    *,
    loader: str = "transformers-model",
    malicious: bool = True,
    fires: bool = True,
    expect: Verdict = "high",
    advisory: str = _ADVISORY,
) -> Callable[[RepoBuilder], RepoBuilder]:
    def deco(build: RepoBuilder) -> RepoBuilder:
        if id in REPOSITORIES:
            raise ValueError(f"duplicate repository sample {id!r}")
        REPOSITORIES[id] = RepoSample(
            id, title, technique, advisory, loader, fires, malicious, expect, build
        )
        return build

    return deco


# -- the pieces of a repository --------------------------------------------------------

_TINY_BERT = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 32,
    "transformers_version": "4.46.0",
}
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _weights(folder: Path) -> None:
    """One real tensor (the word embeddings); loaders initialise the rest."""
    zeros = struct.pack("<128f", *([0.0] * 128))
    tensors = {"embeddings.word_embeddings.weight": ("F32", [16, 8], zeros)}
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, {"format": "pt"}))


def _tokenizer(folder: Path, extra: dict[str, object] | None = None) -> None:
    (folder / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    _write_json(folder / "special_tokens_map.json", {"unk_token": "[UNK]", "pad_token": "[PAD]"})
    config: dict[str, object] = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    _write_json(folder / "tokenizer_config.json", {**config, **(extra or {})})


def _payload(canary: Path) -> str:
    return f"import os\nos.system({sh_touch(canary)!r})\n"


_CONFIG_PY = '''"""Configuration of the Evil model."""
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''

_MODELING_PY = '''"""Modelling code of the Evil model."""
{payload}
from transformers import PreTrainedModel

from .configuration_evil import EvilConfig


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
'''


def _remote_config(auto_map: Mapping[str, object]) -> dict[str, object]:
    return {**_TINY_BERT, "architectures": ["EvilModel"], "auto_map": auto_map}


# -- benign ------------------------------------------------------------------------------


@repo_sample(
    "repo-benign-bert",
    "a tiny BERT repository: config.json, safetensors, tokenizer files",
    "no remote code: nothing beyond the library runs when it loads",
    malicious=False,
    fires=False,
    expect="clean",
    advisory="",
)
def benign_bert(out: Path, canary: Path) -> Path:
    _write_json(out / "config.json", _TINY_BERT)
    _weights(out)
    _tokenizer(out)
    return out


@repo_sample(
    "repo-benign-with-script",
    "a plain repository that ships a conversion script no config points to",
    "code in the repository that loading does not run (reported low)",
    malicious=False,
    fires=False,
    expect="low",
    advisory="",
)
def benign_with_script(out: Path, canary: Path) -> Path:
    benign_bert(out, canary)
    (out / "convert_checkpoint.py").write_text(
        '"""Convert an original checkpoint to this layout."""\nimport sys\n\n'
        "def main(argv):\n    return len(argv)\n",
        encoding="utf-8",
    )
    return out


# -- malicious -----------------------------------------------------------------------------


@repo_sample(
    "repo-auto-map-modeling",
    "config.json auto_map points to modeling_evil.py, which runs a command on import",
    "remote code: AutoModel.from_pretrained(..., trust_remote_code=True) imports the module",
)
def auto_map_modeling(out: Path, canary: Path) -> Path:
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    _write_json(out / "config.json", _remote_config(auto_map))
    (out / "configuration_evil.py").write_text(_CONFIG_PY, encoding="utf-8")
    (out / "modeling_evil.py").write_text(
        _MODELING_PY.format(payload=_payload(canary)), encoding="utf-8"
    )
    _weights(out)
    _tokenizer(out)
    return out


@repo_sample(
    "repo-payload-in-helper",
    "a clean-looking modelling file whose relative import carries the payload",
    "the payload hides in a helper module that transformers fetches with the model code",
)
def payload_in_helper(out: Path, canary: Path) -> Path:
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    _write_json(out / "config.json", _remote_config(auto_map))
    (out / "configuration_evil.py").write_text(_CONFIG_PY, encoding="utf-8")
    modeling = _MODELING_PY.format(payload="from .rotary_helpers import rotate_half\n")
    (out / "modeling_evil.py").write_text(modeling, encoding="utf-8")
    (out / "rotary_helpers.py").write_text(
        _payload(canary) + "\n\ndef rotate_half(x):\n    return x\n", encoding="utf-8"
    )
    _weights(out)
    return out


@repo_sample(
    "repo-tokenizer-auto-map",
    "tokenizer_config.json auto_map points to a tokenizer module that runs a command",
    "remote code through the tokenizer: AutoTokenizer with trust_remote_code=True",
    loader="transformers-tokenizer",
)
def tokenizer_auto_map(out: Path, canary: Path) -> Path:
    _write_json(out / "config.json", _TINY_BERT)
    _weights(out)
    auto_map = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    _tokenizer(out, {"tokenizer_class": "EvilTokenizer", "auto_map": auto_map})
    (out / "tokenization_evil.py").write_text(
        _payload(canary) + "from transformers import BertTokenizer\n\n\n"
        "class EvilTokenizer(BertTokenizer):\n    pass\n",
        encoding="utf-8",
    )
    return out


@repo_sample(
    "repo-code-from-other-repo",
    "config.json auto_map names code in another Hub repository (org/repo--module.Class)",
    "remote code that is not even in the repository being scanned",
    fires=False,
)
def code_from_other_repo(out: Path, canary: Path) -> Path:
    auto_map = {"AutoModel": "attacker/helpers--modeling_evil.EvilModel"}
    _write_json(out / "config.json", _remote_config(auto_map))
    _weights(out)
    return out


@repo_sample(
    "repo-custom-pipeline",
    "config.json custom_pipelines names a pipeline class in pipeline_evil.py",
    "remote code through pipeline(..., trust_remote_code=True)",
    fires=False,
)
def custom_pipeline(out: Path, canary: Path) -> Path:
    pipelines = {"evil-task": {"impl": "pipeline_evil.EvilPipeline", "pt": ["AutoModel"]}}
    _write_json(out / "config.json", {**_TINY_BERT, "custom_pipelines": pipelines})
    (out / "pipeline_evil.py").write_text(
        _payload(canary) + "from transformers import Pipeline\n\n\n"
        "class EvilPipeline(Pipeline):\n    pass\n",
        encoding="utf-8",
    )
    _weights(out)
    return out
